-- POST /wechatpay/notify/{mchid} end to end: every way a notification
-- can be wrong is refused (and WeChat's retry then applies it once);
-- duplicates and replays are acknowledged without a second effect; an
-- amount that does not match is an alarm, not a state change; two
-- partial refunds are two; a refund made elsewhere of a payment here
-- flags it once, one of an order not known here is FAIL; money on a
-- closed or superseded attempt is applied, then refunded or raised as an
-- alarm (config.on_late_payment).
local S = require "examples.gateway.spec.support"
local json = require "cjson.safe"
local core = require "paygate.core"

local function refused(status) return status >= 400 end

describe("gateway notifications", function()
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)
  after_each(function() env.sim:clear_faults() end)

  local function check_applied_once(p)
    local got = env:wait_state(p.id, "paid")
    assert.equal(1, env:count_events(p.id, "payment.paid"))
    return got
  end

  for _, kind in ipairs({ "bad_signature", "unknown_serial",
                          "stale_timestamp" }) do
    it("a notification with " .. kind .. " is refused, its retry applied",
       function()
      env.sim:fault{ endpoint = "notify", kind = kind, count = 1 }
      local b = env:create()
      local d = env.sim:pay_and_wait(b.payment.out_trade_no)
      assert.truthy(#d.attempts >= 2)
      assert.is_truthy(d.attempts[1].status, json.encode(d.attempts[1]))
      -- 401: a notification that does not verify (not a 5xx of ours)
      assert.equal(401, d.attempts[1].status,
                   "first attempt answered " .. d.attempts[1].status)
      assert.is_true(S.ok2xx(d.last.status))
      check_applied_once(b.payment)
      -- the log says what was wrong, not only the kind
      local said
      for line in env.gw:logs():gmatch("[^\n]+") do
        local rec = json.decode(line)
        if type(rec) == "table" and rec.msg == "gateway: notification refused"
           and rec.kind == kind then
          said = rec.reason
        end
      end
      assert.is_string(said, "a reason in the log for " .. kind)
      assert.truthy(#said > 0)
    end)
  end

  it("a signed test probe (WECHATPAY/SIGNTEST/) is refused", function()
    env.sim:fault{ endpoint = "notify", kind = "bad_signature",
                   signtest = true, count = 1 }
    local b = env:create()
    local d = env.sim:pay_and_wait(b.payment.out_trade_no)
    assert.equal(401, d.attempts[1].status)
    check_applied_once(b.payment)
  end)

  it("a tampered body is refused with WeChat's FAIL body; the real one "
     .. "applies", function()
    local p = env:create().payment
    local body, h = env:notification("TRANSACTION.SUCCESS",
                                     env:transaction(p))
    local bad = body:gsub('"event_type":"TRANSACTION.SUCCESS"',
                          '"event_type":"TRANSACTION.SUCCESX"')
    assert.are_not.equal(body, bad)
    local res = env:post_notify(bad, h)
    assert.equal(401, res.status)
    assert.equal("WECHATPAY2-SHA256-RSA2048", res.headers["www-authenticate"])
    assert.equal("FAIL", res.json.code)
    assert.is_string(res.json.message)
    assert.equal("paying", env:get(p.id).state)
    res = env:post_notify(body, h)
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    check_applied_once(p)
  end)

  it("a resource that does not decrypt is refused", function()
    local p = env:create().payment
    local body = env:notification("TRANSACTION.SUCCESS", env:transaction(p))
    local t = json.decode(body)
    -- another first character (always: "A" over an "A" changed nothing,
    -- once in 64 runs)
    local c = t.resource.ciphertext
    t.resource.ciphertext = (c:sub(1, 1) == "A" and "B" or "A") .. c:sub(2)
    body = json.encode(t)
    local res = env:post_notify(body, env:notify_headers(body))
    -- signed as WeChat signs, and not decrypting: our APIv3 key is at
    -- fault, a failure of ours (500), not junk (401)
    assert.equal(500, res.status)
    assert.equal("decrypt_failed", res.json.message)
    assert.equal("paying", env:get(p.id).state)
  end)

  it("a signed notification with a field of the wrong type, or without"
     .. " an id, is refused with WeChat's FAIL body, nothing stored",
     function()
    local p = env:create().payment
    local cases = {
      env:transaction(p, { transaction_id = { a = 1 } }),
      env:transaction(p, { amount = { total = p.amount,
                                      payer_total = "lots" } }),
      env:transaction(p, { amount = { total = p.amount, payer_total = -5 } }),
    }
    for i, t in ipairs(cases) do
      local body, h = env:notification("TRANSACTION.SUCCESS", t)
      local res = env:post_notify(body, h)
      assert.equal(401, res.status, i .. ": " .. tostring(res.body))
      assert.equal("FAIL", res.json.code, i)
      assert.equal("malformed", res.json.message, i)
    end
    -- the envelope without its id
    local body = env:notification("TRANSACTION.SUCCESS", env:transaction(p))
    local t = json.decode(body)
    t.id = nil
    body = json.encode(t)
    local res = env:post_notify(body, env:notify_headers(body))
    assert.equal(401, res.status, res.body)
    assert.equal("malformed", res.json.message)
    assert.equal("paying", env:get(p.id).state)
    assert.equal(0, #assert(env.db:query("SELECT id FROM gw_notifications"
      .. " WHERE id IS NULL OR outcome = 'received'")))
    -- and the real one is applied once
    res = env:post_paid(p)
    assert.is_true(S.ok2xx(res.status), res.body)
    check_applied_once(p)
  end)

  it("a notification posted under another merchant's path is refused",
     function()
    local p = env:create().payment
    local body, h = env:notification("TRANSACTION.SUCCESS",
                                     env:transaction(p))
    local res = env:post_notify(body, h, "1999999999")
    assert.is_true(refused(res.status), res.status)
    res = env:post_notify(body, h, "not-a-mchid")
    assert.is_true(refused(res.status), res.status)
    -- and a transaction naming another merchant under ours
    local other = env:transaction(p, { mchid = "1888888888" })
    body, h = env:notification("TRANSACTION.SUCCESS", other)
    res = env:post_notify(body, h)
    assert.is_true(refused(res.status) or S.ok2xx(res.status))
    assert.equal("paying", env:get(p.id).state)
  end)

  it("a notification for an unknown order is not acknowledged as applied",
     function()
    local fake = { out_trade_no = "GWunknown" .. S.digits(10), amount = 5 }
    local res = env:post_paid(fake)
    -- WeChat must keep it (retry) or it is recorded as an alarm: never a
    -- crash, never a payment out of nothing
    if not S.ok2xx(res.status) then assert.equal("FAIL", res.json.code) end
    assert.equal(200, env:api("GET", "/openapi.json", nil,
                              { sign = false }).status)
    assert.equal(0, #assert(env.db:query(
      "SELECT id FROM gw_payments WHERE out_trade_no = $1",
      { fake.out_trade_no })))
  end)

  it("duplicates (WeChat's duplicate delivery) are acknowledged, applied "
     .. "once", function()
    env.sim:fault{ endpoint = "notify", kind = "duplicate", times = 2,
                   count = 1 }
    local b = env:create()
    local d = env.sim:pay_and_wait(b.payment.out_trade_no)
    d = env.sim:wait_notification({ id = d.id }, { attempts = 3 })
    for i = 1, 3 do
      assert.is_true(S.ok2xx(d.attempts[i].status),
                     "attempt " .. i .. ": " .. json.encode(d.attempts[i]))
    end
    check_applied_once(b.payment)
    local rows = assert(env.db:query(
      "SELECT outcome FROM gw_notifications WHERE id = $1", { d.id }))
    assert.equal(1, #rows)
  end)

  it("a replay of an applied notification (same id, or a new id for the "
     .. "same state) is acknowledged and changes nothing", function()
    local p = env:create().payment
    local tx = env:transaction(p)
    local body = env:notification("TRANSACTION.SUCCESS", tx,
                                  { id = "replay-" .. S.digits(8) })
    assert.is_true(S.ok2xx(env:post_notify(body,
                                           env:notify_headers(body)).status))
    local paid = env:wait_state(p.id, "paid")
    -- the same body later, freshly signed (WeChat's retry)
    local res = env:post_notify(body, env:notify_headers(body))
    assert.is_true(S.ok2xx(res.status), res.body)
    -- another notification id, same business key (out_trade_no, SUCCESS)
    local body2 = env:notification("TRANSACTION.SUCCESS", tx)
    res = env:post_notify(body2, env:notify_headers(body2))
    assert.is_true(S.ok2xx(res.status), res.body)
    local now = env:get(p.id)
    assert.equal(paid.version, now.version)
    assert.equal(1, env:count_events(p.id, "payment.paid"))
  end)

  it("an amount that does not match is an alarm, not a state change",
     function()
    local p = env:create{ amount = 100 }.payment
    local tx = env:transaction(p, { amount = { total = 1, payer_total = 1,
      currency = "CNY", payer_currency = "CNY" } })
    local body, h = env:notification("TRANSACTION.SUCCESS", tx)
    local res = env:post_notify(body, h)
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    local now = env:get(p.id)
    assert.equal("paying", now.state)
    assert.equal(p.version, now.version)
    assert.equal(1, env:count_events(p.id, "alarm.amount_mismatch"))
    assert.equal(0, env:count_events(p.id, "payment.paid"))
    -- a currency that does not match is one too
    tx = env:transaction(p, { amount = { total = 100, payer_total = 100,
      currency = "USD", payer_currency = "USD" } })
    body, h = env:notification("TRANSACTION.SUCCESS", tx)
    env:post_notify(body, h)
    assert.equal("paying", env:get(p.id).state)
  end)

  it("two partial refunds' notifications are two, not one twice", function()
    local p = env:paid_payment{ amount = 100 }
    local r1 = S.expect(env:refund(p.id, 30), 201, "refund 30")
    local r2 = S.expect(env:refund(p.id, 30), 201, "refund 30 again")
    env.sim:settle(r1.out_refund_no)
    env.sim:wait_notification{ out_refund_no = r1.out_refund_no }
    env.sim:settle(r2.out_refund_no)
    env.sim:wait_notification{ out_refund_no = r2.out_refund_no }
    assert.equal("succeeded", env:wait_refund(r1.id, "succeeded").state)
    assert.equal("succeeded", env:wait_refund(r2.id, "succeeded").state)
    local now = env:get(p.id)
    assert.equal("partially_refunded", now.state)
    assert.equal(60, now.refunded)
    assert.equal(2, env:count_events(p.id, "refund.succeeded"))
  end)

  it("REFUND.ABNORMAL and REFUND.CLOSED reach the refund", function()
    local p = env:paid_payment{ amount = 50 }
    local r1 = S.expect(env:refund(p.id, 20), 201, "refund 20")
    local r2 = S.expect(env:refund(p.id, 20), 201, "refund 20 again")
    env.sim:settle(r1.out_refund_no, "ABNORMAL")
    env.sim:settle(r2.out_refund_no, "CLOSED")
    env:wait_refund(r1.id, "abnormal")
    env:wait_refund(r2.id, "closed")
    assert.equal(1, env:count_events(p.id, "refund.abnormal"))
    assert.equal(1, env:count_events(p.id, "refund.closed"))
    assert.equal("paid", env:get(p.id).state)
    -- the abnormal refund waits for a person to apply for it: the log says
    -- so once, with the refund_id the abnormal-refund API needs (before,
    -- only the refund checks said it, and a notified refund never reaches
    -- them as abnormal: an operator without a webhook heard nothing)
    local said = {}
    for line in env.gw:logs():gmatch("[^\n]+") do
      local rec = json.decode(line)
      if type(rec) == "table" and rec.level == "warn" and rec.msg
         == "gateway: refund ABNORMAL: apply for the abnormal-refund API" then
        said[#said + 1] = rec
      end
    end
    assert.equal(1, #said, "one warning for the abnormal refund")
    assert.equal(r1.id, said[1].refund)
    assert.equal(r1.refund_id, said[1].refund_id)
    assert.equal(p.id, said[1].payment)
    assert.equal("notification", said[1].source)
    -- and where to apply for it
    assert.equal("POST /v1/refunds/" .. r1.id .. "/abnormal", said[1].apply)
  end)

  -- WeChat retries a notification for a day: a REFUND.ABNORMAL whose
  -- delivery failed may land after the outcome of the abnormal-refund
  -- application (SUCCESS or CLOSED, both reachable from ABNORMAL). It is
  -- an older report, ignored, as a late PROCESSING is: not an illegal
  -- transition (logged at warn, counted, what operators alert on).
  for _, outcome in ipairs({ "SUCCESS", "CLOSED" }) do
    it("a REFUND.ABNORMAL that lands after the refund ended " .. outcome
       .. " is an older report, not an illegal transition", function()
      local p = env:paid_payment{ amount = 50 }
      local r = S.expect(env:refund(p.id, 20), 201, "refund")
      -- the ABNORMAL is held back until a later notification went out
      env.sim:fault{ endpoint = "notify", kind = "out_of_order", count = 1 }
      env.sim:settle(r.out_refund_no, "ABNORMAL")
      local wx = env.sim:client()
      local a, err = wx:abnormal_refund{ refund_id = r.refund_id,
        out_refund_no = r.out_refund_no, type = "MERCHANT_BANK_CARD" }
      assert.is_table(a, tostring(err))
      env.sim:settle(r.out_refund_no, outcome)
      env.sim:wait_notification{ out_refund_no = r.out_refund_no,
                                 event_type = "REFUND." .. outcome }
      local d = env.sim:wait_notification{ out_refund_no = r.out_refund_no,
        event_type = "REFUND.ABNORMAL" }
      local want = outcome == "SUCCESS" and "succeeded" or "closed"
      assert.equal(want, env:get(p.id).refunds[1].state)
      assert.equal(outcome == "SUCCESS" and 20 or 0, env:get(p.id).refunded)
      local rows = assert(env.db:query("SELECT outcome FROM gw_notifications"
                                       .. " WHERE id = $1", { d.id }))
      assert.equal("duplicate", rows[1] and rows[1].outcome)
      for line in env.gw:logs():gmatch("[^\n]+") do
        local rec = json.decode(line)
        assert.is_false(type(rec) == "table"
          and rec.msg == "fsm: illegal transition refused"
          and rec.id == r.id, line)
      end
      -- nothing applied: no refund.abnormal for a refund that had ended,
      -- and no call to apply for it
      assert.equal(0, env:count_events(p.id, "refund.abnormal"))
      for line in env.gw:logs():gmatch("[^\n]+") do
        local rec = json.decode(line)
        assert.is_false(type(rec) == "table" and rec.refund == r.id
          and rec.msg == "gateway: refund ABNORMAL: apply for the"
          .. " abnormal-refund API", line)
      end
    end)
  end

  it("an illegal transition (a closed refund reported succeeded) is "
     .. "refused, never applied", function()
    local p = env:paid_payment{ amount = 50 }
    local r = S.expect(env:refund(p.id, 50), 201, "refund")
    env.sim:settle(r.out_refund_no, "CLOSED")
    local closed = env:wait_refund(r.id, "closed")
    local before = env:get(p.id)
    local body, h = env:notification("REFUND.SUCCESS", {
      mchid = env.m.mchid, out_trade_no = p.out_trade_no,
      transaction_id = before.transaction_id,
      out_refund_no = r.out_refund_no, refund_id = closed.refund_id,
      refund_status = "SUCCESS",
      success_time = os.date("!%Y-%m-%dT%H:%M:%S+00:00"),
      user_received_account = "支付用户零钱",
      amount = { total = 50, refund = 50, payer_total = 50,
                 payer_refund = 50 } })
    local res = env:post_notify(body, h)
    assert.are_not.equal(401, res.status)
    assert.equal("closed", env:get(p.id).refunds[1].state)
    local after = env:get(p.id)
    assert.equal("paid", after.state)
    assert.equal(0, after.refunded)
    assert.equal(before.version, after.version)
    assert.equal(0, env:count_events(p.id, "refund.succeeded"))
    -- counted: the worker publishes its fsm counts every second
    S.wait_until(function()
      local m = env.gw:admin_get("/metrics")
      local n = m and m.body:match(
        '\npaygate_gateway_fsm_illegal_transitions_total{machine="refund"}'
        .. ' (%d+)')
      return n and tonumber(n) >= 1
    end, 15, "the illegal transition counted on /metrics")
  end)

  -- A refund made by hand in the merchant platform, whose refund
  -- notification URL is the gateway's: WeChat notifies an out_refund_no
  -- the gateway never made, of one of its orders. (Was: FAIL, and WeChat
  -- sent it again for a day; the payment was not flagged. Then: a new
  -- notification id of the same refund and status flagged nothing twice
  -- but was recorded as refunded_elsewhere again, not as a duplicate, and
  -- the flag's evidence named neither the notification nor WeChat's
  -- refund id.)
  it("a refund notification of a refund made elsewhere, of a payment here,"
     .. " is acknowledged and flags the payment once; its repeats are"
     .. " duplicates; one of an order not known here is still FAIL",
     function()
    local audit = require "paygate.audit"
    local p = env:paid_payment{ amount = 60 }
    local function refund(out_trade_no, no)
      return { mchid = env.m.mchid, out_trade_no = out_trade_no,
        transaction_id = p.transaction_id, out_refund_no = no,
        refund_id = "50" .. S.digits(27), refund_status = "SUCCESS",
        success_time = os.date("!%Y-%m-%dT%H:%M:%S+00:00"),
        user_received_account = "支付用户零钱",
        amount = { total = 60, refund = 25, payer_total = 60,
                   payer_refund = 25 } }
    end
    local function outcome(id)
      local rows = assert(env.db:query("SELECT outcome FROM gw_notifications"
                                       .. " WHERE id = $1", { id }))
      return rows[1] and rows[1].outcome
    end
    local function flags()
      local out = {}
      for _, e in ipairs(assert(audit.entries(env.db, "payment:" .. p.id))) do
        if e.what == "payment.alarm" and e.cause == "refunded_elsewhere" then
          out[#out + 1] = json.decode(e.evidence)
        end
      end
      return out
    end
    local plain = refund(p.out_trade_no, "PLATFORM" .. S.digits(12))
    local id = "elsewhere-" .. S.digits(10)
    local body = env:notification("REFUND.SUCCESS", plain, { id = id })
    local res = env:post_notify(body, env:notify_headers(body))
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    assert.equal("refunded_elsewhere", outcome(id))
    local got = env:get(p.id)
    assert.is_true(got.refunded_elsewhere)
    -- nothing invented: no refund row, no state, no total
    assert.equal("paid", got.state)
    assert.equal(0, got.refunded)
    assert.same({}, got.refunds)
    local f = flags()
    assert.equal(1, #f)
    assert.equal("notification", f[1].source)
    assert.equal(id, f[1].notification_id)
    assert.equal(plain.out_refund_no, f[1].out_refund_no)
    assert.equal(plain.refund_id, f[1].refund_id)
    assert.equal(25, f[1].refund_amount)
    assert.equal("SUCCESS", f[1].refund_status)
    assert.equal(plain.success_time, f[1].success_time)
    assert.equal(1, env:count_events(p.id, "alarm.refunded_elsewhere"))
    -- WeChat's retry (an answer of ours lost): the same id, signed afresh
    res = env:post_notify(body, env:notify_headers(body))
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    -- the same refund and status under a new notification id: claimed by
    -- its business key, a duplicate
    local id2 = "elsewhere-" .. S.digits(10)
    local body2 = env:notification("REFUND.SUCCESS", plain, { id = id2 })
    res = env:post_notify(body2, env:notify_headers(body2))
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    assert.equal("duplicate", outcome(id2))
    assert.equal(1, #flags())
    assert.equal(1, env:count_events(p.id, "alarm.refunded_elsewhere"))
    assert.equal(env:get(p.id).version, got.version)
    -- of an order the gateway does not know either: FAIL (WeChat retries),
    -- counted as before, nothing recorded
    local function unknown_refunds()
      local m = env.gw:admin_get("/metrics")
      return tonumber(m and m.body:match('\npaygate_gateway_unknown_'
        .. 'notifications_total{kind="refund"} (%d+)')) or 0
    end
    local before = unknown_refunds()
    local id3 = "elsewhere-" .. S.digits(10)
    local body3 = env:notification("REFUND.SUCCESS",
      refund("GWunknown" .. S.digits(10), "PLATFORM" .. S.digits(12)),
      { id = id3 })
    res = env:post_notify(body3, env:notify_headers(body3))
    assert.is_false(S.ok2xx(res.status), res.status .. " " .. res.body)
    assert.equal("FAIL", res.json.code)
    assert.is_nil(outcome(id3))
    S.wait_until(function() return unknown_refunds() == before + 1 end,
                 10, "the unknown refund counted on /metrics")
    -- its warning names a refund's likely causes (was: "another
    -- instance's, not committed yet?", which a refund never is: its row
    -- commits before WeChat is asked for it)
    local said
    S.wait_until(function()
      for line in env.gw:logs():gmatch("[^\n]+") do
        local rec = json.decode(line)
        if type(rec) == "table" and rec.level == "warn" and rec.id == id3 then
          said = rec
        end
      end
      return said ~= nil
    end, 10, "the unknown refund's warning")
    assert.matches("does not know", said.msg, 1, true)
    assert.matches("merchant platform", said.msg, 1, true)
    assert.is_nil(said.msg:find("not committed yet", 1, true))
  end)

  it("a payment notification that lands while its create's prepay waits:"
     .. " applied, and the paid attempt is not closed at WeChat", function()
    -- the create's prepay held at WeChat until the notification is in
    local h = env.sim:hold("prepay")
    local order_id = S.order_id("prepay-wait")
    local created
    core.spawn(function()
      created = env:api("POST", "/v1/payments", { order_id = order_id,
        channel = "native", amount = 90, description = "e2e order" })
    end)
    h:wait_held()
    local row = assert(env.db:query("SELECT id, out_trade_no FROM"
      .. " gw_payments WHERE order_id = $1", { order_id }))[1]
    assert(row, "the payment not stored before its prepay")
    local res = env:post_paid({ out_trade_no = row.out_trade_no,
                                amount = 90 })
    h:release()
    assert.equal(204, res.status, res.body)
    S.wait_until(function() return created ~= nil end, 30,
                 "the create to answer")
    assert.equal(409, created.status, created.body)
    assert.equal("payment_paid", created.json.error)
    assert.equal("paid", created.json.payment.state)
    assert.is_nil(created.json.pay)
    -- WeChat refuses to close a paid order (ORDER_PAID): nothing to close,
    -- and nothing for the payment checks to do about it
    for _, r in ipairs(env.sim:requests()) do
      assert.is_false(r.endpoint == "close"
                      and r.target:find(row.out_trade_no, 1, true) ~= nil,
                      "a close of the paid attempt: " .. r.target)
    end
    for line in (env.gw:logs() or ""):gmatch("[^\n]+") do
      assert.is_false(line:find(row.out_trade_no, 1, true) ~= nil
        and line:find("closing a superseded attempt", 1, true) ~= nil, line)
    end
    local rows = assert(env.db:query("SELECT state, close_check_at FROM"
      .. " gw_attempts WHERE out_trade_no = $1", { row.out_trade_no }))
    assert.equal("paid", rows[1].state)
    assert.equal(1, env:count_events(row.id, "payment.paid"))
  end)

  it("money on a closed payment is applied, then refunded", function()
    local p = env:create{ amount = 70 }.payment
    S.expect(env:api("POST", "/v1/payments/" .. p.id .. "/close"), 200,
             "close")
    local res = env:post_paid(p)
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    assert.equal(1, env:count_events(p.id, "payment.late_paid"))
    S.wait_until(function()
      local now = env:get(p.id)
      return now.refunds and #now.refunds == 1
    end, 15, "the automatic refund")
    local now = env:get(p.id)
    assert.equal("paid", now.state)
    assert.is_true(now.late)
    assert.equal(70, now.refunds[1].amount)
    assert.equal("late_payment", now.refunds[1].kind)
    assert.is_string(now.transaction_id)
    -- the refund went to WeChat (which, in the simulator, has no money on
    -- the closed order to give back: it refuses)
    S.wait_until(function()
      return env:get(p.id).refunds[1].state ~= "created"
    end, 15, "the refund sent")
    local sent = false
    for _, r in ipairs(env.sim:requests()) do
      if r.endpoint == "refund" then sent = true end
    end
    assert.is_true(sent)
  end)

  it("money on a superseded attempt (paid twice) is applied, then refunded",
     function()
    local b = env:create{ amount = 40 }
    local first = b.payment
    local res = env:api("POST", "/v1/payments/" .. first.id .. "/attempts",
                        { channel = "native" })
    assert.equal(201, res.status, res.body)
    env.sim:pay_and_wait(res.json.payment.out_trade_no)
    env:wait_state(first.id, "paid")
    -- WeChat reports the first (superseded) attempt paid as well
    local nres = env:post_paid(first)
    assert.is_true(S.ok2xx(nres.status), nres.status .. " " .. nres.body)
    assert.equal(1, env:count_events(first.id, "payment.late_paid"))
    S.wait_until(function()
      local now = env:get(first.id)
      return now.refunds and #now.refunds == 1
    end, 15, "the automatic refund")
    local now = env:get(first.id)
    assert.equal(40, now.refunds[1].amount)
    assert.equal("duplicate", now.refunds[1].kind)
    assert.equal("paid", now.state)
  end)
end)

describe("gateway notifications with on_late_payment = alarm", function()
  local env

  setup(function()
    env = S.start{ gateway = { on_late_payment = "alarm" } }
  end)
  teardown(S.stop)

  it("money on a closed payment is applied and raised, not refunded",
     function()
    local p = env:create{ amount = 70 }.payment
    S.expect(env:api("POST", "/v1/payments/" .. p.id .. "/close"), 200,
             "close")
    local res = env:post_paid(p)
    assert.is_true(S.ok2xx(res.status), res.status .. " " .. res.body)
    local e = env:wait_event(p.id, "payment.late_paid")
    assert.equal(p.id, e.data.payment.id)
    local now = env:get(p.id)
    assert.equal("paid", now.state)
    assert.same({}, now.refunds)
  end)
end)
