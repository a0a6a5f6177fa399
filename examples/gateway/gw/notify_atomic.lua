-- gw.notify_atomic: the common notification -- TRANSACTION.SUCCESS for
-- the current, open attempt of a payment not paid yet, amount and
-- currency as ordered -- applied as ONE write job (db:atomic) instead of
-- an interactive transaction.
--
-- Why: on SQLite an interactive transaction holds the single writer from
-- its BEGIN to its COMMIT, a round trip to Lua per statement, so
-- concurrent notifications run one after another. Here everything is read
-- first (on the reader threads), the decision is made in Lua, and the
-- writes go to the writer as one job that joins the group commit. Each
-- write carries the condition its read established:
--   1. gw_notifications insert, must insert     (dedupe by id)
--   2. gw_notification_effects insert, must insert (dedupe by business key)
--   3. the attempt: open -> paid, must change 1 row
--   4. the payment: fsm version-guarded UPDATE (paygate.fsm plan)
--   5. the audit head move and entry (chain position guarded)
--   6. the outbox event payment.paid
-- All or none, durable before the 204. A duplicate makes 1. or 2. fail
-- (nothing else written; the business-key duplicate is then recorded like
-- gw.notify records it); a concurrent writer makes 3.-5. fail and the
-- job is rebuilt from fresh reads (fsm.atomic). A repeat that finds the
-- attempt paid is recorded as a duplicate in a job of its own (its key
-- must have been claimed: a read with expect = 1, which also says who
-- claimed it -- a query's claim makes the notification a late one, said
-- in a line and counted, as gw.apply says it).
--
-- Everything else -- refunds, other states, late or duplicate payments,
-- amount mismatches, another owner (a partner's payment, another route),
-- unknown orders -- returns false: gw.notify's transaction (gw.apply)
-- handles it, as before; also a repeat of an applied payment that
-- gw.apply would not call a duplicate.
local audit = require "paygate.audit"
local fsm = require "paygate.fsm"
local json = require "paygate.json"
local outbox = require "paygate.outbox"
local model = require "gw.model"
local apply = require "gw.apply"
local events = require "gw.events"

local type = type
local new_tab = require "table.new"

local _M = {}

local P = model.payments

local NOT_MINE = {}                -- build's verdict: the transaction's case

local INSERT_NOTIFICATION = "INSERT INTO gw_notifications (id, event_type,"
  .. " business_key, received_at, outcome) VALUES ($1, $2, $3, $4, $5)"
  .. " ON CONFLICT (id) DO NOTHING"

-- The business key's claim and the attempt's payment, for a repeat of a
-- paid payment: a claim that is a query's makes the notification late
-- (apply.notified_after_query). Only the repeats pay for it.
local CLAIM = "SELECT e.notification_id, e.applied_at, a.payment_id FROM"
  .. " gw_notification_effects e LEFT JOIN gw_attempts a ON"
  .. " a.out_trade_no = $2 WHERE e.key = $1"

-- A repeat of a paid payment committed as a duplicate, its key's claim
-- read (nil when not): said if a query had claimed it.
local function repeated(mchid, event, claim)
  if not claim then return end
  local r = event.resource
  local no = r.out_trade_no
  apply.notified_after_query(claim, "query:" .. no, "payment", mchid, {
    payment = claim.payment_id, out_trade_no = no,
    notification_id = event.id, success_time = apply.wx_time(r.success_time)
  })
end

-- One read for the attempt, its payment and the payment's audit head
-- (one trip to a reader thread instead of three).
-- (PostgreSQL: the heads' subject is COLLATE "C", and so must the key be.)
local function read_sql(engine)
  return "SELECT p.*, a.state AS gw_a_state, a.payment_id AS gw_a_payment,"
    .. " h.seq AS gw_h_seq, h.hash AS gw_h_hash FROM gw_attempts a"
    .. " LEFT JOIN gw_payments p ON p.id = a.payment_id"
    .. " LEFT JOIN paygate_audit_heads h ON h.subject = ('payment:' || p.id)"
    .. (engine == "postgres" and ' COLLATE "C"' or "")
    .. " WHERE a.out_trade_no = $1"
end
local READ = { sqlite = read_sql("sqlite"), postgres = read_sql("postgres") }

-- The job's statements for what was read, or NOT_MINE.
local function build(db, mchid, event, key)
  local r = event.resource
  local no = r.out_trade_no
  local rows, err = db:query(READ[db.engine], { no })
  if not rows then return nil, err end
  local p = rows[1]
  if not p or p.id == nil then return nil, NOT_MINE end
  -- what gw.apply checks first, before a repeat is a duplicate: the
  -- owner (the route's merchant, and a direct payment's own mchid with
  -- no sub_mchid; a partner's is the transaction's) and the amount. Else
  -- the transaction's verdict (merchant_mismatch, the alarm) and this
  -- path's would differ for the same notification.
  if mchid ~= p.mchid or r.mchid ~= p.mchid or r.sp_mchid ~= nil
     or r.sub_mchid ~= nil or model.opt(p.sub_mchid) ~= nil then
    return nil, NOT_MINE
  end
  local amount = type(r.amount) == "table" and r.amount or {}
  if amount.total ~= p.amount or (amount.currency or "CNY") ~= p.currency
  then
    return nil, NOT_MINE                  -- the alarm
  end
  local a_state = p.gw_a_state          -- the attempt's
  if a_state == "paid" then
    -- a repeat of what is applied: record it, if the key was claimed
    -- (the claim read back: who claimed it, repeated)
    return {
      { INSERT_NOTIFICATION, { event.id, event.event_type, key, model.now(),
                               "duplicate" }, expect = 1,
        name = "notification" },
      { CLAIM, { key, no }, expect = 1, name = "claimed" },
    }, "duplicate"
  end
  if a_state ~= "open" then return nil, NOT_MINE end
  local head = p.gw_h_seq and { seq = p.gw_h_seq, hash = p.gw_h_hash }
               or false
  p.gw_a_state, p.gw_a_payment, p.gw_h_seq, p.gw_h_hash = nil, nil, nil, nil
  if no ~= p.out_trade_no then return nil, NOT_MINE end
  if not P:can(p.state, "succeeded") then return nil, NOT_MINE end
  local now = model.time()
  local evidence = { notification_id = event.id, source = "notification",
                     out_trade_no = no, transaction_id = r.transaction_id,
                     trade_state = r.trade_state, attempt_state = a_state,
                     success_time = apply.wx_time(r.success_time) }
  local plan
  plan, err = P:plan(db, p.id, "succeeded", {
    row = p, head = head, cause = "paid", actor = "wechatpay", evidence = evidence,
    set = { transaction_id = r.transaction_id or json.null,
            payer_total = amount.payer_total or json.null,
            paid_out_trade_no = no, updated_at = now, late = 0,
            notified_at = now } })
  if not plan then return nil, err end
  -- made at its size: three, the plan's, the outbox's (a list grown one
  -- by one from three would be resized twice per notification)
  local pstmts = plan.statements
  local n = #pstmts
  local stmts = new_tab(n + 4, 0)
  stmts[1] = { INSERT_NOTIFICATION, { event.id, event.event_type, key,
    model.now(), "applied" }, expect = 1, name = "notification" }
  stmts[2] = { "INSERT INTO gw_notification_effects (key, notification_id,"
    .. " applied_at) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING",
    { key, event.id, model.now() }, expect = 1, name = "effect" }
  -- (as gw.apply does it: a switch's close mark goes with it)
  stmts[3] = { "UPDATE gw_attempts SET state = 'paid', transaction_id = $2,"
    .. " closed_at = COALESCE(closed_at, $3), close_check_at = NULL"
    .. " WHERE out_trade_no = $1 AND state = 'open'",
    { no, r.transaction_id or json.null, now },
    expect = 1, name = "attempt" }
  for i = 1, n do
    stmts[i + 3] = pstmts[i]
  end
  stmts[n + 4] = outbox.statement(db, events.event("payment.paid",
                                                    plan.row))
  return stmts, plan
end

-- fsm.atomic's build: the arguments pass through (a closure made per
-- notification would stop the JIT compiling this path)
local function build_job(_, db, mchid, event, key)
  return build(db, mchid, event, key)
end
local RETRY = { retry_on = { "attempt" } }

-- Whether event is this path's case: a payment's success.
local function common(event)
  local r = event.resource
  return type(r) == "table" and event.event_type == "TRANSACTION.SUCCESS"
    and r.trade_state == "SUCCESS" and type(r.out_trade_no) == "string"
    and type(event.id) == "string"
end

--- syntax: stmts, err = notify_atomic.statements(db, mchid, event)
-- The one write job process would hand the store for event, as read now
-- (for tools and benchmarks: bench/gateway times these jobs alone). The
-- caller has run outbox.setup(db) and audit.ensure_schema(db) (process
-- does it; app.lua at start), and a job it commits is not counted as a
-- transition (fsm's m:applied is process's).
-- returns: the statements of a payment to apply; false when the event is
-- not the common case, or its payment is paid already; or nil, err.
function _M.statements(db, mchid, event)
  if not common(event) then return false end
  local stmts, plan = build(db, mchid, event,
                            apply.payment_key(event.resource))
  if stmts and plan ~= "duplicate" then return stmts end
  if stmts or plan == NOT_MINE then return false end
  return nil, plan
end

--- syntax: outcome, err = notify_atomic.process(db, mchid, event)
-- returns: "applied" or "duplicate" once committed; false when the
-- notification is not the common case (run gw.notify's transaction); or
-- nil, err.
-- yields: until committed and durable
function _M.process(db, mchid, event)
  if not common(event) then return false end
  -- the libraries' tables (made at start by app.lua; cached per handle)
  local ok, serr = outbox.setup(db)
  if ok then ok, serr = audit.ensure_schema(db) end
  if not ok then return nil, serr end
  local key = apply.payment_key(event.resource)
  local results, plan = fsm.atomic(db, build_job, RETRY, db, mchid, event,
                                   key)
  if results then
    if plan == "duplicate" then
      repeated(mchid, event, results[2] and results[2].rows
                             and results[2].rows[1])
      return "duplicate"
    end
    P:applied(plan)
    events.count("payment.paid")
    return "applied"
  end
  local err = plan
  if err == NOT_MINE or (err.kind == "conflict" and err.name == "claimed")
  then
    return false
  end
  if err.kind == "conflict" and err.name == "notification" then
    return "duplicate"                 -- this notification id was recorded
  end
  if err.kind == "conflict" and err.name == "effect" then
    -- the business key was applied by another notification (or a query:
    -- read first, so a failed read records nothing and WeChat sends it
    -- again)
    local rows, rerr = db:query(CLAIM, { key, event.resource.out_trade_no })
    if not rows then return nil, rerr end
    local ok, ierr = db:exec(INSERT_NOTIFICATION, { event.id,
      event.event_type, key, model.now(), "duplicate" })
    if not ok then return nil, ierr end
    repeated(mchid, event, rows[1])
    return "duplicate"
  end
  return nil, err
end

return _M
