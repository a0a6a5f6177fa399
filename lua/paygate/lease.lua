-- paygate.lease: leases with fencing tokens, on SQL (paygate.sql) and on
-- Redis (paygate.redis).
--
--   local l, err = lease.acquire(store, "settlement", 10)  -- ttl seconds
--   -- l = { key, token, expires_at, owner, ttl }; token grows with every
--   -- acquisition of the key, across owners and restarts
--   lease.renew(store, l [, ttl]); lease.release(store, l)
--
-- Owners: without opts.owner each acquisition gets a fresh owner id from
-- the CSPRNG, so two acquirers never share one (an owner that acquires
-- again while it holds the lease is the same holder and gets a new token;
-- only a caller that passes the same opts.owner can do that).
--
-- Fencing: the store remembers the newest token of each key; a write made
-- on behalf of an older token is refused with err.kind "fenced".
--   SQL:   db:transaction(function(tx)
--            assert(lease.check(tx, "settlement", l.token))
--            tx:exec(...)                       -- atomic with the check
--          end)
--   Redis: lease.fenced_call(client, "settlement", l.token, "SET", "k", "v")
--
-- Failures: nil, err (core.error) with kind "held" (someone else holds
-- it; err.ttl, retryable), "lost" (renew/release after it expired or moved
-- on), "fenced" (err.current), or the store's own kinds (unavailable,
-- timeout, ...). Misuse (wrong argument types) raises.

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local sql = require "paygate.sql"
local redis = require "paygate.redis"

local _M = { _VERSION = "0.1.0" }

local OWNER_LEN = 24            -- alphanumerics: about 143 random bits

local function fail(kind, message, fields)
  fields = fields or {}
  fields.retryable = kind == "held"
  return nil, core.error(kind, message, fields)
end

local function is_sql(store)
  return getmetatable(store) == sql.DB
end

local function is_redis(store)
  return getmetatable(store) == redis.Client
end

local function random_owner()
  return crypto.random_nonce(OWNER_LEN)
end

-- Raises at the caller of the public function `fname`.
local function check_store(fname, store)
  if not is_sql(store) and not is_redis(store) then
    error(fname .. ": store must be a paygate.sql db or a paygate.redis"
          .. " client", 3)
  end
end

local function check_key(fname, key)
  if type(key) ~= "string" or key == "" then
    error(fname .. ": key must be a non-empty string", 3)
  end
end

local function check_ttl(fname, ttl)
  if type(ttl) ~= "number" or not (ttl > 0) or ttl == math.huge then
    error(fname .. ": ttl must be a positive number of seconds", 3)
  end
end

local function check_lease(fname, l)
  if type(l) ~= "table" or type(l.key) ~= "string"
     or (type(l.token) ~= "number" and type(l.token) ~= "string") then
    error(fname .. ": l must be a lease returned by lease.acquire", 3)
  end
end

local function check_token(fname, token)
  if type(token) ~= "number" and type(token) ~= "string" then
    error(fname .. ": token must be a number", 3)
  end
end

------------------------------------------------------------------ SQL

local SCHEMA = [[CREATE TABLE IF NOT EXISTS paygate_leases (
  name TEXT PRIMARY KEY, token BIGINT NOT NULL, owner TEXT,
  expires_at DOUBLE PRECISION NOT NULL)]]

local function ensure_schema(db)
  return db:ensure_schema("paygate_leases", function(tx)
    return tx:exec(SCHEMA)
  end)
end

local function sql_acquire(db, key, ttl, owner)
  local ok, err = ensure_schema(db)
  if not ok then
    return nil, err
  end
  local lock = db.engine == "postgres" and " FOR UPDATE" or ""
  return db:transaction(function(tx)
    local _, e = tx:exec("INSERT INTO paygate_leases (name, token, owner,"
      .. " expires_at) VALUES ($1, 0, NULL, 0) ON CONFLICT (name) DO NOTHING",
      { key })
    if e then
      return nil, e
    end
    local rows, qerr = tx:query("SELECT token, owner, expires_at FROM"
      .. " paygate_leases WHERE name = $1" .. lock, { key })
    if not rows then
      return nil, qerr
    end
    local row, now = rows[1], core.now()
    if row.expires_at > now and row.owner ~= owner then
      return fail("held", "lease " .. key .. " is held by another owner",
                  { ttl = row.expires_at - now })
    end
    local token = row.token + 1
    local expires_at = now + ttl
    local _, uerr = tx:exec("UPDATE paygate_leases SET token = $2,"
      .. " owner = $3, expires_at = $4 WHERE name = $1",
      { key, token, owner, expires_at })
    if uerr then
      return nil, uerr
    end
    return { key = key, token = token, expires_at = expires_at,
             owner = owner, ttl = ttl }
  end)
end

local function sql_renew(db, l, ttl)
  local now = core.now()
  local res, err = db:exec("UPDATE paygate_leases SET expires_at = $3"
    .. " WHERE name = $1 AND token = $2 AND expires_at > $4",
    { l.key, l.token, now + ttl, now })
  if not res then
    return nil, err
  end
  if res.changes ~= 1 then
    return fail("lost", "lease " .. l.key .. " expired or was taken over")
  end
  l.expires_at = now + ttl
  return l
end

local function sql_release(db, l)
  local res, err = db:exec("UPDATE paygate_leases SET expires_at = 0,"
    .. " owner = NULL WHERE name = $1 AND token = $2", { l.key, l.token })
  if not res then
    return nil, err
  end
  if res.changes ~= 1 then
    return fail("lost", "lease " .. l.key .. " was already taken over")
  end
  return true
end

---------------------------------------------------------------- Redis

local PREFIX = "paygate:lease:"
local FENCE = "paygate:fence:"

local ACQUIRE = [[
local cur = redis.call('GET', KEYS[1])
if cur then
  local owner = string.match(cur, '^[^|]*|(.*)$')
  if owner ~= ARGV[1] then
    return {0, redis.call('PTTL', KEYS[1])}
  end
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. '|' .. ARGV[1], 'PX', ARGV[2])
return {1, token}
]]

local RENEW = [[
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^([^|]*)|') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
]]

local RELEASE = [[
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^([^|]*)|') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
]]

local FENCED = [[
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur ~= tonumber(ARGV[1]) then
  return redis.error_reply('FENCED token ' .. ARGV[1] .. ' is older than '
                           .. cur)
end
return redis.call(unpack(ARGV, 2))
]]

local scripts = setmetatable({}, { __mode = "k" })

local function script(client, name, src)
  local s = scripts[client]
  if not s then
    s = {}
    scripts[client] = s
  end
  if not s[name] then
    s[name] = client:script(src)
  end
  return s[name]
end

local function ms(ttl)
  return math.max(1, math.floor(ttl * 1000 + 0.5))
end


-- Redis replication is asynchronous: a lease granted by a master that
-- dies before a replica has the write is forgotten by the replica that
-- takes over, which would then grant it again with the same or a lower
-- fencing token. So, on a client with lease_replicas > 0 (the default
-- under Sentinel), the script and a WAIT run back to back on one
-- connection, and the result counts only once that many replicas have
-- it. Returns the script's reply, or nil, err ("unavailable" when the
-- replicas did not confirm in time).
local function redis_run(client, name, src, keys, args)
  local n = client.lease_replicas or 0
  local sc = script(client, name, src)
  if n == 0 then
    if client.sentinel and not client.lease_unsafe then
      error("lease: a Sentinel-managed Redis client needs lease_replicas"
            .. " >= 1 (or lease_unsafe = true to accept that a failover"
            .. " can grant a lease twice)", 4)
    end
    return sc(keys, args)
  end
  local cmd = { "EVALSHA", sc.sha, #keys }
  for i = 1, #keys do
    cmd[#cmd + 1] = keys[i]
  end
  for i = 1, #args do
    cmd[#cmd + 1] = args[i]
  end
  local wait = { "WAIT", n, ms(client.lease_wait or 1) }
  local res, err = client:pipeline({ cmd, wait })
  if res and redis.is_error(res[1]) and res[1].kind == "noscript" then
    cmd[1], cmd[2] = "EVAL", src
    res, err = client:pipeline({ cmd, wait })
  end
  if not res then
    return nil, err
  end
  if redis.is_error(res[1]) then
    return nil, res[1]
  end
  if redis.is_error(res[2]) then
    return nil, res[2]
  end
  if type(res[2]) ~= "number" or res[2] < n then
    return nil, core.error("unavailable", string.format("lease: %s reached"
      .. " %s of %d replicas within %g s: not granted", name,
      tostring(res[2]), n, client.lease_wait or 1),
      { retryable = true, reply = res[1] })
  end
  return res[1]
end

local function redis_acquire(client, key, ttl, owner)
  local res, err = redis_run(client, "acquire", ACQUIRE,
    { PREFIX .. key, FENCE .. key }, { owner, ms(ttl) })
  if not res then
    local r = err and err.reply
    if type(r) == "table" and r[1] == 1 then
      -- granted on the master but not replicated: give it back (best
      -- effort; it expires after ttl anyway)
      redis_run(client, "release", RELEASE, { PREFIX .. key }, { r[2] })
    end
    return nil, err
  end
  if res[1] == 0 then
    return fail("held", "lease " .. key .. " is held by another owner",
                { ttl = res[2] / 1000 })
  end
  return { key = key, token = res[2], expires_at = core.now() + ttl,
           owner = owner, ttl = ttl }
end

local function redis_renew(client, l, ttl)
  local res, err = redis_run(client, "renew", RENEW,
    { PREFIX .. l.key }, { l.token, ms(ttl) })
  if not res then
    return nil, err
  end
  if res ~= 1 then
    return fail("lost", "lease " .. l.key .. " expired or was taken over")
  end
  l.expires_at = core.now() + ttl
  return l
end

local function redis_release(client, l)
  local res, err = redis_run(client, "release", RELEASE,
    { PREFIX .. l.key }, { l.token })
  if not res then
    return nil, err
  end
  if res ~= 1 then
    return fail("lost", "lease " .. l.key .. " was already taken over")
  end
  return true
end

----------------------------------------------------------------- API

-- syntax: l, err = lease.acquire(store, key, ttl [, { owner = id }])
-- returns: { key, token, expires_at, owner, ttl } or nil, err ("held",
--          with err.ttl = seconds left, ...)
-- yields: one transaction / one script call
function _M.acquire(store, key, ttl, opts)
  check_store("lease.acquire", store)
  check_key("lease.acquire", key)
  check_ttl("lease.acquire", ttl)
  if opts ~= nil and type(opts) ~= "table" then
    error("lease.acquire: opts must be a table", 2)
  end
  local owner = opts and opts.owner
  if owner == nil then
    owner = random_owner()
  elseif type(owner) ~= "string" or owner == "" or owner:find("|", 1, true)
  then
    error("lease.acquire: opts.owner must be a non-empty string without"
          .. " '|'", 2)
  end
  if is_sql(store) then
    return sql_acquire(store, key, ttl, owner)
  end
  return redis_acquire(store, key, ttl, owner)
end

-- syntax: l, err = lease.renew(store, l [, ttl])
-- returns: l with a new expires_at (ttl defaults to l.ttl), or nil, err
--          ("lost" once it expired or a newer token was issued)
-- yields: one statement / one script call
function _M.renew(store, l, ttl)
  check_store("lease.renew", store)
  check_lease("lease.renew", l)
  if ttl == nil then
    ttl = l.ttl
  end
  check_ttl("lease.renew", ttl)
  if is_sql(store) then
    return sql_renew(store, l, ttl)
  end
  return redis_renew(store, l, ttl)
end

-- syntax: ok, err = lease.release(store, l)
-- returns: true, or nil, err ("lost": taken over; on Redis also when it
--          had already expired)
-- yields: one statement / one script call
function _M.release(store, l)
  check_store("lease.release", store)
  check_lease("lease.release", l)
  if is_sql(store) then
    return sql_release(store, l)
  end
  return redis_release(store, l)
end

-- syntax: ok, err = lease.check(tx, key, token)
-- Inside db:transaction: refuses (kind "fenced", err.current = the newest
-- token) when a newer token was issued for key. PostgreSQL takes a share
-- lock on the lease row, so no acquisition can slip in before the
-- transaction commits.
-- yields: one query
function _M.check(tx, key, token)
  if getmetatable(tx) ~= sql.TX then
    error("lease.check: tx must be the tx of a db:transaction", 2)
  end
  check_key("lease.check", key)
  check_token("lease.check", token)
  local lock = tx.engine == "postgres" and " FOR SHARE" or ""
  local rows, err = tx:query("SELECT token FROM paygate_leases WHERE"
    .. " name = $1" .. lock, { key })
  if not rows then
    return nil, err
  end
  local cur = rows[1] and rows[1].token or 0
  if cur ~= token then
    return fail("fenced", string.format("lease %s: token %s is older than"
                .. " %s", key, tostring(token), tostring(cur)),
                { current = cur })
  end
  return true
end

-- syntax: reply, err = lease.fenced_call(client, key, token, cmd, ...)
-- Runs the Redis command only if token is still the newest for key
-- (the check and the command run in one script); else nil, err "fenced".
-- yields: one script call
function _M.fenced_call(client, key, token, cmd, ...)
  if not is_redis(client) then
    error("lease.fenced_call: client must be a paygate.redis client", 2)
  end
  check_key("lease.fenced_call", key)
  check_token("lease.fenced_call", token)
  if type(cmd) ~= "string" then
    error("lease.fenced_call: cmd must be a string", 2)
  end
  local args = { token, cmd, ... }
  for i = 3, select("#", ...) + 2 do
    local t = type(args[i])
    if t ~= "string" and t ~= "number" and t ~= "boolean" then
      error(string.format("lease.fenced_call: argument %d must be a string,"
                          .. " number or boolean (got %s)", i - 2, t), 2)
    end
  end
  local res, err = script(client, "fenced", FENCED)({ FENCE .. key }, args)
  if not res and err and err.code == "FENCED" then
    return fail("fenced", "lease " .. key .. ": " .. err.message)
  end
  return res, err
end

return _M
