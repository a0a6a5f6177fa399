-- examples/gateway on PostgreSQL: the same flows as on SQLite -- create,
-- a duplicated notification applied once, refunds to the paid amount, the
-- audit chain -- against a real server started by spec/support.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local servers = require "spec.support.servers"
local core = dofile("examples/gateway/spec/core_support.lua")

if not servers.have_postgres() then
  describe("gateway on PostgreSQL", function()
    pending("PostgreSQL is not installed")
  end)
  return
end

-- Waits until the pool of every worker that logged "postgres: pool down"
-- has logged "postgres: pool up again" after it (src/store/lpg.c). A
-- worker's pool fails statements at once for down_for (0.5 s) after a
-- connect of its own failed, even when the server is back by then: the
-- connect was made while it still started up, or it got no answer within
-- connect_timeout on a busy machine. So one worker may serve while the
-- other -- the one this spec's keep-alive connection goes to -- still
-- answers 503 (CI: the get after the applied retry, then each test's
-- first request, and the refusal record of a forged notification, which
-- is written once, all failed within that window).
local function wait_pools_up(gw)
  testing.wait_until(function()
    local last = {}
    for l in (gw.srv:logs() or ""):gmatch("[^\n]+") do
      local pid = l:match('"pid":(%d+)')
      if pid and l:find('"msg":"postgres: pool down', 1, true) then
        last[pid] = "down"
      elseif pid and l:find('"msg":"postgres: pool up again', 1, true) then
        last[pid] = "up"
      end
    end
    for _, state in pairs(last) do
      if state ~= "up" then return false end
    end
    return true
  end, 20, "every worker's store pool to be up again")
end

describe("gateway on PostgreSQL", function()
  local sim, gw, pg

  setup(function()
    pg = servers.postgres()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { db = function() return pg.url end, workers = 2 })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  it("pays, dedupes, refunds and keeps the audit chain", function()
    local p = gw:create{ amount = 500 }
    assert.equal("paying", p.state)
    sim:fault{ endpoint = "notify", kind = "duplicate", count = 1 }
    sim:pay(p.out_trade_no)
    local d = sim:wait_notification(p.out_trade_no, { attempts = 2 })
    assert.equal(204, d.attempts[1].status)
    assert.equal(204, d.attempts[2].status)
    local got = gw:wait_state(p.id, "paid")
    assert.equal(3, got.version)
    local r1 = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 200 })
    assert.equal(201, r1.status, r1.body)
    local over = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                         { amount = 301 })
    assert.equal(422, over.status, over.body)
    local r2 = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 300 })
    assert.equal(201, r2.status, r2.body)
    sim:settle(r1.json.out_refund_no)
    sim:settle(r2.json.out_refund_no)
    sim:wait_notification{ out_refund_no = r2.json.out_refund_no }
    sim:wait_notification{ out_refund_no = r1.json.out_refund_no }
    got = gw:wait_state(p.id, "refunded")
    assert.equal(500, got.refunded)
    local ok, rep = audit.verify(gw.db, "payment:" .. p.id)
    assert.is_true(ok, rep and rep.message)
    local ev = assert(gw.db:query("SELECT type FROM paygate_outbox WHERE"
      .. " subject = $1 ORDER BY id", { p.id }))
    local types = {}
    for i, r in ipairs(ev) do types[i] = r.type end
    assert.same({ "payment.paying", "payment.paid", "refund.succeeded",
                  "payment.partially_refunded", "refund.succeeded",
                  "payment.refunded" }, types)
  end)

  it("answers FAIL while the store is down, applies the retry after",
     function()
    local p = gw:create{ amount = 77 }
    pg.stop()
    local ok, err = pcall(function()
      sim:pay(p.out_trade_no)
      local d = sim:wait_notification(p.out_trade_no, { attempts = 1 })
      local a = d.attempts[1]
      assert.equal(500, a.status, "the attempt's error: " .. tostring(a.error))
    end)
    pg.start()
    assert(ok, err)
    wait_pools_up(gw)
    local d = sim:wait_notification(p.out_trade_no, { timeout = 40 })
    assert.equal(204, d.last.status)
    local got = gw:wait_state(p.id, "paid", 20)
    assert.equal(3, got.version)
  end)

  it("never refunds above the paid amount under concurrent requests",
     function()
    local p = gw:create{ amount = 100 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local counts = gw:concurrent_refunds(p.id, 10, 30)
    assert.equal(3, counts[201])
    assert.equal(7, counts[422])
  end)

  it("refreshes from WeChat with ?refresh=1", function()
    local p = gw:create{ amount = 10 }
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    sim:pay(p.out_trade_no)
    local got = gw:get(p.id, "?refresh=1")
    assert.equal("paid", got.state)
    assert.is_nil(got.stale)
  end)

  it("records a forged notification whose headers are not UTF-8", function()
    -- the refusal's reason quotes the serial (its first 64 bytes: the
    -- cut falls inside the last character): PostgreSQL refuses a text
    -- that is not UTF-8, and the record of the forgery would be lost
    local serial = "FORGED\255\254" .. ("x"):rep(55) .. "中"
    local res = gw.srv:request{ method = "POST",
      path = "/wechatpay/notify/" .. sim.merchant.mchid,
      headers = { ["Content-Type"] = "application/json",
        ["Wechatpay-Serial"] = serial,
        ["Wechatpay-Timestamp"] = tostring(os.time()),
        ["Wechatpay-Nonce"] = "n", ["Wechatpay-Signature"] = "AAAA" },
      body = '{"id":"forged-utf8","event_type":"TRANSACTION.SUCCESS",'
        .. '"resource":{}}' }
    assert.equal(401, res.status, res.body)
    local row
    testing.wait_until(function()
      row = assert(gw.db:query("SELECT * FROM gw_notifications_refused"
        .. " WHERE notification_id = $1", { "forged-utf8" }))[1]
      return row ~= nil
    end, 10, "the forged notification recorded")
    assert.equal("unknown_serial", row.kind, row.reason)
    assert.matches("FORGED??xxx", row.reason, 1, true)
    assert.equal(0, tonumber(row.authentic))
  end)
end)
