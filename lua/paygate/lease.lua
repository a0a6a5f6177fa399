-- paygate.lease: leases with fencing tokens, on SQL (paygate.sql) and on
-- Redis (paygate.redis).
--
--   local l, err = lease.acquire(store, "settlement", 10)  -- ttl seconds
--   -- l = { key, token, expires_at, deadline, owner, ttl }; token grows
--   -- with every acquisition of the key, across owners and restarts
--   -- expires_at: the wall-clock expiry the store judges by; deadline:
--   -- the same on core.mono(), for the holder's own "how much is left"
--   -- (lease.remaining), which a wall-clock step must not stretch
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
-- Measured ttls: lease.run(store, key, fn, { adaptive = "charge" })
-- acquires with ttl = clamp(p99.9 x margin, floor, ceiling) of the
-- durations recorded under "charge" (a histogram in the "paygate" shared
-- dictionary, so the workers of an instance share it), renews while fn
-- runs, records fn's duration, releases; fn(h) fences its commit with
-- h:check(tx) (SQL) or h:call(cmd, ...) (Redis).
--
-- Failures: nil, err (core.error) with kind "held" (someone else holds
-- it; err.ttl, retryable), "lost" (renew/release after it expired or moved
-- on, or a release of one released already), "fenced" (err.current), or
-- the store's own kinds (unavailable, timeout, unknown_outcome on Redis:
-- a grant may exist under the owner, see release_owner, ...). Misuse
-- (wrong argument types) raises.
--
-- Tokens: a non-negative integer, as a number or a string of its decimal
-- digits ("42" is token 42: see canon_token).

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
  -- see redis_run: without a replica's acknowledgement a failover can
  -- grant a lease twice
  if is_redis(store) and store.sentinel and not store.lease_unsafe
     and (store.lease_replicas or 0) == 0 then
    error(fname .. ": a Sentinel-managed Redis client needs"
          .. " lease_replicas >= 1 (or lease_unsafe = true to accept that a"
          .. " failover can grant a lease twice)", 3)
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

-- A token is a non-negative integer. It may come as a number or as a
-- string of its decimal digits: a token kept in a text column or an HTTP
-- header comes back a string, and paygate.sql gives an integer beyond
-- 2^53 as its exact digits (docs/storage.md). So every token is brought
-- to one form before it is compared or sent: a number when it is exact in
-- a double (at most 2^53), else the digits as a string. "42" and 42 are
-- then the same token -- compared with ~= as they came, the string was
-- "fenced" forever. Returns nil for anything else (a sign, a fraction,
-- leading zeros, spaces, an exponent: not how a store writes a token).
local MAX_EXACT = 2 ^ 53
local MAX_EXACT_DIGITS = string.format("%.0f", MAX_EXACT)

local function canon_token(t)
  if type(t) == "number" then
    if t ~= t or t < 0 or t == math.huge or t ~= math.floor(t) then
      return nil
    end
    if t <= MAX_EXACT then
      return t
    end
    return string.format("%.0f", t)
  end
  if type(t) ~= "string" or not (t == "0" or t:find("^[1-9]%d*$")) then
    return nil
  end
  -- compare digit strings, not tonumber's result: tonumber rounds above
  -- 2^53 ("9007199254740993" would pass as 2^53)
  if #t < #MAX_EXACT_DIGITS
     or (#t == #MAX_EXACT_DIGITS and t <= MAX_EXACT_DIGITS) then
    return tonumber(t)
  end
  return t
end

local TOKEN_MSG = "must be a non-negative integer (a number, or a string of"
  .. " its decimal digits)"

local function check_lease(fname, l)
  if type(l) ~= "table" or type(l.key) ~= "string"
     or (type(l.token) ~= "number" and type(l.token) ~= "string")
     or type(l.owner) ~= "string" then
    error(fname .. ": l must be a lease returned by lease.acquire", 3)
  end
  local token = canon_token(l.token)
  if token == nil then
    error(fname .. ": l.token " .. TOKEN_MSG, 3)
  end
  return token
end

-- Raises at the caller of the public function; returns the token in its
-- one form (canon_token).
local function check_token(fname, token)
  local t = canon_token(token)
  if t == nil then
    error(fname .. ": token " .. TOKEN_MSG, 3)
  end
  return t
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
  local sent = core.mono()
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
             deadline = sent + ttl, owner = owner, ttl = ttl }
  end)
end

-- renew and release match the owner as well as the token (as the Redis
-- scripts do): a store that lost the grant -- a PostgreSQL failover to a
-- standby that had not received it, a backup restored, the row deleted
-- by hand -- starts the key's tokens again, and another owner can then
-- hold the token an old holder still has.
local function sql_renew(db, l, token, ttl)
  local now, sent = core.now(), core.mono()
  local res, err = db:exec("UPDATE paygate_leases SET expires_at = $3"
    .. " WHERE name = $1 AND token = $2 AND expires_at > $4 AND owner = $5",
    { l.key, token, now + ttl, now, l.owner })
  if not res then
    return nil, err
  end
  if res.changes ~= 1 then
    return fail("lost", "lease " .. l.key .. " expired or was taken over")
  end
  l.expires_at, l.deadline = now + ttl, sent + ttl
  return l
end

local function sql_release(db, l, token)
  local res, err = db:exec("UPDATE paygate_leases SET expires_at = 0,"
    .. " owner = NULL WHERE name = $1 AND token = $2 AND owner = $3",
    { l.key, token, l.owner })
  if not res then
    return nil, err
  end
  if res.changes ~= 1 then
    return fail("lost", "lease " .. l.key .. " was already taken over")
  end
  return true
end

-- Releases what owner holds among keys, IN lists of at most 100, in one
-- transaction. On PostgreSQL an acquisition committing on another
-- connection must be waited for: an UPDATE waits for a row's writer and
-- checks the committed row again, but a row still being inserted (a key's
-- first acquisition) is invisible to it. So the keys are inserted first
-- (ON CONFLICT DO NOTHING waits for an insert of the same key in flight):
-- per key, never the whole table.
local function sql_release_owner(db, owner, keys)
  local ok, err = ensure_schema(db)
  if not ok then
    return nil, err
  end
  return db:transaction(function(tx)
    local n = 0
    for first = 1, #keys, 100 do
      local names, marks, rows = {}, {}, {}
      for i = first, math.min(#keys, first + 99) do
        names[#names + 1] = keys[i]
        marks[#names] = "$" .. #names
        rows[#names] = "($" .. #names .. ", 0, NULL, 0)"
      end
      if db.engine == "postgres" then
        local _, e = tx:exec("INSERT INTO paygate_leases (name, token,"
          .. " owner, expires_at) VALUES " .. table.concat(rows, ", ")
          .. " ON CONFLICT (name) DO NOTHING", names)
        if e then
          return nil, e
        end
      end
      local n_names = #names
      names[n_names + 1] = owner            -- the UPDATE's last parameter
      local res, e = tx:exec("UPDATE paygate_leases SET expires_at = 0,"
        .. " owner = NULL WHERE name IN (" .. table.concat(marks, ", ")
        .. ") AND owner = $" .. (n_names + 1), names)
      if not res then
        return nil, e
      end
      n = n + res.changes
    end
    return n
  end)
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
local floor = tonumber(ARGV[3]) or 0
local was = 0
if token <= floor then
  was = token
  token = floor + 1
  redis.call('SET', KEYS[2], token)
end
redis.call('SET', KEYS[1], token .. '|' .. ARGV[1], 'PX', ARGV[2])
return {1, token, was}
]]

-- renew and release match the whole value, token and owner: a Redis that
-- lost writes restarts its counter, and another owner can then hold the
-- same token (the fencing floor only keeps one client's grants rising)
local RENEW = [[
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[1] .. '|' .. ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
]]

local RELEASE = [[
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[1] .. '|' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
]]

local RELEASE_OWNER = [[
local n = 0
for i = 1, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if cur and string.match(cur, '^[^|]*|(.*)$') == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
]]

local FENCED = [[
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur ~= tonumber(ARGV[1]) then
  return redis.error_reply('FENCED token ' .. ARGV[1] .. ' is older than '
                           .. cur)
end
return redis.call(unpack(ARGV, 2))
]]

-- The scripts are kept on the client itself: a weak-keyed table whose
-- values (the scripts) hold the client would keep every client alive
-- (LuaJIT has no ephemerons), and with it its pool and connections.
local function script(client, name, src)
  local s = rawget(client, "_lease_scripts")
  if not s then
    s = {}
    rawset(client, "_lease_scripts", s)
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
    return sc(keys, args)       -- under Sentinel, only if lease_unsafe
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

-- The highest token each client was granted, per key: the floor of the
-- next grant. A Redis that lost acknowledged writes (a second failover
-- to a replica that had not caught up, a master restarted from an old
-- snapshot and promoted) has a counter below tokens already handed out;
-- the script then continues above the floor, so the tokens this client
-- sees never go backwards, and says so (logged once per fall back).
local floors = setmetatable({}, { __mode = "k" })

local function redis_acquire(client, key, ttl, owner)
  local fl = floors[client]
  if not fl then
    fl = {}
    floors[client] = fl
  end
  local floor = fl[key] or 0
  -- PX counts from when the script ran, not from its reply (which a WAIT
  -- for the replicas may delay): the expiry is judged from before sending
  local sent, mono = core.time(), core.mono()
  local res, err = redis_run(client, "acquire", ACQUIRE,
    { PREFIX .. key, FENCE .. key }, { owner, ms(ttl), floor })
  if not res then
    local r = err and err.reply
    if type(r) == "table" and r[1] == 1 then
      -- granted on the master but not replicated: give it back (best
      -- effort; it expires after ttl anyway)
      redis_run(client, "release", RELEASE, { PREFIX .. key },
                { r[2], owner })
    end
    return nil, err
  end
  if res[1] == 0 then
    return fail("held", "lease " .. key .. " is held by another owner",
                { ttl = res[2] / 1000 })
  end
  local token = res[2]
  if type(token) == "number" and token > floor then fl[key] = token end
  if type(res[3]) == "number" and res[3] > 0 then
    require("paygate").log.warn("lease: the Redis fencing counter of "
      .. key .. " had fallen back below a token already granted (the"
      .. " server lost writes: a failover to a replica that had not caught"
      .. " up?); continued above it", { key = key, counter = res[3],
                                        granted = token })
  end
  return { key = key, token = token, expires_at = sent + ttl,
           deadline = mono + ttl, owner = owner, ttl = ttl }
end

local function redis_renew(client, l, token, ttl)
  local sent, mono = core.time(), core.mono()
  local res, err = redis_run(client, "renew", RENEW,
    { PREFIX .. l.key }, { token, ms(ttl), l.owner })
  if not res then
    return nil, err
  end
  if res ~= 1 then
    return fail("lost", "lease " .. l.key .. " expired or was taken over")
  end
  l.expires_at, l.deadline = sent + ttl, mono + ttl
  return l
end

local function redis_release(client, l, token)
  local res, err = redis_run(client, "release", RELEASE,
    { PREFIX .. l.key }, { token, l.owner })
  if not res then
    return nil, err
  end
  if res ~= 1 then
    return fail("lost", "lease " .. l.key .. " was already taken over")
  end
  return true
end

local function redis_release_owner(client, owner, keys)
  local n = 0
  for first = 1, #keys, 100 do
    local ks = {}
    for i = first, math.min(#keys, first + 99) do
      ks[#ks + 1] = PREFIX .. keys[i]
    end
    local res, err = redis_run(client, "release_owner", RELEASE_OWNER, ks,
                               { owner })
    if not res then
      return nil, err
    end
    n = n + res
  end
  return n
end

------------------------------------------------- measured durations

-- A histogram of durations per series name, in the "paygate" shared
-- dictionary (so every worker of an instance adds to, and reads, one
-- histogram), or in this process's memory when there is none. Buckets
-- are log-spaced, BUCKETS_PER_DOUBLING per doubling (about 9 % wide),
-- from 1 ms (bucket 0 holds everything up to 1 ms) to 2^(255/8) ms
-- (about 46 days). A quantile is read as the upper bound of the bucket
-- it falls into, so it is never below the true value by more than a
-- bucket's width and never below the largest sample it covers.
--
-- Time windows: samples go into generation floor(now / window); a read
-- covers the current and the previous generation, so a histogram holds
-- between one and two windows of history and follows a change of the
-- workload within two windows. Shared entries expire on their own.

local BUCKETS_PER_DOUBLING = 8
local NBUCKETS = 256
local WINDOW = 3600               -- s per generation (default)
local CACHE_FOR = 1               -- s a worker reuses a computed ttl
local SHARED_PREFIX = "paygate.lease.d|"

local DEFAULT_FLOOR = 1           -- s
local DEFAULT_CEILING = 300       -- s
local DEFAULT_MARGIN = 1.5
local DEFAULT_QUANTILE = 0.999
local DEFAULT_MIN_SAMPLES = 20

_M.DEFAULTS = { floor = DEFAULT_FLOOR, ceiling = DEFAULT_CEILING,
                margin = DEFAULT_MARGIN, quantile = DEFAULT_QUANTILE,
                min_samples = DEFAULT_MIN_SAMPLES, window = WINDOW }

local log2 = math.log(2)

local function bucket_of(seconds)
  local ms = seconds * 1000
  if not (ms > 1) then
    return 0
  end
  local i = math.ceil(math.log(ms) / log2 * BUCKETS_PER_DOUBLING - 1e-9)
  if i >= NBUCKETS then
    return NBUCKETS - 1
  end
  return i
end

local function bucket_upper(i)
  return 2 ^ (i / BUCKETS_PER_DOUBLING) / 1000
end

local shared_dict
local function paygate_dict()
  return require("paygate.shared").get_dict("paygate")
end
-- (a function of the module, not a closure made per call: a closure
-- stops the JIT compiling the caller)
local function dict()
  if shared_dict == nil then
    local ok, d = pcall(paygate_dict)
    shared_dict = ok and d or false
  end
  return shared_dict
end

-- This worker's own samples, beside the shared dictionary's sums of all
-- workers': key -> count. A full dictionary evicts its least recently
-- used entries -- first the rarely touched slow buckets, which would
-- shorten the p99.9 and with it the ttl -- so a bucket never reads less
-- than this worker's own count of it (nor does it without a dictionary).
-- Generations past the window are dropped (own_gens: name -> { gen }).
local own, own_gens = {}, {}
local cached = {}                 -- name -> { at, ttl, info, opts key }

local function check_name(fname, name)
  if type(name) ~= "string" or name == "" or #name > 200
     or name:find("|", 1, true) then
    error(fname .. ": name must be a non-empty string without '|' (at"
          .. " most 200 bytes)", 3)
  end
end

local function hist_key(name, gen, i)
  return SHARED_PREFIX .. name .. "|" .. gen .. "|" .. i
end

local function hist_incr(key, ttl)
  own[key] = (own[key] or 0) + 1
  local d = dict()
  if d then
    d:incr(key, 1, 0, ttl)        -- a failure loses a sample of the sum
  end
end

local function hist_get(key)
  local d = dict()
  local v = tonumber(d and d:get(key)) or 0
  local mine = own[key] or 0
  return v > mine and v or mine
end

-- Drops this worker's counts of name's generations older than gen - 1
-- (the histogram reads gen and gen - 1).
local function own_prune(name, gen)
  local gens = own_gens[name]
  if not gens then
    gens = {}
    own_gens[name] = gens
  end
  if gens[gen] then return end
  gens[gen] = true
  for g in pairs(gens) do
    if g < gen - 1 then
      gens[g] = nil
      own[hist_key(name, g, "n")] = nil
      for i = 0, NBUCKETS - 1 do
        own[hist_key(name, g, i)] = nil
      end
    end
  end
end

local function check_window(fname, window)
  if window == nil then
    return WINDOW
  end
  if type(window) ~= "number" or not (window > 0) or window == math.huge
  then
    error(fname .. ": opts.window must be a positive number of seconds", 3)
  end
  return window
end

-- syntax: lease.measure(name, seconds[, { window }])
-- Records one duration of the work named `name` (what lease.run does
-- after each run with opts.adaptive = name). Never yields.
function _M.measure(name, seconds, opts)
  check_name("lease.measure", name)
  if type(seconds) ~= "number" or not (seconds >= 0)
     or seconds == math.huge then
    error("lease.measure: seconds must be a number >= 0", 2)
  end
  local window = check_window("lease.measure", opts and opts.window)
  local gen = math.floor(core.time() / window)
  local ttl = 2 * window + 60
  own_prune(name, gen)
  hist_incr(hist_key(name, gen, bucket_of(seconds)), ttl)
  hist_incr(hist_key(name, gen, "n"), ttl)
  cached[name] = nil
end

-- The two generations' bucket counts summed: counts[0..NBUCKETS-1], n.
local function histogram(name, window)
  local gen = math.floor(core.time() / window)
  local n = hist_get(hist_key(name, gen, "n"))
            + hist_get(hist_key(name, gen - 1, "n"))
  local counts = {}
  if n == 0 then
    return counts, 0
  end
  local total = 0
  for i = 0, NBUCKETS - 1 do
    local c = hist_get(hist_key(name, gen, i))
              + hist_get(hist_key(name, gen - 1, i))
    counts[i] = c
    total = total + c
  end
  return counts, total
end

local function quantile(counts, total, q)
  if total == 0 then
    return nil
  end
  local rank = math.max(1, math.ceil(q * total - 1e-9))
  local cum = 0
  for i = 0, NBUCKETS - 1 do
    cum = cum + (counts[i] or 0)
    if cum >= rank then
      return bucket_upper(i)
    end
  end
  return bucket_upper(NBUCKETS - 1)
end

-- syntax: d = lease.durations(name[, { window }])
-- returns: { samples, p50, p99, p999, max } of the recorded durations (s,
-- each the upper bound of its histogram bucket; nil without samples)
function _M.durations(name, opts)
  check_name("lease.durations", name)
  local window = check_window("lease.durations", opts and opts.window)
  local counts, total = histogram(name, window)
  local max
  for i = NBUCKETS - 1, 0, -1 do
    if (counts[i] or 0) > 0 then
      max = bucket_upper(i)
      break
    end
  end
  return { samples = total, p50 = quantile(counts, total, 0.5),
           p99 = quantile(counts, total, 0.99),
           p999 = quantile(counts, total, 0.999), max = max }
end

local function positive(fname, opts, k, default)
  local v = opts[k]
  if v == nil then
    return default
  end
  if type(v) ~= "number" or not (v > 0) or v == math.huge then
    error(fname .. ": opts." .. k .. " must be a positive number", 3)
  end
  return v
end

local ADAPTIVE_KEYS = { floor = true, ceiling = true, margin = true,
                        quantile = true, min_samples = true, initial = true,
                        window = true }
local RUN_KEYS = { adaptive = true, ttl = true, renew = true, owner = true }

-- The adaptive options, checked, with their defaults. lease.run's own
-- options pass (one table may serve lease.run and lease.ttl_for).
local function adaptive_opts(fname, opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error(fname .. ": opts must be a table", 3)
  end
  for k in pairs(opts) do
    if not ADAPTIVE_KEYS[k] and not RUN_KEYS[k] then
      error(fname .. ": unknown option opts." .. tostring(k), 3)
    end
  end
  local o = {
    floor = positive(fname, opts, "floor", DEFAULT_FLOOR),
    ceiling = positive(fname, opts, "ceiling", DEFAULT_CEILING),
    margin = positive(fname, opts, "margin", DEFAULT_MARGIN),
    quantile = positive(fname, opts, "quantile", DEFAULT_QUANTILE),
    min_samples = positive(fname, opts, "min_samples", DEFAULT_MIN_SAMPLES),
    window = check_window(fname, opts.window),
  }
  if o.floor > o.ceiling then
    error(fname .. ": opts.floor must not exceed opts.ceiling", 3)
  end
  if o.quantile > 1 then
    error(fname .. ": opts.quantile must be in (0, 1]", 3)
  end
  if o.margin < 1 then
    error(fname .. ": opts.margin must be at least 1", 3)
  end
  o.initial = positive(fname, opts, "initial", o.ceiling)
  return o
end

local function compute_ttl(name, o)
  local counts, total = histogram(name, o.window)
  local info = { samples = total }
  if total < o.min_samples then
    info.source = "initial"
    return math.min(math.max(o.initial, o.floor), o.ceiling), info
  end
  local q = quantile(counts, total, o.quantile)
  info.source, info.quantile = "measured", q
  return math.min(math.max(q * o.margin, o.floor), o.ceiling), info
end

-- ttl_for with its options checked (adaptive_opts' table, kept as the
-- cache entry)
local function ttl_of(name, o)
  local c = cached[name]
  local now = core.mono()
  if c and now - c.at < CACHE_FOR and c.floor == o.floor
     and c.ceiling == o.ceiling and c.margin == o.margin
     and c.quantile == o.quantile and c.min_samples == o.min_samples
     and c.initial == o.initial and c.window == o.window then
    return c.ttl, c.info
  end
  local ttl, info = compute_ttl(name, o)
  o.at, o.ttl, o.info = now, ttl, info
  cached[name] = o
  return ttl, info
end

-- syntax: ttl, info = lease.ttl_for(name[, opts])
-- The lease ttl for work named `name`: clamp(quantile x margin, floor,
-- ceiling) of its recorded durations, or `initial` (default: ceiling)
-- until min_samples durations were recorded.
-- opts: floor (1 s), ceiling (300 s), margin (1.5), quantile (0.999),
--       min_samples (20), initial (ceiling), window (3600 s)
-- returns: ttl (s), info { samples, source = "measured" | "initial",
--          quantile (s, when measured) }. Never yields.
function _M.ttl_for(name, opts)
  check_name("lease.ttl_for", name)
  return ttl_of(name, adaptive_opts("lease.ttl_for", opts))
end

----------------------------------------------------------------- API

-- syntax: s = lease.remaining(l)
-- returns: seconds left of l as this holder last acquired or renewed it
-- (negative once past), on the monotonic clock: a wall-clock step (NTP,
-- a VM resumed) neither stretches nor ends it. Decide when to renew
-- with it, not with l.expires_at (the wall-clock expiry the store
-- judges by).
function _M.remaining(l)
  if type(l) ~= "table" or type(l.deadline) ~= "number" then
    error("lease.remaining: l must be a lease from lease.acquire", 2)
  end
  return l.deadline - core.mono()
end

-- syntax: l, err = lease.acquire(store, key, ttl [, { owner = id }])
-- returns: { key, token, expires_at, deadline, owner, ttl } or nil, err
--          ("held", with err.ttl = seconds left, ...)
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
-- returns: l with a new expires_at and deadline (ttl defaults to l.ttl), or
--          nil, err ("lost" once it expired or a newer token was issued)
-- yields: one statement / one script call
function _M.renew(store, l, ttl)
  check_store("lease.renew", store)
  local token = check_lease("lease.renew", l)
  if ttl == nil then
    ttl = l.ttl
  end
  check_ttl("lease.renew", ttl)
  if is_sql(store) then
    return sql_renew(store, l, token, ttl)
  end
  return redis_renew(store, l, token, ttl)
end

-- syntax: ok, err = lease.release(store, l)
-- returns: true, or nil, err ("lost": taken over, or released already;
--          on Redis also when it had already expired)
-- yields: one statement / one script call
function _M.release(store, l)
  check_store("lease.release", store)
  local token = check_lease("lease.release", l)
  if is_sql(store) then
    return sql_release(store, l, token)
  end
  return redis_release(store, l, token)
end

-- syntax: id = lease.owner()
-- A fresh owner id (CSPRNG) for lease.acquire's opts.owner: a holder
-- that acquires many keys under one id can give back, with
-- lease.release_owner, also the ones whose grant it never saw (an
-- acquisition abandoned by task:cancel() while its commit was in flight).
function _M.owner()
  return random_owner()
end

-- syntax: n, err = lease.release_owner(store, owner, keys)
-- Releases those of keys (a list) that owner holds; returns how many.
-- An acquisition of one of the keys still committing is waited for on
-- SQL (on SQLite the writer runs it first; on PostgreSQL per key, see
-- sql_release_owner). On Redis a grant in flight on another connection may
-- land after the release: it then lasts until its ttl.
-- yields: one transaction (SQL) / one script call per 100 keys (Redis)
function _M.release_owner(store, owner, keys)
  check_store("lease.release_owner", store)
  if type(owner) ~= "string" or owner == "" or owner:find("|", 1, true) then
    error("lease.release_owner: owner must be a non-empty string without"
          .. " '|'", 2)
  end
  if type(keys) ~= "table" then
    error("lease.release_owner: keys must be a list of keys", 2)
  end
  for i = 1, #keys do
    check_key("lease.release_owner", keys[i])
  end
  if #keys == 0 then
    return 0
  end
  if is_sql(store) then
    return sql_release_owner(store, owner, keys)
  end
  return redis_release_owner(store, owner, keys)
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
  local want = check_token("lease.check", token)
  local lock = tx.engine == "postgres" and " FOR SHARE" or ""
  local rows, err = tx:query("SELECT token FROM paygate_leases WHERE"
    .. " name = $1" .. lock, { key })
  if not rows then
    return nil, err
  end
  local cur = rows[1] and rows[1].token or 0
  if canon_token(cur) ~= want then
    return fail("fenced", string.format("lease %s: token %s is older than"
                .. " %s", key, tostring(token), tostring(cur)),
                { current = cur })
  end
  return true
end

-- syntax: st = lease.guard(db, key, token)
-- The same check as a statement for db:atomic: put it first, and the job
-- writes nothing unless token is still the newest for key (the job fails
-- with err.kind "conflict", err.name "lease"; lease.fenced(err) tells).
-- Unlike lease.check it holds no writer between round trips: on SQLite the
-- job joins the group commit. PostgreSQL takes the same share lock.
function _M.guard(db, key, token)
  if not is_sql(db) then
    error("lease.guard: db must be a paygate.sql handle", 2)
  end
  check_key("lease.guard", key)
  token = check_token("lease.guard", token)
  local lock = db.engine == "postgres" and " FOR SHARE" or ""
  return { "SELECT token FROM paygate_leases WHERE name = $1 AND token = $2"
           .. lock, { key, token }, expect = 1, name = "lease" }
end

-- syntax: yes = lease.fenced(err) -- err of a db:atomic whose lease.guard
-- failed (a newer token was issued)
function _M.fenced(err)
  return type(err) == "table" and err.kind == "conflict"
         and err.name == "lease" and err.reason == "expect"
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
  token = check_token("lease.fenced_call", token)
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

--------------------------------------------------------------- run

-- per-worker counters (lease.stats())
local counts = { runs = 0, held = 0, renewed = 0, lost = 0, fenced = 0,
                 store_errors = 0, abandoned = 0 }

-- paygate.log.warn (required when first used: paygate requires the
-- libraries an app loads)
local function warn(msg, fields)
  require("paygate").log.warn(msg, fields)
end

-- The handle lease.run gives fn: what fn needs to commit only while its
-- token is the newest.
local Held = {}
Held.__index = Held

-- syntax: ok, err = h:check(tx)
-- Inside fn's db:transaction (SQL lease stores): lease.check with this
-- run's key and token; nil, err "fenced" when the lease moved on.
-- yields: one query
function Held:check(tx)
  if not is_sql(self.store) then
    error("h:check: the lease is on Redis: guard Redis writes with"
          .. " h:call", 2)
  end
  if getmetatable(tx) ~= sql.TX then
    error("h:check: tx must be the tx of a db:transaction", 2)
  end
  local ok, err = _M.check(tx, self.key, self.token)
  if not ok and err.kind == "fenced" then
    counts.fenced = counts.fenced + 1
    warn("lease: a write for a lease that moved on was refused",
         { key = self.key, token = self.token, current = err.current,
           name = self.name })
  end
  return ok, err
end

-- syntax: reply, err = h:call(cmd, ...)
-- Redis lease stores: the command runs only while this run's token is
-- the newest (lease.fenced_call); nil, err "fenced" otherwise.
-- yields: one script call
function Held:call(cmd, ...)
  if not is_redis(self.store) then
    error("h:call: the lease is on SQL: guard writes with h:check(tx)", 2)
  end
  local res, err = _M.fenced_call(self.store, self.key, self.token, cmd,
                                  ...)
  if not res and err and err.kind == "fenced" then
    counts.fenced = counts.fenced + 1
    warn("lease: a write for a lease that moved on was refused",
         { key = self.key, token = self.token, name = self.name })
  end
  return res, err
end

-- syntax: s = h:remaining()
-- returns: seconds left until the lease expires, as last acquired or
-- renewed (negative once past)
function Held:remaining()
  return _M.remaining(self.lease)
end

-- The work's coroutine was abandoned (its request's deadline,
-- task:cancel(), shutdown): it will never release the lease, so the
-- renewer does, and stops renewing it.
local function abandoned(store, h)
  counts.abandoned = counts.abandoned + 1
  warn("lease: the work was abandoned (cancelled, or its request timed"
       .. " out) while holding the lease: released", { key = h.key,
       name = h.name, ttl = h.ttl, elapsed = core.mono() - h.started })
  _M.release(store, h.lease)
end

-- Renews the lease each time half of it is gone, until done is set or
-- the lease is lost. A store failure is retried after a tenth of the ttl.
-- done set while the work is not finished: its coroutine was abandoned.
local function renewer(store, h, done)
  while true do
    local wait = _M.remaining(h.lease) - h.ttl / 2
    if wait > 0 and done:wait(wait) then
      if not h.finished then abandoned(store, h) end
      return
    end
    if h.finished then
      return
    end
    local ok, err = _M.renew(store, h.lease, h.ttl)
    if ok then
      counts.renewed = counts.renewed + 1
    elseif err.kind == "lost" then
      h.lost = true
      counts.lost = counts.lost + 1
      warn("lease: lost while the work was running (it outlived its ttl"
           .. " and a renewal came too late)",
           { key = h.key, name = h.name, ttl = h.ttl,
             elapsed = core.mono() - h.started })
      return
    else
      counts.store_errors = counts.store_errors + 1
      if done:wait(math.max(h.ttl / 10, 0.01)) then
        if not h.finished then abandoned(store, h) end
        return
      end
    end
  end
end

local function pack(...)
  return { n = select("#", ...), ... }
end

-- syntax: ... = lease.run(store, key, fn, opts)
-- Acquires key, runs fn(h) while renewing the lease in the background
-- (each time half of it is gone), records fn's duration, releases.
-- opts (one of adaptive and ttl is required):
--   adaptive = name  the ttl is lease.ttl_for(name, opts) (floor,
--                    ceiling, margin, quantile, min_samples, initial,
--                    window as there), and fn's duration is recorded
--                    under name after each run (lease.measure)
--   ttl = s          a fixed ttl instead (nothing is recorded)
--   renew = false    no background renewal (the lease ends at its ttl)
--   owner            as lease.acquire's
-- h: { key, token, ttl, name, lease, lost (set when a renewal found the
--    lease gone) } with h:check(tx) (SQL: inside fn's transaction,
--    before its writes), h:call(cmd, ...) (Redis: a fenced command),
--    h:remaining(). A commit guarded by them cannot happen once another
--    holder took the key.
-- returns: fn's results; nil, err "held" (err.ttl) when another owner
--          holds the key (fn did not run); nil, err (the store's kinds)
--          when the acquisition failed. A raise in fn is raised again
--          after the lease was released.
-- yields: while fn runs, plus one acquisition and one release
function _M.run(store, key, fn, opts)
  check_store("lease.run", store)
  check_key("lease.run", key)
  if type(fn) ~= "function" then
    error("lease.run: fn must be a function", 2)
  end
  if type(opts) ~= "table" then
    error("lease.run: opts must be a table with adaptive = name (or a"
          .. " fixed ttl)", 2)
  end
  local name, ttl = opts.adaptive, opts.ttl
  if name ~= nil then
    check_name("lease.run", name)
    if ttl ~= nil then
      error("lease.run: opts.adaptive and opts.ttl exclude each other", 2)
    end
    ttl = ttl_of(name, adaptive_opts("lease.run", opts))
  elseif ttl == nil then
    error("lease.run: opts.adaptive (the name its durations are recorded"
          .. " under) or opts.ttl is required", 2)
  else
    check_ttl("lease.run", ttl)
    for k in pairs(opts) do
      if not RUN_KEYS[k] then
        error("lease.run: unknown option opts." .. tostring(k)
              .. (ADAPTIVE_KEYS[k] and " (it needs opts.adaptive)" or ""), 2)
      end
    end
  end
  if opts.renew ~= nil and type(opts.renew) ~= "boolean" then
    error("lease.run: opts.renew must be a boolean", 2)
  end
  local owner = opts.owner
  if owner ~= nil and (type(owner) ~= "string" or owner == ""
                       or owner:find("|", 1, true)) then
    error("lease.run: opts.owner must be a non-empty string without '|'",
          2)
  end
  local l, err = _M.acquire(store, key, ttl, { owner = owner })
  if not l then
    if err.kind == "held" then
      counts.held = counts.held + 1
    end
    return nil, err
  end
  counts.runs = counts.runs + 1
  local h = setmetatable({ key = key, token = l.token, ttl = ttl,
                           name = name, lease = l, store = store,
                           lost = false, started = core.mono() }, Held)
  local done, task, guard
  if opts.renew ~= false then
    done = core.event()
    task = core.spawn(renewer, store, h, done)
    -- if this coroutine is abandoned mid-work, done is set with
    -- h.finished unset: the renewer releases the lease and stops
    guard = done:set_on_abandon()
  end
  local res = pack(pcall(fn, h))
  local elapsed = core.mono() - h.started
  h.finished = true
  if task then
    guard:cancel()
    done:set()
    task:wait()                  -- a renewal in flight ends first
  end
  if res[1] and name then
    _M.measure(name, elapsed, opts)
  end
  if not h.lost then
    local ok, rerr = _M.release(store, l)
    if not ok and rerr.kind == "lost" then
      counts.lost = counts.lost + 1
      warn("lease: expired before the work ended (its ttl was shorter"
           .. " than the work)", { key = key, name = name, ttl = ttl,
                                    elapsed = elapsed })
    end
  end
  if not res[1] then
    error(res[2], 0)
  end
  return unpack(res, 2, res.n)
end

-- syntax: t = lease.stats()
-- returns: this worker's lease.run counters: runs, held (not run: another
-- owner held the key), renewed, lost (a lease found gone by a renewal
-- or the release), fenced (writes refused by h:check / h:call),
-- store_errors (renewals that failed on the store), abandoned (runs whose
-- coroutine was abandoned mid-work: the renewer released their lease)
function _M.stats()
  local t = {}
  for k, v in pairs(counts) do
    t[k] = v
  end
  return t
end

return _M
