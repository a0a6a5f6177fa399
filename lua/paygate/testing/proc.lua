-- paygate.testing.proc: start and watch child processes from a spec
-- (`paygate exec busted`) without blocking the loop: posix_spawn, then
-- waitpid(WNOHANG) polled between short sleeps of the calling coroutine.
--
-- A process started with { watchdog = true } gets a companion shell that
-- ends it (TERM, then KILL) if this process dies without stopping it, so a
-- crashed or killed spec run leaves nothing behind; proc.guard(pid) gives
-- any other process (a daemon a spec started: Redis, PostgreSQL) the same
-- companion. Those shells run in a process group of their own: a SIGKILL
-- to the spec run's whole group (a CI's timeout) leaves them to do their
-- work. stop_all() ends every
-- process still registered (what a spec's teardown calls), and under
-- busted it is called when the run ends, whatever its specs did: every
-- child is reaped before the run exits.
local ffi = require "ffi"
local core = require "paygate.core"

ffi.cdef [[
typedef struct { int __allocated; int __used; void *__actions; int __pad[16]; }
  posix_spawn_file_actions_t;
int posix_spawn_file_actions_init(posix_spawn_file_actions_t *fa);
int posix_spawn_file_actions_destroy(posix_spawn_file_actions_t *fa);
int posix_spawn_file_actions_addopen(posix_spawn_file_actions_t *fa, int fd,
      const char *path, int oflag, unsigned int mode);
int posix_spawn_file_actions_adddup2(posix_spawn_file_actions_t *fa, int fd,
      int newfd);
typedef struct { short __flags; int __pgrp;
  struct { unsigned long __val[16]; } __sd, __ss;
  struct { int sched_priority; } __sp; int __policy; int __pad[16]; }
  posix_spawnattr_t;
int posix_spawnattr_init(posix_spawnattr_t *attr);
int posix_spawnattr_destroy(posix_spawnattr_t *attr);
int posix_spawnattr_setflags(posix_spawnattr_t *attr, short flags);
int posix_spawnattr_setpgroup(posix_spawnattr_t *attr, int pgroup);
int posix_spawnp(int *pid, const char *file,
      const posix_spawn_file_actions_t *fa, const posix_spawnattr_t *attr,
      char *const argv[], char *const envp[]);
int waitpid(int pid, int *status, int options);
int kill(int pid, int sig);
int getpid(void);
int pipe2(int fds[2], int flags);
int close(int fd);
char *mkdtemp(char *template);
int mkstemp(char *template);
char *strerror(int errnum);
char *getcwd(char *buf, size_t size);
extern char **environ;
]]

local C = ffi.C
local bit = require "bit"
local O_WRONLY, O_CREAT, O_APPEND, O_RDONLY = 1, 64, 1024, 0
local O_CLOEXEC = 524288
local WNOHANG = 1
local POSIX_SPAWN_SETPGROUP = 2

local type, error, ipairs, pairs, tostring, setmetatable, assert, pcall =
      type, error, ipairs, pairs, tostring, setmetatable, assert, pcall

local _M = { SIGTERM = 15, SIGKILL = 9, SIGHUP = 1, SIGINT = 2,
             SIGUSR1 = 10, SIGUSR2 = 12 }

local live = {}          -- pid -> proc, for stop_all()

local Proc = {}
Proc.__index = Proc

--- syntax: s = proc.sh_quote(s) -- s as one word of a shell command
function _M.sh_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local sh_quote = _M.sh_quote

--- syntax: root = proc.tmp_root()
-- returns: where the kit makes its folders and files: $TMPDIR when set to
-- an absolute path (trailing slashes dropped), else /tmp.
function _M.tmp_root()
  local t = os.getenv("TMPDIR")
  t = t and t:match("^(/.-)/*$")
  if t and t ~= "" then return t end
  return "/tmp"
end

--- syntax: ok = proc.is_kit_path(path[, top])
-- Whether path is a paygate-* folder (or file) directly under the kit's
-- temporary root (proc.tmp_root(), or /tmp), or, without top, a path
-- inside one: what the kit may remove (rm -rf) without removing a
-- caller's own files by mistake.
function _M.is_kit_path(path, top)
  if type(path) ~= "string" or path:find("/%.%.?/") or path:find("/%.%.?$")
  then
    return false
  end
  for _, base in ipairs({ _M.tmp_root(), "/tmp" }) do
    local pre = base .. "/paygate-"
    if path:sub(1, #pre) == pre then
      local rest = path:sub(#pre + 1)
      if rest:match("^[%w.%-_]+$") then return true end
      if not top and rest:match("^[%w.%-_]+/") then return true end
    end
  end
  return false
end

--- syntax: on = proc.keep()
-- returns: whether PAYGATE_TEST_KEEP is set (not empty, not "0"): the kit
-- then removes none of its folders, to look into after a failure (the
-- run's end lists them); its processes are stopped all the same.
function _M.keep()
  local v = os.getenv("PAYGATE_TEST_KEEP")
  return v ~= nil and v ~= "" and v ~= "0"
end

-- mkdtemp/mkstemp under the kit's root: no shell started for it (mktemp),
-- and TMPDIR honoured
local function make_temp(name, dir)
  local path = _M.tmp_root() .. "/paygate-" .. name .. ".XXXXXX"
  local buf = ffi.new("char[?]", #path + 1, path)
  if dir then
    if C.mkdtemp(buf) == nil then
      error("cannot make a folder " .. path .. ": "
            .. ffi.string(C.strerror(ffi.errno()))
            .. " (TMPDIR must name a folder this user may write in)", 0)
    end
  else
    local fd = C.mkstemp(buf)
    if fd < 0 then
      error("cannot make a file " .. path .. ": "
            .. ffi.string(C.strerror(ffi.errno()))
            .. " (TMPDIR must name a folder this user may write in)", 0)
    end
    C.close(fd)
  end
  return ffi.string(buf)
end

--- syntax: dir = proc.make_temp_dir(name) -- a fresh private folder
-- ROOT/paygate-NAME.XXXXXX (ROOT: proc.tmp_root()); raises when it cannot
-- be made. Nothing removes it by itself: server.tmpdir()'s are removed.
function _M.make_temp_dir(name) return make_temp(name, true) end

-- This process's life, as a pipe only it holds the writing end of (close
-- on exec: no child inherits it). A watchdog reads the other end: it sees
-- the end of the file the moment this process is gone, however it ended,
-- and no sooner; no polling, no sleeping shell left behind.
local life

local function life_fd()
  if not life then
    local fds = ffi.new("int[2]")
    if C.pipe2(fds, O_CLOEXEC) ~= 0 then return nil end
    life = { r = fds[0], w = fds[1] }
  end
  return life.r
end

-- the shell lines that wait until this process is gone (its stdin is the
-- life pipe's reading end), ignoring the INT, TERM and HUP that end the
-- spec run with its whole process group (Ctrl-C, a CI's cancel, a closed
-- terminal): it has its work to do then
local UNTIL_GONE = "trap '' INT TERM HUP; while read -r _; do :; done; "

-- own_group: the child leads a process group of its own (setpgid(0, 0)
-- before exec)
local function raw_spawn(argv, log, stdin, own_group)
  local fa = ffi.new("posix_spawn_file_actions_t[1]")
  C.posix_spawn_file_actions_init(fa)
  if stdin then
    C.posix_spawn_file_actions_adddup2(fa, stdin, 0)
  else
    C.posix_spawn_file_actions_addopen(fa, 0, "/dev/null", O_RDONLY, 0)
  end
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
  local attr
  if own_group then
    attr = ffi.new("posix_spawnattr_t[1]")
    C.posix_spawnattr_init(attr)
    C.posix_spawnattr_setflags(attr, POSIX_SPAWN_SETPGROUP)
    C.posix_spawnattr_setpgroup(attr, 0)
  end
  local pid = ffi.new("int[1]")
  local rc = C.posix_spawnp(pid, argv[1], fa, attr, cargv, C.environ)
  C.posix_spawn_file_actions_destroy(fa)
  if attr then C.posix_spawnattr_destroy(attr) end
  if rc ~= 0 then
    return nil, core.error("spawn", "cannot start " .. argv[1]
                           .. " (errno " .. rc .. ")")
  end
  return pid[0]
end

-- Starts a shell that runs script once this process is gone (it waits on
-- the life pipe first). It leads a process group of its own: what ends
-- this run's whole group (Ctrl-C, a CI's cancel, a CI's timeout sending
-- SIGKILL to the group) does not end it before its work.
-- returns: its proc, or nil when no pipe could be made or it could not
-- start.
local function spawn_when_gone(script)
  local stdin = life_fd()
  if not stdin then return nil end
  local pid = raw_spawn({ "sh", "-c", UNTIL_GONE .. script }, "/dev/null",
                        stdin, true)
  return pid and setmetatable({ pid = pid, log = "/dev/null" }, Proc)
end

-- A process's start time (/proc/PID/stat's 22nd field, clock ticks since
-- boot): with its pid it names one process, where the pid alone may name
-- a later one once the first has been reaped. nil when pid does not run
-- (or is a zombie).
local function start_time(pid)
  -- after comm's last ')': state ppid ... starttime (the 20th)
  local rest = _M.read("/proc/" .. pid .. "/stat"):match("^.*%) (.+)$")
  local f = {}
  for w in (rest or ""):gmatch("%S+") do f[#f + 1] = w end
  if f[1] == nil or f[1] == "Z" or not f[20] then return nil end
  return f[20]
end

local GUARD_SIGNALS = { TERM = true, QUIT = true, INT = true, HUP = true }

local Guard = setmetatable({}, { __index = Proc })
Guard.__index = Guard

--- syntax: yes = proc.running(pid)
-- Whether process pid runs: false once it has ended, even before it is
-- reaped. `kill -0` says yes to a zombie, and a daemon's (Redis's,
-- PostgreSQL's) parent is the machine's init, which may reap it seconds
-- later (about 2 s on some container runtimes, more under load).
function _M.running(pid)
  return start_time(tonumber(pid) or -1) ~= nil
end

--- syntax: g = proc.guard(pid[, { signal = "TERM", grace = 10,
---                                rmdir = dir }])
-- Ends process pid once this process is gone, however it ends (a crash,
-- SIGKILL, a SIGKILL to its whole process group): a shell outliving it
-- sends it signal ("TERM", "QUIT", "INT" or "HUP") and CONT (a stopped
-- process acts on it then), waits up to grace seconds for it to end, then
-- KILLs it, then removes rmdir (a kit folder, proc.is_kit_path(dir, true);
-- kept with proc.keep()). pid need not be this process's child: a daemon
-- (Redis, PostgreSQL's postmaster) is guarded by its pid file's pid. The
-- shell signals pid only while it names the process it named here (its
-- start time), never a later process given the same pid.
-- returns: g, or nil when pid does not run (nothing to guard) or the
-- shell could not start. g:cancel() ends the shell (and reaps it): call it
-- once the process was stopped otherwise, so that nothing signals its pid
-- again. Raises on a bad signal, grace or rmdir.
function _M.guard(pid, opts)
  opts = opts or {}
  local sig, grace, rm = opts.signal or "TERM", opts.grace or 10, opts.rmdir
  if not GUARD_SIGNALS[sig] then
    error("proc.guard: signal must be TERM, QUIT, INT or HUP: "
          .. tostring(sig), 2)
  end
  if type(grace) ~= "number" or not (grace >= 0 and grace <= 600) then
    error("proc.guard: grace must be seconds (0 to 600): "
          .. tostring(grace), 2)
  end
  if rm ~= nil and not _M.is_kit_path(rm, true) then
    error("proc.guard: rmdir is not a " .. _M.tmp_root()
          .. "/paygate-* folder: " .. tostring(rm), 2)
  end
  local id = tonumber(pid)
  if not id or id <= 0 or id % 1 ~= 0 then
    error("proc.guard: pid must be a process id: " .. tostring(pid), 2)
  end
  pid = id
  local start = start_time(pid)
  if not start then return nil end
  local n = tostring(pid)
  -- ours: pid is still the process guarded, and not a zombie (one not
  -- yet reaped by its new parent has ended)
  local script = "ours() { l=; read -r l 2>/dev/null < /proc/" .. n
    .. "/stat || return 1; l=${l##*) }; set -- $l; [ \"$1\" != Z ]"
    .. " && [ \"${20}\" = " .. start .. " ]; }; "
    .. "ours && kill -" .. sig .. " " .. n .. " 2>/dev/null && kill -CONT "
    .. n .. " 2>/dev/null; "
    .. "i=0; while [ $i -lt " .. math.ceil(grace * 10) .. " ] && ours; do "
    .. "sleep 0.1; i=$((i+1)); done; "
    .. "ours && kill -KILL " .. n .. " 2>/dev/null"
  if rm and not _M.keep() then
    script = script .. "; rm -rf " .. sh_quote(rm)
  end
  local g = spawn_when_gone(script)
  return g and setmetatable(g, Guard)
end

--- syntax: g:cancel() -- the guard ends (and is reaped) without acting
function Guard:cancel()
  self:kill(_M.SIGKILL)
  self:wait(5)
end

-- Under busted, the end of the run (its "suite end", after every spec
-- file, passed or failed or raised) stops every process still running and
-- then runs the at_run_end functions (server: its folders).
local at_end = {}
local subscribed = false

local function subscribe()
  subscribed = true
  local ok, busted = pcall(require, "busted")
  local sub = ok and type(busted) == "table" and busted.subscribe
  if type(sub) == "function" then
    pcall(sub, { "suite", "end" }, function()
      _M.cleanup()
      return nil, true
    end)
  end
end

--- syntax: proc.at_run_end(fn)
-- fn() is called once the busted run ends (proc.cleanup()), after every
-- process was stopped; once however many times it is given.
function _M.at_run_end(fn)
  for _, f in ipairs(at_end) do
    if f == fn then return end
  end
  at_end[#at_end + 1] = fn
  if not subscribed then subscribe() end
end

-- reaps the processes that ended since (a spec that never waits on what
-- it started would keep their zombies until the run ends)
local function reap_ended()
  for _, p in pairs(live) do p:poll() end
end

--- syntax: proc = proc.spawn(argv[, { log = path, watchdog = bool,
---                                    watchdog_rmdir = dir }])
-- Starts argv[1] (looked up in PATH) with stdin from /dev/null and stdout
-- and stderr appended to log (default /dev/null). watchdog_rmdir: a kit
-- folder (proc.is_kit_path(dir, true)) the watchdog removes after ending
-- the process (unless proc.keep()).
-- returns: a proc (proc.pid, proc.log); raises when it cannot start.
function _M.spawn(argv, opts)
  if type(argv) ~= "table" or type(argv[1]) ~= "string" then
    error("proc.spawn: argv must be a list of strings", 2)
  end
  opts = opts or {}
  if not subscribed then subscribe() end
  reap_ended()
  local log = opts.log or "/dev/null"
  local pid, err = raw_spawn(argv, log)
  if not pid then error(tostring(err), 2) end
  local p = setmetatable({ pid = pid, log = log, argv = argv }, Proc)
  if opts.watchdog then
    -- ends the child once we are gone (TERM, then KILL after 10 s), then
    -- removes the folder; cancelled (and reaped) by p:poll() when the
    -- child ends first
    local rm = opts.watchdog_rmdir
    p.watchdog = _M.guard(pid, { rmdir = _M.is_kit_path(rm, true) and rm
                                         or nil })
  end
  live[pid] = p
  return p
end

-- The paths to remove once this process is gone, one a line, and the
-- shell that removes them then (started with the first one).
local reap_list, reaper

--- syntax: proc.remove_when_gone(path)
-- path (a kit folder or file: proc.is_kit_path(path, true)) is removed
-- once this process is gone, however it ended (Ctrl-C, a CI's cancel, a
-- crash: a run killed before its own cleanup), by a shell that outlives
-- it. Nothing with proc.keep(). Raises on another path.
function _M.remove_when_gone(dir)
  if not _M.is_kit_path(dir, true) then
    error("proc.remove_when_gone: not a " .. _M.tmp_root()
          .. "/paygate-* folder: " .. tostring(dir), 2)
  end
  if _M.keep() then return end
  if not reap_list then
    local list = make_temp("reap", false)
    local sh = spawn_when_gone(
      "while IFS= read -r d; do case \"${d##*/}\" in paygate-*) "
      .. "rm -rf \"$d\";; esac; done < " .. sh_quote(list) .. "; rm -f "
      .. sh_quote(list))
    if not sh then
      os.remove(list)
      return
    end
    if not subscribed then subscribe() end
    reap_list = list
    reaper = sh
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
      w:cancel()
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

--- syntax: a, b, c = proc.call_at(level, f, ...)
-- f(...)'s first three results; an error f raises is raised again at
-- level, counted from call_at's caller as error's level is (2: that
-- caller's caller). So a kit function calling another kit function (or
-- wait_until) has its errors name the spec's line, not its own: through
-- pcall they name no line. Never tail-called (return proc.call_at(...)
-- would drop the caller's frame, and level would count from the next).
function _M.call_at(level, f, ...)
  local ok, a, b, c = pcall(f, ...)
  if not ok then error(a, level + 1) end
  return a, b, c
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
  local log = opts.log
  if not log then
    log = make_temp("run", false)
    _M.remove_when_gone(log)
  end
  -- (through pcall: spawn's error names no line, and is raised again at
  -- this function's caller's)
  local ok, p = pcall(_M.spawn, argv, { log = log })
  if not ok then
    if not opts.log then os.remove(log) end
    error(p, 2)
  end
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
  local f, err = io.open(path, "wb")
  if not f then error(err, 2) end   -- (assert's would name no line)
  f:write(data)
  f:close()
end

--- syntax: dir, err = proc.cwd() -- this process's current directory
-- (where a relative path is taken from), or nil, err
function _M.cwd()
  local buf = ffi.new("char[4096]")
  if C.getcwd(buf, 4096) == nil then
    return nil, ffi.string(C.strerror(ffi.errno()))
  end
  return ffi.string(buf)
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
-- yields: stops every process spawned here that still runs: TERM to all
-- at once, then KILL to those still running after timeout (default 15 s);
-- each is reaped (and its watchdog with it).
-- returns: how many it stopped.
function _M.stop_all(timeout)
  local list = {}
  for _, p in pairs(live) do list[#list + 1] = p end
  for _, p in ipairs(list) do p:kill(_M.SIGTERM) end
  local function running()
    local n = 0
    for _, p in ipairs(list) do
      if p:poll() == nil then n = n + 1 end
    end
    return n
  end
  local deadline = core.mono() + (timeout or 15)
  while running() > 0 and core.mono() < deadline do core.sleep(0.01) end
  if running() > 0 then
    for _, p in ipairs(list) do p:kill(_M.SIGKILL) end
    deadline = core.mono() + 5
    while running() > 0 and core.mono() < deadline do core.sleep(0.01) end
  end
  return #list
end

--- syntax: proc.cleanup()
-- yields: what the end of a busted run calls: stop_all(10), then the
-- at_run_end functions, then ends (and reaps) the shell that would have
-- removed the folders had this process died first. Nothing this process
-- started runs after it.
function _M.cleanup()
  _M.stop_all(10)
  for _, fn in ipairs(at_end) do
    local ok, err = pcall(fn)
    if not ok then
      io.stderr:write("paygate.testing: at the run's end: ", tostring(err),
                      "\n")
    end
  end
  if reaper then
    reaper:kill(_M.SIGKILL)
    reaper:wait(5)
    os.remove(reap_list)
    reaper, reap_list = nil, nil
  end
end

return _M
