-- paygate.credentials: merchant credentials (and the HTTPS listener's)
-- kept in etcd, watched, validated and hot-swapped in every worker.
--
--   local credentials = require "paygate.credentials"
--   local src = assert(credentials.new(paygate.config.credentials))
--   local set = assert(src:load("1900000001"))     -- etcd, else the cache
--   local wx = wechatpay.client(src:wechatpay_conf("1900000001", conf))
--   src:bind("1900000001", wx)                     -- swaps on a change
--   src:start()                                    -- one watch per set
--
-- The layout under a merchant's prefix (docs/etcd.md):
--   apiclient_key.pem (secret), apiclient_cert.pem, apiv3_key (secret),
--   and optionally wechatpay_public_key.pem + public_key_id;
-- under the listener's prefix: cert.pem, key.pem (secret).
-- Secret values are envelopes: the value encrypted (AES-256-GCM) under a
-- fresh data key, that data key encrypted under the key-encryption key
-- (KEK) read from a local file or an environment variable, so a read of
-- etcd alone reveals nothing. A set is applied whole or not at all, in
-- revision order, never an older one after a newer; the last good set is
-- cached on disk (still sealed) so a start with etcd down serves with it.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "paygate.json"
local etcd = require "paygate.etcd"
local tls = require "paygate.tls"

local type, tostring, ipairs, pairs, pcall, setmetatable, getmetatable, error =
      type, tostring, ipairs, pairs, pcall, setmetatable, getmetatable, error

local _M = {}

local ALG = "AEAD_AES_256_GCM"
-- Envelope format 2: the data key and the data are bound (AEAD
-- associated data) to the full etcd key they are stored under. Format 1
-- bound the data to the file's name only, so a sealed value could be
-- copied from one merchant's prefix to another's: it is refused.
local ENVELOPE = 2
local DEK_AAD = "paygate-credentials-dek"
local DATA_AAD = "paygate-credentials-data"

-- file name -> { field (wechatpay.client's name), secret, optional }
_M.MERCHANT_FILES = {
  ["apiclient_key.pem"] = { field = "merchant_private_key", secret = true },
  ["apiclient_cert.pem"] = { field = "merchant_certificate" },
  ["apiv3_key"] = { field = "apiv3_key", secret = true },
  ["wechatpay_public_key.pem"] = { field = "public_key", optional = true },
  ["public_key_id"] = { field = "public_key_id", optional = true },
  -- during an APIv3 key rotation: the old key, so that a worker started
  -- after the swap still opens what WeChat sealed under it
  ["previous_apiv3_key"] = { field = "previous_apiv3_keys", secret = true,
                             optional = true },
}
_M.TLS_FILES = {
  ["cert.pem"] = { field = "cert" },
  ["key.pem"] = { field = "key", secret = true },
}

-- credentials.redact_url(url), credentials.shown_name(v): what a message
-- may print of a store URL or a secret's file or variable name -- kept
-- here for the callers that know them under these names; they live in
-- paygate.redact (redact.url, redact.name).
local redact = require "paygate.redact"
_M.redact_url = redact.url
_M.shown_name = redact.name

local function log()
  return require("paygate").log
end

local function bad(msg)
  return nil, core.error("invalid_config", "credentials: " .. msg)
end

local function invalid(msg, fields)
  return nil, core.error("invalid_credentials", "credentials: " .. msg,
                         fields)
end

-- ---- the key-encryption key and envelopes ------------------------------

-- 32 bytes given raw, as 64 hex digits or as base64 (whitespace trimmed).
-- 32 characters of text are not taken as a raw key: they are most likely
-- a shorter key written out (16 bytes in hex, 24 in base64), and a
-- random 32-byte key is all text (printable or spaces) once in 10^13.
local function kek_of(s)
  if type(s) ~= "string" then return nil end
  if #s == 32 and s:find("[^\9-\13\32-\126]") then return s end
  s = s:gsub("%s+", "")
  if #s == 64 and s:match("^%x+$") then return (crypto.hex_decode(s)) end
  if s:match("^[%w+/]+=*$") then
    local raw = crypto.base64_decode(s)
    if raw and #raw == 32 then return raw end
  end
  return nil
end

--- syntax: kek, err = credentials.read_kek{ kek_file = path | kek_env = NAME }
-- returns: the 32-byte key-encryption key, or nil, err (invalid_config;
-- the message never holds the key).
function _M.read_kek(conf)
  local raw, from
  if conf.kek_file ~= nil then
    if type(conf.kek_file) ~= "string" then
      return bad("kek_file must be a file path")
    end
    local name = _M.shown_name(conf.kek_file)
    from = "kek_file" .. (name and " " .. name or "")
    -- (a folder, a FIFO, an empty or a huge file refused: the reason
    -- holds neither the path, which may be the key itself, nor a byte)
    local rerr
    raw, rerr = core.read_file(conf.kek_file, "kek_file")
    if not raw then
      if rerr.kind == "empty" or rerr.kind == "too_large" then
        return bad(from .. ": " .. rerr.reason)
      end
      return bad("kek_file: cannot read " .. (name or "the file it names")
                 .. " (" .. rerr.reason .. ")")
    end
  elseif conf.kek_env ~= nil then
    if type(conf.kek_env) ~= "string" then
      return bad("kek_env must be an environment variable's name")
    end
    raw = os.getenv(conf.kek_env)
    local name = _M.shown_name(conf.kek_env)
    if not raw then
      return bad("kek_env: " .. (name or "the variable it names")
                 .. " is not set")
    end
    from = "kek_env" .. (name and " " .. name or "")
  else
    return bad("give kek_file or kek_env (the key-encryption key)")
  end
  local kek = kek_of(raw)
  if not kek then
    return bad(from .. ": not a 32-byte key (raw, 64 hex digits or base64)")
  end
  return kek
end

--- syntax: id = credentials.kek_id(kek) -- names a KEK without revealing it
function _M.kek_id(kek)
  return crypto.hex(crypto.digest("sha256", "paygate-kek-id" .. kek)):sub(1, 16)
end

local function gcm_seal(key, aad, pt)
  local nonce = crypto.random_bytes(12)
  local ct = assert(crypto.aead_encrypt(ALG, key, nonce, aad, pt))
  return crypto.base64_encode(nonce .. ct)
end

local function gcm_open(key, aad, b64)
  local raw = type(b64) == "string" and crypto.base64_decode(b64)
  if not raw or #raw < 28 then return nil end
  return crypto.aead_decrypt(ALG, key, raw:sub(1, 12), aad, raw:sub(13))
end

--- syntax: text = credentials.seal(kek, key, plaintext)
-- An envelope (JSON) for the secret plaintext stored under key: the full
-- etcd key (the set's prefix and the file's name, e.g.
-- "/paygate/merchants/1900000001/apiclient_key.pem"). Both the data and
-- the data key are bound to it (associated data), so an envelope copied
-- to another file or to another merchant's prefix does not open.
-- Each seal draws a fresh data key and fresh nonces.
function _M.seal(kek, key, plaintext)
  if type(kek) ~= "string" or #kek ~= 32 then
    error("credentials.seal: kek must be the 32-byte key-encryption key", 2)
  end
  if type(key) ~= "string" or key == "" then
    error("credentials.seal: key must be the etcd key it is stored under", 2)
  end
  if type(plaintext) ~= "string" then
    error("credentials.seal: plaintext must be a string", 2)
  end
  local dek = crypto.random_bytes(32)
  return json.encode({ paygate_envelope = ENVELOPE, kek = _M.kek_id(kek),
    dek = gcm_seal(kek, DEK_AAD .. "\0" .. key, dek),
    data = gcm_seal(dek, DATA_AAD .. "\0" .. key, plaintext) })
end

--- syntax: plaintext, err = credentials.open(kek, key, text)
-- key: the full etcd key the envelope was read from. kek: the
-- key-encryption key, or a list of them (the current one and older ones
-- during a change of KEK): the envelope names the one it needs.
function _M.open(kek, key, text)
  local env = type(text) == "string" and text:sub(1, 1) == "{"
              and json.decode(text)
  if type(env) ~= "table" or env.paygate_envelope == nil then
    return invalid(key .. ": not an envelope (a secret must be sealed "
                   .. "with the key-encryption key: paygate etcd publish)")
  end
  -- the envelope's own fields are etcd's content: only a plain number
  -- (the version) or a KEK id's hex digits are shown, never other text
  if env.paygate_envelope ~= ENVELOPE then
    local v = env.paygate_envelope
    return invalid(key .. ": an envelope of another format (version "
                   .. (type(v) == "number" and tostring(v) or "unknown")
                   .. ", this paygate opens " .. ENVELOPE
                   .. "): publish the set again")
  end
  local keks = type(kek) == "table" and kek or { kek }
  kek = nil
  local ids = {}
  for i, k in ipairs(keks) do
    ids[i] = _M.kek_id(k)
    if ids[i] == env.kek then kek = k end
  end
  if not kek then
    local id = type(env.kek) == "string" and #env.kek <= 16
               and env.kek:match("^%x+$") or "unknown"
    -- err.kek_id: the id the envelope names, for `paygate etcd publish`
    -- to tell a set sealed under another KEK from one that is broken:
    -- only an id of kek_id's form (16 lower-case hex digits); another
    -- (an envelope edited by hand) is no KEK's, and publish may replace it
    local kek_id = #id == 16 and id:match("^[0-9a-f]+$") or nil
    return invalid(key .. ": sealed under another key-encryption key (id "
                   .. id .. ", ours " .. table.concat(ids, ", ") .. ")",
                   { kek_id = kek_id })
  end
  local dek = gcm_open(kek, DEK_AAD .. "\0" .. key, env.dek)
  local pt = dek and #dek == 32
             and gcm_open(dek, DATA_AAD .. "\0" .. key, env.data)
  if not pt then
    return invalid(key .. ": the envelope does not open (altered, or "
                   .. "copied from another key or merchant)")
  end
  return pt
end

-- ---- validation -------------------------------------------------------

--- syntax: set, err = credentials.validate(files, kind[, now])
-- files: name -> plaintext (secrets opened). kind: "merchant" | "tls".
-- returns: the set (wechatpay.client field names, or cert/key), or nil,
-- err (invalid_credentials naming what is wrong; never a secret).
function _M.validate(files, kind, now)
  now = now or core.time()
  local spec = kind == "tls" and _M.TLS_FILES or _M.MERCHANT_FILES
  local set = {}
  for name, d in pairs(spec) do
    local v = files[name]
    if v == nil and not d.optional then
      return invalid(name .. " is missing")
    end
    set[d.field] = v
  end
  for name in pairs(files) do
    if not spec[name] then
      -- (a key's name in etcd, as anyone who may write there wrote it:
      -- shown without its control bytes, which paygate doctor printed
      -- raw to the operator's terminal, and cut)
      local shown = tostring(name):sub(1, 128):gsub("[%z\1-\31\127]",
        function(c) return ("\\x%02X"):format(c:byte()) end)
      return invalid("unexpected file " .. shown
                     .. (#tostring(name) > 128 and "..." or ""))
    end
  end
  -- PEM text, as the WeChat Pay client and the listener take them: a DER
  -- file loads below too, but every worker's client would refuse it
  for _, name in ipairs({ "apiclient_cert.pem", "apiclient_key.pem",
                          "wechatpay_public_key.pem", "cert.pem",
                          "key.pem" }) do
    local d = spec[name]
    local v = d and set[d.field]
    if v == "" then
      return invalid(name .. " is empty")
    end
    if v ~= nil and not v:find("-----BEGIN", 1, true) then
      return invalid(name .. " is not PEM text (no -----BEGIN line: a DER"
                     .. " file? openssl x509 or pkey -inform DER converts"
                     .. " it)")
    end
  end
  local cert_pem = kind == "tls" and set.cert or set.merchant_certificate
  local key_pem = kind == "tls" and set.key or set.merchant_private_key
  local cert = crypto.certificate(cert_pem)
  if not cert then
    return invalid((kind == "tls" and "cert.pem" or "apiclient_cert.pem")
                   .. " is not a certificate")
  end
  if kind == "tls" then
    -- the listener's own test of a pair (paygate.tls.check, what its
    -- swap checks): RSA or ECDSA, as the server serves them. The
    -- merchant's test below takes RSA and SM2 keys only, and refused an
    -- ECDSA pair the listener serves.
    local ok, terr = tls.check(cert_pem, key_pem)
    if not ok then
      local why = tostring(terr and terr.message or terr)
      if why:find("match", 1, true) then
        return invalid(why .. " (serial " .. cert:serial() .. ")")
      end
      return invalid((why:find("^the cert") and "cert.pem" or "key.pem")
                     .. ": " .. why)
    end
  else
    local key = crypto.private_key(key_pem)
    if not key then
      return invalid("apiclient_key.pem is not a private key")
    end
    if not crypto.check_pair(key, cert) then
      return invalid("the private key does not match the certificate "
                     .. "(serial " .. cert:serial() .. ")")
    end
  end
  if cert:not_before() > now then
    return invalid("the certificate (serial " .. cert:serial()
                   .. ") is not valid yet", { valid_from = cert:not_before() })
  end
  if cert:not_after() <= now then
    return invalid("the certificate (serial " .. cert:serial()
                   .. ") has expired")
  end
  set.serial = cert:serial()
  set.not_after = cert:not_after()
  if kind == "tls" then return set end
  if #set.apiv3_key ~= 32 then
    return invalid("apiv3_key must be exactly 32 bytes")
  end
  if set.previous_apiv3_keys ~= nil then
    if #set.previous_apiv3_keys ~= 32 then
      return invalid("previous_apiv3_key must be exactly 32 bytes")
    end
    set.previous_apiv3_keys = { set.previous_apiv3_keys }
  end
  if (set.public_key == nil) ~= (set.public_key_id == nil) then
    return invalid("wechatpay_public_key.pem and public_key_id go together")
  end
  if set.public_key then
    set.public_key_id = set.public_key_id:gsub("%s+$", "")
    if not set.public_key_id:match("^PUB_KEY_ID_%w+$") then
      return invalid("public_key_id must be PUB_KEY_ID_ and digits")
    end
    if not crypto.public_key(set.public_key) then
      return invalid("wechatpay_public_key.pem is not a public key")
    end
  end
  return set
end

-- ---- the source ---------------------------------------------------------

local Source = {}
Source.__index = Source

local gauges
local function metrics()
  if gauges == nil then
    local ok, m = pcall(require, "paygate.metrics")
    if ok and type(m) == "table" then
      gauges = {
        revision = m.gauge("paygate_credentials_revision",
          "The etcd revision of the credential set in use, per set and "
          .. "worker."),
        refused = m.gauge("paygate_credentials_refused",
          "Credential sets refused (invalid) since the worker started."),
      }
    else
      gauges = false
    end
  end
  return gauges or nil
end

local function check_prefix(p, what)
  if type(p) ~= "string" or p:sub(1, 1) ~= "/" or p:sub(-1) ~= "/" then
    return nil, what .. " must be an etcd prefix: /.../"
  end
  return p
end

-- A plain deep copy of a configuration table. paygate.config's tables
-- are read-only proxies that LuaJIT's pairs, ipairs and # do not see
-- through (they carry __pairs); other tables with a metatable (a
-- paygate.etcd client) are kept as they are.
local function plain(t)
  local mt = getmetatable(t)
  if mt ~= nil and not mt.__pairs then return t end
  local iter, st, k0 = pairs(t)
  if mt ~= nil then iter, st, k0 = mt.__pairs(t) end
  local c = {}
  for k, v in iter, st, k0 do
    c[k] = type(v) == "table" and plain(v) or v
  end
  return c
end

--- syntax: src, err = credentials.new(conf)
-- conf: etcd (etcd.new's options, or a paygate.etcd client), kek_file or
--   kek_env (the current KEK), previous_kek_files (older ones that still
--   open sets sealed before a change of KEK), cache_dir,
--   merchants = { [mchid] = prefix, ... }, tls = prefix (the HTTPS
--   listener's; optional), load_timeout (seconds,
--   default 3), insecure_etcd (false; true only where etcd's TLS and auth
--   are provided another way: never with secrets on a shared network),
--   write_cache (true; false: the cache is read, never written -- a
--   check such as paygate doctor, run as another user, must not leave a
--   file or lock there the gateway's workers cannot replace).
-- returns: a source, or nil, err (invalid_config); refuses an etcd
-- reached without TLS and user/password auth.
function _M.new(conf)
  if type(conf) ~= "table" then
    return bad("the configuration must be a table")
  end
  conf = plain(conf)
  local kek, err = _M.read_kek(conf)
  if not kek then return nil, err end
  local keks = { kek }
  if conf.previous_kek_files ~= nil then
    if type(conf.previous_kek_files) ~= "table" then
      return bad("previous_kek_files must be a list of file paths")
    end
    for _, f in ipairs(conf.previous_kek_files) do
      local k, kerr = _M.read_kek{ kek_file = f }
      if not k then return nil, kerr end
      keks[#keks + 1] = k
    end
  end
  local cli = conf.etcd
  if type(cli) == "table" and getmetatable(cli) ~= etcd.Client then
    local ok, c = pcall(etcd.new, cli)
    if not ok then return bad("etcd: " .. tostring(c):gsub("^.-: ", "")) end
    cli = c
  end
  if type(cli) ~= "table" then
    return bad("etcd must be etcd.new's options (endpoints, user, ...)")
  end
  if not cli:secure() and conf.insecure_etcd ~= true then
    return bad("etcd must be reached over https:// with a user and "
               .. "password: credentials are secrets")
  end
  if type(conf.cache_dir) ~= "string" or conf.cache_dir == "" then
    return bad("cache_dir must be a directory (the last good sets)")
  end
  local sets = {}
  if conf.merchants ~= nil and type(conf.merchants) ~= "table" then
    return bad("merchants must map merchant ids to etcd prefixes")
  end
  if conf.merchants == nil and conf.tls == nil then
    return bad("give merchants (merchant ids to etcd prefixes) or tls")
  end
  for mchid, prefix in pairs(conf.merchants or {}) do
    if type(mchid) ~= "string" or not mchid:match("^%d+$") then
      return bad("merchants: keys must be merchant ids (digits)")
    end
    local p, why = check_prefix(prefix, "merchants[" .. mchid .. "]")
    if not p then return bad(why) end
    sets[mchid] = { name = mchid, kind = "merchant", prefix = p }
  end
  if conf.tls ~= nil then
    local p, why = check_prefix(conf.tls, "tls")
    if not p then return bad(why) end
    sets.tls = { name = "tls", kind = "tls", prefix = p }
  end
  return setmetatable({ cli = cli, keks = keks, cache_dir = conf.cache_dir,
    sets = sets, load_timeout = conf.load_timeout or 3, tasks = {},
    write_cache = conf.write_cache ~= false }, Source)
end

local function cache_path(src, set)
  return src.cache_dir .. "/" .. set.name .. ".json"
end

-- Opens and validates raw (name -> stored value). returns the set.
local function open_set(src, set, raw, revision)
  local files = {}
  for name, value in pairs(raw) do
    local d = (set.kind == "tls" and _M.TLS_FILES or _M.MERCHANT_FILES)[name]
    if d and d.secret then
      local pt, err = _M.open(src.keks, set.prefix .. name, value)
      if not pt then return nil, err end
      files[name] = pt
    else
      files[name] = value
    end
  end
  local v, err = _M.validate(files, set.kind)
  if not v then return nil, err end
  v.revision = revision
  return v
end

local function read_cache(src, set)
  local f = io.open(cache_path(src, set), "rb")
  if not f then return nil end
  local doc = json.decode(f:read("*a") or "")
  f:close()
  if type(doc) ~= "table" or type(doc.files) ~= "table"
     or type(doc.revision) ~= "string" then
    return nil
  end
  return doc
end

-- seconds a cache write waits for another worker's (a write and an
-- fsync: milliseconds) before it is given up, the cache left as it is
local CACHE_LOCK_WAIT = 5

-- Takes the cache's lock (cache_dir/<name>.json.lock, shared by every
-- worker and instance using cache_dir). returns the lock, or nil, err.
-- yields (in a coroutine) while another holds it.
local function lock_cache(path)
  local deadline = core.mono() + CACHE_LOCK_WAIT
  while true do
    local lock, err = core.lock_file(path .. ".lock", 384)
    if lock or err.kind ~= "busy" or not core.in_coroutine()
       or core.mono() >= deadline then
      return lock, err
    end
    core.sleep(0.01)
  end
end

-- Under the cache's lock: the file replaced unless it holds this revision
-- or a newer one. returns true (written or newer kept), or nil, err.
local function replace_cache(src, set, raw, revision, path)
  local on_disk = read_cache(src, set)
  if on_disk and on_disk.revision:match("^%d+$")
     and etcd.rev_cmp(on_disk.revision, revision) >= 0 then
    return true                     -- as new or newer already
  end
  -- whole or not at all, flushed, the owner's alone: a write that fails
  -- (a full disk) keeps the previous cache, which a worker started with
  -- etcd down serves from (the secrets in it stay sealed)
  return core.write_file(path, json.encode({ revision = revision,
                                             files = raw }), 384)
end

local function write_cache(src, set, raw, revision)
  local path = cache_path(src, set)
  -- several workers write the same file (all of an instance's, a draining
  -- generation's after a reload, other instances' on a shared disk): the
  -- revision on disk is compared and replaced under one lock, so a
  -- worker that lags never puts an older set over a newer one, which a
  -- worker started later with etcd down would load
  local lock, err = lock_cache(path)
  if not lock then
    log().warn("credentials: cannot lock the cache, the old one kept",
               { file = path, error = tostring(err) })
    return
  end
  -- whatever happens under it (a raise included), the lock is given back
  -- now, not when the collector finds it (the other workers would wait
  -- for it, then give up)
  local pok, ok, werr = pcall(replace_cache, src, set, raw, revision, path)
  lock:unlock()
  if not pok then
    werr = ok
  end
  if not (pok and ok) then
    log().warn("credentials: cannot write the cache, the old one kept",
               { file = path, error = tostring(werr) })
  end
end

-- The raw files of a set in etcd: name -> value, and the set's revision
-- (the newest mod_revision among them: the publication's) and the
-- store's.
local function fetch(src, set)
  local res, err = src.cli:get_prefix(set.prefix)
  if not res then return nil, err end
  local raw, rev = {}, "0"
  for _, kv in ipairs(res.kvs) do
    raw[kv.key:sub(#set.prefix + 1)] = kv.value
    if etcd.rev_cmp(kv.mod_revision, rev) > 0 then rev = kv.mod_revision end
  end
  return raw, rev, res.revision
end

local function publish_metric(set)
  local g = metrics()
  if g and set.current then
    -- one series per worker (pid): the instance's /metrics shows whether
    -- all its workers agree
    g.revision:set(tonumber(set.current.revision) or 0,
                   { set = set.name, pid = tostring(core.pid()) })
  end
end

-- Applies a newer valid set: the hooks run (each may refuse), then it is
-- current and cached. returns true, or nil, err (the old set stays).
local function apply(src, set, raw, rev, from_cache)
  if set.current and etcd.rev_cmp(rev, set.current.revision) <= 0 then
    return true                     -- never back, never twice
  end
  local v, err = open_set(src, set, raw, rev)
  if v then
    for _, hook in ipairs(set.hooks or {}) do
      -- (a hook that raises refuses the set: raised here, it would end
      -- the watch, and no later set would ever be taken)
      local called, ok, herr = pcall(hook, v)
      if not called then
        ok, herr = nil, core.error("invalid_credentials", "credentials: a"
                                   .. " hook raised: " .. tostring(ok))
      end
      if not ok then
        v, err = nil, herr or core.error("invalid_credentials",
                                         "credentials: refused by a hook")
        break
      end
    end
  end
  if not v then
    if set.refused ~= rev then
      set.refused = rev
      src.refusals = (src.refusals or 0) + 1
      local g = metrics()
      if g then g.refused:set(src.refusals, { pid = tostring(core.pid()) }) end
      -- (at a start there is no old one: load then says which set
      -- serves, the cached one or none)
      log().warn(set.current and "credentials: set refused, the old one"
        .. " kept" or "credentials: set refused", {
        set = set.name, revision = rev, kept = set.current
        and set.current.revision or nil, reason = tostring(err) })
    end
    local from = type(err) == "table" and err.valid_from
    if from and not from_cache then
      -- refused only for now (its certificate starts soon: a clock a
      -- little behind its issuer's): read it again once it is valid, or
      -- it would wait for the next change in etcd
      local delay = from - core.time() + 1
      if delay > 0 and delay <= 86400 and not src.tasks["retry:" .. set.name]
      then
        src.tasks["retry:" .. set.name] = core.spawn(function()
          core.sleep(delay)
          src.tasks["retry:" .. set.name] = nil
          if src.stopped then return end
          local raw2, rev2 = fetch(src, set)
          if raw2 then apply(src, set, raw2, rev2) end
        end)
      end
    end
    return nil, err
  end
  set.current = v
  if not from_cache and src.write_cache then
    write_cache(src, set, raw, rev)
  end
  publish_metric(set)
  log().info("credentials: new set in use", { set = set.name,
             revision = rev, serial = v.serial })
  return true
end

local function get_set(src, name)
  local set = src.sets[name]
  if not set then error("credentials: no set named " .. tostring(name), 3) end
  return set
end

--- syntax: set, err = src:load(name) -- name: a mchid, or "tls"
-- The current set: from etcd, or when etcd does not answer within
-- load_timeout, the cached last good set. returns the set (wechatpay
-- field names, serial, revision) or nil, err. yields.
function Source:load(name)
  local set = get_set(self, name)
  if set.current then return set.current end
  local raw, rev, store_rev, task
  -- etcd gave an earlier load of this source no answer within
  -- load_timeout (a hung member, a cut network): a set with a cached copy
  -- does not wait for it again, or a start with n sets would take n
  -- times load_timeout (a reload's workers get 60 s); the watch catches up
  if not (self.silent and read_cache(self, set)) then
    local done = core.event()
    task = core.spawn(function()
      raw, rev, store_rev = fetch(self, set)
      done:set()
    end)
    done:wait(self.load_timeout)
    self.silent = not raw and rev == nil or nil
  end
  if raw then
    set.store_rev = store_rev
    local ok, err = apply(self, set, raw, rev)
    if ok then
      set.origin = { "etcd" }
      return set.current
    end
    -- an invalid set in etcd: serve the cached one if there is one
    local c = read_cache(self, set)
    if c and apply(self, set, c.files, c.revision, true) then
      log().warn("credentials: the set in etcd is refused, serving the"
                 .. " cached set", { set = name, revision = c.revision,
                                     refused = rev })
      set.origin = { "cache", "the set in etcd (revision " .. rev
        .. ") is refused: " .. tostring(err.message):gsub("^credentials: ",
        ""), "invalid_credentials" }
      return set.current
    end
    return nil, err
  end
  if task then pcall(task.cancel, task) end
  local why = rev or "no answer within " .. self.load_timeout .. " s"
                     .. (task and "" or " to an earlier set's read")
  -- etcd answered no (a wrong password, a user without read access on
  -- the prefix): not an outage, and not fixed by waiting
  local kind = type(rev) == "table" and rev.kind
  local state = kind == "auth" and "etcd refused the credentials"
    or kind == "permission" and "etcd refused the read (permission)"
    or "etcd unavailable"
  local c = read_cache(self, set)
  if c then
    local ok, err = apply(self, set, c.files, c.revision, true)
    if ok then
      log().warn("credentials: " .. state .. ", serving the cached set",
                 { set = name, revision = c.revision, reason = tostring(why) })
      -- said: the watch's reads and watches refused for the same reason
      -- (a wrong password) add no line; "the set is read again" ends it
      set.read_error, set.watch_error = tostring(why), tostring(why)
      set.origin = { "cache", state .. " (" .. tostring(why) .. ")",
                     state == "etcd unavailable" and "unavailable" or kind }
      return set.current
    end
    return nil, err
  end
  return nil, core.error(state == "etcd unavailable" and "unavailable"
    or kind, "credentials: " .. name .. ": " .. state .. " ("
    .. tostring(why) .. ") and no cached set")
end

--- syntax: from, why, kind = src:origin(name)
-- Where the set load gave came from: "etcd", or "cache" with why etcd's
-- was not taken (one line, no secret) and its kind: unavailable (no
-- answer), auth or permission (etcd refused the user or the read),
-- invalid_credentials (the set etcd holds was refused). nil before a
-- load that gave a set.
function Source:origin(name)
  local o = get_set(self, name).origin
  if not o then return nil end
  return o[1], o[2], o[3]
end

--- syntax: src:on_change(name, fn) -- fn(set) --> true | nil, err
-- Runs before a new set is used; a failure refuses the set.
function Source:on_change(name, fn)
  local set = get_set(self, name)
  set.hooks = set.hooks or {}
  set.hooks[#set.hooks + 1] = fn
end

--- syntax: src:bind(mchid, wx) -- swaps a paygate.wechatpay client's keys
function Source:bind(name, wx)
  self:on_change(name, function(v) return wx:set_credentials(v) end)
end

--- syntax: conf = src:wechatpay_conf(mchid, base) -- base + the set
function Source:wechatpay_conf(name, base)
  local v = get_set(self, name).current
  if not v then error("credentials: load " .. name .. " first", 2) end
  local c = {}
  for k, x in pairs(base or {}) do c[k] = x end
  for _, d in pairs(_M.MERCHANT_FILES) do c[d.field] = v[d.field] end
  return c
end

--- syntax: set = src:current(name)
function Source:current(name)
  return get_set(self, name).current
end

-- seconds between reads of a set that cannot be read (etcd refusing,
-- an answer too large): doubling from 1 to this
_M.READ_PAUSE_MAX = 30
-- seconds a watch goes on with no etcd member answering before it ends
-- (logged: "watch ended") and the set is read again: an etcd down for
-- good is said, not retried in silence inside the watch
_M.WATCH_GIVE_UP = 60

-- Watches one set until stopped: each change reloads the prefix (one
-- consistent read) and applies it when newer.
local function watch_set(src, set)
  local from = set.store_rev or (set.current and set.current.revision)
  local failures = 0
  local last_raw                   -- what the last good read found
  local function reread()
    local raw, rev, store_rev = fetch(src, set)
    if raw then
      if failures > 0 then
        log().info("credentials: the set is read again", { set = set.name })
      end
      failures, set.read_error, set.watch_error = 0, nil, nil
      apply(src, set, raw, rev)
      from, last_raw = store_rev, raw
      return true
    end
    -- said once per reason (not once per read), and read again after a
    -- pause that grows: a set that cannot be read (a value too large for
    -- one answer, a permission taken away) is not read twice a second by
    -- every worker of every instance, in silence
    failures = failures + 1
    local why = tostring(rev)
    if set.read_error ~= why then
      set.read_error = why
      log().warn("credentials: cannot read the set, the one in use kept", {
        set = set.name, kept = set.current and set.current.revision or nil,
        reason = why })
    end
    return false
  end
  local function pause()
    core.sleep(math.min(2 ^ math.max(failures - 1, 0), _M.READ_PAUSE_MAX))
  end
  -- A file deleted straight in etcd (publish deletes in the transaction
  -- that writes the new set) leaves the set's revision (its newest
  -- mod_revision) where it was: the set in use is kept, and said so.
  local function deleted(ev)
    if set.current and etcd.rev_cmp(set.current.revision, ev.revision) >= 0
    then
      return                      -- a publish that removed an optional file
    end
    local reason
    if last_raw then
      local ok, v, err = pcall(open_set, src, set, last_raw, ev.revision)
      if not (ok and v) then reason = tostring(ok and err or v) end
    end
    log().warn("credentials: a file of the set was deleted in etcd, the"
      .. " set in use kept (publish the whole set)", { set = set.name,
      file = ev.key:sub(#set.prefix + 1), revision = ev.revision,
      kept = set.current and set.current.revision or nil, reason = reason })
  end
  while not src.stopped do
    -- nothing read yet (etcd was down and no cache): read first, then
    -- watch from the revision after that read, so nothing falls between
    if from or reread() then
      local w = src.cli:watch(set.prefix, { from_revision =
        etcd.rev_next(from), give_up_after = _M.WATCH_GIVE_UP })
      set.watch = w
      local read_failed = false
      while true do
        local ev, err = w()
        if not ev then
          -- said once per reason until a read works again: a watch
          -- refused at once (a wrong password) or given up on (etcd down
          -- for good) ends again after each pause
          if err and set.watch_error ~= tostring(err) then
            set.watch_error = tostring(err)
            log().warn("credentials: watch ended, reading the set again",
                       { set = set.name, reason = tostring(err) })
          end
          break                   -- compacted and the like: read again
        end
        -- a read that fails after its event (etcd restarting, no leader)
        -- would lose the change: the watch has moved past it. Watch again
        -- from the last read instead, and the event comes again. An event
        -- the last read already saw (the other files of one publish)
        -- needs no read.
        if etcd.rev_cmp(ev.revision, from) > 0 and not reread() then
          read_failed = true
          break
        end
        if ev.type == "delete" then deleted(ev) end
      end
      w:close()
      if src.stopped then break end
      if read_failed or not reread() then pause() end
    else
      pause()
    end
  end
end

--- syntax: src:start() -- one background watch per set
function Source:start()
  for _, set in pairs(self.sets) do
    if not self.tasks[set.name] then
      self.tasks[set.name] = core.spawn(watch_set, self, set)
    end
  end
end

--- syntax: src:stop()
function Source:stop()
  self.stopped = true
  for name, t in pairs(self.tasks) do
    pcall(t.cancel, t)
    self.tasks[name] = nil
  end
end

return _M
