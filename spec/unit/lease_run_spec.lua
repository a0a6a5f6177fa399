-- paygate.lease: measured durations (lease.measure / ttl_for / durations)
-- and lease.run (adaptive ttl, background renewal, fenced commits), on
-- SQLite, PostgreSQL and Redis.
local paygate = require "paygate"
local core = require "paygate.core"
local redis = require "paygate.redis"
local lease = require "paygate.lease"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- A series name no other test used (the histograms live in the shared
-- dictionary for the whole process).
local function series(what)
  n = n + 1
  return what .. "-" .. n .. "-" .. core.pid()
end

describe("lease.ttl_for / lease.measure", function()
  it("raises on misuse, naming the function and the argument", function()
    assert.has_error(function() lease.measure("", 1) end,
      "lease.measure: name must be a non-empty string without '|' (at"
      .. " most 200 bytes)")
    assert.has_error(function() lease.measure("a|b", 1) end)
    assert.has_error(function() lease.measure("x", -1) end,
                     "lease.measure: seconds must be a number >= 0")
    assert.has_error(function()
      lease.ttl_for("x", { floor = 5, ceiling = 1 })
    end,
                     "lease.ttl_for: opts.floor must not exceed opts.ceiling")
    assert.has_error(function() lease.ttl_for("x", { margin = 0.5 }) end,
                     "lease.ttl_for: opts.margin must be at least 1")
    assert.has_error(function() lease.ttl_for("x", { quantile = 2 }) end,
                     "lease.ttl_for: opts.quantile must be in (0, 1]")
    assert.has_error(function() lease.ttl_for("x", { floor = "1" }) end,
                     "lease.ttl_for: opts.floor must be a positive number")
  end)

  it("gives the initial ttl (default: the ceiling) until enough samples",
     function()
    local name = series("init")
    local ttl, info = lease.ttl_for(name, { ceiling = 40 })
    assert.equal(40, ttl)
    assert.equal("initial", info.source)
    assert.equal(0, info.samples)
    ttl = lease.ttl_for(name, { initial = 0.3, floor = 0.1, min_samples = 3 })
    assert.equal(0.3, ttl)
    -- (initial within floor and ceiling, as docs/storage.md says)
    assert.equal(40, lease.ttl_for(name, { initial = 90, ceiling = 40 }))
    assert.equal(2, lease.ttl_for(name, { initial = 0.5, floor = 2 }))
    lease.measure(name, 0.5)
    lease.measure(name, 0.5)
    ttl, info = lease.ttl_for(name, { initial = 0.3, floor = 0.1,
                                      min_samples = 3 })
    assert.equal(0.3, ttl)
    assert.equal(2, info.samples)
    lease.measure(name, 0.5)
    ttl, info = lease.ttl_for(name, { initial = 0.3, floor = 0.1,
                                      min_samples = 3, margin = 2 })
    assert.equal("measured", info.source)
    assert.equal(3, info.samples)
    -- 0.5 s read back as its bucket's upper bound: within 9 % above
    assert.truthy(info.quantile >= 0.5 and info.quantile < 0.5 * 1.091,
                  tostring(info.quantile))
    assert.truthy(ttl >= 1.0 and ttl < 1.0 * 1.091, tostring(ttl))
  end)

  it("is p99.9 x margin: one slow run in 101 counts, one in 1001 does not",
     function()
    local a, b = series("p999a"), series("p999b")
    for _ = 1, 100 do
      lease.measure(a, 0.1)
    end
    lease.measure(a, 4)
    for _ = 1, 1000 do
      lease.measure(b, 0.1)
    end
    lease.measure(b, 4)
    local opts = { floor = 0.01, ceiling = 100, margin = 1.5 }
    local ta, ia = lease.ttl_for(a, opts)
    local tb, ib = lease.ttl_for(b, opts)
    assert.equal(101, ia.samples)
    assert.equal(1001, ib.samples)
    assert.truthy(ta >= 6 and ta < 6 * 1.091, tostring(ta))
    assert.truthy(tb >= 0.15 and tb < 0.15 * 1.091, tostring(tb))
  end)

  it("does not shrink when the shared dictionary evicts a slow bucket:"
     .. " this worker's own samples floor it", function()
    local a = series("evicted")
    for _ = 1, 100 do
      lease.measure(a, 0.1)
    end
    lease.measure(a, 4)
    local opts = { floor = 0.01, ceiling = 100, margin = 1.5 }
    local before = lease.ttl_for(a, opts)
    assert.truthy(before >= 6, tostring(before))
    -- a full dictionary evicts its least recently used entries: the slow
    -- bucket, touched once, goes first (played here by deleting it)
    local d = require("paygate.shared").get_dict("paygate")
    local gen = math.floor(core.time() / lease.DEFAULTS.window)
    local gone = 0
    for g = gen - 1, gen do      -- (the samples may be an hour's last)
      for i = 0, 255 do                    -- the slow one: counted once
        local k = "paygate.lease.d|" .. a .. "|" .. g .. "|" .. i
        if tonumber(d:get(k)) == 1 then
          d:delete(k)
          gone = gone + 1
        end
      end
    end
    assert.equal(1, gone)
    lease.measure(a, 0.1)          -- (a new sample: the cached ttl goes)
    local after = lease.ttl_for(a, opts)
    assert.truthy(after >= 6, "the ttl shrank to " .. after)
  end)

  it("clamps to floor and ceiling", function()
    local name = series("clamp")
    for _ = 1, 30 do
      lease.measure(name, 0.002)
    end
    assert.equal(1, lease.ttl_for(name))                 -- default floor 1 s
    assert.equal(0.5, lease.ttl_for(name, { floor = 0.5 }))
    local slow = series("clamp-slow")
    for _ = 1, 30 do
      lease.measure(slow, 1000)
    end
    assert.equal(300, lease.ttl_for(slow))               -- default ceiling
    assert.equal(60, lease.ttl_for(slow, { ceiling = 60 }))
  end)

  it("durations() reports the quantiles it uses", function()
    local name = series("dur")
    assert.same({ samples = 0 }, lease.durations(name))
    for i = 1, 100 do
      lease.measure(name, i / 1000)                      -- 1 .. 100 ms
    end
    local d = lease.durations(name)
    assert.equal(100, d.samples)
    assert.truthy(d.p50 >= 0.050 and d.p50 < 0.050 * 1.091, tostring(d.p50))
    assert.truthy(d.p99 >= 0.099 and d.p99 < 0.099 * 1.091, tostring(d.p99))
    assert.truthy(d.p999 >= 0.1 and d.max >= 0.1 and d.max < 0.1091)
  end)

  it("is shared by the workers: samples live in the paygate dictionary",
     function()
    local name = series("shared")
    local gen = math.floor(core.time() / lease.DEFAULTS.window)
    lease.measure(name, 0.25)
    local d = require("paygate.shared").get_dict("paygate")
    -- the sample count key of the generation (the next one, should the
    -- hour have turned in between)
    local found = d:get("paygate.lease.d|" .. name .. "|" .. gen .. "|n")
                  or d:get("paygate.lease.d|" .. name .. "|" .. gen + 1
                           .. "|n")
    assert.equal(1, found)
  end)
end)

local stores = servers.stores(tmp, "", "paygate_leases")
if servers.have_redis() then
  stores.redis = servers.redis_store()
end

for engine, new_store in pairs(stores) do
  describe("lease.run on " .. engine, function()
    local store

    before_each(function() store = new_store() end)
    after_each(function() store:close() end)

    it("raises on misuse", function()
      assert.has_error(function() lease.run(store, "k", function() end) end,
        "lease.run: opts must be a table with adaptive = name (or a fixed"
        .. " ttl)")
      assert.has_error(function() lease.run(store, "k", function() end, {}) end,
        "lease.run: opts.adaptive (the name its durations are recorded"
        .. " under) or opts.ttl is required")
      assert.has_error(function()
        lease.run(store, "k", function() end, { adaptive = "a", ttl = 1 })
      end, "lease.run: opts.adaptive and opts.ttl exclude each other")
      assert.has_error(function()
        lease.run(store, "k", "fn", { ttl = 1 })
      end, "lease.run: fn must be a function")
      assert.has_error(function()
        lease.run(store, "k", function() end, { ttl = 1, renew = "no" })
      end, "lease.run: opts.renew must be a boolean")
      assert.has_error(function()
        lease.run(store, "k", function() end, { adaptive = "a", margn = 2 })
      end, "lease.run: unknown option opts.margn")
      assert.has_error(function()
        lease.run(store, "k", function() end, { ttl = 1, floor = 2 })
      end, "lease.run: unknown option opts.floor (it needs opts.adaptive)")
      assert.has_error(function() lease.ttl_for("x", { flor = 3 }) end,
                       "lease.ttl_for: unknown option opts.flor")
    end)

    it("runs fn holding the lease, returns its results, releases",
       function()
      local name = series("basic")
      local a, b, c = lease.run(store, "job", function(h)
        assert.is_number(h.token)
        assert.truthy(h:remaining() > 0)
        local l2, err = lease.acquire(store, "job", 5)
        assert.is_nil(l2)
        assert.equal("held", err.kind)
        return 1, nil, 3
      end, { adaptive = name, initial = 5 })
      assert.same({ 1, nil, 3 }, { a, b, c })
      assert(lease.acquire(store, "job", 5))       -- released
      assert.equal(1, lease.durations(name).samples)
    end)

    it("release_owner gives back what one owner holds among the keys,"
       .. " and nothing else", function()
      local me, other = lease.owner(), lease.owner()
      assert.not_equal(me, other)
      assert(lease.acquire(store, "ro:a", 30, { owner = me }))
      assert(lease.acquire(store, "ro:b", 30, { owner = me }))
      assert(lease.acquire(store, "ro:c", 30, { owner = me }))  -- not listed
      assert(lease.acquire(store, "ro:d", 30, { owner = other }))
      local keys = { "ro:a", "ro:b", "ro:d", "ro:none" }
      for i = 1, 150 do                     -- more than one batch of 100
        keys[#keys + 1] = "ro:x" .. i
      end
      keys[#keys + 1] = "ro:last"
      assert(lease.acquire(store, "ro:last", 30, { owner = me }))
      assert.equal(3, lease.release_owner(store, me, keys))
      assert(lease.acquire(store, "ro:a", 30))          -- free again
      assert(lease.acquire(store, "ro:b", 30))
      assert(lease.acquire(store, "ro:last", 30))
      assert.equal("held", select(2, lease.acquire(store, "ro:c", 30)).kind)
      assert.equal("held", select(2, lease.acquire(store, "ro:d", 30)).kind)
      assert.equal(0, lease.release_owner(store, me, keys))
      assert.has_error(function() lease.release_owner(store, "", keys) end,
        "lease.release_owner: owner must be a non-empty string without '|'")
      assert.equal(0, lease.release_owner(store, me, {}))
      assert.has_error(function() lease.release_owner(store, me, "k") end,
        "lease.release_owner: keys must be a list of keys")
    end)

    it("counts what is left on the monotonic clock: a wall clock stepped"
       .. " back an hour neither stretches the lease nor delays its"
       .. " renewal", function()
      local time, now = core.time, core.now
      local left, renewed, ok, err
      lease.run(store, "step", function(h)
        core.time = function() return time() - 3600 end
        core.now = function() return now() - 3600 end
        ok, err = pcall(function()
          left = h:remaining()
          local first = h.lease.deadline
          servers.wait_for(function() return h.lease.deadline ~= first end,
                           3, "a renewal")
          renewed = h:remaining()
        end)
        core.time, core.now = time, now
      end, { ttl = 0.4 })
      core.time, core.now = time, now
      assert(ok, err)
      assert.is_true(left <= 0.4 and left > 0, tostring(left))
      assert.is_true(renewed <= 0.4 and renewed > 0.1, tostring(renewed))
      local l = assert(lease.acquire(store, "step2", 5))
      assert.near(5, lease.remaining(l), 0.5)
      assert.has_error(function() lease.remaining({}) end,
                       "lease.remaining: l must be a lease from lease.acquire")
    end)

    it("returns held without running fn while another owner holds it",
       function()
      assert(lease.acquire(store, "busy", 5))
      local ran = false
      local before = lease.stats().held
      local ok, err = lease.run(store, "busy", function() ran = true end,
                                { ttl = 5 })
      assert.is_nil(ok)
      assert.equal("held", err.kind)
      assert.is_false(ran)
      assert.equal(before + 1, lease.stats().held)
    end)

    it("raises fn's error again after releasing", function()
      assert.has_error(function()
        lease.run(store, "boom", function() error("kaboom", 0) end,
                  { ttl = 5 })
      end, "kaboom")
      assert(lease.acquire(store, "boom", 5))
    end)

    it("releases the lease of a run whose coroutine was abandoned"
       .. " mid-work, and stops renewing it", function()
      local abandoned = lease.stats().abandoned
      local running = false
      local t = paygate.spawn(function()
        lease.run(store, "abandoned", function()
          running = true
          paygate.sleep(30)
        end, { ttl = 5 })
      end)
      servers.wait_for(function() return running end, 5, "the work")
      t:cancel()
      -- released at once (before, renewed until the process exited; the
      -- ttl alone would have kept it 5 s)
      local l
      servers.wait_for(function()
        l = lease.acquire(store, "abandoned", 5)
        return l ~= nil
      end, 3, "the abandoned run's lease to be released")
      assert.equal(abandoned + 1, lease.stats().abandoned)
      assert(lease.release(store, l))
    end)

    it("renews in the background while fn outlives the ttl", function()
      local renewed = lease.stats().renewed
      local refused = 0
      -- a ttl of 2 s: renewed when 1 s is left. (It was 0.4 s, renewed
      -- with 0.2 s left: a renewal's commit slower than that on a loaded
      -- machine let the lease expire and the spec took it over.)
      local res = lease.run(store, "long", function(h)
        local deadline = core.mono() + 5.0          -- 2.5 ttls
        while core.mono() < deadline do
          local l = lease.acquire(store, "long", 5)
          if l then
            return "taken over"
          end
          refused = refused + 1
          paygate.sleep(0.05)
        end
        assert.is_false(h.lost)
        return "kept"
      end, { ttl = 2 })
      assert.equal("kept", res)
      assert.truthy(refused >= 5)
      assert.truthy(lease.stats().renewed >= renewed + 2)
    end)

    it("without renewal an outrun lease is taken over and its commit is"
       .. " refused", function()
      if engine ~= "redis" then
        assert(store:exec_script("DROP TABLE IF EXISTS w;"
                                 .. " CREATE TABLE w (who TEXT)"))
      end
      local fenced = lease.stats().fenced
      local res, err = lease.run(store, "res", function(h)
        servers.wait_for(function()
          return lease.acquire(store, "res", 5) ~= nil
        end, 5, "another owner to take the expired lease")
        if engine == "redis" then
          return h:call("SET", "w", "late")
        end
        assert.has_error(function() h:call("SET", "w", "x") end,
          "h:call: the lease is on SQL: guard writes with h:check(tx)")
        return store:transaction(function(tx)
          local ok, cerr = h:check(tx)
          if not ok then
            return nil, cerr
          end
          return tx:exec("INSERT INTO w (who) VALUES ('late')")
        end)
      end, { ttl = 0.1, renew = false })
      assert.is_nil(res)
      assert.equal("fenced", err.kind)
      assert.equal(fenced + 1, lease.stats().fenced)
      if engine == "redis" then
        assert.equal(redis.null, store:call("GET", "w"))
      else
        assert.same({}, store:query("SELECT who FROM w"))
      end
    end)
  end)
end
