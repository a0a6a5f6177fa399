-- Lua modules newer than the binary (a checkout updated under a running
-- paygate: a reload or a worker restart loads them into the old binary)
-- are refused at require "paygate", saying what to do, instead of failing
-- at the first primitive the binary lacks ("attempt to call field
-- 'histogram' (a nil value)", seen in an upgrade trial).
local server = require "support.server"
local core = require "paygate.core"

local function sh_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- runs `paygate exec script` with PAYGATE_LUA_DIR=lua_dir: exit code, output
local function exec(lua_dir, script)
  local f = io.popen("PAYGATE_LUA_DIR=" .. sh_quote(lua_dir) .. " "
    .. sh_quote(PAYGATE_BIN) .. " exec " .. sh_quote(script)
    .. " 2>&1; echo \"exit=$?\"")
  local out = f:read("*a")
  f:close()
  return tonumber(out:match("exit=(%d+)%s*$")), out
end

describe("the Lua modules and the binary", function()
  local dir

  before_each(function() dir = server.tmpdir() end)
  after_each(function() os.execute("rm -rf " .. sh_quote(dir)) end)

  it("refuses modules that need a newer binary, naming the fix",
     function()
    local src = debug.getinfo(1, "S").source:match("^@(.*)/spec/")
    assert(os.execute("cp -R " .. sh_quote((src or ".") .. "/lua") .. " "
                      .. sh_quote(dir .. "/lua")) == 0)
    local script = dir .. "/use.lua"
    local f = assert(io.open(script, "w"))
    f:write('require "paygate"\nprint("loaded")\n')
    f:close()
    -- the same level: loads
    local code, out = exec(dir .. "/lua", script)
    assert.equal(0, code, out)
    assert.matches("loaded", out, 1, true)
    -- modules one level past this binary (as a newer checkout's are)
    local path = dir .. "/lua/paygate/init.lua"
    local text = assert(io.open(path)):read("*a")
    local level = assert(tonumber(text:match("\nlocal API = (%d+)\n")),
                         "init.lua names the level of primitives it needs")
    assert.is_true(type(core.api) == "number" and core.api >= level,
                   "this binary gives what its own checkout's modules need")
    text = text:gsub("\nlocal API = %d+\n", "\nlocal API = "
                     .. (core.api + 1) .. "\n", 1)
    f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
    code, out = exec(dir .. "/lua", script)
    assert.equal(1, code, out)
    assert.not_matches("loaded", out, 1, true)
    assert.matches("paygate: these Lua modules need a newer paygate"
                   .. " binary: build it again (cmake --build build) and"
                   .. " restart paygate; a reload keeps the running binary"
                   .. " (primitives level " .. (core.api + 1) .. ", the"
                   .. " binary gives " .. core.api .. "; modules in " .. dir
                   .. "/lua)", out, 1, true)
  end)
end)
