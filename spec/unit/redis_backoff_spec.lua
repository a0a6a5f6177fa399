-- paygate.redis while its server is down: after a connect attempt fails,
-- commands fail at once ("unavailable", saying it backs off and why the
-- last attempt failed) without a connect of their own, for a window that
-- grows; a server that is back is used again within the cap, and a new
-- address (a Sentinel failover) is used at once.
local core = require "paygate.core"
local redis = require "paygate.redis"
local rcore = require "paygate.redis.core"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"
local slow_http = require "spec.support.slow_http"
local rawtcp = require "spec.support.rawtcp"

-- a listener on a free port that closes every connection it accepts;
-- returns its proc, its port and a function counting the accepts
local function closing_listener(dir)
  local port = servers.free_port()
  local log = dir .. "/closing" .. port .. ".log"
  local p = proc.spawn({ "python3", "spec/support/closing_listener.py",
                         tostring(port), log }, { watchdog = true })
  proc.wait_until(function() return slow_http.lines(log)[1] == "ready" end,
                  10, "the closing listener")
  return p, port, function() return #slow_http.lines(log) - 1 end
end

-- a listener on a free port whose accept queue is full (closer.lua
-- holds it, never accepting; one connection fills backlog 0): a connect
-- to it gets no SYN-ACK. Returns its port and the connection to close.
local function unanswered_port(dir)
  local port = servers.free_port()
  local log = dir .. "/hold" .. port .. ".log"
  proc.spawn({ PAYGATE_BIN, "exec", "spec/support/closer.lua", tostring(port),
               "60", "hold" }, { log = log, watchdog = true })
  proc.wait_until(function() return proc.read(log):find("listening") end,
                  10, "the holding listener")
  return port, assert(rawtcp.connect(port, 1))
end

local function backing_off(err)
  return err.message:find("not connected: next attempt in", 1, true) ~= nil
end

-- a command on r, failing: how long its message says the client waits
-- before its next attempt (0 when it did not fail fast)
local function next_attempt_in(r)
  local v, err = r:call("GET", "k")
  assert.is_nil(v)
  assert.equal("unavailable", err.kind)
  return tonumber(err.message:match("next attempt in ([%d.]+) s")) or 0
end

describe("paygate.redis reconnect backoff", function()
  local dir

  setup(function()
    dir = servers.mktemp()
  end)

  teardown(function()
    proc.stop_all()
    servers.stop_all()
    servers.sh("rm -rf " .. dir)
  end)

  it("a burst of commands against a server that closes every connection"
     .. " makes a few connects, not one each", function()
    local listener, port, accepts = closing_listener(dir)
    local h = rcore.new("127.0.0.1", port, { pool = 2 })
    local fast = 0
    for i = 1, 50 do
      local v, err = h:call("PING")
      assert.is_nil(v, "command " .. i)
      assert.equal("unavailable", err.kind)
      assert.is_true(err.retryable)
      if backing_off(err) then
        fast = fast + 1
        assert.truthy(err.message:find("(last attempt: 127.0.0.1:" .. port
                                       .. ": ", 1, true), err.message)
      end
    end
    -- the first attempt is made (and fails), the rest mostly fail fast:
    -- only a window passing allows another attempt
    assert.truthy(accepts() >= 1)
    assert.truthy(accepts() <= 5, accepts() .. " connects for 50 commands")
    assert.truthy(fast >= 45, fast .. " commands failed fast")

    -- a real Redis on that port now: commands succeed again, within the
    -- backoff's cap
    listener:stop()
    local pick = servers.pick_port
    servers.pick_port = function() return port end
    local ok, srv = pcall(servers.redis)
    servers.pick_port = pick
    assert(ok, srv)
    assert.equal(port, srv.port)
    servers.wait_for(function() return h:call("PING") == "PONG" end, 10,
                     "the client to use the server on the port")
    h:close()
  end)

  it("a stopped server that starts again is used again, and a success"
     .. " ends the backoff", function()
    local srv = servers.redis()
    local r = assert(redis.connect(srv.url, { pool = 2 }))
    assert(r:call("SET", "k", "v"))
    srv.stop()
    local fast = 0
    for _ = 1, 30 do
      local v, err = r:call("GET", "k")
      assert.is_nil(v)
      assert.equal("unavailable", err.kind)
      assert.is_true(err.retryable)
      if backing_off(err) then
        fast = fast + 1
      end
    end
    assert.truthy(fast >= 25, fast .. " commands failed fast")
    -- failed attempts lengthen the wait (the first one is 0.1 s at most)
    servers.wait_for(function() return next_attempt_in(r) > 0.3 end, 10,
                     "the wait to grow past 0.3 s")
    srv.start()
    servers.wait_for(function() return r:call("PING") == "PONG" end, 10,
                     "the client to reconnect")
    -- the success ended the backoff: a failure now starts it afresh (the
    -- first command may still find the old connection, then the next one
    -- tries to connect)
    -- Commands back to back, no pause between them: a pause longer than
    -- the first window (0.05-0.1 s, on a loaded machine) would let a
    -- second attempt fail and double it
    srv.stop()
    local wait, deadline = 0, core.mono() + 10
    repeat
      wait = next_attempt_in(r)
    until wait > 0 or core.mono() > deadline
    assert.truthy(wait > 0, "no command failed fast")
    assert.truthy(wait <= 0.1, "next attempt in " .. wait .. " s")
    r:close()
  end)

  it("a connect that times out says so, not \"no reply\"", function()
    local port, held = unanswered_port(dir)
    local addr = "127.0.0.1:" .. port
    local want = "redis: connect to " .. addr .. " timed out after 0.3 s"
    local h = rcore.new("127.0.0.1", port, { pool = 1, timeout = 5,
                                             connect_timeout = 0.3 })
    local t0 = core.mono()
    local v, err = h:call("PING")
    local took = core.mono() - t0
    assert.is_nil(v)
    assert.equal(want, err.message)
    -- never sent: unavailable, as a refused connect
    assert.equal("unavailable", err.kind)
    assert.is_true(err.retryable)
    assert.truthy(took < 2, "took " .. took .. " s, not connect_timeout")
    -- the commands that fail fast meanwhile give the same reason
    v, err = h:call("PING")
    assert.is_nil(v)
    assert.is_true(backing_off(err), err.message)
    assert.truthy(err.message:find("(last attempt: " .. addr .. ": connect"
                                   .. " timed out after 0.3 s)", 1, true),
                  err.message)
    -- a blocking command's own connection: connect_timeout too, not its
    -- block time plus timeout (set_addr ends the backoff)
    h:set_addr("127.0.0.1", port)
    v, err = h:call_blocking(10, "BLPOP", "q", 10)
    assert.is_nil(v)
    assert.equal("unavailable", err.kind)
    assert.equal(want, err.message)
    h:close()
    -- and redis.connect
    local r
    r, err = redis.connect("redis://" .. addr, { connect_timeout = 0.3 })
    assert.is_nil(r)
    assert.equal("unavailable", err.kind)
    assert.equal(want, err.message)
    held:close()
  end)

  it("a new address is used at once, whatever the old one's backoff",
     function()
    local srv = servers.redis()
    local dead = servers.free_port()
    local h = rcore.new("127.0.0.1", dead, { pool = 1 })
    local v, err = h:call("PING")
    assert.is_nil(v)
    assert.equal("unavailable", err.kind)
    v, err = h:call("PING")
    assert.is_nil(v)
    assert.is_true(backing_off(err), err.message)
    -- what a Sentinel failover does: the new master is tried now
    h:set_addr("127.0.0.1", srv.port)
    assert.equal("PONG", h:call("PING"))
    h:close()
  end)
end)
