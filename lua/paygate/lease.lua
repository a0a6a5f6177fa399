-- paygate.lease: leases with fencing tokens, on SQL (paygate.sql) and on
-- Redis (paygate.redis).
--
--   local l, err = lease.acquire(store, "settlement", 10)  -- ttl seconds
--   -- l = { key, token, expires_at, owner }; token grows with every
--   -- acquisition of the key, across owners and restarts
--   lease.renew(store, l [, ttl]); lease.release(store, l)
--
-- Fencing: the store remembers the newest token of each key; a write made
-- on behalf of an older token is refused with err.kind "fenced".
--   SQL:   db:transaction(function(tx)
--            assert(lease.check(tx, "settlement", l.token))
--            tx:exec(...)                       -- atomic with the check
--          end)
--   Redis: lease.fenced_call(client, "settlement", l.token, "SET", "k", "v")
--
-- Failures: nil, err with kind "held" (someone else holds it; err.ttl),
-- "lost" (renew/release after it expired or moved on), "fenced", or the
-- store's own kinds (unavailable, timeout, ...).

local sql = require "paygate.sql"

local _M = { _VERSION = "0.1.0" }

local ERR_MT = {
  __tostring = function(e) return e.kind .. ": " .. e.message end,
}

local function fail(kind, message, extra)
  local e = setmetatable({ kind = kind, message = message,
                           retryable = kind == "held" }, ERR_MT)
  for k, v in pairs(extra or {}) do
    e[k] = v
  end
  return nil, e
end

local function is_sql(store)
  return type(store) == "table" and (store.engine == "sqlite"
                                     or store.engine == "postgres")
end

local function random_owner()
  return string.format("%x-%x", math.random(0, 0x7fffffff),
                       math.floor(sql.now() * 1000) % 0x7fffffff)
end

local function check_args(store, key, ttl)
  if type(store) ~= "table" then
    error("lease: store must be a paygate.sql db or a paygate.redis client", 3)
  end
  if type(key) ~= "string" or key == "" then
    error("lease: key must be a non-empty string", 3)
  end
  if ttl ~= nil and (type(ttl) ~= "number" or ttl <= 0) then
    error("lease: ttl must be a positive number of seconds", 3)
  end
end

------------------------------------------------------------------ SQL

local SCHEMA = [[CREATE TABLE IF NOT EXISTS paygate_leases (
  name TEXT PRIMARY KEY, token BIGINT NOT NULL, owner TEXT,
  expires_at DOUBLE PRECISION NOT NULL)]]

local ready = setmetatable({}, { __mode = "k" })

local function ensure_schema(db)
  if ready[db] then
    return true
  end
  local ok, err = db:transaction(function(tx)
    if tx.engine == "postgres" then
      -- CREATE TABLE IF NOT EXISTS races between sessions in PostgreSQL.
      tx:exec("SELECT pg_advisory_xact_lock(7217001)")
    end
    return tx:exec(SCHEMA)
  end)
  if not ok then
    return nil, err
  end
  ready[db] = true
  return true
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
    local row, now = rows[1], sql.now()
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
  local now = sql.now()
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

local function redis_acquire(client, key, ttl, owner)
  local res, err = script(client, "acquire", ACQUIRE)(
    { PREFIX .. key, FENCE .. key }, { owner, ms(ttl) })
  if not res then
    return nil, err
  end
  if res[1] == 0 then
    return fail("held", "lease " .. key .. " is held by another owner",
                { ttl = res[2] / 1000 })
  end
  return { key = key, token = res[2], expires_at = sql.now() + ttl,
           owner = owner, ttl = ttl }
end

local function redis_renew(client, l, ttl)
  local res, err = script(client, "renew", RENEW)(
    { PREFIX .. l.key }, { l.token, ms(ttl) })
  if not res then
    return nil, err
  end
  if res ~= 1 then
    return fail("lost", "lease " .. l.key .. " expired or was taken over")
  end
  l.expires_at = sql.now() + ttl
  return l
end

local function redis_release(client, l)
  local res, err = script(client, "release", RELEASE)(
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
-- returns: { key, token, expires_at, owner } or nil, err ("held", ...)
-- yields: one transaction / one script call
function _M.acquire(store, key, ttl, opts)
  check_args(store, key, ttl)
  local owner = opts and opts.owner or random_owner()
  if is_sql(store) then
    return sql_acquire(store, key, ttl, owner)
  end
  return redis_acquire(store, key, ttl, owner)
end

-- syntax: l, err = lease.renew(store, l, ttl)
-- returns: l with a new expires_at, or nil, err ("lost" once it expired
--          or a newer token was issued)
function _M.renew(store, l, ttl)
  check_args(store, l and l.key, ttl)
  ttl = ttl or l.ttl
  if not ttl then
    error("lease.renew: ttl required", 2)
  end
  if is_sql(store) then
    return sql_renew(store, l, ttl)
  end
  return redis_renew(store, l, ttl)
end

-- syntax: ok, err = lease.release(store, l)
function _M.release(store, l)
  check_args(store, l and l.key)
  if is_sql(store) then
    return sql_release(store, l)
  end
  return redis_release(store, l)
end

-- syntax: ok, err = lease.check(tx, key, token)
-- Inside db:transaction: refuses (kind "fenced") when a newer token was
-- issued for key. PostgreSQL takes a share lock on the lease row, so no
-- acquisition can slip in before the transaction commits.
function _M.check(tx, key, token)
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
-- Runs the Redis command only if token is still the newest for key.
function _M.fenced_call(client, key, token, ...)
  local args = { token, ... }
  local res, err = script(client, "fenced", FENCED)({ FENCE .. key }, args)
  if not res and err and err.code == "FENCED" then
    return fail("fenced", "lease " .. key .. ": " .. err.message)
  end
  return res, err
end

return _M
