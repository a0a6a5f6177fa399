-- paygate.on_stop: a worker's stop functions run on a graceful stop, once
-- its requests were answered, last registered first, each error logged;
-- together they are bounded (a stop function that never returns does not
-- keep the worker from exiting).
local testing = require "paygate.testing"
local core = require "paygate.core"

local APP = [[
local paygate = require "paygate"
local out = paygate.config.out
local function note(s)
  local f = assert(io.open(out, "a"))
  f:write(s, "\n")
  f:close()
end
paygate.on_stop(function() note("first") end)
paygate.on_stop(function() error("boom in a stop function") end)
paygate.on_stop(function()
  paygate.sleep(0.1)          -- it may yield
  note("second")
  if paygate.config.hang then paygate.sleep(3600) end
end)
paygate.route("GET", "/slow", function()
  note("got")
  paygate.sleep(0.5)
  note("answered")
  return 200, "ok"
end)
]]

local function read(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

describe("paygate.on_stop", function()
  teardown(function() testing.stop_all() end)

  it("runs the stop functions after the last request, last first", function()
    local dir = testing.tmpdir()
    local out = dir .. "/out"
    local srv = testing.start_app{ source = APP, config = { out = out } }
    local task = core.spawn(function()
      return srv:request{ path = "/slow" }
    end)
    testing.wait_until(function() return read(out) == "got\n" end, 10,
                       "the request in flight")
    srv:signal(testing.proc.SIGTERM)
    local res = task:wait()
    assert.equal(200, res.status)
    local code = srv.proc:wait(15)
    assert.equal(0, code)
    assert.equal("got\nanswered\nsecond\nfirst\n", read(out))
    assert.matches("boom in a stop function", srv:logs(), 1, true)
    testing.server.rmdir(srv.dir)
    testing.server.rmdir(dir)
  end)

  it("gives them 5 s, then the worker exits anyway", function()
    local dir = testing.tmpdir()
    local out = dir .. "/out"
    local srv = testing.start_app{ source = APP,
                                   config = { out = out, hang = true } }
    local t0 = core.mono()
    srv:signal(testing.proc.SIGTERM)
    local code = srv.proc:wait(20)
    local took = core.mono() - t0
    assert.is_number(code)
    assert.is_true(took >= 4.5 and took < 12, "stopped after " .. took)
    assert.equal("second\n", read(out))
    assert.matches("stop functions still running", srv:logs(), 1, true)
    testing.server.rmdir(srv.dir)
    testing.server.rmdir(dir)
  end)

  it("past shutdown_timeout while they run, no connection is said to be"
     .. " left: the drain had ended", function()
    local dir = testing.tmpdir()
    local out = dir .. "/out"
    local srv = testing.start_app{ source = APP, config = {
      out = out, hang = true, shutdown_timeout = 1 } }
    srv:signal(testing.proc.SIGTERM)
    assert.is_number(srv.proc:wait(20))
    local logs = srv:logs()
    assert.matches("stop functions still running", logs, 1, true)
    -- (was: "worker: shutdown deadline passed with 0 connections left;
    -- closing them" once the stop functions had run 1 s)
    assert.is_nil(logs:find("shutdown deadline passed", 1, true), logs)
    testing.server.rmdir(srv.dir)
    testing.server.rmdir(dir)
  end)
end)
