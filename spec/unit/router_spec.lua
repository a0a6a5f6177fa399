-- paygate.router: what a route pattern may be, refused when registered.
local router = require "paygate.router"

describe("paygate.router patterns", function()
  it("refuses a parameter name used twice in one pattern", function()
    -- /x/:a/:a matched /x/1/2 with params.a = "2": the first value lost
    local r = router.new()
    assert.has_error(function() r:add("GET", "/x/:a/:a", function() end) end,
                     "route: parameter a twice in /x/:a/:a")
    assert.has_error(function() r:add("GET", "/x/:a/*a", function() end) end,
                     "route: parameter a twice in /x/:a/*a")
    -- distinct names, and the same name in two routes, are fine
    r:add("GET", "/x/:a/:b", function() end)
    r:add("GET", "/y/:a", function() end)
    local fn, pattern, params = r:find("GET", "/x/1/2")
    assert.is_function(fn)
    assert.equal("/x/:a/:b", pattern)
    assert.same({ a = "1", b = "2" }, params)
  end)

  it("refuses a bad name, a rest that is not last, a route twice", function()
    local r = router.new()
    assert.has_error(function() r:add("GET", "/x/:1a", function() end) end,
                     "route: bad parameter name in /x/:1a")
    assert.has_error(function() r:add("GET", "/x/*r/y", function() end) end,
                     "route: *r must be the last segment")
    r:add("GET", "/x/:id", function() end)
    assert.has_error(function() r:add("GET", "/x/:id", function() end) end,
                     "route: GET /x/:id twice")
  end)
end)
