-- paygate.lease on Redis, and paygate.redis's error kinds: what a review
-- found (each case failed before its fix).
--   * the expiry a client believes is judged from before the script ran
--     (PX counts from there), not from a reply a WAIT delayed;
--   * renew and release match token AND owner: a Redis that lost writes
--     restarts its counter, and another owner can then hold the same token;
--   * a client used for leases can still be collected;
--   * BUSYGROUP / BUSYKEY are not the retryable BUSY.
local core = require "paygate.core"
local redis = require "paygate.redis"
local lease = require "paygate.lease"
local servers = require "spec.support.servers"

teardown(function() servers.stop_all() end)

local function pid(srv)
  local f = assert(io.open(srv.pidfile))
  local p = f:read("*l")
  f:close()
  return p
end

describe("a Redis lease with lease_replicas and a slow replica", function()
  local m, r, c, c2
  setup(function()
    m = servers.redis()
    r = servers.redis()
    servers.sh("redis-cli -p " .. r.port .. " REPLICAOF 127.0.0.1 " .. m.port
               .. " >/dev/null")
    servers.wait_for(function()
      return servers.read_cmd("redis-cli -p " .. r.port .. " INFO replication")
             :find("master_link_status:up", 1, true) ~= nil
    end, 10, "the replica")
    c = assert(redis.connect(m.url, { lease_replicas = 1, lease_wait = 3 }))
    c2 = assert(redis.connect(m.url))
  end)
  teardown(function()
    servers.sh("kill -CONT " .. pid(r) .. " 2>/dev/null")
  end)

  -- the replica paused for 0.6 s: the grant's WAIT answers that late
  local function pause_replica()
    servers.sh("kill -STOP " .. pid(r))
    servers.sh("(sleep 0.6; kill -CONT " .. pid(r) .. ") >/dev/null 2>&1 &")
  end

  it("l.expires_at is not past the server's expiry", function()
    pause_replica()
    local l = assert(lease.acquire(c, "a", 1))
    local pttl = assert(c2:call("PTTL", "paygate:lease:a")) / 1000
    local believed = l.expires_at - core.time()
    assert.is_true(believed <= pttl + 0.05, string.format(
      "the client believes %.3f s are left, the server has %.3f s",
      believed, pttl))
  end)

  it("lease.run keeps the lease through a slow grant (no second holder)",
     function()
    pause_replica()
    local t0 = core.mono()
    local second, lost
    assert(lease.run(c, "b", function(h)
      core.sleep(t0 + 1.15 - core.mono())     -- past a ttl from the reply
      second = lease.acquire(c2, "b", 1)
      lost = h.lost
      return true
    end, { ttl = 1 }))
    assert.is_nil(second and ("a second holder got token " .. second.token))
    assert.is_false(lost)
  end)
end)

describe("a Redis lease after the server lost its writes", function()
  it("an old lease object neither renews nor releases another owner's"
     .. " lease with the same token", function()
    local srv = servers.redis()
    local a = assert(redis.connect(srv.url))
    local b = assert(redis.connect(srv.url))
    local la = assert(lease.acquire(a, "settle", 10))
    assert(a:call("FLUSHALL"))                 -- the server lost its writes
    local lb = assert(lease.acquire(b, "settle", 10))
    assert.equal(la.token, lb.token)
    local ok, err = lease.renew(a, la)
    assert.is_nil(ok, "A renewed B's lease")
    assert.equal("lost", err.kind)
    ok, err = lease.release(a, la)
    assert.is_nil(ok, "A released B's lease")
    assert.equal("lost", err.kind)
    assert.equal(lb.token .. "|" .. lb.owner,
                 b:call("GET", "paygate:lease:settle"))
    assert(lease.renew(b, lb))
    assert(lease.release(b, lb))
    a:close()
    b:close()
  end)

  it("a client used for leases can be collected", function()
    local srv = servers.redis()
    local seen = setmetatable({}, { __mode = "k" })
    do
      local c = assert(redis.connect(srv.url))
      local l = assert(lease.acquire(c, "k", 5))
      assert(lease.release(c, l))
      c:close()
      seen[c] = "used for a lease"
    end
    for _ = 1, 5 do collectgarbage() end
    local left = {}
    for _, v in pairs(seen) do left[#left + 1] = v end
    assert.same({}, left)
  end)
end)

describe("paygate.redis error kinds", function()
  it("BUSYGROUP and BUSYKEY are constraint, not the retryable busy",
     function()
    local srv = servers.redis()
    local c = assert(redis.connect(srv.url))
    assert(c:call("XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"))
    local res, err = c:call("XGROUP", "CREATE", "s", "g", "$", "MKSTREAM")
    assert.is_nil(res)
    assert.equal("BUSYGROUP", err.code)
    assert.equal("constraint", err.kind)
    assert.is_false(err.retryable)
    assert(c:call("SET", "k", "v"))
    local dump = assert(c:call("DUMP", "k"))
    res, err = c:call("RESTORE", "k", 0, dump)
    assert.is_nil(res)
    assert.equal("BUSYKEY", err.code)
    assert.equal("constraint", err.kind)
    assert.is_false(err.retryable)
    c:close()
  end)

  it("an operation on a closed client is closed, not retryable", function()
    local srv = servers.redis()
    local c = assert(redis.connect(srv.url))
    local t = core.spawn(function() return c:call("BLPOP", "nothing", 5) end)
    c:close()
    local res, err = t:wait()
    assert.is_nil(res)
    assert.equal("closed", err.kind)
    assert.is_false(err.retryable)
  end)
end)
