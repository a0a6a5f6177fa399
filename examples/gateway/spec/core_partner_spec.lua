-- examples/gateway with a service provider (sp_mchid) and a sub-merchant:
-- the partner prepay, and the notification deduped by (sp/sub,
-- out_trade_no, trade_state).
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway for a service provider", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100, partner = true }
    gw = core.start(sim, { partner = true,
      gateway = { console = { access = "loopback" } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("needs the sub_mchid", function()
    local res = gw:call("POST", "/v1/payments", { order_id = "sp-0",
      channel = "native", amount = 1, description = "x" })
    assert.equal(400, res.status)
    assert.truthy(res.json.fields.sub_mchid)
  end)

  it("refuses a sub_mchid past 32 digits before storing anything",
     function()
    -- was: the WeChat Pay client's own check refused it after the
    -- payment was stored: 502 wechat_error (invalid_params), the payment
    -- left created under that sub_mchid, so the create corrected was
    -- 409 payment_exists for good (never moved to another sub_mchid)
    for i, sub in ipairs{ string.rep("1", 33), string.rep("9", 5000) } do
      local oid = "sp-long-" .. i
      local res = gw:call("POST", "/v1/payments", { order_id = oid,
        channel = "native", amount = 1, description = "x", sub_mchid = sub })
      assert.equal(400, res.status, res.body)
      assert.equal("invalid_request", res.json.error)
      assert.truthy(res.json.fields.sub_mchid, res.body)
      assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_payments"
        .. " WHERE order_id = $1", { oid })))
      local p = gw:create{ order_id = oid, amount = 1,
                           sub_mchid = sim.partner.sub_mchid }
      assert.equal(sim.partner.sub_mchid, p.sub_mchid)
    end
  end)

  it("pays a sub-merchant's order once", function()
    local p = gw:create{ sub_mchid = sim.partner.sub_mchid, amount = 66 }
    assert.equal(sim.partner.sub_mchid, p.sub_mchid)
    sim:fault{ endpoint = "notify", kind = "duplicate", count = 1 }
    sim:pay(p.out_trade_no, sim.partner.sub_mchid)
    local d = sim:wait_notification(p.out_trade_no, { attempts = 2 })
    assert.equal(204, d.attempts[2].status)
    local got = gw:wait_state(p.id, "paid")
    assert.equal(3, got.version)
    local rows = assert(gw.db:query("SELECT key FROM"
      .. " gw_notification_effects WHERE key LIKE $1",
      { "%|" .. p.out_trade_no .. "|%" }))
    assert.equal(1, #rows)
    assert.equal("pay|" .. sim.partner.mchid .. "/" .. sim.partner.sub_mchid
                 .. "|" .. p.out_trade_no .. "|SUCCESS", rows[1].key)
    local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                      { amount = 66 })
    assert.equal(201, r.status, r.body)
    sim:settle(r.json.out_refund_no)
    sim:wait_notification{ out_refund_no = r.json.out_refund_no }
    gw:wait_state(p.id, "refunded")
    -- the console's payment page lists them, found by the sp/sub key
    local page = gw.srv:request{ path = "/console/payments/" .. p.id }
    assert.equal(200, page.status)
    local received = assert(page.body:match("<h2>Notifications received"
      .. " %(verified%)</h2>(.-)</section>"))
    assert.matches("<td>" .. rows[1].key .. "</td>", received, 1, true)
    assert.matches("<td>refund|" .. r.json.out_refund_no .. "|SUCCESS</td>",
                   received, 1, true)
  end)
  it("refuses a resumed create for another sub-merchant, so it is never"
     .. " paid to the first", function()
    -- was: a create whose prepay WeChat refused (an unknown sub_mchid)
    -- stays created; the create sent again for the right sub_mchid
    -- resumed it with the first one kept, so its prepay was refused
    -- again, and the order could never be paid to the right one
    local oid = "sp-typo-" .. require("paygate.crypto").random_nonce(6)
    local typo = "1999999999"
    local res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 5, description = "x", sub_mchid = typo })
    assert.equal(502, res.status, res.body)
    local rows = assert(gw.db:query("SELECT id, state, sub_mchid FROM"
      .. " gw_payments WHERE order_id = $1", { oid }))
    assert.equal("created", rows[1].state)
    res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 5, description = "x",
      sub_mchid = sim.partner.sub_mchid })
    assert.equal(409, res.status, res.body)
    assert.equal("payment_exists", res.json.error, res.body)
    assert.matches("sub_mchid", res.json.message, 1, true)
    assert.equal(typo, res.json.payment.sub_mchid)
    rows = assert(gw.db:query("SELECT state, sub_mchid, attempt FROM"
      .. " gw_payments WHERE order_id = $1", { oid }))
    assert.equal(1, #rows)
    assert.same({ "created", typo, 1 },
                { rows[1].state, rows[1].sub_mchid, rows[1].attempt })
    -- the same sub-merchant resumes it as before
    res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 5, description = "x", sub_mchid = typo })
    assert.equal(502, res.status, res.body)
    assert.equal(2, assert(gw.db:query("SELECT attempt FROM gw_payments"
      .. " WHERE order_id = $1", { oid }))[1].attempt)
  end)

  it("refuses a sub_mchid that is the provider's own mchid, before"
     .. " storing anything", function()
    -- was: sent to WeChat, which refused it: 502 wechat_error, the
    -- payment left created under that sub_mchid
    local oid = "sp-self-" .. crypto.random_nonce(6)
    local res = gw:call("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 1, description = "x",
      sub_mchid = sim.partner.mchid })
    assert.equal(400, res.status, res.body)
    assert.matches("provider", res.json.fields.sub_mchid, 1, true)
    assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_payments"
      .. " WHERE order_id = $1", { oid })))
  end)
end)
