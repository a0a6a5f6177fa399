-- The config file as an operator gets it wrong: one that ends the process
-- itself (os.exit), one whose table refers to itself. Each is a
-- configuration error (exit 2, a line naming the file) at a start, and a
-- refused reload (the old code serving on) while running.
local server = require "support.server"
local proc = require "support.proc"

local APP = [[
local paygate = require "paygate"
paygate.route("GET", "/version", function() return 200, "v1" end)
]]

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- `paygate run` of APP with config text; exit code and output
local function start(config)
  local dir = server.tmpdir()
  write(dir .. "/config.lua", config)
  assert(os.execute("mkdir -p " .. dir .. "/app"))
  write(dir .. "/app/app.lua", APP)
  local out = dir .. "/out"
  local p = proc.spawn({ PAYGATE_BIN, "run", dir .. "/app", "--config",
                         dir .. "/config.lua", "--listen", "127.0.0.1:0",
                         "--admin", "off", "--workers", "1" }, { log = out })
  local code = p:wait(20)
  if code == nil then p:kill(proc.SIGKILL); p:wait(5) end
  local text = proc.read(out)
  server.rmdir(dir)
  return code, text
end

local function try_reload(s)
  local out = s.dir .. "/reload.out"
  os.remove(out)
  local p = proc.spawn({ PAYGATE_BIN, "reload", "--pid-file",
                         s.dir .. "/paygate.pid" }, { log = out })
  local code = p:wait(30)
  return code, proc.read(out)
end

describe("a config file that calls os.exit", function()
  it("is a refused reload: the master lives and the old code serves",
     function()
    local s = server.start{ source = APP, config = "return { a = 1 }\n" }
    finally(function() s:stop() end)
    write(s.config_file, [[
if not os.getenv("PAYGATE_SPEC_NO_SUCH_VARIABLE") then
  io.stderr:write("config: PAYGATE_SPEC_NO_SUCH_VARIABLE is not set\n")
  os.exit(2)
end
return {}
]])
    local code, out = try_reload(s)
    assert.equal(1, code, out)
    assert.matches("refused: config " .. s.config_file .. ": "
                   .. s.config_file .. ":3: it called os.exit(2)", out, 1,
                   true)
    assert.is_nil(s.proc:poll(), "the master exited:\n" .. s:logs())
    assert.equal("v1", assert(s:request("/version")).body)
    -- and a good file again reloads
    write(s.config_file, "return { a = 2 }\n")
    code, out = try_reload(s)
    assert.equal(0, code, out)
  end)

  it("is a configuration error at a start (exit 2, the file named)",
     function()
    local code, out = start("os.exit(0)\n")
    assert.equal(2, code, out)
    assert.matches("config .-/config%.lua: .-:1: it called os%.exit%(0%)",
                   out)
  end)
end)

describe("a config table that refers to itself", function()
  it("reaches the app as it is (no stack overflow in the worker)", function()
    local s = server.start{ source = [[
local paygate = require "paygate"
local copy = paygate.config_copy()
assert(copy.self == copy and copy.shops[1] == copy.shops[2])
paygate.route("GET", "/name", function()
  return 200, paygate.config.self.self.name
end)
]], config = [[
local c = { name = "shop" }
c.self = c
local one = { id = 1 }
c.shops = { one, one }
return c
]] }
    finally(function() s:stop() end)
    assert.equal("shop", assert(s:request("/name")).body)
  end)
end)

describe("a top-level key one slip from a runtime key", function()
  -- `worker = 3` was taken as the app's key without a word, and the
  -- runtime kept its default (a worker per core): named in a warning now,
  -- at the start and at a reload; the app still sees the key
  it("is named with the runtime key it looks like, and left to the app",
     function()
    local s = server.start{ source = [[
local paygate = require "paygate"
paygate.route("GET", "/worker", function()
  return 200, tostring(paygate.config.worker)
end)
]], config = [[
return { worker = 3, ["log-level"] = "warn", Listen = "x", limit = {},
         shutdown_timout = 5, db = "sqlite:x", ttl = 3, gateway = {},
         merchants = {}, state_dir = "x" }
]] }
    finally(function() s:stop() end)
    assert.equal("3", assert(s:request("/worker")).body)
    local logs = s:logs()
    for _, pair in ipairs({ { "worker", "workers" },
                            { "log-level", "log_level" },
                            { "Listen", "listen" }, { "limit", "limits" },
                            { "shutdown_timout", "shutdown_timeout" } }) do
      assert.matches("'" .. pair[1] .. "' (did you mean '" .. pair[2]
                     .. "'?)", logs, 1, true)
    end
    assert.matches("not runtime keys, so the runtime does not read them",
                   logs, 1, true)
    -- an app's own keys are not named: short ones, and ones far from any
    for _, k in ipairs({ "'db'", "'ttl'", "'gateway'", "'merchants'",
                         "'state_dir'" }) do
      assert.is_nil(logs:find(k, 1, true), k)
    end
    -- a reload reads the file again, and names a new slip
    write(s.config_file, "return { worker = 3, admn = 'off' }\n")
    local code, out = try_reload(s)
    assert.equal(0, code, out)
    -- (the keys are named in the table's order, which Lua does not fix)
    local line = s:logs():match("reload: config [^\n]*")
    assert.is_truthy(line, "no reload warning")
    assert.matches("reload: config " .. s.config_file .. ": ", line, 1, true)
    assert.matches("'admn' (did you mean 'admin'?)", line, 1, true)
    assert.matches("'worker' (did you mean 'workers'?)", line, 1, true)
  end)
end)
