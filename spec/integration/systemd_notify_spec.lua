-- systemd's readiness protocol ($NOTIFY_SOCKET, sd_notify(3)): the spec
-- binds a unix datagram socket as systemd would, starts `paygate run`
-- with NOTIFY_SOCKET naming it (through a wrapper script, as a unit's
-- Environment= would set it), and reads what the master says: READY=1
-- once every worker serves, RELOADING=1 and READY=1 around a reload,
-- STOPPING=1 at a stop, and an upgrade's new master's MAINPID.
local server = require "support.server"
local proc = require "support.proc"
local sdnotify = require "support.sdnotify"
local core = require "paygate.core"

local q = proc.sh_quote

-- a route answers with its worker's master pid; another with what the
-- worker sees of NOTIFY_SOCKET. The first worker to load goes on; the
-- others wait while the file hold is there.
local function app(hold)
  return ([[
local paygate = require "paygate"
local shared = require "paygate.shared"
paygate.route("GET", "/who", function()
  local f = assert(io.open("/proc/self/stat"))
  local stat = f:read("*a")
  f:close()
  return 200, stat:match("^%%d+ %%(.*%%) %%a (%%d+)")
end)
paygate.route("GET", "/env", function()
  return 200, os.getenv("NOTIFY_SOCKET") or "unset"
end)
if not shared.paygate:add("first", true) then
  while true do
    local f = io.open(%q)
    if not f then break end
    f:close()
    paygate.sleep(0.05)
  end
end
]]):format(hold)
end

-- bin run with env (shell assignments) by a script that execs it, as
-- systemd's ExecStart= with Environment= would
local function wrapper(dir, bin, env)
  local path = dir .. "/paygate-unit"
  proc.write(path, "#!/bin/sh\n" .. env .. " exec " .. q(bin) .. ' "$@"\n')
  assert(os.execute("chmod 755 " .. q(path)))
  return path
end

local function field(name, value)
  return function(msg) return msg[name] == value end
end

describe("systemd notify (NOTIFY_SOCKET)", function()
  local s, l, new, guard
  after_each(function()
    if new then
      proc.kill_pid(new, proc.SIGTERM)
      proc.wait_until(function() return not proc.running(new) end, 20,
                      "the new master to stop")
    end
    if guard then guard:cancel() end
    new, guard = nil, nil
    if s then s:stop(); s = nil end
    if l then l:close(); l = nil end
  end)

  it("READY=1 once every worker serves; a reload; STOPPING=1", function()
    local dir = server.tmpdir("sdnotify")
    l = sdnotify.listen(dir .. "/notify")
    local hold = dir .. "/hold"
    proc.write(hold, "")
    s = server.start{ source = app(hold), workers = 2, wait = false,
                      config = {},
                      bin = wrapper(dir, PAYGATE_BIN,
                                    "NOTIFY_SOCKET=" .. q(l.addr)) }
    -- one worker serves (the serving line), the other still loads: not
    -- ready yet
    proc.wait_until(function() return s:logs():match("paygate: serving") end,
                    15, "the first worker to serve")
    assert.equal(200, assert(s:request("/who")).status)
    for _, msg in ipairs(l:read()) do
      assert.is_nil(msg.READY, "READY before every worker served: "
                               .. l:texts())
    end
    os.remove(hold)
    local ready, i = l:wait(field("READY", "1"), 1, 15, "READY=1")
    -- said once both serve
    local health = assert(s:admin_get("/healthz"))
    assert.matches('"workers":2', health.body)
    assert.equal(tostring(s.pid), ready.MAINPID)
    assert.equal(("serving http://127.0.0.1:%d with 2 workers (generation 1)")
                 :format(s.port), ready.STATUS)
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    -- only the master speaks: its workers do not see the socket
    assert.equal("unset", assert(s:request("/env")).body)

    -- a reload: RELOADING=1 (with the monotonic clock, as
    -- Type=notify-reload wants), then READY=1 once it has ended
    local t0 = core.mono()
    assert(s:reload(30))
    local t1 = core.mono()
    local reloading
    reloading, i = l:wait(field("RELOADING", "1"), i + 1, 10, "RELOADING=1")
    local usec = tonumber(reloading.MONOTONIC_USEC)
    assert.is_number(usec, reloading.text)
    assert.is_true(usec >= math.floor(t0 * 1e6) - 1
                   and usec <= t1 * 1e6 + 1, reloading.text)
    local done
    done, i = l:wait(field("READY", "1"), i + 1, 10, "READY=1 (reloaded)")
    assert.matches("^serving http://127%.0%.0%.1:%d+ with 2 workers "
                   .. "%(generation 2; reloaded%)$", done.STATUS)

    -- a reload refused: READY=1 all the same, STATUS saying why
    local good = proc.read(s.app .. "/app.lua")
    proc.write(s.app .. "/app.lua", "error('this code cannot load')\n")
    assert.is_nil((s:reload(30)))
    reloading, i = l:wait(field("RELOADING", "1"), i + 1, 10,
                          "RELOADING=1 (refused)")
    done, i = l:wait(field("READY", "1"), i + 1, 10, "READY=1 (refused)")
    assert.matches("^reload refused: a new worker failed to load the app: "
                   .. ".*this code cannot load.*; generation 2 serves on$",
                   done.STATUS)
    proc.write(s.app .. "/app.lua", good)
    -- a refusal's reason stays one STATUS line (a config file's error
    -- with a newline in it starts no other field)
    proc.write(s.config_file, "error('no config here\\nMAINPID=1')\n")
    assert.is_nil((s:reload(30)))
    reloading, i = l:wait(field("RELOADING", "1"), i + 1, 10,
                          "RELOADING=1 (config refused)")
    done, i = l:wait(field("READY", "1"), i + 1, 10,
                     "READY=1 (config refused)")
    assert.matches("^reload refused: .*no config here MAINPID=1.*; "
                   .. "generation 2 serves on$", done.STATUS)
    assert.is_nil(done.MAINPID, done.text)

    -- a graceful stop
    s:signal(proc.SIGTERM)
    l:wait(field("STOPPING", "1"), i + 1, 10, "STOPPING=1")
    assert.equal(0, s.proc:wait(30), s:logs())
    assert.is_nil(s:logs():match("systemd notify: cannot send"), s:logs())
  end)

  it("an abstract socket ('@name')", function()
    local dir = server.tmpdir("sdnotify")
    l = sdnotify.listen(("@paygate-spec-%d-%d"):format(proc.getpid(),
                                                       math.random(1e9)))
    s = server.start{ source = app(dir .. "/no-hold"),
                      bin = wrapper(dir, PAYGATE_BIN,
                                    "NOTIFY_SOCKET=" .. q(l.addr)) }
    local ready = l:wait(field("READY", "1"), 1, 15, "READY=1")
    assert.equal(tostring(s.pid), ready.MAINPID)
  end)

  it("a worker that dies: STATUS says so, then serving again", function()
    -- `systemctl status` shows STATUS: a crash (or a worker that keeps
    -- failing after the first one served) is named there until the
    -- generation is whole again
    local dir = server.tmpdir("sdnotify")
    l = sdnotify.listen(dir .. "/notify")
    s = server.start{ source = app(dir .. "/no-hold") .. [[
paygate.route("GET", "/pid", function()
  return 200, tostring(require("paygate.core").pid())
end)
]], workers = 2, bin = wrapper(dir, PAYGATE_BIN,
                               "NOTIFY_SOCKET=" .. q(l.addr)) }
    local _, i = l:wait(field("READY", "1"), 1, 15, "READY=1")
    local pid = tonumber(assert(s:request("/pid")).body)
    proc.kill_pid(pid, proc.SIGKILL)
    local died
    died, i = l:wait(function(msg)
      return msg.STATUS and msg.STATUS:match("^worker ") ~= nil
    end, i + 1, 15, "STATUS naming the dead worker")
    assert.equal(("worker %d killed by signal 9 (Killed); restarting in"
                  .. " 0.1 s (1 of 2 workers serve)"):format(pid), died.STATUS)
    assert.is_nil(died.READY, died.text)
    local back = l:wait(function(msg)
      return msg.STATUS and msg.STATUS:match("^serving ") ~= nil
    end, i + 1, 15, "STATUS serving again")
    assert.equal(("serving http://127.0.0.1:%d with 2 workers (generation 1)")
                 :format(s.port), back.STATUS)
    assert.is_nil(back.READY, back.text)
  end)

  it("a queue that is full (systemd busy): READY=1 waits for room",
     function()
    -- systemd reads its notify socket when it can (at boot, or during a
    -- daemon-reload, the queue may be full for a while): a datagram
    -- dropped there would be a start systemd kills at TimeoutStartSec,
    -- or an upgrade it does not follow
    local dir = server.tmpdir("sdnotify")
    l = sdnotify.listen(dir .. "/notify")
    assert.is_true(l:fill() > 0)
    s = server.start{ source = app(dir .. "/no-hold"), wait = false,
                      bin = wrapper(dir, PAYGATE_BIN,
                                    "NOTIFY_SOCKET=" .. q(l.addr)) }
    -- the master says READY=1 right after its serving line: only then
    -- does "systemd" read
    proc.wait_until(function() return s:logs():match("paygate: serving") end,
                    15, "the worker to serve")
    local ready = l:wait(field("READY", "1"), 1, 15, "READY=1")
    assert.equal(tostring(s.pid), ready.MAINPID)
    assert.is_nil(s:logs():match("systemd notify: cannot send"), s:logs())
  end)

  it("a queue never read: one warning after 5 s; later sends do not wait",
     function()
    local dir = server.tmpdir("sdnotify")
    l = sdnotify.listen(dir .. "/notify")
    local filled = l:fill()
    s = server.start{ source = app(dir .. "/no-hold"), wait = false,
                      bin = wrapper(dir, PAYGATE_BIN,
                                    "NOTIFY_SOCKET=" .. q(l.addr)) }
    proc.wait_until(function()
      return s:logs():match("systemd notify: cannot send")
    end, 15, "the warning")
    assert.matches("systemd notify: cannot send to NOTIFY_SOCKET=.*: its "
                   .. "queue is full and was not read within 5 s", s:logs())
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    -- the master does not stall for each message after that one
    local t0 = core.mono()
    assert(s:reload(30))
    assert.is_true(core.mono() - t0 < 4, s:logs())
    local _, warned = s:logs():gsub("systemd notify: cannot send", "")
    assert.equal(1, warned, s:logs())
    -- nothing of the master's got in
    assert.equal(filled, #l:read(), l:texts())
  end)

  it("a socket that is not there: one warning, the server serves on",
     function()
    local dir = server.tmpdir("sdnotify")
    s = server.start{ source = app(dir .. "/no-hold"),
                      bin = wrapper(dir, PAYGATE_BIN, "NOTIFY_SOCKET="
                                    .. q(dir .. "/nobody-listens")) }
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    assert(s:reload(30))
    local _, warned = s:logs():gsub("systemd notify: cannot send", "")
    assert.equal(1, warned, s:logs())
    assert.matches("systemd notify: cannot send to NOTIFY_SOCKET=.*"
                   .. "nobody%-listens: No such file or directory",
                   s:logs())
  end)

  it("an upgrade of systemd's main process: MAINPID names the new master",
     function()
    local dir = server.tmpdir("sdnotify")
    l = sdnotify.listen(dir .. "/notify")
    -- the binary under test, copied: the upgrade runs the file at its path
    local bin = dir .. "/paygate"
    proc.write(bin, proc.read(PAYGATE_BIN))
    assert(os.execute("chmod 755 " .. q(bin)))
    -- the master is the process systemd started (without NOTIFY_SOCKET
    -- the upgrade is refused: upgrade_spec)
    s = server.start{ source = app(dir .. "/no-hold"), workers = 2,
                      bin = wrapper(dir, bin, "SYSTEMD_EXEC_PID=$$ "
                                    .. "INVOCATION_ID=0f NOTIFY_SOCKET="
                                    .. q(l.addr)) }
    local _, i = l:wait(field("READY", "1"), 1, 15, "READY=1")
    local code, said = proc.run({ bin, "upgrade", "--pid-file", s.pid_file },
                                { timeout = 120 })
    assert.equal(0, code, said .. s:logs())
    new = tonumber(proc.read(s.pid_file))
    guard = proc.guard(new)
    assert.are_not.equal(s.pid, new)
    local took = l:wait(function(msg)
      return msg.MAINPID == tostring(new) and msg.READY == "1"
    end, i + 1, 10, "MAINPID=" .. new .. " and READY=1")
    assert.matches("^serving http://127%.0%.0%.1:%d+ with 2 workers",
                   took.STATUS)
    -- the old master drains and exits, saying nothing of a stop (the
    -- service goes on in the new one)
    assert.equal(0, s.proc:wait(30), s:logs())
    l:read()
    for j = i + 1, #l.got do
      assert.is_nil(l.got[j].STOPPING, l:texts())
      assert.is_true(l.got[j].MAINPID == nil
                     or l.got[j].MAINPID == tostring(new), l:texts())
    end
    assert.equal(tostring(new), assert(s:request("/who")).body)
    assert.equal("unset", assert(s:request("/env")).body)
    -- the new master speaks for the service now: a reload, a stop
    local n = #l.got
    code, said = proc.run({ bin, "reload", "--pid-file", s.pid_file })
    assert.equal(0, code, said)
    local _, j = l:wait(field("RELOADING", "1"), n + 1, 10, "RELOADING=1")
    l:wait(field("READY", "1"), j + 1, 10, "READY=1 (reloaded)")
    proc.kill_pid(new, proc.SIGTERM)
    l:wait(field("STOPPING", "1"), j + 1, 10, "STOPPING=1")
  end)
end)
