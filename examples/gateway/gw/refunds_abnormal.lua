-- gw.refunds_abnormal: POST /v1/refunds/{id}/abnormal -- a refund that
-- ended ABNORMAL (the payer's card was closed, the account frozen: WeChat
-- could not pay the money back where it came from) sent again, to a bank
-- card, through WeChat's abnormal-refund API:
--   { "type": "MERCHANT_BANK_CARD" }   the merchant's own account (its
--                                      staff then pays the payer back)
--   { "type": "USER_BANK_CARD", "bank_type": "ICBC_DEBIT",
--     "bank_account": "6222...", "real_name": "..." }   the payer's card
-- The card number and the name are the payer's personal data: sent to
-- WeChat encrypted with its key (wx:abnormal_refund), and kept nowhere
-- here -- not in the store, the audit trail (which is never erased), a
-- log line or an error message. The audit entry says that an application
-- was made, of which type, by whom, and WeChat's answer.
--
-- The refund stays abnormal until WeChat says how the application ended
-- (gw.apply: a PROCESSING answer keeps it abnormal; SUCCESS or CLOSED
-- settle it, by notification, by query, or by the refund checks, which
-- this route schedules again from now).
local paygate = require "paygate"
local audit = require "paygate.audit"
local model = require "gw.model"
local payments = require "gw.payments"

local type, tostring, floor = type, tostring, math.floor

local _M = {}

local err_body = payments.err_body
local ctx

function _M.init(c) ctx = c end

local TYPES = { USER_BANK_CARD = true, MERCHANT_BANK_CARD = true }
local FIELDS = { type = true, bank_type = true, bank_account = true,
                 real_name = true }
local CARD_FIELDS = { "bank_type", "bank_account", "real_name" }

-- The refund checks ask WeChat this long after an application (its
-- outcome is usually known within minutes; a notification may say it
-- first).
_M.CHECK_AFTER = 60

-- The body's faults by field (never quoting the card number or the name).
local function check(b)
  local bad = {}
  payments.unknown_fields(b, FIELDS, bad)
  if not TYPES[b.type] then
    bad.type = "must be USER_BANK_CARD (the payer's card: bank_type,"
      .. " bank_account and real_name) or MERCHANT_BANK_CARD (the"
      .. " merchant's own account)"
    return bad
  end
  if b.type == "MERCHANT_BANK_CARD" then
    for _, k in ipairs(CARD_FIELDS) do
      if b[k] ~= nil then
        bad[k] = "not taken with MERCHANT_BANK_CARD: the money goes to"
          .. " the merchant's own account"
      end
    end
    return bad
  end
  if type(b.bank_type) ~= "string" or not b.bank_type:match("^[%u%d_]+$")
     or #b.bank_type > 32 then
    bad.bank_type = "required with USER_BANK_CARD: WeChat's code of the"
      .. " card's bank and kind, e.g. ICBC_DEBIT (capitals, digits, _)"
  end
  local acct = b.bank_account
  if type(acct) ~= "string" or not acct:match("^%d+$") or #acct < 8
     or #acct > 32 then
    bad.bank_account = "required with USER_BANK_CARD: the card number,"
      .. " 8 to 32 digits, no spaces"
  end
  local n = type(b.real_name) == "string" and payments.text_len(b.real_name)
  if not n or n < 1 or n > 64 then
    bad.real_name = "required with USER_BANK_CARD: the card holder's name,"
      .. " 1 to 64 characters of text"
  end
  return bad
end

-- The refund of id, if the caller's app owns its payment: row, payment;
-- false when not (or not there); nil, err when the store failed.
local function load_own(req)
  local rf, err = model.refund(ctx.db, req.params.id)
  if not rf then return rf, err end
  local p
  p, err = model.payment(ctx.db, rf.payment_id)
  if not p then return p, err end
  if p.app_id ~= req.app_id then return false end
  return rf, p
end

function _M.handler(req)
  local b, st, eb = payments.body_of(req)
  if not b then return st, eb end
  local bad = check(b)
  if next(bad) then return payments.bad_request(bad) end
  local rf, p = load_own(req)
  if rf == nil then return payments.store_failed(p) end
  if not rf then return payments.not_found("refund") end
  if rf.state ~= "abnormal" then
    return 409, err_body("refund_not_abnormal", "refund " .. rf.id .. " is "
      .. rf.state .. ": only an abnormal refund (WeChat could not pay it"
      .. " back to where the money came from) is sent to a bank card",
      { refund = model.refund_json(rf, p) })
  end
  if model.opt(rf.refund_id) == nil then
    -- (the abnormal-refund API names the refund by WeChat's id, which an
    -- abnormal refund's notification or query gives)
    return 409, err_body("refund_id_unknown", "WeChat's refund_id of"
      .. " refund " .. rf.id .. " is not known yet: ask WeChat first"
      .. " (GET /v1/refunds/" .. rf.id .. "?refresh=1), then send this"
      .. " again", { refund = model.refund_json(rf, p) })
  end
  if ctx.degraded() then return payments.degraded() end
  local ust, ubody = payments.unconfigured(p)
  if ust then return ust, ubody end
  local wx = ctx.wx[p.mchid]
  local data, werr = wx:abnormal_refund({
    refund_id = rf.refund_id, out_refund_no = rf.out_refund_no,
    type = b.type, bank_type = b.bank_type, bank_account = b.bank_account,
    real_name = b.real_name, sub_mchid = model.opt(p.sub_mchid) })
  if not data then
    paygate.log.warn("gateway: WeChat Pay did not take an abnormal-refund"
      .. " application", { refund = rf.id, payment = p.id, type = b.type,
                           kind = werr.kind, code = werr.code })
    return payments.wx_failure(werr, { refund = model.refund_json(rf, p) })
  end
  -- recorded: who applied, how, what WeChat answered; and the refund
  -- checked again from now (the outcome, should no notification come)
  local now = model.time()
  local status = type(data.status) == "string" and data.status or nil
  local ok, err = ctx.db:transaction(function(tx)
    local e, aerr = audit.append(tx, "refund:" .. rf.id, {
      what = "refund.abnormal_applied", actor = "app:" .. tostring(req.app_id),
      cause = "abnormal_refund", evidence = {
        type = b.type, bank_type = b.bank_type, status = status,
        refund_id = rf.refund_id, out_refund_no = rf.out_refund_no } })
    if not e then return nil, aerr end
    return tx:exec("UPDATE gw_refunds SET checks = 0, next_check_at = $2"
      .. " WHERE id = $1", { rf.id, floor(now) + _M.CHECK_AFTER })
  end)
  if not ok then
    -- WeChat took it: the application stands whatever the store says
    paygate.log.error("gateway: an abnormal-refund application WeChat"
      .. " took was not recorded", { refund = rf.id, type = b.type,
                                     error = tostring(err) })
  end
  paygate.log.info("gateway: abnormal refund sent to a bank card", {
    refund = rf.id, payment = p.id, type = b.type, status = status })
  local t = model.refund_json(rf, p)
  t.application = { type = b.type, status = status, applied_at = now }
  return 202, t
end

return _M
