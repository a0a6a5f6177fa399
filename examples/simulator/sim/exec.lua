-- sim.exec: runs a command (the openssl CLI, to make platform keys) without
-- blocking the worker's loop: posix_spawn, then waitpid(WNOHANG) polled
-- with paygate's sleep. Must run in a coroutine (a request, a task, or the
-- app's top level).
local ffi = require "ffi"
local core = require "paygate.core"

ffi.cdef [[
int posix_spawnp(int *pid, const char *file, const void *file_actions,
                 const void *attrp, char *const argv[], char *const envp[]);
int waitpid(int pid, int *status, int options);
int mkdir(const char *path, unsigned int mode);
char *strerror(int errnum);
extern char **environ;
]]

local C = ffi.C
local WNOHANG = 1

local _M = {}

--- syntax: ok, err = exec.run(argv[, timeout])
-- argv: { "openssl", "genpkey", ... } (looked up on PATH). The child's
-- output goes where the worker's goes. returns true when it exits 0, or
-- nil and a message.
function _M.run(argv, timeout)
  local cargv = ffi.new("char *[?]", #argv + 1)
  local keep = {}
  for i, a in ipairs(argv) do
    keep[i] = ffi.new("char[?]", #a + 1, a)
    cargv[i - 1] = keep[i]
  end
  cargv[#argv] = nil
  local pid = ffi.new("int[1]")
  local rc = C.posix_spawnp(pid, argv[1], nil, nil, cargv, C.environ)
  if rc ~= 0 then
    return nil, "cannot start " .. argv[1] .. " (error " .. rc .. ")"
  end
  local status = ffi.new("int[1]")
  local deadline = core.mono() + (timeout or 60)
  local wait = 0.002
  while true do
    local r = C.waitpid(pid[0], status, WNOHANG)
    if r == pid[0] then break end
    if r < 0 then return nil, argv[1] .. ": waitpid failed" end
    if core.mono() > deadline then
      return nil, argv[1] .. " took longer than " .. (timeout or 60) .. " s"
    end
    core.sleep(wait)
    if wait < 0.05 then wait = wait * 2 end
  end
  local s = status[0]
  local code = bit.rshift(bit.band(s, 0xff00), 8)
  if bit.band(s, 0x7f) ~= 0 or code ~= 0 then
    return nil, table.concat(argv, " ", 1, math.min(#argv, 3))
                .. "... failed (status " .. s .. ")"
  end
  return true
end

--- syntax: ok, why = exec.mkdir_p(path)
-- Makes path and its missing parents (mode 0755), as mkdir -p, but
-- silently: the reason comes back (strerror) instead of on stderr.
function _M.mkdir_p(path)
  local EEXIST = 17
  local prefix = path:sub(1, 1) == "/" and "" or "."
  for part in path:gmatch("[^/]+") do
    prefix = prefix .. "/" .. part
    if C.mkdir(prefix, 493) ~= 0 then
      local e = ffi.errno()
      if e ~= EEXIST then return nil, ffi.string(C.strerror(e)) end
    end
  end
  local f = io.open(path .. "/.", "rb")
  if not f then return nil, "not a directory" end
  f:close()
  return true
end

return _M
