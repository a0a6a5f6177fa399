-- scripts/run, the README's run command: it starts the simulator and the
-- gateway, prints a curl walk-through that ends "paid" when followed (each
-- line once, as pasted), and
-- stops both on Ctrl-C (SIGINT) or when either dies. The deps/build step
-- is skipped (PAYGATE_RUN_NO_BUILD=1: the suite has built already, and
-- PAYGATE_BIN names its binary); keys and state go to a temporary
-- PAYGATE_DEV_DIR.
local core = require "paygate.core"
local testing = require "paygate.testing"
local proc = testing.proc

local SIGINT = 2

local function alive(pid) return proc.kill_pid(pid, 0) == 0 end

local function pid_of(path)
  return tonumber((proc.read(path):match("%d+")))
end

describe("scripts/run", function()
  local dir

  setup(function() dir = testing.tmpdir() end)
  teardown(function()
    proc.stop_all(5)
    testing.server.rmdir(dir)
  end)

  -- bg: as a shell starts a job in the background (`scripts/run &` in a
  -- script): SIGINT ignored, which bash then cannot trap; and in a
  -- process group of its own (setsid), for a signal to the whole group
  local function launch(bg)
    local ports = { core.free_port(), core.free_port(), core.free_port() }
    local log = dir .. "/run.log"
    os.remove(log)
    local p = proc.spawn({ "setsid", "sh", "-c", (bg and "trap '' INT; "
      or "") .. 'exec "$@"', "sh", "env", "PAYGATE_RUN_NO_BUILD=1",
      "PAYGATE_BIN=" .. testing.server.bin(),
      "PAYGATE_DEV_DIR=" .. dir .. "/dev", "scripts/run",
      "--port", tostring(ports[1]), "--sim-port", tostring(ports[2]),
      "--admin-port", tostring(ports[3]) }, { log = log, watchdog = true })
    local ok, err = pcall(testing.wait_until, function()
      if p:poll() then return true end
      return proc.read(log):find("Ctrl%-C stops both%.") ~= nil
    end, 120, "the walk-through")
    assert(ok and not p:poll(), "scripts/run did not start ("
      .. tostring(err or p.status) .. "):\n" .. proc.read(log) .. "\n"
      .. proc.read(dir .. "/dev/gateway.log"))
    local out = proc.read(log)
    local lines = {}
    local after = out:match("Try it.-\n(.*)$")
    for l in after:gmatch("[^\n]+") do
      if l:match("^%s+R=") or l:match("^%s+curl ") then
        lines[#lines + 1] = l
      end
    end
    return p, out, lines
  end

  it("--help says what it does", function()
    local code, out = proc.run({ "scripts/run", "--help" })
    assert.equal(0, code)
    assert.matches("usage: scripts/run", out)
    assert.matches("simulator", out)
    assert.matches("Ctrl%-C", out)
    code, out = proc.run({ "scripts/run", "--bogus" })
    assert.equal(2, code)
    assert.matches("unknown option", out)
  end)

  it("refuses a port in use, naming the option that moves it", function()
    -- was: "port N is in use (see --help for other ports)": which of the
    -- three ports, and so which option, was left to guess
    local busy = testing.start_app{ app = "examples/hello" }
    local free = { core.free_port(), core.free_port() }
    for _, c in ipairs{
        { { "--port", busy.port, "--sim-port", free[1], "--admin-port",
            free[2] }, "the gateway's", "--port" },
        { { "--port", free[1], "--sim-port", busy.port, "--admin-port",
            free[2] }, "the simulator's", "--sim-port" },
        { { "--port", free[1], "--sim-port", free[2], "--admin-port",
            busy.port }, "the gateway's admin listener's",
          "--admin-port" } } do
      local argv = { "env", "PAYGATE_RUN_NO_BUILD=1",
                     "PAYGATE_BIN=" .. testing.server.bin(),
                     "PAYGATE_DEV_DIR=" .. dir .. "/busy", "scripts/run" }
      for _, a in ipairs(c[1]) do argv[#argv + 1] = tostring(a) end
      local code, out = proc.run(argv)
      assert.equal(1, code, out)
      assert.equal(("scripts/run: port %d, %s, is in use: give another"
                    .. " with %s N (scripts/run --help)\n")
                   :format(busy.port, c[2], c[3]), out)
    end
    busy:stop()
  end)

  it("prints a walk-through that ends paid, and Ctrl-C stops both",
     function()
    local p, out, lines = launch()
    assert.matches("gateway%s+http://127%.0%.0%.1:%d+", out)
    assert.matches("simulator%s+http://127%.0%.0%.1:%d+", out)
    assert.matches('dev app', out)
    -- the dev API key is printed when it is made (this first run)
    assert.matches("secret = dev ak_%S+ sk_%S+", out)
    -- the dev folder and what is made in it: the owner's alone
    local _, mode = proc.run({ "stat", "-c", "%a", dir .. "/dev",
                               dir .. "/dev/gateway.db" })
    assert.equal("700\n600\n", mode)
    assert.equal(3, #lines, out)
    local sim = pid_of(dir .. "/dev/simulator.pid")
    local gw = pid_of(dir .. "/dev/gateway.pid")
    assert.is_true(alive(sim) and alive(gw))
    -- the three lines as printed, each once: line 2's ?wait= answers
    -- after the gateway answered the notification, so line 3 says paid
    local script = lines[1] .. "\n" .. lines[2] .. "\n" .. lines[3] .. "\n"
    local code, res = proc.run({ "bash", "-c", script }, { timeout = 60 })
    assert.equal(0, code, res)
    assert.matches('"state":"paid"', res)
    -- Ctrl-C
    p:kill(SIGINT)
    local st = p:wait(30)
    assert.equal(0, st, proc.read(dir .. "/run.log"))
    testing.wait_until(function()
      return not alive(sim) and not alive(gw)
    end, 15, "both stopped")
  end)

  it("stops both, status 0, when the servers were signalled to stop and"
     .. " the script could not take the signal", function()
    -- Started by a shell in the background, the script ignores SIGINT
    -- (and bash cannot trap a signal ignored at its start), while the
    -- servers stop on one: a Ctrl-C to the group, or an INT to each. Was:
    -- "the simulator stopped (status 0); see ..." and exit 1, as for a
    -- crash. A server's status 0 is a stop it was asked for.
    local p = launch(true)
    local sim = pid_of(dir .. "/dev/simulator.pid")
    local gw = pid_of(dir .. "/dev/gateway.pid")
    proc.kill_pid(-p.pid, SIGINT)          -- the group: all at once
    local st = p:wait(30)
    local log = proc.read(dir .. "/run.log")
    assert.equal(0, st, log)
    assert.is_nil(log:find("stopped (status", 1, true), log)
    assert.matches("stopping%.%.%.", log)
    testing.wait_until(function()
      return not alive(sim) and not alive(gw)
    end, 15, "both stopped")
  end)

  it("reuses the dev keys, merges gateway.local.lua, and stops the"
     .. " gateway when the simulator dies", function()
    local before = proc.read(dir .. "/dev/merchant.json")
    assert.truthy(#before > 0)
    -- the user's own settings, kept across runs: here the console off
    -- (the written config turns it on)
    local f = assert(io.open(dir .. "/dev/gateway.local.lua", "w"))
    f:write('return { gateway = { console = false }, workers = 2 }\n')
    f:close()
    local p, out, lines = launch()
    -- its top-level keys too: two workers (before: scripts/run's
    -- --workers 1 on the command line won over the file's workers)
    local master = pid_of(dir .. "/dev/gateway.pid")
    local function children(ppid)   -- from /proc (no procps needed)
      local n = 0
      for _, e in ipairs(require("paygate.core").listdir("/proc") or {}) do
        if e:match("^%d+$") then
          local stat = proc.read("/proc/" .. e .. "/stat")
          -- "pid (comm) state ppid ...": the comm may hold spaces
          if tonumber(stat:match("%) %S+ (%d+)")) == ppid then n = n + 1 end
        end
      end
      return n
    end
    testing.wait_until(function() return children(master) == 2 end, 20,
                       "the gateway's two workers")
    assert.equal(before, proc.read(dir .. "/dev/merchant.json"))
    -- not printed again: where it is kept
    assert.is_nil(out:find("sk_", 1, true), out)
    assert.matches("secret = in .-apikey%.json", out)
    local url = lines[3]:match("(http://127%.0%.0%.1:%d+)/v1/")
    local code, res = proc.run({ "curl", "-s", "-o", "/dev/null", "-w",
      "%{http_code}", url .. "/console" }, { timeout = 20 })
    assert.equal(0, code, res)
    assert.equal("404", res)
    os.remove(dir .. "/dev/gateway.local.lua")
    local sim = pid_of(dir .. "/dev/simulator.pid")
    local gw = pid_of(dir .. "/dev/gateway.pid")
    proc.kill_pid(sim, 9)
    local st = p:wait(30)
    assert.is_number(st)
    assert.are_not.equal(0, st)
    testing.wait_until(function() return not alive(gw) end, 15,
                       "the gateway stopped")
    assert.matches("simulator stopped", proc.read(dir .. "/run.log"))
  end)
end)
