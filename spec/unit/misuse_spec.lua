-- Misuse of the public paygate API raises a message that names the public
-- function and the argument, positioned at the caller (this file), never
-- at paygate's own files.
local paygate = require "paygate"

local function raises(fn, prefix)
  local ok, err = pcall(fn)
  assert.is_false(ok)
  assert.is_string(err)
  local pos, msg = err:match("^(.-:%d+): (.*)$")
  assert.is_truthy(pos, "no position in: " .. err)
  assert.matches("misuse_spec.lua", pos, 1, true)
  assert.equal(prefix, msg:sub(1, #prefix))
end

describe("misuse of the paygate API", function()
  it("paygate.error checks its arguments", function()
    raises(function() paygate.error(nil, "m") end,
           "paygate.error: kind must be a string")
    raises(function() paygate.error("k", {}) end,
           "paygate.error: message must be a string")
    raises(function() paygate.error("k", "m", "x") end,
           "paygate.error: fields must be a table")
  end)

  it("routes and hooks", function()
    raises(function() paygate.route("get", "/x", print) end,
           "paygate.route: method")
    raises(function() paygate.route("GET", "x", print) end,
           "paygate.route: path")
    raises(function() paygate.route("GET", "/x", "f") end,
           "paygate.route: fn")
    raises(function() paygate.before(1) end, "paygate.before: fn")
    raises(function() paygate.after(1) end, "paygate.after: fn")
  end)

  it("timers, abort and the logger", function()
    raises(function() paygate.timer.at(-1, print) end,
           "paygate.timer.at: delay")
    raises(function() paygate.timer.at(1, 1) end, "paygate.timer.at: fn")
    raises(function() paygate.timer.every(0, print) end,
           "paygate.timer.every: interval")
    -- not a duration: refused at the call, not by the task later (where
    -- the timer died with a log line and never ran)
    for _, v in ipairs({ 0 / 0, math.huge, 2e8 }) do
      raises(function() paygate.timer.at(v, print) end,
             "paygate.timer.at: delay")
      raises(function() paygate.timer.every(v, print) end,
             "paygate.timer.every: interval")
    end
    raises(function() paygate.abort(200) end, "paygate.abort: status")
    raises(function() paygate.log.info("m", "f") end,
           "paygate.log: fields must be a table")
  end)

  it("paygate.error keeps extra fields and is recognised", function()
    local e = paygate.error("k", "m", { code = "C", retryable = true })
    assert.equal("k: m", tostring(e))
    assert.equal("C", e.code)
    assert.is_true(e.retryable)
    assert.is_true(paygate.is_error(e))
    assert.is_false(paygate.is_error({ kind = "k", message = "m" }))
    assert.is_false(paygate.is_error("k: m"))
  end)
end)
