-- paygate.redis: Redis on the loop (hiredis async + libevent).
--
--   local redis = require "paygate.redis"
--   local r = assert(redis.connect("redis://127.0.0.1:6379/0?pool=2&timeout=2"))
--   r:call("SET", "k", "v")                  --> "OK"
--   r:call("GET", "nope")                    --> redis.null
--   r:pipeline({ { "INCR", "n" }, { "GET", "n" } })  --> { 1, "1" }
--   local incr = r:script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
--   incr({ "n" }, { 5 })                     --> 6  (EVALSHA, NOSCRIPT -> EVAL)
--
-- Failures return nil, err; err.kind is one of unavailable, timeout,
-- closed (transport), or for error replies syntax, constraint (WRONGTYPE),
-- busy, noscript, error — err.code holds Redis's error word.

local core = require "paygate.redis.core"

local _M = { _VERSION = "0.1.0" }

_M.null = core.null                     -- the nil reply (== cjson.null)

local Client = {}
Client.__index = Client

local Script = {}
Script.__index = Script

local unpack = unpack or table.unpack

-- syntax: ok = redis.is_error(v)   -- a pipeline slot that failed
function _M.is_error(v)
  return type(v) == "table" and type(v.kind) == "string"
    and type(v.message) == "string"
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
    opts[k] = tonumber(v) or v
  end
  local auth, hostpart = main:match("^(.*)@(.*)$")
  if not auth then
    hostpart = main
  else
    opts.password = opts.password or auth:match("^[^:]*:(.*)$") or auth
  end
  local hostport, db = hostpart:match("^([^/]*)/?(%d*)$")
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
  local host, port, o = parse_url(url)
  for k, v in pairs(opts or {}) do
    o[k] = v
  end
  local h = core.new(host, port, o)
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
function Client:call(...)
  return self.h:call(...)
end

-- syntax: replies, err = client:pipeline({ { cmd, ... }, ... })
-- returns: one slot per command, each the reply or an err table (see
--          redis.is_error); nil, err when the connection failed
-- yields: until every reply arrived
function Client:pipeline(cmds)
  return self.h:pipeline(cmds)
end

-- syntax: fn = client:script(lua_source)
-- returns: a callable fn(keys, args) -> reply | nil, err running the
--          script by EVALSHA; on NOSCRIPT (server restarted, SCRIPT
--          FLUSH) it runs EVAL once, which loads it again
function Client:script(src)
  if type(src) ~= "string" then
    error("client:script: source must be a string", 2)
  end
  return setmetatable({ client = self, src = src, sha = core.sha1hex(src) },
                      Script)
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

function Script:__call(keys, args)
  keys, args = keys or {}, args or {}
  local a = script_args(keys, args)
  local h = self.client.h
  local res, err = h:call("EVALSHA", self.sha, unpack(a))
  if res == nil and err and err.kind == "noscript" then
    res, err = h:call("EVAL", self.src, unpack(a))
  end
  return res, err
end

-- syntax: client:close()  -- pending commands fail with kind "closed"
function Client:close()
  self.h:close()
end

_M.Client = Client

return _M
