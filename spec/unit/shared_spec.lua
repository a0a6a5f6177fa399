-- paygate.shared in one process (paygate exec makes the dictionaries on
-- first use): each method, TTLs, LRU eviction, limits. The cross-worker
-- behaviour is in spec/integration/shared_spec.lua.
local shared = require "paygate.shared"
local core = require "paygate.core"

local n = 0
local function fresh(size)
  n = n + 1
  return shared.get_dict("unit" .. n, size or "1m")
end

-- waits until fn() is true or `secs` pass (monotonic); returns fn()
local function wait_for(fn, secs)
  local deadline = core.mono() + secs
  while not fn() and core.mono() < deadline do core.sleep(0.005) end
  return fn()
end

describe("paygate.shared", function()
  it("raises on misuse", function()
    local d = fresh()
    assert.has_error(function() d:get(1) end)
    assert.has_error(function() d:set(nil, 1) end)
    assert.has_error(function() d:set("k", {}) end)
    assert.has_error(function() d:set("k", 1, -1) end)
    assert.has_error(function() d:set("k", 1, "soon") end)
    assert.has_error(function() d:add("k", nil) end)
    assert.has_error(function() d:incr("k", "x") end)
    assert.has_error(function() shared.get_dict("bad name") end)
    -- read as a C string, it was the dictionary "paygate"
    assert.has_error(function() shared.get_dict("paygate\0x") end,
                     "shared.get_dict: the name 'paygate' has a NUL byte"
                     .. " in it")
    assert.has_error(function() shared.get_dict("tiny", "1k") end)
    assert.has_error(function() shared.get_dict("odd", "16q") end)
    -- a number must be a whole byte count in range (checked before the
    -- cast to size_t, where a negative or NaN one was undefined)
    for _, n in ipairs({ -1, -1048576, 1048576.5, 0 / 0, 2 ^ 40, 1 / 0 }) do
      assert.has_error(function() shared.get_dict("num", n) end,
                       "shared.get_dict: size must be a whole number of"
                       .. " bytes (32k..4g)")
    end
    assert.truthy(shared.get_dict("num_ok", 65536))
    -- a name that is no string: the message names the function however
    -- it was called (pcall(shared.get_dict, {}) gave "bad argument #1 to
    -- '?'")
    for _, name in ipairs({ {}, true }) do
      local ok, err = pcall(shared.get_dict, name)
      assert.is_false(ok)
      assert.matches("^shared.get_dict: name must be a string %(got a "
                     .. type(name) .. "%)", err)
      ok, err = pcall(function() return shared.get_dict(name) end)
      assert.matches("shared.get_dict: name must be a string", err, 1, true)
      ok, err = pcall(function() return shared[name] end)
      assert.matches("shared.get_dict: name must be a string", err, 1, true)
    end
    local ok, err = pcall(shared.get_dict)
    assert.is_false(ok)
    assert.matches("^shared.get_dict: name must be a string %(got no value%)",
                   err)
  end)

  it("names the method in an error however it was called: a missing or"
     .. " bad by or init, a dot for a colon", function()
    local d = fresh()
    -- through pcall and as tail calls, where "bad argument #2 to '?'" said
    -- neither which function nor which argument
    local ok, err = pcall(d.incr, d, "k")
    assert.is_false(ok)
    assert.matches("^shared.incr: by must be a number %(got no value%)", err)
    ok, err = pcall(function() return d:incr("k") end)
    assert.matches("shared.incr: by must be a number (got no value)", err, 1,
                   true)
    ok, err = pcall(function() return d:incr("k", {}) end)
    assert.matches("shared.incr: by must be a number (got table)", err, 1,
                   true)
    ok, err = pcall(function() return d:incr("k", 1, "x") end)
    assert.matches("shared.incr: init must be a number (got string)", err, 1,
                   true)
    -- (a number in a string stays a number, as before)
    assert.equal(3, d:incr("k", "2", "1"))
    -- d.get(k): the key taken for the dictionary
    for _, m in ipairs{ "get", "set", "add", "safe_add", "incr", "delete",
                        "flush_all", "stats" } do
      ok, err = pcall(d[m], "k", 1)
      assert.is_false(ok)
      assert.matches("^shared." .. m .. ": use d:" .. m .. "%(%.%.%.%), not d%."
                     .. m .. "%(%.%.%.%)", err)
      ok, err = pcall(function() return d[m]() end)
      assert.matches("shared." .. m .. ": use d:" .. m .. "(...)", err, 1,
                     true)
    end
    assert.equal(3, d:get("k"))
  end)

  it("always has the paygate dictionary, 8m by default", function()
    local d = shared.paygate
    assert.equal(d, shared.get_dict("paygate"))
    local st = d:stats()
    assert.is_true(st.capacity > 7 * 1024 * 1024 and st.capacity <= 8 * 1024 * 1024)
  end)

  describe("get / set / delete", function()
    it("keeps strings (any bytes), numbers and booleans", function()
      local d = fresh()
      local bin = "a\0b\255" .. ("z"):rep(1000)
      assert.is_true(d:set("s", bin))
      assert.is_true(d:set("n", -12.5))
      assert.is_true(d:set("t", true))
      assert.is_true(d:set("f", false))
      assert.is_true(d:set("e", ""))
      assert.equal(bin, d:get("s"))
      assert.equal(-12.5, d:get("n"))
      assert.is_true(d:get("t"))
      assert.is_false(d:get("f"))
      assert.equal("", d:get("e"))
      assert.is_nil(d:get("missing"))
      assert.is_true(d:set("s", 7))
      assert.equal(7, d:get("s"))
    end)

    it("deletes with delete and with set(key, nil)", function()
      local d = fresh()
      d:set("a", 1)
      d:set("b", 2)
      assert.is_true(d:delete("a"))
      assert.is_nil(d:get("a"))
      assert.is_true(d:set("b", nil))
      assert.is_nil(d:get("b"))
      assert.equal(0, d:stats().entries)
      assert.is_true(d:delete("never"))
    end)

    it("refuses a key or value over the limits with too_large", function()
      local d = fresh("256k")
      local ok, err = d:set(("k"):rep(251), 1)
      assert.is_nil(ok)
      assert.equal("too_large", err.kind)
      assert.is_true(d:set(("k"):rep(250), 1))
      -- an empty key, said as such (the message spoke of a key too long)
      ok, err = d:set("", 1)
      assert.is_nil(ok)
      assert.equal("too_large", err.kind)
      assert.matches("key empty or over 250 bytes", err.message, 1, true)
      -- a quarter of a 256k dictionary is about 62 KiB
      ok, err = d:set("big", ("x"):rep(70000))
      assert.is_nil(ok)
      assert.equal("too_large", err.kind)
      assert.is_true(d:set("fits", ("x"):rep(50000)))
      assert.equal(50000, #d:get("fits"))
      local big = shared.get_dict("unit_big", "16m")
      ok, err = big:set("huge", ("x"):rep(1024 * 1024 + 1))
      assert.equal("too_large", err.kind)
      assert.is_true(big:set("max", ("x"):rep(1024 * 1024)))
      assert.equal(1024 * 1024, #big:get("max"))
    end)

    it("keeps a key's value when a set over it is too_large", function()
      local d = fresh("256k")
      assert.is_true(d:set("k", "old"))
      local ok, err = d:set("k", ("x"):rep(70000))
      assert.is_nil(ok)
      assert.equal("too_large", err.kind)
      assert.equal("old", d:get("k"))
      assert.equal(1, d:stats().entries)
    end)


    it("finds every one of many keys", function()
      local d = fresh("4m")
      for i = 1, 10000 do assert.is_true(d:set("key:" .. i, i)) end
      for i = 1, 10000 do assert.equal(i, d:get("key:" .. i)) end
      assert.equal(10000, d:stats().entries)
      assert.equal(0, d:stats().evictions)
      d:flush_all()
      assert.equal(0, d:stats().entries)
      assert.is_nil(d:get("key:1"))
    end)
  end)

  describe("add", function()
    it("adds only when absent: false and kind exists otherwise", function()
      local d = fresh()
      assert.is_true(d:add("k", "first"))
      local ok, err = d:add("k", "second")
      assert.is_false(ok)
      assert.equal("exists", err.kind)
      assert.equal("first", d:get("k"))
    end)

    it("adds over an expired entry", function()
      local d = fresh()
      assert.is_true(d:add("k", 1, 0.02))
      local added = false
      wait_for(function() added = added or d:add("k", 2) == true; return added end, 5)
      assert.is_true(added)
      assert.equal(2, d:get("k"))
    end)
  end)

  describe("safe_add", function()
    it("adds like add, but a full dict answers no_memory and evicts nothing",
       function()
      local d = fresh("64k")
      local v = ("v"):rep(1000)
      assert.is_true(d:safe_add("k0", v))
      local ok, err = d:safe_add("k0", v)
      assert.is_false(ok)
      assert.equal("exists", err.kind)
      local i = 0
      repeat
        i = i + 1
        ok, err = d:safe_add("k" .. i, v)
        assert.is_true(i < 1000)
      until not ok
      assert.is_nil(ok)
      assert.equal("no_memory", err.kind)
      assert.equal(0, d:stats().evictions)
      for j = 0, i - 1 do assert.equal(v, d:get("k" .. j)) end
      -- plain set still evicts (the least recently used)
      assert.is_true(d:set("x", v))
      assert.equal(1, d:stats().evictions)
      assert.has_error(function() d:safe_add("y") end)
    end)

    it("makes room from expired entries", function()
      local d
      local v = ("v"):rep(1000)
      -- (a TTL far above the fill's time: with 10 ms, a slow machine (ASan,
      -- load) saw the first entries expire during the fill, which then
      -- reclaimed them and held more than one dict's worth of entries)
      -- The fill must end before its first entry expires: on a machine
      -- slower than that, again in a fresh dict with twice the TTL.
      -- Then wait for the LAST entry of the fill to expire (from the fill's
      -- end, not its start: under load a fill of 50 ms left its last
      -- entries live when the first ones' time was up, and the new adds
      -- found them: "full of live entries").
      local ttl, i, t0, t1 = 0.25, 0, nil, nil
      repeat
        ttl, i, t0 = ttl * 2, 0, core.mono()
        d = fresh("64k")
        repeat i = i + 1 until not d:safe_add("old" .. i, v, ttl)
        t1 = core.mono()
      until t1 - t0 < ttl or ttl > 60
      assert.is_true(wait_for(function() return core.mono() - t1 > ttl + 0.01
                              end, 130))
      for j = 1, i - 1 do assert.is_true(d:safe_add("new" .. j, v)) end
      assert.equal(0, d:stats().evictions)
    end)
  end)

  describe("incr", function()
    it("adds to a number, creates from init, refuses the rest", function()
      local d = fresh()
      local v, err = d:incr("n", 1)
      assert.is_nil(v)
      assert.equal("not_found", err.kind)
      assert.equal(11, d:incr("n", 1, 10))
      assert.equal(8, d:incr("n", -3, 100))     -- init ignored when present
      assert.equal(8, d:get("n"))
      d:set("s", "text")
      v, err = d:incr("s", 1, 0)
      assert.is_nil(v)
      assert.equal("not_a_number", err.kind)
    end)

    it("raises on a by or init that is NaN or infinite", function()
      -- stored, it would be the counter for good: every incr after it
      -- answers NaN (or inf)
      local d = fresh()
      assert.equal(1, d:incr("c", 1, 0))
      for _, x in ipairs({ 0 / 0, 1 / 0, -1 / 0 }) do
        assert.has_error(function() d:incr("c", x) end,
                         "shared.incr: by must be a finite number")
        assert.has_error(function() d:incr("new", 1, x) end,
                         "shared.incr: init must be a finite number")
      end
      assert.equal(1, d:get("c"))
      assert.is_nil(d:get("new"))
      assert.equal(2, d:incr("c", 1))
    end)

    it("refuses a sum past the largest number (overflow), the value kept",
       function()
      -- 1e308 + 1e308 is an infinity: stored, every incr after it answered
      -- inf (or NaN) for good, from finite inputs the check above lets by
      local d = fresh()
      assert.equal(1e308, d:incr("c", 1e308, 0))
      for _, by in ipairs({ 1e308, 1.7976931348623157e308 }) do
        local v, err = d:incr("c", by)
        assert.is_nil(v)
        assert.equal("overflow", err.kind)
        assert.matches("shared unit%d+ incr: the sum is past the largest"
                       .. " number", err.message)
        assert.equal(1e308, d:get("c"))
      end
      assert.equal(0, d:incr("c", -1e308))
      assert.equal(-1e308, d:incr("c", -1e308))
      local v, err = d:incr("c", -1e308)
      assert.is_nil(v)
      assert.equal("overflow", err.kind)
      assert.equal(-1e308, d:get("c"))
      -- a counter created from init + by is refused the same, and not made
      v, err = d:incr("new", 1e308, 1e308)
      assert.is_nil(v)
      assert.equal("overflow", err.kind)
      assert.is_nil(d:get("new"))
      assert.equal(5, d:incr("new", 2, 3))
    end)

    it("gives init_ttl to a counter it creates", function()
      local d = fresh()
      assert.equal(1, d:incr("c", 1, 0, 0.02))
      assert.is_true(wait_for(function() return d:get("c") == nil end, 5))
      assert.equal(1, d:incr("c", 1, 0))
    end)
  end)

  describe("TTL", function()
    it("expires an entry after its ttl, not before", function()
      local d = fresh()
      local t0 = core.mono()
      d:set("short", "v", 0.05)
      d:set("long", "v", 3600)
      d:set("none", "v")
      local got = d:get("short")
      if core.mono() - t0 < 0.05 then assert.equal("v", got) end
      assert.is_true(wait_for(function() return d:get("short") == nil end, 5))
      assert.is_true(core.mono() - t0 >= 0.05)
      assert.equal("v", d:get("long"))
      assert.equal("v", d:get("none"))
    end)
  end)

  describe("eviction", function()
    it("evicts the least recently used first; get refreshes", function()
      local d = fresh("64k")
      local v = ("v"):rep(1000)
      for i = 1, 30 do assert.is_true(d:set("k" .. i, v)) end
      assert.equal(v, d:get("k1"))             -- k1 is now the newest
      local i = 30
      while d:stats().evictions == 0 do
        i = i + 1
        assert.is_true(d:set("k" .. i, v))
        assert.is_true(i < 1000)
      end
      assert.equal(1, d:stats().evictions)
      assert.is_nil(d:get("k2"))               -- the oldest went
      assert.equal(v, d:get("k1"))
      assert.equal(v, d:get("k3"))
      assert.equal(v, d:get("k" .. i))
    end)

    it("drops expired entries before evicting live ones", function()
      local d = fresh("64k")
      local v = ("v"):rep(1000)
      for i = 1, 20 do d:set("old" .. i, v, 0.01) end
      local t0 = core.mono()
      assert.is_true(wait_for(function() return core.mono() - t0 > 0.02 end, 5))
      local live = 0
      while d:stats().evictions == 0 do
        live = live + 1
        assert.is_true(d:set("live" .. live, v))
        assert.is_true(live < 1000)
      end
      -- every expired entry went before the first live one
      assert.equal(live - 1, d:stats().entries)
      assert.is_nil(d:get("live1"))
      assert.equal(v, d:get("live2"))
    end)

    it("keeps the used bytes within capacity", function()
      local d = fresh("64k")
      for i = 1, 2000 do d:set("x" .. i, ("y"):rep(i % 300)) end
      local st = d:stats()
      assert.is_true(st.used <= st.capacity)
      assert.is_true(st.used > st.capacity / 2)
      assert.is_true(st.evictions > 0)
    end)
  end)
end)
