-- gw.reconcile: the gateway's wiring of paygate.reconcile (docs/reconcile.md).
-- app.lua calls start(ctx) in every worker; leases make one runner of each
-- kind active across workers and instances:
--
--   reconcile:payments  payments still open (created, paying, unknown) with
--                       no notification after check_after seconds, queried
--                       on a backoff; NOTPAY past expires_at closed through
--                       the close API; and attempts closed or superseded
--                       here whose close at WeChat is not confirmed
--                       (gw_attempts.close_check_at): closed there, or
--                       money taken on them applied as a late payment
--   reconcile:refunds   refunds under way (created, processing, unknown);
--                       one WeChat does not know is sent (again)
--   reconcile:bill      once a day, after bill_hour (Beijing), yesterday's
--                       trade bill per merchant diffed against gw_payments
--                       and gw_refunds: a CSV in bill_dir, a gauge, an
--                       audit entry reconcile:<date>; older days within
--                       bill_days still without one at once, whatever
--                       the hour; a day still failing, or left behind
--                       the window unreported, keeps the alarm
--                       paygate_reconcile_bill_failed up until reported
--
-- What WeChat says is applied the way a notification is: SUCCESS and every
-- refund status through gw.apply (the same dedupe by business key, amount
-- check, late-payment handling and events), the rest (still_open, closed,
-- failed) through paygate.reconcile.apply; each in one transaction checked
-- against the runner's fencing token, with the row's next check.
--
-- config.gateway.reconcile (all optional):
--   { enabled = true, check_after = 60, first = 30, factor = 2,
--     ceiling = 3600, retry = 60 (the longest wait after a check WeChat
--     did not answer, past an open breaker's cool-down: such a try is no
--     check and does not grow the wait), batch = 20, interval = 5,
--     lease_ttl = 60,
--     bill = true, bill_dir (default: "reconcile" beside an SQLite store;
--     required for the bill with PostgreSQL), bill_hour = 10,
--     bill_retry = 1800, bill_days = 3 }
local paygate = require "paygate"
local core = require "paygate.core"
local fsm = require "paygate.fsm"
local audit = require "paygate.audit"
local reconcile = require "paygate.reconcile"
local bill = require "paygate.reconcile.bill"
local json = require "paygate.json"
local civil = require "paygate.civil"
local metrics = require "paygate.metrics"
local model = require "gw.model"
local apply = require "gw.apply"
local events = require "gw.events"

local lease = require "paygate.lease"

local type, pairs, ipairs, tostring, floor = type, pairs, ipairs, tostring,
      math.floor

local _M = {}

local P, R = model.payments, model.refunds

local DEFAULTS = {
  enabled = true, check_after = 60, first = 30, factor = 2, ceiling = 3600,
  retry = 60,
  batch = 20, interval = 5, lease_ttl = 60, bill = true,
  bill_dir = "reconcile", bill_hour = 10, bill_retry = 1800, bill_days = 3,
}

local BOOL = { enabled = true, bill = true }
-- the runners' own numbers (reconcile.runner holds them to 1e8), and the
-- schedule's seconds: past 1e8 a next check time overflows PostgreSQL's
-- BIGINT, and the row, due for ever, was queried every round
local RUNNER_MAX = { batch = true, interval = true, lease_ttl = true,
                     check_after = true, first = true, ceiling = true,
                     retry = true,
                     bill_retry = true }

--- syntax: conf, err = reconcile.check_conf(t)
-- returns: the options with defaults, or nil, "gateway.reconcile.<key>:
-- <reason>"
function _M.check_conf(t)
  if t == nil then t = {} end
  if type(t) ~= "table" then
    return nil, "gateway.reconcile: must be a table"
  end
  local out = {}
  for k, v in pairs(t) do
    if DEFAULTS[k] == nil then
      return nil, "gateway.reconcile." .. tostring(k) .. ": unknown key"
                  .. require("paygate.suggest").hint(k, DEFAULTS)
    end
  end
  for k, d in pairs(DEFAULTS) do
    local v = t[k]
    if v == nil then
      v = d
    elseif BOOL[k] then
      if type(v) ~= "boolean" then
        return nil, "gateway.reconcile." .. k .. ": must be true or false"
      end
    elseif k == "bill_dir" then
      if type(v) ~= "string" or v == "" then
        return nil, "gateway.reconcile.bill_dir: must be a folder name"
      end
    elseif k == "bill_days" then
      if type(v) ~= "number" or v % 1 ~= 0 or v < 1 or v > 90 then
        return nil, "gateway.reconcile.bill_days: must be a whole number of"
                    .. " days, 1 .. 90"
      end
    elseif k == "bill_hour" then
      if type(v) ~= "number" or v % 1 ~= 0 or v < 0 or v > 23 then
        return nil, "gateway.reconcile.bill_hour: must be a whole hour,"
                    .. " 0 .. 23"
      end
    elseif type(v) ~= "number" or not (v > 0) or v == math.huge
           or (k == "factor" and v < 1) or (k == "batch" and v % 1 ~= 0) then
      return nil, "gateway.reconcile." .. k .. ": must be a positive number"
                  .. (k == "factor" and " (at least 1)" or "")
    elseif RUNNER_MAX[k] and not core.is_seconds(v) then
      -- as paygate.reconcile.runner refuses them: past the longest sleep
      -- the runtime takes (was: accepted here, and every worker then
      -- failed to load the app on the runner's error)
      return nil, "gateway.reconcile." .. k .. ": must be at most 1e8"
    end
    out[k] = v
  end
  return out
end

-- The runners' lease ttl: derived from the measured check durations
-- (p99.9 x margin, floor 10 s, ceiling lease_ttl: lease.ttl_for /
-- lease.measure).
local function lease_opts(name, conf)
  local key = "reconcile:" .. name
  local o = { floor = math.min(10, conf.lease_ttl), ceiling = conf.lease_ttl }
  return function() return (lease.ttl_for(key, o)) end,
         function(s) lease.measure(key, s) end
end

-- Rows of sql for the values of list, 200 at a time: sql is called with
-- the IN list's placeholders ("$2,$3,...": after mchid, $1) and run with
-- { mchid, values... }; each batch's rows go to each(rows). nil, err on
-- the first query that fails.
local function by_numbers(db, mchid, list, sql, each)
  for i = 1, #list, 200 do
    local ph, args = {}, { mchid }
    for j = i, math.min(#list, i + 199) do
      args[#args + 1] = list[j]
      ph[#ph + 1] = "$" .. #args
    end
    local rows, err = db:query(sql(table.concat(ph, ",")), args)
    if not rows then return nil, err end
    each(rows)
  end
  return true
end

local function warn(msg, fields)
  paygate.log.warn(msg, fields)
end

-- the row's next check, in the transaction that applied the check's
-- outcome: none once it is final, else the schedule's next. unanswered:
-- the error of a try WeChat did not answer (reconcile.unanswered: its
-- breaker open, no connection, a timeout, a 5xx, a 429), which is no
-- check: the row's checks stay as they were and it is tried again after
-- sched:retry_delay (the breaker's cool-down left, then at most
-- conf.retry s), so a long outage does not leave it waiting up to the
-- ceiling once WeChat is back. (Was: checks + 1 for every failure, a
-- refusal of the open breaker included, each one doubling the wait.)
-- A row's checks and next check time after a try: an answered one is a
-- check (checks + 1, the schedule's next); one WeChat did not answer
-- (unanswered, its error) is none (checks kept, sched:retry_delay)
local function next_check(sched, checks, unanswered)
  if unanswered then
    return checks, core.time() + sched:retry_delay(checks + 1, unanswered)
  end
  return checks + 1, sched:next(core.time(), checks + 1)
end

local function schedule_sql(tbl, open, sched)
  return function(tx, id, stop, unanswered)
    local rows, err = tx:query("SELECT state, checks FROM " .. tbl
                               .. " WHERE id = $1", { id })
    if not rows then return nil, err end
    local row = rows[1]
    if not row then return true end
    local checks, at = next_check(sched, tonumber(row.checks) or 0,
                                  unanswered)
    local next_at
    if open[row.state] and not stop then next_at = floor(at) + 1 end
    return tx:exec("UPDATE " .. tbl .. " SET checks = $2, next_check_at = $3"
                   .. " WHERE id = $1", { id, checks, next_at or core.null })
  end
end

-- What is due: open rows whose next check has come, and open rows never
-- checked, created check_after s ago or more; the first `limit` of both
-- by due time. Two queries, each a range scan of its partial index
-- (migration 006: their WHERE clauses are the indexes' own): one query
-- with an OR and ORDER BY COALESCE(...) read every open row to sort them.
-- SQLite is told the index (without statistics it would rather scan the
-- open rows by state); PostgreSQL's planner has statistics. On SQLite the
-- open states are ORs, as its indexes have them (migration 009: an IN list
-- there cost every state change a temporary table).
local function due_sqls(engine)
  local function from(tbl, alias, index)
    return " FROM " .. tbl .. " " .. alias
      .. (engine == "sqlite" and (" INDEXED BY " .. index) or "")
  end
  local pay_open, ref_open
  if engine == "sqlite" then
    pay_open = " (p.state = 'created' OR p.state = 'paying'"
      .. " OR p.state = 'unknown')"
    ref_open = " (r.state = 'created' OR r.state = 'processing'"
      .. " OR r.state = 'unknown' OR r.state = 'abnormal')"
  else
    pay_open = " p.state IN ('created', 'paying', 'unknown')"
    ref_open = " r.state IN ('created', 'processing', 'unknown',"
      .. " 'abnormal')"
  end
  local ref = "SELECT r.*, p.mchid AS mchid, p.sub_mchid AS sub_mchid"
  local join = " JOIN gw_payments p ON p.id = r.payment_id WHERE"
  return {
    pay = {
      "SELECT p.*" .. from("gw_payments", "p", "gw_payments_due")
        .. " WHERE p.next_check_at <= $1 AND p.next_check_at IS NOT NULL"
        .. " AND" .. pay_open .. " ORDER BY p.next_check_at LIMIT $2",
      "SELECT p.*" .. from("gw_payments", "p", "gw_payments_unchecked")
        .. " WHERE p.next_check_at IS NULL AND p.checks = 0 AND" .. pay_open
        .. " AND p.created_at <= $1 ORDER BY p.created_at LIMIT $2",
    },
    ref = {
      ref .. from("gw_refunds", "r", "gw_refunds_due") .. join
        .. " r.next_check_at <= $1 AND r.next_check_at IS NOT NULL AND"
        .. ref_open .. " ORDER BY r.next_check_at LIMIT $2",
      ref .. from("gw_refunds", "r", "gw_refunds_unchecked") .. join
        .. " r.next_check_at IS NULL AND r.checks = 0 AND" .. ref_open
        .. " AND r.created_at <= $1 ORDER BY r.created_at LIMIT $2",
    },
  }
end
local DUE = { sqlite = due_sqls("sqlite"), postgres = due_sqls("postgres") }
-- (for the specs: EXPLAIN shows each one an index range scan)
_M.DUE_SQL = DUE

local function due_at(row)
  return tonumber(row.next_check_at) or tonumber(row.created_at) or 0
end

local function by_due(a, b) return due_at(a) < due_at(b) end

-- A due query leaving out the merchants in held (the runner's groups
-- held: their query's breaker is open): "AND p.mchid NOT IN ($3, ...)"
-- before its ORDER BY; the query and its params (none held: as it is).
-- The rows held are still read past in the index, not written.
local excluded = {}             -- sql -> { [n] = that sql excluding n }

local function excluding(sql, params, held)
  local n = held and #held or 0
  if n == 0 then return sql, params end
  local by = excluded[sql]
  if not by then by = {}; excluded[sql] = by end
  local q = by[n]
  if not q then
    local marks = {}
    for i = 1, n do marks[i] = "$" .. (#params + i) end
    local at = assert(sql:find(" ORDER BY ", 1, true))
    q = sql:sub(1, at - 1) .. " AND p.mchid NOT IN ("
        .. table.concat(marks, ", ") .. ")" .. sql:sub(at)
    if n <= 16 then by[n] = q end
  end
  local all = {}
  for i = 1, #params do all[i] = params[i] end
  for i = 1, n do all[#params + i] = held[i] end
  return q, all
end

local function due_rows(db, sqls, now, check_after, limit, held)
  local rows, err = db:query(excluding(sqls[1], { now, limit }, held))
  if not rows then return nil, err end
  local fresh
  fresh, err = db:query(excluding(sqls[2], { now - check_after, limit },
                                  held))
  if not fresh then return nil, err end
  if fresh[1] == nil then return rows end
  for _, r in ipairs(fresh) do rows[#rows + 1] = r end
  table.sort(rows, by_due)
  for i = #rows, limit + 1, -1 do rows[i] = nil end
  return rows
end

------------------------------------------------------------- payments

-- The WeChat Pay client of a checked row (a payment, or a refund joined
-- with its payment's mchid), or nil, err: calls to WeChat are switched
-- off. (A row whose merchant is not configured is skipped before: skip.)
local function client_for(ctx, row)
  if ctx.degraded and ctx.degraded() then
    return nil, paygate.error("degraded", "WeChat calls are switched off")
  end
  return ctx.wx[row.mchid]
end

-- A row whose merchant was taken out of config.merchants (and the
-- gateway reloaded): nothing can be asked. Its check is skipped, its next
-- one moved on its backoff by resched(tx) under the runner's fence (left
-- due, such rows would fill every batch ahead of the others), and a
-- warning logged once per merchant per SKIP_WARN_EVERY s in this worker.
-- Was: a failed check per row per round, each logged ("reconcile: check
-- failed ... unknown_merchant") and counted as an error. They are counted
-- on paygate_gateway_merchant_not_configured_total{merchant} instead.
-- returns: true once skipped (the check's outcome), nil when the row's
-- merchant is configured.
local SKIP_WARN_EVERY = 600
local skip_warned = {}            -- mchid -> when last warned (monotonic)

local function skip(ctx, what, row, rctx, resched)
  local err = ctx.payments.merchant_not_configured(row, what)
  if not err then return nil end
  local mchid = tostring(row.mchid)
  local now = core.mono()
  if not skip_warned[mchid] or now - skip_warned[mchid] >= SKIP_WARN_EVERY
  then
    skip_warned[mchid] = now
    warn("gateway: reconcile skips the payments and refunds of a merchant"
      .. " no longer configured (until it is in config.merchants again;"
      .. " said once per " .. SKIP_WARN_EVERY .. " s)", { mchid = mchid,
      [what] = row.id, error = err.message })
  end
  local ok, serr = ctx.db:transaction(function(tx)
    local f, ferr = rctx.fence(tx)
    if not f then return nil, ferr end
    return resched(tx)
  end)
  if not ok then return nil, serr end
  return true
end

-- The runner's reschedule of a row whose check failed: its next check
-- (soon, and not counted, when WeChat did not answer: schedule_sql).
local function rescheduler(db, resched, what)
  return function(row, err)
    local unanswered = reconcile.unanswered(err) and err or nil
    local ok, serr = db:transaction(function(tx)
      return resched(tx, row.id, false, unanswered)
    end)
    if not ok then
      warn("gateway: reconcile reschedule failed", { [what] = row.id,
           error = tostring(serr) })
    end
  end
end

local OPEN_PAY = { created = true, paying = true, unknown = true }
-- (abnormal too: the outcome of an application through the abnormal-refund
-- API must land even if its notification is lost)
local OPEN_REF = { created = true, processing = true, unknown = true,
                   abnormal = true }

-- Applies a query's answer that WeChat took the money (SUCCESS, REFUND)
-- as a notification would (dedupe, amount, late payment, events), under
-- the runner's fence; resched(tx, outcome) ends or moves the row's checks
-- in the same transaction. The work after the commit (a late payment's
-- refund, closes) is started then. at: WeChat's clock at its answer
-- (reconcile.answered_at), or nil.
local function apply_paid(ctx, rctx, txn, resched, at)
  local after
  local ok, err = fsm.retry(ctx.db, function(tx)
    local f, ferr = rctx.fence(tx)
    if not f then return nil, ferr end
    local outcome, list = apply.payment(ctx, tx, {
      resource = txn, source = "query", via = "reconcile",
      actor = "reconcile", answered_at = at })
    if not outcome then return nil, list end
    after = list
    return resched(tx, outcome)
  end)
  if not ok then return nil, err end
  if after and ctx.payments and ctx.payments.after then
    ctx.payments.after(after)
  end
  return true
end

-- An attempt closed or superseded here whose close WeChat has not
-- confirmed (gw_attempts.close_check_at): its next check on the schedule,
-- or none once confirmed (done); unanswered: as schedule_sql's (soon, not
-- counted).
local function attempt_resched(sched)
  return function(tx, no, done, unanswered)
    if done then return model.close_confirmed(tx, no) end
    local rows, err = tx:query("SELECT close_checks FROM gw_attempts WHERE"
                               .. " out_trade_no = $1", { no })
    if not rows then return nil, err end
    if not rows[1] then return true end
    local checks, next_at = next_check(sched,
                                       tonumber(rows[1].close_checks) or 0,
                                       unanswered)
    return tx:exec("UPDATE gw_attempts SET close_checks = $2, close_check_at"
      .. " = $3 WHERE out_trade_no = $1 AND close_check_at IS NOT NULL",
      { no, checks, floor(next_at) + 1 })
  end
end

-- A check refused before anything was sent (the endpoint's circuit
-- breaker open, the degradation switch turned on meanwhile) is no
-- failure of the check: the breaker said once that it opened, and a
-- warning per row refused would fill the log during an outage. It is
-- the runner's "not done yet" (false, err: counted as waiting, not
-- logged), rescheduled as a try WeChat did not answer.
local NOT_SENT = { circuit_open = true, degraded = true }

local function not_sent(res, err)
  if res == nil and type(err) == "table" and NOT_SENT[err.kind] then
    return false, err
  end
  return res, err
end

-- a runner's check(row, rctx), its refusals made "not done yet"
local function checked(check)
  return function(row, rctx) return not_sent(check(row, rctx)) end
end

-- The runners' group of a row: its merchant, whose client (and so whose
-- breakers) its checks use (nil: no call to WeChat, see the attempt
-- marks below).
local function merchant_of(row)
  if row.gw_check == "attempt" and row.attempt_state == "open" then
    return nil
  end
  local m = model.opt(row.mchid)
  return m ~= nil and tostring(m) or nil
end

-- The runners' hold: a check the open breaker refused at the row's query
-- (each runner's first call for a row, and its only GET: a close or a
-- refund sent again is a POST, met only after a query's answer) holds
-- the row's merchant for the breaker's cool-down left (err.retry_after,
-- at most conf.retry): the row is left due, untouched, the merchant's
-- other rows are not asked (nor read by due) meanwhile, and the first
-- one due after it is the breaker's probe. Was: each refused row
-- rescheduled, one write each, every open row of the merchant about
-- once per cool-down for the whole outage, with nothing sent.
local function hold_for(conf)
  return function(_, err)
    if type(err) ~= "table" or err.kind ~= "circuit_open"
       or type(err.endpoint) ~= "string"
       or err.endpoint:sub(1, 4) ~= "GET " then
      return nil
    end
    local wait = tonumber(err.retry_after) or 1
    return math.min(math.max(wait, 0), conf.retry)
  end
end

-- The check of such an attempt: asks WeChat about it. Paid (SUCCESS,
-- REFUND): applied as a notification would be (a late payment: refunded
-- or an alarm, by on_late_payment); closed (CLOSED, REVOKED) or never
-- made (ORDER_NOT_EXIST, asked once its prepay is over): done; else
-- closed at WeChat now (ORDER_PAID: paid in between, asked again and
-- applied at once). A failed call is rescheduled on the backoff.
local function check_attempt(ctx, wx, row, rctx, resched)
  local db = ctx.db
  local no, sub = row.out_trade_no, model.opt(row.sub_mchid)
  if row.attempt_state == "open" then
    -- marked by a switch (POST attempts) whose request ended without
    -- recording it or unmarking it (a crash, the store): the attempt is
    -- still the payment's, and its own checks apply what WeChat says.
    -- Only a mark still due: read due, it may have been replaced since by
    -- a new switch's (due once that request is over), which a CLOSED read
    -- before that switch is recorded needs (model.switching)
    return db:transaction(function(tx)
      local f, ferr = rctx.fence(tx)
      if not f then return nil, ferr end
      return model.unmark_switch(tx, no, model.now())
    end)
  end
  local txn, err = wx:query_by_out_trade_no(no, sub)
  if not txn and err.kind ~= "not_found" then return nil, err end
  local ts = txn and txn.trade_state
  if ts == "SUCCESS" or ts == "REFUND" then
    -- applied (or a duplicate of what a notification applied, or an
    -- amount mismatch raised as an alarm): nothing left to ask
    return apply_paid(ctx, rctx, txn, function(tx)
      return resched(tx, no, true)
    end, reconcile.answered_at(err))
  end
  if txn and ts ~= "CLOSED" and ts ~= "REVOKED" then
    local ok, cerr = wx:close(no, sub)
    if not ok and cerr.kind == "order_paid" then
      -- paid in between: asked again now and applied in this check (an
      -- answer not yet paid leaves it to the next check)
      local again, ameta = wx:query_by_out_trade_no(no, sub)
      if again and (again.trade_state == "SUCCESS"
                    or again.trade_state == "REFUND") then
        return apply_paid(ctx, rctx, again, function(tx)
          return resched(tx, no, true)
        end, reconcile.answered_at(ameta))
      end
      return nil, cerr
    end
    if not ok and cerr.kind ~= "not_found" then return nil, cerr end
    paygate.log.info("gateway: closed at WeChat an attempt closed here",
                     { out_trade_no = no, trade_state = ts })
  end
  return db:transaction(function(tx)
    local f, ferr = rctx.fence(tx)
    if not f then return nil, ferr end
    return resched(tx, no, true)
  end)
end

-- what WeChat says of an attempt that closes its payment
local CLOSING = { CLOSED = true, REVOKED = true, ORDER_NOT_EXIST = true }

local function payment_checks(ctx, conf, sched)
  local db = ctx.db
  local resched = schedule_sql("gw_payments", OPEN_PAY, sched)
  local aresched = attempt_resched(sched)
  local ttl, measure = lease_opts("payments", conf)
  return reconcile.runner(db, {
    name = "payments", batch = conf.batch, interval = conf.interval,
    lease_ttl = ttl, measure = measure,
    group = merchant_of, hold = hold_for(conf),
    due = function(now, limit, held)
      if ctx.degraded and ctx.degraded() then return {} end
      now = floor(now)
      local rows, err = due_rows(db, DUE[db.engine].pay, now,
                                 conf.check_after, limit, held)
      if not rows or #rows >= limit then return rows, err end
      -- and the attempts closed here that WeChat may still take money on
      -- (a held merchant's left out, its open marks too, which ask
      -- nothing: they wait for the hold's few seconds)
      local arows
      arows, err = db:query(excluding("SELECT a.out_trade_no AS"
        .. " out_trade_no, a.payment_id AS id, p.mchid AS mchid,"
        .. " p.sub_mchid AS sub_mchid, a.state AS attempt_state,"
        .. " 'attempt' AS gw_check FROM gw_attempts"
        .. " a JOIN gw_payments p ON p.id = a.payment_id WHERE"
        .. " a.close_check_at <= $1 AND a.state IN ('open', 'closed',"
        .. " 'superseded') ORDER BY a.close_check_at LIMIT $2",
        { now, limit - #rows }, held))
      if not arows then return nil, err end
      for _, a in ipairs(arows) do rows[#rows + 1] = a end
      return rows
    end,
    check = checked(function(row, rctx)
      if row.gw_check == "attempt" and row.attempt_state == "open" then
        -- a switch's mark left by a request that died: dropped here, with
        -- no call to WeChat, whether its merchant is configured or not.
        -- Was: skipped with the merchant's other rows, the mark pushed on
        -- its backoff for as long as the merchant stayed out of
        -- config.merchants, and a CLOSED for the attempt taken for the
        -- switch's close (model.switching) once it was configured again
        return check_attempt(ctx, nil, row, rctx, aresched)
      end
      local skipped, serr = skip(ctx, "payment", row, rctx, function(tx)
        if row.gw_check == "attempt" then
          return aresched(tx, row.out_trade_no)
        end
        return resched(tx, row.id)
      end)
      if skipped ~= nil or serr then return skipped, serr end
      local wx, werr = client_for(ctx, row)
      if not wx then return nil, werr end
      if row.gw_check == "attempt" then
        return check_attempt(ctx, wx, row, rctx, aresched)
      end
      local action, err = reconcile.check_payment(wx, {
        id = row.id, state = row.state, out_trade_no = row.out_trade_no,
        sub_mchid = model.opt(row.sub_mchid), expires_at = row.expires_at })
      if not action then return nil, err end
      if action.remote == "SUCCESS" or action.remote == "REFUND" then
        -- an amount mismatch was raised (audit, event, gauge) and the
        -- payment left as it is: asking again would only repeat it
        return apply_paid(ctx, rctx, action.transaction,
                          function(tx, outcome)
          return resched(tx, row.id, outcome == "alarm")
        end, action.answered_at)
      end
      return reconcile.apply(db, P, action, {
        -- (and the attempt asked about locked before the payment is read:
        -- a switch committed between that read and the transition, which
        -- its unchanged version does not catch, would otherwise have the
        -- answer about the old attempt close or fail the payment on its
        -- new one: model.lock_attempt)
        fence = function(tx)
          local ok, ferr = rctx.fence(tx)
          if not ok then return nil, ferr end
          return model.lock_attempt(tx, row.out_trade_no)
        end,
        current = function(prow, a, tx)
          if prow.out_trade_no ~= a.out_trade_no then return false end
          -- a CLOSED made by a switch's own close, the switch not yet
          -- recorded: not the payment's end (model.switching)
          if CLOSING[a.remote] then
            return not model.switching(tx, a.out_trade_no)
          end
          return true
        end,
        set = function() return { updated_at = model.now() } end,
        within = function(tx, a, res)
          if res and res.to == "paying" then
            -- unknown -> paying (still_open): its event too
            return events.emit(tx, "payment.paying", res.row)
          end
          if not res or (res.to ~= "closed" and res.to ~= "failed") then
            return true
          end
          -- WeChat closed the attempt asked about (CLOSED, closed by the
          -- check, or not made and expired); PAYERROR: still to close
          local confirmed = res.to == "closed" and a.out_trade_no or nil
          local x, xerr = model.close_attempts(ctx, tx, res.row, model.now(),
                                               confirmed)
          if not x then return nil, xerr end
          return events.emit(tx, "payment." .. res.to, res.row)
        end,
        schedule = function(tx, a) return resched(tx, a.id) end,
      })
    end),
    reschedule = function(row, err)
      if row.gw_check == "attempt" then
        local unanswered = reconcile.unanswered(err) and err or nil
        local ok, serr = db:transaction(function(tx)
          return aresched(tx, row.out_trade_no, false, unanswered)
        end)
        if not ok then
          warn("gateway: reconcile reschedule failed", {
               out_trade_no = row.out_trade_no, error = tostring(serr) })
        end
        return
      end
      return rescheduler(db, resched, "payment")(row, err)
    end,
  })
end

-------------------------------------------------------------- refunds

local function refund_checks(ctx, conf, sched)
  local db = ctx.db
  local resched = schedule_sql("gw_refunds", OPEN_REF, sched)
  local ttl, measure = lease_opts("refunds", conf)
  return reconcile.runner(db, {
    name = "refunds", batch = conf.batch, interval = conf.interval,
    lease_ttl = ttl, measure = measure,
    group = merchant_of, hold = hold_for(conf),
    due = function(now, limit, held)
      if ctx.degraded and ctx.degraded() then return {} end
      return due_rows(db, DUE[db.engine].ref, floor(now), conf.check_after,
                      limit, held)
    end,
    check = checked(function(row, rctx)
      local skipped, serr = skip(ctx, "refund", row, rctx, function(tx)
        return resched(tx, row.id)
      end)
      if skipped ~= nil or serr then return skipped, serr end
      local wx, werr = client_for(ctx, row)
      if not wx then return nil, werr end
      local action, err = reconcile.check_refund(wx, {
        id = row.id, state = row.state, out_refund_no = row.out_refund_no,
        sub_mchid = model.opt(row.sub_mchid) })
      if not action and err.kind == "not_found" and ctx.refunds
         and (row.state == "created" or row.state == "unknown") then
        -- never reached WeChat: the process that committed it died before
        -- the call (a late payment's automatic refund, a merchant refund),
        -- or the call was lost on the way. Sent now: WeChat makes one
        -- refund per out_refund_no however often it is asked.
        paygate.log.warn("gateway: refund unknown to WeChat: sending it",
                         { refund = row.id, state = row.state })
        local res, serr = ctx.refunds.send(row.id, function(tx)
          local f, ferr = rctx.fence(tx)
          if not f then return nil, ferr end
          return resched(tx, row.id)
        end, "reconcile")
        if not res then return nil, serr end
        return true
      end
      if not action then return nil, err end
      -- (an ABNORMAL applied is logged by apply.refund_status, with the
      -- refund_id the abnormal-refund API needs)
      return fsm.retry(db, function(tx)
        local f, ferr = rctx.fence(tx)
        if not f then return nil, ferr end
        local rf, rerr = model.refund(tx, row.id)
        if not rf then return nil, rerr end
        local amount = type(action.refund.amount) == "table"
                       and action.refund.amount.refund or nil
        local outcome, aerr = apply.refund_status(ctx, tx, rf, {
          status = action.remote, refund_id = action.refund.refund_id,
          amount = amount, success_time = action.refund.success_time,
          source = "query", via = "reconcile", actor = "reconcile",
          answered_at = action.answered_at })
        if not outcome then return nil, aerr end
        -- an amount mismatch was raised (audit, event, gauge) and the
        -- refund left as it is: asking again would only repeat it
        return resched(tx, row.id, outcome == "alarm")
      end)
    end),
    reschedule = rescheduler(db, resched, "refund"),
  })
end

----------------------------------------------------------------- bill

local PAID = { paid = true, partially_refunded = true, refunded = true }

-- How long after WeChat's success_time this gateway may record it: a
-- lost notification is caught up by the checks (within their ceiling) or
-- by WeChat's retries (24 h 4 min).
local RECORDED_WITHIN = 25 * 3600
-- and how far this host's clock may be behind WeChat's: an entry recorded
-- at 23:59:58 here for a success_time of 00:00:01 is the next day's
local CLOCK_SKEW = 3600

-- Whether the audit entry (at: epoch ms, evidence: JSON) is of the
-- Beijing day [from, to): by WeChat's success_time in its evidence, else
-- (an entry without one) by when it was recorded.
local function of_day(at, evidence, from, to)
  local t = type(evidence) == "string"
            and evidence:match('"success_time":"([^"]+)"')
  t = t and civil.epoch(t)
  if not t then t = (tonumber(at) or 0) / 1000 end
  return t >= from and t < to
end

--- syntax: rows, err = reconcile.local_rows(db, mchid, date, numbers[,
--   refund_numbers])
-- The gateway's side of a day's bill for merchant mchid: payments whose
-- money WeChat took that Beijing day (their `payment.succeeded` audit
-- entries, placed by WeChat's success_time), the attempts the bill names
-- whatever their day, the refunds that succeeded that day, and the
-- refunds the bill names (refund_numbers) whatever their state.
function _M.local_rows(db, mchid, date, numbers, refund_numbers)
  local from = bill.day_start(date)
  local to = from + 86400
  local out, seen = {}, {}
  -- (each once, by bill.key: a service provider's sub-merchants may use
  -- one number, and the bill is matched by merchant and number)
  local function add_payment(no, amount, state, sub)
    local key = bill.key(model.opt(sub), no)
    if seen[key] then return end
    seen[key] = true
    out[#out + 1] = { out_trade_no = no, amount = amount, state = state,
                      sub_mchid = model.opt(sub) }
  end
  -- what was paid that day (the audit trail is kept: evidence), recorded
  -- then or up to RECORDED_WITHIN later
  local rows, err = db:query("SELECT p.*, a.at AS gw_at, a.evidence AS"
    .. " gw_evidence FROM paygate_audit a JOIN gw_payments p ON a.subject ="
    .. " 'payment:' || p.id WHERE a.what = 'payment.succeeded' AND a.at >="
    .. " $1 AND a.at < $2 AND p.mchid = $3",
    { (from - CLOCK_SKEW) * 1000, (to + RECORDED_WITHIN) * 1000, mchid })
  if not rows then return nil, err end
  for _, p in ipairs(rows) do
    if of_day(p.gw_at, p.gw_evidence, from, to) then
      add_payment(model.opt(p.paid_out_trade_no) or p.out_trade_no,
                  p.amount, PAID[p.state] and "paid" or p.state, p.sub_mchid)
    end
  end
  -- the attempts the bill names (paid on another day here, or not at all)
  local aok, aerr = by_numbers(db, mchid, numbers, function(ph)
    return "SELECT a.out_trade_no AS attempt_no,"
      .. " a.state AS attempt_state, p.amount AS amount,"
      .. " p.sub_mchid AS sub_mchid"
      .. " FROM gw_attempts a JOIN gw_payments p ON p.id = a.payment_id"
      .. " WHERE p.mchid = $1 AND a.out_trade_no IN (" .. ph .. ")"
  end, function(arows)
    for _, p in ipairs(arows) do
      -- an attempt holds money when it is paid (a late or duplicate
      -- payment on it too: refunded separately)
      add_payment(p.attempt_no, p.amount, p.attempt_state == "paid"
                  and "paid" or "attempt_" .. tostring(p.attempt_state),
                  p.sub_mchid)
    end
  end)
  if not aok then return nil, aerr end
  -- refunds that succeeded that day (their audit entries are in their own
  -- chain refund:<id>)
  local rrows, rerr = db:query("SELECT r.out_trade_no, r.out_refund_no,"
    .. " r.amount, r.state, p.sub_mchid AS sub_mchid, a.at AS gw_at,"
    .. " a.evidence AS gw_evidence FROM"
    .. " paygate_audit a JOIN gw_refunds r ON a.subject = 'refund:' || r.id"
    .. " JOIN gw_payments p ON p.id = r.payment_id WHERE a.what ="
    .. " 'refund.succeeded' AND a.at >= $1 AND a.at < $2 AND p.mchid = $3",
    { (from - CLOCK_SKEW) * 1000, (to + RECORDED_WITHIN) * 1000, mchid })
  if not rrows then return nil, rerr end
  local rseen = {}
  local function add_refund(r)
    local key = bill.key(model.opt(r.sub_mchid), r.out_refund_no)
    if rseen[key] then return end
    rseen[key] = true
    out[#out + 1] = { out_trade_no = r.out_trade_no,
                      out_refund_no = r.out_refund_no, amount = r.amount,
                      state = r.state, sub_mchid = model.opt(r.sub_mchid) }
  end
  for _, r in ipairs(rrows) do
    if of_day(r.gw_at, r.gw_evidence, from, to) then add_refund(r) end
  end
  -- the refunds the bill names (settled on another day here, or not yet:
  -- a lost notification): a state mismatch, not one "missing" here
  refund_numbers = refund_numbers or {}
  local fok, ferr = by_numbers(db, mchid, refund_numbers, function(ph)
    return "SELECT r.out_trade_no, r.out_refund_no,"
      .. " r.amount, r.state, p.sub_mchid AS sub_mchid FROM gw_refunds r"
      .. " JOIN gw_payments p ON p.id ="
      .. " r.payment_id WHERE p.mchid = $1 AND r.out_refund_no IN (" .. ph
      .. ")"
  end, function(frows)
    for _, r in ipairs(frows) do add_refund(r) end
  end)
  if not fok then return nil, ferr end
  return out
end

local function beijing_hour(t)
  return floor(((t + 8 * 3600) % 86400) / 3600)
end

-- t (epoch s) as an operator reads it: "2026-03-02 10:30 Beijing"
local function beijing_time(t)
  return os.date("!%Y-%m-%d %H:%M", floor(t) + 8 * 3600) .. " Beijing"
end

--- syntax: dates = reconcile.bill_dates(now, conf)
-- The days whose bill the job may fetch at now (epoch s), oldest first:
-- the conf.bill_days - 1 days before yesterday (Beijing), whatever the
-- hour -- their bills were made long ago, and they are pending only when
-- the gateway was down when their turn came, so they are not held back
-- another morning -- and yesterday's, once it is conf.bill_hour in
-- Beijing (WeChat makes a day's bill during the next morning: asked
-- earlier, it says STATEMENT_CREATING).
function _M.bill_dates(now, conf)
  local dates = {}
  for back = conf.bill_days - 1, 0, -1 do
    if back > 0 or beijing_hour(now) >= conf.bill_hour then
      dates[#dates + 1] = bill.bill_date(now - back * 86400)
    end
  end
  return dates
end

-- WeChat makes a day's bill during the next morning (Beijing), by about
-- 10:00, and advises asking from then on, every half hour, until the bill
-- is there (or NO_STATEMENT_EXIST: no trade that day)
local BILL_READY_HOUR, ASK_EVERY = 10, 1800

--- syntax: text = reconcile.not_ready_advice(date, now, conf[, last])
-- What an operator is told when WeChat answered STATEMENT_CREATING for
-- date's bill at now (epoch s): not a failure, the bill is not made yet;
-- when WeChat says to ask again, and when the daily job (conf:
-- reconcile.conf, or nil) asks next by its own config (bill_hour,
-- bill_retry), or that it does not. last: when the job last asked for
-- that merchant's bill (epoch s, reconcile.last_asked), nil if unknown.
-- The console's run says it.
function _M.not_ready_advice(date, now, conf, last)
  local ready = bill.day_start(date) + 86400 + BILL_READY_HOUR * 3600
  local when
  if now < ready then
    when = ("try again after %02d:00 Beijing on %s"):format(BILL_READY_HOUR,
      bill.bill_date(ready + 86400))
  else
    when = ("try again in %d minutes (WeChat advises asking every %d"
      .. " minutes until the bill is there)"):format(ASK_EVERY / 60,
      ASK_EVERY / 60)
  end
  local job
  if not (conf and conf.enabled and conf.bill) then
    job = "the daily bill job is off here, so nothing asks for it by itself"
  elseif date < bill.bill_date(now - (conf.bill_days - 1) * 86400) then
    job = ("the daily bill job does not ask for it (older than its %d"
      .. " days, bill_days)"):format(conf.bill_days)
  else
    local every = (", then every %d s (bill_retry) until WeChat has made"
      .. " it"):format(conf.bill_retry)
    local due = false
    for _, d in ipairs(_M.bill_dates(now, conf)) do
      if d == date then due = true end
    end
    if not due then
      -- (yesterday's before bill_hour, or today's: from bill_hour on the
      -- day after it)
      job = ("the daily bill job asks for it by itself at %02d:00 Beijing"
        .. " on %s (bill_hour)"):format(conf.bill_hour,
        bill.bill_date(bill.day_start(date) + 86400 + 86400)) .. every
    elseif last and last + conf.bill_retry > now then
      job = "the daily bill job asks for it by itself next at "
        .. beijing_time(last + conf.bill_retry) .. every
    else
      job = ("the daily bill job asks for it by itself at its next round"
        .. " (within %d s)"):format(math.min(60, conf.bill_retry)) .. every
    end
  end
  return "WeChat is still making the bill of " .. date
    .. " (STATEMENT_CREATING): " .. when .. "; " .. job
end

-- The days whose bill the job owes a merchant: tried by it and not
-- reported yet, each with what its last run said (an error kind;
-- statement_creating: WeChat still making the bill). In the instance's
-- shared dict, for every worker (the console's run may come to any, and
-- settles a day it reports); this worker's own memory without one. A day
-- that leaves the window (bill_days) still owed is recorded in the store
-- instead: an audit entry reconcile_missed:<date>.
local owed_here = {}

local function dict() return require("paygate.shared").get_dict("paygate") end

--- syntax: t = reconcile.last_asked(date, mchid)
-- When the bill job last asked WeChat for mchid's bill of date (epoch s),
-- from the instance's shared dictionary (kept bill_retry + 60 s); nil
-- when it did not lately, or without a dictionary.
function _M.last_asked(date, mchid)
  local d = dict()
  return d and tonumber(d:get("gw:bill_tried:" .. date .. "|" .. mchid))
end

local function owed_get(mchid)
  local d = dict()
  if not d then return owed_here[mchid] or {} end
  local t = json.decode(d:get("gw:bill_owed:" .. mchid) or "")
  return type(t) == "table" and t or {}
end

-- kind: what the day's last run said; nil: the day is no longer owed
local function owe(mchid, date, kind)
  local d = dict()
  -- the list is read, changed and written back: under a lock in the
  -- dict, as the job (one worker) and a console run (any) may both
  -- change it at once and one change would be lost (1 s at most: a
  -- holder that died frees it by its ttl)
  local lock = "gw:bill_owed_lock:" .. mchid
  local locked = false
  if d then
    for _ = 1, 200 do
      if d:add(lock, true, 1) then locked = true break end
      core.sleep(0.005)
    end
  end
  local t = owed_get(mchid)
  t[date] = kind
  if not d then
    owed_here[mchid] = t
  elseif next(t) == nil then
    d:delete("gw:bill_owed:" .. mchid)
  else
    d:set("gw:bill_owed:" .. mchid, json.encode(t))
  end
  if locked then d:delete(lock) end
end

-- The merchants whose bill of date is reported (its reconcile.bill
-- entry exists), as a set; nil, err
local function reported(db, date)
  local rows, err = db:query("SELECT evidence FROM paygate_audit WHERE"
    .. " subject = $1 AND what = 'reconcile.bill'", { "reconcile:" .. date })
  if not rows then return nil, err end
  local set = {}
  for _, r in ipairs(rows) do
    local ev = json.decode(tostring(r.evidence))
    if type(ev) == "table" and type(ev.merchant) == "string" then
      set[ev.merchant] = true
    end
  end
  return set
end

-- how far back a day left unreconciled keeps the alarm up (days)
local MISSED_DAYS = 400

-- The days that left the window unreported for mchid (their
-- reconcile_missed entries, of the last MISSED_DAYS days) and still are:
-- a sorted list, or nil, err. Read by the subject's range (the audit
-- table's primary key).
local function missed_days(db, mchid, now)
  local rows, err = db:query("SELECT evidence FROM paygate_audit WHERE"
    .. " subject >= $1 AND subject < $2 AND what = 'reconcile.bill_missed'",
    { "reconcile_missed:" .. bill.bill_date(now - MISSED_DAYS * 86400),
      "reconcile_missed;" })
  if not rows then return nil, err end
  local open, days = {}, {}
  for _, r in ipairs(rows) do
    local ev = json.decode(tostring(r.evidence))
    local date = type(ev) == "table" and ev.merchant == mchid and ev.date
    if type(date) == "string" and open[date] == nil then
      local set, rerr = reported(db, date)
      if not set then return nil, rerr end
      open[date] = not set[mchid]
      if open[date] then days[#days + 1] = date end
    end
  end
  table.sort(days)
  return days
end

local failing

local function set_failed(mchid, v)
  if failing == nil then
    -- 1 while a day owed is failing or was left unreconciled (not a bill
    -- still being made): /metrics shows it, where the mismatch gauge
    -- keeps the last good day's counts
    failing = metrics.gauge("paygate_reconcile_bill_failed",
      "1 while a merchant's bill of a day is failing or left unreconciled"
      .. " (the log says which), 0 once every such day succeeded.")
  end
  failing:set(v, { merchant = mchid })
  local d = dict()
  if d then d:set("gw:bill_failed:" .. mchid, v) end
end

-- Sets paygate_reconcile_bill_failed{merchant} from the days owed: 1
-- while one's last run failed (WeChat still making the bill is not a
-- failure) or one left the window unreported, else 0. A store that
-- cannot be read leaves it as it is.
local function refresh(db, mchid, now)
  for _, kind in pairs(owed_get(mchid)) do
    if kind ~= "statement_creating" then return set_failed(mchid, 1) end
  end
  local days, err = missed_days(db, mchid, now or core.time())
  if not days then
    warn("gateway: the bill days left unreconciled cannot be read",
         { mchid = mchid, error = tostring(err) })
    return
  end
  set_failed(mchid, days[1] and 1 or 0)
end

-- the kinds of a bill run the lease cut off (fenced: its write refused
-- for a newer holder; lost, held: a renewal found the lease gone)
local CUT_OFF = { fenced = true, lost = true, held = true }

local function bill_job(ctx, conf, clock)
  clock = clock or core.time
  local db = ctx.db
  -- date|mchid -> when last tried, in the instance's shared dictionary:
  -- the lease may move to another worker, which must not ask WeChat again
  -- before bill_retry (WeChat asks for every 30 minutes while it makes
  -- the bill); this worker's own memory when there is no dictionary
  local d = dict()
  local mine = {}
  local tried = {
    get = function(key)
      if d then return tonumber(d:get("gw:bill_tried:" .. key)) end
      return mine[key]
    end,
    set = function(key, t)
      if d then
        if t == nil then
          d:delete("gw:bill_tried:" .. key)
        else
          d:set("gw:bill_tried:" .. key, t, conf.bill_retry + 60)
        end
      else
        mine[key] = t
      end
    end,
  }
  -- the key of the run in flight: recorded as tried before it runs (the
  -- lease may move to another worker meanwhile, which must not start it
  -- too), forgotten again when the run is cut off on nobody's account
  local running
  local function pending(now)
    if ctx.degraded and ctx.degraded() then return {} end
    -- yesterday's bill (from bill_hour on), and those of the
    -- bill_days - 1 days before it not reported yet (the gateway was down
    -- when their turn came): at once, whatever the hour
    local items = {}
    local owed = {}
    for _, m in ipairs(ctx.merchants) do owed[m.mchid] = owed_get(m.mchid) end
    for _, date in ipairs(_M.bill_dates(now, conf)) do
      -- a day is done for a merchant when its audit entry exists
      local done, err = reported(db, date)
      if not done then return nil, err end
      for _, m in ipairs(ctx.merchants) do
        local key = date .. "|" .. m.mchid
        local last = tried.get(key)
        if done[m.mchid] then
          -- (reported by a run elsewhere: the console, another instance)
          if owed[m.mchid][date] then owe(m.mchid, date, nil) end
        elseif not last or now - last >= conf.bill_retry then
          items[#items + 1] = { date = date, mchid = m.mchid, key = key }
        end
      end
    end
    -- the days owed that have left the window: reported since, or
    -- recorded as left unreconciled (check), once
    local oldest = bill.bill_date(now - (conf.bill_days - 1) * 86400)
    for _, m in ipairs(ctx.merchants) do
      for date, kind in pairs(owed[m.mchid]) do
        if date < oldest then
          local done, err = reported(db, date)
          if not done then return nil, err end
          if done[m.mchid] then
            owe(m.mchid, date, nil)
          else
            items[#items + 1] = { date = date, mchid = m.mchid,
                                  missed = true, last = kind }
          end
        end
      end
      refresh(db, m.mchid, now)
    end
    return items
  end
  -- A day owed that left the window unreported: an audit entry
  -- reconcile_missed:<date> (under the fence) and an error in the log;
  -- the alarm stays up until a run of the day succeeds (the console's
  -- lever), whatever later days do
  local function left_unreconciled(item, rctx)
    local ok, err = audit.ensure_schema(db)
    if not ok then return nil, err end
    local e
    e, err = db:transaction(function(tx)
      local f, ferr = rctx.fence(tx)
      if not f then return nil, ferr end
      return audit.append(tx, "reconcile_missed:" .. item.date, {
        what = "reconcile.bill_missed", cause = "bill_days",
        actor = "reconcile", evidence = { date = item.date,
          merchant = item.mchid, last = item.last,
          bill_days = conf.bill_days } })
    end)
    if not e then return nil, err end
    owe(item.mchid, item.date, nil)
    paygate.log.error("gateway: a day's bill left the bill job's window"
      .. " unreconciled: run it from the console (Reconcile)", {
        date = item.date, mchid = item.mchid, last = item.last })
    refresh(db, item.mchid, clock())
    return e
  end
  local ttl, measure = lease_opts("bill", conf)
  local runner = reconcile.runner(db, {
    name = "bill", batch = 20, interval = math.min(60, conf.bill_retry),
    lease_ttl = ttl, now = clock,
    measure = measure,
    due = function(now) return pending(now) end,
    check = function(item, rctx)
      if item.missed then return left_unreconciled(item, rctx) end
      local at = clock()
      -- what the day's last run said (statement_creating: said already)
      local said = owed_get(item.mchid)[item.date]
      tried.set(item.key, at)
      running = item.key
      local wx = ctx.wx[item.mchid]
      -- a raise (a fault on this side) goes on to the runner, which logs
      -- it as before
      local ok, report, err = pcall(_M.bill_day, {
        wx = wx, db = db, dir = conf.bill_dir, date = item.date,
        mchid = item.mchid, fence = rctx.fence, on_wait = rctx.keepalive,
        job = true })
      running = nil
      if not ok then error(report, 0) end
      if not report then
        -- cut off by the lease (another worker took it over: the audit
        -- write fenced, a renewal lost): neither WeChat nor the store
        -- failed, so the day is due again at the next round, not
        -- bill_retry later
        if CUT_OFF[err.kind] or lease.fenced(err) then
          tried.set(item.key, nil)
        end
        if err.kind == "statement_creating" then
          -- WeChat has not made the bill yet: expected (it makes it
          -- during the morning), no failure. Said once, at info, until
          -- the day's outcome changes; the runner does not warn (false)
          if said ~= "statement_creating" then
            paygate.log.info("gateway: bill for " .. item.date .. " not"
              .. " ready yet, next try at " .. beijing_time(at
              + conf.bill_retry), { date = item.date, mchid = item.mchid,
                bill_retry = conf.bill_retry })
          end
          return false, err
        end
        return nil, err
      end
      local level = report.counts.total > 0 and "warn" or "info"
      paygate.log[level]("gateway: daily bill reconciled", {
        date = report.date, mchid = item.mchid, path = report.path,
        mismatches = report.counts.total, empty = report.empty })
      return report
    end,
  })
  -- a graceful stop (a reload, a restart) cuts the run in flight off:
  -- the next workers try its day at their first round
  local stop = runner.stop
  runner.stop = function(self)
    local key = running
    running = nil
    stop(self)
    if key then tried.set(key, nil) end
  end
  return runner
end

-- syntax: runner = reconcile.bill_job(ctx, conf[, clock])
-- The bill job's runner, not started (clock: fn -> epoch s, default
-- core.time; for the specs)
_M.bill_job = bill_job

--- syntax: report, err = reconcile.bill_day(o)
-- One merchant's bill of one day, reconciled (paygate.reconcile.bill's
-- daily: the report file, its audit entry reconcile:<date>) against this
-- gateway's rows (local_rows, the refunds the bill names included). The
-- daily job and the console's lever both run it, so that a day run from
-- the console reports what the job would. o: { wx, db, dir, date, mchid,
-- fence, on_wait, job (the job's run) }; one attempt (the job tries again
-- after bill_retry).
-- Its outcome sets paygate_reconcile_bill_failed{merchant}, whoever ran
-- it (refresh): a day's success settles it (the console's run clears the
-- alarm the job's failures raised: the job, finding the day reported,
-- never runs it again); a failure of the job's, or of a day the job owes,
-- is the day's last outcome. A failure of a day the job does not owe (an
-- older day run from the console: its page says so) changes nothing.
-- A run of o (bill_day's) that did not reconcile its day, kind: WeChat
-- still making the bill (statement_creating) or a failure (err, or a
-- raise: internal). An audit entry reconcile_run:<date> (what
-- reconcile.bill_unreconciled, under o.fence), so that the console's list
-- of runs shows it beside the reconciled ones. A cannot-write is logged:
-- the run's own outcome stands.
local function record_unreconciled(o, kind, err)
  local ev = { date = o.date, merchant = o.mchid, kind = kind,
    outcome = kind == "statement_creating" and "not_ready" or "failed",
    by = o.job and "job" or "console",
    error = kind == "internal" and "internal error (the gateway's log"
      .. " says why)" or tostring(err) }
  local db = o.db
  local e, aerr = audit.ensure_schema(db)
  if e then
    e, aerr = db:transaction(function(tx)
      if o.fence then
        local f, ferr = o.fence(tx)
        if not f then return nil, ferr end
      end
      return audit.append(tx, "reconcile_run:" .. o.date, {
        what = "reconcile.bill_unreconciled", cause = "daily_bill",
        actor = o.job and "reconcile" or "console", evidence = ev })
    end)
  end
  if not e then
    warn("gateway: a bill run's outcome cannot be recorded", {
      date = o.date, mchid = o.mchid, outcome = ev.outcome,
      error = tostring(aerr) })
  end
end

-- The refund lines of a reconciled day's bill whose out_refund_no this
-- gateway does not know (missing_local) on an order it made (one of its
-- attempts, of merchant o.mchid): money refunded outside it, in the
-- merchant platform, by another system, or after the backup its store was
-- restored from. Each flags its payment (gw.apply's refunded_elsewhere,
-- once, under o.fence) with the line's out_refund_no, amount and day: the
-- same flag a query's REFUND or WeChat's refusal of a refund raises. A
-- line of an order not made here (another system's) is the report's
-- alone. A failure is logged: the report stands, and the next run of the
-- day flags what this one could not.
local function flag_refunded_elsewhere(o, mismatches)
  -- (by the line's sub-merchant and number, bill.key: in a service
  -- provider's bill another sub-merchant's refund of an order of the same
  -- number is not money of this gateway's payment)
  local lines, nos, asked = {}, {}, {}
  for _, m in ipairs(mismatches or {}) do
    if m.kind == "missing_local" and m.out_refund_no
       and type(m.out_trade_no) == "string" then
      local r = type(m.remote) == "table" and m.remote or {}
      local key = bill.key(r.sub_mchid, m.out_trade_no)
      lines[key] = lines[key] or m
      if not asked[m.out_trade_no] then
        asked[m.out_trade_no] = true
        nos[#nos + 1] = m.out_trade_no
      end
    end
  end
  local db = o.db
  local qok, qerr = by_numbers(db, o.mchid, nos, function(ph)
    return "SELECT a.out_trade_no AS attempt_no,"
      .. " a.payment_id, p.sub_mchid AS sub_mchid FROM gw_attempts a JOIN"
      .. " gw_payments p ON p.id = a.payment_id WHERE p.mchid = $1 AND"
      .. " a.out_trade_no IN (" .. ph .. ")"
  end, function(rows)
    for _, a in ipairs(rows) do
      local m = lines[bill.key(model.opt(a.sub_mchid), a.attempt_no)]
      local ok, err = m and db:transaction(function(tx)
        if o.fence then
          local f, ferr = o.fence(tx)
          if not f then return nil, ferr end
        end
        local p, perr = model.payment(tx, a.payment_id)
        if not p then return nil, perr end
        return apply.refunded_elsewhere(tx, p, { source = "bill",
          actor = o.job and "reconcile" or "console",
          out_trade_no = a.attempt_no, out_refund_no = m.out_refund_no,
          refund_amount = type(m.remote) == "table" and m.remote.amount
                          or nil, date = o.date })
      end)
      if m and not ok then
        warn("gateway: a payment refunded outside this gateway cannot be"
          .. " flagged", { date = o.date, mchid = o.mchid,
          payment = a.payment_id, error = tostring(err) })
      end
    end
  end)
  if not qok then
    warn("gateway: a bill's refunds unknown here cannot be looked up",
         { date = o.date, mchid = o.mchid, error = tostring(qerr) })
  end
end

function _M.bill_day(o)
  local db, mchid = o.db, o.mchid
  local ok, report, err = pcall(bill.daily, {
    wx = o.wx, db = db, dir = o.dir, date = o.date, name = mchid,
    fence = o.fence, on_wait = o.on_wait, retry = { attempts = 1 },
    -- (who ran it, as an unreconciled run's entry says it)
    actor = o.job and "reconcile" or "console",
    local_rows = function(date, numbers, refund_numbers)
      return _M.local_rows(db, mchid, date, numbers, refund_numbers)
    end })
  if not ok or not report then
    -- (a raise: a fault on this side fails the run all the same)
    local kind = ok and tostring(err.kind) or "internal"
    local last = owed_get(mchid)[o.date]
    if o.job or last then owe(mchid, o.date, kind) end
    -- recorded for the console's list: a run the lease or a stop cut
    -- off is nobody's outcome (tried again at once); the job's only when
    -- the day's outcome changed, not at every bill_retry of a bill
    -- WeChat keeps making or of a store down for hours
    if not (ok and (CUT_OFF[kind] or lease.fenced(err)))
       and not (o.job and last == kind) then
      record_unreconciled(o, kind, ok and err or report)
    end
    refresh(db, mchid)
    if not ok then error(report, 0) end
    return nil, err
  end
  owe(mchid, o.date, nil)
  refresh(db, mchid)
  flag_refunded_elsewhere(o, report.mismatches)
  -- the counts the library's gauge now shows, kept for a worker that
  -- starts later (republish)
  local d = dict()
  if d then
    d:set("gw:bill_counts:" .. mchid, json.encode(report.counts or {}))
  end
  return report
end

-- A gauge lives in the worker that set it: a worker restarted or
-- reloaded would leave /metrics without the bill's gauges until the next
-- day's run. Each worker sets them again at start from what the shared
-- dict kept (the alarm's last value, the last report's counts).
local function republish(merchants)
  local d = dict()
  if not d then return end
  for _, m in ipairs(merchants or {}) do
    local mchid = m.mchid
    local v = tonumber(d:get("gw:bill_failed:" .. mchid))
    if v then set_failed(mchid, v) end
    local counts = json.decode(d:get("gw:bill_counts:" .. mchid) or "")
    if type(counts) == "table" then bill.publish(counts, mchid) end
  end
end

----------------------------------------------------------------- start

--- syntax: conf = reconcile.conf(ctx)
-- ctx.gateway.reconcile as check_conf reads it, checked once per ctx
-- (start keeps it), or nil when it is refused.
function _M.conf(ctx)
  local c = ctx.reconcile_conf
  if c == nil then
    c = _M.check_conf(ctx.gateway.reconcile) or false
    ctx.reconcile_conf = c
  end
  return c or nil
end

--- syntax: runners = reconcile.start(ctx)
-- Starts the runners in a worker (nothing under paygate exec or when
-- gateway.reconcile.enabled is false). Raises on a bad config.
function _M.start(ctx)
  local conf, why = _M.check_conf(ctx.gateway.reconcile)
  if not conf then
    -- one line, exit 2, like every config error of the gateway
    if ctx.fatal then ctx.fatal("config." .. why) end
    error("gateway: config." .. why, 0)
  end
  ctx.reconcile_conf = conf
  if not conf.enabled or paygate.runtime.mode ~= "worker" then
    return {}
  end
  local sched = reconcile.schedule{ first = conf.first, factor = conf.factor,
                                    ceiling = conf.ceiling,
                                    retry = conf.retry }
  local runners = {
    payments = payment_checks(ctx, conf, sched):start(),
    refunds = refund_checks(ctx, conf, sched):start(),
  }
  if conf.bill and not (ctx.gateway.reconcile or {}).bill_dir then
    -- beside an SQLite store (var/gateway.db -> var/reconcile). With
    -- PostgreSQL the instances may run anywhere: the reports' folder
    -- must be named (the job runs on whichever instance holds the lease)
    local dir = require("gw.config").bill_dir(ctx.gateway)
    if dir then
      conf.bill_dir = dir
    else
      conf.bill = false
      if require("paygate.shared").get_dict("paygate"):add(
           "gw:reconcile_bill_warned", 1) then
        paygate.log.warn("gateway: the daily bill reconciliation is off:"
          .. " set gateway.reconcile.bill_dir (or bill = false) to use it"
          .. " with this store")
      end
    end
  end
  if conf.bill then
    republish(ctx.merchants)
    -- no shell; a folder that cannot be made is said once here (each run
    -- then fails on its report file, counted on /metrics), and payments
    -- go on: the reports are no reason to stop the gateway
    local made, why = require("gw.config").mkdir_p(conf.bill_dir)
    if not made then
      paygate.log.error("gateway: the daily bill's reports folder: " .. why
                        .. "; every bill run fails until it can be made")
    end
    runners.bill = bill_job(ctx, conf):start()
  end
  _M.runners = runners
  -- a runner holds its lease from round to round: a graceful stop (a
  -- reload, a restart) gives it back, or the next workers' checks wait
  -- for it to expire (up to lease_ttl)
  paygate.on_stop(function()
    for _, r in pairs(runners) do r:stop() end
  end)
  return runners
end

return _M
