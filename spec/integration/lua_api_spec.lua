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

  -- The level is raised by hand; this keeps it honest for the primitives'
  -- names: the binary's C functions (the paygate.* modules it preloads,
  -- and the methods of the paygate.* userdata it registers) are listed in
  -- spec/fixtures/lua_api.txt under the level they belong to. A C change
  -- that adds, renames or removes one fails here until the level is
  -- raised (GW_LUA_API and init.lua's API) and the list written again.
  it("names its primitives under its level (spec/fixtures/lua_api.txt)",
     function()
    for name in pairs(package.preload) do
      if name:match("^paygate") then require(name) end
    end
    local seen = {}
    local function add(prefix, t)
      for k, v in pairs(t) do
        if type(v) == "function" then
          seen[#seen + 1] = prefix .. tostring(k)
        end
      end
    end
    for name in pairs(package.preload) do
      if name:match("^paygate") and type(package.loaded[name]) == "table" then
        add(name .. ".", package.loaded[name])
      end
    end
    for name, mt in pairs(debug.getregistry()) do
      if type(name) == "string" and name:match("^paygate")
         and type(mt) == "table" then
        add(name .. ":", mt)
        if type(mt.__index) == "table" and mt.__index ~= mt then
          add(name .. ":", mt.__index)
        end
      end
    end
    table.sort(seen)
    local src = debug.getinfo(1, "S").source:match("^@(.*)/spec/") or "."
    local path = src .. "/spec/fixtures/lua_api.txt"
    local f = assert(io.open(path))
    local level = tonumber(f:read("*l"):match("^level (%d+)$"))
    local listed = {}
    for l in f:lines() do listed[#listed + 1] = l end
    f:close()
    local want, have = {}, {}
    for _, n in ipairs(listed) do want[n] = true end
    for _, n in ipairs(seen) do have[n] = true end
    local added, gone = {}, {}
    for _, n in ipairs(seen) do if not want[n] then added[#added + 1] = n end end
    for _, n in ipairs(listed) do if not have[n] then gone[#gone + 1] = n end end
    assert.equal(level, core.api, "spec/fixtures/lua_api.txt's level is"
                 .. " the binary's (core.api)")
    assert.is_true(#added == 0 and #gone == 0, "the binary's primitives"
      .. " changed (added: " .. table.concat(added, ", ") .. "; gone: "
      .. table.concat(gone, ", ") .. "): raise GW_LUA_API"
      .. " (src/core/lpaygate.c) and API (lua/paygate/init.lua), and"
      .. " write the list again in spec/fixtures/lua_api.txt")
  end)
end)
