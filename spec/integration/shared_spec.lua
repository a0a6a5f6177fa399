-- paygate.shared across the workers of one `paygate run`: add is atomic
-- across processes, a value set by one worker is read by another, the
-- dictionaries outlive a reload, sizes come from the config, /metrics
-- shows them.
local paygate = require "paygate"
local server = require "support.server"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
local shared = require "paygate.shared"
local ffi = require "ffi"
pcall(ffi.cdef, "int getpid(void);")
local pid = tostring(ffi.C.getpid())
local d = shared.get_dict("counters")
paygate.route("POST", "/add/:k", function(req)
  local ok = d:add(req.params.k, pid)
  return 200, tostring(ok) .. " " .. pid
end)
paygate.route("POST", "/set/:k/:v", function(req)
  assert(d:set(req.params.k, req.params.v))
  return 200, pid
end)
paygate.route("GET", "/get/:k", function(req)
  return 200, tostring(d:get(req.params.k)) .. " " .. pid
end)
paygate.route("GET", "/capacity", function()
  return 200, tostring(shared.paygate:stats().capacity)
end)
paygate.route("GET", "/unknown", function()
  return 200, tostring(shared.get_dict("nope"))
end)
]]

local CONFIG = [[return { shared = { counters = "1m", paygate = "16m" } }]]

-- a request on a new connection (so either worker may take it)
local function call(s, method, path)
  local res, err = paygate.http.request{ method = method, url = s:url(path),
    headers = { Connection = "close" }, timeout = 10 }
  assert(res, tostring(err))
  assert.equal(200, res.status, res.body)
  return res.body
end

describe("paygate.shared across workers", function()
  local s

  setup(function()
    s = server.start{ source = APP, workers = 2, config = CONFIG }
  end)
  teardown(function() if s then s:stop() end end)

  it("lets exactly one of many concurrent adds win", function()
    local pids = {}
    for round = 1, 5 do
      local tasks = {}
      for i = 1, 40 do
        tasks[i] = paygate.spawn(function()
          return paygate.http.request{ method = "POST",
            url = s:url("/add/race" .. round), timeout = 10 }
        end)
      end
      local wins = 0
      for i = 1, 40 do
        local res = assert(tasks[i]:wait())
        assert.equal(200, res.status)
        local ok, pid = res.body:match("^(%a+) (%d+)$")
        pids[pid] = true
        if ok == "true" then wins = wins + 1 end
      end
      assert.equal(1, wins, "round " .. round)
    end
  end)

  it("shows a value set by one worker to the other", function()
    local setter = call(s, "POST", "/set/shared_key/hello")
    local seen_by
    proc.wait_until(function()
      local body = call(s, "GET", "/get/shared_key")
      local v, pid = body:match("^(%S+) (%d+)$")
      assert.equal("hello", v)
      if pid ~= setter then seen_by = pid end
      return seen_by ~= nil
    end, 20, "a request served by the other worker")
    assert.is_truthy(seen_by)
  end)

  it("sizes the dictionaries from the config (paygate resized)", function()
    local cap = tonumber(call(s, "GET", "/capacity"))
    assert.is_true(cap > 15 * 1024 * 1024, tostring(cap))
  end)

  it("raises for a dictionary that is not configured", function()
    local res = assert(s:request("/unknown"))
    assert.equal(500, res.status)
    proc.wait_until(function()
      return s:logs():find("no dictionary 'nope'", 1, true) ~= nil
    end, 5, "the error in the log")
  end)

  it("exports paygate_shared_* metrics per dictionary", function()
    call(s, "POST", "/set/m/1")
    local body = assert(s:admin_get("/metrics")).body
    assert.matches('paygate_shared_capacity_bytes{dict="counters"} %d+', body)
    assert.matches('paygate_shared_capacity_bytes{dict="paygate"} %d+', body)
    local used = tonumber(body:match('paygate_shared_used_bytes{dict="counters"} (%d+)'))
    assert.is_true(used > 0)
    assert.matches('paygate_shared_entries{dict="counters"} %d+', body)
    assert.matches('paygate_shared_evictions_total{dict="counters"} 0', body)
  end)

  it("keeps its entries across a reload", function()
    -- the workers before the reload: the master's children
    local before = {}
    local f = assert(io.open(("/proc/%d/task/%d/children"):format(s.pid, s.pid)))
    for pid in f:read("*a"):gmatch("%d+") do before[pid] = true end
    f:close()
    assert.is_true(before[call(s, "POST", "/set/survivor/still_here")])
    local out = s.dir .. "/reload.out"
    local p = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                           s.dir .. "/paygate.pid" }, { log = out })
    assert.equal(0, p:wait(30), proc.read(out))
    -- a worker of the new generation reads what the old one wrote (a
    -- connection an old worker closes while it drains is tried again)
    local served = false
    proc.wait_until(function()
      local res = paygate.http.request{ url = s:url("/get/survivor"),
        headers = { Connection = "close" }, timeout = 10 }
      if not res then return false end
      local v, pid = res.body:match("^(%S+) (%d+)$")
      assert.equal("still_here", v)
      served = pid ~= nil and not before[pid]
      return served
    end, 20, "a new worker")
    assert.is_true(served)
  end)
end)

describe("config shared", function()
  -- a size is digits and an optional unit: a sign, a space, a fraction
  -- or an exponent (which strtod took) is refused too
  it("refuses a bad size with exit code 2, naming the key", function()
    -- as Lua source: strings, and numbers that are no byte count
    local sizes = {}
    for _, s in ipairs({ "lots", "+16m", " 16m", "16m ", "1.5m", "1e6" }) do
      sizes[#sizes + 1] = ("%q"):format(s)
    end
    for _, n in ipairs({ "1048576.5", "-1048576", "0/0", "2^40" }) do
      sizes[#sizes + 1] = n
    end
    for _, size in ipairs(sizes) do
      local dir = server.tmpdir()
      local f = assert(io.open(dir .. "/c.lua", "w"))
      f:write(("return { shared = { cache = %s } }"):format(size))
      f:close()
      local log = dir .. "/out"
      local p = proc.spawn({ PAYGATE_BIN, "run", "examples/hello", "--config",
                             dir .. "/c.lua", "--listen", "127.0.0.1:0",
                             "--admin", "off" }, { log = log })
      local code = p:wait(10)
      if code == nil then p:stop() end     -- it took the size: not left
      local out = proc.read(log)
      os.execute("rm -rf " .. dir)
      assert.equal(2, code, size .. ": " .. out)
      assert.matches("config.shared.cache must be a size: digits and an"
                     .. " optional unit k, m or g", out, 1, true)
    end
  end)

  -- read as a C string, "cache\0x" was the dictionary "cache" (and beside
  -- a "cache", refused as "shared dictionary cache exists")
  it("refuses a name with a NUL byte with exit code 2", function()
    for _, shared in ipairs({ '{ ["cache\\0x"] = "1m" }',
                              '{ ["cache\\0x"] = "1m", cache = "1m" }' }) do
      local dir = server.tmpdir()
      local f = assert(io.open(dir .. "/c.lua", "w"))
      f:write("return { shared = " .. shared .. " }")
      f:close()
      local log = dir .. "/out"
      local p = proc.spawn({ PAYGATE_BIN, "run", "examples/hello",
                             "--config", dir .. "/c.lua", "--listen",
                             "127.0.0.1:0", "--admin", "off" }, { log = log })
      local code = p:wait(10)
      if code == nil then p:stop() end   -- it took the name: not left
      local out = proc.read(log)
      os.execute("rm -rf " .. dir)
      assert.equal(2, code, shared .. ": " .. out)
      assert.matches('config.shared: the name "cache" has a NUL byte in it',
                     out, 1, true)
    end
  end)
end)

describe("a dictionary added to the config file for a reload", function()
  it("is refused saying it takes a restart, not that it is unconfigured",
     function()
    local s = server.start{ source = APP, workers = 1, config = CONFIG }
    finally(function() s:stop() end)
    local f = assert(io.open(s.config_file, "w"))
    f:write([[return { shared = { counters = "1m", paygate = "16m",
                                  sessions = "1m" } }]])
    f:close()
    f = assert(io.open(s.app .. "/app.lua", "w"))
    f:write(APP .. '\nrequire("paygate.shared").get_dict("sessions")\n')
    f:close()
    local out = s.dir .. "/reload.out"
    local p = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                           s.dir .. "/paygate.pid" }, { log = out })
    assert.equal(1, p:wait(30), proc.read(out))
    -- "configure shared = { sessions = ... }" alone sent the operator to
    -- the line they had just written
    assert.matches("no dictionary 'sessions'.*a restart", proc.read(out))
  end)
end)
