-- paygate.wechatpay.verify: checks WeChat Pay's signature on a response or
-- a notification. Pure functions over (headers, body, keys, now): no I/O,
-- so the client, the notification parser and the CLI share them.
--
-- WeChat signs  TIMESTAMP \n NONCE \n BODY \n  (BODY the raw bytes as
-- received) and sends Wechatpay-Timestamp, -Nonce, -Signature (base64),
-- -Serial (a platform certificate serial or a PUB_KEY_ID_...) and, for the
-- SM variant, Wechatpay-Signature-Type. That header is optional: absent,
-- it means WECHATPAY2-SHA256-RSA2048 (the SDKs' default), so a client of
-- the SM variant refuses an answer that does not name its type.
local core = require "paygate.core"
local errors = require "paygate.wechatpay.errors"

local type, tonumber, pairs, tostring = type, tonumber, pairs, tostring
local printable = errors.printable
local byte = string.byte

local _M = {}

-- A timestamp this many seconds or more away from now is stale.
_M.WINDOW = 300

-- Bounds on header values (hostile input): the key ring refuses ids over
-- 128 bytes; an RSA-4096 signature is 684 base64 characters.
local MAX_SERIAL, MAX_NONCE, MAX_SIG = 128, 256, 2048

local SIG_TYPES = {
  ["WECHATPAY2-SHA256-RSA2048"] = true,
  ["WECHATPAY2-SM2-WITH-SM3"] = true,
}

--- syntax: v, n = verify.header(headers, name)
-- name in lower case. headers: a table, looked up as given and, for
-- tables made by hand ({ ["Wechatpay-Serial"] = ... }),
-- case-insensitively; or the server's request itself (req), whose
-- req:header(name) reads the head without building req.headers; then n
-- is how many fields of that name the request has (nil for a table).
local function req_header(req, name)
  return req:header(name)
end

function _M.header(headers, name)
  if type(headers) == "userdata" then
    -- (pcall: a userdata that is not a request, or a request whose
    -- handler has returned, has no header to give: nil)
    local ok, v, n = pcall(req_header, headers, name)
    if ok and type(v) == "string" then return v, n end
    return nil
  end
  local v = headers[name]
  if v ~= nil then return v end
  local n = #name
  for k, val in pairs(headers) do
    if type(k) == "string" and #k == n and k:lower() == name then
      return val
    end
  end
  return nil
end
local header = _M.header

-- A request's five Wechatpay-* fields, each value with its count (one
-- pcall and one call into C for the five: parse_headers')
local function req_headers(req)
  return req:header("wechatpay-timestamp", "wechatpay-nonce",
                    "wechatpay-signature", "wechatpay-serial",
                    "wechatpay-signature-type")
end

--- syntax: msg = verify.message(ts, nonce, body)
function _M.message(ts, nonce, body)
  return ts .. "\n" .. nonce .. "\n" .. body .. "\n"
end

local function fail(kind, msg, fields)
  return nil, core.error(kind, msg, fields)
end

-- Whether s is 1 to 12 ASCII digits (byte by byte: a pattern match ends
-- the JIT's trace, on every notification)
local function digits(s)
  local n = #s
  if n == 0 or n > 12 then return false end
  for i = 1, n do
    local b = byte(s, i)
    if b < 48 or b > 57 then return false end
  end
  return true
end

--- syntax: sig, err = verify.parse_headers(headers)
-- returns: { timestamp (string), ts (number), nonce, signature, serial,
-- sig_type } or nil, err (malformed).
function _M.parse_headers(headers)
  if type(headers) ~= "table" and type(headers) ~= "userdata" then
    return fail("malformed", "no headers")
  end
  -- (a request's fields counted: one sent twice is refused, never read
  -- as its first copy; a table's repeats are joined, and fail below)
  local ts, n1, nonce, n2, sig, n3, serial, n4, sig_type, n5
  if type(headers) == "userdata" then
    local ok
    ok, ts, n1, nonce, n2, sig, n3, serial, n4, sig_type, n5 =
      pcall(req_headers, headers)
    if not ok then ts, n1 = nil, nil end
  else
    ts = header(headers, "wechatpay-timestamp")
    nonce = header(headers, "wechatpay-nonce")
    sig = header(headers, "wechatpay-signature")
    serial = header(headers, "wechatpay-serial")
    sig_type = header(headers, "wechatpay-signature-type")
  end
  local missing
  if type(ts) ~= "string" then missing = "Wechatpay-Timestamp"
  elseif type(nonce) ~= "string" then missing = "Wechatpay-Nonce"
  elseif type(sig) ~= "string" then missing = "Wechatpay-Signature"
  elseif type(serial) ~= "string" then missing = "Wechatpay-Serial"
  end
  if missing then
    return fail("malformed", "missing " .. missing .. " header")
  end
  if n1 and (n1 > 1 or n2 > 1 or n3 > 1 or n4 > 1) then
    return fail("malformed", "a Wechatpay-* header sent more than once")
  end
  if not digits(ts) then
    return fail("malformed", "Wechatpay-Timestamp is not a number of "
                .. "seconds: " .. printable(ts, 32))
  end
  if #nonce == 0 or #nonce > MAX_NONCE then
    return fail("malformed", "Wechatpay-Nonce is empty or too long")
  end
  if #serial == 0 or #serial > MAX_SERIAL then
    return fail("malformed", "Wechatpay-Serial is empty or too long")
  end
  if #sig == 0 or #sig > MAX_SIG then
    return fail("bad_signature", "Wechatpay-Signature is empty or too long")
  end
  if n5 and n5 > 1 then
    return fail("malformed", "Wechatpay-Signature-Type sent more than once")
  end
  if sig_type ~= nil and (type(sig_type) ~= "string"
                          or not SIG_TYPES[sig_type]) then
    return fail("bad_signature", "unknown Wechatpay-Signature-Type "
                .. printable(sig_type, 40))
  end
  return { timestamp = ts, ts = tonumber(ts), nonce = nonce,
           signature = sig, serial = serial, sig_type = sig_type }
end

--- syntax: ok, err = verify.fresh(ts, now)
-- stale_timestamp when |now - ts| >= 300 s.
function _M.fresh(ts, now)
  local skew = now - ts
  if skew ~= skew or skew == math.huge or skew == -math.huge then
    -- (%d of these would print -9223372036854775808 s)
    return fail("stale_timestamp", "Wechatpay-Timestamp cannot be compared"
      .. " with the local clock (" .. tostring(ts) .. " against "
      .. tostring(now) .. "): taken as stale", { skew = skew })
  end
  if not (skew < _M.WINDOW and -skew < _M.WINDOW) then
    return fail("stale_timestamp", ("Wechatpay-Timestamp is %d s %s the "
      .. "local clock (limit %d s): a replay, or a clock out of sync")
      :format(skew < 0 and -skew or skew, skew < 0 and "ahead of" or
              "behind", _M.WINDOW), { skew = skew })
  end
  return true
end

-- The key ring's kinds to this module's.
local RING_KINDS = {
  signature_mismatch = "bad_signature",
  key_type_mismatch = "bad_signature",
  unsupported_algorithm = "bad_signature",
  unknown_serial = "unknown_serial",
  cert_expired = "cert_expired",
  cert_not_yet_valid = "cert_expired",
}

-- The family a base64 signature's size says it is of: "RSA" for 128
-- bytes and more (RSA-1024 and up), "SM2" for 64 to 72 (an SM2 signature
-- is DER, two integers of up to 33 bytes), else nil (neither for sure).
local FAMILY_OF = {
  ["WECHATPAY2-SHA256-RSA2048"] = "RSA",
  ["WECHATPAY2-SM2-WITH-SM3"] = "SM2",
}
local function sig_family(b64)
  local n = #b64
  local pad = b64:sub(-2) == "==" and 2 or (b64:sub(-1) == "=" and 1 or 0)
  local bytes = (n - n % 4) / 4 * 3 - pad
  if bytes >= 128 then return "RSA" end
  if bytes >= 64 and bytes <= 72 then return "SM2" end
  return nil
end
-- (paygate verify names a message of the other variant than its keys by
-- them too)
_M.FAMILY_OF, _M.sig_family = FAMILY_OF, sig_family
-- and the type a key of each family signs as (FAMILY_OF turned round)
_M.SIG_TYPE_OF = {}
for t, family in pairs(FAMILY_OF) do _M.SIG_TYPE_OF[family] = t end

-- The type an answer without Wechatpay-Signature-Type is of.
_M.DEFAULT_SIG_TYPE = "WECHATPAY2-SHA256-RSA2048"

--- syntax: ok, err = verify.signature(h, body, keys[, sig_type[, now]])
-- h from parse_headers; keys a key ring (ring:verify_lines_base64); sig_type
-- the configured schema (WECHATPAY2-...): the answer's type (the header's,
-- WECHATPAY2-SHA256-RSA2048 when it is absent) must be it, else the answer
-- is refused (bad_signature, err.cause_kind signature_type_mismatch); nil:
-- the header's, else the key's type (a tool that knows no variant).
-- returns: true, or nil, err (bad_signature, unknown_serial with
-- err.serial, cert_expired).
function _M.signature(h, body, keys, sig_type, now)
  local declared = h.sig_type or _M.DEFAULT_SIG_TYPE
  if sig_type and declared ~= sig_type then
    -- an answer of the other variant (an RSA merchant's answer to an SM
    -- client, or the reverse): the configured algorithm is the one a
    -- verifier accepts (the Java SDK's notification parser refuses the
    -- mismatch likewise, and reads a missing header as RSA). Refused
    -- before the key ring is asked: its serial is none of ours, and
    -- would send the client downloading certificates of a variant it
    -- does not hold.
    return fail("bad_signature", (h.sig_type and ("Wechatpay-Signature-Type"
      .. " is " .. h.sig_type) or ("no Wechatpay-Signature-Type, which "
      .. "means " .. declared)) .. ", but this client is configured for "
      .. tostring(sig_type) .. " (sign_type): an answer of the other "
      .. "variant (serial " .. printable(h.serial, 64) .. ")",
      { serial = h.serial, cause_kind = "signature_type_mismatch" })
  end
  local alg = h.sig_type or sig_type
  -- the signing string's lines go to C as they are: no copy of the body
  local ok, err = keys:verify_lines_base64(h.serial, h.signature, alg, now,
                                           h.timestamp, h.nonce, body)
  if ok then return true end
  local ekind = type(err) == "table" and err.kind or tostring(err)
  local kind = RING_KINDS[ekind] or "bad_signature"
  local msg
  if kind == "unknown_serial" then
    local family = sig_family(h.signature)
    if family and FAMILY_OF[alg] and family ~= FAMILY_OF[alg] then
      -- no key for the serial, and the signature cannot be of the
      -- variant verified here: an answer of the other variant (an SM2
      -- signature in an answer whose type is RSA's). Said as such, and
      -- no certificate download is started for a serial of a variant
      -- this client does not hold.
      return fail("bad_signature", "no key for Wechatpay-Serial "
        .. printable(h.serial, 64) .. ", and the signature is " .. family
        .. "-sized, while this client verifies " .. tostring(alg)
        .. " (sign_type): an answer of the other variant",
        { serial = h.serial, cause_kind = "signature_type_mismatch" })
    end
    msg = "no key for Wechatpay-Serial " .. printable(h.serial, 64)
  elseif ekind == "signature_mismatch" then
    msg = "signature does not match the body (serial "
          .. printable(h.serial, 64) .. ")"
  elseif ekind == "key_type_mismatch" or ekind == "unsupported_algorithm"
  then
    msg = "signature type " .. tostring(alg) .. " does not fit the key of "
          .. printable(h.serial, 64)
  else
    msg = printable(h.serial, 64) .. ": " .. tostring(err and err.message)
  end
  return fail(kind, msg, { serial = h.serial, cause_kind = ekind })
end

--- syntax: h, err = verify.check(headers, body, keys, now[, sig_type])
-- The whole check: headers present and sane, timestamp within the window,
-- the serial known to keys, the signature over the raw body. returns the
-- parsed headers (h.serial is the key that verified) or nil, err.
function _M.check(headers, body, keys, now, sig_type)
  local h, err = _M.parse_headers(headers)
  if not h then return nil, err end
  if type(body) ~= "string" then
    return fail("malformed", "body is not a string")
  end
  local ok
  ok, err = _M.fresh(h.ts, now)
  if not ok then return nil, err end
  ok, err = _M.signature(h, body, keys, sig_type, now)
  if not ok then return nil, err end
  return h
end

return _M
