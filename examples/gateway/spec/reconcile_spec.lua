-- The gateway's reconciliation (gw/reconcile.lua over paygate.reconcile),
-- end to end with the simulator: a payment whose notification is lost
-- ends paid locally through the query; an expired unpaid payment is closed
-- through the close API; the daily bill job writes its report and audit
-- entry for a day without trades.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local bill = require "paygate.reconcile.bill"
local days = require "support.days"
local core = dofile("examples/gateway/spec/core_support.lua")

-- The simulator (bills ready as soon as a day is over: whatever the hour
-- the spec runs, yesterday's bill exists) and a gateway reconciling fast,
-- its bills in a fresh folder. gateway: more config.gateway keys; db: as
-- core.start's; rec: more gateway.reconcile keys; pre(sim): run before the
-- gateway starts. returns: sim, gw, bill_dir
local function start(gateway, db, rec, pre)
  local sim = testing.simulator{ time_scale = 100,
                                 config = { bill_ready_after = 0 } }
  if pre then pre(sim) end
  -- not made yet (the gateway makes it); under TMPDIR, and gone at the
  -- run's end even when stop() is not reached
  local bill_dir = testing.tmpdir() .. "/bills"
  gateway.reconcile = { check_after = 1, first = 0.5, ceiling = 1,
    interval = 0.1, bill_hour = 0, bill_dir = bill_dir }
  for k, v in pairs(rec or {}) do gateway.reconcile[k] = v end
  return sim, core.start(sim, { db = db, gateway = gateway }), bill_dir
end

-- start's undoing: the gateway, the simulator, the bills' folder
local function stop(gw, bill_dir)
  if gw then gw:stop() end
  testing.stop_all()
  if bill_dir then os.execute("rm -rf '" .. bill_dir .. "'") end
end

-- The daily bills of every Beijing day this case touched (today's, and
-- yesterday's too when a Beijing midnight passed meanwhile), diffed
-- against the gateway's rows (the app's own local_rows, run here against
-- its database): they agree, whatever other cases of the describe made
-- before (their records of those days are in both); then one amount
-- changed in the local rows shows as the one mismatch. Its own records:
-- a payment, and a refund of another that succeeded, so the bills are
-- not empty when the case runs alone (--filter), and the database is not
-- changed (the gateway's own bill job may read that day meanwhile, once
-- a midnight passed: a changed row seen there was a mismatch the job
-- recorded). Was: it counted the records of the cases above (at least 3
-- payments, exactly the describe's SUCCESS refunds) and failed alone.
local function bill_diff(sim, gw)
  -- the app's own local_rows, run here against its database
  package.path = "examples/gateway/?.lua;" .. package.path
  local gwr = require "gw.reconcile"
  local t0 = os.time()
  -- the payment whose amount is changed below, of a known day, and a
  -- refund: paid and settled within one Beijing day (again in the new day
  -- when a midnight passed meanwhile), before that day's bill is closed
  local day, p = days.within(days.BEIJING, function()
    local p = gw:create{ amount = 61 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local q = gw:create{ amount = 62 }
    sim:pay_and_wait(q.out_trade_no)
    gw:wait_state(q.id, "paid")
    local r = gw:call("POST", "/v1/payments/" .. q.id .. "/refunds",
                      { amount = 20 })
    assert.equal(201, r.status, r.body)
    sim:settle(r.json.out_refund_no, "SUCCESS")
    testing.wait_until(function()
      return gw:call("GET", "/v1/refunds/" .. r.json.id).json.state
             == "succeeded"
    end, 20, "the refund succeeded")
    return p
  end)
  local dir = os.tmpname()
  os.remove(dir)
  os.execute("mkdir -p '" .. dir .. "'")
  -- changed: out_trade_no -> the amount the local rows say instead
  local function run(date, changed)
    return assert(bill.daily{ wx = sim:client(), db = gw.db, dir = dir,
      date = date, name = "spec", local_rows = function(d, numbers)
        local rows, err = gwr.local_rows(gw.db, sim.merchant.mchid, d,
                                         numbers)
        for _, r in ipairs(rows or {}) do
          if not r.out_refund_no and changed
             and changed[r.out_trade_no] then
            r.amount = changed[r.out_trade_no]
          end
        end
        return rows, err
      end })
  end
  local payments, refunded, bills = 0, 0, 0
  for _, date in ipairs(days.since(t0, days.BEIJING)) do
    sim:close_bills(date)
    local report = run(date)
    assert.same({}, report.mismatches)
    if not report.empty then bills = bills + 1 end
    payments = payments + report.remote_payments
    refunded = refunded + report.remote_refunds
  end
  assert.is_true(bills >= 1, "no day's bill had the payments")
  assert.is_true(payments >= 2)    -- the two here (and any of the cases
  assert.is_true(refunded >= 1)    -- before, on those days)
  -- one amount changed locally: the diff of its day names it
  local row = assert(gw.db:query("SELECT amount, paid_out_trade_no"
    .. " FROM gw_payments WHERE id = $1", { p.id }))[1]
  local report = run(day, { [row.paid_out_trade_no] = row.amount + 1 })
  assert.equal(1, #report.mismatches)
  local m = report.mismatches[1]
  assert.same({ "amount", row.paid_out_trade_no, row.amount + 1,
                row.amount },
              { m.kind, m.out_trade_no, m["local"].amount,
                m.remote.amount })
  os.execute("rm -rf '" .. dir .. "'")
end

describe("gateway reconciliation", function()
  local sim, gw, bill_dir, started

  setup(function()
    -- before the gateway starts: the daily bill job case reads the days
    -- of its window from it
    started = os.time()
    -- the default payment_ttl: the expiry case below sets its payment's
    -- expires_at itself (before: payment_ttl = 60, below the minimum now)
    sim, gw, bill_dir = start{}
  end)

  teardown(function() stop(gw, bill_dir) end)

  it("a payment whose notification is lost ends paid by the query",
     function()
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local p = gw:create{ amount = 123 }
    assert.equal("paying", p.state)
    sim:pay(p.out_trade_no)
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = p.out_trade_no }[1]
      return n and n.state == "dropped"
    end, 10, "the notification dropped")
    local got = gw:wait_state(p.id, "paid", 20)
    assert.matches("^%d+$", got.transaction_id)
    local row = assert(gw.db:query("SELECT notified_at, checks FROM"
      .. " gw_payments WHERE id = $1", { p.id }))[1]
    assert.is_true(row.notified_at == nil
                   or row.notified_at == require("paygate.core").null)
    local entries = audit.entries(gw.db, "payment:" .. p.id)
    local last = entries[#entries]
    assert.equal("payment.succeeded", last.what)
    assert.equal("reconcile", last.actor)
    -- the event went out like a notification's
    local ev = assert(gw.db:query("SELECT type FROM paygate_outbox WHERE"
      .. " subject = $1 AND type = 'payment.paid'", { p.id }))
    assert.equal(1, #ev)
  end)

  it("a prepay whose answer was lost: the order exists at WeChat, is paid,"
     .. " and the payment ends paid", function()
    -- the order is made, then its answer cannot be trusted (a signature
    -- that does not verify): the outcome is unknown. (A reset after the
    -- work is not used here: the HTTP client re-sends a request whose
    -- reused connection died before any answer, with the same nonce,
    -- which WeChat refuses as SIGN_ERROR.)
    sim:fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
    local order_id = "lost-" .. require("paygate.crypto").random_nonce(8)
    local res = gw:call("POST", "/v1/payments", { order_id = order_id,
      channel = "native", amount = 88, description = "lost answer" })
    sim:clear_faults()
    assert.is_true(res.status >= 500, res.body)
    local p = assert(gw.db:query("SELECT id, state, out_trade_no FROM"
      .. " gw_payments WHERE order_id = $1", { order_id }))[1]
    assert.equal("unknown", p.state, res.body)    -- it may have reached WeChat
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid", 20)
  end)

  it("an unknown payment that WeChat says is unpaid is open again",
     function()
    package.path = "examples/gateway/?.lua;" .. package.path
    local model = require "gw.model"
    local p = gw:create{ amount = 60 }
    assert(model.payments:apply(gw.db, p.id, "outcome_unknown"))
    assert(gw.db:exec("UPDATE gw_payments SET next_check_at = 0 WHERE id"
                      .. " = $1", { p.id }))
    gw:wait_state(p.id, "paying", 20)
    local e = audit.entries(gw.db, "payment:" .. p.id)
    assert.equal("payment.still_open", e[#e].what)
    assert.equal("reconcile", e[#e].actor)
    -- its event, like every transition's: the prepay's and this one's
    local ev = assert(gw.db:query("SELECT type FROM paygate_outbox WHERE"
      .. " subject = $1 AND type = 'payment.paying'", { p.id }))
    assert.equal(2, #ev)
  end)

  it("an expired unpaid payment is closed through the close API", function()
    local p = gw:create{ amount = 50 }
    -- as if its time had passed
    assert(gw.db:exec("UPDATE gw_payments SET expires_at = $2 WHERE id = $1",
                      { p.id, os.time() - 1 }))
    gw:wait_state(p.id, "closed", 20)
    local wx = sim:client()
    assert.equal("CLOSED", assert(wx:query_by_out_trade_no(p.out_trade_no))
                 .trade_state)
    local ev = assert(gw.db:query("SELECT type FROM paygate_outbox WHERE"
      .. " subject = $1 AND type = 'payment.closed'", { p.id }))
    assert.equal(1, #ev)
  end)

  it("refunds whose notifications are lost: SUCCESS applied by query (the"
     .. " payment partially refunded), ABNORMAL surfaced", function()
    local p = gw:create{ amount = 300 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local r1 = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 100 })
    assert.equal(201, r1.status, r1.body)
    local r2 = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 50 })
    assert.equal(201, r2.status, r2.body)
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 2 }
    sim:settle(r1.json.out_refund_no, "SUCCESS")
    sim:settle(r2.json.out_refund_no, "ABNORMAL")
    local function refund(id)
      return gw:call("GET", "/v1/refunds/" .. id).json
    end
    testing.wait_until(function()
      return refund(r1.json.id).state == "succeeded"
             and refund(r2.json.id).state == "abnormal"
    end, 20, "the refunds settled by query")
    local got = gw:wait_state(p.id, "partially_refunded")
    assert.equal(100, got.refunded)
    for _, no in ipairs({ r1.json.out_refund_no, r2.json.out_refund_no }) do
      assert.equal("dropped", sim:notifications{ out_refund_no = no }[1].state)
    end
    local ev = assert(gw.db:query("SELECT type FROM paygate_outbox WHERE"
      .. " subject = $1 AND type = 'refund.abnormal'", { p.id }))
    assert.equal(1, #ev)
    -- and said once in the log, with what the application needs
    local said = {}
    for line in (gw.srv:logs() or ""):gmatch("[^\n]+") do
      local rec = require("cjson.safe").decode(line)
      if type(rec) == "table" and rec.refund == r2.json.id and rec.msg
         == "gateway: refund ABNORMAL: apply for the abnormal-refund API" then
        said[#said + 1] = rec
      end
    end
    assert.equal(1, #said)
    assert.equal("reconcile", said[1].source)
    assert.equal(refund(r2.json.id).refund_id, said[1].refund_id)
    -- the merchant applies through the abnormal-refund API; WeChat pays it
    -- to the bank card, and that notification is lost too: the checks,
    -- which keep asking about an abnormal refund, see it succeed
    local rf = refund(r2.json.id)
    local a = assert(sim:client():abnormal_refund{ refund_id = rf.refund_id,
      out_refund_no = rf.out_refund_no, type = "MERCHANT_BANK_CARD" })
    assert.equal("PROCESSING", a.status)
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    sim:settle(rf.out_refund_no, "SUCCESS")
    testing.wait_until(function()
      return refund(r2.json.id).state == "succeeded"
    end, 20, "the abnormal refund's outcome, by query")
    got = gw:wait_state(p.id, "partially_refunded")
    assert.equal(150, got.refunded)
    -- while it was abnormal and processing, no transition was refused
    local illegal = assert(gw.db:query("SELECT count(*) AS n FROM"
      .. " paygate_audit WHERE subject = $1 AND what LIKE '%illegal%'",
      { "refund:" .. r2.json.id }))
    assert.equal(0, tonumber(illegal[1].n))
  end)

  it("the gateway's rows of a day agree with WeChat's bill; a changed"
     .. " amount shows", function()
    bill_diff(sim, gw)
  end)

  it("a payment is on the day WeChat took the money, not the day it was"
     .. " recorded", function()
    package.path = "examples/gateway/?.lua;" .. package.path
    local gwr = require "gw.reconcile"
    local p = gw:create{ amount = 7 }
    -- paid at 23:59:50 on 2026-03-01 (Beijing), its notification recorded
    -- 2 minutes after midnight (a lost one, caught up later)
    local day = "2026-03-01"
    local next_day = bill.day_start(day) + 86400
    assert(gw.db:exec("UPDATE gw_payments SET state = 'paid',"
      .. " paid_out_trade_no = out_trade_no WHERE id = $1", { p.id }))
    assert(audit.append(gw.db, "payment:" .. p.id, {
      what = "payment.succeeded", from = "paying", to = "paid",
      cause = "paid", actor = "wechatpay", at = (next_day + 120) * 1000,
      evidence = { success_time = "2026-03-01T23:59:50+08:00",
                   out_trade_no = p.out_trade_no } }))
    local function has(date)
      for _, r in ipairs(assert(gwr.local_rows(gw.db, sim.merchant.mchid,
                                               date, {}))) do
        if r.out_trade_no == p.out_trade_no then return true end
      end
      return false
    end
    assert.is_true(has(day))
    assert.is_false(has("2026-03-02"))
    -- a payment the notification path applies keeps WeChat's success_time
    local q = gw:create{ amount = 8 }
    sim:pay_and_wait(q.out_trade_no)
    gw:wait_state(q.id, "paid")
    local e = audit.entries(gw.db, "payment:" .. q.id)
    assert.matches('"success_time":"%d%d%d%d%-%d%d%-%d%dT', e[#e].evidence)
  end)

  it("the daily bill job reports yesterday (no trades: an empty day)",
     function()
    -- yesterday when the gateway started: in the job's window (bill_days
    -- 3) at its first round, and at every round after it even when a
    -- Beijing midnight passed since (then one of the older days, whose
    -- bills the job fetches at once); no trade of the simulator, started
    -- after it, is of that day. (Was: yesterday when this case runs,
    -- after a midnight the day of the cases above, not empty, perhaps
    -- not reported yet.)
    local date = bill.bill_date(started)
    local e
    testing.wait_until(function()
      e = audit.entries(gw.db, "reconcile:" .. date)
      return e and e[1]
    end, 20, "the bill's audit entry")
    assert.equal("reconcile.bill", e[1].what)
    assert.matches('"empty":true', e[1].evidence)
    assert.matches('"merchant":"' .. sim.merchant.mchid .. '"', e[1].evidence)
    -- the gauge, per merchant, on the gateway's /metrics: published once
    -- the run's audit entry committed, a moment after others can read it
    local m
    testing.wait_until(function()
      m = gw.srv:admin_get("/metrics")
      return m and m.body:find('\npaygate_reconcile_bill_mismatches{'
        .. 'kind="amount",merchant="' .. sim.merchant.mchid .. '"} ', 1, true)
    end, 20, "the bill's mismatch gauge on /metrics")
    assert.truthy(m and m.body:find('\npaygate_reconcile_bill_mismatches{'
      .. 'kind="amount",merchant="' .. sim.merchant.mchid .. '"} 0\n', 1,
      true), m and m.body:match("[^\n]*bill_mismatches[^\n]*") or "none")
    local path = e[1].evidence:match('"file":"([^"]+)"')
    local f = assert(io.open(path, "rb"))
    f:close()
    -- a worker restarted (a crash, a reload) sets the bill's gauges again:
    -- the day is reported, so no run would until tomorrow's
    local old = gw.srv:workers()
    assert.is_true(#old >= 1)
    for _, victim in ipairs(old) do
      testing.proc.kill_pid(victim, testing.proc.SIGKILL)
    end
    testing.wait_until(function()
      local now = gw.srv:workers()
      if #now ~= #old then return false end
      for _, pid in ipairs(now) do
        for _, gone in ipairs(old) do
          if pid == gone then return false end
        end
      end
      return true
    end, 15, "the workers restarted")
    testing.wait_until(function()
      m = gw.srv:admin_get("/metrics")
      return m and m.body:find('\npaygate_reconcile_bill_mismatches{'
        .. 'kind="amount",merchant="' .. sim.merchant.mchid .. '"} 0\n', 1,
        true) and m.body:find('\npaygate_reconcile_bill_failed{merchant="'
        .. sim.merchant.mchid .. '"} 0\n', 1, true)
    end, 15, "the bill's gauges after a restart")
    -- and the days before it within bill_days (3): a day whose turn came
    -- while the gateway was down is caught up (before: yesterday only).
    -- The day before that yesterday: in the window at the job's first
    -- round whether or not a Beijing midnight passed since the start
    local before = bill.bill_date(started - 86400)
    testing.wait_until(function()
      e = audit.entries(gw.db, "reconcile:" .. before)
      return e and e[1]
    end, 20, "the audit entry of the bill of " .. before)
    assert.equal("reconcile.bill", e[1].what)
    os.execute("rm -rf '" .. path:match("^(.*)/[^/]+$") .. "'")
  end)
end)

-- The warnings "... found by query, no notification had arrived" of the
-- gateway's log about payment (or refund) id, decoded.
local function unnotified_lines(gw, key, id)
  local out = {}
  for line in (gw.srv:logs() or ""):gmatch("[^\n]+") do
    if line:find("no notification had arrived", 1, true) then
      local rec = require("cjson.safe").decode(line)
      if rec and rec[key] == id then out[#out + 1] = rec end
    end
  end
  return out
end

-- paygate_gateway_settled_without_notification_total of the simulator's
-- merchant for kind and source (0 when absent)
local function unnotified_count(gw, sim, kind, source)
  local text = assert(gw.srv:admin_get("/metrics")).body
  return tonumber(text:match(
    'paygate_gateway_settled_without_notification_total{merchant="'
    .. sim.merchant.mchid .. '",kind="' .. kind .. '",source="' .. source
    .. '"} (%d+)')) or 0
end

-- A lost notification settled by a query is one warning and one count
-- (what an operator sees of WeChat's callbacks not arriving); a payment
-- whose notification arrived is neither. Before: the payment ended paid
-- with no log line and nothing counted.
-- A paid payment and a refund of 100 of it that WeChat settles with its
-- notification held back by the simulator's fault kind (never_sent,
-- out_of_order): the refund checks settle it by query, and count it.
-- returns: the payment, the refund's create answer
local function refund_settled_by_query(gw, sim, kind)
  local p = gw:create{ amount = 300 }
  sim:pay_and_wait(p.out_trade_no)
  gw:wait_state(p.id, "paid")
  local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                    { amount = 100 })
  assert.equal(201, r.status, r.body)
  sim:fault{ endpoint = "notify", kind = kind, count = 1 }
  sim:settle(r.json.out_refund_no, "SUCCESS")
  testing.wait_until(function()
    return unnotified_count(gw, sim, "refund", "reconcile") == 1
  end, 20, "the refund settled by query, counted")
  return p, r
end

describe("gateway reconciliation: settled without a notification",
         function()
  local sim, gw, bill_dir

  setup(function()
    sim, gw, bill_dir = start({}, nil, { bill = false })
  end)

  teardown(function() stop(gw, bill_dir) end)

  it("a lost notification found by the checks is one warning and one"
     .. " count; a notified payment none", function()
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local lost = gw:create{ amount = 211 }
    sim:pay(lost.out_trade_no)
    local got = gw:wait_state(lost.id, "paid", 20)
    testing.wait_until(function()
      return unnotified_count(gw, sim, "payment", "reconcile") == 1
    end, 10, "the settlement counted")
    local lines = unnotified_lines(gw, "payment", lost.id)
    assert.equal(1, #lines)
    local l = lines[1]
    assert.equal("warn", l.level)
    assert.equal("gateway: paid found by query, no notification had"
                 .. " arrived", l.msg)
    assert.same({ sim.merchant.mchid, lost.out_trade_no, got.transaction_id,
                  "reconcile" },
                { l.mchid, l.out_trade_no, l.transaction_id, l.source })
    local st = require("paygate.civil").epoch(l.success_time)
    assert.is_number(st)
    -- WeChat's success_time to the query that found it: the checks wait
    -- check_after (1 s) after the payment's creation
    assert.is_true(l.after_s >= 0 and l.after_s < 20, tostring(l.after_s))

    -- notified: neither, and a query after it (?refresh=1) is a duplicate
    local ok = gw:create{ amount = 212 }
    sim:pay_and_wait(ok.out_trade_no)
    gw:wait_state(ok.id, "paid")
    assert.equal("paid", gw:get(ok.id, "?refresh=1").state)
    assert.same({}, unnotified_lines(gw, "payment", ok.id))

    -- a notification held back past the checks (out_of_order: until a
    -- later one is delivered): the checks settle the payment first and
    -- count it (it had not come when they asked); the notification, once
    -- it arrives, is a duplicate and counts nothing more
    sim:fault{ endpoint = "notify", kind = "out_of_order", count = 1 }
    local held = gw:create{ amount = 213 }
    sim:pay(held.out_trade_no)
    gw:wait_state(held.id, "paid", 20)
    local later = gw:create{ amount = 214 }
    sim:pay_and_wait(later.out_trade_no)
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = held.out_trade_no }[1]
      return n and n.state == "delivered"
    end, 20, "the held notification delivered")
    local dup = assert(gw.db:query("SELECT outcome FROM gw_notifications"
      .. " WHERE business_key LIKE $1", { "%|" .. held.out_trade_no
      .. "|SUCCESS" }))
    assert.equal("duplicate", dup[1] and dup[1].outcome)
    testing.wait_until(function()
      return unnotified_count(gw, sim, "payment", "reconcile") == 2
    end, 10, "the held one counted")
    assert.equal(1, #unnotified_lines(gw, "payment", held.id))
    assert.same({}, unnotified_lines(gw, "payment", later.id))
    assert.equal(2, unnotified_count(gw, sim, "payment", "reconcile"))
    assert.equal(0, unnotified_count(gw, sim, "payment", "refresh"))
  end)

  it("a refund whose notification is lost: one warning, counted as a"
     .. " refund", function()
    local p, r = refund_settled_by_query(gw, sim, "never_sent")
    local lines = unnotified_lines(gw, "refund", r.json.id)
    assert.equal(1, #lines)
    assert.same({ "gateway: refund outcome found by query, no notification"
                  .. " had arrived", p.id, r.json.out_refund_no, "SUCCESS" },
                { lines[1].msg, lines[1].payment, lines[1].out_refund_no,
                  lines[1].status })
  end)
end)

-- The info lines "gateway: notification arrived after a query had settled
-- it" of the gateway's log about payment (or refund) id, decoded.
local function late_lines(gw, key, id)
  local out = {}
  for line in (gw.srv:logs() or ""):gmatch("[^\n]+") do
    if line:find("notification arrived after a query", 1, true) then
      local rec = require("cjson.safe").decode(line)
      if rec and rec[key] == id then out[#out + 1] = rec end
    end
  end
  return out
end

-- paygate_gateway_notification_after_query_total of the simulator's
-- merchant for kind (0 when absent)
local function late_count(gw, sim, kind)
  local text = assert(gw.srv:admin_get("/metrics")).body
  return tonumber(text:match(
    'paygate_gateway_notification_after_query_total{merchant="'
    .. sim.merchant.mchid .. '",kind="' .. kind .. '"} (%d+)')) or 0
end

-- the simulator's notification of a payment (f: { out_trade_no = ... })
-- or a refund ({ out_refund_no = ... }), once delivered
local function delivered(sim, f, what)
  local n
  testing.wait_until(function()
    n = sim:notifications(f)[1]
    return n and n.state == "delivered"
  end, 20, what .. " delivered")
  return n
end

-- A notification WeChat sends after the checks settled what it reports
-- came late, not lost: one info line and one count, after the query's
-- warning. A notification sent again (WeChat's duplicate of one applied)
-- says nothing. Before: the late one was recorded as a duplicate with
-- nothing said, and a late callback looked like a lost one.
describe("gateway reconciliation: a notification after the query",
         function()
  local sim, gw, bill_dir

  setup(function()
    sim, gw, bill_dir = start({}, nil, { bill = false })
  end)

  teardown(function() stop(gw, bill_dir) end)

  after_each(function() sim:clear_faults() end)

  it("a payment's notification held past the checks is one line and one"
     .. " count; a duplicate none", function()
    -- applied in time, then sent again (the same id): nothing said
    sim:fault{ endpoint = "notify", kind = "duplicate", count = 1 }
    local dup = gw:create{ amount = 231 }
    sim:pay_and_wait(dup.out_trade_no)
    gw:wait_state(dup.id, "paid")
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = dup.out_trade_no }[1]
      for _, a in ipairs(n and n.attempts or {}) do
        if a.duplicate and a.status == 204 then return true end
      end
    end, 20, "the duplicate answered 204")

    -- held (out_of_order: until a later one is delivered) past the
    -- checks, which settle the payment first
    sim:fault{ endpoint = "notify", kind = "out_of_order", count = 1 }
    local held = gw:create{ amount = 232 }
    sim:pay(held.out_trade_no)
    gw:wait_state(held.id, "paid", 20)
    testing.wait_until(function()
      return unnotified_count(gw, sim, "payment", "reconcile") == 1
    end, 10, "the checks' settlement counted")
    local later = gw:create{ amount = 233 }
    sim:pay_and_wait(later.out_trade_no)
    local n = delivered(sim, { out_trade_no = held.out_trade_no },
                        "the held notification")
    testing.wait_until(function()
      return late_count(gw, sim, "payment") == 1
    end, 10, "the late notification counted")
    local lines = late_lines(gw, "payment", held.id)
    assert.equal(1, #lines)
    local l = lines[1]
    assert.same({ "info", "gateway: notification arrived after a query had"
                  .. " settled it", sim.merchant.mchid, held.out_trade_no,
                  n.id },
                { l.level, l.msg, l.mchid, l.out_trade_no,
                  l.notification_id })
    -- after the query's settlement, and after WeChat's success_time
    -- (which came before the query)
    assert.is_true(l.after_query_s >= 0 and l.after_query_s < 60,
                   tostring(l.after_query_s))
    assert.is_true(l.after_success_s >= l.after_query_s,
                   tostring(l.after_success_s))
    assert.same({}, late_lines(gw, "payment", dup.id))
    assert.same({}, late_lines(gw, "payment", later.id))
    assert.equal(1, late_count(gw, sim, "payment"))
    assert.equal(0, late_count(gw, sim, "refund"))
  end)

  it("a refund's notification held past the checks: one line, counted as"
     .. " a refund", function()
    -- (the case above's late payment counted, when it ran before)
    local late_payments = late_count(gw, sim, "payment")
    local p, r = refund_settled_by_query(gw, sim, "out_of_order")
    local later = gw:create{ amount = 301 }
    sim:pay_and_wait(later.out_trade_no)
    local n = delivered(sim, { out_refund_no = r.json.out_refund_no },
                        "the held refund notification")
    testing.wait_until(function()
      return late_count(gw, sim, "refund") == 1
    end, 10, "the late refund notification counted")
    local lines = late_lines(gw, "refund", r.json.id)
    assert.equal(1, #lines)
    assert.same({ p.id, r.json.out_refund_no, "SUCCESS", n.id },
                { lines[1].payment, lines[1].out_refund_no, lines[1].status,
                  lines[1].notification_id })
    assert.equal(late_payments, late_count(gw, sim, "payment"))
  end)
end)

-- ?refresh=1 asks when the merchant wants, perhaps while the notification
-- is on its way: a success_time younger than reconcile.check_after is not
-- called lost; older, it is (source "refresh").
describe("gateway ?refresh=1: settled without a notification", function()
  local sim, gw, bill_dir

  setup(function()
    sim, gw, bill_dir = start({}, nil, { enabled = false, check_after = 5,
                                         bill = false })
  end)

  teardown(function() stop(gw, bill_dir) end)

  it("counts a payment paid check_after ago, not one paid just now",
     function()
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 2 }
    local old = gw:create{ amount = 221 }
    sim:pay(old.out_trade_no)
    local fresh = gw:create{ amount = 222 }
    sim:pay(fresh.out_trade_no)
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = fresh.out_trade_no }[1]
      return n and n.state == "dropped"
    end, 10, "the notifications dropped")
    local civil = require "paygate.civil"
    local wx = sim:client()
    assert.equal("paid", gw:get(fresh.id, "?refresh=1").state)
    -- (asked within check_after of its payment: a machine that stalled
    -- for seconds is named as the cause, not the gateway)
    local txn = assert(wx:query_by_out_trade_no(fresh.out_trade_no))
    assert.is_true(os.time() - civil.epoch(txn.success_time) < 5,
                   "the refresh came 5 s or more after the payment")
    assert.same({}, unnotified_lines(gw, "payment", fresh.id))
    txn = assert(wx:query_by_out_trade_no(old.out_trade_no))
    local st = civil.epoch(txn.success_time)
    testing.wait_until(function() return os.time() >= st + 6 end, 10,
                       "check_after past the payment")
    assert.equal("paid", gw:get(old.id, "?refresh=1").state)
    local lines = unnotified_lines(gw, "payment", old.id)
    assert.equal(1, #lines)
    assert.equal("refresh", lines[1].source)
    assert.is_true(lines[1].after_s >= 5, tostring(lines[1].after_s))
    assert.equal(1, unnotified_count(gw, sim, "payment", "refresh"))
    assert.equal(0, unnotified_count(gw, sim, "payment", "reconcile"))
  end)
end)

-- A gateway whose clock runs 200 s ahead of WeChat's (within WeChat's 5
-- minutes: every call verifies both ways). A payment paid a moment ago
-- and asked about with ?refresh=1 is not one whose notification was lost:
-- how long after its success_time is read on WeChat's clock (the
-- answer's Wechatpay-Timestamp). Before: from WeChat's success_time to
-- this host's clock, 200 s, past check_after: a warning and a count of
-- paygate_gateway_settled_without_notification_total at every refresh.
describe("gateway ?refresh=1 on a clock 200 s ahead of WeChat's", function()
  local sim, gw, bin

  setup(function()
    bin = core.shifted_bin(200)
    if not bin then return end
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { bin = bin, gateway = { reconcile = {
      enabled = false, check_after = 60, bill = false } } })
  end)

  teardown(function() stop(gw) end)

  it("does not count a payment paid a moment ago as unnotified",
     function()
    if not bin then
      pending("cc not installed")
      return
    end
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local p = gw:create{ amount = 223 }
    sim:pay(p.out_trade_no)
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = p.out_trade_no }[1]
      return n and n.state == "dropped"
    end, 10, "the notification dropped")
    local paid = gw:get(p.id, "?refresh=1")
    assert.equal("paid", paid.state)
    -- (the gateway's own stamps are on its clock: 200 s ahead of this one)
    assert.is_true(paid.updated_at - os.time() > 150,
                   "the gateway's clock is not ahead: " .. paid.updated_at)
    assert.same({}, unnotified_lines(gw, "payment", p.id))
    assert.equal(0, unnotified_count(gw, sim, "payment", "refresh"))
  end)
end)

describe("gateway daily bill: a refund line the gateway has as not"
         .. " settled", function()
  local sim, gw, bill_dir

  setup(function()
    -- no runner: the refund's lost notification is not caught up before
    -- the bill is read
    sim, gw, bill_dir = start({}, nil, { enabled = false })
  end)

  teardown(function() stop(gw, bill_dir) end)

  it("is a state mismatch naming the local refund, not missing_local",
     function()
    package.path = "examples/gateway/?.lua;" .. package.path
    local gwr = require "gw.reconcile"
    -- made within one Beijing day, the bill's (made again in the new
    -- day when a midnight passed meanwhile)
    local today, p, r = days.within(days.BEIJING, function()
      local p = gw:create{ amount = 90 }
      sim:pay_and_wait(p.out_trade_no)
      gw:wait_state(p.id, "paid")
      local r = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                        { amount = 40 })
      assert.equal(201, r.status, r.body)
      assert.equal("processing", r.json.state)
      -- WeChat pays it back; its notification is lost
      sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      sim:settle(r.json.out_refund_no, "SUCCESS")
      testing.wait_until(function()
        local n = sim:notifications{ out_refund_no = r.json.out_refund_no }[1]
        return n and n.state == "dropped"
      end, 10, "the refund's notification dropped")
      return p, r
    end)
    sim:close_bills(today)
    local dir = bill_dir .. "/spec"
    os.execute("mkdir -p '" .. dir .. "'")
    local report = assert(gwr.bill_day{ wx = sim:client(), db = gw.db,
      dir = dir, date = today, mchid = sim.merchant.mchid })
    assert.equal(1, report.remote_refunds)
    assert.equal(1, #report.mismatches)
    local m = report.mismatches[1]
    -- the bill's refund is this gateway's, still processing here
    assert.same({ "state", p.out_trade_no, r.json.out_refund_no,
                  "processing", 40, "SUCCESS", 40 },
                { m.kind, m.out_trade_no, m.out_refund_no,
                  m["local"] and m["local"].state,
                  m["local"] and m["local"].amount, m.remote.state,
                  m.remote.amount })
    -- and in the day's audit entry, not only counted there
    local e = audit.entries(gw.db, "reconcile:" .. today)
    local ev = require("paygate.json").decode(e[#e].evidence)
    assert.same({ { kind = "state", out_trade_no = p.out_trade_no,
                    out_refund_no = r.json.out_refund_no,
                    local_state = "processing", local_amount = 40,
                    remote_state = "SUCCESS", remote_amount = 40 } },
                ev.findings)
  end)
end)

-- paygate_reconcile_bill_failed{merchant} on gw's /metrics, or nil
local function bill_failed_gauge(gw, sim)
  local m = gw.srv:admin_get("/metrics")
  return m and m.body:match('\npaygate_reconcile_bill_failed{merchant="'
                            .. sim.merchant.mchid .. '"} (%d+)\n')
end

-- The gateway of a case whose bill job must fail yesterday's bill and
-- see it again, started within the case: the start and the case within
-- one Beijing day (days.within: both again in the new day when a midnight
-- passed meanwhile -- with bill_days = 1 the day failed then leaves the
-- window unreconciled, and its alarm stays up, rightly). fn(date) gets
-- yesterday's date, taken before the start. Run within a case (busted's
-- finally stops the last gateway).
local function failing_bill_case(gateway, rec, fn)
  local box = {}
  finally(function() stop(box.gw, box.bill_dir) end)
  days.within(days.BEIJING, function()
    if box.gw then stop(box.gw, box.bill_dir) end
    local date = bill.bill_date()
    -- the bill's download fails from the start
    box.sim, box.gw, box.bill_dir = start(gateway, nil, rec, function(s)
      s:fault{ endpoint = "tradebill", kind = "error", status = 500,
               count = 100000 }
    end)
    fn(box.sim, box.gw, date)
  end)
end

describe("gateway daily bill job failures", function()
  it("a failing run shows on /metrics until one succeeds", function()
    failing_bill_case({}, { bill_retry = 0.5, bill_days = 1 },
                      function(sim, gw, date)
      local function failed_gauge() return bill_failed_gauge(gw, sim) end
      -- no report, and the gauge says so
      testing.wait_until(function() return failed_gauge() == "1" end, 20,
                         "paygate_reconcile_bill_failed 1")
      assert.same({}, audit.entries(gw.db, "reconcile:" .. date))
      -- it works again: reported, and the gauge back to 0
      sim:clear_faults()
      testing.wait_until(function()
        local e = audit.entries(gw.db, "reconcile:" .. date)
        return e and e[1] and failed_gauge() == "0"
      end, 20, "the report, and paygate_reconcile_bill_failed 0")
    end)
  end)
end)

-- The job failed a day (the alarm raised), then the operator ran that day
-- again from the console, with success: the job finds the day reported
-- and never runs it again, so the console's run must clear the alarm.
describe("gateway daily bill failed, then run from the console", function()
  -- the console's Reconcile lever of gw for date: its redirect's location
  local function console_run(gw, date)
    local page = gw.srv:request{ path = "/console/reconcile" }
    assert.equal(200, page.status, page.body)
    local csrf = assert(page.body:match('name="csrf" value="(%x+)"'))
    local res = gw.srv:request{ method = "POST", path = "/console/reconcile",
      body = "csrf=" .. csrf .. "&date=" .. date,
      headers = { ["Content-Type"] = "application/x-www-form-urlencoded" } }
    assert.equal(303, res.status, res.body)
    return res.headers["location"]
  end

  it("the console's successful run sets paygate_reconcile_bill_failed 0;"
     .. " an older day's run, good or bad, leaves it", function()
    -- no retry by the job within the spec: only the console runs it again
    failing_bill_case({ console = { access = "loopback" } },
                      { bill_retry = 3600, bill_days = 1 },
                      function(sim, gw, date)
      local function failed_gauge() return bill_failed_gauge(gw, sim) end
      testing.wait_until(function() return failed_gauge() == "1" end, 20,
                         "paygate_reconcile_bill_failed 1")
      sim:clear_faults()
      -- the day before the failed one, reconciled: the newer failure
      -- stands
      local older = os.date("!%Y-%m-%d", bill.day_start(date) - 86400
                            + 8 * 3600)
      assert.matches("reconciled", console_run(gw, older))
      local e = audit.entries(gw.db, "reconcile:" .. older)
      assert.equal(1, #e)
      -- run from the console: its entry says so (was "reconcile", the
      -- job's, while the console's list of runs reads "by" from it)
      assert.equal("console", e[1].actor)
      assert.equal("1", failed_gauge())
      -- the failed day itself: cleared
      assert.matches("reconciled", console_run(gw, date))
      assert.equal(1, #audit.entries(gw.db, "reconcile:" .. date))
      testing.wait_until(function() return failed_gauge() == "0" end, 5,
                         "paygate_reconcile_bill_failed 0")
      -- an older day failing now does not raise the alarm over it
      sim:fault{ endpoint = "tradebill", kind = "error", status = 500,
                 count = 100 }
      local two_before = os.date("!%Y-%m-%d", bill.day_start(date)
                                 - 2 * 86400 + 8 * 3600)
      assert.is_nil(console_run(gw, two_before):find("reconciled", 1, true))
      assert.equal("0", failed_gauge())
      sim:clear_faults()
    end)
  end)
end)

describe("gateway daily bill: which days before bill_hour", function()
  package.path = "examples/gateway/?.lua;" .. package.path
  local gwr = require "gw.reconcile"
  -- 2026-11-30, Beijing: 02:00 and 10:00
  local two = bill.day_start("2026-11-30") + 2 * 3600
  local ten = two + 8 * 3600

  it("the older days pending are fetched at once; yesterday waits for"
     .. " bill_hour", function()
    assert.same({ "2026-11-27", "2026-11-28" },
                gwr.bill_dates(two, { bill_hour = 10, bill_days = 3 }))
    assert.same({ "2026-11-27", "2026-11-28", "2026-11-29" },
                gwr.bill_dates(ten, { bill_hour = 10, bill_days = 3 }))
    assert.same({ "2026-11-28", "2026-11-29" },
                gwr.bill_dates(ten - 1 + 3600,
                               { bill_hour = 10, bill_days = 2 }))
    -- yesterday only: nothing before the hour
    assert.same({}, gwr.bill_dates(two, { bill_hour = 10, bill_days = 1 }))
    assert.same({ "2026-11-29" },
                gwr.bill_dates(two, { bill_hour = 2, bill_days = 1 }))
  end)

  it("a bill WeChat is still making is not ready yet: when to ask again,"
     .. " and whether the job will", function()
    local conf = { enabled = true, bill = true, bill_hour = 10,
                   bill_retry = 1800, bill_days = 3 }
    -- yesterday's, asked at 02:00: after 10:00 today; the job asks
    local a = gwr.not_ready_advice("2026-11-29", two, conf)
    assert.matches("WeChat is still making the bill of 2026-11-29"
      .. " (STATEMENT_CREATING): try again after 10:00 Beijing on"
      .. " 2026-11-30; the daily bill job asks for it by itself at 10:00"
      .. " Beijing on 2026-11-30 (bill_hour), then every 1800 s"
      .. " (bill_retry) until WeChat has made it", a, 1, true)
    -- the job's hour is the gateway's bill_hour, not WeChat's 10:00
    conf.bill_hour = 12
    assert.matches("try again after 10:00 Beijing on 2026-11-30; the daily"
      .. " bill job asks for it by itself at 12:00 Beijing on 2026-11-30"
      .. " (bill_hour), then every 1800 s (bill_retry)",
      gwr.not_ready_advice("2026-11-29", two, conf), 1, true)
    conf.bill_hour = 10
    -- asked after 10:00: every half hour, as WeChat advises; the job asks
    -- at its next round, or bill_retry after it last asked
    a = gwr.not_ready_advice("2026-11-29", ten + 60, conf)
    assert.matches("try again in 30 minutes (WeChat advises asking every"
      .. " 30 minutes until the bill is there); the daily bill job asks for"
      .. " it by itself at its next round (within 60 s), then every 1800 s",
      a, 1, true)
    assert.matches("the daily bill job asks for it by itself next at"
      .. " 2026-11-30 10:30 Beijing, then every 1800 s (bill_retry)",
      gwr.not_ready_advice("2026-11-29", ten + 60, conf, ten), 1, true)
    -- today's: after 10:00 tomorrow, and the job from bill_hour tomorrow
    assert.matches("try again after 10:00 Beijing on 2026-12-01; the daily"
      .. " bill job asks for it by itself at 10:00 Beijing on 2026-12-01"
      .. " (bill_hour)",
      gwr.not_ready_advice("2026-11-30", ten + 60, conf), 1, true)
    -- a day older than the job's window, or the job off: nothing asks
    assert.matches("the daily bill job does not ask for it (older than its"
      .. " 3 days, bill_days)",
      gwr.not_ready_advice("2026-11-20", ten, conf), 1, true)
    assert.matches("the daily bill job is off here",
      gwr.not_ready_advice("2026-11-29", two, nil), 1, true)
    conf.bill = false
    assert.matches("the daily bill job is off here",
      gwr.not_ready_advice("2026-11-29", two, conf), 1, true)
  end)
end)

-- The same, by the job of a running gateway: bill_hour is set to the
-- next Beijing hour, so that the spec runs before it (not possible from
-- 23:00 Beijing, nor in an hour's last two minutes: it would pass during
-- the spec). Which days are due, yesterday excluded, is the case above;
-- here, that the job fetches the older ones at all before bill_hour.
describe("gateway daily bill job before bill_hour", function()
  local sim, gw, bill_dir, hour

  setup(function()
    -- judged when the block runs (the file's earlier blocks take time)
    local bj = (os.time() + 8 * 3600) % 86400
    if bj < 23 * 3600 and bj % 3600 < 3480 then
      hour = math.floor(bj / 3600) + 1
      sim, gw, bill_dir = start({}, nil, { bill_days = 3,
                                           bill_hour = hour })
    end
  end)

  teardown(function()
    if gw then stop(gw, bill_dir) end
  end)

  it("catches up the older days at once", function()
    if not hour then
      pending("no later Beijing hour today (23:00 or an hour's end)")
      return
    end
    local now = os.time()
    for back = 2, 1, -1 do
      local date = bill.bill_date(now - back * 86400)
      testing.wait_until(function()
        local e = audit.entries(gw.db, "reconcile:" .. date)
        return e and e[1]
      end, 20, "the audit entry of the bill of " .. date)
    end
  end)
end)

-- The bill job driven here, on a clock the spec moves: a day no run
-- reconciled stays on paygate_reconcile_bill_failed until one does.
-- Before, a day WeChat kept STATEMENT_CREATING dropped out of the window
-- after bill_days without a word, and an older day still failing had its
-- alarm cleared by a newer day's success.
describe("gateway daily bill job: a day never reconciled", function()
  local sim, gw, bill_dir, gwr, calls
  local metrics = require "paygate.metrics"

  setup(function()
    package.path = "examples/gateway/?.lua;" .. package.path
    gwr = require "gw.reconcile"
    -- the gateway's own runners off: the spec's runner holds the lease
    sim, gw, bill_dir = start({}, nil, { enabled = false })
    os.execute("mkdir -p '" .. bill_dir .. "'")
    -- what the gauges are set to (every gauge's set, this process)
    local methods = debug.getmetatable(metrics.gauge("spec_probe", "p"))
                    .__index
    calls = spy.on(methods, "set")
  end)

  teardown(function()
    calls:revert()
    stop(gw, bill_dir)
  end)

  before_each(function() sim:clear_faults() end)

  -- the value paygate_reconcile_bill_failed{merchant} was set to last
  local function failed()
    local v
    for _, c in ipairs(calls.calls) do
      local labels = c.vals[3]
      if type(labels) == "table" and labels.kind == nil
         and labels.merchant == sim.merchant.mchid then
        v = c.vals[2]
      end
    end
    return v
  end

  -- a bill job on this clock (epoch s), as gw.reconcile.start makes it
  local function job(rec, clock)
    local conf = assert(gwr.check_conf(rec))
    conf.bill_dir = bill_dir
    return gwr.bill_job({ db = gw.db, wx = { [sim.merchant.mchid] =
      sim:client() }, merchants = { { mchid = sim.merchant.mchid } } },
      conf, function() return clock.now end)
  end

  local function missed(date)
    local out = {}
    for _, e in ipairs(audit.entries(gw.db, "reconcile_missed:" .. date)) do
      out[#out + 1] = e
    end
    return out
  end

  it("a day still STATEMENT_CREATING when it leaves the window raises the"
     .. " alarm and is recorded, until a run of it succeeds", function()
    local clock = { now = os.time() }
    local yesterday = bill.bill_date(clock.now)
    local r = job({ bill_days = 1, bill_hour = 0, bill_retry = 60 }, clock)
    finally(function() r:stop() end)
    sim:fault{ endpoint = "tradebill", kind = "error", status = 400,
               code = "STATEMENT_CREATING", count = 1000 }
    assert.equal(1, r:step())
    -- WeChat still making it: no alarm yet
    assert.not_equal(1, failed())
    assert.same({}, missed(yesterday))
    -- a day later it has left the window (bill_days = 1), unreconciled
    clock.now = clock.now + 86400
    r:step()
    assert.equal(1, failed())
    local e = missed(yesterday)
    assert.equal(1, #e)
    assert.equal("reconcile.bill_missed", e[1].what)
    assert.matches('"merchant":"' .. sim.merchant.mchid .. '"', e[1].evidence)
    assert.matches('"last":"statement_creating"', e[1].evidence)
    -- recorded once; the alarm stays
    clock.now = clock.now + 120
    r:step()
    assert.equal(1, #missed(yesterday))
    assert.equal(1, failed())
    -- run again (the console's lever) with success: cleared
    sim:clear_faults()
    assert(gwr.bill_day{ wx = sim:client(), db = gw.db, dir = bill_dir,
                         date = yesterday, mchid = sim.merchant.mchid })
    assert.equal(0, failed())
    clock.now = clock.now + 120
    r:step()
    assert.equal(0, failed())
  end)

  it("a bill WeChat is still making is said once at info with the next"
     .. " try, not warned as a failure at every bill_retry; a real failure"
     .. " stays a warning", function()
    local paygate = require "paygate"
    -- (a day the cases above did not reconcile)
    local clock = { now = os.time() - 12 * 86400 }
    local yesterday = bill.bill_date(clock.now)
    local r = job({ bill_days = 1, bill_hour = 0, bill_retry = 60 }, clock)
    local lines = {}
    local info, warn = paygate.log.info, paygate.log.warn
    paygate.log.info = function(msg, fields)
      lines[#lines + 1] = "info " .. msg
    end
    paygate.log.warn = function(msg, fields)
      lines[#lines + 1] = "warn " .. msg .. " "
                          .. tostring(fields and fields.error)
    end
    finally(function()
      paygate.log.info, paygate.log.warn = info, warn
      r:stop()
    end)
    sim:fault{ endpoint = "tradebill", kind = "error", status = 400,
               code = "STATEMENT_CREATING", count = 1000 }
    local t0 = clock.now
    for _ = 1, 3 do              -- asked again every bill_retry
      assert.equal(1, r:step())
      clock.now = clock.now + 61
    end
    assert.equal(3, r.stats.waiting)
    assert.equal(0, r.stats.errors)
    assert.same({ "info gateway: bill for " .. yesterday .. " not ready"
      .. " yet, next try at " .. os.date("!%Y-%m-%d %H:%M", t0 + 60
      + 8 * 3600) .. " Beijing" }, lines)
    -- and recorded once for the console's list of runs
    local function runs()
      local out = {}
      for _, e in ipairs(audit.entries(gw.db, "reconcile_run:"
                                              .. yesterday)) do
        local ev = require("paygate.json").decode(e.evidence)
        out[#out + 1] = e.what .. " " .. ev.outcome .. " " .. ev.by
      end
      return out
    end
    assert.same({ "reconcile.bill_unreconciled not_ready job" }, runs())
    -- a real failure (WeChat refuses it) is still a warning
    sim:clear_faults()
    sim:fault{ endpoint = "tradebill", kind = "error", status = 403,
               code = "NO_AUTH", count = 1 }
    assert.equal(1, r:step())
    assert.equal(2, #lines)
    assert.matches("^warn reconcile: check failed ", lines[2])
    assert.equal(1, r.stats.errors)
    assert.same({ "reconcile.bill_unreconciled not_ready job",
                  "reconcile.bill_unreconciled failed job" }, runs())
    -- made at last: reconciled (the day owed no more, for the next case)
    clock.now = clock.now + 61
    assert.equal(1, r:step())
    assert.equal(1, #audit.entries(gw.db, "reconcile:" .. yesterday))
  end)

  it("an older day still failing keeps the alarm over a newer day's"
     .. " success", function()
    local clock = { now = os.time() }
    local older = bill.bill_date(clock.now - 2 * 86400)
    -- the window: the older days first, then yesterday; the first bill
    -- asked for (the oldest) fails
    local r = job({ bill_days = 3, bill_hour = 0, bill_retry = 60 }, clock)
    finally(function() r:stop() end)
    sim:fault{ endpoint = "tradebill", kind = "error", status = 403,
               code = "NO_AUTH", count = 1 }
    r:step()
    assert.equal(1, #audit.entries(gw.db, "reconcile:"
                                   .. bill.bill_date(clock.now - 86400)))
    assert.same({}, audit.entries(gw.db, "reconcile:" .. older))
    assert.equal(1, failed())
    -- and again: the older day fails, nothing newer runs
    sim:fault{ endpoint = "tradebill", kind = "error", status = 403,
               code = "NO_AUTH", count = 1 }
    clock.now = clock.now + 61
    assert.equal(1, r:step())
    assert.equal(1, failed())
    -- it succeeds: cleared
    clock.now = clock.now + 61
    assert.equal(1, r:step())
    assert.equal(1, #audit.entries(gw.db, "reconcile:" .. older))
    assert.equal(0, failed())
  end)
end)

-- A run cut off by the lease (another worker took it over while WeChat
-- was slow, the run's audit write fenced) or by a graceful stop (a
-- reload, a restart: its runner stopped mid-run) failed on nobody's
-- account: the day is tried again at the next round. Before, the day's
-- try was recorded before the run, so the next try waited bill_retry
-- (1800 s), whoever held the lease.
describe("gateway daily bill job: a run the lease or a stop cut off",
         function()
  local sim, gw, bill_dir, gwr
  local lease = require "paygate.lease"
  local pcore = require "paygate.core"

  setup(function()
    package.path = "examples/gateway/?.lua;" .. package.path
    gwr = require "gw.reconcile"
    sim, gw, bill_dir = start({}, nil, { enabled = false })
    os.execute("mkdir -p '" .. bill_dir .. "'")
  end)

  teardown(function() stop(gw, bill_dir) end)

  before_each(function() sim:clear_faults() end)

  local function job(clock)
    local conf = assert(gwr.check_conf({ bill_days = 1, bill_hour = 0,
                                         bill_retry = 1800 }))
    conf.bill_dir = bill_dir
    return gwr.bill_job({ db = gw.db, wx = { [sim.merchant.mchid] =
      sim:client() }, merchants = { { mchid = sim.merchant.mchid } } },
      conf, function() return clock.now end)
  end

  local function reported(date)
    return #audit.entries(gw.db, "reconcile:" .. date)
  end

  it("a run fenced by a lease handover is tried again at the next round",
     function()
    local clock = { now = os.time() - 5 * 86400 }
    local date = bill.bill_date(clock.now)
    local r, r2 = job(clock), job(clock)
    finally(function() r:stop(); r2:stop() end)
    local n
    -- WeChat holds the bill back until the lease has moved
    local h = sim:hold("tradebill")
    pcore.spawn(function() n = r:step() end)
    h:wait_held()                         -- the run waits at WeChat
    -- meanwhile the run's lease ran out (a stall) and another worker
    -- took it: the run's audit write is refused
    local ok, err = gw.db:exec("UPDATE paygate_leases SET expires_at = 0"
                               .. " WHERE name = 'reconcile:bill'")
    local other, lerr
    if ok then other, lerr = lease.acquire(gw.db, "reconcile:bill", 30) end
    h:release()
    assert(ok, err)
    assert(other, lerr)
    testing.wait_until(function() return n ~= nil end, 15, "the run's end")
    assert.equal(1, n)
    assert.equal(0, reported(date))
    assert(lease.release(gw.db, other))
    -- the next round, a minute later, by whichever runner holds the lease
    clock.now = clock.now + 61
    assert.equal(1, r2:step())
    assert.equal(1, reported(date))
  end)

  it("a run a graceful stop cut off is tried again at the next round",
     function()
    local clock = { now = os.time() - 8 * 86400 }
    local date = bill.bill_date(clock.now)
    local r, r2 = job(clock), job(clock)
    finally(function() r:stop(); r2:stop() end)
    -- WeChat holds the bill back until the run was stopped
    local h = sim:hold("tradebill")
    r:start()
    h:wait_held()                         -- the run waits at WeChat
    r:stop()                    -- paygate.on_stop, on a reload
    h:release()
    assert.equal(0, reported(date))
    -- the next generation's runner, at its first round
    clock.now = clock.now + 61
    assert.equal(1, r2:step())
    assert.equal(1, reported(date))
  end)
end)

describe("gateway reconciliation config", function()
  local sim

  setup(function() sim = testing.simulator() end)
  teardown(testing.stop_all)

  it("a bad gateway.reconcile is one line and exit 2", function()
    local cfgs = {
      { { batch = 0 }, "gateway: config.gateway.reconcile.batch: must be a"
                       .. " positive number" },
      { { bill_hour = 24 }, "gateway: config.gateway.reconcile.bill_hour:" },
      { { nope = 1 }, "gateway: config.gateway.reconcile.nope: unknown key" },
      { { enabled = "yes" }, "config.gateway.reconcile.enabled: must be true" },
      -- past the longest sleep the runtime takes: the runners refuse them
      -- at start (before: accepted here, then every worker failed to load
      -- the app with a stack trace, exit 1)
      { { interval = 1e9 }, "gateway: config.gateway.reconcile.interval:"
                            .. " must be at most 1e8" },
      { { batch = 1e9 }, "gateway: config.gateway.reconcile.batch: must be"
                         .. " at most 1e8" },
      { { lease_ttl = 1e9 }, "gateway: config.gateway.reconcile.lease_ttl:"
                             .. " must be at most 1e8" },
      -- the schedule's seconds: a next check past PostgreSQL's BIGINT
      { { ceiling = 1e19 }, "gateway: config.gateway.reconcile.ceiling:"
                            .. " must be at most 1e8" },
      { { first = 1e12 }, "gateway: config.gateway.reconcile.first:"
                          .. " must be at most 1e8" },
    }
    local server = require "paygate.testing.server"
    local dir = server.tmpdir()
    for _, c in ipairs(cfgs) do
      local conf = core.config(sim, { dir = dir, url = function()
        return "http://127.0.0.1:9" end }, { reconcile = c[1] })
      core.expect_refused(dir, conf, c[2])
    end
    server.rmdir(dir)
  end)
end)

local servers = require "spec.support.servers"

if servers.have_postgres() then
  describe("gateway reconciliation on PostgreSQL", function()
    local sim, gw, pg, bill_dir, started

    setup(function()
      pg = servers.postgres()
      -- before the gateway starts: the bill job case's day
      started = os.time()
      sim, gw, bill_dir = start({}, function() return pg.url end)
    end)

    teardown(function()
      if gw then gw:stop() end
      testing.stop_all()
      servers.stop_all()
      if bill_dir then os.execute("rm -rf '" .. bill_dir .. "'") end
    end)

    it("a payment whose notification is lost ends paid; the bill job runs",
       function()
      sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      local p = gw:create{ amount = 77 }
      sim:pay(p.out_trade_no)
      gw:wait_state(p.id, "paid", 20)
      local e = audit.entries(gw.db, "payment:" .. p.id)
      assert.equal("reconcile", e[#e].actor)
      -- yesterday when the gateway started: in the job's window (bill_days
      -- 3) at every round since, a Beijing midnight passed or not (was:
      -- yesterday when this case runs, after a midnight a day the job
      -- fetches at its next round, a minute later)
      local date = bill.bill_date(started)
      testing.wait_until(function()
        local b = audit.entries(gw.db, "reconcile:" .. date)
        return b and b[1]
      end, 20, "the bill's audit entry")
      local b = audit.entries(gw.db, "reconcile:" .. date)
      local path = b[1].evidence:match('"file":"([^"]+)"')
      os.execute("rm -rf '" .. path:match("^(.*)/[^/]+$") .. "'")
    end)

    it("an unknown payment (its prepay answer failed verification) ends"
       .. " paid by the query", function()
      sim:fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
      local res = gw:call("POST", "/v1/payments", { order_id = "unk-"
        .. require("paygate.crypto").random_nonce(8), channel = "native",
        amount = 41, description = "unverified" })
      assert.equal(502, res.status, res.body)
      local p = res.json.payment
      assert.equal("unknown", p.state)
      sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      sim:pay(p.out_trade_no)
      gw:wait_state(p.id, "paid", 20)
      local e = audit.entries(gw.db, "payment:" .. p.id)
      assert.equal("payment.succeeded", e[#e].what)
      assert.equal("unknown", e[#e].from)
      assert.equal("reconcile", e[#e].actor)
    end)

    it("the gateway's rows of a day agree with WeChat's bill; a changed"
       .. " amount shows", function()
      bill_diff(sim, gw)
    end)
  end)
end
