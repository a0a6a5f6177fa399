-- A Redis command whose reply is lost after it was sent may have been
-- applied: the server got it, and a stopped one runs it when it resumes;
-- a master killed after running it may have passed it to the replica
-- Sentinel promotes. Such a write is reported "unknown_outcome" (not
-- retryable: find out before running it again), never "unavailable" or
-- "timeout", which say a retry is safe. A read in the same spot stays
-- "timeout" / "unavailable" (retryable), and so does a command that was
-- never sent. Also: a write to a demoted master (READONLY) is an error
-- and the client moves to the new master.
local core = require "paygate.core"
local redis = require "paygate.redis"
local servers = require "spec.support.servers"
local sentinel = require "spec.support.sentinel"

local wait_for = servers.wait_for

local cli = servers.redis_cli

local function signal(pidfile, sig)
  return servers.sh("kill -" .. sig .. " $(cat " .. pidfile .. ")")
end

describe("a Redis write whose reply was lost", function()
  local srv

  setup(function()
    if servers.redis then
      srv = servers.redis()
    end
  end)

  teardown(function()
    if srv then
      signal(srv.pidfile, "CONT")
      srv.stop()
    end
  end)

  it("is unknown_outcome when no reply came in time, and the server did"
     .. " run it; a read is timeout", function()
    local r = assert(redis.connect(srv.url, { timeout = 0.3, pool = 1 }))
    finally(function() r:close() signal(srv.pidfile, "CONT") end)
    assert.equal("OK", r:call("SET", "n", "0"))
    assert(signal(srv.pidfile, "STOP"))
    local v, err = r:call("INCR", "n")
    assert.is_nil(v)
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.truthy(err.message:find("no reply within 0.3 s", 1, true),
                  err.message)
    assert.truthy(err.message:find("may have been applied", 1, true),
                  err.message)
    -- a read: nothing to find out, a retry is safe
    v, err = r:call("GET", "n")
    assert.is_nil(v)
    assert.equal("timeout", err.kind, tostring(err))
    assert.is_true(err.retryable)
    assert(signal(srv.pidfile, "CONT"))
    -- the server ran the INCR the client was told nothing about
    wait_for(function() return r:call("GET", "n") == "1" end, 10,
             "the INCR to be applied")
  end)

  it("is unknown_outcome when the connection is lost after it was sent,"
     .. " in a call, a pipeline and a script", function()
    local r = assert(redis.connect(srv.url, { timeout = 30, pool = 1 }))
    local killed = false
    finally(function()
      r:close()
      if killed then
        srv.start()
      else
        signal(srv.pidfile, "CONT")
      end
    end)
    assert.equal("PONG", r:call("PING"))
    assert(signal(srv.pidfile, "STOP"))
    local script = r:script("return redis.call('INCR', KEYS[1])")
    local results, started = {}, 0
    local function task(fn)
      return core.spawn(function()
        started = started + 1
        return fn()
      end)
    end
    local tasks = {
      task(function() return r:call("INCR", "n") end),
      task(function()
        return r:pipeline({ { "GET", "n" }, { "INCR", "n" } })
      end),
      task(function() return script({ "n" }, {}) end),
      task(function() return r:call("GET", "n") end),
      task(function()
        return r:pipeline({ { "GET", "n" }, { "TTL", "n" } })
      end),
    }
    -- all five handed to the one connection, then the server dies
    -- without answering (whether they were written or still buffered,
    -- the client cannot tell which the server read)
    wait_for(function() return started == 5 end, 5, "the callers")
    assert(servers.sh("kill -9 $(cat " .. srv.pidfile .. ")"))
    killed = true
    for i, t in ipairs(tasks) do
      local v, err = t:wait()
      assert.is_nil(v)
      results[i] = err
    end
    for i = 1, 3 do
      assert.equal("unknown_outcome", results[i].kind, tostring(results[i]))
      assert.is_false(results[i].retryable)
    end
    for i = 4, 5 do
      assert.equal("unavailable", results[i].kind, tostring(results[i]))
      assert.is_true(results[i].retryable)
    end
    srv.start()
    killed = false
    -- the server is back: the client reconnects (within its backoff)
    wait_for(function() return r:call("PING") == "PONG" end, 10,
             "the client to reconnect")
  end)

  it("a command never sent stays unavailable (retryable)", function()
    local r = assert(redis.connect(srv.url, { pool = 1 }))
    finally(function() r:close() end)
    srv.stop()
    -- (a read first: the client learns that its connection is gone)
    local v, err = r:call("GET", "n")
    assert.is_nil(v)
    assert.is_true(err.retryable)
    v, err = r:call("INCR", "n")
    assert.is_nil(v)
    assert.equal("unavailable", err.kind, tostring(err))
    assert.is_true(err.retryable)
    srv.start()
  end)
end)

describe("Redis through Sentinel, a command in flight at the failover",
         function()
  local g

  setup(function()
    if sentinel.available() then
      g = sentinel.start()
    end
  end)

  teardown(function()
    if g then
      signal(g.master.pidfile, "CONT")
      g.cleanup()
    end
  end)

  it("a write sent to the master that froze is unknown_outcome, and it"
     .. " does run there when the old master resumes", function()
    if not g then
      pending("redis-sentinel not installed")
      return
    end
    local old, new = g.master, g.replica
    local r = assert(redis.connect(g.url, { sentinel_poll = 0.2,
                                            timeout = 30 }))
    finally(function() r:close() signal(old.pidfile, "CONT") end)
    assert.equal(old.port, r.port)
    assert.equal("OK", r:call("SET", "inflight", "0"))
    wait_for(function()
      return cli(new.port, "GET inflight"):match("^0")
    end, 10, "the replica to have the key")
    assert(signal(old.pidfile, "STOP"))
    local t0 = core.mono()
    local v, err = r:call("INCR", "inflight")
    local took = core.mono() - t0
    assert.is_nil(v)
    -- the client moved (not the 30 s reply timeout): the old master's
    -- connections were closed under the INCR
    assert.equal(new.port, r.port)
    assert.is_true(took < 20, "the INCR failed after " .. took .. " s")
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.equal(1, r:call("INCR", "inflight"))
    -- the old master resumes: it reads the INCR the client gave up on
    -- and runs it (it still thinks it is the master), until the Sentinels
    -- make it a replica of the new one
    assert(signal(old.pidfile, "CONT"))
    wait_for(function()
      return cli(old.port, "ROLE"):match("^slave") ~= nil
    end, 30, "the old master to be made a replica")
    wait_for(function()
      return cli(old.port, "GET inflight"):match("^1") ~= nil
    end, 30, "the old master to resync")
  end)

  it("a write on a connection to a demoted master is READONLY, never OK;"
     .. " the client moves to the new master", function()
    if not g then
      pending("redis-sentinel not installed")
      return
    end
    g.wait_replica_ok(60)
    local mport = g.master_port()
    -- subscribed on a stopped server first (no +switch-master reaches
    -- the client), and a poll too slow to matter: only the READONLY
    -- answer can make it look again
    local pub = g.server()
    finally(function() signal(pub.pidfile, "CONT") pub.stop() end)
    assert(signal(pub.pidfile, "STOP"))
    local url = g.url:gsub("^redis%-sentinel://", "redis-sentinel://"
                           .. "127.0.0.1:" .. pub.port .. ",")
    local r = assert(redis.connect(url, { sentinel_poll = 120,
                                          timeout = 1 }))
    finally(function() r:close() end)
    assert.equal(mport, r.port)
    assert.equal("OK", r:call("SET", "demoted", "before"))
    local out
    wait_for(function()
      out = cli(g.sentinels[1].port, "SENTINEL failover mymaster")
      if not out:match("^INPROG") and not out:match("^NOGOODSLAVE") then
        return true
      end
      core.sleep(0.2)
    end, 60, "Sentinel 1 to accept a failover")
    assert.truthy(out:match("OK"), out)
    wait_for(function()
      return cli(mport, "ROLE"):match("^slave") ~= nil
    end, 30, "the old master to be demoted")
    -- Sentinel 1 (which ran the failover, and reconfigured the old master
    -- with CLIENT KILL, closing the client's connections) sees it as a
    -- replica now
    g.wait_replica_ok(60)
    assert.equal(mport, r.port)             -- nobody told the client
    -- READONLY; or, when a reconfiguration of the old master closed the
    -- connection under it, unknown_outcome. Never OK.
    local v, err = r:call("SET", "demoted", "after")
    assert.is_nil(v)
    if err.code == "READONLY" then
      assert.equal("unavailable", err.kind, tostring(err))
      assert.is_true(err.retryable)         -- never applied
    else
      assert.equal("unknown_outcome", err.kind, tostring(err))
    end
    wait_for(function() return r.port ~= mport end, 10,
             "the client to move to the new master")
    assert.equal(g.master_port(), r.port)
    assert.equal("OK", r:call("SET", "demoted", "after"))
    -- a plain client on the demoted server: its writes are refused
    -- READONLY, never answered OK
    local d = assert(redis.connect("redis://127.0.0.1:" .. mport,
                                   { timeout = 1 }))
    finally(function() d:close() end)
    local seen = wait_for(function()
      local dv, derr = d:call("SET", "demoted", "direct")
      assert.is_nil(dv, "a write to the demoted master answered OK")
      return derr.code == "READONLY" and derr
    end, 10, "a READONLY answer")
    assert.equal("unavailable", seen.kind, tostring(seen))
    assert.is_true(seen.retryable)
    assert.equal("after", r:call("GET", "demoted"))
  end)
end)
