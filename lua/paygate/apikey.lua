-- paygate.apikey: merchant-API authentication with per-app API keys.
--
-- A caller signs each request with HMAC-SHA256 and sends
--
--   Authorization: PAYGATE-HMAC-SHA256 app_id="shop1",key_id="ak_...",
--                  timestamp="1764500000",signature="<64 hex>"
--
-- (one line), where signature = hex(HMAC-SHA256(signing_key, message)),
--   message     = METHOD "\n" PATH_WITH_QUERY "\n" TIMESTAMP "\n"
--                 IDEMPOTENCY_KEY "\n" BODY   (the header's value, or "")
--   signing_key = HMAC-SHA256(key = secret, "paygate-apikey-v1")  (32 bytes)
-- and the timestamp (epoch seconds) is at most WINDOW (300 s) away from
-- the server's clock, in either direction.
--
-- The server keeps (key_id, app_id, hex(signing_key)) only: never the
-- secret, which apikey.create returns once. HMAC needs the verifier to
-- hold the signing key, so whoever reads that table could sign requests
-- (revoke and re-create keys after such a leak), but cannot learn the
-- secret. Signatures are compared with crypto.constant_time_equal.
--
--   paygate.before(apikey.before_hook(db, { prefix = "/v1/" }))
--   -- then req.app_id is the authenticated app in every handler
--
-- A refused request gets 401 { error = reason, message } with reason
-- one of missing_signature, malformed_signature, unknown_app,
-- revoked_key, stale_timestamp, bad_signature; each is counted (apikey.stats()) and
-- logged with app_id and key_id, never with the signature or a key. A
-- bad_signature's answer also carries string_to_sign (the message the
-- server signed over; absent for a body past 8 KiB) and body_sha256.
--
-- Each key made or revoked is an entry of the audit trail (paygate.audit,
-- subject "apikey:<app_id>", what apikey.created / apikey.revoked, ref the
-- key id, the caller's actor) in the same transaction as the change: never
-- the secret nor the signing key. A key's last use (a request it signed
-- that was accepted) is written at most once a minute per key and worker
-- (paygate_api_key_uses), not per request: apikey.list shows it.

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "paygate.json"
local sql = require "paygate.sql"
local audit = require "paygate.audit"

local type, error, pairs, tostring, tonumber, setmetatable, getmetatable =
      type, error, pairs, tostring, tonumber, setmetatable, getmetatable

local _M = { _VERSION = "0.1.0" }

local SCHEME = "PAYGATE-HMAC-SHA256"
local KDF_LABEL = "paygate-apikey-v1"
local WINDOW = 300              -- s a timestamp may be off, either way
local CACHE_TTL = 5             -- s a looked-up key is trusted per worker
local STS_BODY_MAX = 8192      -- bytes of body a 401's string_to_sign holds
local USE_EVERY = 60            -- s between writes of a key's last use,
                                -- per key and worker

_M.SCHEME = SCHEME
_M.WINDOW = WINDOW

local REASONS = { "missing_signature", "malformed_signature", "unknown_app",
                  "revoked_key", "stale_timestamp", "bad_signature" }
-- ok: requests accepted; uses_recorded: writes of a key's last use
-- started, uses_failed: of them, those the store refused
local counts = { ok = 0, uses_recorded = 0, uses_failed = 0 }
for _, r in ipairs(REASONS) do
  counts[r] = 0
end

local function is_db(v)
  return getmetatable(v) == sql.DB
end

local function check_db(fname, db)
  if not is_db(db) then
    error(fname .. ": db must be a paygate.sql db", 3)
  end
end

local function check_id(fname, name, v)
  if type(v) ~= "string" or not v:match("^[%w_%-%.]+$") or #v > 64 then
    error(fname .. ": " .. name .. " must be 1..64 of [A-Za-z0-9_.-]", 3)
  end
end

------------------------------------------------------------------ schema

local SCHEMA = [[CREATE TABLE IF NOT EXISTS paygate_api_keys (
  key_id TEXT PRIMARY KEY, app_id TEXT NOT NULL, verifier TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)]]
-- a key's last use, apart from the keys: its writes (an upsert a minute
-- per key and worker) never touch a key's row, and a store made by an
-- older paygate gets it without altering paygate_api_keys
local USES = [[CREATE TABLE IF NOT EXISTS paygate_api_key_uses (
  key_id TEXT PRIMARY KEY, last_used_at DOUBLE PRECISION NOT NULL)]]

local function ensure_schema(db)
  return db:ensure_schema("paygate_apikeys", function(tx)
    local ok, err = tx:exec(SCHEMA)
    if not ok then
      return nil, err
    end
    return tx:exec(USES)
  end)
end

-- The audit trail's subject of an app's keys.
local function subject(app_id)
  return "apikey:" .. app_id
end

-- opts of create and revoke: nil or { actor = string }; returns the actor
local function actor_of(fname, opts)
  if opts == nil then
    return nil
  end
  if type(opts) ~= "table" then
    error(fname .. ": opts must be a table", 3)
  end
  local a = opts.actor
  if a ~= nil and (type(a) ~= "string" or a == "" or #a > 200
                   or a:find("[%c]")) then
    error(fname .. ": opts.actor must be 1..200 characters, no control"
          .. " characters", 3)
  end
  return a
end

----------------------------------------------------------- the signature

-- syntax: key = apikey.signing_key(secret)
-- returns: the 32-byte key requests are signed with (what the server
-- stores, hex-encoded), derived from the secret
function _M.signing_key(secret)
  if type(secret) ~= "string" or secret == "" then
    error("apikey.signing_key: secret must be a non-empty string", 2)
  end
  return crypto.hmac("sha256", secret, KDF_LABEL)
end

-- syntax: s = apikey.message(method, path, timestamp, body[, idem_key])
-- returns: the bytes that are signed: METHOD, PATH (with its query
-- string), TIMESTAMP, the Idempotency-Key header's value (empty when the
-- request has none) and BODY, joined by "\n". The key is signed so that a
-- captured request cannot be sent again under another key, where it
-- would run again (a second refund) instead of replaying the first answer.
function _M.message(method, path, timestamp, body, idem_key)
  return method .. "\n" .. path .. "\n" .. tostring(timestamp) .. "\n"
         .. (idem_key or "") .. "\n" .. (body or "")
end

-- syntax: headers = apikey.sign{ app_id, key_id, secret | signing_key,
--                                method, path, body, timestamp,
--                                idempotency_key }
-- The client side, for merchants' systems and specs: path includes the
-- query string exactly as it is sent; timestamp defaults to now;
-- idempotency_key: the request's Idempotency-Key (signed, and returned
-- as that header).
-- returns: { Authorization = "PAYGATE-HMAC-SHA256 ...",
--            ["Idempotency-Key"] = idempotency_key }
function _M.sign(o)
  if type(o) ~= "table" then
    error("apikey.sign: argument must be a table", 2)
  end
  check_id("apikey.sign", "app_id", o.app_id)
  check_id("apikey.sign", "key_id", o.key_id)
  if type(o.method) ~= "string" or type(o.path) ~= "string" then
    error("apikey.sign: method and path must be strings", 2)
  end
  if o.body ~= nil and type(o.body) ~= "string" then
    error("apikey.sign: body must be a string", 2)
  end
  local key = o.signing_key
  if key == nil then
    if type(o.secret) ~= "string" or o.secret == "" then
      error("apikey.sign: secret (or signing_key) must be a string", 2)
    end
    key = crypto.hmac("sha256", o.secret, KDF_LABEL)
  end
  local ts = o.timestamp or math.floor(core.time())
  if type(ts) ~= "number" or ts % 1 ~= 0 then
    error("apikey.sign: timestamp must be an integer", 2)
  end
  local ik = o.idempotency_key
  -- (HTTP drops a header value's leading and trailing spaces and tabs:
  -- the server would check the signature over a key without them)
  if ik ~= nil and (type(ik) ~= "string" or ik:find("[\r\n]")
                    or ik:find("^[ \t]") or ik:find("[ \t]$")) then
    error("apikey.sign: idempotency_key must be a string without CR or LF"
          .. " and without leading or trailing spaces or tabs", 2)
  end
  local sig = crypto.hex(crypto.hmac("sha256", key,
    _M.message(o.method, o.path, string.format("%d", ts), o.body, ik)))
  return { Authorization = string.format(
    '%s app_id="%s",key_id="%s",timestamp="%d",signature="%s"',
    SCHEME, o.app_id, o.key_id, ts, sig), ["Idempotency-Key"] = ik }
end

-- syntax: fields = apikey.parse(header)
-- returns: { app_id, key_id, timestamp, signature }, or nil, reason
--          (and for malformed_signature, what is wrong with the header,
--          for the 401's message: it names the part, never a value)
local FIELD_ORDER = { "app_id", "key_id", "timestamp", "signature" }
local FIELDS = {}
for _, k in ipairs(FIELD_ORDER) do FIELDS[k] = true end

function _M.parse(header)
  if type(header) ~= "string" or header == "" then
    return nil, "missing_signature"
  end
  if #header > 1024 then
    return nil, "malformed_signature", "it is over 1024 bytes"
  end
  local scheme, rest = header:match("^%s*(%S+)%s+(.-)%s*$")
  -- the scheme is a case-insensitive token (RFC 9110, 11.1)
  if scheme == nil then
    return nil, "malformed_signature", "no fields after the scheme"
  end
  if scheme:upper() ~= SCHEME then
    return nil, "missing_signature"
  end
  local f = {}
  local pos = 1
  while pos <= #rest do
    local k, v, e = rest:match('^%s*([%a_]+)="([^"]*)"%s*()', pos)
    if not k then
      return nil, "malformed_signature", "expected name=\"value\" (the"
        .. " value in double quotes) at byte " .. pos .. " after the scheme"
    end
    if not FIELDS[k] then
      return nil, "malformed_signature", "unknown field " .. k:sub(1, 32)
        .. " (the fields are app_id, key_id, timestamp and signature)"
    end
    if f[k] ~= nil then
      return nil, "malformed_signature", "field " .. k .. " given twice"
    end
    f[k] = v
    pos = e
    if rest:sub(pos, pos) == "," then
      pos = pos + 1
    elseif pos <= #rest then
      return nil, "malformed_signature", "fields must be separated by"
        .. " commas (at byte " .. pos .. " after the scheme)"
    end
  end
  for _, k in ipairs(FIELD_ORDER) do
    if f[k] == nil then
      return nil, "malformed_signature", "field " .. k .. " is missing"
    end
  end
  if not f.timestamp:match("^%d+$") then
    return nil, "malformed_signature", "timestamp must be whole seconds"
      .. " since 1970, digits only (no fraction, sign or date)"
  end
  if #f.timestamp > 12 then
    return nil, "malformed_signature", "timestamp has " .. #f.timestamp
      .. " digits: give whole seconds since 1970 (10 digits), not"
      .. " milliseconds"
  end
  -- a signature is 64 hex digits (any case): anything else is a header
  -- built wrong (a base64 one, a truncated one), not a key that differs
  if #f.signature ~= 64 or not f.signature:match("^%x+$") then
    return nil, "malformed_signature", "signature must be the"
      .. " HMAC-SHA256 as 64 hex digits, not " .. (f.signature:match(
      "^%x*$") and #f.signature .. " of them" or "base64 or other text")
  end
  return f
end

-------------------------------------------------------------- key store

local function new_id(prefix, n)
  return prefix .. crypto.random_nonce(n)
end

-- syntax: k, err = apikey.create(db, app_id[, opts])
-- Makes a new key for app_id. The secret is in the result and nowhere
-- else: show it once to the merchant; the store keeps its derived key.
-- The audit trail gets an entry apikey.created under "apikey:<app_id>"
-- (ref and evidence the key id; actor opts.actor: who made it) in the
-- same transaction.
-- opts: actor (who asks: "cli:alice", "admin:token", ...)
-- returns: { app_id, key_id, secret }, or nil, err
-- yields: one transaction
function _M.create(db, app_id, opts)
  check_db("apikey.create", db)
  check_id("apikey.create", "app_id", app_id)
  local actor = actor_of("apikey.create", opts)
  local ok, err = ensure_schema(db)
  if ok then
    ok, err = audit.ensure_schema(db)
  end
  if not ok then
    return nil, err
  end
  local key_id = new_id("ak_", 20)
  local secret = new_id("sk_", 40)         -- about 238 random bits
  local verifier = crypto.hex(_M.signing_key(secret))
  local res, terr = db:transaction(function(tx)
    local r, ierr = tx:exec("INSERT INTO paygate_api_keys (key_id, app_id,"
      .. " verifier, created_at) VALUES ($1, $2, $3, $4)",
      { key_id, app_id, verifier, core.time() })
    if not r then
      return nil, ierr
    end
    return audit.append(tx, subject(app_id), { what = "apikey.created",
      ref = key_id, actor = actor,
      evidence = { app_id = app_id, key_id = key_id } })
  end)
  if not res then
    return nil, terr
  end
  return { app_id = app_id, key_id = key_id, secret = secret }
end

local cache = setmetatable({}, { __mode = "k" })   -- db -> key_id -> row
-- db -> { n = count, ids = { [key_id] = until } }: key ids the store did
-- not know, remembered for cache_ttl too, so a stream of forged key ids
-- costs no query each; at most MISSES_MAX, then forgotten all at once
local misses = setmetatable({}, { __mode = "k" })
local MISSES_MAX = 4096

-- syntax: ok, why, revoked_at = apikey.revoke(db, key_id[, opts])
-- The audit trail gets an entry apikey.revoked under "apikey:<app_id>"
-- (ref and evidence the key id; actor opts.actor) in the same
-- transaction; a key not active (unknown, revoked already) writes none.
-- One guarded statement revokes (UPDATE ... WHERE revoked_at IS NULL
-- RETURNING): of two revokes at once, one changes the row and writes the
-- entry, the other finds it revoked.
-- opts: actor (who asks)
-- returns: true when a key was revoked (this worker forgets it at once;
-- others within their cache_ttl); false, "revoked", revoked_at (epoch s)
-- when it was revoked already (by another revoke too); false, "unknown"
-- when the store holds no such key; nil, err when the store fails
-- yields: one transaction
function _M.revoke(db, key_id, opts)
  check_db("apikey.revoke", db)
  check_id("apikey.revoke", "key_id", key_id)
  local actor = actor_of("apikey.revoke", opts)
  local ok, err = ensure_schema(db)
  if ok then
    ok, err = audit.ensure_schema(db)
  end
  if not ok then
    return nil, err
  end
  local done, why, at = db:transaction(function(tx)
    local res, uerr = tx:exec("UPDATE paygate_api_keys SET revoked_at = $2"
      .. " WHERE key_id = $1 AND revoked_at IS NULL RETURNING app_id",
      { key_id, core.time() })
    if not res then
      return nil, uerr
    end
    local row = res.rows and res.rows[1]
    if not row then
      -- none active: which answer (a revoke's cold path)
      local rows, qerr = tx:query("SELECT revoked_at FROM paygate_api_keys"
        .. " WHERE key_id = $1", { key_id })
      if not rows then
        return nil, qerr
      end
      if rows[1] then
        return false, "revoked", tonumber(rows[1].revoked_at)
      end
      return false, "unknown"
    end
    local app_id = row.app_id
    local e, aerr = audit.append(tx, subject(app_id), {
      what = "apikey.revoked", ref = key_id, actor = actor,
      evidence = { app_id = app_id, key_id = key_id } })
    if not e then
      return nil, aerr
    end
    return true
  end)
  if done == nil then
    return nil, why
  end
  if cache[db] then
    cache[db][key_id] = nil
  end
  if not done then
    return false, why, at
  end
  return true
end

-- syntax: rows, err = apikey.list(db[, app_id])
-- returns: { { key_id, app_id, created_at, revoked_at, last_used_at },
-- ... } (no verifiers). last_used_at (epoch s): the last request the key
-- signed that was accepted, up to a minute early (written at most once
-- a minute per key and worker); nil when none was since paygate kept it.
function _M.list(db, app_id)
  check_db("apikey.list", db)
  local ok, err = ensure_schema(db)
  if not ok then
    return nil, err
  end
  local q = "SELECT k.key_id, k.app_id, k.created_at, k.revoked_at,"
            .. " u.last_used_at FROM paygate_api_keys k LEFT JOIN"
            .. " paygate_api_key_uses u ON u.key_id = k.key_id"
  local params
  if app_id ~= nil then
    check_id("apikey.list", "app_id", app_id)
    q, params = q .. " WHERE k.app_id = $1", { app_id }
  end
  local rows, qerr = db:query(q .. " ORDER BY k.created_at, k.key_id",
                              params)
  if not rows then
    return nil, qerr
  end
  for _, r in ipairs(rows) do
    -- (a LEFT JOIN's missing side: nil, as revoked_at's NULL is)
    if r.last_used_at == core.null then
      r.last_used_at = nil
    end
  end
  return rows
end

local function lookup(db, key_id, cache_ttl, now)
  local c = cache[db]
  if not c then
    c = {}
    cache[db] = c
  end
  local hit = c[key_id]
  if hit and hit.until_ > now then
    return hit
  end
  local m = misses[db]
  if m and m.ids[key_id] and m.ids[key_id] > now then
    return false
  end
  local ok, err = ensure_schema(db)
  if not ok then
    return nil, err
  end
  -- a revoked key is read too: refused as revoked_key, which tells the
  -- caller to move to the app's current key, not that its ids are wrong
  local rows, qerr = db:query("SELECT app_id, verifier, revoked_at FROM"
    .. " paygate_api_keys WHERE key_id = $1", { key_id })
  if not rows then
    return nil, qerr
  end
  local row = rows[1]
  if not row then
    c[key_id] = nil
    if not m or m.n >= MISSES_MAX then
      m = { n = 0, ids = {} }
      misses[db] = m
    end
    if not m.ids[key_id] then m.n = m.n + 1 end
    m.ids[key_id] = now + cache_ttl
    return false
  end
  local revoked_at = tonumber(row.revoked_at)
  if revoked_at then
    hit = { app_id = row.app_id, revoked_at = revoked_at,
            until_ = now + cache_ttl }
    c[key_id] = hit
    return hit
  end
  local key = crypto.hex_decode(row.verifier)
  if not key then
    return false
  end
  hit = { app_id = row.app_id, key = key, until_ = now + cache_ttl }
  c[key_id] = hit
  return hit
end

------------------------------------------------------------- verifying

-- The "paygate" shared dictionary (every worker sees it), for totals
-- across workers; false when there is none.
local shared_dict
local function shared()
  if shared_dict == nil then
    local ok, d = pcall(function()
      return require("paygate.shared").get_dict("paygate")
    end)
    shared_dict = ok and d or false
  end
  return shared_dict
end

local SHARED_PREFIX = "paygate.apikey.refused."

-- refusals by reason, summed over the workers, on /metrics
local refusals = require("paygate.metrics").counter(
  "paygate_apikey_refusals_total", "Requests refused by the API key "
  .. "check, by reason.", { "reason" }, { max_series = 8 })

local function refuse(reason, message, fields)
  counts[reason] = counts[reason] + 1
  refusals:inc({ reason })
  local d = shared()
  if d then
    d:incr(SHARED_PREFIX .. reason, 1, 0)
  end
  return nil, core.error(reason, message, fields)
end

-- A key's last use, written by its own task (the request does not wait
-- for it) at most once per USE_EVERY s per key in this worker: the time
-- kept is the first accepted request of that minute, so up to USE_EVERY
-- s before the real last use. A write that fails is tried again at the
-- next use after USE_EVERY, and logged at most once per USE_EVERY s in
-- this worker, whatever the keys (a store refusing writes would say so
-- once a minute per key otherwise), on the same clock as the marks;
-- not_logged says how many failures since the last line were not.
local used = setmetatable({}, { __mode = "k" })  -- db -> key_id -> mono
local use_warned, use_not_logged = nil, 0        -- mono, count

local function write_use(db, key_id, at, mono)
  local res, err = db:exec("INSERT INTO paygate_api_key_uses (key_id,"
    .. " last_used_at) VALUES ($1, $2) ON CONFLICT (key_id) DO UPDATE SET"
    .. " last_used_at = excluded.last_used_at WHERE"
    .. " paygate_api_key_uses.last_used_at < excluded.last_used_at",
    { key_id, at })
  if res then
    return
  end
  counts.uses_failed = counts.uses_failed + 1
  if use_warned and mono >= use_warned and mono - use_warned < USE_EVERY then
    use_not_logged = use_not_logged + 1
    return
  end
  use_warned = mono
  local ok, paygate = pcall(require, "paygate")
  if ok and paygate.log then
    paygate.log.warn("apikey: cannot record a key's last use",
                     { key_id = key_id, error = tostring(err),
                       not_logged = use_not_logged > 0 and use_not_logged
                                    or nil })
  end
  use_not_logged = 0
end

local function note_use(db, key_id, at, mono)
  local u = used[db]
  if not u then
    u = {}
    used[db] = u
  end
  local last = u[key_id]
  if last and mono >= last and mono - last < USE_EVERY then
    return
  end
  u[key_id] = mono
  counts.uses_recorded = counts.uses_recorded + 1
  core.spawn(write_use, db, key_id, at, mono)
end

-- syntax: app_id, err = apikey.verify(db, r[, opts])
-- r: { method, path (with query), body, authorization (the header),
--      idempotency_key (the Idempotency-Key header, if any) }
-- opts: window (s, default 300), now (a function giving epoch seconds;
--       default paygate.core.time), cache_ttl (s, default 5), mono (a
--       function giving monotonic seconds, default paygate.core.mono:
--       what cache_ttl is counted on, so a wall-clock step back neither
--       keeps a revoked key cached nor an unknown id refused)
-- returns: the app id, or nil, err with err.kind the 401 reason (or a
--          store kind: unavailable, timeout, ...)
-- yields: one query when the key is not cached (an accepted request's
-- last-use write, once a minute per key, runs in a task of its own)
function _M.verify(db, r, opts)
  check_db("apikey.verify", db)
  if type(r) ~= "table" or type(r.method) ~= "string"
     or type(r.path) ~= "string" then
    error("apikey.verify: r must be a table with method and path", 2)
  end
  opts = opts or {}
  local f, reason, detail = _M.parse(r.authorization)
  if not f then
    return refuse(reason, reason == "missing_signature"
      and "no Authorization header of scheme " .. SCHEME
      or "the Authorization header is not in the documented format ("
         .. SCHEME .. ' app_id="...",key_id="...",timestamp="...",'
         .. 'signature="..."): ' .. detail)
  end
  local now = (opts.now or core.time)()
  local ts = tonumber(f.timestamp)
  local window = opts.window or WINDOW
  if ts < now - window or ts > now + window then
    -- by how much, which way, and the server's clock (no secret: the
    -- Date header says it too), so a caller sees whose clock is off
    return refuse("stale_timestamp", string.format("timestamp %s is %.0f"
      .. " s %s the server's clock (%.0f); it must be within %d s:"
      .. " synchronise the client's clock (NTP) and sign each request as"
      .. " it is sent", f.timestamp, math.floor(math.abs(ts - now) + 0.5),
      ts < now and "behind" or "ahead of", math.floor(now), window),
      { app_id = f.app_id, key_id = f.key_id })
  end
  local mono = (opts.mono or core.mono)()
  local k, err = lookup(db, f.key_id, opts.cache_ttl or CACHE_TTL, mono)
  if k == nil then
    return nil, err
  end
  if not k or k.app_id ~= f.app_id then
    return refuse("unknown_app", "no active key " .. f.key_id:sub(1, 64)
                  .. " for app " .. f.app_id:sub(1, 64),
                  { app_id = f.app_id, key_id = f.key_id })
  end
  if k.revoked_at then
    return refuse("revoked_key", "key " .. f.key_id .. " of app "
                  .. f.app_id .. " was revoked at "
                  .. os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(k.revoked_at))
                  .. ": sign with one of the app's current keys",
                  { app_id = f.app_id, key_id = f.key_id })
  end
  local msg = _M.message(r.method, r.path, f.timestamp, r.body,
                         r.idempotency_key)
  local want = crypto.hex(crypto.hmac("sha256", k.key, msg))
  if not crypto.constant_time_equal(want, f.signature:lower()) then
    -- What was signed over goes back to the caller (as AWS's
    -- StringToSign does), so it can compare with what it signed: a path
    -- without its query, another Idempotency-Key, a body re-serialised.
    -- It holds no secret: never the key, the signature sent or the one
    -- expected. The body by its SHA-256 always (its bytes exactly, a
    -- non-UTF-8 one too); in the string only up to STS_BODY_MAX, so a
    -- forged request's large body is not sent back (several times over,
    -- with JSON's escapes). Not logged: a body is the caller's data.
    local body = r.body or ""
    return refuse("bad_signature", "the signature does not match the"
                  .. " request: compare string_to_sign (and body_sha256)"
                  .. " with what your client signed; if they are the same,"
                  .. " the key is wrong: sign with HMAC-SHA256(secret,"
                  .. " \"" .. KDF_LABEL .. "\") as 32 raw bytes (not its"
                  .. " hex text) of this key_id's secret", {
                    app_id = f.app_id, key_id = f.key_id,
                    string_to_sign = #body <= STS_BODY_MAX and msg or nil,
                    body_sha256 = crypto.hex(crypto.digest("sha256", body)) })
  end
  counts.ok = counts.ok + 1
  note_use(db, f.key_id, now, mono)
  return f.app_id
end

-- syntax: fn = apikey.before_hook(db[, opts])
-- For paygate.before: verifies every request the filter selects and
-- sets req.app_id; a refusal answers 401 { error = reason, message }.
-- opts: as verify, plus prefix (a path prefix to guard, default all) or
--       match = function(req) -> boolean (which requests to guard),
--       on_reject = function(reason, req) (e.g. to feed a metric),
--       log_limit = { lines, window } (the "apikey: request refused"
--       warn lines: the first lines (10) of each reason in each window
--       (60 s) of all workers, then one line saying how many more;
--       paygate.log.limiter) or false (a line for every refusal)
-- returns: a function for paygate.before
function _M.before_hook(db, opts)
  check_db("apikey.before_hook", db)
  if opts ~= nil and type(opts) ~= "table" then
    error("apikey.before_hook: opts must be a table", 2)
  end
  opts = opts or {}
  local prefix, match = opts.prefix, opts.match
  if prefix ~= nil and type(prefix) ~= "string" then
    error("apikey.before_hook: opts.prefix must be a string", 2)
  end
  if match ~= nil and type(match) ~= "function" then
    error("apikey.before_hook: opts.match must be a function", 2)
  end
  local log = require("paygate").log
  -- a 401 is one warn line; anyone can send requests that get one, so
  -- the lines are bounded per reason (paygate.log.limiter; the counters
  -- and the metric count every refusal)
  local ll = opts.log_limit
  if ll ~= nil and ll ~= false then
    if type(ll) ~= "table" then
      error("apikey.before_hook: opts.log_limit must be a table or false", 2)
    end
    local o, why, k = log.limiter_opts(ll)
    if not o then
      error("apikey.before_hook: opts.log_limit." .. k .. " " .. why, 2)
    end
  end
  local refused_log = log.limiter("apikey: request refused", ll)
  return function(req)
    local path = req.path
    if prefix and path:sub(1, #prefix) ~= prefix then
      return nil
    end
    if match and not match(req) then
      return nil
    end
    -- signed over the target as sent (an absolute-form one's path and
    -- query), not the path with its dot-segments resolved
    local target = req.target:gsub("^%a[%w+.-]*://[^/?]*", "")
    local app_id, err
    if req.header_count and (req:header_count("authorization") > 1
                             or req:header_count("idempotency-key") > 1) then
      -- two values where one is signed: which one a proxy in front acts
      -- on is not known, so neither is taken
      app_id, err = refuse("malformed_signature", "the Authorization or"
                           .. " Idempotency-Key header is repeated")
    else
      app_id, err = _M.verify(db, {
        method = req.method, path = target, body = req.body,
        idempotency_key = req:header("idempotency-key"),
        authorization = req:header("authorization") }, opts)
    end
    if app_id then
      req.app_id = app_id
      return nil
    end
    if counts[err.kind] == nil then
      -- the key store failed: not the caller's fault
      log.error("apikey: key lookup failed", { error = tostring(err) })
      return 503, { error = "unavailable", message = "authentication is"
                    .. " unavailable; retry" }
    end
    -- (keyed by the reason alone: app_id, key_id and path are the
    -- caller's to choose)
    refused_log:warn({ reason = err.kind }, { app_id = err.app_id,
                     key_id = err.key_id, path = req.path:sub(1, 200) })
    if opts.on_reject then
      opts.on_reject(err.kind, req)
    end
    return 401, { error = err.kind, message = err.message,
                  string_to_sign = err.string_to_sign,
                  body_sha256 = err.body_sha256 },
           { ["WWW-Authenticate"] = SCHEME }
  end
end

-- syntax: t = apikey.stats([scope])
-- returns: this worker's counters (ok, each refusal reason,
-- uses_recorded: the writes of a key's last use started, and
-- uses_failed: of them, those that failed), a copy;
-- with scope "all", the refusals of every worker since the server
-- started (kept in the "paygate" shared dictionary)
function _M.stats(scope)
  local t = {}
  if scope == "all" then
    local d = shared()
    for _, r in ipairs(REASONS) do
      t[r] = d and tonumber(d:get(SHARED_PREFIX .. r)) or 0
    end
    return t
  end
  for k, v in pairs(counts) do
    t[k] = v
  end
  return t
end

_M.REASONS = REASONS

return _M
