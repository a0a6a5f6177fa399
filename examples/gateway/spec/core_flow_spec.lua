-- examples/gateway, core flows against the simulator (SQLite):
-- create -> pay -> notification -> paid, exactly once; refunds; close;
-- attempts; idempotency replay.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway core flow", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim)
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("refuses an unsigned request", function()
    local res = gw.srv:request{ method = "GET", path = "/v1/payments/x" }
    assert.equal(401, res.status)
    assert.equal("missing_signature", res.json.error)
  end)

  it("refuses a bad body with one reason per field", function()
    local res = gw:call("POST", "/v1/payments", { channel = "card",
                                                  amount = -1 })
    assert.equal(400, res.status, res.body)
    assert.equal("invalid_request", res.json.error)
    assert.truthy(res.json.fields.channel)
    assert.truthy(res.json.fields.amount)
    assert.truthy(res.json.fields.order_id)
    assert.truthy(res.json.fields.description)
    res = gw:call("POST", "/v1/payments", { order_id = "emoji-1",
      channel = "native", amount = 1, description = "cake \240\159\142\130" })
    assert.equal(400, res.status)
    assert.matches("no emoji", res.json.fields.description, 1, true)
    -- the same rule, said the same way, for attach and a refund's reason
    res = gw:call("POST", "/v1/payments", { order_id = "emoji-2",
      channel = "native", amount = 1, description = "cake",
      attach = "\240\159\152\128" })
    assert.equal(400, res.status)
    assert.matches("no emoji", res.json.fields.attach, 1, true)
    res = gw:call("POST", "/v1/payments/pay_none/refunds", { amount = 1,
      reason = "\240\159\152\128" })
    assert.equal(400, res.status, res.body)
    assert.matches("no emoji", res.json.fields.reason, 1, true)
    -- raw bytes: an encoder would turn them into other characters
    res = gw:call("POST", "/v1/payments", '{"order_id":"bad-utf8",'
      .. '"channel":"native","amount":1,"description":"\255\254"}')
    assert.equal(400, res.status)
    assert.truthy(res.json.fields.description)
  end)

  it("refuses a field it does not know, in every POST body", function()
    local function refused(res, field)
      assert.equal(400, res.status, res.body)
      assert.equal("invalid_request", res.json.error)
      assert.equal("unknown field", res.json.fields[field], res.body)
      assert.matches(field .. ": unknown field", res.json.message, 1, true)
    end
    -- a typo of expires_in would leave the default in place
    refused(gw:call("POST", "/v1/payments", { order_id = "typo-1",
      channel = "native", amount = 1, description = "tea",
      expire_in = 60 }), "expire_in")
    refused(gw:call("POST", "/v1/payments", { order_id = "typo-2",
      channel = "jsapi", amount = 1, description = "tea",
      payer = { openid = "o-1", open_id = "o-1" } }), "payer.open_id")
    assert.equal(0, #assert(gw.db:query("SELECT id FROM gw_payments WHERE"
      .. " order_id IN ('typo-1', 'typo-2')")))
    local p = gw:create{ amount = 100 }
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
      { channel = "h5", client_ip = "203.0.113.7", h5type = "iOS" }),
      "h5type")
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/close",
      { reason = "customer left" }), "reason")
    assert.equal(1, #gw:get(p.id).attempts)
    assert.equal("paying", gw:get(p.id).state)
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
      { amout = 30 }), "amout")
    refused(gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
      { amount = 30, notify_url = "https://x" }), "notify_url")
    assert.equal(0, #gw:get(p.id).refunds)
    -- a close's body may be empty, or {}
    local q = gw:create{ amount = 100 }
    local res = gw:call("POST", "/v1/payments/" .. q.id .. "/close", "{}")
    assert.equal(200, res.status, res.body)
  end)

  it("creates a native payment, applies its notification once", function()
    local p, pay = gw:create{ amount = 250 }
    assert.matches("^weixin://", pay.code_url)
    assert.equal("paying", p.state)
    assert.equal(p.id .. "_1", p.out_trade_no)
    sim:fault{ endpoint = "notify", kind = "duplicate", count = 1 }
    sim:pay(p.out_trade_no)
    local d = sim:wait_notification(p.out_trade_no, { attempts = 2 })
    assert.equal(204, d.attempts[1].status)
    assert.equal(204, d.attempts[2].status)
    local got = gw:get(p.id)
    assert.equal("paid", got.state)
    assert.equal(3, got.version)              -- created, paying, paid
    assert.truthy(got.transaction_id)
    assert.equal(1, #got.attempts)
    assert.equal("paid", got.attempts[1].state)
    local rows = assert(gw.db:query("SELECT outcome FROM gw_notifications"
      .. " WHERE business_key LIKE $1", { "pay|%|" .. p.out_trade_no
                                          .. "|SUCCESS" }))
    assert.equal(1, #rows)                     -- the same id twice
    assert.equal("applied", rows[1].outcome)
    local audit = require "paygate.audit"
    assert.is_true((audit.verify(gw.db, "payment:" .. p.id)))
    local ev = assert(gw.db:query("SELECT type FROM paygate_outbox WHERE"
      .. " subject = $1 ORDER BY id", { p.id }))
    assert.same({ "payment.paying", "payment.paid" },
                { ev[1].type, ev[2].type })
  end)

  it("hands out jsapi and app pay-sign parameters", function()
    local _, pay = gw:create{ channel = "jsapi",
      payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } }
    assert.matches("^prepay_id=", pay.package)
    assert.equal("RSA", pay.signType)
    assert.truthy(pay.paySign)
    local _, app = gw:create{ channel = "app" }
    assert.equal("Sign=WXPay", app.package)
    assert.truthy(app.prepayid)
    assert.truthy(app.sign)
    local res = gw:call("POST", "/v1/payments", { order_id = "js-no-payer",
      channel = "jsapi", amount = 1, description = "x" })
    assert.equal(400, res.status)
    assert.truthy(res.json.fields["payer.openid"])
  end)

  it("answers FAIL to a badly signed notification, applies the retry",
     function()
    local p = gw:create{}
    sim:fault{ endpoint = "notify", kind = "bad_signature", count = 1 }
    local d = sim:pay_and_wait(p.out_trade_no)
    assert.equal(401, d.attempts[1].status)   -- does not verify
    assert.equal(204, d.last.status)
    assert.equal("paid", gw:get(p.id).state)
  end)

  it("answers FAIL to a notification for an unknown merchant", function()
    local res = gw.srv:request{ method = "POST",
      path = "/wechatpay/notify/1234567", body = "{}" }
    assert.equal(404, res.status)
    assert.equal("FAIL", res.json.code)
    res = gw.srv:request{ method = "POST", path = "/wechatpay/notify/"
                          .. sim.merchant.mchid, body = "{}" }
    assert.equal(401, res.status)           -- malformed: no headers
    assert.equal("FAIL", res.json.code)
  end)

  it("answers 409 payment_exists for a second create of an order",
     function()
    local p = gw:create{ order_id = "dup-1" }
    local res = gw:call("POST", "/v1/payments", { order_id = "dup-1",
      channel = "native", amount = 100, description = "again" })
    assert.equal(409, res.status)
    assert.equal("payment_exists", res.json.error)
    assert.equal(p.id, res.json.payment.id)
  end)

  it("replays a POST with the same Idempotency-Key byte for byte",
     function()
    local body = '{"order_id":"idem-1","channel":"native","amount":5,'
                 .. '"description":"idem"}'
    local h = { ["Idempotency-Key"] = "k-idem-1" }
    local a = gw:call("POST", "/v1/payments", body, h)
    local b = gw:call("POST", "/v1/payments", body, h)
    assert.equal(201, a.status)
    assert.equal(201, b.status)
    assert.equal(a.body, b.body)
    assert.equal("true", b.headers["idempotent-replayed"])
  end)

  it("opens a new attempt after closing the previous one", function()
    local p = gw:create{ channel = "native" }
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "h5", client_ip = "10.0.0.1" })
    assert.equal(201, res.status, res.body)
    assert.truthy(res.json.pay.h5_url)
    assert.equal(p.id .. "_2", res.json.payment.out_trade_no)
    local got = gw:get(p.id)
    assert.equal("superseded", got.attempts[1].state)
    assert.equal("open", got.attempts[2].state)
    -- the first attempt is closed at WeChat
    local q = sim:client():query_by_out_trade_no(p.id .. "_1")
    assert.equal("CLOSED", q.trade_state)
  end)

  it("opens no attempt in a payment's last 90 s: payment_expired",
     function()
    -- the attempt's time_expire is the payment's, and WeChat is reported
    -- to refuse one under a minute ahead (before: sent, and refused)
    local p = gw:create{ channel = "native" }
    assert(gw.db:exec("UPDATE gw_payments SET expires_at = $2 WHERE id = $1",
                      { p.id, os.time() + 80 }))
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    assert.equal(409, res.status, res.body)
    assert.equal("payment_expired", res.json.error)
    assert.matches("too soon for a new attempt", res.json.message, 1, true)
    -- nothing changed: the first attempt is still the open one
    local got = gw:get(p.id)
    assert.equal(1, #got.attempts)
    assert.equal("open", got.attempts[1].state)
    assert(gw.db:exec("UPDATE gw_payments SET expires_at = $2 WHERE id = $1",
                      { p.id, os.time() + 200 }))
    res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                  { channel = "native" })
    assert.equal(201, res.status, res.body)
  end)

  it("closes a payment", function()
    local p = gw:create{}
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    assert.equal(200, res.status, res.body)
    assert.equal("closed", res.json.state)
    local q = sim:client():query_by_out_trade_no(p.out_trade_no)
    assert.equal("CLOSED", q.trade_state)
  end)

  it("logs why a call to WeChat Pay failed, not only its kind", function()
    -- the operator reads the log, not the 502 body the merchant's systems
    -- got: each failed call's line carries the error's message (reason)
    local json = require "paygate.json"
    local function logged(msg, field, value)
      local rec
      testing.wait_until(function()
        for line in (gw.srv:logs() or ""):gmatch("[^\n]+") do
          local r = json.decode(line)
          if type(r) == "table" and r.msg == msg and r[field] == value then
            rec = r
          end
        end
        return rec ~= nil
      end, 10, "the line " .. msg)
      return rec
    end
    -- a prepay answer signed under a key the client does not hold (the
    -- trial: a public key under an id the config does not name)
    sim:fault{ endpoint = "prepay", kind = "unknown_serial", count = 1 }
    local res = gw:call("POST", "/v1/payments", { order_id = "o-why-1",
      channel = "native", amount = 10, description = "why" })
    assert.equal(502, res.status, res.body)
    local rec = logged("gateway: prepay failed", "kind",
                       "unverified_response")
    assert.is_string(rec.reason, json.encode(rec))
    assert.matches("Wechatpay-Serial", rec.reason, 1, true)
    -- a refund WeChat refuses
    local p = gw:create{ amount = 40 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    sim:fault{ endpoint = "refund", kind = "error", status = 403,
               code = "NOT_ENOUGH", message = "spec: balance too low",
               count = 1 }
    res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                  { amount = 10 })
    assert.equal(502, res.status, res.body)
    rec = logged("gateway: refund call failed", "kind", "not_enough")
    assert.matches("spec: balance too low", rec.reason, 1, true)
    -- a query (refresh) WeChat refuses
    sim:fault{ endpoint = "query", kind = "error", status = 403,
               code = "NO_AUTH", message = "spec: no right to ask",
               count = 1 }
    res = gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=1")
    assert.equal(200, res.status, res.body)
    rec = logged("gateway: refresh failed; answering local state",
                 "payment", p.id)
    assert.matches("spec: no right to ask", rec.reason, 1, true)
  end)

  it("refuses changes that the payment's state does not allow", function()
    local p = gw:create{ amount = 50 }
    local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                      { amount = 10 })
    assert.equal(409, r.status)
    assert.equal("invalid_state", r.json.error)
    assert.matches("it is not paid yet (close it instead", r.json.message,
                   1, true)
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local c = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    assert.equal(409, c.status)
    assert.equal("payment_paid", c.json.error)
    local a = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                      { channel = "native" })
    assert.equal(409, a.status)
    assert.equal("payment_paid", a.json.error)
    local missing = gw:call("GET", "/v1/payments/pay_nosuchpayment")
    assert.equal(404, missing.status)
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

  it("refunds partially then fully, never above the paid amount",
     function()
    local p = gw:create{ amount = 300 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local r1 = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 100 })
    assert.equal(201, r1.status, r1.body)
    assert.equal("processing", r1.json.state)
    local over = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                         { amount = 201 })
    assert.equal(422, over.status)
    assert.equal("refund_exceeds_paid", over.json.error)
    sim:settle(r1.json.out_refund_no)
    sim:wait_notification{ out_refund_no = r1.json.out_refund_no }
    gw:wait_state(p.id, "partially_refunded")
    local r2 = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 200 })
    assert.equal(201, r2.status, r2.body)
    sim:settle(r2.json.out_refund_no)
    sim:wait_notification{ out_refund_no = r2.json.out_refund_no }
    local got = gw:wait_state(p.id, "refunded")
    assert.equal(300, got.refunded)
    local list = gw:call("GET", "/v1/payments/" .. p.id .. "/refunds")
    assert.equal(2, #list.json.refunds)
    local one = gw:call("GET", "/v1/refunds/" .. r1.json.id)
    assert.equal("succeeded", one.json.state)
    -- each names its payment's merchant as the payment does: a direct
    -- merchant's mchid, no sub_mchid (was: no merchant at all)
    for _, r in ipairs{ r1.json, r2.json, list.json.refunds[1],
                        list.json.refunds[2], one.json,
                        got.refunds[1] } do
      assert.equal(got.mchid, r.mchid)
      assert.is_nil(r.sub_mchid)
    end
  end)
  it("refuses a 51st refund of one payment before sending it (refund_limit)",
     function()
    -- WeChat Pay takes at most 50 refunds of one order: the 51st is
    -- refused here, with what is left, not sent to be refused (502)
    local p = gw:create{ amount = 100 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    for i = 1, 50 do
      local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                        { amount = 1 })
      assert.equal(201, r.status, "refund " .. i .. ": " .. r.body)
    end
    local function sent_refunds()
      local n = 0
      for _, r in ipairs(sim:requests()) do
        if r.method == "POST" and r.target == "/v3/refund/domestic/refunds"
        then
          n = n + 1
        end
      end
      return n
    end
    local sent = sent_refunds()
    assert.truthy(sent >= 50, "the simulator's log has " .. sent)
    local over = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                         { amount = 1 })
    assert.equal(422, over.status, over.body)
    assert.equal("refund_limit", over.json.error)
    assert.equal(50, over.json.refunds)
    assert.equal(50, over.json.refundable)
    assert.matches("at most 50", over.json.message)
    assert.equal(sent, sent_refunds())
    local list = gw:call("GET", "/v1/payments/" .. p.id .. "/refunds")
    assert.equal(50, #list.json.refunds)
  end)

  it("refuses a refund more than a year after the payment before sending"
     .. " it (refund_too_late)", function()
    -- WeChat Pay takes a refund within a year of the payment only: one of
    -- a payment WeChat says was paid 400 days ago is refused here, not
    -- sent to be refused (502); one paid 200 days ago is sent
    -- (made a minute before it was paid, here and at WeChat: an order is
    -- never paid before it is made, and the simulator refuses that)
    local function beijing(t)
      return os.date("!%Y-%m-%dT%H:%M:%S+08:00", t + 8 * 3600)
    end
    local function paid_days_ago(days)
      local p = gw:create{ amount = 100 }
      local at = os.time() - days * 86400
      for _, t in ipairs({ "gw_payments", "gw_attempts" }) do
        assert(gw.db:exec("UPDATE " .. t .. " SET created_at = $1 WHERE "
          .. (t == "gw_payments" and "id" or "payment_id") .. " = $2",
          { at - 60, p.id }))
      end
      local res = sim:control("POST", "/sim/transactions/" .. p.out_trade_no
        .. "/pay", { create_time = beijing(at - 60),
                     success_time = beijing(at) })
      assert.equal("SUCCESS", res.trade_state)
      sim:wait_notification(p.out_trade_no)
      gw:wait_state(p.id, "paid")
      return p, at
    end
    local function sent_refunds()
      local n = 0
      for _, r in ipairs(sim:requests()) do
        if r.method == "POST" and r.target == "/v3/refund/domestic/refunds"
        then
          n = n + 1
        end
      end
      return n
    end
    local old, at = paid_days_ago(400)
    local sent = sent_refunds()
    local over = gw:call("POST", "/v1/payments/" .. old.id .. "/refunds",
                         { amount = 1 })
    assert.equal(422, over.status, over.body)
    assert.equal("refund_too_late", over.json.error)
    assert.equal(at, over.json.paid_at)
    assert.matches("within a year", over.json.message)
    assert.equal(sent, sent_refunds())
    local list = gw:call("GET", "/v1/payments/" .. old.id .. "/refunds")
    assert.equal(0, #list.json.refunds)
    assert.equal("paid", gw:call("GET", "/v1/payments/" .. old.id).json.state)
    local recent = paid_days_ago(200)
    local ok = gw:call("POST", "/v1/payments/" .. recent.id .. "/refunds",
                       { amount = 1 })
    assert.equal(201, ok.status, ok.body)
    assert.equal(sent + 1, sent_refunds())
  end)
end)
