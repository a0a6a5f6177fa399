-- paygate.time_left(): the seconds to the calling handler's deadline
-- (limits.request_timeout, moved by req:set_deadline), nil elsewhere.
local testing = require "paygate.testing"
local http = require "paygate.http"
local json = require "paygate.json"

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/left", function()
  return 200, { left = paygate.time_left() }
end)
paygate.route("GET", "/moved", function(req)
  req:set_deadline(2.5)
  return 200, { left = paygate.time_left() }
end)
paygate.route("GET", "/task", function()
  local t = paygate.spawn(function() return { v = paygate.time_left() } end)
  local r = t:wait()
  return 200, { ok = r ~= nil, task = r and r.v == nil and "nil" or r and r.v }
end)
]]

describe("paygate.time_left", function()
  local app
  setup(function()
    app = testing.start_app{ source = APP,
      config = function() return { limits = { request_timeout = 7 } } end }
  end)
  teardown(function() testing.stop_all() end)

  local function get(path)
    local res = assert(http.request{ url = app:url(path) })
    assert.equal(200, res.status, res.body)
    return json.decode(res.body)
  end

  it("is the handler's time left, moved by req:set_deadline", function()
    local left = get("/left").left
    assert(left > 6 and left <= 7, tostring(left))
    left = get("/moved").left
    assert(left > 2 and left <= 2.5, tostring(left))
  end)

  it("is nil in a task and outside a coroutine", function()
    local r = get("/task")
    assert.is_true(r.ok)
    assert.equal("nil", r.task)
    -- (this spec's own coroutine: paygate exec's, no deadline)
    assert.is_nil(require("paygate").time_left())
  end)
end)
