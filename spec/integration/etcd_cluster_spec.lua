-- paygate.etcd against a real 3-member etcd cluster: the leader is killed
-- during a stream of updates; the watch moves to another member and
-- resumes from the last revision it delivered.
local paygate = require "paygate"
local etcd = require "paygate.etcd"
local etcdsrv = require "support.etcd"
local servers = require "support.servers"

describe("paygate.etcd on a 3-member cluster", function()
  if not etcdsrv.available() then
    pending("etcd is not installed (scripts/deps installs etcd-server)")
    return
  end

  local c

  setup(function() c = etcdsrv.start{ members = 3 } end)
  teardown(function() etcdsrv.stop_all() end)

  it("a watch survives the leader's death without missing or repeating "
     .. "an event", function()
    local leader
    servers.wait_for(function()
      leader = c:leader()
      return leader ~= nil
    end, 20, "a leader")
    -- the watcher and the writer start on the leader, so its death drops
    -- both connections
    local eps = { c.endpoints[leader] }
    for i, u in ipairs(c.endpoints) do
      if i ~= leader then eps[#eps + 1] = u end
    end
    local wcli = etcd.new{ endpoints = eps, timeout = 3 }
    local pcli = etcd.new{ endpoints = eps, timeout = 3 }
    local from = assert(pcli:put("/c/start", "0")).revision

    local seen, werr = {}, nil
    local w = wcli:watch("/c/", { from_revision = from })
    local watcher = paygate.spawn(function()
      for ev, err in w do
        if err then werr = err break end
        seen[#seen + 1] = ev
        if ev.key == "/c/end" then break end
      end
    end)

    local N = 60
    local acked, failures = {}, 0
    local writer = paygate.spawn(function()
      for i = 1, N do
        local key = ("/c/k/%04d"):format(i)
        local deadline = paygate.update_time() + 20
        while true do
          local r, err = pcli:put(key, tostring(i))
          if r then
            acked[#acked + 1] = { key = key, rev = r.revision }
            break
          end
          failures = failures + 1
          assert(paygate.update_time() < deadline, "put " .. key .. ": "
                 .. tostring(err))
          paygate.sleep(0.05)
        end
        paygate.sleep(0.01)
      end
    end)
    servers.wait_for(function() return #acked >= N / 3 end, 20,
                     "a third of the writes")
    local killed = leader
    c.members[killed]:kill()
    writer:wait(60)
    assert.equal(N, #acked)
    assert(pcli:put("/c/end", "x"))
    servers.wait_for(function()
      return werr ~= nil or (seen[#seen] and seen[#seen].key == "/c/end")
    end, 30, "the watcher to see the end")
    watcher:wait(5)
    w:close()
    assert.is_nil(werr)
    assert.is_true(w.connects >= 2, "the watch reconnected")

    -- a fresh reading of the history after the fact is the reference
    local ref = {}
    local w2 = wcli:watch("/c/", { from_revision = from })
    for ev in w2 do
      ref[#ref + 1] = ev
      if ev.key == "/c/end" then break end
    end
    w2:close()
    assert.equal(#ref, #seen)
    for i = 1, #ref do
      assert.equal(ref[i].revision, seen[i].revision, "event " .. i)
      assert.equal(ref[i].key, seen[i].key)
      if i > 1 then
        assert.equal(-1, etcd.rev_cmp(seen[i - 1].revision, seen[i].revision))
      end
    end
    -- every acknowledged write is among the events
    local by_rev = {}
    for _, ev in ipairs(seen) do by_rev[ev.revision] = ev.key end
    for _, a in ipairs(acked) do assert.equal(a.key, by_rev[a.rev]) end
    print(("\n# leader m%d killed; %d events, %d put retries, watch "
           .. "connections %d"):format(killed, #seen, failures, w.connects))

    -- the member comes back and catches up
    c.members[killed]:start()
    c.members[killed]:wait_ready(30)
    local solo = etcd.new{ endpoints = { c.endpoints[killed] } }
    servers.wait_for(function()
      local kv = solo:get("/c/end")
      return kv ~= nil
    end, 20, "the restarted member to catch up")
  end)

  it("a member that loses its leader ends the watch rather than keeping "
     .. "it open without events", function()
    local survivor = 1
    local solo = etcd.new{ endpoints = { c.endpoints[survivor] },
                           timeout = 3 }
    local from = assert(solo:put("/q/a", "1")).revision
    local w = solo:watch("/q/", { from_revision = from, give_up_after = 2,
                                  reconnect_after = 120 })
    assert.equal("/q/a", assert(w()).key)   -- the watch stands
    for i, m in ipairs(c.members) do
      if i ~= survivor then m:kill() end
    end
    local ev, err, done
    local t0 = paygate.update_time()
    local task = paygate.spawn(function()
      ev, err = w()
      done = true
    end)
    servers.wait_for(function() return done end, 30,
                     "the watch to end without a leader")
    task:wait(1)
    w:close()
    assert.is_nil(ev)
    assert.equal("unavailable", err.kind)
    print(("\n# the leaderless watch ended after %.1f s: %s"):format(
      paygate.update_time() - t0, tostring(err)))
    for i, m in ipairs(c.members) do
      if i ~= survivor then m:start() end
    end
  end)
end)
