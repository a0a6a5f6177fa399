-- examples/gateway's notification path in-process, on a real SQLite
-- store: the verdicts that are hard to provoke through the simulator --
-- a `replayed` signature check whose effect is (or is not) committed, an
-- unknown order, an event type the gateway does not apply, an illegal
-- refund transition. Only parse_notification is replaced (it is what
-- decides those verdicts).
local paygate = require "paygate"
local json = require "paygate.json"
local server = require "paygate.testing.server"
local gwcore = dofile("examples/gateway/spec/core_support.lua")
local core = require "paygate.core"
local testing = require "paygate.testing"
local servers = require "spec.support.servers"

package.path = "examples/gateway/?.lua;" .. package.path
local model = require "gw.model"
local notify = require "gw.notify"

local engines = { sqlite = function(dir) return "sqlite:" .. dir
                                                 .. "/gw.db" end }
if servers.have_postgres() then
  engines.postgres = function()
    return servers.postgres().url .. "?pool=6"
  end
end

for engine, url_of in pairs(engines) do
describe("gateway notify handler on " .. engine, function()
  local dir, db, ctx, verdict

  local on_query                  -- what wx:query_refund does, if set
  local wx = {
    parse_notification = function(_, req)
      if verdict then return nil, verdict end
      return json.decode(req.body)
    end,
    query_refund = function(_, no) return on_query(no) end,
  }

  local function req(body, route)
    return { params = { mchid = route or "1900000001" },
             body = type(body) == "table" and json.encode(body) or body,
             header = function() return nil end }
  end

  local function payment(state, amount)
    return gwcore.payment(db, state, amount)
  end
  local paid_event = gwcore.paid_event

  -- a merchant refund of the paid payment id, accepted by WeChat Pay
  local function accepted_refund(id, amount)
    local rid = model.new_refund_id()
    local now = model.now()
    assert(model.refunds:create(db, { id = rid, payment_id = id,
      out_refund_no = rid, out_trade_no = id .. "_1", kind = "merchant",
      amount = amount, created_at = now, updated_at = now }))
    assert(model.refunds:apply(db, rid, "accepted"))
    return rid
  end

  setup(function()
    dir = server.tmpdir()
    -- a second merchant, whose route a notification of the first's must
    -- not be applied through
    db, ctx = gwcore.inproc(url_of(dir), { [gwcore.MCHID] = wx,
                                           ["1900000002"] = wx })
  end)

  teardown(function()
    db:close()
    server.rmdir(dir)
    servers.stop_all()
  end)

  before_each(function() verdict = nil end)

  it("acknowledges a replayed request whose effect committed", function()
    local id = payment("paying")
    local ev = paid_event(id .. "_1")
    assert.equal(204, (notify.handler(req(ev))))
    verdict = paygate.error("replayed", "seen")
    assert.equal(204, (notify.handler(req(ev))))
    assert.equal("paid", model.payment(db, id).state)
  end)

  it("fails a replayed request whose effect is not committed", function()
    verdict = paygate.error("replayed", "seen")
    local status, body = notify.handler(req({ id = "EV-never" }))
    assert.equal(500, status)
    assert.equal("FAIL", body.code)
  end)

  it("fails a notification of an unknown order, records nothing", function()
    local status = notify.handler(req(paid_event("pay_unknown_1")))
    assert.equal(500, status)
    local rows = assert(db:query("SELECT id FROM gw_notifications WHERE id"
                                 .. " = 'EV-pay_unknown_1'"))
    assert.equal(0, #rows)
  end)

  it("dedupes by business key across notification ids", function()
    local id = payment("paying")
    local ev = paid_event(id .. "_1")
    assert.equal(204, (notify.handler(req(ev))))
    ev.id = "EV-other-id"
    assert.equal(204, (notify.handler(req(ev))))
    local rows = assert(db:query("SELECT outcome FROM gw_notifications"
      .. " WHERE id = 'EV-other-id'"))
    assert.equal("duplicate", rows[1].outcome)
    assert.equal(3, model.payment(db, id).version)
  end)

  -- A refund made outside the gateway names an out_refund_no of the
  -- system that made it, unique only within its merchant (WeChat's
  -- rule): two merchants' refunds may share one. Was: its business key
  -- named no merchant, so the second merchant's refund was recorded as
  -- a duplicate of the first's and its payment never flagged.
  it("dedupes a refund made elsewhere within its merchant: two"
     .. " merchants' refunds of one out_refund_no flag both payments; a"
     .. " second refund of one payment is no duplicate", function()
    local function paid(mchid)
      local id = payment("paying")
      assert(db:exec("UPDATE gw_payments SET mchid = $2 WHERE id = $1",
                     { id, mchid }))
      local ev = paid_event(id .. "_1")
      ev.resource.mchid = mchid
      assert.equal(204, (notify.handler(req(ev, mchid))))
      return id
    end
    local function elsewhere(eid, mchid, id, no, status)
      local ev = { id = eid, event_type = "REFUND.SUCCESS", resource = {
        mchid = mchid, out_trade_no = id .. "_1", out_refund_no = no,
        refund_id = "50" .. eid, refund_status = status or "SUCCESS",
        amount = { total = 100, refund = 10, payer_total = 100,
                   payer_refund = 10 } } }
      assert.equal(204, (notify.handler(req(ev, mchid))))
      local rows = assert(db:query("SELECT outcome FROM gw_notifications"
        .. " WHERE id = $1", { eid }))
      return rows[1] and rows[1].outcome
    end
    local function flagged(id)
      return model.payment(db, id).refunded_elsewhere_at ~= nil
    end
    local a, b = paid("1900000001"), paid("1900000002")
    assert.equal("refunded_elsewhere",
                 elsewhere("EV-else-a", "1900000001", a, "R0001"))
    assert.is_true(flagged(a))
    assert.is_false(flagged(b))
    -- another merchant's refund of the same number: its own
    assert.equal("refunded_elsewhere",
                 elsewhere("EV-else-b", "1900000002", b, "R0001"))
    assert.is_true(flagged(b))
    -- each one's repeat under a new id: a duplicate
    assert.equal("duplicate",
                 elsewhere("EV-else-a2", "1900000001", a, "R0001"))
    assert.equal("duplicate",
                 elsewhere("EV-else-b2", "1900000002", b, "R0001"))
    -- a second partial refund of the same payment, another number: not
    -- the first one's repeat (the payment stays flagged once)
    assert.equal("refunded_elsewhere",
                 elsewhere("EV-else-a3", "1900000001", a, "R0002"))
  end)

  -- A notification whose key a query claimed came late: one info line
  -- (reconcile_spec counts it end to end); one whose key another
  -- notification (a new id) claimed is a plain duplicate: none.
  it("says a notification came after a query's settlement, not after"
     .. " another notification's", function()
    local apply = require "gw.apply"
    local lines, info_was = {}, paygate.log.info
    paygate.log.info = function(msg, fields, ...)
      if tostring(msg):find("arrived after a query", 1, true) then
        lines[#lines + 1] = fields
      end
      return info_was(msg, fields, ...)
    end
    local ok, err = pcall(function()
      local by_note = payment("paying")
      local ev = paid_event(by_note .. "_1")
      assert.equal(204, (notify.handler(req(ev))))
      ev.id = "EV-other-" .. by_note
      assert.equal(204, (notify.handler(req(ev))))
      assert.same({}, lines)
      -- settled by a query (as ?refresh=1 does), then notified
      local by_query = payment("paying")
      ev = paid_event(by_query .. "_1")
      ev.resource.success_time = "2026-01-02T03:04:05+08:00"
      assert.equal("applied", (assert(db:transaction(function(tx)
        return apply.payment(ctx, tx, { resource = ev.resource,
          source = "query", via = "refresh", actor = "gateway:query" })
      end))))
      assert.equal(204, (notify.handler(req(ev))))
      assert.equal(1, #lines)
      local l = lines[1]
      assert.same({ by_query, by_query .. "_1", ev.id, gwcore.MCHID },
                  { l.payment, l.out_trade_no, l.notification_id, l.mchid })
      assert.is_true(l.after_query_s >= 0 and l.after_query_s < 60)
      assert.is_true(l.after_success_s > 86400)
      -- sent again (the same id): the line was once
      assert.equal(204, (notify.handler(req(ev))))
      assert.equal(1, #lines)
    end)
    paygate.log.info = info_was
    assert(ok, err)
  end)

  it("ignores a trade state other than success, and unknown types",
     function()
    local id = payment("paying")
    local ev = paid_event(id .. "_1")
    ev.resource.trade_state = "NOTPAY"
    ev.id = "EV-notpay"
    assert.equal(204, (notify.handler(req(ev))))
    local e2 = { id = "EV-odd", event_type = "SOMETHING.ELSE",
                 resource = {} }
    assert.equal(204, (notify.handler(req(e2))))
    local rows = assert(db:query("SELECT id, outcome FROM gw_notifications"
      .. " WHERE id IN ('EV-notpay', 'EV-odd') ORDER BY id"))
    assert.equal("ignored", rows[1].outcome)
    assert.equal("ignored", rows[2].outcome)
    assert.equal("paying", model.payment(db, id).state)
  end)

  it("refuses an illegal refund transition, applies nothing", function()
    local id = payment("paying")
    assert.equal(204, (notify.handler(req(paid_event(id .. "_1")))))
    local rid = accepted_refund(id, 100)
    assert(model.refunds:apply(db, rid, "closed"))
    -- (a closed refund reported SUCCESS: WeChat never ends a closed one
    -- otherwise; a late ABNORMAL would be an older report, ignored)
    local ev = { id = "EV-r1", event_type = "REFUND.SUCCESS", resource = {
      mchid = "1900000001", out_refund_no = rid, refund_status = "SUCCESS",
      amount = { refund = 100, total = 100 } } }
    assert.equal(204, (notify.handler(req(ev))))
    local rows = assert(db:query("SELECT outcome FROM gw_notifications"
      .. " WHERE id = 'EV-r1'"))
    assert.equal("refused", rows[1].outcome)
    assert.equal("closed", model.refund(db, rid).state)
    assert.equal("paid", model.payment(db, id).state)
  end)

  -- the refund machine's illegal transitions this process counted
  local function illegal_refund_transitions()
    local n = 0
    for _, t in ipairs(require("paygate.fsm").stats().illegal_transitions) do
      if t.machine == "refund" then n = n + t.count end
    end
    return n
  end

  it("ignores a PROCESSING answer that lands after the refund settled: "
     .. "no illegal transition counted", function()
    local refunds = require "gw.refunds"
    local id = payment("paying")
    assert.equal(204, (notify.handler(req(paid_event(id .. "_1")))))
    local rid = accepted_refund(id, 100)
    local before = illegal_refund_transitions()
    -- ?refresh=1 asks WeChat about the processing refund; its answer,
    -- PROCESSING, lands after the REFUND.SUCCESS notification applied
    on_query = function(no)
      assert.equal(204, (notify.handler(req({ id = "EV-late-" .. no,
        event_type = "REFUND.SUCCESS", resource = { mchid = gwcore.MCHID,
          out_refund_no = no, refund_status = "SUCCESS",
          amount = { refund = 100, total = 100 } } }))))
      return { out_refund_no = no, status = "PROCESSING",
               amount = { refund = 100, total = 100 } }
    end
    assert.is_true(refunds.refresh_open(model.payment(db, id)))
    on_query = nil
    assert.equal("succeeded", model.refund(db, rid).state)
    assert.equal("refunded", model.payment(db, id).state)
    assert.equal(before, illegal_refund_transitions())
    -- a genuinely illegal report (a closed refund reported SUCCESS) is
    -- still refused and counted
    local id2 = payment("paying")
    assert.equal(204, (notify.handler(req(paid_event(id2 .. "_1")))))
    local rid2 = accepted_refund(id2, 100)
    assert(model.refunds:apply(db, rid2, "closed"))
    assert.equal(204, (notify.handler(req({ id = "EV-illegal-" .. rid2,
      event_type = "REFUND.SUCCESS", resource = { mchid = gwcore.MCHID,
        out_refund_no = rid2, refund_status = "SUCCESS",
        amount = { refund = 100, total = 100 } } }))))
    assert.equal("closed", model.refund(db, rid2).state)
    assert.equal(before + 1, illegal_refund_transitions())
  end)

  it("names a service provider's sub-merchant in the lines about its"
     .. " payment: another sub-merchant's notification, an amount"
     .. " mismatch", function()
    -- (was: the refused notification's line named the payment alone,
    -- "belongs to another merchant than the notification's", and the
    -- alarm's line no merchant at all: an operator of a provider could
    -- not tell which sub-merchant's money it was)
    local id = payment("paying")
    assert(db:exec("UPDATE gw_payments SET sub_mchid = '1600000001' WHERE"
                   .. " id = $1", { id }))
    local lines = {}
    local warn_was, error_was = paygate.log.warn, paygate.log.error
    local function keep(say)
      return function(msg, fields, ...)
        lines[#lines + 1] = { msg = tostring(msg), fields = fields or {} }
        return say(msg, fields, ...)
      end
    end
    paygate.log.warn, paygate.log.error = keep(warn_was), keep(error_was)
    local function line(start)
      for _, l in ipairs(lines) do
        if l.msg:find(start, 1, true) then return l.fields end
      end
    end
    local ok, err = pcall(function()
      local function partner_event(sub, total, eid)
        local ev = paid_event(id .. "_1", total, eid)
        ev.resource.mchid = nil
        ev.resource.sp_mchid, ev.resource.sub_mchid = gwcore.MCHID, sub
        return ev
      end
      -- another sub-merchant's order of the same number: refused
      local status = notify.handler(req(partner_event("1600000002", 100,
                                                      "EV-sub-other")))
      assert.equal(500, status)
      local f = assert(line("gateway: notification not applied"))
      assert.equal("merchant_mismatch", f.kind)
      assert.equal(gwcore.MCHID, f.mchid)
      assert.equal("1600000002", f.sub_mchid)
      assert.equal(id .. "_1", f.out_trade_no)
      assert.matches("payment " .. id .. " (" .. id .. "_1) is merchant "
        .. gwcore.MCHID .. "/1600000001's, not " .. gwcore.MCHID
        .. "/1600000002's", f.error, 1, true)
      assert.equal("paying", model.payment(db, id).state)
      -- its own sub-merchant's, of another amount: the alarm
      assert.equal(204, (notify.handler(req(partner_event("1600000001",
                                                          999)))))
      f = assert(line("gateway: amount mismatch: not applied"))
      assert.equal(gwcore.MCHID, f.mchid)
      assert.equal("1600000001", f.sub_mchid)
      assert.equal(id, f.payment)
      assert.equal(id .. "_1", f.out_trade_no)
    end)
    paygate.log.warn, paygate.log.error = warn_was, error_was
    assert(ok, err)
  end)

  it("raises an alarm for another merchant's refund, applies nothing",
     function()
    local id = payment("paying")
    assert.equal(204, (notify.handler(req(paid_event(id .. "_1")))))
    local rid = accepted_refund(id, 30)
    local n = 0
    for i, res in ipairs({
      { mchid = "1900000002" },                            -- another one
      { sp_mchid = "1900000001", sub_mchid = "1900000009" }, -- a partner's
      {},                                                  -- none at all
    }) do
      res.out_refund_no, res.refund_status = rid, "SUCCESS"
      res.amount = { refund = 30, total = 100 }
      local ev = { id = "EV-mm" .. i, event_type = "REFUND.SUCCESS",
                   resource = res }
      assert.equal(204, (notify.handler(req(ev))))
      local rows = assert(db:query("SELECT outcome FROM gw_notifications"
        .. " WHERE id = $1", { ev.id }))
      assert.equal("alarm", rows[1].outcome)
      n = n + 1
    end
    assert.equal("processing", model.refund(db, rid).state)
    local p = model.payment(db, id)
    assert.equal("paid", p.state)
    assert.equal(0, p.refunded)
    local rows = assert(db:query("SELECT count(*) AS n FROM paygate_audit"
      .. " WHERE subject = $1 AND what = 'payment.alarm' AND cause ="
      .. " 'merchant_mismatch'", { "payment:" .. id }))
    assert.equal(n, rows[1].n)
    rows = assert(db:query("SELECT count(*) AS n FROM paygate_outbox WHERE"
      .. " subject = $1 AND type = 'alarm.merchant_mismatch'", { id }))
    assert.equal(n, rows[1].n)
    -- the merchant's own notification still applies
    local ev = { id = "EV-mm-ok", event_type = "REFUND.SUCCESS", resource = {
      mchid = "1900000001", out_refund_no = rid, refund_status = "SUCCESS",
      amount = { refund = 30, total = 100 } } }
    assert.equal(204, (notify.handler(req(ev))))
    assert.equal("succeeded", model.refund(db, rid).state)
    assert.equal(30, model.payment(db, id).refunded)
  end)

  it("payments.refresh refuses a query answer about another order,"
     .. " applying nothing", function()
    -- (it was applied to the payment asked about: a CLOSED or PAYERROR
    -- of another order closed or failed this one)
    local payments = require "gw.payments"
    local id = payment("paying")
    wx.query_by_out_trade_no = function(_, no)
      return { out_trade_no = no .. "x", trade_state = "CLOSED" }
    end
    local ok, res, rerr = pcall(payments.refresh, model.payment(db, id))
    wx.query_by_out_trade_no = nil
    assert(ok, res)
    assert.is_nil(res)
    assert.equal("bad_response", rerr and rerr.kind, tostring(rerr))
    assert.matches("names order " .. id .. "_1x, not " .. id .. "_1",
                   rerr.message, 1, true)
    assert.equal("paying", model.payment(db, id).state)
  end)

  it("counts an alarm once its transaction commits, never for a try"
     .. " rolled back", function()
    local apply = require "gw.apply"
    local id = payment("paying")
    local ev = paid_event(id .. "_1", 999)        -- the order is 100
    local before = apply.alarms("amount_mismatch")
    -- and logged so: once it commits (a rolled-back try logged it too)
    local logged, error_was = 0, paygate.log.error
    paygate.log.error = function(msg, ...)
      if tostring(msg):find("amount mismatch: not applied", 1, true) then
        logged = logged + 1
      end
      return error_was(msg, ...)
    end
    local ok, err = pcall(function()
      assert.is_nil(db:transaction(function(tx)
        assert.equal("alarm", (apply.payment(ctx, tx, {
          resource = ev.resource, notification_id = ev.id,
          source = "notification" })))
        return nil, "rolled back"                -- as a failed commit is
      end))
      assert.equal(before, apply.alarms("amount_mismatch"))
      assert.equal(0, logged)
      assert.equal(204, (notify.handler(req(ev))))
      assert.equal(before + 1, apply.alarms("amount_mismatch"))
      assert.equal(1, logged)
    end)
    paygate.log.error = error_was
    assert(ok, err)
  end)

  it("raises an alarm for a refund notification naming another order or"
     .. " another order total, applies nothing", function()
    local id = payment("paying")
    assert.equal(204, (notify.handler(req(paid_event(id .. "_1")))))
    local rid = accepted_refund(id, 30)
    for i, c in ipairs({
      { "order_mismatch", id .. "_2", 100 },       -- another attempt
      { "amount_mismatch", id .. "_1", 1000 },     -- another total
    }) do
      local ev = { id = "EV-om" .. i, event_type = "REFUND.SUCCESS",
        resource = { mchid = gwcore.MCHID, out_refund_no = rid,
          out_trade_no = c[2], refund_status = "SUCCESS",
          amount = { refund = 30, total = c[3] } } }
      assert.equal(204, (notify.handler(req(ev))))
      local rows = assert(db:query("SELECT outcome FROM gw_notifications"
        .. " WHERE id = $1", { ev.id }))
      assert.equal("alarm", rows[1].outcome)
      rows = assert(db:query("SELECT count(*) AS n FROM paygate_audit WHERE"
        .. " subject = $1 AND what = 'payment.alarm' AND cause = $2",
        { "payment:" .. id, c[1] }))
      assert.equal(1, rows[1].n)
    end
    assert.equal("processing", model.refund(db, rid).state)
    assert.equal(0, model.payment(db, id).refunded)
    -- the same, naming its own order and total, applies
    assert.equal(204, (notify.handler(req({ id = "EV-om-ok",
      event_type = "REFUND.SUCCESS", resource = { mchid = gwcore.MCHID,
        out_refund_no = rid, out_trade_no = id .. "_1",
        refund_status = "SUCCESS", amount = { refund = 30, total = 100 } }
    }))))
    assert.equal("succeeded", model.refund(db, rid).state)
  end)

  it("refuses a payment notification on another merchant's route, or"
     .. " naming another owner, on the fast path and the transaction's",
     function()
    -- each case: the payment's state before (paying: the fast path's
    -- case; closed: the transaction's, a late payment) and the
    -- notification; none may be applied
    local function partner(id)     -- the payment made a sub-merchant's
      assert(db:exec("UPDATE gw_payments SET sub_mchid = '1900000009'"
                     .. " WHERE id = $1", { id }))
    end
    local cases = {
      { what = "another merchant's route", route = "1900000002" },
      { what = "another merchant's route, late", route = "1900000002",
        closed = true },
      { what = "a sub_mchid on a direct payment",
        res = { sub_mchid = "1900000009" } },
      { what = "a partner payment notified as the provider's own",
        prepare = partner },
      { what = "a partner payment notified as the provider's own, late",
        prepare = partner, closed = true },
    }
    for i, c in ipairs(cases) do
      local id = payment("paying")
      if c.prepare then c.prepare(id) end
      if c.closed then
        assert(model.payments:apply(db, id, "closed"))
        assert(db:exec("UPDATE gw_attempts SET state = 'closed' WHERE"
                       .. " payment_id = $1", { id }))
      end
      local ev = paid_event(id .. "_1", 100, "EV-owner-" .. i)
      for k, v in pairs(c.res or {}) do ev.resource[k] = v end
      local status, body = notify.handler(req(ev, c.route))
      assert.is_true(status >= 400, c.what .. ": " .. tostring(status))
      assert.equal("FAIL", body.code, c.what)
      local p = model.payment(db, id)
      assert.equal(c.closed and "closed" or "paying", p.state, c.what)
      assert.equal(0, #assert(db:query("SELECT key FROM"
        .. " gw_notification_effects WHERE key LIKE $1",
        { "%|" .. id .. "_1|%" })), c.what)
      assert.equal(0, #assert(db:query("SELECT id FROM gw_refunds WHERE"
        .. " payment_id = $1", { id })), c.what)
    end
    -- a repeat on another route of a payment applied is refused too, as
    -- the transaction refuses it, not acknowledged as a duplicate
    local id = payment("paying")
    assert.equal(204, (notify.handler(req(paid_event(id .. "_1")))))
    local status = notify.handler(req(paid_event(id .. "_1", 100,
                                                 "EV-owner-again"),
                                      "1900000002"))
    assert.is_true(status >= 400, tostring(status))
  end)

  it("applies one effect under concurrent deliveries of one payment",
     function()
    local id = payment("paying")
    local ev = paid_event(id .. "_1")
    local statuses, done = {}, 0
    for i = 1, 16 do
      core.spawn(function()
        -- half repeat the id, half come with ids of their own (the same
        -- payment notified again): dedupe by id, and by business key
        local e = { id = (i % 2 == 0) and ev.id or (ev.id .. "-" .. i),
                    event_type = ev.event_type, resource = ev.resource }
        statuses[i] = notify.handler(req(e))
        done = done + 1
      end)
    end
    testing.wait_until(function() return done == 16 end, 30, "deliveries")
    for i = 1, 16 do assert.equal(204, statuses[i]) end
    local p = model.payment(db, id)
    assert.equal("paid", p.state)
    assert.equal(3, p.version)
    local ev_rows = assert(db:query("SELECT type FROM paygate_outbox WHERE"
      .. " subject = $1 AND type = 'payment.paid'", { id }))
    assert.equal(1, #ev_rows)
    local applied = assert(db:query("SELECT outcome FROM gw_notifications"
      .. " WHERE business_key LIKE $1 AND outcome = 'applied'",
      { "%|" .. id .. "_1|%" }))
    assert.equal(1, #applied)
  end)
end)
end
