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

  it("a parameter route wins over a rest route of the same depth, in"
     .. " either order of registration", function()
    -- (the order sort left them in decided: /c/1 went to /c/*rest, and
    -- /c/:id was never called)
    for _, order in ipairs({ { "/c/:id", "/c/*rest" },
                             { "/c/*rest", "/c/:id" } }) do
      local r = router.new()
      for _, p in ipairs(order) do r:add("GET", p, function() end) end
      local _, pattern, params = r:find("GET", "/c/1")
      assert.equal("/c/:id", pattern)
      assert.same({ id = "1" }, params)
      _, pattern, params = r:find("GET", "/c/1/2")
      assert.equal("/c/*rest", pattern)
      assert.same({ rest = "1/2" }, params)
    end
  end)

  it("refuses a route of the same shape as another (one never matches)",
     function()
    -- (/a/:x and /a/:y were both taken; one of them answered everything)
    local r = router.new()
    r:add("GET", "/a/:x", function() end)
    assert.has_error(function() r:add("GET", "/a/:y", function() end) end,
                     "route: GET /a/:y matches what GET /a/:x does")
    r:add("GET", "/b/:x/*rest", function() end)
    assert.has_error(function() r:add("GET", "/b/:y/*r", function() end) end,
                     "route: GET /b/:y/*r matches what GET /b/:x/*rest does")
    -- another method, another static segment or depth: fine
    r:add("POST", "/a/:y", function() end)
    r:add("GET", "/a/:x/:y", function() end)
    r:add("GET", "/a/*rest", function() end)
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

describe("paygate.router rest", function()
  it("binds the rest, empty for the bare prefix", function()
    local r = router.new()
    r:add("GET", "/f/*rest", function() end)
    for path, rest in pairs({ ["/f"] = "", ["/f/"] = "", ["/f/a/b"] = "a/b" })
    do
      local fn, _, params = r:find("GET", path)
      assert.is_function(fn, path)
      assert.equal(rest, params.rest, path)
    end
    assert.is_nil((r:find("GET", "/fx")))
  end)
end)
