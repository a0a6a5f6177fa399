-- spec/support/proc.lua: start and watch child processes from specs,
-- without blocking the loop (posix_spawn + waitpid(WNOHANG) through FFI).
local ffi = require "ffi"
local paygate = require "paygate"

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
extern char **environ;
]]

local C = ffi.C
local O_WRONLY, O_CREAT, O_TRUNC, O_APPEND, O_RDONLY = 1, 64, 512, 1024, 0
local WNOHANG = 1

local _M = { SIGTERM = 15, SIGKILL = 9, SIGHUP = 1, SIGINT = 2 }

local Proc = {}
Proc.__index = Proc

--- proc = spawn(argv, { log = path }) : stdout and stderr go to log
function _M.spawn(argv, opts)
  opts = opts or {}
  local fa = ffi.new("posix_spawn_file_actions_t[1]")
  C.posix_spawn_file_actions_init(fa)
  local log = opts.log or "/dev/null"
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
  assert(rc == 0, "posix_spawnp " .. argv[1] .. " failed: " .. rc)
  return setmetatable({ pid = pid[0], log = log }, Proc)
end

--- proc:poll() -> nil while running; exit code (or 128+signal) once ended
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
    return self.status
  end
  return nil
end

function Proc:kill(sig)
  if self:poll() == nil then C.kill(self.pid, sig or _M.SIGTERM) end
end

--- proc:wait(timeout) -> exit code, or nil if still running at the deadline
function Proc:wait(timeout)
  local deadline = paygate.update_time() + (timeout or 10)
  while paygate.update_time() < deadline do
    local s = self:poll()
    if s then return s end
    paygate.sleep(0.01)
  end
  return self:poll()
end

--- wait_until(fn, timeout, what): polls fn() until truthy; raises on timeout
function _M.wait_until(fn, timeout, what)
  local deadline = paygate.update_time() + (timeout or 10)
  repeat
    local v = fn()
    if v then return v end
    paygate.sleep(0.02)
  until paygate.update_time() > deadline
  error("timed out waiting for " .. (what or "a condition"), 2)
end

function _M.read(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

function _M.kill_pid(pid, sig) return C.kill(pid, sig or _M.SIGTERM) end

return _M
