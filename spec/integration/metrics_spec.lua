-- paygate.metrics on a running instance: a gauge an app sets appears in
-- /metrics with its labels escaped, once per series across workers, with
-- the value of the worker that set it last.
local paygate = require "paygate"
local server = require "support.server"

local APP = [[
local paygate = require "paygate"
local metrics = require "paygate.metrics"
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local pid = tostring(ffi.C.getpid())
local g = metrics.gauge("spec_app_value", "A value the spec sets.")
paygate.route("POST", "/set/:v", function(req)
  assert(g:set(tonumber(req.params.v), { site = 'a"b\\c', zone = "1" }))
  return 200, pid
end)
local special = metrics.gauge("spec_special", "Values that are no numbers.")
paygate.route("POST", "/special", function()
  assert(special:set(0 / 0, { v = "nan" }))
  assert(special:set(-(0 / 0), { v = "nan2" }))
  assert(special:set(1 / 0, { v = "pos" }))
  assert(special:set(-1 / 0, { v = "neg" }))
  return 200, pid
end)
paygate.route("POST", "/remove", function()
  return 200, tostring(g:remove({ site = 'a"b\\c', zone = "1" }))
end)
]]

local function call(s, path)
  local res, err = paygate.http.request{ method = "POST", url = s:url(path),
    headers = { Connection = "close" }, timeout = 10 }
  assert(res, tostring(err))
  assert.equal(200, res.status, res.body)
  return res.body
end

describe("app gauges on /metrics", function()
  local s
  setup(function() s = server.start{ source = APP, workers = 2 } end)
  teardown(function() if s then s:stop() end end)

  it("show the value set last, by whichever worker", function()
    local pids, n, i = {}, 0, 0
    -- new connections until both workers have set it (bounded)
    while (n < 2 or i < 10) and i < 400 do
      i = i + 1
      local pid = call(s, "/set/" .. i .. ".5")
      if not pids[pid] then pids[pid] = true; n = n + 1 end
    end
    assert.equal(2, n)
    local body = assert(s:admin_get("/metrics")).body
    assert.matches("# HELP spec_app_value A value the spec sets.\n"
                   .. "# TYPE spec_app_value gauge\n", body, 1, true)
    local line = 'spec_app_value{site="a\\"b\\\\c",zone="1"} ' .. i .. ".5\n"
    assert.is_truthy(body:find(line, 1, true), body)
    local _, count = body:gsub("spec_app_value{", "")
    assert.equal(1, count)
  end)

  it("spell NaN and infinities as the text format does", function()
    call(s, "/special")
    local body = assert(s:admin_get("/metrics")).body
    for _, line in ipairs({ 'spec_special{v="nan"} NaN\n',
                            'spec_special{v="nan2"} NaN\n',
                            'spec_special{v="pos"} +Inf\n',
                            'spec_special{v="neg"} -Inf\n' }) do
      assert.is_truthy(body:find(line, 1, true), body)
    end
    assert.is_nil(body:find(" %-?nan\n"))
    assert.is_nil(body:find(" %-?inf\n"))
  end)
end)
