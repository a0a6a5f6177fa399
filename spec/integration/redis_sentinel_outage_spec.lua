-- Redis through Sentinel when what the Sentinels point at does not
-- answer: a named master that is down is checked with a backoff (its
-- connects counted by a listener that accepts and closes), a connect
-- whose named master refuses says which server it was, a Sentinel that
-- holds the subscription unanswered is left for the next, and with every
-- Sentinel down (killed, or stopped) commands still fail at once; the
-- client recovers by itself once a master answers again.
-- A question to the Sentinels that a +switch-master overtook is not
-- acted on (its answers name the old master, still up).
local core = require "paygate.core"
local redis = require "paygate.redis"
local servers = require "spec.support.servers"
local sentinel = require "spec.support.sentinel"
local proc = require "spec.support.proc"

local wait_for = servers.wait_for

-- The lines of a file (missing: none).
local function lines(path)
  local out = {}
  for line in (proc.read(path) or ""):gmatch("[^\n]+") do
    out[#out + 1] = line
  end
  return out
end

-- A listener on port that closes every connection it accepts (a server
-- that is down, but whose connects can be counted). returns: its proc
-- and a function counting the accepts so far.
local function closing_listener(port)
  local log = os.tmpname()
  local p = proc.spawn({ "python3", "spec/support/closing_listener.py",
                         tostring(port), log }, { watchdog = true })
  wait_for(function() return lines(log)[1] == "ready" end, 10,
           "the closing listener")
  return p, function() return #lines(log) - 1 end, log
end

-- A Sentinel that answers SENTINEL MASTER with ip:port at epoch, on a
-- free port none of taken's (spec/support/fake_sentinel.py: it ends by
-- itself within 120 s). A port another process took between its pick and
-- the bind (the script then exits unready) is picked again, three times
-- at most. returns: a function stopping it, and its port.
local function fake_sentinel(taken, mport, epoch)
  local function bulk(v)
    return "$" .. #v .. "\r\n" .. v .. "\r\n"
  end
  local answer = "*6\r\n" .. bulk("ip") .. bulk("127.0.0.1") .. bulk("port")
    .. bulk(tostring(mport)) .. bulk("config-epoch") .. bulk(tostring(epoch))
  for try = 1, 3 do
    local port = sentinel.free_port_except(taken)
    local log = os.tmpname()
    local p = proc.spawn({ "python3", "spec/support/fake_sentinel.py",
                           tostring(port), answer, log }, { watchdog = true })
    wait_for(function()
      return (proc.read(log) or ""):find("ready", 1, true)
             or (try < 3 and p:poll() ~= nil)
    end, 10, "the fake Sentinel")
    if (proc.read(log) or ""):find("ready", 1, true) then
      return function() p:kill() os.remove(log) end, port
    end
    os.remove(log)
  end
end

-- A Sentinel steered by files (spec/support/scripted_sentinel.py): it
-- answers SENTINEL MASTER with the port and epoch written last, after a
-- delay, and publishes a +switch-master when asked to. returns: an
-- object with answer(delay, mport, epoch), publish(payload), asks()
-- (SENTINEL MASTER questions so far) and stop().
local function scripted_sentinel(port, delay, mport, epoch)
  local dir = servers.mktemp()
  local s = {}
  local function put(name, text)
    local f = assert(io.open(dir .. "/" .. name .. ".tmp", "w"))
    f:write(text)
    f:close()
    assert(os.rename(dir .. "/" .. name .. ".tmp", dir .. "/" .. name))
  end
  function s.answer(d, p, e)
    put("answer", d .. " " .. p .. " " .. e)
  end
  function s.publish(payload)
    put("publish", payload)
  end
  function s.asks()
    return #lines(dir .. "/log") - 1
  end
  s.answer(delay, mport, epoch)
  local p = proc.spawn({ "python3", "spec/support/scripted_sentinel.py",
                         tostring(port), dir }, { watchdog = true })
  wait_for(function() return lines(dir .. "/log")[1] == "ready" end, 10,
           "the scripted Sentinel")
  function s.stop()
    p:kill()
    servers.sh("rm -rf " .. dir)
  end
  return s
end

-- GETs on r for secs, every one failing (the server is gone): each fails
-- "unavailable" (retryable) at once -- within 0.5 s, room for a loaded
-- machine
local function fails_fast(r, secs)
  local t0 = core.mono()
  local worst, last = 0, nil
  while core.mono() - t0 < secs do
    local t = core.mono()
    local v, err = r:call("GET", "k")
    worst = math.max(worst, core.mono() - t)
    assert.is_nil(v)
    last = err
    core.sleep(0.01)
  end
  assert.is_true(worst < 0.5, "a command took " .. worst .. " s to fail")
  assert.equal("unavailable", last.kind)
  assert.is_true(last.retryable)
end

describe("Redis through Sentinel, when the named server does not answer",
         function()
  teardown(function()
    servers.stop_all()
  end)

  it("a named master that is down is asked for its ROLE with a growing"
     .. " wait, not at every poll; once it answers the client moves",
     function()
    if not servers.redis then
      pending("redis-server not installed")
      return
    end
    local m = servers.redis()
    -- the server the newest epoch names: down for now (a listener that
    -- closes every connection: its accepts are the client's checks)
    local n = servers.redis()
    n.stop()
    local lp, accepts = closing_listener(n.port)
    -- one Sentinel names the master (epoch 1), the other the down
    -- server at a newer epoch: ranked first, asked first
    local taken = { [m.port] = true, [n.port] = true }
    local stop1, s1 = fake_sentinel(taken, m.port, 1)
    local stop2, s2 = fake_sentinel(taken, n.port, 2)
    finally(function() stop1() stop2() lp:kill() end)
    local url = "redis-sentinel://127.0.0.1:" .. s1 .. ",127.0.0.1:" .. s2
      .. "/mymaster"
    -- a fast poll: every 0.05 s the Sentinels are asked, and they name
    -- the down server first (epoch 2)
    local r = assert(redis.connect(url, { sentinel_poll = 0.05,
                                          timeout = 1 }))
    assert.equal(m.port, r.port)
    wait_for(function() return accepts() >= 3 end, 10,
             "the client to check the named server")
    -- over 3 s: at a poll's pace that was about 60 checks (and one log
    -- line each); with the wait doubling to 2 s, a handful
    local base, t0 = accepts(), core.mono()
    local calls = 0
    while core.mono() - t0 < 3 do
      assert.equal("OK", r:call("SET", "k", "v"))
      calls = calls + 1
      core.sleep(0.01)
    end
    local checks = accepts() - base
    assert.is_true(checks <= 8, checks .. " ROLE checks in 3 s")
    assert.equal(m.port, r.port)
    -- the server comes up as a master: found within the longest wait
    lp:kill()
    assert(lp:wait(10), "the listener did not end")
    n.start()
    -- (within the longest wait, 2 s, and a poll; 5 s for a loaded machine)
    wait_for(function() return r.port == n.port end, 5,
             "the client to move to the named server")
    assert.equal("OK", r:call("SET", "k", "there"))
    -- its failures are forgotten
    assert.is_nil(r.role_waits["127.0.0.1:" .. n.port])
    r:close()
  end)

  it("a connect whose named master refuses says which server, and"
     .. " works once it answers", function()
    if not servers.redis then
      pending("redis-server not installed")
      return
    end
    local m = servers.redis()
    m.stop()
    local stop, sp = fake_sentinel({ [m.port] = true }, m.port, 1)
    finally(stop)
    local url = "redis-sentinel://127.0.0.1:" .. sp .. "/mymaster"
    local t0 = core.mono()
    local c, err = redis.connect(url)
    assert.is_nil(c)
    assert.is_true(core.mono() - t0 < 1)
    assert.equal("unavailable", err.kind)
    assert.is_true(err.retryable)
    -- was "redis: Connection refused", naming nothing
    assert.truthy(tostring(err):find("the master mymaster at 127.0.0.1:"
                                     .. m.port, 1, true), tostring(err))
    m.start()
    local r = assert(redis.connect(url))
    assert.equal(m.port, r.port)
    -- down again under a connected client: commands fail at once, and
    -- it is used again once it is back
    m.stop()
    local v, cerr = r:call("GET", "k")
    assert.is_nil(v)
    assert.equal("unavailable", cerr.kind)
    m.start()
    wait_for(function() return r:call("SET", "k", "1") == "OK" end, 5,
             "the client to use the master again")
    r:close()
  end)

  it("a question to the Sentinels that was under way when the client"
     .. " followed a +switch-master does not move it back to the old"
     .. " master", function()
    if not servers.redis then
      pending("redis-server not installed")
      return
    end
    -- the old master stays up and says ROLE master (a switchover: the
    -- Sentinels demote it seconds after they announced the new one)
    local old, new = servers.redis(), servers.redis()
    local taken = { [old.port] = true, [new.port] = true }
    local pa = sentinel.free_port_except(taken)
    local pb = sentinel.free_port_except(taken)
    local a = scripted_sentinel(pa, 0, old.port, 1)
    local b = scripted_sentinel(pb, 0, old.port, 1)
    finally(function() a.stop() b.stop() end)
    -- a slow poll: only the subscription (on a, the first) and the
    -- question after a failed command move the client
    local r = assert(redis.connect("redis-sentinel://127.0.0.1:" .. pa
      .. ",127.0.0.1:" .. pb .. "/mymaster", { sentinel_poll = 30,
                                               timeout = 1 }))
    finally(function() r:close() end)
    assert.equal(old.port, r.port)
    -- connect's question, and the one once a confirmed the subscription
    wait_for(function() return a.asks() >= 2 and b.asks() >= 2 end, 10,
             "the question after the subscription")
    -- b now answers 1 s late (a Sentinel on a loaded or cut-off host);
    -- a failed command (OOM: "unavailable") sets off a question
    b.answer(1, old.port, 1)
    assert.truthy(servers.redis_cli(old.port, "CONFIG SET maxmemory 1")
                  :match("OK"))
    local v, err = r:call("SET", "k", "v")
    assert.is_nil(v)
    assert.equal("OOM", err.code)
    wait_for(function() return b.asks() >= 3 end, 10,
             "the question to reach the slow Sentinel")
    -- meanwhile: the failover, announced on the subscription
    a.answer(0, new.port, 2)
    a.publish("mymaster 127.0.0.1 " .. old.port .. " 127.0.0.1 "
              .. new.port)
    wait_for(function() return r.port == new.port end, 10,
             "the client to follow +switch-master")
    -- the question under way ends with what the Sentinels said before
    -- the failover (the old master, epoch 1): the client stays
    wait_for(function() return not r.refreshing end, 10,
             "the question under way to end")
    assert.equal(new.port, r.port)
    assert.equal("OK", r:call("SET", "k", "v"))
    assert.truthy(servers.redis_cli(new.port, "GET k"):match("^v"))
  end)
end)

describe("Redis through Sentinel, with every Sentinel down", function()
  local g

  setup(function()
    if sentinel.available() then
      g = sentinel.start()
    end
  end)

  teardown(function()
    if g then
      for _, s in ipairs(g.sentinels) do
        servers.sh("kill -CONT $(cat " .. s.pidfile .. ") 2>/dev/null")
      end
      g.cleanup()
    end
  end)

  -- The daemon of the master client r is on, once Sentinel 1 names it
  -- too (after a failover, Sentinel 1 may learn of it after the others,
  -- from which the client may have it)
  local function current_master(r)
    wait_for(function() return g.master_port() == r.port end, 30,
             "Sentinel 1 to name the client's master")
    return g.master.port == r.port and g.master or g.replica
  end

  -- The ids of Sentinel 1's clients in subscribe mode.
  local function subscribers()
    local ids = {}
    local out = servers.read_cmd("redis-cli -h 127.0.0.1 -p "
      .. g.sentinels[1].port .. " CLIENT LIST 2>&1")
    for id in out:gmatch("id=(%d+)[^\n]*cmd=subscribe") do
      ids[id] = true
    end
    return ids
  end

  it("a Sentinel that holds the SUBSCRIBE unanswered is left for the"
     .. " next one after a poll", function()
    if not g then
      pending("redis-sentinel not installed")
      return
    end
    -- first in the list: a server that is stopped (its connections are
    -- accepted by the kernel, never answered), as a Sentinel whose
    -- packets a partition drops would be
    local hung = g.server()
    finally(function()
      servers.sh("kill -CONT $(cat " .. hung.pidfile .. ")")
      hung.stop()
    end)
    assert(servers.sh("kill -STOP $(cat " .. hung.pidfile .. ")"))
    local url = g.url:gsub("^redis%-sentinel://", "redis-sentinel://"
                           .. "127.0.0.1:" .. hung.port .. ",")
    local before = subscribers()
    local r = assert(redis.connect(url, { sentinel_poll = 0.5 }))
    -- it subscribed there (the first), and stayed: hearing no
    -- +switch-master while three Sentinels were fine
    wait_for(function()
      for id in pairs(subscribers()) do
        if not before[id] then
          return true
        end
      end
    end, 10, "the client to subscribe on the next Sentinel")
    r:close()
  end)

  it("every Sentinel down: commands fail unavailable at once, and the"
     .. " client follows the failover once they are back", function()
    if not g then
      pending("redis-sentinel not installed")
      return
    end
    local r = assert(redis.connect(g.url, { sentinel_poll = 0.2,
                                            timeout = 1 }))
    local m = current_master(r)
    for _, s in ipairs(g.sentinels) do
      s.kill()
    end
    -- the master still answers: nothing is lost by the Sentinels' absence
    assert.equal("OK", r:call("SET", "k", "no sentinels"))
    m.kill()
    fails_fast(r, 2)                    -- refused at once, these
    for _, s in ipairs(g.sentinels) do
      s.start()
    end
    -- back: they fail the dead master over, and the client follows
    wait_for(function() return r.port ~= m.port end, 60,
             "the client to follow the failover")
    current_master(r)                   -- where the Sentinels say
    assert.equal("OK", r:call("SET", "k", "after"))
    m.start()                           -- back, as a replica
    r:close()
  end)

  -- Last: stopped Sentinels enter TILT mode when they resume (their
  -- clock jumped), and fail nothing over for 30 s.
  it("every Sentinel stopped: commands fail unavailable at once, not"
     .. " after a Sentinel round; a master that is back is used again",
     function()
    if not g then
      pending("redis-sentinel not installed")
      return
    end
    local r = assert(redis.connect(g.url, { sentinel_poll = 0.2,
                                            timeout = 1 }))
    local m = current_master(r)
    -- stopped: their connections are accepted (by the kernel) and never
    -- answered, as when a partition drops their packets
    for _, s in ipairs(g.sentinels) do
      assert(servers.sh("kill -STOP $(cat " .. s.pidfile .. ")"))
    end
    m.kill()
    -- (the command that set off a question to the Sentinels waited for
    -- their round: about 1 s, their reply timeout, each time)
    fails_fast(r, 4)
    for _, s in ipairs(g.sentinels) do
      assert(servers.sh("kill -CONT $(cat " .. s.pidfile .. ")"))
    end
    m.start()
    -- (started as configured: a replica, if it was the first replica)
    servers.read_cmd("redis-cli -p " .. m.port .. " REPLICAOF NO ONE")
    wait_for(function() return r:call("SET", "k", "back") == "OK" end, 10,
             "the client to use the master again")
    assert.equal(m.port, r.port)
    r:close()
  end)
end)
