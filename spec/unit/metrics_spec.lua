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
