-- paygate.metrics on a running instance: a gauge an app sets appears in
-- /metrics with its labels escaped, once per series across workers, with
-- the value of the worker that set it last.
local paygate = require "paygate"
local server = require "support.server"
local rawtcp = require "support.rawtcp"
local utf8 = require "paygate.utf8"

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
-- /many/:name/:n: n series of gauge spec_<name> (label i); answers how
-- many were set
paygate.route("POST", "/many/:name/:n", function(req)
  local m = metrics.gauge("spec_" .. req.params.name, "Many series.")
  local set = 0
  for i = 1, tonumber(req.params.n) do
    if m:set(i, { i = tostring(i) }) then set = set + 1 end
  end
  return 200, tostring(set)
end)
-- label values from outside: bytes that are not UTF-8, a newline
local hostile = metrics.gauge("spec_hostile", "Labels from a request.")
local hostile_c = metrics.counter("spec_hostile_total",
                                  "Labels from a request.", { "v" })
paygate.route("POST", "/hostile", function(req)
  assert(hostile:set(1, { v = req.body }))
  assert(hostile_c:inc({ v = req.body }))
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

  it("show every series a worker holds, up to MAX_SERIES (a report"
     .. " per merchant needs many); past it one warning", function()
    -- one connection: one worker holds them all
    assert.equal("100", call(s, "/many/hundred/100"))
    local body = assert(s:admin_get("/metrics")).body
    for i = 1, 100 do
      assert.is_truthy(body:find('spec_hundred{i="' .. i .. '"} ' .. i
                                 .. "\n", 1, true), i)
    end
    -- past MAX_SERIES (on a server of its own: its worker is full then)
    local max = require("paygate.metrics").MAX_SERIES
    local full = server.start{ source = APP, workers = 1 }
    local ok, err = pcall(function()
      assert.equal(tostring(max), call(full, "/many/over/" .. (max + 5)))
      assert.is_truthy(full:logs():find("metrics: gauge spec_over: a series"
                                        .. " is not shown", 1, true))
      local _, said = full:logs():gsub("a series is not shown", "")
      assert.equal(1, said)
    end)
    full:stop()
    assert(ok, err)
  end)

  it("spell a label value that is not UTF-8 with U+FFFD", function()
    -- (the bytes went out raw: a scraper refuses the whole exposition,
    -- every metric lost, for one bad label value)
    local res = assert(paygate.http.request{ method = "POST",
      url = s:url("/hostile"), body = "a\255b\192\128c\n\"",
      headers = { Connection = "close" }, timeout = 10 })
    assert.equal(200, res.status, res.body)
    local body = assert(s:admin_get("/metrics")).body
    local want = 'v="a\239\191\189b\239\191\189\239\191\189c\\n\\""} 1\n'
    assert.is_truthy(body:find("\nspec_hostile{" .. want, 1, true), body)
    assert.is_truthy(body:find("\nspec_hostile_total{" .. want, 1, true),
                     body)
    assert.is_nil(body:find("[\192\193\245-\255]"), "a byte never in UTF-8")
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

-- More (method, route, status) than a worker's table holds (128): the
-- requests past it were counted nowhere, paygate_requests_total silent on
-- them (the 5xx of a route that failed late among them).
local ROUTES_APP = [[
local paygate = require "paygate"
for i = 1, 70 do
  paygate.route("GET", "/r" .. i, function(req)
    return tonumber(req:query().status) or 200, "ok"
  end)
end
]]

describe("paygate_requests_total past the route table", function()
  local s
  setup(function() s = server.start{ source = ROUTES_APP, workers = 1 } end)
  teardown(function() if s then s:stop() end end)

  it("counts every request, those past it by status class", function()
    local sent = 0
    for _, status in ipairs({ 200, 404, 503 }) do
      for i = 1, 70 do
        local res = assert(paygate.http.request{
          url = s:url("/r" .. i .. "?status=" .. status), timeout = 10 })
        assert.equal(status, res.status)
        sent = sent + 1
      end
    end
    local body = assert(s:admin_get("/metrics")).body
    local total, fivexx = 0, 0
    for labels, v in body:gmatch("\npaygate_requests_total{([^}]*)} (%d+)") do
      total = total + tonumber(v)
      if labels:find('status="5', 1, true) then
        fivexx = fivexx + tonumber(v)
      end
    end
    assert.equal(sent, total, body)
    assert.equal(70, fivexx, body)
    assert.is_truthy(body:find('\npaygate_requests_total{method="OTHER",'
      .. 'route="(overflow)",status="5xx"} ', 1, true), body)
    local count = 0
    for v in body:gmatch("\npaygate_request_duration_seconds_count{[^}]*} "
                         .. "(%d+)") do
      count = count + tonumber(v)
    end
    assert.equal(sent, count, body)
  end)
end)

-- A route pattern longer than a row's label (95 bytes) is cut at a
-- character boundary: a cut inside a UTF-8 character made the exposition
-- invalid UTF-8, which a scraper refuses whole. (Statuses 200 and 456
-- share a slot of the worker's lookup cache: the third request misses it
-- and finds its row by the label.)
local LONG = "/" .. string.rep("a", 93) .. "\195\169" .. string.rep("b", 20)
local LONG_APP = [[
local paygate = require "paygate"
paygate.route("GET", "]] .. LONG .. [[", function(req)
  return tonumber(req:query().status) or 200, "ok"
end)
]]

describe("paygate_requests_total of a long route pattern", function()
  local s
  setup(function() s = server.start{ source = LONG_APP, workers = 1 } end)
  teardown(function() if s then s:stop() end end)

  it("cuts its label at a character boundary, one row per status",
     function()
    -- (raw bytes: the pattern's static segment is matched as sent, and
    -- the HTTP client would percent-encode them)
    for _, status in ipairs({ 200, 456, 200 }) do
      local c = assert(rawtcp.connect(s.port, 5))
      c:send("GET " .. LONG .. "?status=" .. status .. " HTTP/1.1\r\n"
        .. "Host: x\r\nConnection: close\r\n\r\n")
      local got = c:recv_all()
      c:close()
      assert.equal("HTTP/1.1 " .. status, got:sub(1, 12))
    end
    local body = assert(s:admin_get("/metrics")).body
    assert.is_truthy(utf8.len(body), "the exposition is not UTF-8")
    local cut = LONG:sub(1, 94)
    local rows = {}
    for route, status, v in body:gmatch('\npaygate_requests_total{method='
        .. '"GET",route="([^"]*)",status="(%d+)"} (%d+)') do
      rows[#rows + 1] = route .. " " .. status .. " " .. v
    end
    assert.same({ cut .. " 200 2", cut .. " 456 1" }, rows)
  end)
end)

-- paygate.metrics.histogram: there was none (an app could not show how
-- long its calls took, e.g. to WeChat Pay, but as a counter per guessed
-- bucket). One on /metrics: cumulative buckets with the bounds spelt
-- short, +Inf, _sum and _count, summed over the workers and kept when a
-- worker dies.
local HIST_APP = [[
local paygate = require "paygate"
local metrics = require "paygate.metrics"
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local pid = tostring(ffi.C.getpid())
local h = metrics.histogram("spec_call_seconds", "Calls, by endpoint.",
  { "endpoint" }, { buckets = { 0.01, 0.025, 0.1, 2.5, 30 },
                    max_series = 2 })
local bare = metrics.histogram("spec_bare_seconds", "No labels.")
paygate.route("POST", "/observe/:ep/:v", function(req)
  assert(h:observe(tonumber(req.params.v), { endpoint = req.params.ep }))
  assert(bare:observe(tonumber(req.params.v)))
  return 200, pid
end)
]]

describe("app histograms on /metrics", function()
  local s
  setup(function() s = server.start{ source = HIST_APP, workers = 2 } end)
  teardown(function() if s then s:stop() end end)

  local function bucket(body, labels)
    return tonumber(body:match("\nspec_call_seconds_bucket{"
      .. labels:gsub("%p", "%%%0") .. "} (%S+)\n"))
  end

  it("show cumulative buckets, sum and count, summed over the workers"
     .. " and kept when a worker dies", function()
    -- new connections until both workers observed (bounded)
    local pids, n, i = {}, 0, 0
    while (n < 2 or i < 6) and i < 400 do
      i = i + 1
      local v = i % 2 == 0 and "0.02" or "3"
      local pid = call(s, "/observe/a/" .. v)
      if not pids[pid] then pids[pid] = true; n = n + 1 end
    end
    assert.equal(2, n)
    local small, large = math.floor(i / 2), i - math.floor(i / 2)
    local body = assert(s:admin_get("/metrics")).body
    assert.is_truthy(body:find("# HELP spec_call_seconds Calls, by endpoint."
      .. "\n# TYPE spec_call_seconds histogram\n", 1, true), body)
    assert.equal(0, bucket(body, 'endpoint="a",le="0.01"'))
    assert.equal(small, bucket(body, 'endpoint="a",le="0.025"'))
    assert.equal(small, bucket(body, 'endpoint="a",le="2.5"'))
    assert.equal(i, bucket(body, 'endpoint="a",le="30"'))
    assert.equal(i, bucket(body, 'endpoint="a",le="+Inf"'))
    assert.is_truthy(body:find('\nspec_call_seconds_count{endpoint="a"} '
                               .. i .. "\n", 1, true), body)
    local sum = tonumber(body:match(
      '\nspec_call_seconds_sum{endpoint="a"} (%S+)\n'))
    assert.is_true(math.abs(sum - (small * 0.02 + large * 3)) < 1e-9,
                   tostring(sum))
    -- no labels: name_bucket{le=...}, name_sum, name_count
    assert.is_truthy(body:find('\nspec_bare_seconds_bucket{le="+Inf"} ' .. i
                               .. "\n", 1, true), body)
    assert.is_truthy(body:find("\nspec_bare_seconds_count " .. i .. "\n", 1,
                               true), body)
    -- the workers die in turn: their counts stay
    for _, victim in ipairs(s:workers()) do
      s:kill_worker(victim)
    end
    body = assert(s:admin_get("/metrics")).body
    assert.equal(i, bucket(body, 'endpoint="a",le="+Inf"'), body)
    assert.equal(small, bucket(body, 'endpoint="a",le="0.025"'), body)
    local _, once = body:gsub("# TYPE spec_call_seconds histogram", "")
    assert.equal(1, once)
  end)

  it("cap label sets: the rest go to the _overflow series", function()
    -- one connection: one worker, cap 2 (a, then b, c, d: b is the
    -- second; c and d overflow)
    local res = assert(paygate.http.request{ method = "POST",
      url = s:url("/observe/b/0.05"), timeout = 10 })
    assert.equal(200, res.status)
    for _, ep in ipairs({ "b", "c", "d" }) do
      call(s, "/observe/" .. ep .. "/0.05")
    end
    local body = assert(s:admin_get("/metrics")).body
    local eps = {}
    for ep in body:gmatch('\nspec_call_seconds_count{endpoint="([^"]*)"}')
    do
      eps[#eps + 1] = ep
    end
    assert.is_true(#eps <= 3, body)     -- two held, the overflow
    assert.is_truthy(body:find('\nspec_call_seconds_count{endpoint='
                               .. '"_overflow"} ', 1, true), body)
  end)
end)

-- A histogram whose buckets a reload changed: the retired totals (the
-- first generation's counts, kept when its workers stopped) held the old
-- bounds, and theirs were the ones shown -- the first series of the name
-- met -- for as long as the server ran: the new buckets never appeared.
-- Shown now in the bounds of the code running, the older counts merged
-- upwards into them.
describe("an app histogram whose buckets a reload changed", function()
  local proc = require "paygate.testing.proc"
  local function source(buckets)
    return ([[
local paygate = require "paygate"
local h = require("paygate.metrics").histogram("spec_rebucketed_seconds",
  "Rebucketed.", { "q" }, { buckets = %s })
paygate.route("POST", "/observe/:v", function(req)
  assert(h:observe(tonumber(req.params.v), { q = "a" }))
  return 200, "ok"
end)
paygate.route("GET", "/buckets", function() return 200, %q end)
]]):format(buckets, buckets)
  end

  it("shows the new bounds once the new workers run, the old counts"
     .. " merged", function()
    local s = server.start{ source = source("{ 0.1, 1, 10 }"), workers = 2 }
    finally(function() s:stop() end)
    for _ = 1, 4 do call(s, "/observe/0.5") end
    local f = assert(io.open(s.app .. "/app.lua", "w"))
    f:write(source("{ 0.05, 0.5, 5 }"))
    f:close()
    s:signal(proc.SIGHUP)
    proc.wait_until(function()
      local res = paygate.http.request{ url = s:url("/buckets"),
        headers = { Connection = "close" }, timeout = 5 }
      return res and res.body == "{ 0.05, 0.5, 5 }"
    end, 10, "the reload")
    -- every old worker gone: their counts are the retired totals
    proc.wait_until(function() return #s:workers() == 2 end, 10)
    paygate.sleep(0.5)
    for _ = 1, 3 do call(s, "/observe/0.3") end
    local body = assert(s:admin_get("/metrics")).body
    local function bucket(le)
      return tonumber(body:match('\nspec_rebucketed_seconds_bucket{q="a",le="'
                                 .. le:gsub("%p", "%%%0") .. '"} (%S+)\n'))
    end
    assert.equal(0, bucket("0.05"), body)
    assert.equal(3, bucket("0.5"), body)     -- the old 0.5 s were <= 1 only
    assert.equal(7, bucket("5"), body)
    assert.equal(7, bucket("+Inf"), body)
    assert.is_nil(bucket("0.1"), body)
    assert.is_nil(bucket("10"), body)
  end)
end)
