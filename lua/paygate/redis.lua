-- paygate.redis: Redis on the loop (hiredis async + libevent).
--
--   local redis = require "paygate.redis"
--   local r = assert(redis.connect("redis://127.0.0.1:6379/0?pool=2"))
--   r:call("SET", "k", "v")                  --> "OK"
--   r:call("GET", "nope")                    --> redis.null
--   r:pipeline({ { "INCR", "n" }, { "GET", "n" } })  --> { 1, "1" }
--   local incr = r:script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
--   incr({ "n" }, { 5 })                     --> 6  (EVALSHA, NOSCRIPT -> EVAL)
--
-- Failures return nil, err (the core.error shape: tostring gives
-- "kind: message"); err.kind is one of unavailable, timeout, closed
-- (transport; unknown_outcome for a command that may write whose reply
-- was lost after it was sent: see outcome()), or for error replies
-- syntax, constraint (WRONGTYPE), busy, noscript, error; err.code holds
-- Redis's error word. Misuse (a wrong
-- argument type, a closed client, a call outside a coroutine) raises.
--
-- Commands take the pool's connections in turn. A blocking command
-- (BLPOP, XREAD BLOCK, ...: BLOCKING below) runs on a connection of its
-- own, its reply allowed its block time on top of `timeout`; past
-- `max_blocking` of them at once it fails "busy" at once; in a
-- pipeline it raises, and so do WAIT / WAITAOF and a transaction's
-- commands in call (they belong in a pipeline), pub/sub and MONITOR, and
-- the commands that change the connection itself (SELECT, AUTH, ...).
--
-- While the server is down, commands fail "unavailable" at once: after a
-- failed connect attempt the C client waits (0.1 s doubling to 2 s, with
-- jitter) before the next one, and fails commands meanwhile without a
-- connect; set_addr (a move below) ends that wait.
--
-- Host names are resolved with paygate.dns (on the loop, never the
-- blocking system resolver), every address in turn until one answers;
-- after a transport failure the name is looked up again (the cache keeps
-- an answer for its TTL) and the next call goes to the new address.
--
-- Sentinel: redis-sentinel://[password@]s1:26379,s2:26379/mymaster[/db]
-- asks every Sentinel for the master of that name (newest config epoch,
-- then most votes, wins), checks it says ROLE master, and follows a
-- failover: a background task subscribes to +switch-master on a Sentinel
-- and moves to the new master it names (never to a server whose ROLE is
-- not master); once subscribed, after
-- a transport failure or a READONLY answer (in the background: the
-- command fails at once), and every `sentinel_poll` seconds (default 1),
-- it also asks the Sentinels again; a named server whose ROLE check
-- failed is asked again only after a growing wait (ROLE_WAIT_MIN). Redis
-- replication is asynchronous: a write the old master acknowledged can
-- be lost in a failover (see docs/storage.md), which is why paygate.lease
-- waits for `lease_replicas` replicas (default 1 under Sentinel) before
-- it grants a lease.

local core = require "paygate.core"
local dns = require "paygate.dns"
local rcore = require "paygate.redis.core"
local redact = require "paygate.redact"

local _M = { _VERSION = "0.1.0" }

_M.null = core.null                     -- the nil reply (== cjson.null)

local MAXARGS = 1024                    -- per command, the command included

-- Options whose value in a URL stays a string (the others: tonumber).
local STRING_OPTS = { password = true, sentinel_password = true }

-- Options whose value in a URL is a boolean ("true"/"1", "false"/"0").
local BOOL_OPTS = { lease_unsafe = true }
local BOOLS = { ["true"] = true, ["1"] = true, ["false"] = false,
                ["0"] = false }

-- Options paygate.redis reads itself (the rest go to the C client).
local LUA_OPTS = { sentinel_poll = true, sentinel_password = true,
                   lease_replicas = true, lease_wait = true,
                   lease_unsafe = true }

local Client = {}
Client.__index = Client

local Script = {}
Script.__index = Script

local unpack = unpack or table.unpack

-- syntax: ok = redis.is_error(v)   -- a pipeline slot that failed
_M.is_error = core.is_error

-- Raises (at level) unless v can be sent as a command argument.
local function check_arg(fname, what, v, level)
  local t = type(v)
  if t ~= "string" and t ~= "number" and t ~= "boolean" then
    error(fname .. ": " .. what .. " must be a string, number or boolean"
          .. " (got " .. t .. ")", level + 1)
  end
end

local function check_self(fname, self)
  if getmetatable(self) ~= Client then
    error(fname .. ": call it as client:" .. fname:match("[^:]*$")
          .. "(...)", 3)
  end
  if self.closed then
    error(fname .. ": client is closed", 3)
  end
end

-- v (a string or number, from a URL or a Sentinel) as a TCP port, or nil
-- unless it is an integer 1..65535: a larger one would be taken modulo
-- 65536 by the connect (glibc), reaching another port than the one the
-- client records, and set_addr refuses it (a raise).
local function port_of(v)
  local p = tonumber(v)
  if p and p % 1 == 0 and p >= 1 and p <= 65535 then
    return p
  end
end

-- "h:p,h2:p2" -> { { host =, port = }, ... }
local function parse_hosts(list, default_port)
  local hosts = {}
  for item in list:gmatch("[^,]+") do
    local host, port = item:match("^%[(.*)%]:(%d+)$")
    if not host then
      host, port = item:match("^([^:]*):(%d+)$")
    end
    if not host then
      host, port = item:match("^%[(.*)%]$") or item, default_port
    end
    if host == "" or not port_of(port) then
      return nil
    end
    hosts[#hosts + 1] = { host = host, port = port_of(port) }
  end
  return #hosts > 0 and hosts or nil
end

local function parse_url(url)
  if url:match("^rediss://") then
    -- never fall back to plain text when TLS was asked for
    error("redis.connect: rediss:// (TLS) is not supported (hiredis 0.14 "
          .. "has no TLS): reach Redis over loopback or a TLS tunnel "
          .. "with redis://", 4)
  end
  local scheme, rest = url:match("^(redis)://(.*)$")
  if not scheme then
    scheme, rest = url:match("^(redis%-sentinel)://(.*)$")
  end
  if not scheme then
    error("redis.connect: url must start with redis:// or"
          .. " redis-sentinel://", 4)
  end
  local opts = {}
  -- (a password may hold "?": paygate.redact's reading, which messages
  -- show the URL by)
  local main, qs = redact.split_query(rest)
  qs = qs:sub(2)
  for k, v in qs:gmatch("([^&=]+)=([^&]*)") do
    if BOOL_OPTS[k] and BOOLS[v] ~= nil then
      opts[k] = BOOLS[v]
    else
      opts[k] = STRING_OPTS[k] and v or tonumber(v) or v
    end
  end
  local auth, hostpart = main:match("^(.*)@(.*)$")
  if not auth then
    hostpart = main
  else
    opts.password = opts.password or auth:match("^[^:]*:(.*)$") or auth
  end
  if scheme == "redis-sentinel" then
    local list, name, db = hostpart:match("^([^/]*)/([^/]+)/?(%d*)$")
    local sentinels = list and parse_hosts(list, 26379)
    if not sentinels then
      error("redis.connect: url must be redis-sentinel://[password@]"
            .. "host:port[,host:port...]/master_name[/db]", 4)
    end
    if db ~= "" and opts.db == nil then
      opts.db = tonumber(db)
    end
    return { sentinels = sentinels, master = name }, opts
  end
  local hostport, db = hostpart:match("^([^/]*)/?(%d*)$")
  if not hostport then
    error("redis.connect: url must be redis://[password@]host[:port][/db]"
          .. " with a numeric db", 4)
  end
  local hosts = parse_hosts(hostport, 6379)
  if not hosts or #hosts ~= 1 then
    error("redis.connect: url must be redis://[password@]host[:port][/db]"
          .. " with one host", 4)
  end
  if db ~= "" and opts.db == nil then
    opts.db = tonumber(db)
  end
  return { host = hosts[1].host, port = hosts[1].port }, opts
end

-- The addresses of host (a numeric address is its own), or nil, err.
local function resolve(host)
  if dns.is_numeric(host) then
    return { host }
  end
  return dns.resolve(host)
end

-- Bound on one round of questions to the Sentinels (each one's own
-- connect and reply timeouts are 1 s).
local SENTINEL_ROUND = 2.5

-- One Sentinel's view of the master: SENTINEL MASTER gives its address
-- and the config epoch of that view (a failover raises the epoch).
-- returns: { ip =, port =, epoch = } or nil, why, and true when every
--          address of the Sentinel refused sentinel_password
local function ask_sentinel(self, s)
  local addrs, derr = resolve(s.host)
  if not addrs then
    return nil, s.host .. ": " .. tostring(derr)
  end
  local why, refused = {}, true
  for _, a in ipairs(addrs) do
    if self.closed then                -- its Sentinel clients are closed
      return nil, "client closed"
    end
    local key = a .. ":" .. s.port
    local sc = self.sentinel_clients[key]
    if not sc then
      sc = rcore.new(a, s.port, { pool = 1, timeout = 1,
                                  connect_timeout = 1,
                                  password = self.sentinel_password })
      self.sentinel_clients[key] = sc
    end
    local r, err = sc:call("SENTINEL", "MASTER", self.master_name)
    if type(r) == "table" then
      local f = {}
      for i = 1, #r - 1, 2 do
        f[r[i]] = r[i + 1]
      end
      -- what a Sentinel says is checked: a server that is none (a
      -- wrong port in the URL, a hostile one) answers what it likes
      local port = port_of(f.port)
      local epoch = tonumber(f["config-epoch"] or 0)
      if type(f.ip) ~= "string" or f.ip == "" or not port then
        err = "no address in SENTINEL MASTER"
      elseif not epoch or epoch % 1 ~= 0 or epoch < 0 then
        err = "no config-epoch in SENTINEL MASTER"
      else
        local maddrs, merr = resolve(f.ip)
        if maddrs then
          return { ip = maddrs[1], port = port, epoch = epoch }
        end
        err = merr
      end
    end
    refused = refused and type(err) == "table" and err.kind == "config"
    why[#why + 1] = key .. ": " .. tostring(err)
  end
  return nil, #why > 0 and table.concat(why, "; ") or s.host .. ": no address",
    #why > 0 and refused
end

-- Asks every Sentinel at once (for at most SENTINEL_ROUND s) where the
-- master is. One stale Sentinel (cut off during a failover, paused, or
-- wrongly configured) must not send the client back to an old master, so
-- the answers are ranked: the newest config epoch first, then the one
-- most Sentinels give.
-- returns: { { ip =, port =, epoch =, votes = }, ... } best first, or
--          nil, err (kind "unavailable")
local function sentinel_masters(self)
  local answers, why, pending = {}, {}, #self.sentinels
  local refused = 0                     -- Sentinels that refused AUTH
  local done = core.event()
  for _, s in ipairs(self.sentinels) do
    core.spawn(function()
      local a, err, auth = ask_sentinel(self, s)
      if a then
        answers[#answers + 1] = a
      else
        why[#why + 1] = err
        refused = refused + (auth and 1 or 0)
      end
      pending = pending - 1
      if pending == 0 then
        done:set()
      end
    end)
  end
  if pending > 0 then
    done:wait(SENTINEL_ROUND)
  end
  local by, list = {}, {}
  for _, a in ipairs(answers) do
    local key = a.ip .. ":" .. a.port
    local c = by[key]
    if not c then
      c = { ip = a.ip, port = a.port, epoch = a.epoch, votes = 0 }
      by[key] = c
      list[#list + 1] = c
    end
    c.votes = c.votes + 1
    c.epoch = math.max(c.epoch, a.epoch)
  end
  if #list == 0 then
    if pending > 0 then
      why[#why + 1] = pending .. " did not answer within "
                      .. SENTINEL_ROUND .. " s"
    end
    -- every one refused the password: asking again cannot help until
    -- sentinel_password is fixed ("config", as a master's refusal is)
    local config = refused == #self.sentinels
    return nil, core.error(config and "config" or "unavailable",
                           "redis-sentinel: no Sentinel"
                           .. " named the master " .. self.master_name
                           .. " (" .. table.concat(why, "; ") .. ")",
                           { retryable = not config })
  end
  table.sort(list, function(x, y)
    if x.epoch ~= y.epoch then
      return x.epoch > y.epoch
    end
    return x.votes > y.votes
  end)
  return list
end

-- ROLE of the server at ip:port, on a connection of its own.
-- returns: true if it says master, else false, why
local function is_master(self, ip, port)
  local h = rcore.new(ip, port, { pool = 1, timeout = 1,
                                  connect_timeout = 1,
                                  password = self.password })
  local r, err = h:call("ROLE")
  h:close()
  if type(r) == "table" and r[1] == "master" then
    return true
  end
  if r == nil then                      -- no answer: down, refused, AUTH
    return false, ip .. ":" .. port .. " did not answer ROLE ("
      .. tostring(err) .. ")"
  end
  return false, ip .. ":" .. port .. " is not a master (ROLE "
    .. tostring(type(r) == "table" and r[1] or r) .. ")"
end

-- A named server whose ROLE check failed (down, refused, no reply, or
-- not a master) is not asked again until a window has passed: every
-- failed command asks the Sentinels (at most every 0.1 s) and every poll
-- too, and while they name a server that is down -- the newest epoch's,
-- ranked above the current master -- each of those was a connect to it,
-- about 10 a second, and a log line each. The window doubles from
-- ROLE_WAIT_MIN to ROLE_WAIT_MAX (drawn between half and all of it, so
-- that workers do not ask in step: the runtime seeds each state's
-- math.random apart), as the C client's reconnect backoff
-- does; a server that comes up is found within ROLE_WAIT_MAX. A check
-- that says master forgets the server's failures. A +switch-master is
-- news: follow_switch asks at once, whatever the window (its own tries
-- are bounded), and its failures count towards the window.
local ROLE_WAIT_MIN, ROLE_WAIT_MAX = 0.1, 2


-- Points the client at ip:port (a new master, a new DNS answer). Under
-- Sentinel, only if that server's ROLE says master: never a replica.
-- keep_backoff: the next address of the name, after a failure (see
-- set_addr in lredis.c), not a new master. fresh: a +switch-master's
-- address, asked whatever its ROLE_WAIT window.
-- returns: true when moved; false, why when the server was not taken
local function move(self, ip, port, keep_backoff, fresh)
  if self.closed or (ip == self.addr and port == self.port) then
    return false
  end
  if self.sentinel then
    local key = ip .. ":" .. port
    local w = self.role_waits[key]
    local now = core.mono()
    if w and not fresh and now < w.next_at then
      return false, string.format("%s: not asked again for %.2f s (last"
        .. " check: %s)", key, w.next_at - now, w.why)
    end
    local moves = self.moves
    local ok, why = is_master(self, ip, port)
    if self.closed or (self.moves ~= moves and not fresh) then
      return false                      -- overtaken (see follow_sentinels)
    end
    if not ok then
      local window = math.min(math.max((w and w.window or 0) * 2,
                                       ROLE_WAIT_MIN), ROLE_WAIT_MAX)
      self.role_waits[key] = { window = window, why = why,
        next_at = core.mono() + window * (0.5 + 0.5 * math.random()) }
      core.log(1, "redis: not moving: " .. why)
      return false, why
    end
    self.role_waits[key] = nil
    if ip == self.addr and port == self.port then
      return false
    end
  end
  core.log(1, "redis: moving from " .. tostring(self.addr) .. ":"
           .. tostring(self.port) .. " to " .. ip .. ":" .. port)
  self.addr, self.port = ip, port
  self.moves = (self.moves or 0) + 1
  self.h:set_addr(ip, port, keep_backoff)
  return true
end

-- A +switch-master names a new master that may not answer ROLE master
-- yet (promotion still under way, or ROLE timed out under load): it is
-- asked again, 0.05 s later and doubling (~1.5 s in all), rather than
-- left to the next poll, sentinel_poll s away, that asks the Sentinels.
local SWITCH_TRIES = 6

local function follow_switch(self, ip, port)
  local delay = 0.05
  for try = 1, SWITCH_TRIES do
    local moved, why = move(self, ip, port, false, true)
    if moved or not why or self.closed or try == SWITCH_TRIES then
      return moved
    end
    core.sleep(delay)
    delay = delay * 2
  end
end

-- Moves to the best master the Sentinels name whose ROLE agrees; stays
-- when the current server ranks first among them. A round that a move
-- overtook (a +switch-master followed while a slow Sentinel was still
-- answering, or another round) is dropped: its answers predate that
-- move, and the old master they name may still say ROLE master for a
-- few seconds after a failover (until the Sentinels demote it), so
-- acting on them moved the client back to it.
local function follow_sentinels(self)
  local moves = self.moves
  local list = sentinel_masters(self)
  for _, c in ipairs(list or {}) do
    if self.closed or self.moves ~= moves
       or (c.ip == self.addr and c.port == self.port) then
      return
    end
    if move(self, c.ip, c.port) then
      return
    end
  end
end

-- After a transport failure: ask DNS / the Sentinels again (at most
-- every 100 ms, one task at a time). In a task of its own: the command
-- that failed returns at once, as commands do while the server is down.
-- Waited for, a Sentinel that does not answer (stopped, its packets
-- dropped) held that command for the round (up to SENTINEL_ROUND s),
-- and a named master that does not answer for its ROLE check (up to 2 s
-- more, each): commands that fail "at once" failed a second or more late.
local function refresh_now(self)
  if self.sentinels then
    follow_sentinels(self)
  elseif self.name then
    local addrs = resolve(self.name)
    if addrs and #addrs > 0 then
      -- the next address after the current one: every address in turn
      local nxt = addrs[1]
      for i, a in ipairs(addrs) do
        if a == self.addr then
          nxt = addrs[i % #addrs + 1]
        end
      end
      move(self, nxt, self.port, true)
    end
  end
end

local function refresh(self)
  if self.refreshing or self.closed
     or core.mono() - (self.refreshed_at or 0) < 0.1 then
    return
  end
  self.refreshing = true
  core.spawn(function()
    -- (a raise must not leave refreshing set: no refresh would run again)
    local ok, err = pcall(refresh_now, self)
    if not ok then
      core.log(3, "redis: refresh failed: " .. tostring(err))
    end
    self.refreshed_at = core.mono()
    self.refreshing = false
  end)
end

-- (the C client's kinds: outcome() makes unknown_outcome afterwards)
local function needs_refresh(err)
  return err and (err.kind == "unavailable" or err.kind == "timeout")
end

-- Commands that change nothing on the server: when the reply to one is
-- lost, running it again is safe. Any other command (a write, a script,
-- a blocking pop, one not listed here) whose reply was lost after it was
-- sent may have been run: see outcome().
local READS = {}
for name in ([[
  GET MGET GETRANGE SUBSTR STRLEN LCS EXISTS TYPE TTL PTTL EXPIRETIME
  PEXPIRETIME DUMP OBJECT DBSIZE KEYS SCAN RANDOMKEY TOUCH
  HGET HMGET HGETALL HKEYS HVALS HLEN HEXISTS HSTRLEN HSCAN HRANDFIELD
  LRANGE LLEN LINDEX LPOS
  SMEMBERS SISMEMBER SMISMEMBER SCARD SRANDMEMBER SSCAN SINTER SINTERCARD
  SUNION SDIFF
  ZRANGE ZRANGEBYSCORE ZRANGEBYLEX ZREVRANGE ZREVRANGEBYSCORE
  ZREVRANGEBYLEX ZSCORE ZMSCORE ZCARD ZCOUNT ZLEXCOUNT ZRANK ZREVRANK
  ZSCAN ZRANDMEMBER ZINTER ZUNION ZDIFF ZINTERCARD
  XRANGE XREVRANGE XLEN XREAD XPENDING XINFO
  GETBIT BITCOUNT BITPOS BITFIELD_RO PFCOUNT
  GEOPOS GEODIST GEOHASH GEOSEARCH GEORADIUS_RO GEORADIUSBYMEMBER_RO
  SORT_RO EVAL_RO EVALSHA_RO FCALL_RO
  PING ECHO TIME INFO ROLE LASTSAVE
]]):gmatch("%S+") do
  READS[name] = true
end

local function is_read(name)
  return READS[tostring(name):upper()] == true
end

-- A transport failure (connection lost, no reply within timeout, the
-- client moved to a new master) after the command was sent (err.sent,
-- from the C client): the server may have read and run it -- a stopped
-- master runs it when it resumes, a killed one may have passed it to the
-- replica that is promoted. For a write that is "unknown_outcome", not
-- retryable: find out before running it again. A read keeps its kind
-- (retryable); so does a command never sent.
local function outcome(err, writes)
  if writes and type(err) == "table" and err.sent
     and (err.kind == "unavailable" or err.kind == "timeout") then
    return core.error("unknown_outcome", err.message .. " (the command"
      .. " was sent: it may have been applied; find out before running it"
      .. " again)", { retryable = false, sent = true, cause = err.kind })
  end
  return err
end

-- Follows the Sentinels' view of the master until the client closes:
-- subscribed to +switch-master on one Sentinel (the next one when that
-- connection ends), and asking them every sentinel_poll seconds anyway.
-- A message is lost while no subscription is up, so they are asked as
-- soon as the Sentinel confirmed the SUBSCRIBE (a failover announced
-- since the last question -- connect's, or the one after a lost
-- subscription -- would wait for the poll), and a lost subscription is
-- replaced LOST_WAIT s later (doubling, up to sentinel_poll, while
-- subscriptions keep ending before a poll's time), not a whole poll later.
-- A subscription not confirmed within a poll counts as lost too: a
-- Sentinel that is stopped, or cut off with its packets dropped, holds
-- the SUBSCRIBE unanswered without ending the connection, and the client
-- stayed on it (hearing no +switch-master) while the others were fine.
-- (A refused SUBSCRIBE -- NOAUTH after a refused password -- ends the
-- connection at once: hiredis 0.14 drops a connection on an error reply
-- with no command waiting for it.)
local LOST_WAIT = 0.1

local function watch(self)
  local sub, i, wait, confirmed = nil, 0, LOST_WAIT, false
  while not self.closed do
    if not sub then
      i = i % #self.sentinels + 1
      local s = self.sentinels[i]
      local addrs = resolve(s.host)
      if addrs then
        sub = rcore.subscribe(addrs[1], s.port, "+switch-master",
                              { password = self.sentinel_password })
        confirmed = false
      end
    end
    local msg, err
    if sub then
      msg, err = sub:next(self.sentinel_poll)
    else
      core.sleep(self.sentinel_poll)
    end
    if self.closed then
      break
    end
    -- "<master name> <old ip> <old port> <new ip> <new port>"
    local name, ip, port
    if type(msg) == "string" then
      name, ip, port = msg:match("^(%S+) %S+ %S+ (%S+) (%d+)$")
    end
    if msg == true then                 -- subscribed: what did we miss?
      confirmed = true
      follow_sentinels(self)
    elseif name == self.master_name then
      local addrs = port_of(port) and resolve(ip)
      if addrs then
        follow_switch(self, addrs[1], port_of(port))
      end
    elseif not msg then
      if sub and ((err and err.kind ~= "timeout") or not confirmed) then
        sub:close()                     -- lost: the next Sentinel's
        sub = nil
        core.sleep(math.min(wait, self.sentinel_poll))
        wait = wait * 2
      elseif sub then
        -- up for a whole poll: the next loss is replaced quickly again
        -- (not on the confirmation: a Sentinel that confirms and drops at
        -- once would be asked again every LOST_WAIT)
        wait = LOST_WAIT
      end
      if not self.closed then
        follow_sentinels(self)
      end
    end
  end
  if sub then
    sub:close()
  end
end

-- Blocking commands. Each one runs on a connection of its own, opened
-- for it and closed after its reply: on a shared connection every
-- command queued behind it (replies come in order) would wait as long,
-- and a block longer than `timeout` would read as a timeout, failing
-- them all. Its reply may come its block time later than `timeout`. At
-- most max_blocking run at once (the C client refuses one more, "busy").
-- The value says where a command's block time is: the last argument, or
-- the first after the name, in seconds (0: forever).
local BLOCKING = {
  BLPOP = "last", BRPOP = "last", BRPOPLPUSH = "last", BLMOVE = "last",
  BZPOPMIN = "last", BZPOPMAX = "last", BLMPOP = "first", BZMPOP = "first",
}

-- WAIT and WAITAOF wait for the writes sent before them on their own
-- connection: only a pipeline says which connection that is (on a
-- connection of their own they would confirm nothing). They block it
-- for their timeout (milliseconds, the last argument).
local WAITS = { WAIT = true, WAITAOF = true }

-- Commands that turn a connection into a stream of pushed messages, which
-- the shared connections cannot carry (hiredis would hand every message
-- to a command long answered).
local STREAMING = {
  SUBSCRIBE = true, PSUBSCRIBE = true, SSUBSCRIBE = true,
  UNSUBSCRIBE = true, PUNSUBSCRIBE = true, SUNSUBSCRIBE = true,
  MONITOR = true,
}

-- Commands that change the state of the connection they go out on, which
-- other coroutines' commands share: a SELECT or AUTH would move or
-- re-authenticate them, HELLO switch the protocol hiredis reads, CLIENT
-- REPLY OFF/SKIP leave replies unsent (every later reply then answers the
-- wrong command), QUIT and RESET end or reset it. The client's db and
-- password are options (redis.connect).
local CONN_STATE = {
  SELECT = true, AUTH = true, HELLO = true, QUIT = true, RESET = true,
}

-- A transaction's commands: through call, other coroutines' commands
-- could land between MULTI and EXEC on the shared connection (and join
-- the transaction), or the EXEC go out on another connection. In one
-- pipeline they go out together, in order.
local TRANSACTION = {
  MULTI = true, EXEC = true, DISCARD = true, WATCH = true, UNWATCH = true,
}

-- Why a kind of command (command_kind) is refused: anywhere, in call
-- only, in a pipeline only.
local REFUSED = {
  streaming = "is not supported (pub/sub and MONITOR are not offered)",
  conn_state = "would change the connection other coroutines' commands"
    .. " share (the db and the password are redis.connect options)",
}
local REFUSED_IN_CALL = {
  transaction = "goes in one client:pipeline with the whole transaction"
    .. " (MULTI ... EXEC), or use client:script: calls share connections"
    .. " with other coroutines",
  wait = "waits for the writes sent before it on its connection: send it"
    .. " in client:pipeline, after those writes",
}
local REFUSED_IN_PIPELINE = {
  blocking = "blocks, holding the connection other coroutines' commands"
    .. " share: send it with client:call, which gives it a connection of"
    .. " its own",
}

-- XREAD / XREADGROUP: the BLOCK option's milliseconds, or nil without
-- one. Options come before STREAMS; GROUP takes two values (a group or
-- consumer may be named BLOCK).
local function xread_block(args)
  local i = 2
  while i <= #args do
    local a = tostring(args[i]):upper()
    if a == "STREAMS" then
      return nil
    elseif a == "BLOCK" then
      return args[i + 1]
    end
    i = i + (a == "GROUP" and 3 or a == "COUNT" and 2 or 1)
  end
end

-- A block time as Redis reads it: secs (0: forever, math.huge here); a
-- value it refuses (the command fails at once) counts as none.
local function block_secs(v, scale)
  local n = tonumber(v)
  if not n or n < 0 or n ~= n then
    return 0
  end
  return n == 0 and math.huge or n * scale
end

-- What kind of command args ({ name, ... }) is: "blocking", block secs;
-- "wait", its timeout in s (math.huge for 0); "streaming"; "conn_state";
-- "transaction"; or nil (an ordinary command).
local function command_kind(args)
  local name = args[1]:upper()
  local where = BLOCKING[name]
  if where then
    return "blocking", block_secs(args[where == "last" and #args or 2], 1)
  end
  if name == "XREAD" or name == "XREADGROUP" then
    local ms = xread_block(args)
    if ms ~= nil then
      return "blocking", block_secs(ms, 0.001)
    end
  elseif WAITS[name] then
    return "wait", block_secs(args[#args], 0.001)
  elseif STREAMING[name] then
    return "streaming"
  elseif CONN_STATE[name] or (name == "CLIENT" and args[2] ~= nil
                              and tostring(args[2]):upper() == "REPLY") then
    return "conn_state"
  elseif TRANSACTION[name] then
    return "transaction"
  end
end

-- redis.connect's own options: the message of a misuse, or nil
local function opts_problem(o)
  if o.lease_unsafe ~= nil and type(o.lease_unsafe) ~= "boolean" then
    return "opts.lease_unsafe must be a boolean"
  end
  for name, min in pairs({ sentinel_poll = 0.01, lease_wait = 0.001,
                           lease_replicas = 0 }) do
    local v = o[name]
    if v ~= nil and (type(v) ~= "number" or v < min or v ~= v) then
      return "opts." .. name .. " must be a number >= " .. min
    end
  end
  if o.lease_replicas and o.lease_replicas % 1 ~= 0 then
    return "opts.lease_replicas must be an integer"
  end
  -- a lease's WAIT holds its connection up to lease_wait: at or past the
  -- reply timeout the connection would be dropped under it (and with it
  -- every command pipelined behind)
  local timeout = type(o.timeout) == "number" and o.timeout or 5
  if o.lease_wait and o.lease_wait >= timeout then
    return "opts.lease_wait (" .. tostring(o.lease_wait) .. " s) must be"
      .. " shorter than opts.timeout (" .. tostring(timeout) .. " s): a"
      .. " lease's WAIT would outlast the reply timeout"
  end
end

-- The url's target, its options merged with opts (opts win), and those
-- of them the C client takes. Raises what redis.connect raises, at the
-- line of connect's caller (parse_url's level 4, this one's 3).
local function prepare(url, opts)
  local target, o = parse_url(url)
  for k, v in pairs(opts or {}) do
    o[k] = v
  end
  local problem = opts_problem(o)
  if problem then
    error("redis.connect: " .. problem, 3)
  end
  local copts = {}
  for k, v in pairs(o) do
    if not LUA_OPTS[k] then
      copts[k] = v
    end
  end
  return target, o, copts
end

-- syntax: ok, why = redis.check_url(url)
-- Whether redis.connect would take url (scheme, form, options), without
-- connecting: true, or nil and the reason connect would raise with. For a
-- config check at start.
function _M.check_url(url)
  if type(url) ~= "string" then return nil, "must be a string" end
  local ok, err = pcall(function()
    local _, _, copts = prepare(url)
    -- the C client checks its own options when made; it connects later
    rcore.new("127.0.0.1", 6379, copts):close()
  end)
  if ok then return true end
  return nil, (tostring(err):gsub("^[^:]*:%d+: ", ""))
end

-- syntax: client, err = redis.connect(url [, opts])
-- url: redis://[password@]host[:port][/db] or
--      redis-sentinel://[password@]s1[:26379][,s2...]/master_name[/db]
-- opts: pool (connections, default 2), timeout (s without a reply,
--       default 5), connect_timeout (s, default 2), password, db,
--       max_blocking (blocking commands at once, default 64),
--       max_reply (bytes of one reply, default 64 MiB; 0: the default);
--       Sentinel: sentinel_poll (s, default 1), sentinel_password;
--       leases (paygate.lease): lease_replicas (replicas a grant waits
--       for: default 1 under Sentinel, else 0), lease_wait (s, default 1,
--       or half of timeout when that is less; shorter than timeout),
--       lease_unsafe (true: allow leases under Sentinel without waiting)
-- returns: a client after one PING (Sentinel: ROLE) answered, or nil, err
-- yields: for the name lookups and that round trip
function _M.connect(url, opts)
  if type(url) ~= "string" then
    -- its type, never its value; nil is most often a config key unset
    error("redis.connect: url must be a string (redis://...), got "
          .. type(url), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("redis.connect: opts must be a table", 2)
  end
  local target, o, copts = prepare(url, opts)
  local self = setmetatable({
    host = target.host or target.master,
    lease_replicas = o.lease_replicas or (target.sentinels and 1 or 0),
    -- (by default 1 s, and within the reply timeout: see opts_problem)
    lease_wait = o.lease_wait or math.min(1, (tonumber(o.timeout) or 5) / 2),
    lease_unsafe = o.lease_unsafe == true,
    sentinel = target.sentinels ~= nil,
    timeout = tonumber(o.timeout) or 5,
  }, Client)
  local candidates = {}
  if target.sentinels then
    self.sentinels, self.master_name = target.sentinels, target.master
    self.sentinel_clients = {}
    self.role_waits = {}                -- "ip:port" -> see ROLE_WAIT_MIN
    self.sentinel_password = o.sentinel_password
    self.sentinel_poll = o.sentinel_poll or 1
    self.password = o.password
    local list, err = sentinel_masters(self)
    if not list then
      return nil, err
    end
    for i, c in ipairs(list) do
      candidates[i] = { c.ip, c.port }
    end
  else
    if not dns.is_numeric(target.host) then
      self.name = target.host
    end
    local addrs, err = resolve(target.host)
    if not addrs then
      return nil, err
    end
    for i, a in ipairs(addrs) do
      candidates[i] = { a, target.port }
    end
  end
  -- rcore.new raises on a bad option: a misuse, at our caller's line
  local lasterr
  for _, c in ipairs(candidates) do
    local h = rcore.new(c[1], c[2], copts)
    local ok, err = h:call(self.sentinel and "ROLE" or "PING")
    if ok and self.sentinel and (type(ok) ~= "table" or ok[1] ~= "master")
    then
      ok, err = nil, core.error("unavailable", "redis-sentinel: " .. c[1]
        .. ":" .. c[2] .. " is not a master (ROLE "
        .. tostring(type(ok) == "table" and ok[1] or ok) .. ")",
        { retryable = true })
    elseif not ok and self.sentinel and core.is_error(err) then
      -- the C client's message names no address ("redis: Connection
      -- refused"): say it was the master the Sentinels named, and where
      -- (the kind stays: a refused AUTH is still "config")
      err = core.error(err.kind, "redis-sentinel: the master "
        .. self.master_name .. " at " .. c[1] .. ":" .. c[2] .. ", as the"
        .. " Sentinels name it, did not answer ROLE: " .. err.message,
        { retryable = err.retryable, code = err.code })
    end
    if ok then
      self.h, self.addr, self.port = h, c[1], c[2]
      break
    end
    h:close()
    lasterr = err
  end
  if not self.h then
    for _, sc in pairs(self.sentinel_clients or {}) do
      sc:close()
    end
    return nil, lasterr
  end
  if self.sentinel then
    core.spawn(watch, self)
  end
  return self
end

-- syntax: reply, err = client:call(cmd, ...)
-- returns: the reply (string, number, table, redis.null) or nil, err
-- yields: until the reply
function Client:call(cmd, ...)
  check_self("client:call", self)
  if type(cmd) ~= "string" then
    error("client:call: cmd must be a string", 2)
  end
  local n = select("#", ...)
  if n + 1 > MAXARGS then
    error("client:call: more than " .. MAXARGS .. " arguments", 2)
  end
  for i = 1, n do
    check_arg("client:call", "argument " .. i, (select(i, ...)), 2)
  end
  local kind, block = command_kind({ cmd, ... })
  local why = REFUSED[kind] or REFUSED_IN_CALL[kind]
  if why then
    error("client:call: " .. cmd:upper() .. " " .. why, 2)
  end
  local res, err
  if kind == "blocking" then
    res, err = self.h:call_blocking(block, cmd, ...)
  else
    res, err = self.h:call(cmd, ...)
  end
  if res == nil and needs_refresh(err) then
    refresh(self)
  end
  if res == nil then
    err = outcome(err, not is_read(cmd))
  end
  return res, err
end

-- syntax: replies, err = client:pipeline({ { cmd, ... }, ... })
-- returns: one slot per command, each the reply or an err table (see
--          redis.is_error); nil, err when the connection failed
-- yields: until every reply arrived
function Client:pipeline(cmds)
  check_self("client:pipeline", self)
  if type(cmds) ~= "table" then
    error("client:pipeline: cmds must be an array of commands", 2)
  end
  for i = 1, #cmds do
    local c = cmds[i]
    if type(c) ~= "table" or type(c[1]) ~= "string" then
      error("client:pipeline: cmds[" .. i .. "] must be an array starting"
            .. " with the command name", 2)
    end
    if #c > MAXARGS then
      error("client:pipeline: cmds[" .. i .. "] has more than " .. MAXARGS
            .. " arguments", 2)
    end
    for k = 2, #c do
      check_arg("client:pipeline", "cmds[" .. i .. "][" .. k .. "]", c[k], 2)
    end
    -- a pipeline shares its connection with other coroutines' commands
    local kind, block = command_kind(c)
    local what = "client:pipeline: cmds[" .. i .. "] (" .. c[1]:upper()
                 .. ")"
    local why = REFUSED[kind] or REFUSED_IN_PIPELINE[kind]
    if why then
      error(what .. " " .. why, 2)
    elseif kind == "wait" and block >= self.timeout then
      error(what .. " may wait " .. (block == math.huge and "forever"
            or block .. " s") .. ": in a pipeline it must wait less than"
            .. " timeout (" .. self.timeout .. " s), holding a shared"
            .. " connection", 2)
    end
  end
  local res, err = self.h:pipeline(cmds)
  if res == nil and needs_refresh(err) then
    refresh(self)
    local writes = false
    for i = 1, #cmds do
      writes = writes or not is_read(cmds[i][1])
    end
    err = outcome(err, writes)
  elseif res then
    for i = 1, #cmds do
      if core.is_error(res[i]) and needs_refresh(res[i]) then
        refresh(self)                   -- READONLY: no longer the master
        break
      end
    end
  end
  return res, err
end

-- syntax: fn = client:script(lua_source)
-- returns: a callable fn(keys, args) -> reply | nil, err running the
--          script by EVALSHA; on NOSCRIPT (server restarted, SCRIPT
--          FLUSH) it runs EVAL once, which loads it again
function Client:script(src)
  check_self("client:script", self)
  if type(src) ~= "string" then
    error("client:script: src must be a string", 2)
  end
  return setmetatable({ client = self, src = src,
                        sha = rcore.sha1hex(src) }, Script)
end

local function script_args(keys, args)
  local a = { #keys }
  for i = 1, #keys do
    a[#a + 1] = keys[i]
  end
  for i = 1, #args do
    a[#a + 1] = args[i]
  end
  return a
end

-- syntax: reply, err = fn(keys, args)   (fn from client:script)
-- yields: until the reply
function Script:__call(keys, args)
  keys, args = keys or {}, args or {}
  if type(keys) ~= "table" then
    error("script: keys must be an array", 2)
  end
  if type(args) ~= "table" then
    error("script: args must be an array", 2)
  end
  if #keys + #args + 3 > MAXARGS then
    error("script: more than " .. MAXARGS .. " arguments", 2)
  end
  for i = 1, #keys do
    check_arg("script", "keys[" .. i .. "]", keys[i], 2)
  end
  for i = 1, #args do
    check_arg("script", "args[" .. i .. "]", args[i], 2)
  end
  local a = script_args(keys, args)
  if self.client.closed then
    error("script: client is closed", 2)
  end
  local h = self.client.h
  local res, err = h:call("EVALSHA", self.sha, unpack(a))
  if res == nil and err and err.kind == "noscript" then
    res, err = h:call("EVAL", self.src, unpack(a))
  end
  if res == nil and needs_refresh(err) then
    refresh(self.client)
  end
  if res == nil then
    err = outcome(err, true)            -- a script may write
  end
  return res, err
end

-- syntax: client:close()  -- pending commands fail with kind "closed"
function Client:close()
  if getmetatable(self) ~= Client then
    error("client:close: call it as client:close()", 2)
  end
  self.closed = true
  self.h:close()
  for _, sc in pairs(self.sentinel_clients or {}) do
    sc:close()
  end
end

_M.Client = Client

return _M
