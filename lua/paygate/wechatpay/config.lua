-- paygate.wechatpay.config: checks a client configuration and loads its
-- keys once. Each failure is an invalid_config error whose err.key names
-- the configuration key at fault (and whose message never holds a key);
-- a merchant key of the other variant than sign_type's also has
-- err.key_sign_type, the sign_type that takes that key (a fix may name
-- sign_type rather than the key).
local addr = require "paygate.addr"
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local sign = require "paygate.wechatpay.sign"

local type, tostring, ipairs, pairs = type, tostring, ipairs, pairs
local min, max = math.min, math.max

local _M = {}

-- The levels log_level takes, paygate.log's names and the runtime's order
local LOG_LEVELS = { debug = 0, info = 1, warn = 2, error = 3 }

_M.DEFAULT_BASE_URL = "https://api.mch.weixin.qq.com"
_M.DEFAULT_BACKUP_URL = "https://api2.mch.weixin.qq.com"

-- more: further fields of the error (besides key), or nil
local function bad(key, msg, more)
  local fields = { key = key }
  for k, v in pairs(more or {}) do fields[k] = v end
  return nil, core.error("invalid_config", "wechatpay." .. key .. ": " .. msg,
                         fields)
end

-- A value given as PEM text (it holds "-----BEGIN") or as a file path.
-- The value may be a secret given in the wrong shape (a key body without
-- its PEM lines, the APIv3 key in a key field): a reason never repeats
-- it, not even as a path, and calls it a path only when it can be one
-- (one line, and no run of 32 base64 characters as a key body or the
-- APIv3 key has). key: the configuration key, for paygate.read_file's
-- err (a folder, a FIFO, an empty or a huge file are refused there).
-- returns: the bytes, or nil, reason.
local function material(v, key)
  if v == nil then
    return nil, "is required (a file path or PEM text)"
  end
  if type(v) ~= "string" or v == "" then
    return nil, "must be a file path or PEM text"
  end
  if v:find("-----BEGIN", 1, true) then return v end
  if #v > 4096 or v:find("[%z\r\n]") then
    return nil, "not PEM text (no -----BEGIN line) and not a readable file"
  end
  local s, err = core.read_file(v, key or "file")
  if s then return s end
  if err.kind == "empty" or err.kind == "too_large" then
    return nil, err.reason
  end
  -- (something is there when it is a folder or a FIFO: a path)
  if err.kind == "not_a_file" or not v:find(("[%w+=]"):rep(32)) then
    return nil, "cannot read the file (" .. err.reason .. ")"
  end
  return nil, "not PEM text (no -----BEGIN line) and not a readable file ("
              .. err.reason .. ")"
end
_M.material = material

--- syntax: s, why, kind = config.read_secret(path, key)
-- The file a config's secret key names (the gateway's apiv3_key_file,
-- previous_apiv3_key_files, every *_file secret of its config), read as
-- the gateway reads it at start; `paygate doctor` reads the gateway's
-- config with it too, so the two say the same. key: the config key at
-- fault. The value may be the secret itself, pasted where its file's path
-- belongs: paygate.read_file's reason never repeats it (nor the file's
-- bytes). A folder, a FIFO or a device (a FIFO's open would wait for a
-- writer), an empty file or one past 1 MiB is refused there, unread.
-- returns: the bytes, surrounding whitespace dropped (a file's trailing
-- newline), or nil, reason (without the key: the caller names it) and
-- paygate.read_file's kind (denied: the path may be right, the user not).
function _M.read_secret(path, key)
  local s, err = core.read_file(path, key)
  if not s then
    if err.kind == "empty" or err.kind == "too_large" then
      return nil, err.reason, err.kind
    end
    -- (the runtime does not change folder: a relative path is the
    -- working directory's, not the config file's)
    local rel = err.kind ~= "not_a_file" and path:sub(1, 1) ~= "/"
      and "; a relative path is taken from the working directory, not the"
      .. " config file's folder" or ""
    return nil, "cannot read the file it names (" .. err.reason .. ")" .. rel,
           err.kind
  end
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

--- syntax: ok, why = config.pem_file(path)
-- Whether path names a readable file with a PEM certificate in it (a
-- -----BEGIN CERTIFICATE----- or TRUSTED CERTIFICATE block): a file of
-- CA certificates, checked at start. Read as
-- paygate.read_file reads it, so a FIFO is refused unread (its open
-- would wait for a writer, holding the start for good), as are a folder,
-- a device, an empty file and one past 1 MiB (a CA bundle is a few
-- hundred KiB: past that it is the wrong file). why: "cannot open it: "
-- and the reason when it is missing or may not be read, read_file's
-- reason for the rest (never the path nor a byte of the file), or what
-- it holds instead of a certificate (a private key: every TLS check with
-- it failed; no certificate block).
function _M.pem_file(path)
  local s, err = core.read_file(path, "ca_file")
  if not s then
    if err.kind == "not_found" or err.kind == "denied" then
      return false, "cannot open it: " .. err.reason
    end
    return false, err.reason
  end
  if s:find("-----BEGIN CERTIFICATE-----", 1, true)
     or s:find("-----BEGIN TRUSTED CERTIFICATE-----", 1, true) then
    return true
  end
  if s:find("PRIVATE KEY-----", 1, true) then
    return false, "it holds a private key, not a certificate"
  end
  return false, "no -----BEGIN CERTIFICATE----- block in it"
end

-- An http:// URL to a loopback host (127.0.0.0/8, localhost, ::1): the
-- simulator's and a local spec's. A URL with userinfo (@) is refused, so
-- "http://localhost:x@elsewhere/" cannot pass for loopback.
local function is_loopback_url(url)
  if url:find("@", 1, true) then return false end
  local host = url:match("^http://%[([^%]]+)%]") or url:match("^http://([^/:]+)")
  return addr.loopback_host(host)
end
_M.is_loopback_url = is_loopback_url

--- syntax: hint = config.private_key_hint(pem, kind, option)
-- What to do about a merchant private key that did not load: pem the
-- bytes read, kind the crypto.private_key error's kind, option the name
-- the user gave it under (e.g. "merchant_private_key"). Names the cause
-- when it can tell (a certificate, a key under a passphrase, another key
-- type). config.check and `paygate doctor` both say it. Never any of
-- pem's bytes.
function _M.private_key_hint(pem, kind, option)
  if pem:find("-----BEGIN CERTIFICATE", 1, true) then
    return "this is a certificate, not a private key: point " .. option
           .. " at apiclient_key.pem"
  elseif kind == "bad_password" then
    return "the key is encrypted with a passphrase, and WeChat's "
           .. "apiclient_key.pem is not: decrypt it (openssl pkey "
           .. "-in KEY -out PLAIN_KEY) and point " .. option
           .. " at the result"
  elseif kind == "unsupported_key_type" then
    return "WeChat Pay needs the merchant's RSA key (an SM2 key for the SM"
           .. " variant), and this is another type: use apiclient_key.pem"
           .. " as downloaded"
  end
  return "use apiclient_key.pem as downloaded (PKCS#8 PEM)"
end

local function check_url(key, url)
  if type(url) ~= "string" or url == "" then
    return bad(key, "must be a URL string")
  end
  url = url:gsub("/+$", "")
  -- the host: a name or IPv4 address, or [IPv6], then :port if any (a
  -- query, fragment or stray byte would be glued to every request path)
  local scheme, hostport = url:match("^(https?)://(.*)$")
  local host, port = (hostport or ""):match("^([%w%.%-]+)(.*)$")
  if not host then
    host, port = (hostport or ""):match("^(%[[%x:%.]+%])(.*)$")
  end
  local HTTPS = "must be https:// (http:// only for a loopback address"
                .. " such as the simulator's)"
  if not scheme then
    -- say what is wrong: the scheme, not the rest
    return bad(key, HTTPS .. ", then host[:port]")
  end
  if not host or (port ~= "" and not port:match("^:%d+$")) then
    -- a path (the client adds /v3/... itself): named, as the user wrote
    -- it, so "http://127.0.0.1:18490/v3" is not called a scheme problem
    local path = host and port:match("^:?%d*(/.*)$")
    if path then
      path = path:sub(1, 64):gsub("[^\33-\126]", "?")
      return bad(key, "has a path (" .. path .. "): give scheme, host and"
                 .. " port only (https://host[:port]; the client adds"
                 .. " /v3/...)")
    end
    return bad(key, "must be https://host[:port]: a host name or address,"
               .. " then :port if any, and nothing after (no query,"
               .. " fragment or user info)")
  end
  if scheme == "https" or is_loopback_url(url) then return url end
  return bad(key, HTTPS)
end

--- syntax: used, issuers = config.platform_certs_of(chain)
-- The certificates of one platform_certificates entry (a file or PEM text:
-- x509.chain's list) that verify answers: its end-entity certificates
-- (CA:FALSE) when it has any -- a chain file's CA certificates are their
-- issuers, and one used as a platform certificate would be "newest" for
-- encrypting sensitive fields and for the expiry gauge -- else every one
-- (a self-signed test certificate made with `openssl req -x509` is
-- flagged CA:TRUE; SDKs' test vectors are). issuers: the CA certificates
-- left out. The client, `paygate verify` and `paygate doctor` all apply it.
function _M.platform_certs_of(chain)
  local used, issuers = {}, {}
  for _, cert in ipairs(chain) do
    if cert:is_ca() then
      issuers[#issuers + 1] = cert
    else
      used[#used + 1] = cert
    end
  end
  if #used == 0 then return issuers, {} end
  return used, issuers
end

-- (at most 1e8: inf passed before, and breaker_open_for = inf kept an
-- opened breaker open for good, a refresh_interval of inf ended the
-- refresher in core.sleep)
local function positive(conf, key, default)
  local v = conf[key]
  if v == nil then return default end
  if not core.is_seconds(v) then return nil end
  return v
end

-- Every key config.check reads: any other is refused (a typo such as
-- timout = 5 would otherwise keep the default without a word).
local KNOWN = {}
for k in ([[mchid sp_mchid appid sp_appid appids sp_appids merchant_private_key
    merchant_certificate merchant_serial apiv3_key previous_apiv3_keys
    platform_certificates public_key public_key_id sign_type base_url
    backup_url download_certificates state_dir ca_file platform_ca
    refresh_interval timeout deadline download_min_interval max_attempts
    startup_timeout latency_window timeout_samples breaker_window
    breaker_min_calls breaker_open_for breaker_failure_ratio timeout_floor
    timeout_ceiling adaptive_timeout breaker degraded on_call shared_dict
    replay_dict key_names log_level]]):gmatch("%S+") do
  KNOWN[k] = true
end
_M.KNOWN = KNOWN

--- syntax: k = config.nearest(key[, known])
-- The key of the set known (default: the client's keys) nearest to a
-- typo, at most two edits away, or nil (ties: the first in byte order).
local function nearest(key, known)
  return require("paygate.suggest").nearest(key, known or KNOWN)
end
_M.nearest = nearest

-- The keys key_names may name, and their default: the client's own
local KEY_NAMES = { apiv3_key = "apiv3_key",
                    previous_apiv3_keys = "previous_apiv3_keys",
                    state_dir = "state_dir" }

-- key_names checked against the APIv3 keys (a name holding one would put
-- the secret in every message that names it). previous_apiv3_keys may be
-- false: the owner has no place for previous keys (paygate certs
-- --download's one --apiv3-key-file), and the message names none.
-- returns: { apiv3_key, previous_apiv3_keys } (the defaults for the ones
-- not given), or nil, err. No reason repeats a value given: it may be
-- the key itself.
local function key_names(given, keys)
  local names = {}
  for k, v in pairs(KEY_NAMES) do names[k] = v end
  if given == nil then return names end
  if type(given) ~= "table" then
    return bad("key_names", "must be a table { apiv3_key = NAME, "
               .. "previous_apiv3_keys = NAME, state_dir = NAME }")
  end
  for k, v in pairs(given) do
    if not KEY_NAMES[k] then
      local name = type(k) == "string" and #k <= 64
                   and k:match("^[%w_]+$") and k or nil
      return bad("key_names", "unknown key " .. (name and name
                 .. require("paygate.suggest").hint(name, KEY_NAMES)
                 or "(not a plain name)") .. ": it names apiv3_key, "
                 .. "previous_apiv3_keys and state_dir only")
    end
    if not (v == false and k == "previous_apiv3_keys") then
      -- a config key's name: merchants[1].apiv3_key_file, an etcd path
      -- (printable, for a log line and a terminal)
      if type(v) ~= "string" or v == "" or #v > 256
         or not v:match("^[\33-\126]+$") then
        return bad("key_names", k .. " must be the name of a config key"
                   .. " (at most 256 printable ASCII characters, no spaces)"
                   .. (k == "previous_apiv3_keys" and ", or false" or ""))
      end
      for _, key in ipairs(keys) do
        if v:find(key, 1, true) then
          return bad("key_names", k .. " holds an APIv3 key: give the name"
                     .. " of the config key that holds it, not the key")
        end
      end
    end
    names[k] = v
  end
  return names
end

--- syntax: cfg, err = config.check(conf)
-- returns: the checked configuration with its keys loaded:
--   mchid (the signing merchant: sp_mchid in partner mode), partner,
--   appid or sp_appid (the prepay default, when given), appids (nil, or
--   the set of appids a prepay may name: the default and the list of
--   appids / sp_appids),
--   signer { key, schema, mchid, serial }, sm (SM variant), apiv3_keys
--   (current first, then previous), key_names (how the APIv3 keys and
--   state_dir are named in messages: { apiv3_key, previous_apiv3_keys,
--   state_dir }), platform_certs (handles), public_key
--   (handle) and public_key_id, mode ("certificate" | "public_key" |
--   "migration"), download (whether /v3/certificates is used), base_url,
--   backup_url, state_dir, refresh_interval, timeout, deadline,
--   startup_timeout,
--   max_attempts, ca_file, platform_ca, shared_dict, replay_dict (nil:
--   the default choice, certs.init), user_agent; degraded (nil when not
--   given), adaptive_timeout, timeout_floor, timeout_ceiling,
--   timeout_samples, latency_window, breaker, breaker_window,
--   breaker_min_calls, breaker_failure_ratio, breaker_open_for; on_call;
--   log_level (nil: the runtime's alone; config.logger applies it).
function _M.check(conf)
  if type(conf) ~= "table" then
    return bad("conf", "the configuration must be a table (got "
               .. type(conf) .. (conf == nil and ": is the config file's"
               .. " wechatpay table missing?" or "") .. ")")
  end
  for k in pairs(conf) do
    if not KNOWN[k] then
      local name = type(k) == "string" and #k <= 64
                   and k:match("^[%w_]+$") and k or nil
      local near = name and nearest(name)
      if name == "apiv3_key_file" or name == "apiv3_key_env" then
        return bad(name, "unknown key: the client takes apiv3_key, the key "
                   .. "itself (" .. name .. " is the gateway's config)")
      end
      return bad(name or "?", "unknown key" .. (near and (" (did you mean "
                 .. near .. "?)") or "") .. (name and "" or ": a key that "
                 .. "is not a plain name"))
    end
  end
  local c = {}
  -- merchant ids
  if conf.sp_mchid ~= nil then
    if conf.mchid ~= nil then
      return bad("mchid", "give either mchid (a direct merchant) or sp_mchid"
                 .. " (a service provider; each call names sub_mchid)")
    end
    c.partner = true
    c.mchid = conf.sp_mchid
    c.mchid_key = "sp_mchid"
  else
    c.mchid = conf.mchid
    c.mchid_key = "mchid"
  end
  if type(c.mchid) == "number" then c.mchid = ("%d"):format(c.mchid) end
  if type(c.mchid) ~= "string" or not c.mchid:match("^%d+$")
     or #c.mchid > 32 then
    return bad(c.mchid_key, "must be the merchant id: digits")
  end
  -- the default appid of prepay bodies (api.lua fills it in when a call
  -- gives none): appid for a direct merchant, sp_appid for a provider
  local appid_key = c.partner and "sp_appid" or "appid"
  local other_key = c.partner and "appid" or "sp_appid"
  for _, k in ipairs({ other_key, other_key .. "s" }) do
    if conf[k] ~= nil then
      return bad(k, c.partner
        and "is for a direct merchant (mchid); a service provider gives "
            .. "sp_appid, sp_appids"
        or "is for a service provider (sp_mchid); a direct merchant gives "
           .. "appid, appids")
    end
  end
  local is_appid = require("paygate.wechatpay.validate").appid
  local appid = conf[appid_key]
  if appid ~= nil then
    if not is_appid(appid) then
      return bad(appid_key, "must be an appid (at most 32 letters, digits, "
                 .. "_ and -)")
    end
    c[appid_key] = appid
  end
  -- the other appids a prepay may name (a merchant paying under an
  -- official account's appid and an App's): api.lua refuses any appid
  -- outside these and the default before it is sent, where WeChat would
  -- answer appid_mchid_not_match (or, worse, pay under the wrong app)
  local list_key = appid_key .. "s"
  local list = conf[list_key]
  if list ~= nil then
    local n = 0
    if type(list) == "table" then
      for _ in pairs(list) do n = n + 1 end
    end
    -- a list, not a map: { app = "wx..." } would read as no appid at all
    if type(list) ~= "table" or n == 0 or n ~= #list then
      return bad(list_key, "must be a non-empty list of appids (the ones "
                 .. "besides " .. appid_key .. " a call may name)")
    end
    local set = {}
    if appid then set[appid] = true end
    for i, v in ipairs(list) do
      if not is_appid(v) then
        return bad(list_key, "item " .. i .. " must be an appid (at most "
                   .. "32 letters, digits, _ and -)")
      end
      set[v] = true
    end
    c.appids = set
  end
  -- signature type
  local schema = conf.sign_type or sign.RSA
  if schema ~= sign.RSA and schema ~= sign.SM2 then
    return bad("sign_type", "must be " .. sign.RSA .. " or " .. sign.SM2)
  end
  c.sm = schema == sign.SM2
  local key_type = c.sm and "SM2" or "RSA"
  -- merchant private key
  local pem, why = material(conf.merchant_private_key, "merchant_private_key")
  if not pem then return bad("merchant_private_key", why) end
  local key, kerr = crypto.private_key(pem)
  if not key then
    -- the cause too (a certificate named here is the common slip), as
    -- paygate doctor says it
    local kind = tostring(kerr and kerr.kind)
    return bad("merchant_private_key", "cannot load the private key ("
               .. kind .. "): " .. _M.private_key_hint(pem, kind,
                                                      "merchant_private_key"))
  end
  if key:type() ~= key_type then
    -- an SM merchant's SM2 key under the default is sign_type left out
    -- far more often than a wrong key: the sign_type that takes the key
    -- is said too, and is err.key_sign_type (paygate doctor's fix names
    -- sign_type by it, where err.key alone pointed at the key)
    return bad("merchant_private_key", "is an " .. key:type() .. " key; "
               .. "sign_type " .. schema .. (conf.sign_type == nil
                 and " (the default)" or "") .. " needs an " .. key_type
               .. " key: " .. (c.sm and "an RSA merchant leaves sign_type "
                 .. "out (" .. sign.RSA .. " is the default)"
                 or "a merchant of the national-crypto variant sets "
                 .. 'sign_type = "' .. sign.SM2 .. '"'),
               { key_sign_type = c.sm and sign.RSA or sign.SM2 })
  end
  -- merchant serial, or the certificate it comes from
  local serial = conf.merchant_serial
  if conf.merchant_certificate ~= nil then
    pem, why = material(conf.merchant_certificate, "merchant_certificate")
    if not pem then return bad("merchant_certificate", why) end
    local cert, cerr = crypto.certificate(pem)
    if not cert then
      return bad("merchant_certificate", "cannot load the certificate ("
                 .. tostring(cerr and cerr.kind) .. ")")
    end
    local ok = crypto.check_pair(key, cert)
    if not ok then
      return bad("merchant_private_key", "does not match "
                 .. "merchant_certificate (serial " .. cert:serial() .. ")")
    end
    if serial ~= nil and type(serial) == "string"
       and serial:upper():gsub("^0+", "") ~= cert:serial():gsub("^0+", "")
    then
      return bad("merchant_serial", "is not the serial of "
                 .. "merchant_certificate (" .. cert:serial() .. ")")
    end
    serial = cert:serial()
    -- its end, for a warning at start (wechatpay.client): WeChat Pay
    -- refuses what is signed under an expired one
    c.merchant_not_after = cert:not_after()
  end
  if type(serial) ~= "string" or not serial:match("^%x+$") or #serial > 64
  then
    return bad("merchant_serial", "must be the merchant API certificate's "
               .. "serial in hex (or give merchant_certificate)")
  end
  serial = serial:upper()
  c.merchant_serial = serial
  c.signer = { key = key, schema = schema, mchid = c.mchid, serial = serial }
  -- APIv3 keys
  -- (none at all is said as such: "must be exactly 32 bytes" sent the
  -- reader to count the bytes of a key that never arrived, most often an
  -- unset environment variable; no message holds a byte of the key)
  local k = conf.apiv3_key
  if k == nil or k == false then
    return bad("apiv3_key", "is required (got " .. tostring(k) .. "): the "
               .. "APIv3 key set in the merchant platform, 32 bytes, the key"
               .. " itself; read it from a file or an environment variable"
               .. " where the config is built (os.getenv of a variable"
               .. " that is not set gives nil)")
  end
  if type(k) ~= "string" then
    return bad("apiv3_key", "must be the APIv3 key itself, a string of 32 "
               .. "bytes (got a " .. type(k) .. ")")
  end
  if k == "" then
    return bad("apiv3_key", "is empty (an environment variable set to "
               .. "nothing? an empty file?): give the APIv3 key set in the "
               .. "merchant platform, 32 bytes")
  end
  if #k ~= 32 then
    return bad("apiv3_key", "must be exactly 32 bytes (the APIv3 key set in "
               .. "the merchant platform)")
  end
  c.apiv3_keys = { conf.apiv3_key }
  if conf.previous_apiv3_keys ~= nil then
    if type(conf.previous_apiv3_keys) ~= "table" then
      return bad("previous_apiv3_keys", "must be an array of 32-byte keys")
    end
    for i, k in ipairs(conf.previous_apiv3_keys) do
      if type(k) ~= "string" or #k ~= 32 then
        return bad("previous_apiv3_keys", "entry " .. i
                   .. " must be exactly 32 bytes")
      end
      c.apiv3_keys[#c.apiv3_keys + 1] = k
    end
  end
  -- how the APIv3 keys are named in messages (a decrypt failure's "wrong
  -- APIv3 key (...)"): the owner's config names them otherwise (the
  -- reference gateway's merchants[1].apiv3_key_file, an etcd set's file),
  -- and a message naming apiv3_key sent its operator to a key that
  -- config refuses
  local names, nerr = key_names(conf.key_names, c.apiv3_keys)
  if not names then return nil, nerr end
  c.key_names = names
  -- platform certificates given in the configuration
  c.platform_certs = {}
  local pcs = conf.platform_certificates
  if type(pcs) == "string" then pcs = { pcs } end
  if pcs ~= nil then
    if type(pcs) ~= "table" then
      return bad("platform_certificates", "must be an array of paths or PEM")
    end
    for i, v in ipairs(pcs) do
      pem, why = material(v, "platform_certificates")
      if not pem then
        return bad("platform_certificates", "entry " .. i .. ": " .. why)
      end
      local chain, cerr = x509.chain(pem)
      if not chain or #chain == 0 then
        return bad("platform_certificates", "entry " .. i .. ": not a "
                   .. "certificate (" .. tostring(cerr and cerr.kind) .. ")")
      end
      for _, cert in ipairs(_M.platform_certs_of(chain)) do
        if cert:key_type() ~= key_type then
          return bad("platform_certificates", "entry " .. i .. " holds an "
                     .. cert:key_type() .. " certificate; sign_type needs "
                     .. key_type)
        end
        c.platform_certs[#c.platform_certs + 1] = cert
      end
    end
  end
  -- WeChat Pay public key
  if (conf.public_key == nil) ~= (conf.public_key_id == nil) then
    return bad(conf.public_key == nil and "public_key" or "public_key_id",
               "public_key and public_key_id go together")
  end
  if conf.public_key ~= nil then
    if type(conf.public_key_id) ~= "string"
       or not conf.public_key_id:match("^PUB_KEY_ID_%w+$")
       or #conf.public_key_id > 128 then
      return bad("public_key_id", "must be the id shown beside the key: "
                 .. "PUB_KEY_ID_ and digits")
    end
    pem, why = material(conf.public_key, "public_key")
    if not pem then return bad("public_key", why) end
    local pub, perr = crypto.public_key(pem)
    if not pub then
      return bad("public_key", "cannot load the public key ("
                 .. tostring(perr and perr.kind) .. ")")
    end
    if pub:type() ~= key_type then
      return bad("public_key", "is an " .. pub:type() .. " key; sign_type "
                 .. "needs " .. key_type)
    end
    c.public_key, c.public_key_id = pub, conf.public_key_id
  end
  -- the merchant's serial names the merchant's own certificate: WeChat's
  -- keys never carry it (a copy-paste of the wrong serial otherwise
  -- fails every call with SIGN_ERROR). Serials are numbers: compared
  -- without their leading zeros ("A1E..." as Java prints "0A1E...")
  local bare = serial:gsub("^0+(.)", "%1")
  for _, cert in ipairs(c.platform_certs) do
    if cert:serial():gsub("^0+(.)", "%1") == bare then
      return bad("merchant_serial", "is the serial of a platform "
                 .. "certificate; use the merchant API certificate's serial")
    end
  end
  if c.public_key_id and c.public_key_id:upper() == serial then
    return bad("merchant_serial", "is the public key id")
  end
  -- mode
  if c.public_key then
    -- certificates given, or asked to be downloaded: either key verifies
    local dl = conf.download_certificates
    c.mode = (#c.platform_certs > 0 or (dl ~= nil and dl ~= false))
             and "migration" or "public_key"
  else
    c.mode = "certificate"
  end
  if conf.download_certificates == nil then
    c.download = c.mode ~= "public_key"
  elseif conf.download_certificates == "manual" then
    -- only when asked (wx:refresh_certificates, an unknown serial): no
    -- download at start, no background refresh (a command line's client)
    c.download, c.download_manual = true, true
  else
    c.download = conf.download_certificates and true or false
  end
  if c.mode == "certificate" and not c.download and #c.platform_certs == 0
  then
    return bad("platform_certificates", "with download_certificates = "
               .. "false, give the platform certificates (or public_key "
               .. "and public_key_id)")
  end
  -- endpoints
  local err
  c.base_url, err = check_url("base_url", conf.base_url or _M.DEFAULT_BASE_URL)
  if not c.base_url then return nil, err end
  if conf.backup_url ~= nil then
    if conf.backup_url ~= false then
      c.backup_url, err = check_url("backup_url", conf.backup_url)
      if not c.backup_url then return nil, err end
    end
  elseif c.base_url == _M.DEFAULT_BASE_URL then
    c.backup_url = _M.DEFAULT_BACKUP_URL
  end
  -- files and numbers
  if conf.state_dir ~= nil and (type(conf.state_dir) ~= "string"
                                or conf.state_dir == "") then
    return bad("state_dir", "must be a directory path")
  end
  c.state_dir = conf.state_dir
  for _, k in ipairs({ "ca_file" }) do
    if conf[k] ~= nil and type(conf[k]) ~= "string" then
      return bad(k, "must be a file path")
    end
    if conf[k] ~= nil then
      -- read now: a path that is no file of CA certificates (a typo, a
      -- folder) was taken, and every HTTPS call failed on TLS
      local ok, why = _M.pem_file(conf[k])
      if not ok then
        return bad(k, "must name a readable file of CA certificates (PEM)"
                   .. (why and " (" .. why .. ")" or ""))
      end
    end
    c[k] = conf[k]
  end
  if conf.platform_ca ~= nil then
    pem, why = material(conf.platform_ca, "platform_ca")
    if not pem then return bad("platform_ca", why) end
    c.platform_ca = pem
  end
  for k, default in pairs({ refresh_interval = 43200, timeout = 10,
                            deadline = 30, download_min_interval = 60,
                            max_attempts = 4, startup_timeout = 3 }) do
    c[k] = positive(conf, k, default)
    if not c[k] then return bad(k, "must be a number > 0 (at most 1e8)") end
  end
  -- degradation, adaptive timeouts, breaker (upstream.lua)
  for k, default in pairs({ latency_window = 200,
                            timeout_samples = 20, breaker_window = 30,
                            breaker_min_calls = 20, breaker_open_for = 10,
                            breaker_failure_ratio = 0.5 }) do
    c[k] = positive(conf, k, default)
    if not c[k] then return bad(k, "must be a number > 0 (at most 1e8)") end
  end
  -- the bounds default around the timeout and each other, so that only
  -- both given and crossed is refused: floor min(1, timeout, ceiling),
  -- ceiling max(timeout, floor)
  c.timeout_floor = positive(conf, "timeout_floor", 1)
  if not c.timeout_floor then
    return bad("timeout_floor", "must be a number > 0 (at most 1e8)")
  end
  c.timeout_ceiling = positive(conf, "timeout_ceiling", c.timeout)
  if not c.timeout_ceiling then
    return bad("timeout_ceiling", "must be a number > 0 (at most 1e8)")
  end
  -- one attempt's timeout goes to paygate.http, which takes at most a
  -- day: past it every call raised there instead of answering
  for _, k in ipairs({ "timeout", "timeout_floor", "timeout_ceiling" }) do
    if c[k] > 86400 then
      return bad(k, "must be at most 86400 (s: one attempt)")
    end
  end
  if conf.timeout_floor == nil then
    c.timeout_floor = min(1, c.timeout, c.timeout_ceiling)
  elseif conf.timeout_ceiling == nil then
    c.timeout_ceiling = max(c.timeout, c.timeout_floor)
  end
  if c.timeout_floor > c.timeout_ceiling then
    return bad("timeout_floor", "must not be above timeout_ceiling ("
               .. c.timeout_ceiling .. ")")
  end
  for _, k in ipairs({ "latency_window", "timeout_samples",
                       "breaker_min_calls" }) do
    if c[k] % 1 ~= 0 or c[k] > 100000 then
      return bad(k, "must be a whole number (at most 100000)")
    end
  end
  if c.timeout_samples > c.latency_window then
    return bad("timeout_samples", "must not be above latency_window ("
               .. c.latency_window .. ")")
  end
  if c.breaker_failure_ratio > 1 then
    return bad("breaker_failure_ratio", "must be a share: > 0 and <= 1")
  end
  for k, default in pairs({ adaptive_timeout = true, breaker = true }) do
    if conf[k] ~= nil and type(conf[k]) ~= "boolean" then
      return bad(k, "must be true or false")
    end
    c[k] = conf[k] == nil and default or conf[k]
  end
  if conf.degraded ~= nil and type(conf.degraded) ~= "boolean" then
    return bad("degraded", "must be true or false")
  end
  c.degraded = conf.degraded
  -- on_call(call): told of every finished wx:request (transport.lua)
  if conf.on_call ~= nil and type(conf.on_call) ~= "function" then
    return bad("on_call", "must be a function (call)")
  end
  c.on_call = conf.on_call
  c.shared_dict = conf.shared_dict or "paygate"
  if type(c.shared_dict) ~= "string" then
    return bad("shared_dict", "must be the name of a paygate.shared dict")
  end
  -- the replay cache: a dict of its own, so nobody else's entries push
  -- its records out (nil: "wechatpay_replay" when the runtime has it,
  -- else shared_dict)
  if conf.replay_dict ~= nil and (type(conf.replay_dict) ~= "string"
                                  or conf.replay_dict == "") then
    return bad("replay_dict", "must be the name of a paygate.shared dict")
  end
  c.replay_dict = conf.replay_dict
  -- log_level: this client's own lines below it are not logged (the
  -- test kit's clients say warnings only: a spec's output is the spec's)
  if conf.log_level ~= nil and not LOG_LEVELS[conf.log_level] then
    return bad("log_level", 'must be "debug", "info", "warn" or "error"')
  end
  c.log_level = conf.log_level
  return c
end

-- checked configuration -> its filtered log (kept beside it, not in it:
-- a checked configuration may be checked again, and takes no other key)
local filtered = setmetatable({}, { __mode = "k" })

--- syntax: log = config.logger(c)
-- The log of the client whose checked configuration is c: paygate.log,
-- but for the lines below c.log_level, which do nothing (the runtime's
-- --log-level applies as well). Every line of the client goes through it.
function _M.logger(c)
  local log = require("paygate").log
  local least = LOG_LEVELS[c.log_level]
  if not least then return log end
  local l = filtered[c]             -- (made once per configuration)
  if not l then
    local quiet = function() end
    l = {}
    for name, n in pairs(LOG_LEVELS) do
      l[name] = n >= least and log[name] or quiet
    end
    filtered[c] = l
  end
  return l
end

--- syntax: yes = config.logs(c, level)
-- Whether a line of the client at level ("debug" ... "error") is logged:
-- neither c.log_level nor the runtime's --log-level filters it out. A
-- mark that says a line once (per instance, an hour, ...) is set only
-- when this holds: a line filtered out is not said, and the next client
-- (or this one, the level lowered) that logs it must still say it.
function _M.logs(c, level)
  local n = LOG_LEVELS[level]
  return n >= (LOG_LEVELS[c.log_level] or 0) and core.log_enabled(n)
end

--- syntax: say = config.once_an_interval(wx, level, mark, every, now)
-- Whether this worker is the one to log the client's line at level named
-- mark now: once per `every` seconds per instance (the first worker to
-- set the mark in the client's shared dict; the others look again in a
-- minute, not at every call: no dict write each), or per worker when the
-- client has no dict or the dict cannot take the mark (full). Never while
-- the line would be filtered out (config.logs): no mark set then.
function _M.once_an_interval(wx, level, mark, every, now)
  if not _M.logs(wx.conf, level) then return false end
  local next_key = "once_next_" .. mark
  local at = wx[next_key]
  if at and now < at then return false end
  if wx.dict then
    local ok, err = wx.dict:add(wx.key_prefix .. mark, true, every)
    if not ok and type(err) == "table" and err.kind == "exists" then
      wx[next_key] = now + 60
      return false
    end
  end
  wx[next_key] = now + every
  return true
end

return _M
