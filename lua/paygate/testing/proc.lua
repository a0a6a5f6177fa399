-- paygate.testing.proc: start and watch child processes from a spec
-- (`paygate exec busted`) without blocking the loop: posix_spawn, then
-- waitpid(WNOHANG) polled between short sleeps of the calling coroutine.
--
-- A process started with { watchdog = true } gets a companion shell that
-- ends it (TERM, then KILL) if this process dies without stopping it, so a
-- crashed or killed spec run leaves nothing behind. stop_all() ends every
-- process still registered (what a spec's teardown calls).
local ffi = require "ffi"
local core = require "paygate.core"

ffi.cdef [[
typedef struct { int __allocated; int __used; void *__actions; int __pad[16]; }
  posix_spawn_file_actions_t;
int posix_spawn_file_actions_init(posix_spawn_file_actions_t *fa);
int posix_spawn_file_actions_destroy(posix_spawn_file_actions_t *fa);
int posix_spawn_file_actions_addopen(posix_spawn_file_actions_t *fa, int fd,
      const char *path, int oflag, unsigned int mode);
int posix_spawnp(int *pid, const char *file,
      const posix_spawn_file_actions_t *fa, const void *attr,
      char *const argv[], char *const envp[]);
int waitpid(int pid, int *status, int options);
int kill(int pid, int sig);
int getpid(void);
extern char **environ;
]]

local C = ffi.C
local bit = require "bit"
local O_WRONLY, O_CREAT, O_APPEND, O_RDONLY = 1, 64, 1024, 0
local WNOHANG = 1

local type, error, ipairs, tostring, setmetatable, assert =
      type, error, ipairs, tostring, setmetatable, assert

local _M = { SIGTERM = 15, SIGKILL = 9, SIGHUP = 1, SIGINT = 2,
             SIGUSR1 = 10, SIGUSR2 = 12 }

local live = {}          -- pid -> proc, for stop_all()

local Proc = {}
Proc.__index = Proc

local function raw_spawn(argv, log)
  local fa = ffi.new("posix_spawn_file_actions_t[1]")
  C.posix_spawn_file_actions_init(fa)
  C.posix_spawn_file_actions_addopen(fa, 0, "/dev/null", O_RDONLY, 0)
  C.posix_spawn_file_actions_addopen(fa, 1, log,
    O_WRONLY + O_CREAT + O_APPEND, 420)
  C.posix_spawn_file_actions_addopen(fa, 2, log,
    O_WRONLY + O_CREAT + O_APPEND, 420)
  local cargv = ffi.new("char *[?]", #argv + 1)
  local keep = {}
  for i, a in ipairs(argv) do
    keep[i] = ffi.new("char[?]", #a + 1, a)
    cargv[i - 1] = keep[i]
  end
  cargv[#argv] = nil
  local pid = ffi.new("int[1]")
  local rc = C.posix_spawnp(pid, argv[1], fa, nil, cargv, C.environ)
  C.posix_spawn_file_actions_destroy(fa)
  if rc ~= 0 then
    return nil, core.error("spawn", "cannot start " .. argv[1]
                           .. " (errno " .. rc .. ")")
  end
  return pid[0]
end

--- syntax: proc = proc.spawn(argv[, { log = path, watchdog = bool,
---                                    watchdog_rmdir = dir }])
-- Starts argv[1] (looked up in PATH) with stdin from /dev/null and stdout
-- and stderr appended to log (default /dev/null). watchdog_rmdir: a
-- /tmp/paygate-* folder the watchdog removes after ending the process.
-- returns: a proc (proc.pid, proc.log); raises when it cannot start.
function _M.spawn(argv, opts)
  if type(argv) ~= "table" or type(argv[1]) ~= "string" then
    error("proc.spawn: argv must be a list of strings", 2)
  end
  opts = opts or {}
  local log = opts.log or "/dev/null"
  local pid, err = raw_spawn(argv, log)
  if not pid then error(tostring(err), 2) end
  local p = setmetatable({ pid = pid, log = log, argv = argv }, Proc)
  if opts.watchdog then
    -- ends the child if we die first; stopped (and reaped) by p:kill().
    -- It ignores the INT, TERM and HUP that end the spec run with its
    -- whole process group (Ctrl-C, a CI's cancel, a closed terminal): it
    -- has its work to do then.
    local me = tostring(C.getpid())
    local script = "trap '' INT TERM HUP; while kill -0 " .. me .. " 2>/dev/null; do sleep 0.5; "
      .. "done; kill -TERM " .. pid .. " 2>/dev/null; sleep 3; "
      .. "kill -KILL " .. pid .. " 2>/dev/null"
    local rm = opts.watchdog_rmdir
    if type(rm) == "string" and rm:match("^/tmp/paygate%-[%w.%-_]+$") then
      script = script .. "; rm -rf '" .. rm .. "'"
    end
    local wpid = raw_spawn({ "sh", "-c", script }, "/dev/null")
    if wpid then
      p.watchdog = setmetatable({ pid = wpid, log = "/dev/null" }, Proc)
    end
  end
  live[pid] = p
  return p
end

-- The folders to remove once this process is gone, one a line, and the
-- shell that removes them then (started with the first one).
local reap_list

--- syntax: proc.remove_when_gone(dir)
-- dir (a /tmp/paygate-* folder) is removed once this process is gone,
-- however it ended (Ctrl-C, a CI's cancel, a crash: a run killed before
-- its own cleanup), by a shell that outlives it. Raises on another path.
function _M.remove_when_gone(dir)
  if type(dir) ~= "string" or not dir:match("^/tmp/paygate%-[%w.%-_]+$") then
    error("proc.remove_when_gone: not a /tmp/paygate-* folder: "
          .. tostring(dir), 2)
  end
  if not reap_list then
    local p = assert(io.popen("mktemp /tmp/paygate-reap.XXXXXX"))
    local list = p:read("*l")
    p:close()
    assert(list and list ~= "", "mktemp failed")
    -- as the watchdog, it ignores the signals that end the spec run with
    -- its process group
    local script = "trap '' INT TERM HUP; while kill -0 "
      .. tostring(C.getpid()) .. " 2>/dev/null; do sleep 0.5; done; "
      .. "while IFS= read -r d; do case \"$d\" in /tmp/paygate-*) "
      .. "rm -rf \"$d\";; esac; done < '" .. list .. "'; rm -f '" .. list
      .. "'"
    if not raw_spawn({ "sh", "-c", script }, "/dev/null") then
      os.remove(list)
      return
    end
    reap_list = list
  end
  local f = io.open(reap_list, "a")
  if f then
    f:write(dir, "\n")
    f:close()
  end
end

--- syntax: code = proc:poll()
-- returns: nil while it runs; its exit code (128 + signal if killed) once
-- it ended (reaped here).
function Proc:poll()
  if self.status then return self.status end
  local st = ffi.new("int[1]")
  local r = C.waitpid(self.pid, st, WNOHANG)
  if r == self.pid then
    local s = st[0]
    if bit.band(s, 0x7f) == 0 then
      self.status = bit.rshift(bit.band(s, 0xff00), 8)
    else
      self.status = 128 + bit.band(s, 0x7f)
    end
  elseif r < 0 then
    self.status = -1          -- not our child (any more)
  end
  if self.status then
    live[self.pid] = nil
    if self.watchdog then
      local w = self.watchdog
      self.watchdog = nil
      w:kill(_M.SIGKILL)
      w:wait(2)
    end
  end
  return self.status
end

--- syntax: proc:kill([sig]) -- default SIGTERM; nothing once it ended
function Proc:kill(sig)
  if self:poll() == nil then C.kill(self.pid, sig or _M.SIGTERM) end
end

--- syntax: code = proc:wait([timeout])
-- yields: polls until the process ends or timeout (default 10 s) passes.
-- returns: its exit code, or nil if it still runs at the deadline.
function Proc:wait(timeout)
  -- monotonic: a wall-clock step (NTP) neither ends the wait at once nor
  -- makes it last as long as the step
  local deadline = core.mono() + (timeout or 10)
  while core.mono() < deadline do
    local s = self:poll()
    if s then return s end
    core.sleep(0.01)
  end
  return self:poll()
end

--- syntax: code = proc:stop([timeout])
-- TERM, wait up to timeout (default 15 s), then KILL.
-- returns: the exit code.
function Proc:stop(timeout)
  self:kill(_M.SIGTERM)
  local code = self:wait(timeout or 15)
  if code == nil then
    self:kill(_M.SIGKILL)
    code = self:wait(5)
  end
  return code
end

--- syntax: v = proc.wait_until(fn[, timeout[, what]])
-- yields: calls fn() every 20 ms until it returns a truthy value.
-- returns: that value; raises "timed out waiting for WHAT" at the deadline
-- (default 10 s), with fn's second result of its last call, when it gave
-- one, as what it saw: return false, "3 rows of 5".
function _M.wait_until(fn, timeout, what)
  local deadline = core.mono() + (timeout or 10)
  local seen
  repeat
    local v, last = fn()
    if v then return v end
    seen = last
    core.sleep(0.02)
  until core.mono() > deadline
  -- what fn said it saw, the last time (its second result), bounded
  local tail = ""
  if seen ~= nil then
    tail = tostring(seen)
    if #tail > 400 then tail = tail:sub(1, 400) .. "..." end
    tail = " (last seen: " .. tail .. ")"
  end
  error("timed out waiting for " .. (what or "a condition") .. tail, 2)
end

--- syntax: code, output = proc.run(argv[, { timeout = s, log = path }])
-- yields: runs a command to its end without blocking the loop.
-- returns: the exit code and what it wrote to stdout and stderr; nil and
-- the output if it was still running at the deadline (it is killed).
function _M.run(argv, opts)
  opts = opts or {}
  local log = opts.log or os.tmpname()
  local p = _M.spawn(argv, { log = log })
  local code = p:wait(opts.timeout or 60)
  if code == nil then p:stop(1) end
  local out = _M.read(log)
  if not opts.log then os.remove(log) end
  return code, out
end

--- syntax: ok = proc.exists(path) -- whether the file is there (a mark
-- another process makes: proc.read gives "" for a missing file and an
-- empty one alike)
function _M.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

--- syntax: s = proc.read(path) -- the file's content, "" when missing
function _M.read(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

--- syntax: proc.write(path, data) -- the file's whole content (raises on
-- failure)
function _M.write(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

--- syntax: proc.kill_pid(pid[, sig]) -- kill(2) by pid
function _M.kill_pid(pid, sig) return C.kill(pid, sig or _M.SIGTERM) end

--- syntax: proc.getpid() -- this process's pid
function _M.getpid() return C.getpid() end

--- syntax: pids = proc.children(pid)
-- The pids (numbers, ascending) of pid's child processes now, read from
-- /proc (no pgrep needed).
function _M.children(pid)
  local list = {}
  local names = require("paygate.core").listdir("/proc") or {}
  for _, name in ipairs(names) do
    if name:match("^%d+$") then
      -- /proc/N/stat: "N (comm) S PPID ...": comm may hold spaces and
      -- parentheses, so the fields are read after its last ')'
      -- (nil: the process ended since the listing)
      local stat = _M.read("/proc/" .. name .. "/stat")
      local ppid = stat and stat:match(".*%) %S+ (%d+)")
      if tonumber(ppid) == pid then list[#list + 1] = tonumber(name) end
    end
  end
  table.sort(list)
  return list
end

--- syntax: n = proc.stop_all([timeout])
-- yields: stops every process spawned here that still runs.
-- returns: how many it stopped.
function _M.stop_all(timeout)
  local n = 0
  for _, p in pairs(live) do
    p:stop(timeout)
    n = n + 1
  end
  return n
end

return _M
