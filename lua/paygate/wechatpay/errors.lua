-- paygate.wechatpay.errors: the one error shape of the WeChat Pay client
-- and the mapping from an HTTP status plus WeChat's {code, message,
-- detail} to a stable kind.
--
-- Every error is made by paygate.core's core.error, so core.is_error(err)
-- holds and tostring(err) is "kind: message". Fields:
--   kind        stable name (the table below, transport kinds, verifier
--               kinds: bad_signature, stale_timestamp, unknown_serial, ...)
--   message     context first: "POST /v3/refund/domestic/refunds: 400
--               PARAM_ERROR: <WeChat's message>"
--   code        WeChat's code as sent ("PARAM_ERROR"), when there is one
--   wechat_message  WeChat's message as sent
--   status      HTTP status, when a response came back
--   request_id  WeChat's Request-ID header, when present
--   retryable   true when the same request may succeed later
--   detail      WeChat's detail (decoded JSON, opaque), when present
--   retry_after seconds from a 429's or 503's Retry-After, when present
--   clock_skew  s this host's clock is ahead of WeChat's (negative:
--               behind), by the answer's Date header, when WeChat's
--               refusal blames the clock (from_response)
local civil = require "paygate.civil"
local core = require "paygate.core"
local json = require "paygate.json"  -- hardened decoder, same null
local utf8_clean = require("paygate.utf8").clean

local type, tostring = type, tostring

local _M = {}

--- syntax: err = errors.new(kind, message[, fields])
_M.new = function(kind, message, fields)
  return core.error(kind, message, fields)
end

--- syntax: err = errors.invalid_params(field, why)
-- For parameter checks made before any network I/O; err.field names it.
function _M.invalid_params(field, why)
  return core.error("invalid_params", tostring(field) .. ": " .. tostring(why),
                    { field = field })
end

-- WeChat codes, compared without underscores (older docs spell ORDERPAID
-- what newer ones spell ORDER_PAID), to kind and retryable.
-- Internal (errors.CODES: nothing outside this module reads it, and its
-- keys and shape may change); the public list is KINDS, documented in
-- docs/wechatpay.md's Errors with each kind's row.
local CODES = {
  PARAMERROR = { "param_error", false },
  INVALIDREQUEST = { "invalid_request", false },
  SIGNERROR = { "sign_error", false },
  NOAUTH = { "no_auth", false },
  -- not_found is only these: WeChat saying the order or refund does not
  -- exist. A caller may act on it (close the order locally), so a 404
  -- with any other code (NOT_FOUND, a proxy's, an unknown one) is
  -- http_error (by_status), never taken as "no such order"
  ORDERNOTEXIST = { "not_found", false },
  RESOURCENOTEXISTS = { "not_found", false },
  ORDERPAID = { "order_paid", false },
  ORDERCLOSED = { "order_closed", false },
  OUTTRADENOUSED = { "out_trade_no_used", false },
  NOTENOUGH = { "not_enough", false },
  -- sent with status 500, yet repeating cannot help: the parameter is wrong
  OPENIDMISMATCH = { "param_error", false },
  INVALIDTRANSACTIONID = { "param_error", false },
  FREQUENCYLIMITED = { "frequency_limited", true },
  RATELIMITEXCEEDED = { "frequency_limited", true },
  SYSTEMERROR = { "system_error", true },
  BANKERROR = { "system_error", true },
  SERVICEUNAVAILABLE = { "system_error", true },
  STATEMENTCREATING = { "statement_creating", true },
  NOSTATEMENTEXIST = { "no_statement_exist", false },
  APPIDMCHIDNOTMATCH = { "appid_mchid_not_match", false },
  MCHNOTEXISTS = { "mch_not_exists", false },
  RULELIMIT = { "rule_limit", false },
  TRADEERROR = { "trade_error", false },
  ACCOUNTERROR = { "account_error", false },
  USERPAYING = { "user_paying", true },
}
_M.CODES = CODES

-- A status without a code we know.
local function by_status(status)
  if status == 401 then return "sign_error", false end
  if status == 403 then return "no_auth", false end
  if status == 404 then return "http_error", false end  -- see CODES
  if status == 429 then return "frequency_limited", true end
  if status >= 500 then return "system_error", true end
  if status == 400 then return "invalid_request", false end
  return "http_error", false
end

-- Printable, bounded text from hostile bytes (for messages, and the
-- records made of them): control characters and bytes that are not UTF-8
-- as "?", cut at a character's end, "..." when cut.
local function printable(s, max)
  local t, cut = utf8_clean(tostring(s), max)
  if cut then t = t .. "..." end
  return t
end
_M.printable = printable

--- syntax: what, expected = errors.sign_error_blame(err)
-- What a 401 SIGN_ERROR (err.kind "sign_error" of paygate.wechatpay)
-- blames, from WeChat's detail.field or message: "scheme" (the
-- Authorization's signature type is not the variant WeChat holds for the
-- merchant: RSA against SM, or the reverse; expected is the type WeChat
-- names, when it names one), "mchid", "serial", "timestamp", "signature",
-- or nil when it says nothing more.
function _M.sign_error_blame(err)
  local d = type(err.detail) == "table" and err.detail or {}
  local field = type(d.field) == "string" and d.field or ""
  local m = tostring(err.wechat_message or err.message)
  -- first: the scheme is refused before the mchid and the serial are
  -- read, and its message ("Authorization中的认证类型有误") would otherwise
  -- pass for no blame at all, whose fix points at the serial and the mchid
  if field == "schema" or m:find("认证类型", 1, true) then
    return "scheme", m:match("WECHATPAY2%-[%w%-]+")
  elseif field == "mchid" or m:find("mchid", 1, true)
     or m:find("商户号", 1, true) then
    return "mchid"
  elseif field == "serial_no" or m:find("序列号", 1, true)
         or m:lower():find("serial", 1, true) then
    return "serial"
  elseif field == "timestamp" or m:find("timestamp", 1, true) then
    return "timestamp"
  elseif field == "signature" or m:find("验签", 1, true) then
    return "signature"
  end
  return nil
end


-- Whether WeChat refused by its own clock: a SIGN_ERROR over the
-- Authorization's timestamp (5 minutes or more off WeChat's), or a
-- time_expire WeChat takes as not ahead of its now (PARAM_ERROR naming
-- it): what this host's clock, when off, makes WeChat answer.
local function blames_clock(err)
  if err.kind == "sign_error" then
    return _M.sign_error_blame(err) == "timestamp"
  end
  if err.kind == "param_error" or err.kind == "invalid_request" then
    local d = type(err.detail) == "table" and err.detail or {}
    return type(d.field) == "string" and d.field:find("time_expire", 1, true)
           ~= nil or tostring(err.wechat_message):find("time_expire", 1,
                                                      true) ~= nil
  end
  return false
end

-- The refusal that blames the clock, measured: this host's clock against
-- the answer's Date header (WeChat's, to the second), in err.clock_skew
-- (s, positive: this host ahead) and said in the message, so an operator
-- reads by how much the clock is off where WeChat says only that the
-- timestamp is (or that time_expire is not in its future).
local function measure_clock(err, headers, now)
  if not blames_clock(err) then return end
  local date = civil.http_date(headers["date"])
  if not date then return end
  -- the Date header truncates WeChat's clock to its second
  local skew = now - (date + 0.5)
  err.clock_skew = skew
  local s = math.floor(math.abs(skew) + 0.5)
  if s < 2 then
    err.message = err.message .. " (this host's clock agrees with WeChat's"
      .. " Date header, within 2 s)"
  else
    err.message = err.message .. (" (this host's clock is %d s %s WeChat's,"
      .. " by its Date header: sync it, NTP)"):format(s, skew > 0
      and "ahead of" or "behind")
  end
end

--- syntax: err = errors.from_response(what, res[, now])
-- what: "METHOD /path" for the message; res: { status, headers, body }.
-- returns: the error for a non-2xx response (never verified: WeChat does
-- not sign them). One that blames the clock (a SIGN_ERROR over the
-- timestamp, a time_expire refused) also says by how much this host's
-- clock (now: epoch s, default core.time()) is off WeChat's Date header,
-- in err.clock_skew and the message.
function _M.from_response(what, res, now)
  local status = res.status
  local headers = res.headers or {}
  local request_id = headers["request-id"]
  local body = res.body or ""
  local doc = json.decode(body)
  local code, wmsg, detail
  if type(doc) == "table" then
    if type(doc.code) == "string" then code = doc.code end
    if type(doc.message) == "string" then wmsg = doc.message end
    if doc.detail ~= nil and doc.detail ~= json.null then
      detail = doc.detail
    end
  end
  local kind, retryable
  local known = code and CODES[code:upper():gsub("_", "")]
  if known then
    kind, retryable = known[1], known[2]
  else
    kind, retryable = by_status(status)
  end
  -- a 5xx is worth repeating, unless its code says otherwise
  if status >= 500 and not known then retryable = true end
  -- Retry-After on a 429 or 503, in seconds (delta-seconds only; an
  -- HTTP-date or anything else is not read)
  local retry_after
  if status == 429 or status == 503 then
    local ra = headers["retry-after"]
    ra = type(ra) == "string" and ra:match("^[ \t]*(%d+)[ \t]*$")
    if ra and #ra <= 9 then retry_after = tonumber(ra) end
  end
  local msg = what .. ": " .. status
  if code then msg = msg .. " " .. printable(code, 64) end
  if wmsg then
    msg = msg .. ": " .. printable(wmsg, 300)
  elseif not code and #body > 0 then
    msg = msg .. ": " .. printable(body, 200)
  end
  local err = core.error(kind, msg, {
    code = code, wechat_message = wmsg, status = status,
    request_id = request_id, retryable = retryable, detail = detail,
    retry_after = retry_after })
  measure_clock(err, headers, now or core.time())
  return err
end

--- syntax: err = errors.wrap(kind, message, cause[, fields])
-- An error of this module's kind carrying cause (another error) in
-- err.cause and its kind in err.cause_kind.
function _M.wrap(kind, message, cause, fields)
  fields = fields or {}
  fields.cause = cause
  if type(cause) == "table" then fields.cause_kind = cause.kind end
  return core.error(kind, message, fields)
end

-- Every kind this client returns, with its likely cause (docs/wechatpay.md
-- explains the fix). Kept here so a test can check the docs cover them.
-- Public: wechatpay.errors.KINDS (upstream.lua's kind label takes these).
_M.KINDS = {
  "invalid_config", "invalid_params", "param_error", "invalid_request",
  "sign_error", "no_auth", "not_found", "order_paid", "order_closed",
  "out_trade_no_used", "not_enough", "frequency_limited", "system_error",
  "statement_creating", "no_statement_exist", "appid_mchid_not_match",
  "mch_not_exists", "rule_limit", "trade_error", "account_error",
  "user_paying", "http_error", "unverified_response", "unknown_outcome",
  "bad_signature", "stale_timestamp", "unknown_serial", "cert_expired",
  "malformed", "replayed", "replay_check_unavailable", "decrypt_failed",
  "bad_response", "timeout", "connect", "dns", "tls",
  "closed", "body_too_large", "header_too_large", "aborted", "internal",
  -- upstream.lua: the breaker and the degradation switch
  "circuit_open", "degraded",
  -- download_bill
  "hash_mismatch", "too_large", "io",
}


return _M
