-- A refused reload loses nothing. Here the new code loads in one worker of
-- the new generation and fails in the other, while clients send requests
-- without pause: every request gets a whole answer, from the old code (the
-- refused generation answers none), `paygate reload` says refused, and the
-- old generation keeps serving afterwards.
--
-- Which worker fails is decided by an atomic add in the shared dictionary:
-- the first to load the new code passes, the second waits until requests
-- are in flight on the new code (if any worker of the new generation
-- accepted them) or 2 s, then raises. Its requests take 1 s, so if the
-- whole new generation were killed when the reload is refused, a client
-- would see its connection closed unanswered.
--
-- The clients are raw non-blocking sockets driven by poll() in this
-- process: no client library retries a failed request behind our back.
local ffi = require "ffi"
local server = require "support.server"
local proc = require "support.proc"
local paygate = require "paygate"
local hammer = require("support.hammer").hammer
local C = ffi.C

local V1 = [[
local paygate = require "paygate"
paygate.route("GET", "/version", function() return 200, "v1" end)
]]

local V2 = [[
local paygate = require "paygate"
local core = require "paygate.core"
local d = require("paygate.shared").get_dict("paygate")
paygate.route("GET", "/version", function()
  d:incr("v2_in_flight", 1, 0)
  core.sleep(1)
  d:incr("v2_in_flight", -1, 0)
  return 200, "v2"
end)
if not d:add("v2_loaded", true) then
  -- the second worker to load this code
  local deadline = core.mono() + 2
  while (d:get("v2_in_flight") or 0) < 2 and core.mono() < deadline do
    core.sleep(0.02)
  end
  error("the second worker cannot load v2")
end
]]

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- After a refused reload: the loaded new worker's on_stop wrote mark, it
-- exited 0, and the old code serves.
local function assert_stopped_gracefully(s, mark)
  local stopped = pcall(proc.wait_until,
    function() return proc.read(mark) == "stopped\n" end,
    10, "the loaded worker's on_stop function")
  assert(stopped, "the loaded worker's on_stop function did not run:\n"
                  .. s:logs())
  assert.equal("v1", assert(s:request("/version")).body)
  -- (the mark is written before the worker exits: wait for the master to
  -- have seen the exit)
  proc.wait_until(function()
    return s:logs():find("worker %d+ %(generation 2%) exited with status 0")
  end, 10, "the master to log the loaded worker's exit (status 0)")
end

describe("a reload refused by one worker of the new generation", function()
  local s
  after_each(function() if s then s:stop(); s = nil end end)

  it("loses no request, and the old code keeps serving", function()
    s = server.start{ source = V1, workers = 2,
                      args = { "--no-access-log" } }
    -- (server.start has waited for both workers to load v1)
    write(s.app .. "/app.lua", V2)
    local out = s.dir .. "/reload.out"
    local reloader, ended
    local answers, failures = hammer(s, { close = 12, keep = 4 }, function(t)
      if reloader == nil and t > 0.3 then
        reloader = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                                s.dir .. "/paygate.pid" }, { log = out })
      end
      if reloader and not ended and reloader:poll() then ended = t end
      return not ended or t - ended < 0.5     -- and traffic after it
    end)
    local said = proc.read(out)
    assert.equal(1, reloader.status, "paygate reload: " .. said)
    assert.matches("refused: a new worker failed to load the app: .*"
                   .. "the second worker cannot load v2", said)
    assert.same({}, failures, s:logs())
    assert.is_true((answers.v1 or 0) > 100,
                   ("only %d requests answered"):format(answers.v1 or 0))
    -- the refused code answered nothing
    assert.is_nil(answers.v2, s:logs())
    -- and the old generation goes on
    assert.equal("v1", assert(s:request("/version")).body)
    local health = assert(s:admin_get("/healthz"))
    assert.matches('"workers":2,"generation":1', health.body)
  end)
end)

-- The workers of a refused generation that had loaded the app stop
-- gracefully (they accepted nothing): their paygate.on_stop functions run,
-- so what their tasks took -- a lease above all -- is given back at once
-- rather than when its ttl runs out. Only a worker still loading is
-- killed (it may be stuck).
local V3 = [[
local paygate = require "paygate"
local core = require "paygate.core"
local d = require("paygate.shared").get_dict("paygate")
local MARK = %q
paygate.route("GET", "/version", function() return 200, "v3" end)
if d:add("v3_loaded", true) then
  paygate.on_stop(function()
    local f = assert(io.open(MARK, "w"))
    f:write("stopped\n")
    f:close()
  end)
  -- a timer runs once the loading is over: its ready message is sent
  paygate.timer.at(0, function() d:set("v3_ready", true) end)
  return
end
-- the second worker: fails once the first has said it loaded. Its failure
-- may reach the master before that message is read (both wait in the
-- master's sockets): the master reads it before it decides.
local deadline = core.mono() + 10
while not d:get("v3_ready") and core.mono() < deadline do
  core.sleep(0.02)
end
error("the second worker cannot load v3")
]]

describe("a refused generation's workers that had loaded", function()
  local s
  after_each(function() if s then s:stop(); s = nil end end)

  it("stop gracefully: their on_stop functions run", function()
    s = server.start{ source = V1, workers = 2 }
    local mark = s.dir .. "/v3.stopped"
    write(s.app .. "/app.lua", V3:format(mark))
    local out = s.dir .. "/reload.out"
    local p = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                           s.dir .. "/paygate.pid" }, { log = out })
    assert.equal(1, p:wait(30), proc.read(out))
    assert.matches("the second worker cannot load v3", proc.read(out))
    assert_stopped_gracefully(s, mark)
  end)
end)

-- paygate.runtime.fail is for a worker ending itself while it loads. One
-- that has loaded (its 'R' sent) and waits for its generation's go must
-- not be cut off by it: the master reads nothing more from it, and the
-- worker, its socket closed, would never get the go -- never accepting,
-- though counted as serving. Here the first new worker calls it from a
-- timer while the second still loads; the second is then stopped
-- (SIGSTOP), so only the first can answer.
local V4 = [[
local paygate = require "paygate"
local core = require "paygate.core"
local d = require("paygate.shared").get_dict("paygate")
paygate.route("GET", "/version", function() return 200, "v4" end)
paygate.route("GET", "/facts", function()
  return 200, tostring(d:get("v4_second")) .. " "
    .. tostring(d:get("v4_fail"))
end)
if d:add("v4_first", true) then
  paygate.timer.at(0.1, function()
    d:set("v4_fail", tostring(paygate.runtime.fail("late")))
  end)
  return
end
d:set("v4_second", core.pid())
local deadline = core.mono() + 10
while not d:get("v4_fail") and core.mono() < deadline do
  core.sleep(0.02)
end
]]

describe("paygate.runtime.fail after the worker loaded", function()
  local s, stopped
  after_each(function()
    if stopped then proc.kill_pid(stopped, 18) end     -- SIGCONT
    stopped = nil
    if s then s:stop(); s = nil end
  end)

  it("is refused (false), and the worker serves", function()
    s = server.start{ source = V1, workers = 2 }
    write(s.app .. "/app.lua", V4)
    local out = s.dir .. "/reload.out"
    local p = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                           s.dir .. "/paygate.pid" }, { log = out })
    assert.equal(0, p:wait(30), proc.read(out))
    -- (Connection: close: no pooled connection to the worker stopped below)
    local facts = assert(s:request{ path = "/facts",
                                    headers = { Connection = "close" } }).body
    local second, told = facts:match("^(%d+) (%S+)$")
    assert.equal("false", told, facts)
    stopped = assert(tonumber(second), facts)
    assert.equal(0, proc.kill_pid(stopped, 19))           -- SIGSTOP
    local res, err = s:request{ path = "/version", timeout = 3 }
    assert.equal("v4", res and res.body, tostring(err))
  end)
end)

-- A loaded worker's 'R' may still wait in the master's socket when the
-- master handles another new worker's failure: the master reads it before
-- it decides, so that worker stops gracefully (its on_stop runs) and is not
-- killed as one still loading. Made certain here: the first worker to load
-- stops the master (SIGSTOP) once the second has started, then fails; the
-- second finishes loading only once the first has exited, so its 'R' comes
-- after the failure (the master, continued, sees the failure first).
-- (after a first line that sets MASTER, MARK and READY)
local V5 = [[
local paygate = require "paygate"
local core = require "paygate.core"
local proc = require "paygate.testing.proc"
local d = require("paygate.shared").get_dict("paygate")
paygate.route("GET", "/version", function() return 200, "v5" end)
local function wait(cond) return proc.wait_until(cond, 10) end
local function state(pid)      -- /proc's one-letter state: T stopped, Z ended
  local stat = pid and proc.read("/proc/" .. pid .. "/stat") or ""
  return stat:match("^%d+ %(.*%) (%a)")
end
if d:add("v5_first", true) then
  wait(function() return d:get("v5_second") end)
  proc.kill_pid(MASTER, 19)                           -- SIGSTOP
  wait(function() return state(MASTER) == "T" end)
  d:set("v5_first_pid", core.pid())
  error("the first worker cannot load v5")
end
d:set("v5_second", true)
-- until the first worker has exited: its failure was sent before
wait(function() return state(d:get("v5_first_pid")) == "Z" end)
paygate.on_stop(function()
  local f = assert(io.open(MARK, "w"))
  f:write("stopped\n")
  f:close()
end)
-- (a timer runs once the loading is over: the 'R' is sent by then)
paygate.timer.at(0, function()
  local f = assert(io.open(READY, "w"))
  f:close()
end)
]]

describe("a loaded worker's ready message read after another's failure",
         function()
  local s
  after_each(function()
    if s then
      proc.kill_pid(s.pid, 18)                          -- SIGCONT
      s:stop()
      s = nil
    end
  end)

  it("still counts: the worker stops gracefully, not killed", function()
    s = server.start{ source = V1, workers = 2 }
    local mark, ready = s.dir .. "/v5.stopped", s.dir .. "/v5.ready"
    write(s.app .. "/app.lua", ("local MASTER, MARK, READY = %d, %q, %q\n")
                                 :format(s.pid, mark, ready) .. V5)
    local out = s.dir .. "/reload.out"
    local p = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                           s.dir .. "/paygate.pid" }, { log = out })
    proc.wait_until(function() return proc.exists(ready) end, 15,
                    "the second worker to load (the master stopped)")
    assert.equal(0, proc.kill_pid(s.pid, 18))             -- SIGCONT
    assert.equal(1, p:wait(30), proc.read(out))
    assert.matches("the first worker cannot load v5", proc.read(out))
    assert_stopped_gracefully(s, mark)
  end)
end)

-- A new worker that says why it cannot load ('F' and a reason) and exits
-- may be reaped before its message is read: the master's SIGCHLD handling
-- (waitpid for any child) runs for another child's exit, and the failed
-- worker has exited by the time it looks again. Its reason must still be
-- the reload's outcome, not "died while loading". Made certain here: the
-- master's stderr is a FIFO this spec fills, so the master blocks writing
-- its line about a serving worker killed here, between two waitpid calls;
-- meanwhile the new worker says its reason and exits; then the FIFO is
-- drained.
local V6 = [[
local paygate = require "paygate"
local proc = require "paygate.testing.proc"
proc.wait_until(function() return proc.exists(GO) end, 30, "go")
paygate.runtime.fail("v6 needs its setting")
os.exit(1)
]]

for _, decl in ipairs{
  "int open(const char *path, int flags, ...);",
  "long read(int fd, void *buf, unsigned long len);",
  "long write(int fd, const void *buf, unsigned long len);",
} do
  pcall(ffi.cdef, decl)
end

describe("a new worker's reason read only after it was reaped", function()
  it("is the refused reload's outcome", function()
    local core = require "paygate.core"
    local dir = server.tmpdir()
    os.execute("mkdir -p " .. dir .. "/app")
    write(dir .. "/app/app.lua", V1)
    local fifo = dir .. "/log"
    assert(os.execute("mkfifo " .. fifo) == 0)
    local fd = C.open(fifo, 2 + 2048)               -- O_RDWR | O_NONBLOCK
    assert(fd >= 0, "open the FIFO")
    local hold, log, done = false, {}, false
    local buf = ffi.new("char[65536]")
    local drain = paygate.spawn(function()
      while not done do
        if not hold then
          local n = tonumber(C.read(fd, buf, 65536))
          if n > 0 then log[#log + 1] = ffi.string(buf, n) end
        end
        paygate.sleep(0.01)
      end
    end)
    local port, admin = core.free_port(), core.free_port()
    while admin == port do admin = core.free_port() end
    local pid_file = dir .. "/paygate.pid"
    local p = proc.spawn({ PAYGATE_BIN, "run", dir .. "/app", "--workers",
      "1", "--listen", "127.0.0.1:" .. port, "--admin", "127.0.0.1:" .. admin,
      "--pid-file", pid_file }, { log = fifo })
    finally(function()
      hold, done = false, true
      if not p:poll() then p:kill(proc.SIGKILL); p:wait(5) end
      drain:wait()
      C.close(fd)
    end)
    local function state(pid)
      local stat = proc.read("/proc/" .. pid .. "/stat") or ""
      return stat:match("^%d+ %(.*%) (%a)")
    end
    local function in_write(pid)         -- blocked in write(2)
      local nr = ffi.arch == "arm64" and "64" or "1"
      local s = proc.read("/proc/" .. pid .. "/syscall") or ""
      return s:match("^(%d+) ") == nr
    end
    proc.wait_until(function()
      local res = paygate.http.request{
        url = "http://127.0.0.1:" .. port .. "/version", timeout = 1 }
      return res and res.body == "v1"
    end, 15, "paygate to serve")
    local serving = proc.children(p.pid)[1]
    local go = dir .. "/go"
    write(dir .. "/app/app.lua", ("local GO = %q\n"):format(go) .. V6)
    assert.equal(0, proc.kill_pid(p.pid, proc.SIGHUP))
    local new
    proc.wait_until(function()
      for _, c in ipairs(proc.children(p.pid)) do
        if c ~= serving then new = c end
      end
      return new
    end, 10, "the new worker")
    -- fill the FIFO: the master's next line blocks it
    hold = true
    local junk = ("#"):rep(4096)
    while tonumber(C.write(fd, junk, #junk)) > 0 do end
    assert.equal(0, proc.kill_pid(serving, proc.SIGKILL))
    proc.wait_until(function() return in_write(p.pid) end, 10,
                    "the master to block on its line about the killed worker")
    write(go, "")
    proc.wait_until(function() return state(new) == "Z" end, 10,
                    "the new worker to say why and exit")
    write(dir .. "/app/app.lua", V1)
    hold = false
    local line
    proc.wait_until(function()
      line = proc.read(pid_file .. ".reload") or ""
      return line:find("refused")
    end, 10, "the reload's outcome")
    assert.matches("refused: a new worker failed to load the app: v6 needs "
                   .. "its setting", line)
  end)
end)

-- paygate.runtime.fail(why) is for an app that ends its worker itself; one
-- that goes on loading after it (a return, no os.exit) left a worker the
-- master had been told failed: it never accepted, and `paygate run` waited
-- for good without a word (a restarted worker stayed so, one short).
describe("paygate.runtime.fail with no exit after it", function()
  it("ends the worker once it has loaded, saying why", function()
    local core = require "paygate.core"
    local dir = server.tmpdir()
    os.execute("mkdir -p " .. dir .. "/app")
    write(dir .. "/app/app.lua", [[
local paygate = require "paygate"
paygate.route("GET", "/version", function() return 200, "v7" end)
if not os.getenv("PAYGATE_V7_SETTING") then
  paygate.runtime.fail("v7 needs PAYGATE_V7_SETTING")
  return
end
]])
    local log = dir .. "/log"
    local p = proc.spawn({ PAYGATE_BIN, "run", dir .. "/app", "--workers",
      "1", "--listen", "127.0.0.1:" .. core.free_port(), "--admin", "off" },
      { log = log })
    finally(function()
      if not p:poll() then p:kill(proc.SIGKILL); p:wait(5) end
    end)
    assert.equal(1, p:wait(15), proc.read(log))
    assert.matches("v7 needs PAYGATE_V7_SETTING", proc.read(log), 1, true)
  end)
end)

-- The master kills a refused generation's workers still loading (SIGKILL,
-- reload_abort). Their ends were logged "killed by signal 9 (Killed)",
-- which reads like a crash though the master did it on purpose: they are
-- logged as discarded, and a loaded one's graceful exit says so too. Here
-- the first worker to load V8 stays loading; the second fails once the
-- first has begun.
local V8 = [[
local paygate = require "paygate"
local core = require "paygate.core"
local d = require("paygate.shared").get_dict("paygate")
paygate.route("GET", "/version", function() return 200, "v8" end)
if d:add("v8_first", core.pid()) then
  core.sleep(60)                         -- still loading when refused
  return
end
error("the second worker cannot load v8")
]]

describe("a refused generation's workers the master kills", function()
  local s
  after_each(function() if s then s:stop(); s = nil end end)

  it("are logged as discarded, not as killed by a signal", function()
    s = server.start{ source = V1, workers = 2 }
    write(s.app .. "/app.lua", V8)
    local ok, said = s:reload(30)
    assert.is_nil(ok)
    assert.matches("the second worker cannot load v8", said)
    local line = proc.wait_until(function()
      return s:logs():match("[^\n]*worker %d+ %(generation 2%) discarded"
                            .. "[^\n]*")
    end, 10, "the master's line about the worker it killed")
    assert.matches('"level":"info"', line, 1, true)
    assert.matches("discarded (reload refused): stopped while loading the"
                   .. " app", line, 1, true)
    assert.not_matches("killed by signal", s:logs(), 1, true)
    assert.equal("v1", assert(s:request("/version")).body)
  end)
end)
