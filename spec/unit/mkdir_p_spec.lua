-- core.mkdir_p: a folder and its missing parents made by mkdir(2) itself,
-- never through a shell (the path often comes from a config), with the
-- reason when it cannot be made. The gateway's folders (the SQLite store,
-- the bill reports, the credentials cache), the client's state_dir, the
-- CLI's --out and the test kit's state folders are made with it.
local core = require "paygate.core"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
teardown(function() servers.sh("rm -rf " .. tmp) end)

-- (no shell here either: the paths below are hostile)
local function is_dir(p)
  local f = io.open(p .. "/.", "rb")
  if f then f:close() end
  return f ~= nil
end

local function exists(p)
  local f = io.open(p, "rb")
  if f then f:close() end
  return f ~= nil
end

local function mode(p)
  return servers.read_cmd("stat -c %a '" .. p .. "'"):gsub("%s+$", "")
end

describe("core.mkdir_p", function()
  it("makes the folder and its parents, and an existing one is fine",
     function()
    local d = tmp .. "/a/b/c"
    assert.is_true(core.mkdir_p(d))
    assert.is_true(is_dir(d))
    assert.equal("755", mode(d))
    assert.is_true(core.mkdir_p(d))
    assert.is_true(core.mkdir_p(tmp .. "/a/b/c/"))     -- a trailing slash
    assert.is_true(core.mkdir_p(tmp .. "/m", 448))     -- 0700
    assert.equal("700", mode(tmp .. "/m"))
  end)

  it("never runs the path through a shell", function()
    local d = tmp .. "/x'; touch " .. tmp .. "/pwned; echo '$(id)"
    assert.is_true(core.mkdir_p(d))
    assert.is_true(is_dir(d))
    assert.is_false(exists(tmp .. "/pwned"))
  end)

  it("says which folder cannot be made, why, and which parent failed",
     function()
    local f = assert(io.open(tmp .. "/plain", "wb"))
    f:write("a file\n")
    f:close()
    local ok, err = core.mkdir_p(tmp .. "/plain")
    assert.is_nil(ok)
    assert.equal("io", err.kind)
    assert.equal("cannot create the folder " .. tmp .. "/plain: Not a"
                 .. " directory", err.message)
    ok, err = core.mkdir_p(tmp .. "/plain/sub/deeper")
    assert.is_nil(ok)
    assert.equal("cannot create the folder " .. tmp .. "/plain/sub/deeper:"
                 .. " Not a directory (making " .. tmp .. "/plain/sub)",
                 err.message)
    ok, err = core.mkdir_p("")
    assert.is_nil(ok)
    assert.equal("io", err.kind)
    assert.has_error(function() core.mkdir_p(tmp .. "/z", -1) end)
  end)

  it("refuses a mode with the sticky bit: a decimal 0755", function()
    -- (Lua has no octal numbers: mkdir_p(dir, 0755) made d-wxr----t, a
    -- folder its owner could not list)
    local ok, err = pcall(core.mkdir_p, tmp .. "/dec", 755)
    assert.is_false(ok)
    assert.matches("paygate.mkdir_p: mode 755 is 01363 in octal, with the"
                   .. " sticky bit 01000 (Lua reads 0755 as the decimal"
                   .. ' 755): write 493 for 0755, or tonumber("755", 8)',
                   err, 1, true)
    assert.is_false(exists(tmp .. "/dec"))
    ok, err = pcall(core.mkdir_p, 7)
    assert.matches("^paygate.mkdir_p: dir must be a string %(got number%)",
                   err)
  end)
end)

describe("paygate.mkdir_p", function()
  it("is core.mkdir_p, for handlers", function()
    assert.equal(core.mkdir_p, require("paygate").mkdir_p)
  end)
end)
