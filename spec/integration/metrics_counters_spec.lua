-- paygate.metrics counters on a running instance: summed over the
-- workers, kept when a worker dies and is restarted, with the series cap
-- and its overflow series across workers.
local paygate = require "paygate"
local server = require "support.server"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
local metrics = require "paygate.metrics"
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local pid = tostring(ffi.C.getpid())
local c = metrics.counter("spec_hits_total", "Hits the spec made.",
                          { "k", "outcome" }, { max_series = 3 })
local plain = metrics.counter("spec_plain_total", "Hits, no labels.", {})
paygate.route("POST", "/inc/:k", function(req)
  assert(c:inc({ k = req.params.k, outcome = 'a"b' }))
  assert(plain:inc({}))
  return 200, pid
end)
paygate.route("POST", "/die", function()
  os.exit(3)
end)
]]

local function call(s, path)
  local res, err = paygate.http.request{ method = "POST", url = s:url(path),
    headers = { Connection = "close" }, timeout = 10 }
  if not res then return nil, err end
  assert.equal(200, res.status, res.body)
  return res.body
end

local function value(body, labels)
  local v = body:match("\nspec_hits_total{" .. labels:gsub("%p", "%%%0")
                       .. "} ([%d.e+]+)\n")
  return tonumber(v or 0)
end

describe("app counters on /metrics", function()
  local s
  setup(function() s = server.start{ source = APP, workers = 2 } end)
  teardown(function() if s then s:stop() end end)

  it("sum over workers, survive a worker's death, cap the label sets",
     function()
    local pids, n, i = {}, 0, 0
    while (n < 2 or i < 10) and i < 400 do      -- both workers counted
      i = i + 1
      local pid = assert(call(s, "/inc/a"))
      if not pids[pid] then pids[pid] = true; n = n + 1 end
    end
    assert.equal(2, n)
    local body = assert(s:admin_get("/metrics")).body
    assert.matches("# HELP spec_hits_total Hits the spec made.\n"
                   .. "# TYPE spec_hits_total counter\n", body, 1, true)
    assert.equal(i, value(body, 'k="a",outcome="a\\"b"'), body)
    local _, count = body:gsub("\nspec_hits_total{", "")
    assert.equal(1, count)

    -- a worker dies: its counts stay in the total
    call(s, "/die")
    proc.wait_until(function()
      local b = assert(s:admin_get("/metrics")).body
      return b:find("paygate_worker_restarts_total 1\n", 1, true)
             and b:find("paygate_workers 2\n", 1, true)
    end, 15, "the worker's restart")
    body = assert(s:admin_get("/metrics")).body
    assert.equal(i, value(body, 'k="a",outcome="a\\"b"'), body)
    assert(call(s, "/inc/a"))
    body = assert(s:admin_get("/metrics")).body
    assert.equal(i + 1, value(body, 'k="a",outcome="a\\"b"'), body)
    -- a counter without labels: one line, the dead worker's count in it
    -- (it was once shown apart, as spec_plain_total{})
    assert.is_nil(body:find("spec_plain_total{", 1, true), body)
    assert.equal(tostring(i + 1), body:match("\nspec_plain_total (%d+)\n"),
                 body)

    -- 3 label sets at most across workers; the rest in _overflow
    for k = 1, 40 do assert(call(s, "/inc/k" .. k)) end
    body = assert(s:admin_get("/metrics")).body
    local _, sets = body:gsub("\nspec_hits_total{k=\"[ak]%d*\"", "")
    assert.equal(3, sets, body)
    local total = 0
    for v in body:gmatch("\nspec_hits_total{[^}]*} ([%d.e+]+)") do
      total = total + tonumber(v)
    end
    assert.equal(i + 41, total, body)
    assert.is_true(value(body, 'k="_overflow",outcome="_overflow"') >= 38,
                   body)

    -- a reload replaces both workers: the totals stay
    local out = s.dir .. "/reload.out"
    local p = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                           s.dir .. "/paygate.pid" }, { log = out })
    assert.equal(0, p:wait(30), proc.read(out))
    body = assert(s:admin_get("/metrics")).body
    assert.is_truthy(body:find("paygate_reloads_total 1\n", 1, true), body)
    local after = 0
    for v in body:gmatch("\nspec_hits_total{[^}]*} ([%d.e+]+)") do
      after = after + tonumber(v)
    end
    assert.equal(i + 41, after, body)
    assert(call(s, "/inc/a"))
    body = assert(s:admin_get("/metrics")).body
    assert.equal(i + 2, value(body, 'k="a",outcome="a\\"b"'), body)
  end)
end)
