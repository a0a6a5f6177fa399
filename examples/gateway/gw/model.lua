-- gw.model: the gateway's rows and how they look to callers; the state
-- machines of payments and refunds (paygate.fsm over gw_payments and
-- gw_refunds, audit subjects payment:<id> and refund:<id>).
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local fsm = require "paygate.fsm"
local json = require "paygate.json"
local civil = require "paygate.civil"
local reconcile = require "paygate.reconcile"

local type, tostring, ipairs, floor = type, tostring, ipairs, math.floor

local _M = {}

_M.payments = fsm.new(fsm.payment, {
  store = fsm.sql_store{ table = "gw_payments" } })
_M.refunds = fsm.new(fsm.refund, {
  store = fsm.sql_store{ table = "gw_refunds" } })

--- syntax: model.publish_fsm_counts()
-- Adds what paygate.fsm counted in this worker (fsm.stats) to two
-- counters by machine (payment, refund),
-- paygate_gateway_fsm_transitions_total{machine} and
-- paygate_gateway_fsm_illegal_transitions_total{machine}: every second,
-- and once more on a graceful stop. Counters are summed over the workers
-- and keep a restarted worker's counts.
function _M.publish_fsm_counts()
  local metrics = require "paygate.metrics"
  local counters = {
    transitions = metrics.counter("paygate_gateway_fsm_transitions_total",
      "State transitions of payments and refunds applied.", { "machine" }),
    illegal_transitions = metrics.counter(
      "paygate_gateway_fsm_illegal_transitions_total",
      "Transitions refused: not declared from the current state.",
      { "machine" }),
  }
  local done = { transitions = {}, illegal_transitions = {} }
  for _, c in pairs(counters) do   -- shown from the start, at 0
    c:inc({ machine = "payment" }, 0)
    c:inc({ machine = "refund" }, 0)
  end
  local function publish()
    local st = fsm.stats()
    for which, c in pairs(counters) do
      local sum = {}
      for _, series in ipairs(st[which]) do
        sum[series.machine] = (sum[series.machine] or 0) + series.count
      end
      for machine, n in pairs(sum) do
        local before = done[which][machine] or 0
        if n > before then
          c:inc({ machine = machine }, n - before)
          done[which][machine] = n
        end
      end
    end
  end
  paygate.timer.every(1, publish)
  paygate.on_stop(publish)
end

--- syntax: t = model.now() -- whole seconds since the epoch
function _M.now()
  return floor(paygate.now())
end

--- syntax: t = model.time() -- seconds since the epoch, to the ms: the
-- created_at / updated_at columns, which order refunds and attempts
function _M.time()
  return floor(require("paygate.core").time() * 1000) / 1000
end

-- A payment's or refund's id: prefix + 20 symbols, 9 of the time it was
-- made (milliseconds since the epoch in base 36, lower case: they sort
-- the same byte-wise -- SQLite's BINARY, PostgreSQL's "C" -- and in the
-- usual linguistic collations) then 11 random letters and digits (65
-- bits: two made in one millisecond stay apart).
-- Why time first: every index keyed by a payment -- its row's, its
-- attempts' (out_trade_no), its audit chain's, its notifications'
-- business keys -- then takes new keys at its right edge, and payments
-- are paid in about the order they are made, so the notifications of one
-- group commit change the same few leaf pages where random ids dirtied a
-- leaf of their own per notification per index (bench/gateway, fresh
-- SQLite store: 41.6 -> 23.1 KiB written per notification, the store's
-- floor 4.5k -> 8.4k jobs/s), and a large store's working set is its
-- recent end, not all of it. The id tells when it was made, as the
-- payment's created_at does to whoever may read it.
local B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
local sub = string.sub
local concat = table.concat

local function time_part(ms)
  local out = {}
  for i = 9, 1, -1 do
    local d = ms % 36
    out[i] = sub(B36, d + 1, d + 1)
    ms = (ms - d) / 36
  end
  return concat(out)
end
_M._time_part = time_part

local function new_id(prefix)
  local ms = floor(require("paygate.core").time() * 1000)
  return prefix .. time_part(ms) .. crypto.random_nonce(11)
end

function _M.new_payment_id() return new_id("pay_") end
function _M.new_refund_id() return new_id("ref_") end

--- syntax: no = model.out_trade_no(payment_id, n)
-- Attempt n's out_trade_no: derived, so never reused (WeChat refuses a
-- reused one with OUT_TRADE_NO_USED). "pay_" + 20 + "_" + n: at most 32.
function _M.out_trade_no(payment_id, n)
  return payment_id .. "_" .. tostring(n)
end

--- syntax: no = model.out_refund_no(refund_id)
function _M.out_refund_no(refund_id)
  return refund_id
end

local function opt(v)
  if v == nil or v == json.null then return nil end
  return v
end
_M.opt = opt

--- syntax: t = model.list(list) -- a JSON array, [] when empty
function _M.list(list)
  return list[1] ~= nil and list or json.empty_array
end

-- How long WeChat honours what a prepay handed out, whatever the order's
-- time_expire: a prepay_id (jsapi, app) and a code_url 2 hours, an h5_url
-- 5 minutes. Past it the payer's client refuses the pay; a new attempt
-- (the same channel again) hands out a fresh one.
local PAY_VALID = { native = 7200, jsapi = 7200, app = 7200, h5 = 300 }

--- syntax: t = model.pay_expires_at(channel, since, expires_at)
-- Whole seconds: when the pay of an attempt made at `since` (its row's
-- created_at, a little before the prepay: never later than WeChat's own
-- end) stops working, or the payment's expires_at if that comes first.
function _M.pay_expires_at(channel, since, expires_at)
  local t = floor(since) + (PAY_VALID[channel] or 300)
  if expires_at and expires_at < t then t = expires_at end
  return t
end

--- syntax: t = model.attempt_json(row[, expires_at])
-- expires_at: the payment's (pay_expires_at is never later)
function _M.attempt_json(a, expires_at)
  local prepay = opt(a.prepay)
  if type(prepay) == "string" then prepay = json.decode(prepay) end
  return { out_trade_no = a.out_trade_no, n = a.n, channel = a.channel,
           sub_appid = opt(a.sub_appid),
           state = a.state, transaction_id = opt(a.transaction_id),
           pay = prepay, created_at = a.created_at,
           pay_expires_at = prepay and _M.pay_expires_at(a.channel,
                                         a.created_at, expires_at) or nil,
           closed_at = opt(a.closed_at) }
end

--- syntax: t = model.refund_json(row, payment)
-- The <refund> of the API. Its merchant is its payment's (payment: the
-- payment's row, or any row with its mchid and sub_mchid), named as the
-- payment's answer names it: mchid always, sub_mchid for a service
-- provider's sub-merchant only. Raises without it: a refund answered
-- without its merchant would leave the merchant API's client guessing
-- whose money it is.
function _M.refund_json(r, p)
  if type(p) ~= "table" or p.mchid == nil then
    error("model.refund_json: the refund's payment (its mchid) is"
          .. " required", 2)
  end
  return { id = r.id, payment_id = r.payment_id,
           out_refund_no = r.out_refund_no, refund_id = opt(r.refund_id),
           amount = r.amount, reason = opt(r.reason),
           reference = opt(r.reference), state = r.state,
           version = r.version, kind = r.kind,
           out_trade_no = r.out_trade_no,
           mchid = p.mchid, sub_mchid = opt(p.sub_mchid),
           created_at = r.created_at, updated_at = r.updated_at }
end

-- the payment states a refund is made from
local REFUNDABLE = { paid = true, partially_refunded = true }
_M.REFUNDABLE = REFUNDABLE

--- syntax: n = model.refundable(p, refunds)
-- The fen still refundable of payment row p, from its refund rows: what
-- a refund create's check (refund_total) leaves. Those that failed or
-- closed give their amount back; the rest count, under way or abnormal
-- (owed to the payer); a duplicate payment's refund returns money the
-- payment never counted. 0 for a payment that is not paid (nothing can
-- be refunded from its state).
function _M.refundable(p, refunds)
  if not REFUNDABLE[p.state] then return 0 end
  local own = {}
  for _, r in ipairs(refunds) do
    if r.kind ~= "duplicate" then own[#own + 1] = r end
  end
  return reconcile.refundable(p.amount, own) or 0
end

--- syntax: t = model.payment_json(row[, attempts[, refunds]])
-- The <payment> of the API: attempts and refunds are rows (or nil); with
-- refunds, also refundable (model.refundable).
function _M.payment_json(p, attempts, refunds)
  local t = { id = p.id, order_id = p.order_id, state = p.state,
              version = p.version, channel = p.channel, amount = p.amount,
              currency = p.currency, refunded = p.refunded or 0,
              out_trade_no = p.out_trade_no,
              transaction_id = opt(p.transaction_id) or json.null,
              mchid = p.mchid, sub_mchid = opt(p.sub_mchid),
              appid = p.appid,
              sub_appid = opt(p.sub_appid),
              description = p.description, attach = opt(p.attach),
              attempt = p.attempt, late = (p.late == 1 or p.late == true)
                                          or nil,
              payer_total = opt(p.payer_total),
              -- money refunded outside this gateway (gw.apply's
              -- refunded_elsewhere): shown only when seen
              refunded_elsewhere = opt(p.refunded_elsewhere_at) and true
                                   or nil,
              created_at = p.created_at, updated_at = p.updated_at,
              expires_at = p.expires_at }
  if attempts then
    local list = {}
    for i, a in ipairs(attempts) do
      list[i] = _M.attempt_json(a, p.expires_at)
    end
    t.attempts = #list > 0 and list or json.empty_array
  end
  if refunds then
    local list = {}
    for i, r in ipairs(refunds) do list[i] = _M.refund_json(r, p) end
    t.refunds = #list > 0 and list or json.empty_array
    t.refundable = _M.refundable(p, refunds)
  end
  return t
end

--- syntax: rows, err = model.attempts(q, payment_id)
function _M.attempts(q, payment_id)
  return q:query("SELECT * FROM gw_attempts WHERE payment_id = $1"
                 .. " ORDER BY n", { payment_id })
end

--- syntax: rows, err = model.refunds_of(q, payment_id)
function _M.refunds_of(q, payment_id)
  return q:query("SELECT * FROM gw_refunds WHERE payment_id = $1"
                 .. " ORDER BY created_at, id", { payment_id })
end

--- syntax: t = model.close_check_at(ctx, mchid)
-- When the payment checks first ask about an attempt closed or
-- superseded here whose close at WeChat is not confirmed (close_check_at):
-- once the calls that may still make it at WeChat (a prepay on its way:
-- the merchant's client deadline) are over, and the close the gateway
-- itself makes after them (close_superseded, payments.after) had its go.
function _M.close_check_at(ctx, mchid)
  local m = ctx.by_mchid and ctx.by_mchid[mchid]
  local deadline = m and m.client and m.client.deadline or 30
  return _M.now() + deadline + 5
end

--- syntax: res, err = model.close_attempts(ctx, tx, payment, now[,
--   confirmed])
-- The payment's open attempt closed (the payment closed or failed).
-- confirmed: the out_trade_no WeChat confirmed closed (its close answered,
-- or a query said CLOSED); any other attempt closed here is remembered
-- (close_check_at) until the payment checks confirm it.
function _M.close_attempts(ctx, tx, p, now, confirmed)
  return tx:exec("UPDATE gw_attempts SET state = 'closed', closed_at = $2,"
                 .. " close_check_at = CASE WHEN out_trade_no = $3 THEN"
                 .. " NULL ELSE CAST($4 AS BIGINT) END WHERE payment_id ="
                 .. " $1 AND state = 'open'", { p.id, now, confirmed or "",
                                 _M.close_check_at(ctx, p.mchid) })
end

--- syntax: yes = model.switching(q, out_trade_no)
-- Whether the gateway itself is closing that attempt, still open, at
-- WeChat for a channel switch (POST attempts marked it, close_check_at,
-- before the close): a CLOSED about it is that close, not the payment's
-- end. (A store error counts as yes: the answer is looked at again.)
function _M.switching(q, no)
  local rows = q:query("SELECT close_check_at FROM gw_attempts WHERE"
                       .. " out_trade_no = $1 AND state = 'open'", { no })
  if not rows then return true end
  return rows[1] ~= nil and opt(rows[1].close_check_at) ~= nil
end

--- syntax: ok, err = model.lock_attempt(tx, out_trade_no)
-- PostgreSQL: the attempt's row locked (FOR UPDATE), first: every
-- transaction that moves a payment off or onto an attempt, or decides on
-- what a read of it says, takes the attempt, then the payment. A resumed
-- create or a switch supersedes the attempt and moves the payment to a
-- new one without changing the payment's version, so its version check
-- does not catch a read of the payment made before that commit and a
-- write made after it (READ COMMITTED). Locked, the reads that follow
-- wait for a switch or resume holding the attempt and see it; one that
-- comes after waits for this transaction. SQLite: one writer at a time
-- already: nothing done.
function _M.lock_attempt(tx, no)
  if tx.engine ~= "postgres" then return true end
  return tx:query("SELECT state FROM gw_attempts WHERE out_trade_no = $1"
                  .. " FOR UPDATE", { no })
end

--- syntax: res, err = model.unmark_switch(q, out_trade_no[, due_by])
-- The switch's mark taken off the attempt, still open (the switch did not
-- happen, or its request died): it stays the payment's. due_by: only a
-- mark due by then (close_check_at <= due_by).
function _M.unmark_switch(q, no, due_by)
  return q:exec("UPDATE gw_attempts SET close_check_at = NULL WHERE"
                .. " out_trade_no = $1 AND state = 'open'"
                .. (due_by and " AND close_check_at <= $2" or ""),
                { no, due_by })
end

--- syntax: res, err = model.close_confirmed(q, out_trade_no)
-- WeChat confirmed the attempt closed (or never made): nothing left to
-- check about it.
function _M.close_confirmed(q, no)
  return q:exec("UPDATE gw_attempts SET close_check_at = NULL WHERE"
                .. " out_trade_no = $1 AND state <> 'open'", { no })
end

--- syntax: row|false, err = model.payment(q, id)
function _M.payment(q, id)
  local rows, err = q:query("SELECT * FROM gw_payments WHERE id = $1",
                            { id })
  if not rows then return nil, err end
  return rows[1] or false
end

--- syntax: row|false, err = model.refund(q, id)
function _M.refund(q, id)
  local rows, err = q:query("SELECT * FROM gw_refunds WHERE id = $1", { id })
  if not rows then return nil, err end
  return rows[1] or false
end

-- WeChat Pay takes at most this many refunds of one order (50)
_M.MAX_REFUNDS = require("paygate.reconcile").MAX_REFUNDS

-- WeChat Pay takes a refund only this long after the payment (a year by
-- any count: 366 days, in seconds)
_M.REFUND_WINDOW = require("paygate.reconcile").REFUND_WINDOW

--- syntax: t, err = model.paid_at(q, payment_id)
-- When the payment was paid, from its payment.succeeded audit entry:
-- WeChat's success_time there (what WeChat counts a refund's year from),
-- else when the gateway recorded it (later than WeChat's time, never
-- earlier). returns: epoch seconds, or false when the entry is not there
-- (an audit month detached from PostgreSQL), or nil, err.
function _M.paid_at(q, payment_id)
  local rows, err = q:query("SELECT at, evidence FROM paygate_audit WHERE"
    .. " subject = $1 AND what = 'payment.succeeded' ORDER BY seq LIMIT 1",
    { "payment:" .. payment_id })
  if not rows then return nil, err end
  local e = rows[1]
  if not e then return false end
  local ev = json.decode(tostring(e.evidence))
  local t = type(ev) == "table" and type(ev.success_time) == "string"
            and civil.epoch(ev.success_time)
  return t or (tonumber(e.at) or 0) / 1000
end

--- syntax: row|false, err = model.refund_by_reference(q, payment_id,
--   reference)
-- The payment's refund that holds the merchant's reference: the one of
-- that reference that did not fail or close (migration 013's unique
-- index keeps it one), or false.
function _M.refund_by_reference(q, payment_id, reference)
  local rows, err = q:query("SELECT * FROM gw_refunds WHERE payment_id = $1"
    .. " AND reference = $2 AND state <> 'failed' AND state <> 'closed'",
    { payment_id, reference })
  if not rows then return nil, err end
  return rows[1] or false
end

--- syntax: n, err = model.refund_count(q, payment_id)
-- The payment's refunds of its paid order that WeChat took or may have
-- taken: every one but those it refused (failed) and the duplicate
-- payments' (refunds of another order).
function _M.refund_count(q, payment_id)
  local rows, err = q:query("SELECT COUNT(*) AS n FROM gw_refunds WHERE"
    .. " payment_id = $1 AND kind <> 'duplicate' AND state <> 'failed'",
    { payment_id })
  if not rows then return nil, err end
  return tonumber(rows[1].n) or 0
end

--- syntax: n, err = model.refund_total(q, payment_id)
-- The fen of the payment's refunds that count against it: every refund
-- of its own money (not one returning a duplicate payment) that did not
-- fail or close.
function _M.refund_total(q, payment_id)
  local rows, err = q:query("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT)"
    .. " AS total FROM gw_refunds WHERE payment_id = $1 AND kind <>"
    .. " 'duplicate' AND state NOT IN ('failed', 'closed')", { payment_id })
  if not rows then return nil, err end
  return tonumber(rows[1].total) or 0
end

return _M
