-- `paygate upgrade` (USR2): a binary upgrade of a single instance without
-- refusing a connection. The spec starts a copy of the binary under test
-- from a folder of its own and replaces the file there (a new build), as
-- an operator would; a route answers with its worker's master pid, so the
-- answers tell the old master's workers from the new one's.
--
-- The clients are raw non-blocking sockets driven by poll() in this
-- process (support.hammer): a connection refused, reset or closed without
-- a whole answer is a failure.
local server = require "support.server"
local proc = require "support.proc"
local hammer = require("support.hammer").hammer

local WHO = [[
local paygate = require "paygate"
paygate.route("GET", "/who", function()
  local f = assert(io.open("/proc/self/stat"))
  local stat = f:read("*a")
  f:close()
  return 200, stat:match("^%d+ %(.*%) %a (%d+)")    -- the master's pid
end)
]]

-- bin/paygate in a folder of its own: the binary under test, copied
local function copy_bin()
  local dir = server.tmpdir("upgrade")
  local bin = dir .. "/paygate"
  proc.write(bin, proc.read(PAYGATE_BIN))
  assert(os.execute("chmod 755 " .. proc.sh_quote(bin)))
  return bin
end

-- a new build at bin: another file put in its place (the running one's
-- stays open under it, as with an install)
local function replace(bin)
  proc.write(bin .. ".new", proc.read(PAYGATE_BIN))
  assert(os.execute("chmod 755 " .. proc.sh_quote(bin .. ".new")))
  assert(os.rename(bin .. ".new", bin))
end

-- a "new build" at bin that is a shell script (a wrong file installed, a
-- wrapper): script is its body
local function replace_with_script(bin, script)
  proc.write(bin .. ".new", "#!/bin/sh\n" .. script .. "\n")
  assert(os.execute("chmod 755 " .. proc.sh_quote(bin .. ".new")))
  assert(os.rename(bin .. ".new", bin))
end

-- WHO, its top level waiting while the file hold is there: a worker that
-- never becomes ready (its loop turns: the watchdog lets it be)
local function held(hold)
  return WHO .. ([[
while true do
  local f = io.open(%q)
  if not f then break end
  f:close()
  paygate.sleep(0.05)
end
]]):format(hold)
end

local function readlink(path)
  local ffi = require "ffi"
  local buf = ffi.new("char[4096]")
  local n = ffi.C.readlink(path, buf, 4095)
  return n > 0 and ffi.string(buf, n) or nil
end

local function upgrade(s, bin)
  return proc.run({ bin, "upgrade", "--pid-file", s.pid_file },
                  { timeout = 120 })
end

describe("paygate upgrade", function()
  local s, new, guard
  after_each(function()
    if new then
      proc.kill_pid(new, proc.SIGTERM)
      proc.wait_until(function() return not proc.running(new) end, 20,
                      "the new master to stop")
    end
    if guard then guard:cancel() end
    new, guard = nil, nil
    if s then s:stop(); s = nil end
  end)

  it("hands the listening sockets over: no connection refused",
     function()
    local bin = copy_bin()
    s = server.start{ source = WHO, workers = 2, bin = bin,
                      args = { "--no-access-log" } }
    local old = s.pid
    replace(bin)
    local out = s.dir .. "/upgrade.out"
    local up, ended
    local answers, failures = hammer(s, { close = 12, keep = 4,
                                          path = "/who" }, function(t)
      if up == nil and t > 0.3 then
        up = proc.spawn({ bin, "upgrade", "--pid-file", s.pid_file },
                        { log = out })
      end
      if up and not ended and up:poll() then ended = t end
      return not ended or t - ended < 0.5     -- and traffic after it
    end)
    local said = proc.read(out)
    assert.equal(0, up.status, said .. s:logs())
    new = tonumber(proc.read(s.pid_file))
    assert.is_number(new, "the pid file: " .. proc.read(s.pid_file))
    guard = proc.guard(new)
    assert.are_not.equal(old, new)
    assert.matches(("done, pid %d serves"):format(new), said)
    assert.same({}, failures, s:logs())
    -- both generations answered, the new one after the old one
    assert.is_true((answers[tostring(old)] or 0) > 10, s:logs())
    assert.is_true((answers[tostring(new)] or 0) > 10, s:logs())
    for who in pairs(answers) do
      assert.is_true(who == tostring(old) or who == tostring(new), who)
    end
    -- the old master drains and exits; the pid file names the new one
    assert.equal(0, s.proc:wait(30), s:logs())
    assert.equal(tostring(new), proc.read(s.pid_file):match("%d+"))
    -- the new master runs the file now at the path, not the one replaced
    assert.equal(bin, readlink("/proc/" .. new .. "/exe"))
    local res = assert(s:request("/who"))
    assert.equal(tostring(new), res.body)
    assert.matches('"pid":' .. new, assert(s:admin_get("/healthz")).body)
    -- and it upgrades again in turn, and reloads
    local code, again = upgrade(s, bin)
    assert.equal(0, code, again)
    local third = tonumber(proc.read(s.pid_file))
    assert.are_not.equal(new, third)
    proc.wait_until(function() return not proc.running(new) end, 30,
                    "the second master to exit")
    guard:cancel()
    new, guard = third, proc.guard(third)
    code, again = proc.run({ bin, "reload", "--pid-file", s.pid_file })
    assert.equal(0, code, again)
    assert.equal(tostring(third), assert(s:request("/who")).body)
  end)

  it("refused: the new app fails to load; the old master serves on",
     function()
    local bin = copy_bin()
    s = server.start{ source = WHO, workers = 2, bin = bin }
    replace(bin)
    proc.write(s.app .. "/app.lua", "error('the new code cannot load')\n")
    local code, said = upgrade(s, bin)
    assert.equal(1, code, said)
    assert.matches("paygate upgrade: refused: the new master %(pid %d+%) "
                   .. "did not start: .*the new code cannot load", said)
    assert.matches(("pid %d keeps serving"):format(s.pid), said)
    assert.equal(tostring(s.pid), proc.read(s.pid_file):match("%d+"))
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    assert.is_nil(s.proc:poll())
    -- the failed master is gone, and so are its workers
    local failed = tonumber(said:match("new master %(pid (%d+)%)"))
    proc.wait_until(function() return not proc.running(failed) end, 20,
                    "the failed new master to exit")
    proc.wait_until(function() return #s:workers() == 2 end, 20,
                    "the old master's two workers alone")
  end)

  it("refused: the config no longer reads; the old master serves on",
     function()
    local bin = copy_bin()
    s = server.start{ source = WHO, bin = bin, config = { workers = 1 } }
    proc.write(s.config_file, "return { workers = 'many' }\n")
    local code, said = upgrade(s, bin)
    assert.equal(1, code, said)
    assert.matches("refused: the new master %(pid %d+%) did not start: "
                   .. ".*workers", said)
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    assert.is_nil(s.proc:poll())
  end)

  it("refused: no binary at the path", function()
    local bin = copy_bin()
    s = server.start{ source = WHO, bin = bin }
    assert(os.rename(bin, bin .. ".gone"))
    local code, said = upgrade(s, bin .. ".gone")
    assert.equal(1, code, said)
    assert.matches("did not start: cannot run " .. bin:gsub("%p", "%%%0")
                   .. ": No such file or directory", said)
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
  end)

  it("refused: a new binary that exits at once; the old master serves on",
     function()
    local bin = copy_bin()
    s = server.start{ source = WHO, bin = bin }
    replace_with_script(bin, "exit 3")
    local code, said = proc.run({ PAYGATE_BIN, "upgrade", "--pid-file",
                                  s.pid_file, "--timeout", "20" })
    assert.equal(1, code, said)
    assert.matches("paygate upgrade: refused: the new master %(pid %d+%) "
                   .. "exited with status 3 before serving", said)
    assert.matches(("pid %d keeps serving"):format(s.pid), said)
    assert.equal(tostring(s.pid), proc.read(s.pid_file):match("%d+"))
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    assert.matches("upgrade refused: the new master .* exited with status 3",
                   s:logs())
    -- and it upgrades once a good build is in place
    replace(bin)
    local again
    code, again = upgrade(s, bin)
    assert.equal(0, code, again)
    new = tonumber(proc.read(s.pid_file))
    guard = proc.guard(new)
  end)

  it("refused: the new master's worker never loads within upgrade_timeout",
     function()
    local bin = copy_bin()
    s = server.start{ source = WHO, bin = bin,
                      config = { upgrade_timeout = 1 } }
    local hold = s.app .. "/hold"
    proc.write(hold, "")
    proc.write(s.app .. "/app.lua", held(hold))
    local code, said = proc.run({ bin, "upgrade", "--pid-file", s.pid_file,
                                  "--timeout", "20" })
    assert.equal(1, code, said)
    assert.matches("paygate upgrade: refused: the new master %(pid %d+%) "
                   .. "did not serve within 1 s %(upgrade_timeout", said)
    assert.matches(("pid %d keeps serving"):format(s.pid), said)
    assert.equal(tostring(s.pid), proc.read(s.pid_file):match("%d+"))
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    -- the new master and its worker stop; the old one's worker alone
    local failed = tonumber(said:match("new master %(pid (%d+)%)"))
    proc.wait_until(function() return not proc.running(failed) end, 20,
                    "the new master to stop")
    proc.wait_until(function() return #s:workers() == 1 end, 20,
                    "the old master's worker alone")
  end)

  -- The command's wait follows the master's upgrade_timeout (written in
  -- PID_FILE.upgrade's "upgrading" line, with a margin of 5 s), an
  -- explicit --timeout standing. The old master is stopped (SIGSTOP) once
  -- upgrading, so no outcome comes: the command gives up when it said it
  -- would. Before: it waited 90 s whatever the upgrade_timeout (one past
  -- 90 s outlived the command: "no outcome within 90 s").
  it("waits as long as the master's upgrade_timeout; --timeout wins",
     function()
    local bin = copy_bin()
    s = server.start{ source = WHO, bin = bin,
                      config = { upgrade_timeout = 1 } }
    local hold = s.app .. "/hold"
    proc.write(hold, "")
    proc.write(s.app .. "/app.lua", held(hold))
    local function stalled(n, args, want)
      local out = s.dir .. "/upgrade-" .. n .. ".out"
      local cmd = { bin, "upgrade", "--pid-file", s.pid_file }
      for _, a in ipairs(args) do cmd[#cmd + 1] = a end
      local up = proc.spawn(cmd, { log = out })
      proc.wait_until(function()
        return proc.read(s.pid_file .. ".upgrade")
          :match("^%d+ " .. n .. " upgrading, outcome within 6 s\n")
      end, 10, "the upgrade to start")
      proc.kill_pid(s.pid, 19)                          -- SIGSTOP
      local t0 = os.time()
      local code = up:wait(30)
      if code == nil then up:kill(proc.SIGKILL); up:wait(2) end
      proc.kill_pid(s.pid, 18)                          -- SIGCONT
      local said = proc.read(out)
      assert.equal(1, code, said)
      assert.matches(("paygate upgrade: pid %d upgrading; waiting up to "
        .. "%d s for the outcome"):format(s.pid, want), said)
      assert.matches(("no outcome from pid %d within %d"):format(s.pid, want),
                     said)
      assert.is_true(os.time() - t0 <= want + 3, said)
      -- resumed, the old master refuses it (upgrade_timeout) and ends it
      local failed = tonumber(proc.wait_until(function()
        return proc.read(s.pid_file .. ".upgrade")
          :match("refused: the new master %(pid (%d+)%)")
      end, 20, "the upgrade refused"))
      proc.wait_until(function() return not proc.running(failed) end, 20,
                      "the new master to stop")
      return said
    end
    local said = stalled(1, {}, 6)
    assert.matches("(its upgrade_timeout and a margin)", said, 1, true)
    said = stalled(2, { "--timeout", "2" }, 2)
    assert.matches("(--timeout)", said, 1, true)
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
  end)

  -- What the command says it waits is the wait it takes: an "upgrading"
  -- line whose time is no master's (PID_FILE.upgrade edited by hand) is
  -- not followed, and said so; one past 1e8 s (upgrade_timeout takes up
  -- to 1e12) is followed, in whole seconds. A stand-in master (a shell
  -- that writes the line on USR2) answers, then the spec refuses it by
  -- the file. Before: "waiting up to nan s ... (its upgrade_timeout and
  -- a margin)" while it waited 90 s, and "1e+12 s" while it waited 90.
  it("says the wait it takes, whatever PID_FILE.upgrade says", function()
    local dir = server.tmpdir("upgrade-says")
    local pid_file = dir .. "/paygate.pid"
    -- (a shell whose argv[0] names paygate: the command signals no other)
    local sh = dir .. "/paygate-sh"
    assert(os.execute("ln -s /bin/sh " .. proc.sh_quote(sh)))
    for i, due in ipairs{ "nan", "-3", "1000000000005" } do
      local fake = proc.spawn({ sh, "-c", "trap 'printf \"%s 1 "
        .. "upgrading, outcome within " .. due .. " s\\n\" $$ > "
        .. proc.sh_quote(pid_file .. ".upgrade") .. "' USR2; "
        .. "while :; do sleep 0.05; done" }, { log = dir .. "/fake.log" })
      proc.write(pid_file, fake.pid .. "\n")
      proc.write(pid_file .. ".upgrade", fake.pid .. " 0 ready\n")
      local out = dir .. "/upgrade-" .. i .. ".out"
      local up = proc.spawn({ PAYGATE_BIN, "upgrade", "--pid-file",
                              pid_file }, { log = out })
      proc.wait_until(function()
        return (proc.read(out) or ""):find("waiting up to", 1, true)
      end, 10, "the command's wait")
      proc.write(pid_file .. ".upgrade", fake.pid .. " 1 refused: spec\n")
      local code = up:wait(10)
      fake:kill(proc.SIGKILL)
      fake:wait(5)
      local said = proc.read(out)
      assert.equal(1, code, said)
      if due == "1000000000005" then
        assert.matches("waiting up to 1000000000005 s for the outcome "
          .. "(its upgrade_timeout and a margin)", said, 1, true)
      else
        assert.matches("waiting up to 90 s for the outcome (the default: "
          .. "the master said no usable time)", said, 1, true)
      end
      assert.matches("refused: spec", said, 1, true)
    end
  end)

  it("refused: a new binary that never serves is stopped at the timeout",
     function()
    local bin = copy_bin()
    s = server.start{ source = WHO, bin = bin,
                      config = { upgrade_timeout = 1 } }
    -- a wrong file installed: no paygate, it never says a word
    replace_with_script(bin, "exec sleep 300")
    local code, said = proc.run({ PAYGATE_BIN, "upgrade", "--pid-file",
                                  s.pid_file, "--timeout", "20" })
    assert.equal(1, code, said)
    assert.matches("did not serve within 1 s", said)
    -- TERM ends it: it does not keep the listening sockets
    local failed = tonumber(said:match("new master %(pid (%d+)%)"))
    proc.wait_until(function() return not proc.running(failed) end, 10,
                    "the stalled new binary to end on TERM")
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
  end)

  it("refused: a new binary that ignores TERM is killed with its process "
     .. "group; no upgrade until it is gone, then one works", function()
    local bin = copy_bin()
    s = server.start{ source = WHO, bin = bin,
                      config = { upgrade_timeout = 2 } }
    -- a wrapper that traps TERM and never serves, with a child (as a new
    -- master's worker would be) that ignores TERM too: both would hold
    -- the listening sockets
    local child_file = s.dir .. "/child.pid"
    replace_with_script(bin, "trap '' TERM\nsleep 300 &\necho $! > "
                             .. proc.sh_quote(child_file) .. "\nwait")
    local code, said = proc.run({ PAYGATE_BIN, "upgrade", "--pid-file",
                                  s.pid_file, "--timeout", "20" })
    assert.equal(1, code, said)
    assert.matches("did not serve within 2 s", said)
    local failed = tonumber(said:match("new master %(pid (%d+)%)"))
    local child
    finally(function()      -- were they left, this spec ends them
      for _, pid in ipairs({ failed, child }) do
        if proc.running(pid) then proc.kill_pid(pid, proc.SIGKILL) end
      end
    end)
    child = tonumber(proc.wait_until(function()
      return proc.read(child_file):match("%d+")
    end, 5, "the script's child"))
    -- meanwhile no other upgrade (two new masters on the sockets)
    proc.kill_pid(s.pid, proc.SIGUSR2)
    local status = s.pid_file .. ".upgrade"
    proc.wait_until(function()
      return proc.read(status):match(" refused: the new master of the "
                                     .. "upgrade refused before")
    end, 5, "the second upgrade's refusal")
    assert.matches(("%%(pid %d%%) has not ended yet"):format(failed),
                   proc.read(status))
    -- TERM, then SIGKILL to its process group at the grace's end
    -- (min(5 s, upgrade_timeout)), and it is reaped
    proc.wait_until(function() return not proc.running(failed) end,
                    2 + 3, "the new binary ignoring TERM to be killed")
    proc.wait_until(function() return not proc.running(child) end, 3,
                    "its child to be killed with it")
    proc.wait_until(function()
      return s:logs():match("an upgrade may start again")
    end, 5, "the old master to reap it")
    local log = s:logs()
    assert.matches(("the new master %%(pid %d%%) told to stop %%(TERM%%)")
                   :format(failed), log)
    assert.matches(("the new master %%(pid %d%%) has not ended within 2 s "
                    .. "of the upgrade's refusal; killed it and its process "
                    .. "group %%(SIGKILL%%)"):format(failed), log)
    assert.matches(("the refused new master %%(pid %d%%) killed by signal "
                    .. "9"):format(failed), log)
    -- the old master serves on, and upgrades once a good build is there
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    replace(bin)
    local again
    code, again = upgrade(s, bin)
    assert.equal(0, code, again)
    new = tonumber(proc.read(s.pid_file))
    guard = proc.guard(new)
    -- having taken over, it and its workers are in the old master's
    -- process group again (what signals that group reaches them)
    local function pgrp(pid)
      return proc.read("/proc/" .. pid .. "/stat")
                 :match("^%d+ %(.*%) %a %d+ (%d+)")
    end
    local old_group = pgrp(s.pid)
    assert.equal(old_group, pgrp(new))
    for _, w in ipairs(proc.children(new)) do
      assert.equal(old_group, pgrp(w))
    end
  end)

  it("one at a time: an upgrade during a reload and a reload during an "
     .. "upgrade are refused", function()
    local bin = copy_bin()
    s = server.start{ source = WHO, bin = bin }
    local hold, status = s.app .. "/hold", s.pid_file .. ".reload"
    proc.write(hold, "")
    proc.write(s.app .. "/app.lua", held(hold))
    -- a reload loading (its new worker held): no upgrade now (the reload
    -- would be dropped at the handover, PID_FILE.reload left "loading")
    local code, said = proc.run({ bin, "reload", "--pid-file", s.pid_file,
                                  "--no-wait" })
    assert.equal(0, code, said)
    proc.wait_until(function() return proc.read(status):match(" loading") end,
                    10, "the reload to load")
    code, said = proc.run({ bin, "upgrade", "--pid-file", s.pid_file,
                            "--timeout", "10" })
    assert.equal(1, code, said)
    assert.matches("paygate upgrade: refused: a reload is loading new code",
                   said)
    os.remove(hold)
    proc.wait_until(function() return proc.read(status):match("^1 ok") end,
                    20, "the reload to end")
    -- an upgrade in progress (the new master's worker held): no reload now
    -- (what it loaded would not serve after the handover)
    proc.write(hold, "")
    local out = s.dir .. "/upgrade.out"
    local up = proc.spawn({ bin, "upgrade", "--pid-file", s.pid_file,
                            "--timeout", "30" }, { log = out })
    proc.wait_until(function()
      return proc.read(s.pid_file .. ".upgrade"):match(" upgrading")
    end, 10, "the upgrade to start")
    code, said = proc.run({ bin, "reload", "--pid-file", s.pid_file,
                            "--timeout", "10" })
    assert.equal(1, code, said)
    assert.matches("paygate reload: refused: an upgrade is in progress",
                   said)
    os.remove(hold)
    assert.equal(0, up:wait(30), proc.read(out))
    new = tonumber(proc.read(s.pid_file))
    guard = proc.guard(new)
    -- the new master reloads, its outcomes numbered on
    code, said = proc.run({ bin, "reload", "--pid-file", s.pid_file,
                            "--timeout", "20" })
    assert.equal(0, code, said)
    assert.matches("^3 ok", proc.read(status))
  end)

  it("refused: the master is a systemd service's main process", function()
    -- a wrapper execs the binary as systemd's ExecStart would: the master
    -- is the process systemd started (SYSTEMD_EXEC_PID), its exit the
    -- service's end, the new master stopped with it. No NOTIFY_SOCKET
    -- (Type=simple): systemd cannot follow it to the new master (with
    -- one, it upgrades: systemd_notify_spec)
    local bin = copy_bin()
    local wrapper = bin .. "-unit"
    proc.write(wrapper, "#!/bin/sh\nunset NOTIFY_SOCKET\n"
                        .. "SYSTEMD_EXEC_PID=$$ INVOCATION_ID=0f exec "
                        .. proc.sh_quote(bin) .. ' "$@"\n')
    assert(os.execute("chmod 755 " .. proc.sh_quote(wrapper)))
    s = server.start{ source = WHO, bin = wrapper }
    local code, said = upgrade(s, bin)
    assert.equal(1, code, said)
    assert.matches("paygate upgrade: refused: this master is the main "
                   .. "process of a systemd service: .*no NOTIFY_SOCKET: "
                   .. "a Type=simple service cannot follow it to a new "
                   .. "master.*run it as Type=notify with NotifyAccess=all "
                   .. "to upgrade under systemd, or .*`paygate reload`.*"
                   .. "systemctl restart", said)
    assert.matches(("pid %d keeps serving"):format(s.pid), said)
    assert.equal(tostring(s.pid), assert(s:request("/who")).body)
    assert.is_nil(s.proc:poll())
    s:stop()
    -- a wrapper shell that runs the binary as its child (no exec: the
    -- shell is the service's main process, and exits with the master)
    proc.write(wrapper, "#!/bin/sh\nunset NOTIFY_SOCKET\n"
                        .. "export SYSTEMD_EXEC_PID=$$ INVOCATION_ID=0f\n"
                        .. proc.sh_quote(bin) .. ' "$@"\n')
    -- (the master is the shell's child: its pid is not the one started)
    s = server.start{ source = WHO, bin = wrapper, wait = false }
    local master
    proc.wait_until(function()
      master = tonumber(proc.read(s.pid_file) or "")
      local res = master and s:request("/who")
      return res and res.body == tostring(master)
    end, 15, "paygate to serve as the shell's child")
    assert.are_not.equal(s.pid, master)
    local g = proc.guard(master)
    code, said = upgrade(s, bin)
    assert.equal(1, code, said)
    assert.matches("refused: this master is the main process of a systemd "
                   .. "service %(through the shell that started it", said)
    assert.equal(tostring(master), assert(s:request("/who")).body)
    -- (a TERM to the shell would not reach its child: the master is
    -- stopped itself)
    proc.kill_pid(master, proc.SIGTERM)
    proc.wait_until(function() return not proc.running(master) end, 20,
                    "the master to stop")
    g:cancel()
    s:stop()
    -- one a process of a service started (a shell of a terminal that a
    -- systemd user service runs): it upgrades
    proc.write(wrapper, "#!/bin/sh\nSYSTEMD_EXEC_PID=1 INVOCATION_ID=0f "
                        .. "exec " .. proc.sh_quote(bin) .. ' "$@"\n')
    s = server.start{ source = WHO, bin = wrapper }
    code, said = upgrade(s, bin)
    assert.equal(0, code, said)
    new = tonumber(proc.read(s.pid_file))
    guard = proc.guard(new)
  end)

  it("refused: the master is PID 1 (a container's init)", function()
    local bin = copy_bin()
    local ok = proc.run({ "unshare", "-pf", "--kill-child", "true" })
    if ok ~= 0 then
      pending("unshare -pf is not permitted here (no new PID namespace)")
      return
    end
    local wrapper = bin .. "-init"
    proc.write(wrapper, "#!/bin/sh\nexec unshare -pf --kill-child=TERM "
                        .. proc.sh_quote(bin) .. ' "$@"\n')
    assert(os.execute("chmod 755 " .. proc.sh_quote(wrapper)))
    -- its pid file says 1 (its own PID namespace's): signalled by hand
    s = server.start{ source = WHO, bin = wrapper, wait = false }
    local master
    proc.wait_until(function()
      master = proc.children(s.pid)[1]
      return master and s:logs():match("serving")
    end, 15, "paygate to serve as PID 1")
    proc.kill_pid(master, proc.SIGUSR2)
    local status = s.pid_file .. ".upgrade"
    proc.wait_until(function()
      return proc.read(status):match("^1 1 refused")
    end, 10, "the upgrade's outcome")
    assert.matches("refused: this master is PID 1 %(a container's init%): "
                   .. ".*`paygate reload`", proc.read(status))
    assert.matches("upgrade refused: this master is PID 1", s:logs())
    -- it serves on (its workers see the host's /proc: its pid there)
    assert.equal(tostring(master), assert(s:request("/who")).body)
    assert.is_true(proc.running(master))
  end)

  it("PAYGATE_INHERIT is environment input: checked, exit 2", function()
    local dir = server.tmpdir("inherit")
    proc.write(dir .. "/app.lua", WHO)
    local run = proc.sh_quote(PAYGATE_BIN) .. " run " .. proc.sh_quote(dir)
                .. " --listen 127.0.0.1:0 --admin off"
    -- not our parent's upgrade
    local code, said = proc.run({ "sh", "-c", "PAYGATE_INHERIT=listen=5,"
      .. "admin=-1,socket=6,from=999999 exec " .. run })
    assert.equal(2, code, said)
    assert.matches("paygate: PAYGATE_INHERIT names pid 999999 as the master "
                   .. "this one replaces, but the parent is pid %d+", said)
    -- our parent's (sh execs paygate: this process), but socket= is a file
    code, said = proc.run({ "sh", "-c", "exec 5</dev/null 6</dev/null; "
      .. "PAYGATE_INHERIT=listen=5,admin=-1,socket=6,from="
      .. proc.getpid() .. " exec " .. run })
    assert.equal(2, code, said)
    assert.matches("paygate: PAYGATE_INHERIT's socket=6 is not a socket to "
                   .. "the old master of its own", said)
  end)

  it("signals only a master that upgrades", function()
    local dir = server.tmpdir()
    local f = dir .. "/by-hand.pid"
    proc.write(f, proc.getpid() .. "\n")      -- this process: a paygate
    local code, said = proc.run({ PAYGATE_BIN, "upgrade", "--pid-file", f })
    assert.equal(1, code, said)
    assert.matches("did not write .*%.upgrade: it is no master that "
                   .. "upgrades .*nothing signalled", said)
  end)
end)
