-- examples/gateway's daily bill for a service provider (sp_mchid) whose
-- two sub-merchants use one out_trade_no: WeChat scopes out_trade_no (and
-- out_refund_no) per merchant, so the provider's bill, which holds every
-- sub-merchant's orders, may have two lines of one number. Each line is
-- matched by its sub-merchant (特约商户号) and number: the other
-- sub-merchant's order is missing here, under its sub_mchid, the
-- gateway's payment agrees, and a refund of the other's order is no
-- money refunded outside the gateway of the gateway's payment.
-- Was: matched by out_trade_no alone: the other's line was compared with
-- the gateway's payment (an amount mismatch of a payment that agreed),
-- the payment's own line was a duplicate_line, and the other's refund
-- flagged the gateway's payment refunded_elsewhere.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local json = require "paygate.json"
local days = require "support.days"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway: a service provider's daily bill", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100, partner = 2 }
    gw = core.start(sim, { partner = true,
      gateway = { console = { access = "loopback" } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("matches each line by its sub-merchant and number", function()
    local a, b = sim.partner.sub_mchids[1], sim.partner.sub_mchids[2]
    -- made within one Beijing day, the bill's (made again in the new
    -- day when a midnight passed meanwhile)
    local date, p, r = days.within(days.BEIJING, function()
      local p = gw:create{ sub_mchid = a, amount = 40 }
      -- sub-merchant b's order of the same number, made and paid first by
      -- another system of the provider's (its notifications go elsewhere:
      -- a loopback port nothing serves)
      local wx = sim:client(sim.partner)
      local ok, err = wx:native_prepay{ sp_appid = sim.partner.appid,
        sub_mchid = b, description = "another system's",
        out_trade_no = p.out_trade_no, notify_url = "http://127.0.0.1:9/n",
        amount = { total = 41, currency = "CNY" } }
      wx:stop()
      assert(ok, tostring(err))
      sim:pay(p.out_trade_no, b)
      -- then the gateway's, paid
      sim:pay_and_wait(p.out_trade_no, { mchid = a })
      gw:wait_state(p.id, "paid")
      -- and b's refunded in the merchant platform
      local r = sim:refund_outside(p.out_trade_no, { amount = 5 }, b)
      sim:settle(r.out_refund_no, "SUCCESS", b)
      return p, r
    end)
    sim:close_bills(date)
    -- the day run from the console's lever, as the job runs it
    local page = gw.srv:request{ path = "/console/reconcile" }
    assert.equal(200, page.status, page.body)
    local csrf = assert(page.body:match('name="csrf" value="(%x+)"'))
    local res = gw.srv:request{ method = "POST", path = "/console/reconcile",
      body = "date=" .. date .. "&csrf=" .. csrf, headers = {
        ["Content-Type"] = "application/x-www-form-urlencoded" } }
    assert.equal(303, res.status, res.body)
    local e = assert(audit.entries(gw.db, "reconcile:" .. date))
    local ev
    for _, x in ipairs(e) do
      local d = json.decode(x.evidence)
      if d.merchant == sim.partner.mchid then ev = d end
    end
    assert(ev, "the provider's report")
    local got = {}
    for _, m in ipairs(ev.findings) do
      got[#got + 1] = table.concat({ m.kind, m.out_trade_no,
        tostring(m.out_refund_no), tostring(m.local_amount),
        tostring(m.remote_amount), tostring(m.sub_mchid) }, " ")
    end
    -- b's order and its refund: missing here, under b; the gateway's
    -- payment agrees with its own line
    assert.same({
      "missing_local " .. p.out_trade_no .. " nil nil 41 " .. b,
      "missing_local " .. p.out_trade_no .. " " .. r.out_refund_no
        .. " nil 5 " .. b,
    }, got)
    assert.equal(2, ev.remote_payments)
    -- b's refund is not money of the gateway's payment
    local now = gw:get(p.id)
    assert.is_nil(now.refunded_elsewhere)
    assert.equal("paid", now.state)
  end)
end)
