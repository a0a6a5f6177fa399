-- gw.refunds: refunds of a payment -- create (never above the paid
-- amount), list, get -- and sending a refund to WeChat, for the merchant
-- API and for the automatic refund of a late payment.
local paygate = require "paygate"
local fsm = require "paygate.fsm"
local reconcile = require "paygate.reconcile"
local json = require "paygate.json"
local model = require "gw.model"
local apply = require "gw.apply"
local payments = require "gw.payments"
local events = require "gw.events"

local type, tostring, ipairs, floor = type, tostring, ipairs, math.floor

local _M = {}

local R = model.refunds
local err_body = payments.err_body
local store_failed = payments.store_failed
local ctx

function _M.init(c) ctx = c end

local REFUNDABLE = model.REFUNDABLE

-- db:transaction's retries of a refund create's serialization failure
-- (PostgreSQL under REPEATABLE READ): each refund of the payment that
-- commits while this one waits on its row fails it once, and a payment
-- has at most 50 refunds (WeChat's limit), so contention is waited out,
-- not answered 503 as a store failure.
local REFUND_TX_RETRIES = 50

-- WeChat answered with a refusal: the refund was not made.
local function refused(err)
  local k = err.kind
  -- (invalid_params: the client's own checks refused it; nothing was sent)
  if k == "invalid_params" then return true end
  return type(err.status) == "number" and err.status >= 400
         and err.status < 500 and k ~= "frequency_limited"
         and k ~= "unknown_outcome" and k ~= "unverified_response"
end

-- WeChat refused a refund as more than what is left to refund of the
-- order. The gateway sends none above what its own refunds leave, so
-- WeChat counts more refunded than this gateway made: money refunded
-- outside it (gw.apply's refunded_elsewhere). WeChat's words for it are
-- not documented: 400 INVALID_REQUEST naming /amount/refund (the
-- simulator's, with "申请退款金额超过订单可退金额"), or a refusal whose
-- message speaks of what can be refunded (可退: "refund_fee大于可退金额")
-- or of an order refunded in full (全额退款: "订单已全额退款").
local function exceeds_left(err)
  if not refused(err) or err.kind == "invalid_params" then return false end
  local d = err.detail
  if err.kind == "invalid_request" and type(d) == "table"
     and d.field == "/amount/refund" then
    return true
  end
  local m = err.wechat_message
  return type(m) == "string" and (m:find("可退", 1, true) ~= nil
                                  or m:find("全额退款", 1, true) ~= nil)
end

-- The call was not made: the degradation switch is on, or the refund
-- endpoint's circuit breaker is open. send() leaves the refund as it was
-- (created: the refund checks send it once calls go out again); the
-- merchant API's create ends it instead (not_sent below).
local NOT_SENT = { degraded = true, circuit_open = true }

-- WeChat's answer to a refund call is the refund as it stands (an
-- out_refund_no sent again is answered with it, settled or not): applied
-- as its notification would be; any other status as accepted.
local STATUSES = { SUCCESS = true, PROCESSING = true, CLOSED = true,
                   ABNORMAL = true }

-- Refund row now failed (WeChat refused it, or the merchant API's call of
-- it was never made: not_sent): no money goes back through it. Said as
-- refund.failed, as every settled refund has its event: the merchant's
-- systems may not hear of it
-- otherwise (an automatic refund of a late payment, announced by
-- payment.late_paid with action "refund"; a refund the refund checks
-- sent again after its request died or was answered 504). An automatic
-- one also raises an alarm (refund_failed): the money stays with the
-- merchant until a person gives it back.
local function refund_failed(tx, rf, werr)
  local p, err = model.payment(tx, rf.payment_id)
  if not p then return nil, err or paygate.error("not_found", "payment") end
  if rf.kind ~= "merchant" then
    tx:on_commit(function()
      paygate.log.error("gateway: WeChat Pay refused an automatic refund;"
        .. " the money stays with the merchant until a person returns it",
        apply.merchant_fields(p, { payment = p.id, refund = rf.id,
          kind = rf.kind, out_trade_no = rf.out_trade_no,
          out_refund_no = rf.out_refund_no, amount = rf.amount,
          wechat_kind = werr.kind, wechat_code = werr.code,
          reason = tostring(werr.message) }))
    end)
    apply.count_alarm(tx, "refund_failed")
  end
  return events.emit(tx, "refund.failed", p, rf,
                     { wechat_kind = werr.kind, wechat_code = werr.code })
end

--- syntax: row, how, err = refunds.send(id[, finish[, actor]])
-- Sends refund `id` (state created or unknown) to WeChat and applies the
-- answer through the refund machine. finish(tx, row, how, err), when
-- given, runs in the transaction of that change (to store the merchant
-- API's answer with it). how: "accepted", "rejected" or "unknown".
-- how "not_sent": the call was not made (degraded, circuit_open).
-- actor: the audit entries' actor (default "gateway").
-- returns: finish's values when given, else the refund row and how; or
-- nil, err when the store failed.
function _M.send(id, finish, actor)
  actor = actor or "gateway"
  local db = ctx.db
  local rf, err = model.refund(db, id)
  if not rf then return nil, err or paygate.error("not_found", id) end
  local p
  p, err = model.payment(db, rf.payment_id)
  if not p then return nil, err or paygate.error("not_found", "payment") end
  local wx = ctx.wx[p.mchid]
  if not wx then return nil, payments.merchant_not_configured(p) end
  local req = { out_trade_no = rf.out_trade_no,
                out_refund_no = rf.out_refund_no,
                notify_url = ctx.notify_url(p.mchid),
                amount = { refund = rf.amount, total = p.amount,
                           currency = p.currency } }
  if model.opt(rf.reason) then req.reason = rf.reason end
  if model.opt(p.sub_mchid) then req.sub_mchid = p.sub_mchid end
  local data, werr = wx:refund(req)
  local how = data and "accepted"
              or NOT_SENT[werr.kind] and "not_sent"
              or refused(werr) and "rejected" or "unknown"
  if not data then
    paygate.log.warn("gateway: refund call failed", { refund = id,
                     kind = werr.kind, reason = tostring(werr.message),
                     how = how })
  end
  return fsm.retry(db, function(tx)
    local row, terr = model.refund(tx, id)
    if not row then return nil, terr end
    if data then
      local outcome
      outcome, terr = apply.refund_status(ctx, tx, row, {
        status = STATUSES[data.status] and data.status or "PROCESSING",
        refund_id = data.refund_id, success_time = data.success_time,
        source = "refund_call", actor = actor })
      if not outcome then return nil, terr end
    elseif how ~= "not_sent"
           and (row.state == "created" or row.state == "unknown") then
      local event = how == "rejected" and "rejected" or "outcome_unknown"
      if R:can(row.state, event) then
        local res
        res, terr = R:transition(tx, id, event, { row = row,
          cause = "refund_call", actor = actor,
          evidence = { kind = werr.kind, code = werr.code },
          set = { updated_at = model.time() } })
        if not res then return nil, terr end
        if event == "rejected" then
          local ok
          ok, terr = refund_failed(tx, res.row, werr)
          if not ok then return nil, terr end
          if exceeds_left(werr) then
            local p2
            p2, terr = model.payment(tx, row.payment_id)
            if not p2 then
              return nil, terr or paygate.error("not_found", "payment")
            end
            ok, terr = apply.refunded_elsewhere(tx, p2, {
              source = "refund_call", actor = actor,
              out_trade_no = row.out_trade_no, wechat_code = werr.code })
            if not ok then return nil, terr end
          end
        end
      end
    end
    row, terr = model.refund(tx, id)
    if not row then return nil, terr end
    if finish then return finish(tx, row, how, werr) end
    return row, how
  end)
end

-- POST /v1/payments/:id/refunds ---------------------------------------------

local FIELDS = { amount = true, reason = true, reference = true }

-- The merchant's reference of a refund (its return, RMA or ticket id): an
-- id, compared byte for byte, so no spaces (a "RMA-7 " that reads as
-- "RMA-7" would be another reference, and another refund of it)
local MAX_REFERENCE = 64
local BAD_REFERENCE = "must be 1.." .. MAX_REFERENCE .. " printable ASCII"
  .. " characters, no spaces (the merchant's return, RMA or ticket id)"

local function is_reference(v)
  return type(v) == "string" and v ~= "" and #v <= MAX_REFERENCE
         and not v:find("[^\33-\126]")
end

local function check(b)
  local bad = {}
  payments.unknown_fields(b, FIELDS, bad)
  if type(b.amount) ~= "number" or b.amount % 1 ~= 0 or b.amount < 1
     or b.amount > payments.MAX_AMOUNT then
    bad.amount = "must be a whole number of fen, 1 .. "
                 .. payments.MAX_AMOUNT
  end
  if b.reason ~= nil and (type(b.reason) ~= "string" or b.reason == ""
                          or (payments.text_len(b.reason) or 81) > 80) then
    bad.reason = "must be 1..80 characters of UTF-8 text (no emoji, no"
      .. " control characters)"
  end
  if b.reference ~= nil and not is_reference(b.reference) then
    bad.reference = BAD_REFERENCE
  end
  return next(bad) == nil, bad
end

-- The answer to a refund asked with a reference that refund rf of the
-- payment p holds already (not failed or closed): it is not made again,
-- whatever the amount or the Idempotency-Key; the caller follows rf.
local function reference_used(rf, p)
  return 409, err_body("refund_reference_used", "refund " .. rf.id
    .. " (" .. rf.state .. ", " .. rf.amount .. " fen) of payment "
    .. rf.payment_id .. " has this reference already: a reference is"
    .. " refunded once; follow that refund (GET /v1/refunds/" .. rf.id
    .. ")", { refund = model.refund_json(rf, p) })
end

-- The store refused a refund's insert by the unique index of references
-- (migration 013): another request of the same reference committed its
-- refund first (a race the read inside the transaction did not see).
local function reference_taken(err)
  return type(err) == "table" and err.kind == "constraint"
         and type(err.constraint) == "string"
         and err.constraint:find("reference", 1, true) ~= nil
end

-- The store failed once the refund was (or may have been) stored, and
-- perhaps sent: a retry under a new key would be a second refund (the
-- refund checks send this one), so the answer says to retry under this
-- one, which finds it by its request_key.
local function stored_failed(err, rf, p)
  local st, eb = store_failed(err)
  eb.message = "the store failed after the refund was stored (it may be"
    .. " at WeChat Pay already); retry with the same Idempotency-Key, not"
    .. " a new one (" .. tostring(type(err) == "table" and err.kind) .. ")"
  if rf then eb.refund = model.refund_json(rf, p) end
  return st, eb
end

-- The refund call was not made (degraded, circuit_open). A 503 reads as
-- "nothing done", and a retry under a new key makes another refund: so
-- this one ends here (failed, cause not_sent; out of the refunded total)
-- and is never sent. Its request_key is let go: the answer is not kept
-- (a 503), and a retry under the same key makes a new refund.
-- earlier: the refund was found by its request_key, made by an earlier run
-- of this request, which may have sent it (its run died during the call,
-- or the store failed to record WeChat's answer): not this call's to end.
-- It stays as it is, counted (the refund checks settle it), and the
-- answer says to retry with the same key.
local function not_sent(tx, p, row, werr, actor, earlier)
  local st, eb, hd = payments.wx_failure(werr)
  if earlier then
    eb.message = "WeChat Pay was not called now (" .. tostring(werr)
      .. "); this refund was stored by an earlier run of this request and"
      .. " may be at WeChat Pay already: retry with the same"
      .. " Idempotency-Key, not a new one"
  elseif row.state == "created" then
    local res, err = R:transition(tx, row.id, "rejected", { row = row,
      cause = "not_sent", actor = actor,
      evidence = { kind = werr.kind,
                   request_key = model.opt(row.request_key) },
      set = { request_key = json.null, updated_at = model.time() } })
    if not res then return nil, err end
    row = res.row
    local ok
    ok, err = refund_failed(tx, row, werr)
    if not ok then return nil, err end
    eb.message = "WeChat Pay was not called (" .. tostring(werr) .. "):"
      .. " no refund was made, and this one is failed; retry (with any"
      .. " Idempotency-Key) once calls go out again"
  end
  eb.refund = model.refund_json(row, p)
  return st, eb, hd
end

function _M.create(req, ik)
  local b, st, eb = payments.body_of(req)
  if not b then return st, eb end
  local ok, bad = check(b)
  if not ok then return payments.bad_request(bad) end
  local db = ctx.db
  local p, err = payments.load_own(req)
  if p == nil then return store_failed(err) end
  if not p then return payments.not_found("payment") end
  local us, ub = payments.unconfigured(p)
  if us then return us, ub end
  if ctx.degraded() then return payments.degraded() end
  local key = req:header("Idempotency-Key")
  local request_key = key and (tostring(req.app_id) .. "|" .. key) or nil
  local now = model.time()
  local res
  res, err = fsm.retry(db, function(tx)
    if tx.engine == "postgres" then
      -- refunds of one payment take turns: the sum below stays true. The
      -- row is written, not only locked (FOR UPDATE): under REPEATABLE
      -- READ (a database's default_transaction_isolation) the waiting
      -- transaction's snapshot predates the other's commit, and a row
      -- only locked there would let it sum the refunds without the
      -- other's; a row written there fails it (serialization, tried
      -- again with a fresh snapshot: up to REFUND_TX_RETRIES times, as
      -- many refunds at once of one payment each wait for all those
      -- ahead). READ COMMITTED reads anew anyway.
      local _, lerr = tx:exec("UPDATE gw_payments SET id = id WHERE id = $1",
                              { p.id })
      if lerr then return nil, lerr end
    end
    if request_key then
      -- a retry of a request whose run died before its answer was stored
      -- (or whose key's record expired): that request's refund, if it is
      -- one; a refund of another payment or amount made under this key
      -- is not this request's
      local rows, qerr = tx:query("SELECT * FROM gw_refunds WHERE"
        .. " request_key = $1", { request_key })
      if not rows then return nil, qerr end
      local found = rows[1]
      if found then
        if found.payment_id ~= p.id or found.amount ~= b.amount
           or model.opt(found.reason) ~= b.reason
           or model.opt(found.reference) ~= b.reference then
          return { status = 422, body = err_body("idempotency_key_reused",
            "this Idempotency-Key was used with another refund ("
            .. found.id .. ")") }
        end
        return { refund = found, earlier = true }
      end
    end
    -- the merchant's reference refunded already: that refund is the
    -- answer, before what the payment's state or total would say (a
    -- payment the first refund emptied is no reason to the caller).
    -- Refunds of one payment take turns (above; SQLite: one writer), so
    -- this read sees one committed before; the unique index holds it
    -- whatever the order (reference_taken below)
    if b.reference then
      local held, herr = model.refund_by_reference(tx, p.id, b.reference)
      if held == nil then return nil, herr end
      if held then return { held = held } end
    end
    local row, qerr = model.payment(tx, p.id)
    if not row then return nil, qerr end
    if not REFUNDABLE[row.state] then
      -- (what to do next said where there is something to do: an unknown
      -- payment may well be paid, and a query settles it)
      return { status = 409, body = err_body("invalid_state", "payment "
        .. p.id .. " is " .. row.state .. ": only a paid payment is"
        .. " refunded" .. (row.state == "unknown" and "; its outcome is"
        .. " not known yet: ask WeChat Pay first (GET /v1/payments/" .. p.id
        .. "?refresh=1, or the console's Query WeChat now), then refund"
        .. " once it is paid" or row.state == "paying" and "; it is not"
        .. " paid yet (close it instead to stop the payer paying)" or "")) }
    end
    local total
    total, qerr = model.refund_total(tx, p.id)
    if not total then return nil, qerr end
    if total + b.amount > row.amount then
      return { status = 422, body = err_body("refund_exceeds_paid",
        "refunds would reach " .. (total + b.amount) .. " fen of the "
        .. row.amount .. " paid", { refundable = row.amount - total }) }
    end
    -- WeChat refuses a 51st refund of one order: said here, before the
    -- refund is made and sent, instead of as its refusal (502)
    local count
    count, qerr = model.refund_count(tx, p.id)
    if not count then return nil, qerr end
    if count >= model.MAX_REFUNDS then
      return { status = 422, body = err_body("refund_limit", "payment "
        .. p.id .. " has " .. count .. " refunds: WeChat Pay takes at most "
        .. model.MAX_REFUNDS .. " of one payment", { refunds = count,
        refundable = row.amount - total }) }
    end
    -- WeChat refuses a refund more than a year after the payment: said
    -- here too. Without the payment's audit entry (a detached audit
    -- month) WeChat is left to judge
    local paid_at
    paid_at, qerr = model.paid_at(tx, p.id)
    if paid_at == nil then return nil, qerr end
    if paid_at and now - paid_at > model.REFUND_WINDOW then
      return { status = 422, body = err_body("refund_too_late", "payment "
        .. p.id .. " was paid " .. floor((now - paid_at) / 86400)
        .. " days ago: WeChat Pay takes a refund within a year of the"
        .. " payment only", { paid_at = paid_at }) }
    end
    local id = model.new_refund_id()
    local created
    created, qerr = R:create(tx, {
      id = id, payment_id = p.id, out_refund_no = model.out_refund_no(id),
      out_trade_no = model.opt(row.paid_out_trade_no) or row.out_trade_no,
      kind = "merchant", amount = b.amount, reason = b.reason or json.null,
      reference = b.reference or json.null,
      request_key = request_key or json.null, created_at = now,
      updated_at = now }, { cause = "refund", actor = "app:"
      .. tostring(req.app_id), evidence = { amount = b.amount,
                                           reference = b.reference } })
    if not created then return nil, qerr end
    return { refund = created.row }
  end, { retries = REFUND_TX_RETRIES })
  if not res and b.reference and reference_taken(err) then
    local held
    held, err = model.refund_by_reference(db, p.id, b.reference)
    if held then return reference_used(held, p) end
    if held == false then
      -- (the refund that held it failed or closed since: the reference
      -- is free again, and a retry makes the refund; a 503 is not kept
      -- for the Idempotency-Key)
      return 503, err_body("unavailable", "another refund of this"
        .. " reference was made at the same time and has ended since:"
        .. " nothing was made; retry")
    end
  end
  if not res then
    if type(err) == "table" and err.kind == "unknown_outcome" then
      -- the refund may be stored all the same (the refund checks then
      -- send it): only a retry under this key finds it
      return stored_failed(err)
    end
    return store_failed(err)
  end
  if res.status then return res.status, res.body end
  if res.held then return reference_used(res.held, p) end
  local rf = res.refund
  if rf.state ~= "created" and rf.state ~= "unknown" then
    -- the request ran before and its refund went on (or ended): answered
    -- as it is, not sent again (a refund WeChat refused stays refused)
    if rf.state == "failed" then
      return 502, err_body("wechat_error", "WeChat Pay refused the refund",
                           { refund = model.refund_json(rf, p) })
    end
    return 201, model.refund_json(rf, p)
  end
  local actor = "app:" .. tostring(req.app_id)
  local a, c, d = _M.send(res.refund.id, function(tx, row, how, werr)
    if how == "not_sent" then
      return not_sent(tx, p, row, werr, actor, res.earlier)
    end
    if how == "rejected" and exceeds_left(werr) then
      -- (was a bare 502: an agent refunding money already given back
      -- elsewhere learnt nothing of why)
      local p2, qerr = model.payment(tx, row.payment_id)
      if not p2 then
        return nil, qerr or paygate.error("not_found", "payment")
      end
      local total
      total, qerr = model.refund_total(tx, row.payment_id)
      if not total then return nil, qerr end
      return ik:respond(tx, 409, err_body("refunded_elsewhere", "WeChat"
        .. " Pay refused the refund as more than what is left to refund of"
        .. " the order (" .. tostring(werr) .. "), while the refunds made"
        .. " here come to " .. total .. " fen of the " .. p2.amount
        .. " paid: money was most likely refunded outside this gateway (in"
        .. " the merchant platform, by another system on the merchant"
        .. " number, or after the backup its store was restored from). The"
        .. " payment is flagged refunded_elsewhere; the day's trade bill"
        .. " lists that refund. Refund at most what WeChat Pay has left",
        { wechat_kind = werr.kind, wechat_code = werr.code,
          refund = model.refund_json(row, p) }))
    end
    if how == "rejected" then
      -- (the key keeps this answer: a retry must be a new request)
      return ik:respond(tx, 502, err_body("wechat_error", "WeChat Pay"
        .. " refused the refund: " .. tostring(werr) .. ". The refund is"
        .. " failed; this Idempotency-Key keeps this answer: to try again"
        .. " once the cause is mended, send a new request with a new"
        .. " Idempotency-Key",
        { wechat_kind = werr.kind, wechat_code = werr.code,
          refund = model.refund_json(row, p) }))
    end
    if how == "unknown" and (werr.kind == "timeout"
                             or werr.kind == "unknown_outcome") then
      -- (payments' words: a lost connection said as such, not as slow)
      return ik:respond(tx, 504, err_body("timeout",
        payments.unknown_words(werr) .. "; the refund is checked again"
        .. " later", { refund = model.refund_json(row, p) }))
    end
    if how == "unknown" then
      -- WeChat failed it (a 5xx, an answer that does not verify) or it
      -- did not leave: the refund is unknown and checked again later
      local st, eb = payments.wx_failure(werr,
                                         { refund = model.refund_json(row, p) })
      return ik:respond(tx, st, eb)
    end
    return ik:respond(tx, 201, model.refund_json(row, p))
  end)
  if a == nil then return stored_failed(c, rf, p) end
  return a, c, d
end

--- syntax: ok, err = refunds.refresh_open(p[, refund_id])
-- Queries the payment's refunds still under way (processing, unknown,
-- created, abnormal: an abnormal-refund application may have ended), or
-- only refund_id's, and applies what WeChat says.
function _M.refresh_open(p, refund_id)
  local q, args = "SELECT * FROM gw_refunds WHERE payment_id = $1 AND state"
    .. " IN ('processing', 'unknown', 'created', 'abnormal')", { p.id }
  if refund_id then q, args[2] = q .. " AND id = $2", refund_id end
  local rows, err = ctx.db:query(q, args)
  if not rows then return nil, err end
  local wx = ctx.wx[p.mchid]
  for _, rf in ipairs(rows) do
    -- (on success the second value is the answer's meta)
    local data, qerr = wx:query_refund(rf.out_refund_no,
                                       model.opt(p.sub_mchid))
    if not data then
      if qerr.kind ~= "not_found" then return nil, qerr end
    else
      local ok, aerr = fsm.retry(ctx.db, function(tx)
        local row, terr = model.refund(tx, rf.id)
        if not row then return nil, terr end
        return apply.refund_status(ctx, tx, row, {
          status = data.status, refund_id = data.refund_id,
          amount = type(data.amount) == "table" and data.amount.refund
                   or nil, success_time = data.success_time,
          source = "query", via = "refresh", actor = "gateway:query",
          answered_at = reconcile.answered_at(qerr) })
      end)
      if not ok then return nil, aerr end
    end
  end
  return true
end

-- GET /v1/payments/:id/refunds, GET /v1/refunds/:id -------------------------

-- ?refresh=1 of the refund routes: asks WeChat about payment p's refunds
-- under way (only refund_id's, when given) and applies the answers, as the
-- payment's ?refresh=1 does for its refunds. returns: true when the local
-- state is stale (degraded: nothing is asked; WeChat could not be asked).
-- Was: refresh taken and ignored, a refund settled at WeChat whose
-- notification was lost answered processing with no word that nothing
-- was asked.
local function refreshed(p, refund_id)
  if ctx.degraded() then return true end
  -- (its merchant taken out of the config: nothing can be asked, said
  -- as the payment's ?refresh=1 says it)
  local ok
  local err = payments.merchant_not_configured(p)
  if not err then ok, err = _M.refresh_open(p, refund_id) end
  if not ok then
    paygate.log.warn("gateway: refund refresh failed; answering local"
      .. " state", { payment = p.id, refund = refund_id,
                     kind = type(err) == "table" and err.kind or nil,
                     reason = type(err) == "table" and tostring(err.message)
                              or tostring(err) })
    return true
  end
  return nil
end

function _M.list(req)
  local refresh, st, eb = payments.refresh_asked(req)
  if refresh == nil then return st, eb end
  local p, err = payments.load_own(req)
  if p == nil then return store_failed(err) end
  if not p then return payments.not_found("payment") end
  local stale = ctx.degraded() or nil
  if refresh then stale = refreshed(p) end
  local rows
  rows, err = model.refunds_of(ctx.db, p.id)
  if not rows then return store_failed(err) end
  local list = {}
  for i, r in ipairs(rows) do list[i] = model.refund_json(r, p) end
  return 200, { refunds = model.list(list), stale = stale }
end

function _M.get(req)
  local refresh, st, eb = payments.refresh_asked(req)
  if refresh == nil then return st, eb end
  -- (and its payment's merchant, which the answer names)
  local rows, err = ctx.db:query("SELECT r.*, p.app_id AS app_id, p.mchid"
    .. " AS mchid, p.sub_mchid AS sub_mchid FROM gw_refunds r JOIN"
    .. " gw_payments p ON p.id = r.payment_id WHERE r.id = $1",
    { req.params.id })
  if not rows then return store_failed(err) end
  local r = rows[1]
  if not r or r.app_id ~= req.app_id then
    return payments.not_found("refund")
  end
  local stale = ctx.degraded() or nil
  local who = r
  if refresh then
    local p
    p, err = model.payment(ctx.db, r.payment_id)
    if p == nil then return store_failed(err) end
    if p then
      stale = refreshed(p, r.id)
      local now
      now, err = model.refund(ctx.db, r.id)     -- as the answer left it
      if now == nil then return store_failed(err) end
      r = now or r
    end
  end
  local t = model.refund_json(r, who)
  if stale then t.stale = true end
  return 200, t
end

return _M
