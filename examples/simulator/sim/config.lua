-- sim.config: checks the simulator's configuration (the file given to
-- `paygate run examples/simulator --config FILE`) and loads the merchants'
-- keys once. An unknown key or a bad value is one error naming the key:
-- app.lua prints it as one line and exits 2.
--
-- Other sim modules add their own keys with config.define(name, check)
-- before app.lua calls config.check (simB's notify.lua and bills.lua do).
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"

local type, tostring, ipairs, pairs, error = type, tostring, ipairs, pairs,
                                              error

local _M = {}

_M.RSA = "WECHATPAY2-SHA256-RSA2048"
_M.SM2 = "WECHATPAY2-SM2-WITH-SM3"

-- The runtime's own keys (src/process/config.c reads them): allowed
-- beside the simulator's, not checked here.
local RUNTIME = {
  listen = true, admin = true, pid_file = true, workers = true,
  shutdown_timeout = true, log_level = true, access_log = true, tls = true,
  shared = true, limits = true, resolver = true, upgrade_timeout = true,
}

local MODES = { platform_certificates = true, public_key = true,
                both = true }

-- name -> function(value, conf) returning value (normalised) or nil, why;
-- DEFAULTS[name] is used when the key is absent (check not called).
local CHECKS, DEFAULTS = {}, {}

--- syntax: config.define(name, check[, default])
-- Adds a top-level key. check(value, raw_conf) returns the value to keep
-- (it may normalise it) or nil and why it is bad. Raises when name is
-- taken.
function _M.define(name, check, default)
  if type(name) ~= "string" or type(check) ~= "function" then
    error("config.define: name must be a string, check a function", 2)
  end
  if CHECKS[name] or RUNTIME[name] then
    error("config.define: key " .. name .. " is already defined", 2)
  end
  CHECKS[name] = check
  DEFAULTS[name] = default
end

local function number_check(min, strict)
  return function(v)
    if type(v) ~= "number" or v ~= v or v == math.huge
       or (strict and v <= min) or (not strict and v < min) then
      return nil, "must be a number " .. (strict and "> " or ">= ")
                  .. tostring(min)
    end
    return v
  end
end
_M.number_check = number_check

-- A value given as PEM text (it holds "-----BEGIN") or as a file path.
-- A file path or PEM text: the WeChat Pay client's reading, whose reasons
-- never repeat the value (a key body pasted without its PEM lines)
local material = require("paygate.wechatpay.config").material
_M.material = material

local function digits(v)
  if type(v) == "number" and v == math.floor(v) and v > 0 then
    v = ("%d"):format(v)
  end
  if type(v) ~= "string" or not v:match("^%d+$") or #v > 32 then
    return nil
  end
  return v
end

local function string_list(v, what)
  if type(v) ~= "table" then return nil, "must be an array of " .. what end
  local out = {}
  for i, s in ipairs(v) do
    if type(s) ~= "string" or s == "" or #s > 32 then
      return nil, "[" .. i .. "] must be a non-empty string of at most 32 "
                  .. "characters"
    end
    out[#out + 1] = s
  end
  for k in pairs(v) do
    if type(k) ~= "number" or k < 1 or k > #out then
      return nil, "must be an array (a key " .. tostring(k) .. " found)"
    end
  end
  return out
end

--- syntax: k = config.serial_key(serial)
-- The key a merchant serial is kept and looked up under: upper case, no
-- leading zeros ("0A1b" and "A1B" name the same certificate).
function _M.serial_key(serial)
  local k = serial:upper():gsub("^0+", "")
  return k == "" and "0" or k
end
local serial_key = _M.serial_key

local MERCHANT_KEYS = {
  mchid = true, merchant_certificate = true, merchant_certificates = true,
  merchant_public_key = true, merchant_serial = true, apiv3_key = true,
  appids = true, sub_merchants = true, verifier_mode = true, name = true,
  refund_notify_url = true,
}

-- Loads the keys a merchant's requests are checked with into
-- m.keys (serial_key(serial) -> certificate or public key handle).
local function merchant_keys(m, raw, where, want)
  local function bad(key, why) return nil, where .. "." .. key .. ": " .. why end
  m.keys = {}
  m.not_after = {}         -- serial_key -> a certificate's notAfter (epoch s)
  local certs = raw.merchant_certificates
  if raw.merchant_certificate ~= nil then
    if certs ~= nil then
      return bad("merchant_certificate", "give merchant_certificate or "
                 .. "merchant_certificates, not both")
    end
    certs = { raw.merchant_certificate }
  end
  if certs ~= nil then
    if raw.merchant_public_key ~= nil then
      return bad("merchant_public_key", "give merchant certificates or a "
                 .. "merchant_public_key with merchant_serial, not both")
    end
    if type(certs) ~= "table" or #certs == 0 then
      return bad("merchant_certificates", "must be a non-empty array of "
                 .. "certificate paths or PEM texts")
    end
    for i, c in ipairs(certs) do
      local key = raw.merchant_certificate ~= nil and "merchant_certificate"
                  or ("merchant_certificates[" .. i .. "]")
      local pem, why = material(c)
      if not pem then return bad(key, why) end
      local cert, err = x509.load(pem)
      if not cert then
        return bad(key, "not a certificate (" .. tostring(err and err.kind)
                   .. ")")
      end
      if cert:key_type() ~= want then
        return bad(key, "holds an " .. tostring(cert:key_type()) .. " key; "
                   .. "this sign_type needs " .. want)
      end
      local k = serial_key(cert:serial())
      m.keys[k] = cert
      m.not_after[k] = cert:not_after()
    end
    return true
  end
  if raw.merchant_public_key == nil then
    return bad("merchant_certificate", "is required (or "
               .. "merchant_certificates, or merchant_public_key with "
               .. "merchant_serial)")
  end
  local pem, why = material(raw.merchant_public_key)
  if not pem then return bad("merchant_public_key", why) end
  local key, err = crypto.public_key(pem)
  if not key then
    return bad("merchant_public_key", "not a public key ("
               .. tostring(err and err.kind) .. ")")
  end
  if key:type() ~= want then
    return bad("merchant_public_key", "is an " .. key:type() .. " key; this "
               .. "sign_type needs " .. want)
  end
  local serial = raw.merchant_serial
  if type(serial) ~= "string" or not serial:match("^%x+$") or #serial > 64
  then
    return bad("merchant_serial", "must be the certificate serial, hex")
  end
  m.keys[serial_key(serial)] = key
  return true
end

local function check_merchant(raw, where, want, seen, c)
  local function bad(key, why) return nil, where .. "." .. key .. ": " .. why end
  if type(raw) ~= "table" then return nil, where .. ": must be a table" end
  for k in pairs(raw) do
    if not MERCHANT_KEYS[k] then
      return nil, where .. ": unknown key " .. tostring(k)
    end
  end
  local m = { sub = {} }
  m.mchid = digits(raw.mchid)
  if not m.mchid then return bad("mchid", "must be the merchant id: digits") end
  if seen[m.mchid] then
    return bad("mchid", "merchant " .. m.mchid .. " is configured twice")
  end
  seen[m.mchid] = true
  if type(raw.apiv3_key) ~= "string" or #raw.apiv3_key ~= 32 then
    return bad("apiv3_key", "must be the 32-character APIv3 key")
  end
  m.apiv3_key = raw.apiv3_key
  local appids, why = string_list(raw.appids or {}, "appids")
  if not appids then return bad("appids", why) end
  m.appids = {}
  for _, a in ipairs(appids) do m.appids[a] = true end
  if raw.verifier_mode ~= nil and not MODES[raw.verifier_mode] then
    return bad("verifier_mode", "must be platform_certificates, public_key "
               .. "or both")
  end
  m.verifier_mode = raw.verifier_mode or c.verifier_mode
  -- the merchant platform's refund notification URL: where a refund
  -- asked without a notify_url is notified (one with its own goes there)
  if raw.refund_notify_url ~= nil then
    local scheme, why = require("paygate.wechatpay.validate").notify_url(
      raw.refund_notify_url)
    if not scheme then
      return bad("refund_notify_url", "must be an https URL (http only on"
                 .. " loopback) without a query, up to 255 bytes ("
                 .. tostring(why) .. ")")
    end
    m.refund_notify_url = raw.refund_notify_url
  end
  local ok, err = merchant_keys(m, raw, where, want)
  if not ok then return nil, err end
  if raw.sub_merchants ~= nil then
    if type(raw.sub_merchants) ~= "table" then
      return bad("sub_merchants", "must be an array of { mchid, appids }")
    end
    -- an array only: ipairs passes over other keys, so sub-merchants keyed
    -- by their mchid (["1900000101"] = {...}) left the provider with none
    local ns = #raw.sub_merchants
    for k in pairs(raw.sub_merchants) do
      if type(k) ~= "number" or k < 1 or k > ns or k ~= math.floor(k) then
        return bad("sub_merchants", "must be an array of { mchid, appids }"
                   .. " (a key " .. tostring(k) .. " found)")
      end
    end
    for i, s in ipairs(raw.sub_merchants) do
      local sw = where .. ".sub_merchants[" .. i .. "]"
      if type(s) ~= "table" then return nil, sw .. ": must be a table" end
      for k in pairs(s) do
        if k ~= "mchid" and k ~= "appids" and k ~= "name" then
          return nil, sw .. ": unknown key " .. tostring(k)
        end
      end
      local id = digits(s.mchid)
      if not id then return nil, sw .. ".mchid: must be digits" end
      if id == m.mchid then
        return nil, sw .. ".mchid: a sub-merchant cannot be its service "
                    .. "provider"
      end
      -- a second entry would replace the first's appids without a word
      if m.sub[id] then
        return nil, sw .. ".mchid: " .. id .. " is listed twice (give one "
                    .. "entry with all its appids)"
      end
      local sa
      sa, why = string_list(s.appids or {}, "appids")
      if not sa then return nil, sw .. ".appids: " .. why end
      local set = {}
      for _, a in ipairs(sa) do set[a] = true end
      m.sub[id] = { mchid = id, appids = set }
    end
  end
  return m
end

--- syntax: cfg, err = config.check(raw)
-- raw: the table the config file returned. returns: the checked
-- configuration, or nil and a one-line message naming the key.
--   cfg.merchants        array of merchants; cfg.by_mchid[mchid] -> merchant
--   merchant: { mchid, apiv3_key, appids (set), keys (serial -> handle),
--               not_after (serial -> a certificate's notAfter, epoch s),
--               sub (sub_mchid -> { mchid, appids (set) }), verifier_mode }
--   cfg.state_dir, time_scale, answer_timeout, verifier_mode, sign_type,
--   sm (boolean), control, rotation_delay, refund_settle_after,
--   timestamp_window, clock_offset, time_expire_min, notify_ca_file,
--   platform_private_key, platform_certificate, public_key_id,
--   public_key_private_key (PEM texts or nil), and every key added with
--   config.define.
function _M.check(raw)
  if type(raw) ~= "table" then
    return nil, "config: must be a table (the config file returns one)"
  end
  local c = {}
  for k in pairs(raw) do
    if type(k) ~= "string" then
      return nil, "config: a key that is not a string (" .. tostring(k) .. ")"
    end
    if not RUNTIME[k] and not CHECKS[k] then
      return nil, "config." .. k .. ": unknown key"
    end
  end
  for k, check in pairs(CHECKS) do
    local v = raw[k]
    if v == nil then
      c[k] = DEFAULTS[k]
    else
      local nv, why = check(v, raw)
      if nv == nil then return nil, "config." .. k .. ": " .. why end
      c[k] = nv
    end
  end
  if c.state_dir == nil then
    return nil, "config.state_dir: is required (a folder for the "
                .. "simulator's database and keys)"
  end
  if raw.merchants == nil then
    return nil, "config.merchants: is required (an array of merchants)"
  end
  if type(raw.merchants) ~= "table" then
    return nil, "config.merchants: must be an array of merchants"
  end
  local nm = #raw.merchants
  for k in pairs(raw.merchants) do
    if type(k) ~= "number" or k < 1 or k > nm or k ~= math.floor(k) then
      return nil, "config.merchants: must be an array (a key "
                  .. tostring(k) .. " found)"
    end
  end
  c.sm = c.sign_type == _M.SM2
  local want = c.sm and "SM2" or "RSA"
  c.merchants, c.by_mchid, c.sub_of = {}, {}, {}
  local seen = {}
  for i, rm in ipairs(raw.merchants) do
    local m, err = check_merchant(rm, "config.merchants[" .. i .. "]", want,
                                  seen, c)
    if not m then return nil, err end
    c.merchants[i] = m
    c.by_mchid[m.mchid] = m
  end
  for _, m in ipairs(c.merchants) do
    for id in pairs(m.sub) do
      if c.by_mchid[id] then
        return nil, "config.merchants: " .. id .. " is both a merchant and "
                    .. "a sub-merchant"
      end
      if c.sub_of[id] then
        return nil, "config.merchants: sub-merchant " .. id .. " belongs to "
                    .. "two service providers"
      end
      c.sub_of[id] = m
    end
  end
  if #c.merchants == 0 then
    return nil, "config.merchants: must hold at least one merchant"
  end
  if (c.platform_private_key == nil) ~= (c.platform_certificate == nil) then
    return nil, "config.platform_certificate: platform_private_key and "
                .. "platform_certificate go together"
  end
  if c.public_key_private_key ~= nil and c.public_key_id == nil then
    return nil, "config.public_key_id: is required with "
                .. "public_key_private_key"
  end
  return c
end

-- The simulator's own keys ------------------------------------------------

_M.define("merchants", function(v)
  if type(v) ~= "table" then return nil, "must be an array of merchants" end
  return true                       -- checked in full by config.check
end)

_M.define("state_dir", function(v)
  if type(v) ~= "string" or v == "" or v:find("[%z\n]") then
    return nil, "must be a folder path"
  end
  return v
end)

_M.define("time_scale", number_check(0, true), 1)
_M.define("answer_timeout", number_check(0, true), 5)
-- The CA certificates an https notify_url's server must chain to, instead
-- of the system store: a merchant trialled on HTTPS with a test CA's
-- certificate. Read now, as the WeChat Pay client reads its ca_file: a
-- path that is no file of CA certificates (a typo, a folder) would
-- otherwise be taken and every notification fail on TLS.
_M.define("notify_ca_file", function(v)
  local ok, why = false, nil
  if type(v) == "string" then
    ok, why = require("paygate.wechatpay.config").pem_file(v)
  end
  if not ok then
    return nil, "must name a readable file of CA certificates (PEM)"
                .. (why and " (" .. why .. ")" or "")
  end
  return v
end)
-- A rotation's delay: at most a year (the new certificate is valid for
-- five; a delay past its end, or an infinite one, would never switch)
_M.ROTATION_DELAY_MAX = 365 * 86400
function _M.check_rotation_delay(v)
  local d, why = number_check(0, false)(v)
  if d and d > _M.ROTATION_DELAY_MAX then
    d, why = nil, "must be at most " .. _M.ROTATION_DELAY_MAX
             .. " (a year)"
  end
  return d, why
end
_M.define("rotation_delay", _M.check_rotation_delay, 60)
_M.define("timestamp_window", number_check(0, true), 300)
-- A test aid: this simulator's clock is clock_offset seconds ahead of the
-- host's (negative: behind) for everything WeChat's one clock decides or
-- writes here (sim.clock): the Wechatpay-Timestamp it signs (answers and
-- notifications), the Date header of a /v3 answer, the window a
-- request's timestamp is judged in, an order's time_expire, success_time,
-- create_time and the other times of orders, refunds and notifications,
-- and the bills' day. A client then sees WeChat's clock off its own, as
-- when either side's NTP fails. At most a day either way (the control
-- API's Date, the notification schedule, the request log and the
-- platform certificates' dates stay on the host's clock).
_M.CLOCK_OFFSET_MAX = 86400
_M.define("clock_offset", function(v)
  if type(v) ~= "number" or v ~= v or v < -_M.CLOCK_OFFSET_MAX
     or v > _M.CLOCK_OFFSET_MAX then
    return nil, "must be a number of seconds from -" .. _M.CLOCK_OFFSET_MAX
                .. " to " .. _M.CLOCK_OFFSET_MAX
  end
  return v
end, 0)
-- A prepay's time_expire must lie at least this many seconds ahead (0: only
-- in the future). WeChat has been reported to refuse one less than a minute
-- ahead (a community report, unconfirmed).
_M.define("time_expire_min", number_check(0, false), 60)

_M.define("refund_settle_after", function(v)
  if v == false then return false end
  return number_check(0, false)(v)
end, false)

_M.define("verifier_mode", function(v)
  if not MODES[v] then
    return nil, "must be platform_certificates, public_key or both"
  end
  return v
end, "platform_certificates")

_M.define("sign_type", function(v)
  if v ~= _M.RSA and v ~= _M.SM2 then
    return nil, "must be " .. _M.RSA .. " or " .. _M.SM2
  end
  return v
end, _M.RSA)

_M.define("replay_check", function(v)
  if type(v) ~= "boolean" then return nil, "must be true or false" end
  return v
end, true)

-- A request signed with a merchant certificate past its notAfter is
-- refused (401 SIGN_ERROR naming the serial): WeChat accepts only a
-- valid certificate's serial. true accepts it (the start still warns),
-- for specs built on the SDKs' published test certificates, now expired.
_M.define("accept_expired_merchant_certificates", function(v)
  if type(v) ~= "boolean" then return nil, "must be true or false" end
  return v
end, false)

_M.define("control", function(v)
  if type(v) ~= "boolean" then return nil, "must be true or false" end
  return v
end, true)

for _, k in ipairs({ "platform_private_key", "platform_certificate",
                     "public_key_private_key" }) do
  _M.define(k, function(v) return material(v) end)
end

_M.define("public_key_id", function(v)
  if type(v) ~= "string" or not v:match("^PUB_KEY_ID_%d+$") or #v > 64 then
    return nil, "must be PUB_KEY_ID_ followed by digits"
  end
  return v
end)

return _M
