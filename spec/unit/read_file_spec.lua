-- core.read_file: a small file a config names (a secret, a key, a
-- certificate) read whole, or refused with a classified reason that names
-- the config key, never the path (a secret may be written where its path
-- belongs) nor a byte of the file.
local core = require "paygate.core"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
teardown(function()
  servers.sh("rm -rf " .. tmp)
end)

local function write(p, s)
  local f = assert(io.open(p, "wb"))
  f:write(s)
  f:close()
end

-- the refusal of path, checked whole: kind, key, reason and message, and
-- neither the path nor secret in any of them
local function refused(path, kind, reason, max, secret)
  local s, err = core.read_file(path, "gateway.admin_token_file", max)
  assert.is_nil(s, path)
  assert.equal(kind, err.kind, path)
  assert.equal("gateway.admin_token_file", err.key)
  assert.equal(reason, err.reason)
  assert.equal("gateway.admin_token_file: " .. reason, err.message)
  assert.equal(kind .. ": gateway.admin_token_file: " .. reason,
               tostring(err))
  assert.is_false(err.retryable)
  for _, v in ipairs({ err.message, err.reason, tostring(err) }) do
    if path ~= "" then assert.is_nil(v:find(path, 1, true), v) end
    if secret then assert.is_nil(v:find(secret, 1, true), v) end
  end
end

describe("core.read_file (paygate.read_file)", function()
  it("reads a file whole, bytes as they are", function()
    local p = tmp .. "/token"
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    local bytes = " \n" .. table.concat(all) .. "\r\n"
    write(p, bytes)
    assert.equal(bytes, core.read_file(p, "k"))
    -- past the first buffer, and the cap itself
    write(p, ("x"):rep(1048576))
    assert.equal(1048576, #assert(core.read_file(p, "k")))
    write(p, ("y"):rep(10000))
    assert.equal(("y"):rep(10000), core.read_file(p, "k", 10000))
    assert.equal(core.read_file, require("paygate").read_file)
  end)

  it("refuses a folder: it opens, and its read fails", function()
    -- (io.open takes a folder; its read then fails: the three copies
    -- this replaces each said so in their own words)
    servers.sh("mkdir -p " .. tmp .. "/a-folder")
    refused(tmp .. "/a-folder", "not_a_file", "Is a directory")
  end)

  it("refuses a FIFO without waiting for a writer, and a device", function()
    -- (io.open of a FIFO waits for a writer: a start that never ended;
    -- /dev/zero read whole never ends)
    local fifo = tmp .. "/fifo"
    assert(servers.sh("mkfifo " .. fifo))
    local special = "not a regular file (a FIFO, a socket or a device)"
    refused(fifo, "not_a_file", special)
    refused("/dev/zero", "not_a_file", special)
    refused("/dev/null", "not_a_file", special)
  end)

  it("refuses a missing file, and a path through a file", function()
    refused(tmp .. "/none", "not_found", "No such file or directory")
    write(tmp .. "/plain", "x")
    refused(tmp .. "/plain/under", "not_found", "Not a directory")
    refused("", "not_found", "No such file or directory")
    -- a secret pasted where its path belongs is not repeated
    local key = "hOC69FJ5aBcDeFgHiJkLmNoPqRsTuVwX"
    refused(key, "not_found", "No such file or directory", nil, key)
    refused(tmp .. "/a\0b", "not_found", "not a path (it holds a NUL byte)")
  end)

  it("refuses an empty file", function()
    write(tmp .. "/empty", "")
    refused(tmp .. "/empty", "empty", "the file is empty")
  end)

  it("refuses a file past its cap (1 MiB unless told), never its bytes",
     function()
    local p = tmp .. "/big"
    write(p, ("s3cr3t"):rep(174763))              -- 1 MiB and 2 bytes
    refused(p, "too_large", "the file is over 1048576 bytes", nil, "s3cr3t")
    write(p, ("z"):rep(65))
    refused(p, "too_large", "the file is over 64 bytes", 64)
    assert.equal(("z"):rep(65), core.read_file(p, "k", 65))
  end)

  it("reads a file that says it is empty (as /proc's do) to its end, or"
     .. " to its cap", function()
    -- fstat's size is 0; the read finds the bytes, and stops at the cap
    local s = assert(core.read_file("/proc/self/status", "k"))
    assert.truthy(s:find("Pid:", 1, true))
    refused("/proc/self/status", "too_large", "the file is over 8 bytes", 8)
    -- past its first buffer (4 KiB), which grows: a /proc file that reads
    -- the same twice (the kernel's, not this process's)
    for _, p in ipairs({ "/proc/crypto", "/proc/zoneinfo",
                         "/proc/kallsyms" }) do
      local a = servers.read_cmd("cat " .. p .. " 2>/dev/null")
      if #a > 8192 and a == servers.read_cmd("cat " .. p) then
        assert.equal(a, core.read_file(p, "k", 64 * 1048576), p)
        return
      end
    end
    pending("no /proc file here reads past 8 KiB the same twice")
  end)

  it("refuses a file it may not read", function()
    local p = tmp .. "/locked"
    write(p, "secret")
    assert(servers.sh("chmod 000 " .. p))
    if servers.is_root() then
      -- root reads a file of mode 000: nothing here can be denied
      pending("runs as root, whom chmod 000 does not stop")
      return
    end
    refused(p, "denied", "Permission denied")
  end)

  it("raises on misuse, naming the function", function()
    local p = tmp .. "/token"
    for _, m in ipairs({ 0, -1, 1.5, 0 / 0, 1 / 0, 64 * 1048576 + 1, "64",
                         {} }) do
      local ok, err = pcall(core.read_file, p, "k", m)
      assert.is_false(ok, tostring(m))
      assert.matches("^paygate.read_file: max must be a whole number of"
                     .. " bytes from 1 to 67108864", err)
    end
    local ok, err = pcall(core.read_file, nil, "k")
    assert.is_false(ok)
    assert.matches("^paygate.read_file: path must be a string %(got nil%)",
                   err)
    ok, err = pcall(core.read_file, p, nil)
    assert.is_false(ok)
    assert.matches("^paygate.read_file: name must be a string %(got nil%)",
                   err)
  end)
end)
