-- gw.apply: what WeChat reports (a notification, or the answer to a query)
-- applied to the gateway's rows, inside the caller's transaction: the
-- dedupe by business key (gw_notification_effects), the amount check, the
-- fsm transition with its audit entry, the outbox events. Shared by the
-- notification route and ?refresh=1 / reconciliation, so a payment paid
-- by one is a duplicate for the other.
--
-- Each function returns outcome[, after] or nil, err. outcome is
-- "applied", "duplicate", "alarm", "ignored" or "refused"; after, when
-- present, is a list of work to start once the transaction committed
-- ({ refund = id }: send that refund to WeChat).
local paygate = require "paygate"
local audit = require "paygate.audit"
local metrics = require "paygate.metrics"
local shared = require "paygate.shared"
local json = require "paygate.json"
local model = require "gw.model"
local events = require "gw.events"
local civil = require "paygate.civil"

-- WeChat's success_time when it is an RFC 3339 time (kept in the audit
-- evidence: the daily bill places a payment or refund on WeChat's day,
-- not on the day this gateway learnt of it), else nil
local function wx_time(v)
  return civil.epoch(v) and v or nil
end

local type, tostring, tonumber, pairs, ipairs = type, tostring, tonumber,
      pairs, ipairs

local _M = {}

--- syntax: s = apply.wx_time(v) -- v when it is an RFC 3339 time, else nil
_M.wx_time = wx_time

local P, R = model.payments, model.refunds

--- syntax: fields = apply.merchant_fields(p[, fields])
-- fields (a new table when nil) with the merchant of payment row p:
-- mchid, and a service provider's sub-merchant as sub_mchid (the
-- provider's mchid alone does not say whose money it is: refunds, queries
-- and the merchant platform are the sub-merchant's). Every line about
-- money a person must look at names both.
function _M.merchant_fields(p, fields)
  fields = fields or {}
  fields.mchid = tostring(p.mchid)
  fields.sub_mchid = model.opt(p.sub_mchid)
  return fields
end

-- The counters an operator alerts on. Each is declared here once, and
-- apply.init_metrics gives every series of a known label set a 0 at start:
-- a series that appears only with its first count shows Prometheus no
-- increase (increase() and rate() need two samples), so an alert on the
-- first alarm, or the first payment whose notification never came, did not
-- fire until the second.
local ALARM_KINDS = { "amount_mismatch", "merchant_mismatch",
                      "order_mismatch", "late_payment", "refunded_elsewhere",
                      "refund_failed" }
local alarm_counter, unnotified_counter, after_query_counter

--- apply.PRESET_MERCHANTS: how many merchants (the first by mchid) have
-- their series at 0 from the start in every counter labelled by merchant,
-- here and in gw.notify: 19 series each, 304 at most. A merchant past them
-- gets its series with its first count. A worker holds 512 counter series
-- in all (paygate.metrics.MAX_COUNTER_SERIES); the pre-sets went on until
-- each family's cap (settled_without_notification 25 merchants,
-- notification_after_query 50, the refusals 16): some 430 series at the
-- start of a gateway of 50 merchants, and a merchant past a family's cap
-- was counted in its _overflow series for good.
_M.PRESET_MERCHANTS = 16

-- The label sets a counter keyed by merchant shows (per: its label sets
-- per merchant): every configured merchant's, at least the default 100,
-- at most 256 (half a worker's room: 64 merchants' unnotified counts).
local merchants_n = 1
local function merchant_cap(per)
  return math.min(math.max(100, per * merchants_n), 256)
end
local function alarms_metric()
  alarm_counter = alarm_counter or metrics.counter(
    "paygate_gateway_alarms_total", "Alarms raised by the gateway (e.g. a"
    .. " notification whose amount differs from the order's).", { "kind" })
  return alarm_counter
end
local function unnotified_metric()
  unnotified_counter = unnotified_counter or metrics.counter(
    "paygate_gateway_settled_without_notification_total", "Payments paid"
    .. " and refunds settled by a query (reconcile, ?refresh=1) whose"
    .. " notification had not arrived.", { "merchant", "kind", "source" },
    { max_series = merchant_cap(4) })
  return unnotified_counter
end
local function after_query_metric()
  after_query_counter = after_query_counter or metrics.counter(
    "paygate_gateway_notification_after_query_total", "Notifications that"
    .. " came after a query (reconcile, ?refresh=1) had settled their"
    .. " payment or refund: late, not lost.",
    { "merchant", "kind" }, { max_series = merchant_cap(2) })
  return after_query_counter
end

--- syntax: apply.init_metrics(mchids) -- at start (mchids: every
-- configured merchant, sorted): every alarm kind, and for each of the
-- first PRESET_MERCHANTS merchants each kind and source, at 0
function _M.init_metrics(mchids)
  merchants_n = math.max(#mchids, 1)
  for _, k in ipairs(ALARM_KINDS) do alarms_metric():inc({ kind = k }, 0) end
  for i = 1, math.min(#mchids, _M.PRESET_MERCHANTS) do
    local m = mchids[i]
    for _, kind in ipairs{ "payment", "refund" } do
      for _, source in ipairs{ "reconcile", "refresh" } do
        unnotified_metric():inc({ merchant = tostring(m), kind = kind,
                                  source = source }, 0)
      end
      after_query_metric():inc({ merchant = tostring(m), kind = kind }, 0)
    end
  end
end

local function count_now(kind)
  shared.get_dict("paygate"):incr("gw:alarms:" .. kind, 1, 0)
  alarms_metric():inc({ kind = kind })
end

-- Counted once the transaction that records the alarm commits: a try
-- rolled back (a store failure, a version conflict run again) counts
-- nothing, so the count is the alarms the audit trail holds.
local function count_alarm(tx, kind)
  tx:on_commit(function() count_now(kind) end)
end

--- syntax: apply.count_alarm(tx, kind) -- counted once tx commits
_M.count_alarm = count_alarm

--- syntax: n = apply.alarms(kind) -- alarms raised since start (all workers)
function _M.alarms(kind)
  return tonumber(shared.get_dict("paygate"):get("gw:alarms:" .. kind)) or 0
end

-- The alarm of a mismatch (kind: "amount_mismatch" by default, or
-- "merchant_mismatch"): log, counter, audit entry, outbox event
-- alarm.<kind>; the payment's and the refund's states are not touched.
local function alarm(tx, p, refund, ev, kind)
  kind = kind or "amount_mismatch"
  -- logged once it commits, as it is counted: a try rolled back and run
  -- again (a version conflict) logged the alarm twice, counted once
  local fields = _M.merchant_fields(p, { payment = p.id,
    refund = refund and refund.id, out_trade_no = ev.out_trade_no,
    out_refund_no = ev.out_refund_no, expected = ev.expected, got = ev.got,
    source = ev.source, notification_id = ev.notification_id })
  tx:on_commit(function()
    paygate.log.error("gateway: " .. kind:gsub("_", " ") .. ": not applied",
                      fields)
  end)
  local ok, err = audit.append(tx, "payment:" .. p.id, {
    what = "payment.alarm", ref = refund and refund.id or p.id,
    cause = kind, actor = ev.actor or "wechatpay",
    evidence = ev })
  if not ok then return nil, err end
  ok, err = events.emit(tx, "alarm." .. kind, p, refund, { alarm = ev })
  if not ok then return nil, err end
  count_alarm(tx, kind)
  return "alarm"
end

-- Money of payment p refunded outside this gateway: in WeChat Pay's
-- merchant platform by hand, by another system on the merchant number, or
-- after the backup this store was restored from. Seen by o.source:
-- "refresh" / "reconcile" (a query answered REFUND that no refund here
-- explains), "notification" (a refund notification of an out_refund_no
-- unknown here, for one of its orders), "refund_call" (WeChat refused a
-- refund as more than what is left of the order) or "bill" (a day's bill
-- has a refund line of an out_refund_no unknown here). The payment is flagged
-- (gw_payments.refunded_elsewhere_at), once: the first to flag it (the
-- conditional UPDATE, one row changed) writes the audit entry (what
-- payment.alarm, cause refunded_elsewhere), the alarm.refunded_elsewhere
-- event, counts the alarm and logs the warning once the transaction
-- commits; a later sighting changes nothing. No state changes and no
-- refund row is made: WeChat's query names no refund (no out_refund_no,
-- no amount), and the payment's refunds are what this gateway made. o:
-- { source, actor, out_trade_no, trade_state, out_refund_no,
-- refund_amount, refund_status, date, wechat_code, and from a
-- notification notification_id, refund_id (WeChat's), success_time }.
-- returns: true (flagged now or before), or nil, err.
local function refunded_elsewhere(tx, p, o)
  local now = model.time()
  local res, err = tx:exec("UPDATE gw_payments SET refunded_elsewhere_at ="
    .. " $2 WHERE id = $1 AND refunded_elsewhere_at IS NULL", { p.id, now })
  if not res then return nil, err end
  if res.changes ~= 1 then return true end
  local ev = { source = o.source, out_trade_no = o.out_trade_no,
    trade_state = o.trade_state, out_refund_no = o.out_refund_no,
    refund_amount = o.refund_amount, refund_status = o.refund_status,
    refund_id = o.refund_id, success_time = o.success_time,
    notification_id = o.notification_id, date = o.date,
    wechat_code = o.wechat_code, amount = p.amount,
    refunded = p.refunded or 0 }
  local ok
  ok, err = audit.append(tx, "payment:" .. p.id, {
    what = "payment.alarm", ref = p.id, cause = "refunded_elsewhere",
    actor = o.actor or "gateway", evidence = ev })
  if not ok then return nil, err end
  local row = {}
  for k, v in pairs(p) do row[k] = v end
  row.refunded_elsewhere_at = now
  ok, err = events.emit(tx, "alarm.refunded_elsewhere", row, nil,
                        { alarm = ev })
  if not ok then return nil, err end
  count_alarm(tx, "refunded_elsewhere")
  local fields = { payment = p.id, mchid = tostring(p.mchid),
    sub_mchid = model.opt(p.sub_mchid), out_trade_no = o.out_trade_no,
    source = o.source, amount = p.amount, refunded = p.refunded or 0,
    out_refund_no = o.out_refund_no, refund_amount = o.refund_amount,
    refund_id = o.refund_id, notification_id = o.notification_id,
    date = o.date }
  tx:on_commit(function()
    paygate.log.warn("gateway: money refunded outside this gateway: the"
      .. " payment is flagged refunded_elsewhere; the day's trade bill"
      .. " lists the refund (its out_refund_no), before any refund here",
      fields)
  end)
  return true
end

--- syntax: ok, err = apply.refunded_elsewhere(tx, payment_row, o)
_M.refunded_elsewhere = refunded_elsewhere

-- A query's REFUND for attempt `no` of payment p: explained when a refund
-- of this gateway on that order may have reached WeChat (any state but
-- failed: refused by WeChat, or never sent). returns: true, false, or
-- nil, err.
local function refund_explained(tx, p, no)
  local rows, err = tx:query("SELECT id FROM gw_refunds WHERE payment_id ="
    .. " $1 AND out_trade_no = $2 AND state <> 'failed' LIMIT 1",
    { p.id, no })
  if not rows then return nil, err end
  return rows[1] ~= nil
end

-- A payment paid, or a refund settled, by a query (o.source "query") whose
-- business key no notification had claimed: WeChat's notification of that
-- state never arrived here (a notification applied first makes the
-- query's claim a duplicate, and one arriving later is a duplicate of the
-- query's: notified_after_query says it came late). That is the lost
-- callback an operator must see -- a notify URL WeChat cannot reach, a
-- network dropping it -- so it is one warning and a
-- count, made once the transaction commits: a try rolled back counts
-- nothing, and of two workers or instances settling it at once only the
-- one whose claim committed gets here (the other's is a duplicate).
-- o.via says who asked: "reconcile" (the checks, which ask only once a
-- payment went check_after s without a notification) or "refresh"
-- (?refresh=1, the console's Query WeChat now: a merchant may ask seconds
-- after the payer paid, while the notification is on its way, so a
-- success_time younger than reconcile.check_after is not called lost;
-- the notification then arrives as a duplicate).
local function settled_unnotified(ctx, tx, o, kind, p, fields)
  if o.source ~= "query" then return end
  local via = o.via or "query"
  local st = civil.epoch(fields.success_time)
  -- how long after WeChat's success_time, on WeChat's clock at both ends
  -- when the answer said when it was made (o.answered_at): this host's
  -- clock minutes ahead of WeChat's (within WeChat's 5) called a payment
  -- paid a moment ago one whose notification was lost, at every refresh
  local now = tonumber(o.answered_at) or model.time()
  local after = st and math.floor(now - st) or nil
  if via == "refresh" and after then
    local conf = require("gw.reconcile").conf(ctx)
    if conf and after < conf.check_after then return end
  end
  fields.source, fields.after_s = via, after
  fields.payment, fields.mchid = p.id, tostring(p.mchid)
  fields.sub_mchid = model.opt(p.sub_mchid)
  tx:on_commit(function()
    paygate.log.warn("gateway: " .. (kind == "payment" and "paid"
      or "refund outcome") .. " found by query, no notification had"
      .. " arrived", fields)
    unnotified_metric():inc({ merchant = tostring(p.mchid), kind = kind,
                              source = via })
  end)
end

-- A notification whose business key a query had claimed already (the
-- claim's notification_id is "query:<out_trade_no>", or
-- "query:<out_refund_no>": claim's mark when no notification applied it)
-- arrived after the checks or ?refresh=1 settled what it reports: late,
-- not lost. settled_unnotified said "no notification had arrived" then;
-- this says it did in the end, and how late, so an operator tells a slow
-- network or WeChat's retry schedule (this line follows) from a notify URL
-- WeChat does not reach (none follows). One info line and a count; a
-- repeat of what another notification applied (WeChat's retry, a
-- duplicate) says nothing. claim: the key's row { notification_id,
-- applied_at } (nil: nothing to say); mark: the query's claim for this
-- payment or refund; fields name it, success_time among them.
local function say_after_query(claim, kind, mchid, fields)
  local now = model.time()
  local at = tonumber(claim.applied_at)
  local st = civil.epoch(fields.success_time)
  fields.mchid = tostring(mchid)
  fields.after_query_s = at and math.floor(now - at) or nil
  fields.after_success_s = st and math.floor(now - st) or nil
  paygate.log.info("gateway: notification arrived after a query had"
                   .. " settled it", fields)
  after_query_metric():inc({ merchant = tostring(mchid), kind = kind })
end

local function notified_after_query(claim, mark, kind, mchid, fields)
  if type(claim) ~= "table" or claim.notification_id ~= mark then return end
  -- said after the commit (gw.notify_atomic calls it outside any
  -- transaction): a fault here must not turn the recorded duplicate's
  -- answer into a 500
  local ok, err = pcall(say_after_query, claim, kind, mchid, fields)
  if not ok then
    paygate.log.error("gateway: could not say a notification came after"
                      .. " a query", { error = tostring(err) })
  end
end

--- syntax: apply.notified_after_query(claim, mark, kind, mchid, fields)
-- (gw.notify_atomic's repeats of a paid payment: said here, as gw.apply's)
_M.notified_after_query = notified_after_query

-- Who claimed a business key, and when: read on a notification's
-- duplicate path only (rare: WeChat's repeats and late ones)
local CLAIM_OF = "SELECT notification_id, applied_at FROM"
  .. " gw_notification_effects WHERE key = $1"

-- A notification o found its key claimed: said once tx commits (a try
-- rolled back says nothing) if a query's claim it was
-- (notified_after_query tells). returns: true, or
-- nil, err (the read failed: the notification is not recorded, and WeChat
-- sends it again).
local function duplicate_of(tx, o, key, mark, kind, p, fields)
  if o.source ~= "notification" then return true end
  local rows, err = tx:query(CLAIM_OF, { key })
  if not rows then return nil, err end
  local claim = rows[1]
  if not claim then return true end
  fields.payment, fields.notification_id = p.id, o.notification_id
  tx:on_commit(function()
    notified_after_query(claim, mark, kind, p.mchid, fields)
  end)
  return true
end

-- "sp_mchid/sub_mchid" or "mchid" of a resource or a payment row (one
-- the resource lacks: "none", as a message says it)
local function merchant_of(mchid, sp_mchid, sub_mchid)
  if sp_mchid ~= nil or sub_mchid ~= nil then
    return (sp_mchid ~= nil and tostring(sp_mchid) or "none") .. "/"
      .. (sub_mchid ~= nil and tostring(sub_mchid) or "none")
  end
  return mchid ~= nil and tostring(mchid) or "none"
end

--- syntax: who = apply.merchant(p)
-- Payment row p's merchant as the notifications name it and the console
-- shows it: "mchid", or "sp_mchid/sub_mchid" for a service provider's.
function _M.merchant(p)
  local sub = model.opt(p.sub_mchid)
  return merchant_of(p.mchid, sub and p.mchid, sub)
end

-- Whether WeChat's resource r, come through o's route (o.mchid), is about
-- payment row p's money: the merchant r names (mchid, or sp/sub for a
-- service provider's) is p's, and so is the route's. returns: that, and
-- p's merchant and r's (for the messages).
local function owns(p, r, o)
  local want = _M.merchant(p)
  local got = merchant_of(r.mchid, r.sp_mchid, r.sub_mchid)
  return got == want and (o.mchid == nil or o.mchid == p.mchid), want, got
end

-- Records the business key; false when another notification (or a query)
-- applied it already.
local function claim(tx, key, by, now)
  local res, err = tx:exec("INSERT INTO gw_notification_effects (key,"
    .. " notification_id, applied_at) VALUES ($1, $2, $3)"
    .. " ON CONFLICT (key) DO NOTHING", { key, by, math.floor(now) })
  if not res then return nil, err end
  return res.changes == 1
end

--- syntax: key = apply.payment_key(resource)
function _M.payment_key(r)
  local who = r.sp_mchid and (tostring(r.sp_mchid) .. "/"
                               .. tostring(r.sub_mchid))
              or tostring(r.mchid)
  local state = r.trade_state
  -- a query after a refund says REFUND: the money was taken all the same
  if state == "REFUND" then state = "SUCCESS" end
  return "pay|" .. who .. "|" .. tostring(r.out_trade_no) .. "|"
         .. tostring(state)
end

local function new_refund(tx, p, kind, out_trade_no, amount, reason, o)
  local now = model.time()
  local id = model.new_refund_id()
  local res, err = R:create(tx, {
    id = id, payment_id = p.id, out_refund_no = model.out_refund_no(id),
    out_trade_no = out_trade_no, kind = kind, amount = amount,
    reason = reason, created_at = now, updated_at = now },
    { cause = kind, actor = "gateway", evidence = o })
  if not res then return nil, err end
  return res.row
end

--- syntax: outcome, after = apply.payment(ctx, tx, o)
-- o: { resource (WeChat's transaction object), mchid (the merchant whose
-- route or client it came through), notification_id (or nil for a
-- query), source ("notification" | "query"), via (a query's asker:
-- "reconcile" | "refresh"), actor, answered_at (a query's: WeChat's clock
-- at its answer, paygate.reconcile.answered_at; or nil) }
function _M.payment(ctx, tx, o)
  local r = o.resource
  local now = model.time()
  local no = r.out_trade_no
  if type(no) ~= "string" then
    return nil, paygate.error("malformed", "the transaction has no"
                              .. " out_trade_no")
  end
  -- (PostgreSQL: read locked. A transaction applying another attempt's
  -- payment may be about to commit the payment paid and this attempt
  -- superseded; read unlocked, this one would see the attempt open and
  -- then the payment paid -- "paid already, on the current attempt": no
  -- refund of money taken twice. Locked, the read waits and sees it.)
  local rows, err = tx:query("SELECT * FROM gw_attempts WHERE"
    .. " out_trade_no = $1" .. (tx.engine == "postgres" and " FOR UPDATE"
                                or ""), { no })
  if not rows then return nil, err end
  local a = rows[1]
  if not a then
    return nil, paygate.error("unknown_order", "no attempt " .. no)
  end
  local p
  p, err = model.payment(tx, a.payment_id)
  if not p then
    return nil, err or paygate.error("unknown_order", "no payment "
                                     .. a.payment_id)
  end
  -- (PostgreSQL: and the payment's current attempt, when it is another,
  -- locked before the payment is read again. A switch moves the payment
  -- on to a new attempt without changing its version: committed after
  -- the read above, this payment of an older attempt would pass the
  -- version check, make the payment paid and supersede the attempt it had
  -- read as current -- leaving the switch's new one open, payable. Locked,
  -- a switch holding the current attempt is waited for and seen, one
  -- coming later waits for this transaction: model.lock_attempt)
  if tx.engine == "postgres" then
    local tries = 0
    while p.out_trade_no ~= no do
      tries = tries + 1
      if tries > 5 then
        return nil, paygate.error("stale_version", "payment " .. p.id
          .. " keeps moving to new attempts", { retryable = true })
      end
      local locked = p.out_trade_no
      local ok
      ok, err = model.lock_attempt(tx, locked)
      if not ok then return nil, err end
      p, err = model.payment(tx, a.payment_id)
      if not p then
        return nil, err or paygate.error("unknown_order", "no payment "
                                         .. a.payment_id)
      end
      if p.out_trade_no == locked then break end
    end
  end
  -- the payment must be the one the resource names (mchid, or
  -- sp_mchid/sub_mchid: a resource without a sub_mchid is the provider's
  -- own order, not its sub-merchant's) and the one of the route it came
  -- through: a notification verified with one merchant's keys is no word
  -- on another's payment. (gw.notify_atomic takes only the owner this
  -- accepts.)
  local mine, want, got = owns(p, r, o)
  if not mine then
    -- both named (sp/sub for a service provider's): whose order came, and
    -- whose payment it is not
    return nil, paygate.error("merchant_mismatch", "payment " .. p.id
      .. " (" .. no .. ") is merchant " .. want .. "'s, not "
      .. (got ~= want and got or ("route " .. tostring(o.mchid)))
      .. "'s", { expected = want, got = got, route = o.mchid })
  end
  local state = r.trade_state
  if state ~= "SUCCESS" and state ~= "REFUND" then
    return "ignored"
  end
  local amount = type(r.amount) == "table" and r.amount or {}
  local total, currency = amount.total, amount.currency or "CNY"
  if total ~= p.amount or currency ~= p.currency then
    return alarm(tx, p, nil, { expected = p.amount, got = total,
      expected_currency = p.currency, got_currency = currency,
      out_trade_no = no, notification_id = o.notification_id,
      source = o.source, actor = o.actor })
  end
  -- WeChat says the order has a refund (REFUND): one made here, or money
  -- given back behind this gateway's back (a query answer carries no
  -- refund detail, so "less refunded here than there" is seen by a refund
  -- WeChat refuses, or by the bill). Flagged once the payment is as this
  -- answer leaves it (its events after the payment's own)
  local function flag_refund(row)
    if state ~= "REFUND" or o.source ~= "query" then return true end
    local known, ferr = refund_explained(tx, row, no)
    if known == nil then return nil, ferr end
    if known then return true end
    return refunded_elsewhere(tx, row, { source = o.via or "query",
      actor = o.actor, out_trade_no = no, trade_state = state })
  end
  local key = _M.payment_key(r)
  local fresh
  fresh, err = claim(tx, key, o.notification_id or ("query:" .. no), now)
  if fresh == nil then return nil, err end
  if not fresh or a.state == "paid" then
    if not fresh then
      local ok
      ok, err = duplicate_of(tx, o, key, "query:" .. no, "payment", p, {
        out_trade_no = no, success_time = wx_time(r.success_time) })
      if not ok then return nil, err end
    end
    local ok
    ok, err = flag_refund(p)
    if not ok then return nil, err end
    return "duplicate"
  end
  local late = a.state ~= "open"
  local evidence = { notification_id = o.notification_id, source = o.source,
                     out_trade_no = no, transaction_id = r.transaction_id,
                     trade_state = state, attempt_state = a.state,
                     success_time = wx_time(r.success_time) }
  local ok
  ok, err = tx:exec("UPDATE gw_attempts SET state = 'paid', transaction_id"
    .. " = $2, closed_at = COALESCE(closed_at, $3), close_check_at = NULL"
    .. " WHERE out_trade_no = $1", { no, r.transaction_id or json.null, now })
  if not ok then return nil, err end
  local after = {}
  local policy = ctx.gateway.on_late_payment
  -- not paid yet: the payment machine takes the success from its state
  local pre_paid = P:can(p.state, "succeeded")
  if pre_paid then
    local set = { transaction_id = r.transaction_id or json.null,
                  payer_total = amount.payer_total or json.null,
                  paid_out_trade_no = no, updated_at = now,
                  late = late and 1 or 0 }
    if o.source == "notification" then set.notified_at = now end
    local res
    res, err = P:transition(tx, p.id, "succeeded", {
      cause = late and "late_payment" or "paid", row = p,
      actor = o.actor or "wechatpay", evidence = evidence, set = set })
    if not res then return nil, err end
    p = res.row
    -- the current attempt is no longer the one to pay: closed at WeChat
    -- after the commit (payments.after), and by the payment checks if
    -- that close does not happen or fails (close_check_at)
    if no ~= p.out_trade_no then
      ok, err = tx:exec("UPDATE gw_attempts SET state = 'superseded',"
        .. " closed_at = $2, close_check_at = $3 WHERE out_trade_no = $1"
        .. " AND state = 'open'", { p.out_trade_no, now,
                                    model.close_check_at(ctx, p.mchid) })
      if not ok then return nil, err end
      after[#after + 1] = { close = p.out_trade_no, mchid = p.mchid,
                            sub_mchid = model.opt(p.sub_mchid) }
    end
    ok, err = events.emit(tx, "payment.paid", p, nil,
                          late and { late = true } or nil)
    if not ok then return nil, err end
  else
    -- paid already: this is money taken twice
    local entry
    entry, err = audit.append(tx, "payment:" .. p.id, {
      what = "payment.duplicate_paid", ref = no, from = p.state,
      to = p.state, cause = "late_payment", actor = o.actor or "wechatpay",
      evidence = evidence })
    if not entry then return nil, err end
  end
  if late then
    local refund
    if policy == "refund" then
      refund, err = new_refund(tx, p, pre_paid and "late_payment"
                               or "duplicate", no, total,
                               "paid after the order was closed",
                               evidence)
      if not refund then return nil, err end
      after[#after + 1] = { refund = refund.id }
    end
    -- said once it commits (a try rolled back, or run again after a
    -- version conflict, said it for nothing, or twice), with what finance
    -- needs to account for the money: how much, where, and what became
    -- of it (refunded by which refund, or kept for a person: at error,
    -- as the other alarms)
    local fields = _M.merchant_fields(p, { payment = p.id,
      out_trade_no = no, transaction_id = r.transaction_id, amount = total,
      duplicate = not pre_paid, action = policy,
      refund = refund and refund.id or nil,
      source = o.source == "query" and (o.via or "query") or o.source })
    tx:on_commit(function()
      local say = policy == "refund" and paygate.log.warn
                  or paygate.log.error
      say("gateway: payment on a closed or superseded attempt", fields)
    end)
    -- kept for a person to decide: an alarm, counted like the others
    -- (what operators alert on), not only an event
    if policy ~= "refund" then count_alarm(tx, "late_payment") end
    ok, err = events.emit(tx, "payment.late_paid", p, refund, {
      out_trade_no = no, transaction_id = r.transaction_id,
      amount = total, duplicate = not pre_paid, action = policy })
    if not ok then return nil, err end
  end
  ok, err = flag_refund(p)
  if not ok then return nil, err end
  settled_unnotified(ctx, tx, o, "payment", p, { out_trade_no = no,
    transaction_id = r.transaction_id, success_time = wx_time(r.success_time),
    late = late or nil })
  return "applied", after
end

local REFUND_EVENT = { SUCCESS = "succeeded", CLOSED = "closed",
                       ABNORMAL = "abnormal", PROCESSING = "accepted" }
local REFUND_TARGET = { SUCCESS = "succeeded", CLOSED = "closed",
                        ABNORMAL = "abnormal", PROCESSING = "processing" }
-- the states WeChat settled a refund in: a PROCESSING report is older,
-- and so is an ABNORMAL one (an abnormal refund ends SUCCESS or CLOSED
-- through the abnormal-refund API; WeChat retries a notification for a
-- day, so its REFUND.ABNORMAL may land after that outcome's)
local SETTLED = { succeeded = true, closed = true }
local OLDER = { PROCESSING = true, ABNORMAL = true }

--- syntax: outcome = apply.refund_status(ctx, tx, refund_row, o)
-- o: { status (SUCCESS, CLOSED, ABNORMAL, PROCESSING), refund_id,
-- amount (WeChat's refund amount, checked when given), notification_id,
-- source, via, answered_at (as for apply.payment), success_time, actor }
function _M.refund_status(ctx, tx, rf, o)
  local status, now = o.status, model.time()
  local event = REFUND_EVENT[status]
  if not event then return "ignored" end
  if status == "PROCESSING" and rf.state == "abnormal" then
    -- an application through the abnormal-refund API under way: it stays
    -- abnormal until WeChat says how it ended
    return "duplicate"
  end
  if OLDER[status] and SETTLED[rf.state] then
    -- a late report (the refund call's answer, a query, a notification
    -- WeChat sent again) older than the settlement applied meanwhile: a
    -- race, not an illegal transition
    paygate.log.debug("gateway: refund report older than its state:"
      .. " ignored", { refund = rf.id, state = rf.state, status = status,
                       source = o.source })
    return "duplicate"
  end
  local p, err = model.payment(tx, rf.payment_id)
  if not p then return nil, err or paygate.error("not_found", "payment") end
  if o.amount ~= nil and o.amount ~= rf.amount then
    return alarm(tx, p, rf, { expected = rf.amount, got = o.amount,
      out_refund_no = rf.out_refund_no, notification_id = o.notification_id,
      source = o.source, actor = o.actor })
  end
  if status ~= "PROCESSING" then
    -- (claimed by the refund call's own answer: "refund_call:", not a
    -- query's mark, so its notification is not said to come late)
    local key = "refund|" .. rf.out_refund_no .. "|" .. status
    local mark = (o.source == "refund_call" and "refund_call:" or "query:")
                 .. rf.out_refund_no
    local fresh
    fresh, err = claim(tx, key, o.notification_id or mark, now)
    if fresh == nil then return nil, err end
    if not fresh then
      local ok
      ok, err = duplicate_of(tx, o, key, "query:" .. rf.out_refund_no,
        "refund", p, { refund = rf.id, out_refund_no = rf.out_refund_no,
                       status = status,
                       success_time = wx_time(o.success_time) })
      if not ok then return nil, err end
      return "duplicate"
    end
  end
  if rf.state == REFUND_TARGET[status] then return "duplicate" end
  if not R:can(rf.state, event) then
    -- refused, logged and counted by the machine; nothing to retry
    R:transition(tx, rf.id, event, { row = rf })
    return "refused"
  end
  local set = { updated_at = now }
  if o.refund_id then set.refund_id = o.refund_id end
  local res
  res, err = R:transition(tx, rf.id, event, {
    row = rf, set = set, cause = o.source, actor = o.actor or "wechatpay",
    evidence = { notification_id = o.notification_id, status = status,
                 refund_id = o.refund_id,
                 success_time = wx_time(o.success_time) } })
  if not res then return nil, err end
  rf = res.row
  if event == "succeeded" then
    if rf.kind ~= "duplicate" then
      local amt = rf.amount
      local pres
      pres, err = P:transition(tx, p.id, function(row)
        return row.refunded + amt >= row.amount and "refunded_fully"
               or "refunded_partially"
      end, { row = p, cause = "refund", actor = o.actor or "wechatpay",
             evidence = { refund = rf.id, amount = amt },
             set = function(row)
               return { refunded = row.refunded + amt, updated_at = now }
             end })
      if not pres then return nil, err end
      p = pres.row
      local ok
      ok, err = events.emit(tx, "refund.succeeded", p, rf)
      if not ok then return nil, err end
      ok, err = events.emit(tx, p.state == "refunded" and "payment.refunded"
                            or "payment.partially_refunded", p, rf)
      if not ok then return nil, err end
    else
      local ok
      ok, err = events.emit(tx, "refund.succeeded", p, rf)
      if not ok then return nil, err end
    end
  elseif event == "closed" or event == "abnormal" then
    local ok
    ok, err = events.emit(tx, "refund." .. event, p, rf)
    if not ok then return nil, err end
    if event == "closed" and rf.kind ~= "merchant" then
      -- an automatic refund (a late or duplicate payment's) that WeChat
      -- closed gave nothing back: the money stays with the merchant, as
      -- when WeChat refuses one (gw.refunds' refund_failed), and is the
      -- same alarm. Was: only refund.closed, which no one is told to
      -- watch for a refund the merchant's systems never asked for
      local fields = _M.merchant_fields(p, { payment = p.id,
        refund = rf.id, kind = rf.kind, out_trade_no = rf.out_trade_no,
        out_refund_no = rf.out_refund_no, amount = rf.amount,
        source = o.source == "query" and o.via or o.source })
      tx:on_commit(function()
        paygate.log.error("gateway: WeChat Pay closed an automatic refund;"
          .. " the money stays with the merchant until a person returns"
          .. " it", fields)
      end)
      count_alarm(tx, "refund_failed")
    end
    if event == "abnormal" then
      -- the money is owed to the payer until someone applies for it (the
      -- abnormal-refund API, or the merchant platform): said here, however
      -- the ABNORMAL came (notification, query, a refund sent again), so
      -- an operator without a consumer of refund.abnormal hears of it too;
      -- once the transition committed (a transaction retried says nothing
      -- twice)
      local fields = { refund = rf.id, refund_id = rf.refund_id,
        out_refund_no = rf.out_refund_no, payment = p.id,
        mchid = tostring(p.mchid), sub_mchid = model.opt(p.sub_mchid),
        amount = rf.amount,
        source = o.source == "query" and o.via or o.source,
        apply = "POST /v1/refunds/" .. rf.id .. "/abnormal" }
      tx:on_commit(function()
        paygate.log.warn("gateway: refund ABNORMAL: apply for the"
          .. " abnormal-refund API", fields)
      end)
    end
  end
  if status ~= "PROCESSING" then
    -- (PROCESSING: WeChat sends no notification of it)
    settled_unnotified(ctx, tx, o, "refund", p, { refund = rf.id,
      out_refund_no = rf.out_refund_no, refund_id = rf.refund_id,
      status = status, success_time = wx_time(o.success_time) })
  end
  return "applied"
end

-- A refund notification of an out_refund_no unknown here: when its order
-- is an attempt of a payment of the notifying merchant, money of that
-- payment went back outside this gateway (SUCCESS, PROCESSING, ABNORMAL:
-- flagged refunded_elsewhere, outcome "refunded_elsewhere", answered SUCCESS
-- so WeChat stops sending it); CLOSED moved none ("ignored"). Another
-- merchant's order, or an order unknown here: false (unknown_refund).
-- Not a refund of this gateway's whose row is not committed yet: every
-- refund's row commits before WeChat is asked for it (gw.refunds.send
-- reads it from the store; the automatic ones are sent after the commit
-- that made them), so on one store, whichever instance asked, WeChat
-- cannot notify an out_refund_no of ours the store does not hold. Its
-- business key (refund|<merchant>|<out_refund_no>|<status>) is claimed
-- as a refund of this gateway's is: WeChat's retry under the same id is
-- a duplicate already (gw_notifications), one under a new id is one
-- here, the flag and its audit entry (naming the notification and
-- WeChat's refund_id) made once. The merchant is in it (as in a
-- payment's key): the number is the other system's, unique only within
-- its merchant (ours are unique anyway), so another merchant's refund of
-- the same number is no duplicate of this one.
-- returns: outcome, false, or nil, err.
local function refund_outside(tx, r, o)
  local no = r.out_trade_no
  if type(no) ~= "string" then return false end
  local rows, err = tx:query("SELECT payment_id FROM gw_attempts WHERE"
                             .. " out_trade_no = $1", { no })
  if not rows then return nil, err end
  if not rows[1] then return false end
  local p
  p, err = model.payment(tx, rows[1].payment_id)
  if p == nil then return nil, err end
  if not p then return false end
  if not owns(p, r, o) then return false end
  local status = r.refund_status or r.status
  if status == "CLOSED" then return "ignored" end
  if o.notification_id then
    local fresh
    fresh, err = claim(tx, "refund|" .. _M.merchant(p) .. "|"
                       .. r.out_refund_no .. "|" .. tostring(status),
                       o.notification_id, model.time())
    if fresh == nil then return nil, err end
    if not fresh then return "duplicate" end
  end
  local a = type(r.amount) == "table" and r.amount or {}
  local ok
  ok, err = refunded_elsewhere(tx, p, { source = o.source or "notification",
    actor = o.actor, out_trade_no = no, out_refund_no = r.out_refund_no,
    refund_amount = a.refund, refund_status = status,
    refund_id = type(r.refund_id) == "string" and r.refund_id or nil,
    success_time = wx_time(r.success_time),
    notification_id = o.notification_id })
  if not ok then return nil, err end
  return "refunded_elsewhere"
end

--- syntax: outcome, after = apply.refund(ctx, tx, o)
-- o: { resource (WeChat's refund object), notification_id, source, via,
-- actor }
function _M.refund(ctx, tx, o)
  local r = o.resource
  local no = r.out_refund_no
  if type(no) ~= "string" then
    return nil, paygate.error("malformed", "the refund has no out_refund_no")
  end
  local rows, err = tx:query("SELECT * FROM gw_refunds WHERE out_refund_no"
                             .. " = $1", { no })
  if not rows then return nil, err end
  local rf = rows[1]
  if not rf then
    -- none of this gateway's (each refund's row commits before WeChat is
    -- asked for it): one made outside it, in the merchant platform (its
    -- refund notification URL set to this gateway's) or after the backup
    -- this store was restored from, of an order it may know
    local out, oerr = refund_outside(tx, r, o)
    if out == nil then return nil, oerr end
    if out then return out end
    return nil, paygate.error("unknown_refund", "no refund " .. no)
  end
  -- the refund's payment must be the notifying merchant's (a payment's
  -- notification is checked in apply.payment): another merchant's is an
  -- alarm, nothing applied
  local p
  p, err = model.payment(tx, rf.payment_id)
  if not p then return nil, err or paygate.error("not_found", "payment") end
  local mine, want, got = owns(p, r, o)
  if not mine then
    return alarm(tx, p, rf, { expected = want, got = got,
      route = o.mchid, out_refund_no = no,
      notification_id = o.notification_id, source = o.source,
      actor = o.actor }, "merchant_mismatch")
  end
  -- the order it names and that order's total, as the refund was asked:
  -- another is an alarm too, as a refund amount that differs is
  local a = type(r.amount) == "table" and r.amount or {}
  if r.out_trade_no ~= nil and r.out_trade_no ~= rf.out_trade_no then
    return alarm(tx, p, rf, { expected = rf.out_trade_no,
      got = r.out_trade_no, out_refund_no = no,
      notification_id = o.notification_id, source = o.source,
      actor = o.actor }, "order_mismatch")
  end
  if a.total ~= nil and a.total ~= p.amount then
    return alarm(tx, p, rf, { expected = p.amount, got = a.total,
      field = "amount.total", out_refund_no = no,
      notification_id = o.notification_id, source = o.source,
      actor = o.actor })
  end
  local amount = a.refund
  return _M.refund_status(ctx, tx, rf, {
    status = r.refund_status or r.status, refund_id = r.refund_id,
    amount = amount, notification_id = o.notification_id,
    success_time = r.success_time, source = o.source, via = o.via,
    actor = o.actor })
end

return _M
