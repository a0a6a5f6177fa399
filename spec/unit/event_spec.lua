-- paygate.core.event: waiting without polling inside one worker.
local core = require "paygate.core"

describe("core.event", function()
  it("raises outside a coroutine-managed wait and on a bad timeout",
     function()
    local ev = core.event()
    assert.has_error(function() ev:wait(-1) end)
    assert.has_error(function() ev:wait("x") end)
    assert.has_error(function() coroutine.wrap(function() ev:wait(1) end)() end)
    -- the message names the function however it was called (a tail call
    -- or pcall(ev.wait, ...) gave "bad argument #2 to '?'")
    for _, t in ipairs({ -1, 0 / 0, 1e9, "x", {} }) do
      local ok, err = pcall(ev.wait, ev, t)
      assert.is_false(ok)
      assert.matches("^ev:wait: timeout must be a number of seconds from 0"
                     .. " to 1e8", err)
      ok, err = pcall(function() return ev:wait(t) end)
      assert.matches("ev:wait: timeout must be", err, 1, true)
    end
  end)

  it("wakes every waiter, on a later loop turn, never in the setter",
     function()
    local ev = core.event()
    local woken, results = 0, {}
    local tasks = {}
    for i = 1, 200 do
      tasks[i] = core.spawn(function()
        local ok, err = ev:wait(10)
        woken = woken + 1
        results[i] = ok or tostring(err)
      end)
    end
    assert.equal(200, ev:waiters())
    local n = ev:set()
    assert.equal(200, n)
    assert.equal(0, woken)               -- not inside set()'s coroutine
    assert.equal(0, ev:waiters())
    for i = 1, 200 do tasks[i]:wait() end
    assert.equal(200, woken)
    for i = 1, 200 do assert.is_true(results[i]) end
    assert.equal(1, ev:count())
    -- a set() with nobody waiting is not remembered: a pulse
    assert.equal(0, ev:set())
    local t0 = core.mono()
    local ok, err = ev:wait(0.05)
    assert.is_nil(ok)
    assert.equal("timeout", err.kind)
    assert.is_true(core.mono() - t0 >= 0.04)
  end)

  it("times out one waiter while another still waits", function()
    local ev = core.event()
    local short = core.spawn(function() return ev:wait(0.05) end)
    local long = core.spawn(function() return ev:wait(10) end)
    local t0 = core.mono()
    local ok, err = short:wait()
    assert.is_nil(ok)
    assert.equal("timeout", err.kind)
    assert.is_true(core.mono() - t0 < 5)
    assert.equal(1, ev:waiters())        -- the timed-out one left the list
    ev:set()
    assert.is_true(long:wait())
  end)

  it("a waiter woken by set() is not woken again by its timeout", function()
    local ev = core.event()
    local after = 0
    local t = core.spawn(function()
      assert.is_true(ev:wait(0.05))
      after = after + 1
      core.sleep(0.15)                   -- past the old timeout
      return after
    end)
    ev:set()
    assert.equal(1, t:wait())
  end)

  it("a cancelled waiter is removed and never resumed", function()
    local ev = core.event()
    local resumed = false
    local t = core.spawn(function()
      ev:wait(10)
      resumed = true
    end)
    local keep = core.spawn(function() return ev:wait(10) end)
    assert.equal(2, ev:waiters())
    t:cancel()
    assert.equal(1, ev:waiters())
    assert.equal(1, ev:set())
    assert.is_true(keep:wait())
    core.sleep(0.01)
    assert.is_false(resumed)
    -- cancelled after set() but before its turn: dropped from the batch
    local t2 = core.spawn(function() ev:wait(10); resumed = true end)
    local keep2 = core.spawn(function() return ev:wait(10) end)
    assert.equal(2, ev:set())
    t2:cancel()
    assert.is_true(keep2:wait())
    core.sleep(0.01)
    assert.is_false(resumed)
  end)

  it("a woken waiter that sets again is served on the next turn", function()
    local ev = core.event()
    local order = {}
    local a = core.spawn(function()
      ev:wait(5)
      order[#order + 1] = "a"
      ev:set()                           -- wakes b, which waited meanwhile
    end)
    ev:set()
    local b = core.spawn(function()
      ev:wait(5)
      order[#order + 1] = "b"
    end)
    a:wait()
    b:wait()
    assert.same({ "a", "b" }, order)
  end)

  it("the event outlives the garbage collector while waited on", function()
    local t = core.spawn(function() return core.event():wait(0.05) end)
    collectgarbage()
    collectgarbage()
    local ok, err = t:wait()
    assert.is_nil(ok)
    assert.equal("timeout", err.kind)
  end)
  it("set_on_abandon: sets the event when the coroutine is abandoned or"
     .. " ends armed; a cancelled guard sets nothing", function()
    local ev = core.event()
    assert.has_error(function()
      coroutine.wrap(function() ev:set_on_abandon() end)()
    end)
    -- abandoned (task:cancel()) while armed: set, waiters resume
    local w1 = core.spawn(function() return ev:wait(10) end)
    local t1 = core.spawn(function()
      local _ = ev:set_on_abandon()
      core.sleep(30)
    end)
    t1:cancel()
    assert.is_true(w1:wait())
    -- disarmed first (cancel twice is harmless): nothing
    local w2 = core.spawn(function() return ev:wait(0.3) end)
    local t2 = core.spawn(function()
      local g = ev:set_on_abandon()
      g:cancel()
      g:cancel()
      core.sleep(30)
    end)
    t2:cancel()
    local ok, err = w2:wait()
    assert.is_nil(ok)
    assert.equal("timeout", err.kind)
    -- ends normally while armed: set as well
    local w3 = core.spawn(function() return ev:wait(10) end)
    local t3 = core.spawn(function()
      ev:set_on_abandon()
      core.sleep(0.01)
    end)
    t3:wait()
    assert.is_true(w3:wait())
    -- the guard dropped and collected while armed still fires
    local w4 = core.spawn(function() return ev:wait(10) end)
    local t4 = core.spawn(function()
      do ev:set_on_abandon() end
      collectgarbage()
      collectgarbage()
      core.sleep(30)
    end)
    collectgarbage()
    t4:cancel()
    assert.is_true(w4:wait())
    assert.equal(3, ev:count())
  end)
end)
