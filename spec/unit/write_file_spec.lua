-- core.write_file: a file replaced whole or not at all, flushed, with its
-- mode from the start (the credentials cache and the platform
-- certificates' state file are written with it).
local core = require "paygate.core"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
teardown(function()
  servers.sh("umount " .. tmp .. "/tiny >/dev/null 2>&1")
  servers.sh("rm -rf " .. tmp)
end)

local function read(p)
  local f = io.open(p, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function mode(p)
  return servers.read_cmd("stat -c %a " .. p):gsub("%s+$", "")
end

local function leftovers(dir)
  return servers.read_cmd("ls -a " .. dir .. " | grep -c '\\.tmp$' || true")
         :gsub("%s+$", "")
end

describe("core.write_file (paygate.write_file)", function()
  it("writes, replaces whole, with mode 0600 unless told", function()
    local p = tmp .. "/a.json"
    assert.is_true(core.write_file(p, "first"))
    assert.equal("first", read(p))
    assert.equal("600", mode(p))
    assert.is_true(core.write_file(p, string.rep("x", 100000), 420))
    assert.equal(100000, #read(p))
    assert.is_true(core.write_file(p, ""))
    assert.equal("", read(p))
    assert.equal("0", leftovers(tmp))
    assert.equal(core.write_file, require("paygate").write_file)
  end)

  it("opts.sync = false: whole and with its mode all the same, not"
     .. " flushed; another opts raises", function()
    local p = tmp .. "/nosync.headers"
    assert.is_true(core.write_file(p, "a: b\n", 384, { sync = false }))
    assert.equal("a: b\n", read(p))
    assert.equal("600", mode(p))
    assert.is_true(core.write_file(p, "c", nil, { sync = true }))
    assert.equal("c", read(p))
    assert.equal("0", leftovers(tmp))
    local ok, err = pcall(core.write_file, p, "x", 384, "nosync")
    assert.is_false(ok)
    assert.matches("paygate.write_file: opts must be a table (got string)",
                   err, 1, true)
    ok, err = pcall(core.write_file, p, "x", 384, { sync = "no" })
    assert.is_false(ok)
    assert.matches("paygate.write_file: opts.sync must be a boolean (got"
                   .. " string)", err, 1, true)
    assert.equal("c", read(p))
  end)

  it("makes its temporary file afresh: one a crash left keeps neither its"
     .. " mode nor a link", function()
    local proc = require "paygate.testing.proc"
    local p = tmp .. "/stale.json"
    local t = p .. "." .. proc.getpid() .. ".tmp"
    local f = assert(io.open(t, "wb"))
    f:write("left by a crash")
    f:close()
    servers.sh("chmod 644 " .. t)
    assert.is_true(core.write_file(p, "secret"))
    assert.equal("secret", read(p))
    assert.equal("600", mode(p))
    -- a link planted at the temporary name is replaced, not written through
    local victim = tmp .. "/victim"
    f = assert(io.open(victim, "wb"))
    f:write("untouched")
    f:close()
    servers.sh("ln -s " .. victim .. " " .. t)
    assert.is_true(core.write_file(p, "again"))
    assert.equal("again", read(p))
    assert.equal("untouched", read(victim))
    assert.equal("600", mode(p))
    os.remove(victim)
  end)

  it("fails with kind io and leaves nothing where it cannot write",
     function()
    local ok, err = core.write_file(tmp .. "/no/such/dir/x", "data")
    assert.is_nil(ok)
    assert.equal("io", err.kind)
    assert.matches("No such file", err.message)
    assert.has_error(function() core.write_file(tmp .. "/m", "x", -1) end)
    assert.has_error(function() core.write_file(tmp .. "/m", nil) end)
  end)

  it("refuses a mode past 0777, saying what a decimal 0600 is", function()
    -- (Lua has no octal numbers: write_file(p, data, 0600) made a file
    -- of mode 01130, which its owner could not read)
    local p = tmp .. "/decimal"
    local ok, err = pcall(core.write_file, p, "x", 600)
    assert.is_false(ok)
    assert.matches("paygate.write_file: mode 600 is 01130 in octal, past"
                   .. " 0777 (Lua reads 0600 as the decimal 600): write 384"
                   .. ' for 0600, or tonumber("600", 8)', err, 1, true)
    assert.is_nil(read(p))
    for _, m in ipairs({ 644, 512, 4095, 1.5, 0 / 0, "0644" }) do
      ok, err = pcall(core.write_file, p, "x", m)
      assert.is_false(ok, tostring(m))
      assert.matches("^paygate.write_file: mode ", err)
    end
    assert.equal("0", leftovers(tmp))
    assert.is_true(core.write_file(p, "x", 384))
    assert.equal("600", mode(p))
    -- the function is named however it is called
    ok, err = pcall(core.write_file, nil, "x")
    assert.matches("^paygate.write_file: path must be a string %(got nil%)",
                   err)
    ok, err = pcall(core.write_file, p)
    assert.matches("^paygate.write_file: data must be a string", err)
  end)

  it("refuses a path with a NUL byte (kind io): it would name another file",
     function()
    local ok, err = core.write_file(tmp .. "/n.json\0.x", "data")
    assert.is_nil(ok)
    assert.equal("io", err.kind)
    assert.matches("not a path", err.message, 1, true)
    assert.is_nil(read(tmp .. "/n.json"))
    assert.equal("0", leftovers(tmp))
  end)

  it("keeps the old file when the disk is full", function()
    local dir = tmp .. "/tiny"
    servers.sh("mkdir -p " .. dir)
    if not servers.sh("mount -t tmpfs -o size=64k tmpfs " .. dir
                      .. " >/dev/null 2>&1") then
      pending("cannot mount a tmpfs here (not root)")
      return
    end
    local p = dir .. "/state.pem"
    assert.is_true(core.write_file(p, "the last good set"))
    local ok, err = core.write_file(p, string.rep("y", 200 * 1024))
    assert.is_nil(ok)
    assert.equal("io", err.kind)
    assert.equal("the last good set", read(p))
    assert.equal("0", leftovers(dir))
  end)
end)

describe("core.lock_file", function()
  it("holds an exclusive flock against other processes and other opens"
     .. " until unlock (twice is fine)", function()
    local p = tmp .. "/c.json.lock"
    local lock = assert(core.lock_file(p))
    assert.equal("600", mode(p))
    -- flock(1) -n: exit 1 when the lock is held elsewhere
    assert.is_false(servers.sh("flock -n " .. p .. " true"))
    local again, err = core.lock_file(p)
    assert.is_nil(again)
    assert.equal("busy", err.kind)
    lock:unlock()
    lock:unlock()
    assert.is_true(servers.sh("flock -n " .. p .. " true"))
    local l2 = assert(core.lock_file(p))
    l2:unlock()
  end)

  it("fails with kind io where it cannot open the file", function()
    local lock, err = core.lock_file(tmp .. "/no/such/dir/x.lock")
    assert.is_nil(lock)
    assert.equal("io", err.kind)
    assert.has_error(function() core.lock_file(tmp .. "/m", -1) end)
  end)

  it("refuses a path with a NUL byte (kind io)", function()
    local lock, err = core.lock_file(tmp .. "/n.lock\0.x")
    assert.is_nil(lock)
    assert.equal("io", err.kind)
    assert.matches("not a path", err.message, 1, true)
    assert.is_nil(read(tmp .. "/n.lock"))
  end)
end)

describe("core.listdir and core.file_type", function()
  it("refuse a path with a NUL byte (kind unavailable)", function()
    -- read as a C string, tmp .. "\0/x" named tmp itself
    local names, err = core.listdir(tmp .. "\0/x")
    assert.is_nil(names)
    assert.equal("unavailable", err.kind)
    assert.matches("not a path", err.message, 1, true)
    local t, terr = core.file_type(tmp .. "\0/x")
    assert.is_nil(t)
    assert.equal("unavailable", terr.kind)
    assert.matches("not a path", terr.message, 1, true)
    assert.equal("directory", core.file_type(tmp))
    assert.is_table(core.listdir(tmp))
  end)
  it("file_type gives the modification time too", function()
    local path = tmp .. "/mtime.txt"
    assert(core.write_file(path, "x"))
    local ok = os.execute("touch -m -d @1700000000 " .. path)
    assert(ok == 0 or ok == true)
    local t, mtime = core.file_type(path)
    assert.equal("file", t)
    assert.equal(1700000000, mtime)
  end)
end)

describe("core.chmod (paygate.chmod)", function()
  it("sets a file's or a folder's mode", function()
    local p = tmp .. "/open.txt"
    assert.is_true(core.write_file(p, "x", 420))             -- 0644
    assert.is_true(core.chmod(p, 384))                       -- 0600
    assert.equal("600", mode(p))
    assert(core.mkdir_p(tmp .. "/d", 493))
    assert.is_true(core.chmod(tmp .. "/d", 448))
    assert.equal("700", mode(tmp .. "/d"))
  end)

  it("refuses a symbolic link, a missing file, a bad mode", function()
    local target = tmp .. "/target.txt"
    assert.is_true(core.write_file(target, "x", 420))
    servers.sh("ln -sf " .. target .. " " .. tmp .. "/link")
    local ok, err = core.chmod(tmp .. "/link", 511)          -- 0777
    assert.is_nil(ok)
    assert.equal("io", err.kind)
    assert.equal("chmod " .. tmp .. "/link: a symbolic link (not followed)",
                 err.message)
    assert.equal("644", mode(target))                        -- untouched
    ok, err = core.chmod(tmp .. "/no-such", 384)
    assert.is_nil(ok)
    assert.equal("io: chmod " .. tmp .. "/no-such: No such file or"
                 .. " directory", tostring(err))
    assert.has_error(function() core.chmod(target) end,
      "paygate.chmod: mode must be an integer from 0 to 0777 (got nil)")
    assert.has_error(function() core.chmod(target, 600) end,
      "paygate.chmod: mode 600 is 01130 in octal, past 0777 (Lua reads"
      .. " 0600 as the decimal 600): write 384 for 0600, or"
      .. ' tonumber("600", 8)')
    assert.has_error(function() core.chmod(nil, 384) end)
    assert.equal(core.chmod, require("paygate").chmod)
  end)
end)

-- A file size limit (ulimit -f) reached sent SIGXFSZ, whose default is to
-- kill: a worker whose SQLite WAL reached it died, and each replacement
-- with it, for ever. Ignored, the write fails EFBIG and is an error.
describe("a write past the file size limit", function()
  it("fails as an error; the process lives", function()
    local script = tmp .. "/fsize.lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
      local core = require "paygate.core"
      local ok, err = core.write_file(%q, ("x"):rep(65536))
      io.write(ok and "written" or ("refused: " .. tostring(err)))
    ]]):format(tmp .. "/big.bin"))
    f:close()
    local bin = os.getenv("PAYGATE_BIN") or "build/paygate"
    local p = io.popen("sh -c 'ulimit -f 8; exec " .. bin .. " exec "
                       .. script .. "' 2>&1; echo \" exit=$?\"")
    local out = p:read("*a")
    p:close()
    assert.matches("refused: ", out, 1, true)
    assert.matches(" exit=0", out, 1, true)
  end)
end)
