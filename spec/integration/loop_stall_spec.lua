-- The loop-stall watchdog (limits.loop_stall): a worker whose event loop
-- stops turning (a handler that never yields) is logged in one line,
-- counted on /metrics, killed and replaced; a new worker that stalls while
-- it loads refuses its reload at once; `false` turns the watchdog off.
local paygate = require "paygate"
local server = require "support.server"
local proc = require "support.proc"

-- /pid answers the worker's pid (which worker served it); /spin never
-- yields; /hello is a route of a healthy worker
local APP = [[
local paygate = require "paygate"
local function pid()
  local f = io.open("/proc/self/stat")
  local s = f:read("*l")
  f:close()
  return s:match("^(%d+)")
end
paygate.route("GET", "/pid", function() return 200, pid() end)
paygate.route("GET", "/hello", function() return 200, "hello" end)
paygate.route("GET", "/spin", function()
  while true do end
end)
]]

local function metric(s, name)
  local res = s:admin_get("/metrics")
  return res and tonumber(res.body:match("\n" .. name .. " (%d+)"))
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then return false end
  local s = f:read("*a")
  f:close()
  return not s:match("State:%s+Z")
end

-- a request to /spin that the client gives up on after a second (the
-- worker never answers it)
local function spin(s)
  paygate.spawn(function() s:request{ path = "/spin", timeout = 1 } end)
end

describe("limits.loop_stall", function()
  it("refuses a value that is not seconds (at least 2), false or 0",
     function()
    for _, bad in ipairs{ '"30"', "true", "1", "-1", "0.5" } do
      local dir = server.tmpdir()
      write(dir .. "/config.lua",
            "return { limits = { loop_stall = " .. bad .. " } }\n")
      assert(os.execute("mkdir -p " .. dir .. "/app"))
      write(dir .. "/app/app.lua", APP)
      local code, out = proc.run({ PAYGATE_BIN, "run", dir .. "/app",
                                   "--config", dir .. "/config.lua",
                                   "--listen", "127.0.0.1:0",
                                   "--admin", "off", "--workers", "1" },
                                 { timeout = 20 })
      server.rmdir(dir)
      assert.equal(2, code, bad .. ": " .. tostring(out))
      assert.matches("config.limits.loop_stall must be a number of seconds"
                     .. " (at least 2), or false or 0 (off)", out, 1, true)
    end
  end)
end)

describe("a worker whose loop stalls", function()
  it("is logged, counted, killed and replaced", function()
    local s = server.start{ source = APP, workers = 1,
                            config = { limits = { loop_stall = 2 } } }
    finally(function() s:stop() end)
    assert.equal(0, metric(s, "paygate_worker_stalls_total"))
    local old = assert(s:request("/pid")).body
    spin(s)
    local line = proc.wait_until(function()
      for l in s:logs():gmatch("[^\n]+") do
        if l:find("worker " .. old .. " (", 1, true)
           and l:find(") stalled: ", 1, true) then
          return l
        end
      end
    end, 15, "the stall's log line")
    assert.matches('"level":"error"', line, 1, true)
    assert.matches("worker " .. old .. " %(index %d+, generation 1, "
                   .. "serving%) stalled: its event loop has not turned for "
                   .. "[%d.]+ s %(limits.loop_stall 2 s%)", line)
    assert.matches("a handler, hook or task that never yields", line, 1,
                   true)
    assert.matches("the last request it started: GET /spin (request ", line,
                   1, true)
    assert.matches("killing it (SIGKILL)", line, 1, true)
    proc.wait_until(function()
      return metric(s, "paygate_worker_stalls_total") == 1
    end, 10, "the stall counted")
    -- replaced: a new worker serves the next request, the old one is gone
    local new = proc.wait_until(function()
      local res = s:request{ path = "/pid", timeout = 2 }
      return res and res.status == 200 and res.body ~= old and res.body
    end, 15, "a new worker serving")
    assert.equal("hello", assert(s:request("/hello")).body)
    assert.is_false(alive(old))
    assert.matches("worker " .. old .. " killed by the watchdog (its loop "
                   .. "stalled); restarting in ", s:logs(), 1, true)
    assert.equal(1, metric(s, "paygate_worker_restarts_total"))
    -- the stall is said once, not at every check until the worker is reaped
    local _, n = s:logs():gsub("%) stalled: ", "")
    assert.equal(1, n)
    assert.is_true(alive(tonumber(new)))
  end)

  it("is left alone when loop_stall is false", function()
    local s = server.start{ source = APP, workers = 1,
                            config = { shutdown_timeout = 1,
                                       limits = { loop_stall = false } } }
    finally(function()
      -- stuck in /spin it never reads its TERM: end it here
      for _, pid in ipairs(s:workers()) do proc.kill_pid(pid, proc.SIGKILL) end
      s:stop()
    end)
    local old = tonumber(assert(s:request("/pid")).body)
    spin(s)
    -- the spin has begun once a second request finds no answer either
    local res = s:request{ path = "/hello", timeout = 1 }
    assert.is_nil(res)
    -- observed for twice the limit the spec above gives, and more
    local till = paygate.update_time() + 5
    while paygate.update_time() < till do
      assert.is_true(alive(old), "the worker was killed")
      paygate.sleep(0.2)
    end
    assert.same({ old }, s:workers())
    assert.is_nil(s:logs():find("stalled", 1, true))
    assert.equal(0, metric(s, "paygate_worker_stalls_total"))
  end)
end)

describe("a server stopped and continued as a whole", function()
  -- ^Z and fg of `paygate run`, docker pause, a frozen cgroup: the
  -- monotonic clock runs on while no process runs, master included
  it("is no stall: no worker is killed for the pause", function()
    local SIGSTOP, SIGCONT = 19, 18
    local s = server.start{ source = APP, workers = 2,
                            config = { limits = { loop_stall = 2 } } }
    local before = s:workers()
    local all = { s.pid, before[1], before[2] }
    finally(function()
      for _, pid in ipairs(all) do proc.kill_pid(pid, SIGCONT) end
      s:stop()
    end)
    assert.equal(2, #before)
    for _, pid in ipairs(all) do proc.kill_pid(pid, SIGSTOP) end
    -- stopped for twice the limit
    local till = paygate.update_time() + 4
    while paygate.update_time() < till do paygate.sleep(0.1) end
    for _, pid in ipairs(all) do proc.kill_pid(pid, SIGCONT) end
    -- observed past the limit: none is killed, the same workers serve
    till = paygate.update_time() + 3
    while paygate.update_time() < till do
      assert.is_nil(s:logs():find("stalled", 1, true), s:logs())
      paygate.sleep(0.2)
    end
    -- the master said it did not run, and judged the workers from then
    assert.matches('"level":"warn"[^\n]*"msg":"watchdog: the master did not'
                   .. " run for [%d.]+ s %(the processes stopped or frozen,"
                   .. " or the machine starved%); the workers' loops are"
                   .. " judged from now", s:logs())
    assert.equal("hello", assert(s:request("/hello")).body)
    assert.same(before, s:workers())
    assert.equal(0, metric(s, "paygate_worker_stalls_total"))
  end)
end)

describe("a worker that stalls while loading the app", function()
  it("refuses the reload at once, naming the stall", function()
    local s = server.start{ source = APP, workers = 1,
                            config = { limits = { loop_stall = 2 } } }
    finally(function() s:stop() end)
    local old = assert(s:request("/pid")).body
    write(s.app .. "/app.lua", "while true do end\n")
    local t0 = paygate.update_time()
    local ok, out = s:reload(30)
    -- not the 60 s a new generation has to load
    assert.is_true(paygate.update_time() - t0 < 20)
    assert.is_nil(ok)
    assert.matches("refused: a new worker stalled while loading the app "
                   .. "(its event loop did not turn for ", out, 1, true)
    assert.matches("never yields", out, 1, true)
    assert.equal(old, assert(s:request("/pid")).body)
    assert.matches("generation 2, loading the app) stalled: ", s:logs(), 1,
                   true)
    assert.equal(1, metric(s, "paygate_worker_stalls_total"))
  end)

  it("at the start, ends the start instead of hanging", function()
    local dir = server.tmpdir()
    write(dir .. "/config.lua", "return { limits = { loop_stall = 2 } }\n")
    assert(os.execute("mkdir -p " .. dir .. "/app"))
    write(dir .. "/app/app.lua", "while true do end\n")
    local code, out = proc.run({ PAYGATE_BIN, "run", dir .. "/app",
                                 "--config", dir .. "/config.lua",
                                 "--listen", "127.0.0.1:0",
                                 "--admin", "off", "--workers", "1" },
                               { timeout = 20 })
    server.rmdir(dir)
    assert.equal(1, code, tostring(out))
    assert.matches("generation 1, loading the app) stalled: ", out, 1, true)
    assert.matches("killed by the watchdog (its loop stalled) before "
                   .. "serving", out, 1, true)
  end)
end)
