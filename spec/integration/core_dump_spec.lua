-- No core dumps: a crashed paygate's memory holds the secrets it read
-- (private keys, APIv3 keys, webhook secrets, store passwords), so every
-- paygate process -- `paygate exec`, the master and its workers -- runs
-- with RLIMIT_CORE 0 (soft and hard), even when started from a shell that
-- allows core files (ulimit -c unlimited).
local server = require "support.server"
local proc = require "support.proc"

local dir
local SECRET = "SECRETMARKERAPIV3KEY0123456789AB"

local function write(path, text, mode)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  if mode then os.execute("chmod " .. mode .. " " .. path) end
end

-- "Max core file size  SOFT  HARD  bytes" of /proc/<pid>/limits
local function core_limits(text)
  return text:match("Max core file size%s+(%S+)%s+(%S+)")
end

setup(function()
  dir = server.tmpdir()
  -- paygate started as a shell that allows core files starts it
  local bin = PAYGATE_BIN:sub(1, 1) == "/" and PAYGATE_BIN
              or os.getenv("PWD") .. "/" .. PAYGATE_BIN
  write(dir .. "/allow_dumps", "#!/bin/sh\nulimit -S -c unlimited"
        .. " 2>/dev/null\nexec '" .. bin .. "' \"$@\"\n", "755")
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("core dumps", function()
  it("are off in paygate exec, and a crash with a secret in memory leaves"
     .. " no core file", function()
    write(dir .. "/crash.lua", ([[
local f = assert(io.open("/proc/self/limits"))
io.stdout:write(f:read("*a")) f:close() io.stdout:flush()
local key = %q .. tostring(os.time())       -- a secret, in the heap
local ffi = require "ffi"
ffi.cdef "int kill(int, int); int getpid(void);"
ffi.C.kill(ffi.C.getpid(), 11)
]]):format(SECRET))
    local code, out = proc.run({ "/bin/sh", "-c", "cd '" .. dir .. "' && exec '"
      .. dir .. "/allow_dumps' exec crash.lua" }, { timeout = 30 })
    assert.is_not.equal(0, code, out)
    local soft, hard = core_limits(out)
    assert.equal("0", soft, out)
    assert.equal("0", hard, out)
    -- (a core_pattern of "core" or "core.%p" writes it here)
    local ls = io.popen("ls '" .. dir .. "'"):read("*a")
    assert.is_nil(("\n" .. ls):find("\ncore"), ls)
  end)

  it("are off in the master and its workers", function()
    local s = server.start{ bin = dir .. "/allow_dumps", source = [[
local paygate = require "paygate"
paygate.route("GET", "/limits", function()
  local f = assert(io.open("/proc/self/limits"))
  local s = f:read("*a")
  f:close()
  return 200, s
end)
]] }
    local res = assert(s:request{ path = "/limits" })
    local soft, hard = core_limits(res.body)
    s:stop()
    assert.equal("0", soft, res.body)
    assert.equal("0", hard, res.body)
  end)
end)
