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
-- (transport), or for error replies syntax, constraint (WRONGTYPE), busy,
-- noscript, error; err.code holds Redis's error word. Misuse (a wrong
-- argument type, a closed client, a call outside a coroutine) raises.

local core = require "paygate.core"
local rcore = require "paygate.redis.core"

local _M = { _VERSION = "0.1.0" }

_M.null = core.null                     -- the nil reply (== cjson.null)

local MAXARGS = 1024                    -- per command, the command included

-- Options whose value in a URL stays a string (the others: tonumber).
local STRING_OPTS = { password = true }

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

local function parse_url(url)
  if url:match("^rediss://") then
    -- never fall back to plain text when TLS was asked for
    error("redis.connect: rediss:// (TLS) is not supported (hiredis 0.14 "
          .. "has no TLS): reach Redis over loopback or a TLS tunnel "
          .. "with redis://", 3)
  end
  local rest = url:match("^redis://(.*)$")
  if not rest then
    error("redis.connect: url must start with redis://", 3)
  end
  local opts = {}
  local main, qs = rest:match("^([^?]*)%??(.*)$")
  for k, v in qs:gmatch("([^&=]+)=([^&]*)") do
    opts[k] = STRING_OPTS[k] and v or tonumber(v) or v
  end
  local auth, hostpart = main:match("^(.*)@(.*)$")
  if not auth then
    hostpart = main
  else
    opts.password = opts.password or auth:match("^[^:]*:(.*)$") or auth
  end
  local hostport, db = hostpart:match("^([^/]*)/?(%d*)$")
  if not hostport then
    error("redis.connect: url must be redis://[password@]host[:port][/db]"
          .. " with a numeric db", 3)
  end
  local host, port = hostport:match("^(.*):(%d+)$")
  if not host then
    host, port = hostport, 6379
  end
  if host == "" or host == "localhost" then
    host = "127.0.0.1"          -- avoid a resolver lookup on the loop
  end
  if db ~= "" and opts.db == nil then
    opts.db = tonumber(db)
  end
  return host, tonumber(port), opts
end

-- syntax: client, err = redis.connect(url [, opts])
-- opts: pool (connections, default 2), timeout (s without a reply,
--       default 5), connect_timeout (s, default 2), password, db
-- returns: a client after one PING answered, or nil, err
-- yields: until the PING answers
function _M.connect(url, opts)
  if type(url) ~= "string" then
    error("redis.connect: url must be a string", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("redis.connect: opts must be a table", 2)
  end
  local host, port, o = parse_url(url)
  for k, v in pairs(opts or {}) do
    o[k] = v
  end
  local h = rcore.new(host, port, o)
  local ok, err = h:call("PING")
  if not ok then
    h:close()
    return nil, err
  end
  return setmetatable({ h = h, host = host, port = port }, Client)
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
  return self.h:call(cmd, ...)
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
  end
  return self.h:pipeline(cmds)
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
  return res, err
end

-- syntax: client:close()  -- pending commands fail with kind "closed"
function Client:close()
  if getmetatable(self) ~= Client then
    error("client:close: call it as client:close()", 2)
  end
  self.closed = true
  self.h:close()
end

_M.Client = Client

return _M
