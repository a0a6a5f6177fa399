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

describe("paygate.router 405", function()
  it("names each other method once in Allow, though a fixed and a pattern"
     .. " route of it both match", function()
    -- (GET /a/b and GET /a/*rest gave "Allow: GET, GET, POST")
    local r = router.new()
    r:add("GET", "/a/b", function() end)
    r:add("GET", "/a/*rest", function() end)
    r:add("POST", "/a/:x", function() end)
    r:add("POST", "/a/*rest", function() end)
    local fn, _, _, allowed = r:find("DELETE", "/a/b")
    assert.is_nil(fn)
    assert.equal("GET, POST", allowed)
    _, _, _, allowed = r:find("PUT", "/a/c/d")
    assert.equal("GET, POST", allowed)
  end)
end)
