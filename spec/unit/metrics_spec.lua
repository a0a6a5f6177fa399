-- paygate.metrics: app gauges (the table is per worker; here, the exec
-- process's private one). /metrics itself: spec/integration/metrics_spec.lua.
local metrics = require "paygate.metrics"

describe("paygate.metrics.gauge", function()
  it("refuses bad names and help (misuse raises)", function()
    for _, name in ipairs({ "", "9abc", "Abc", "a-b", "a b", ("a"):rep(64) }) do
      assert.has_error(function() metrics.gauge(name, "h") end)
    end
    assert.has_error(function() metrics.gauge("ok_name", "two\nlines") end)
    assert.has_error(function() metrics.gauge("ok_name", "back\\slash") end)
    assert.has_error(function() metrics.gauge(42) end)
    assert.is_userdata(metrics.gauge("ns:ok_name_2", "fine"))
  end)

  it("refuses a name /metrics shows already: the runtime's, or one"
     .. " declared as a counter", function()
    -- (each went out under a second HELP and TYPE: an exposition a
    -- scraper refuses, or two samples of one series)
    for _, name in ipairs({ "paygate_workers", "paygate_requests_total",
                            "paygate_request_duration_seconds_count",
                            "paygate_shared_entries" }) do
      assert.has_error(function() metrics.gauge(name, "h") end,
        "metrics.gauge: " .. name .. " is one of the runtime's own metrics")
      assert.has_error(function() metrics.counter(name, "h", {}) end)
    end
    metrics.counter("spec_kind_total", "h", { "a" })
    assert.has_error(function() metrics.gauge("spec_kind_total", "h") end,
      "metrics.gauge: spec_kind_total is a counter already")
    metrics.gauge("spec_kind", "h")
    assert.is_userdata(metrics.gauge("spec_kind", "again"))
    assert.has_error(function() metrics.counter("spec_kind", "h", {}) end,
      "metrics.counter: spec_kind is a gauge already")
  end)

  it("refuses bad labels and values", function()
    local g = metrics.gauge("spec_bad_labels", "h")
    assert.has_error(function() g:set("1") end)
    assert.has_error(function() g:set(1, "x") end)
    assert.has_error(function() g:set(1, { ["a-b"] = "x" }) end)
    assert.has_error(function() g:set(1, { __x = "x" }) end)
    assert.has_error(function() g:set(1, { [1] = "x" }) end)
    assert.has_error(function() g:set(1, { a = {} }) end)
    assert.has_error(function() g:set(1, { a = ("x"):rep(300) }) end)
  end)

  it("holds MAX_SERIES series; the same labels reuse one; remove frees",
     function()
    local g = metrics.gauge("spec_fill", "h")
    for i = 1, metrics.MAX_SERIES do
      assert.is_true(g:set(i, { i = i, q = 'a"b\\c' }))
    end
    assert.is_true(g:set(99, { q = 'a"b\\c', i = 1 }))   -- key order: same
    local ok, err = g:set(1, { i = "new" })
    assert.is_nil(ok)
    assert.equal("full", err.kind)
    assert.is_true(g:remove({ i = 3, q = 'a"b\\c' }))
    assert.is_false(g:remove({ i = 3, q = 'a"b\\c' }))
    assert.is_true(g:set(1, { i = "new" }))
    for i = 1, metrics.MAX_SERIES do
      g:remove({ i = i, q = 'a"b\\c' })
    end
    g:remove({ i = "new" })
    assert.is_true(g:set(0))
    assert.is_true(g:remove())
  end)
end)

describe("paygate.metrics.counter", function()
  it("refuses bad names, labels and options (misuse raises)", function()
    assert.has_error(function() metrics.counter("9x", "h", {}) end)
    assert.has_error(function() metrics.counter("x_total", "a\nb", {}) end)
    assert.has_error(function() metrics.counter("x_total", "h", "a") end)
    assert.has_error(function() metrics.counter("x_total", "h", { "a-b" }) end)
    assert.has_error(function() metrics.counter("x_total", "h", { "a", "a" })
    end)
    assert.has_error(function()
      metrics.counter("x_total", "h", {}, { max_series = 0 })
    end)
    assert.has_error(function()
      metrics.counter("x_total", "h", {}, { max_series = 1.5 })
    end)
    -- 8 label names of 63 bytes: their overflow series ('k="_overflow"',
    -- ...) takes over 256 bytes; it was rendered past its buffer's end
    local long = {}
    for i = 1, 8 do long[i] = ("l" .. i):rep(32):sub(1, 63) end
    assert.has_error(function() metrics.counter("x_total", "h", long) end,
                     "metrics.counter: label names too long (their overflow"
                     .. " series takes over 255 bytes)")
    local c = metrics.counter("spec_misuse_total", "h", { "a", "b" })
    assert.has_error(function() c:inc({ a = "x" }) end)            -- b missing
    assert.has_error(function() c:inc({ a = "x", b = "y", z = "" }) end)
    assert.has_error(function() c:inc({ a = "x", b = {} }) end)
    assert.has_error(function() c:inc({ a = "x", b = "y" }, -1) end)
    assert.has_error(function() c:inc({ a = "x", b = "y" }, 0 / 0) end)
    assert.has_error(function() c:inc({ a = "x", b = "y" }, "1") end)
    assert.has_error(function() c:inc() end)
    assert.equal(0, c:get({ a = "x", b = "y" }))
  end)

  it("adds per label set; named and positional labels are the same series",
     function()
    local c = metrics.counter("spec_add_total", "h", { "endpoint", "outcome" })
    assert.is_true(c:inc({ endpoint = "/v3/x", outcome = "ok" }))
    assert.is_true(c:inc({ "/v3/x", "ok" }, 2))
    assert.is_true(c:inc({ endpoint = "/v3/x", outcome = 'a"b' }))
    assert.equal(3, c:get({ outcome = "ok", endpoint = "/v3/x" }))
    assert.equal(1, c:get({ "/v3/x", 'a"b' }))
    assert.equal(0, c:get({ "/v3/y", "ok" }))
    -- a second declaration of the name counts into the same series
    local again = metrics.counter("spec_add_total", "h",
                                  { "endpoint", "outcome" })
    again:inc({ "/v3/x", "ok" })
    assert.equal(4, c:get({ "/v3/x", "ok" }))
    local plain = metrics.counter("spec_plain_total", "h")
    plain:inc(); plain:inc(nil, 2.5)
    assert.equal(3.5, plain:get())
  end)

  it("caps label sets: the rest (and values too long to hold) go to the "
     .. "overflow series", function()
    local c = metrics.counter("spec_cap_total", "h", { "k" },
                              { max_series = 3 })
    for i = 1, 10 do assert.is_true(c:inc({ k = "v" .. i })) end
    for i = 1, 3 do assert.equal(1, c:get({ k = "v" .. i })) end
    assert.equal(7, c:get("overflow"))
    c:inc({ k = "v1" })                       -- a held set still counts
    assert.equal(2, c:get({ k = "v1" }))
    c:inc({ k = ("x"):rep(400) })
    assert.equal(8, c:get("overflow"))
    -- hostile input: many distinct values cost nothing more
    for i = 1, 5000 do c:inc({ k = "h" .. i }) end
    assert.equal(5008, c:get("overflow"))
  end)
end)

describe("paygate.metrics.histogram", function()
  it("refuses bad names, buckets and values (misuse raises)", function()
    assert.has_error(function() metrics.histogram("9x", "h") end)
    -- room for _bucket in a name
    assert.has_error(function() metrics.histogram(("x"):rep(60), "h") end)
    -- one of the runtime's, and its samples' names
    assert.has_error(function()
      metrics.histogram("paygate_request_duration_seconds", "h")
    end)
    for _, b in ipairs({ {}, { 1, 1 }, { 2, 1 }, { 1, 1 / 0 }, { "1" },
                         { 0 / 0 }, "1" }) do
      assert.has_error(function()
        metrics.histogram("spec_bad_seconds", "h", {}, { buckets = b })
      end)
    end
    local h = metrics.histogram("spec_misuse_seconds", "h", { "a" },
                                { buckets = { 0.1, 1 } })
    assert.has_error(function() h:observe(0 / 0, { a = "x" }) end)
    -- an infinity would leave the sum infinite for good
    assert.has_error(function() h:observe(math.huge, { a = "x" }) end)
    assert.has_error(function() h:observe(-math.huge, { a = "x" }) end)
    assert.has_error(function() h:observe("1", { a = "x" }) end)
    assert.has_error(function() h:observe(1) end)                 -- a missing
    -- its samples' names are its own: no counter or gauge takes them
    assert.has_error(function()
      metrics.counter("spec_misuse_seconds_count", "h", {})
    end, "metrics.counter: spec_misuse_seconds_count is a histogram already")
    assert.has_error(function() metrics.gauge("spec_misuse_seconds_sum") end)
  end)

  it("counts per label set: count and sum", function()
    local h = metrics.histogram("spec_count_seconds", "h", { "a" },
                                { buckets = { 0.1, 1 } })
    assert.same({ 0, 0 }, { h:get({ a = "x" }) })
    assert.is_true(h:observe(0.05, { a = "x" }))
    assert.is_true(h:observe(5, { "x" }))
    assert.is_true(h:observe(-1, { a = "y" }))
    assert.same({ 2, 5.05 }, { h:get({ a = "x" }) })
    assert.same({ 1, -1 }, { h:get({ a = "y" }) })
  end)

  -- counts gathered elsewhere (paygate.sql's commit times, kept by the
  -- store's writer thread) added at once: n observations of one value
  it("observes a value n times at once; 0 makes the series", function()
    local h = metrics.histogram("spec_many_seconds", "h", { "a" },
                                { buckets = { 0.1, 1 } })
    assert.is_true(h:observe(0.5, { a = "x" }, 4))
    assert.same({ 4, 2 }, { h:get({ a = "x" }) })
    assert.is_true(h:observe(0.5, { a = "z" }, 0))
    assert.same({ 0, 0 }, { h:get({ a = "z" }) })
    for _, n in ipairs({ -1, 1.5, 0 / 0, math.huge, "2", 2 ^ 54 }) do
      assert.has_error(function() h:observe(0.5, { a = "x" }, n) end,
        "histogram:observe: n must be a whole number >= 0 (at most 2^53)")
    end
    -- (the sum would be infinite)
    assert.has_error(function() h:observe(1e300, { a = "x" }, 1e10) end,
      "histogram:observe: value * n is past the largest number (the"
      .. " series' sum would be infinite)")
    assert.same({ 4, 2 }, { h:get({ a = "x" }) })
  end)
end)
