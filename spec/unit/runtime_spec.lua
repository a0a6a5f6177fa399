-- The scheduling primitives, on the real loop.
local paygate = require "paygate"
local core = require "paygate.core"

describe("paygate.sleep", function()
  it("rejects a negative or non-number duration", function()
    assert.has_error(function() paygate.sleep(-1) end)
    assert.has_error(function() paygate.sleep("x") end)
    -- the message names the function however it was called (a tail call
    -- or pcall(paygate.sleep, ...) gave "bad argument #1 to '?'")
    for _, t in ipairs({ -1, 0 / 0, 1e9, "x", {} }) do
      local ok, err = pcall(paygate.sleep, t)
      assert.is_false(ok)
      assert.matches("^paygate.sleep: seconds must be a number from 0 to"
                     .. " 1e8", err)
      ok, err = pcall(function() return paygate.sleep(t) end)
      assert.matches("paygate.sleep: seconds must be", err, 1, true)
    end
  end)

  it("raises outside a managed coroutine", function()
    local co = coroutine.create(function() paygate.sleep(0) end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("this call yields", err)
  end)

  it("waits at least the given time", function()
    local t0 = paygate.update_time()
    paygate.sleep(0.05)
    assert.is_true(paygate.update_time() - t0 >= 0.045)
  end)

  it("runs 100 sleeping coroutines concurrently", function()
    local t0 = paygate.update_time()
    local tasks = {}
    for i = 1, 100 do
      tasks[i] = paygate.spawn(function() paygate.sleep(0.2) return i end)
    end
    for i = 1, 100 do assert.equal(i, tasks[i]:wait()) end
    local took = paygate.update_time() - t0
    assert.is_true(took < 2, "100 x 0.2 s sleeps took " .. took .. " s")
  end)
end)

describe("paygate.spawn", function()
  it("needs a function", function()
    assert.has_error(function() paygate.spawn(42) end)
    -- named however it is called ("bad argument #1 to '?'" through pcall)
    for _, fn in ipairs({ 42, "f", {} }) do
      local ok, err = pcall(paygate.spawn, fn)
      assert.is_false(ok)
      assert.matches("^paygate.spawn: fn must be a function %(got %a+%)",
                     err)
    end
    local ok, err = pcall(paygate.spawn)
    assert.is_false(ok)
    assert.matches("paygate.spawn: fn must be a function (got no value)",
                   err, 1, true)
  end)

  it("returns the task's results through wait(), all of them", function()
    local t = paygate.spawn(function(a, b) return a + b, nil, "x" end, 1, 2)
    local a, b, c = t:wait()
    assert.equal(3, a)
    assert.is_nil(b)
    assert.equal("x", c)
  end)

  it("gives nil, err when the task raises, and keeps running others", function()
    local t = paygate.spawn(function() paygate.sleep(0.01) error("boom") end)
    local ok = paygate.spawn(function() paygate.sleep(0.02) return "fine" end)
    local v, err = t:wait()
    assert.is_nil(v)
    assert.matches("boom", err)
    assert.equal("fine", ok:wait())
  end)

  it("wait()'s err is a paygate error: the one raised, kind task_failed"
     .. " for anything else, kind cancelled", function()
    -- (it was the text of the traceback: err.kind nil, and a task's
    -- paygate.error("db", ...) seen only as a string)
    local t = paygate.spawn(function()
      paygate.sleep(0)
      error(paygate.error("db", "connection lost", { retryable = true }))
    end)
    local v, err = t:wait()
    assert.is_nil(v)
    assert.is_true(paygate.is_error(err))
    assert.equal("db", err.kind)
    assert.is_true(err.retryable)
    assert.equal("db: connection lost", tostring(err))
    for _, raised in ipairs({ "boom", { code = 5 } }) do
      t = paygate.spawn(function() error(raised) end)
      v, err = t:wait()
      assert.is_nil(v)
      assert.is_true(paygate.is_error(err), tostring(err))
      assert.equal("task_failed", err.kind)
      assert.is_false(err.retryable)
      -- what it raised, without the traceback (that is in the log)
      assert.is_nil(err.message:find("stack traceback", 1, true))
    end
    v, err = paygate.spawn(function() error("boom") end):wait()
    assert.matches("runtime_spec.lua:%d+: boom$", err.message)
    t = paygate.spawn(function() paygate.sleep(5) end)
    local waiter = paygate.spawn(function() return t:wait() end)
    t:cancel()
    for _, e in ipairs({ select(2, waiter:wait()), select(2, t:wait()) }) do
      assert.is_true(paygate.is_error(e), tostring(e))
      assert.equal("cancelled", e.kind)
      assert.equal("cancelled: task was cancelled", tostring(e))
    end
  end)

  it("cancel() stops a waiting task, and its waiters learn it", function()
    local ran = false
    local t = paygate.spawn(function() paygate.sleep(5) ran = true end)
    local waiter = paygate.spawn(function() return t:wait() end)
    t:cancel()
    local v, err = waiter:wait()
    assert.is_nil(v)
    assert.matches("cancelled", err)
    assert.is_true(t:finished())
    paygate.sleep(0.01)
    assert.is_false(ran)
  end)

  it("a task that waits for itself raises, instead of waiting for ever",
     function()
    local t, ok, err
    local done = paygate.event()
    t = paygate.spawn(function()
      paygate.sleep(0)
      ok, err = pcall(t.wait, t)
      done:set()
    end)
    -- (before, it waited for ever: the spec gives it 2 s)
    if ok == nil then assert(done:wait(2)) end
    assert.is_false(ok)
    assert.matches("task:wait: a task cannot wait for itself", err, 1, true)
  end)

  it("wait() gives every result up to the last, whatever nils are among"
     .. " them, to a waiter and after the end", function()
    -- (read up to the array's border: 1, nil, 3, nil came back as 1)
    local function check(...)
      assert.equal(4, select("#", ...))
      local a, b, c, d = ...
      assert.same({ 1, "nil", 3, "nil" }, { a, tostring(b), c, tostring(d) })
    end
    local t = paygate.spawn(function()
      paygate.sleep(0.01)
      return 1, nil, 3, nil
    end)
    check(t:wait())                    -- woken at the end
    check(t:wait())                    -- already ended
  end)

  it("wait() on an ended task takes extra arguments in stride", function()
    local t = paygate.spawn(function() return 1, 2 end)
    local a, b = t:wait("extra", "args")
    assert.equal(1, a)
    assert.equal(2, b)
  end)

  it("a wait that cannot yield raises and leaves no operation behind", function()
    -- string.gsub's callback is a C-call boundary: the sleep must fail
    -- cleanly, not leave a timer that later wakes this coroutine
    local ok, err = pcall(string.gsub, "a", "a", function() paygate.sleep(0.05) end)
    assert.is_false(ok)
    assert.matches("yield", err)
    local t0 = paygate.update_time()
    paygate.sleep(0.2)
    assert.is_true(paygate.update_time() - t0 >= 0.19, "woken early")
  end)

  it("a bare coroutine.yield() gives other coroutines a turn", function()
    local order = {}
    local a = paygate.spawn(function()
      order[#order + 1] = "a1"; coroutine.yield(); order[#order + 1] = "a2"
    end)
    local b = paygate.spawn(function() order[#order + 1] = "b1" end)
    a:wait(); b:wait()
    assert.same({ "a1", "b1", "a2" }, order)
  end)

  -- Waits (with a deadline) until every task in list has ended.
  local function wait_ended(list, secs)
    local deadline = paygate.update_time() + secs
    for _, t in ipairs(list) do
      while not t:finished() and paygate.update_time() < deadline do
        paygate.sleep(0.005)
      end
    end
  end

  it("runs a task at once, until it first waits", function()
    local steps = {}
    local t = paygate.spawn(function()
      steps[#steps + 1] = "ran"; paygate.sleep(0); steps[#steps + 1] = "woke"
    end)
    assert.same({ "ran" }, steps)
    t:wait()
    assert.same({ "ran", "woke" }, steps)
  end)

  it("a task spawned by a __gc finalizer starts on the next loop turn, and"
     .. " waits and ends like any other", function()
    -- A finalizer runs inside whatever allocation stepped the collector,
    -- with LuaJIT's hooks marked active: a coroutine resumed there that
    -- waits is suspended as if by a hook (a pseudo-frame), and its next
    -- resume crashed the worker (SIGSEGV in lua_resume).
    local tasks, ran_inside = {}, {}
    local function arm(p, n)
      getmetatable(p).__gc = function()
        if tasks[n] ~= nil then return end
        local ran = false
        tasks[n] = paygate.spawn(function(a)
          ran = true
          paygate.sleep(0.01)
          return a * 2
        end, n)
        ran_inside[n] = ran
      end
    end
    -- a full collection calls the finalizer from collectgarbage()
    local p = newproxy(true)
    arm(p, 1)
    p = nil
    collectgarbage()
    -- an allocation's GC step calls it (as in a handler)
    collectgarbage()
    collectgarbage("stop")
    for _ = 1, 200 do arm(newproxy(true), 2) end
    for i = 1, 20000 do local _ = { {}, "garbage" .. i } end
    collectgarbage("restart")
    local deadline = paygate.update_time() + 5
    local acc, i = {}, 0
    while tasks[2] == nil and paygate.update_time() < deadline do
      i = i + 1
      acc[i % 100 + 1] = { i }                  -- steps the collector
    end
    assert.is_not_nil(tasks[1], "the full collection's finalizer ran")
    assert.is_not_nil(tasks[2], "an allocation's finalizer ran")
    wait_ended(tasks, 5)
    for n, t in ipairs(tasks) do
      assert.is_true(t:finished(), "task " .. n .. " ended")
      assert.equal(n * 2, t:wait())
    end
    assert.same({ false, false }, ran_inside)
  end)

  it("a waiter woken by a cancel in a __gc finalizer goes on next turn,"
     .. " and may wait again", function()
    -- task:cancel() wakes the task's waiters: inside a finalizer, a woken
    -- waiter that waited again crashed the worker when resumed.
    local sleeper = paygate.spawn(function() paygate.sleep(5) end)
    local waiter = paygate.spawn(function()
      local v, err = sleeper:wait()
      paygate.sleep(0.01)
      return v, err and err.kind
    end)
    local woke_inside
    local p = newproxy(true)
    getmetatable(p).__gc = function()
      sleeper:cancel()
      woke_inside = waiter:finished()
    end
    p = nil
    collectgarbage()
    assert.is_true(sleeper:finished())
    assert.is_false(woke_inside)
    wait_ended({ waiter }, 5)
    assert.is_true(waiter:finished())
    local v, kind = waiter:wait()
    assert.is_nil(v)
    assert.equal("cancelled", kind)
  end)

  it("a task spawned by a finalizer and cancelled before its turn never"
     .. " runs", function()
    local t, ran = nil, false
    local p = newproxy(true)
    getmetatable(p).__gc = function()
      t = paygate.spawn(function() ran = true end)
    end
    p = nil
    collectgarbage()
    assert.is_false(t:finished())
    t:cancel()
    local v, err = t:wait()
    assert.is_nil(v)
    assert.equal("cancelled", err.kind)
    paygate.sleep(0.01)
    assert.is_false(ran)
  end)

  it("a task spawned, or a waiter woken, in a debug hook goes on next turn"
     .. " and may wait", function()
    -- LuaJIT runs a debug.sethook function with its hooks marked active,
    -- as it does a finalizer: a coroutine resumed there that waited was
    -- suspended as if by a hook and crashed the worker (SIGSEGV in
    -- lua_resume) on its next resume
    local sleeper = paygate.spawn(function() paygate.sleep(5) end)
    local waiter = paygate.spawn(function()
      local _, err = sleeper:wait()
      paygate.sleep(0.01)
      return err and err.kind
    end)
    local tasks, ran_inside, fired = {}, {}, 0
    debug.sethook(function()
      fired = fired + 1
      if fired > 3 then return end
      local ran = false
      tasks[fired] = paygate.spawn(function(a)
        ran = true
        paygate.sleep(0.01)
        return a * 2
      end, fired)
      ran_inside[fired] = ran
      if fired == 1 then sleeper:cancel() end
    end, "", 100)
    -- (interpreted: compiled code calls no hook)
    local function busy() for i = 1, 2000 do local _ = { i } end end
    jit.off(busy)
    busy()
    debug.sethook()
    assert.equal(3, #tasks)
    assert.same({ false, false, false }, ran_inside)
    wait_ended(tasks, 5)
    for n, t in ipairs(tasks) do
      assert.equal(n * 2, t:wait())
    end
    wait_ended({ waiter }, 5)
    assert.equal("cancelled", waiter:wait())
  end)

  it("a task:cancel() in a __gc finalizer that runs while the task ends"
     .. " has no effect", function()
    -- task_done / task_fail allocate (the results table, the error)
    -- after the coroutine returned and before the task reads as ended: a
    -- finalizer there that cancelled the task freed (or pooled) its
    -- coroutine, which the ending then freed again (heap-use-after-free;
    -- the pool held it twice, the count of coroutines went below zero)
    local before = core.coroutines()
    local live = {}
    local function arm()
      getmetatable(newproxy(true)).__gc = function()
        for t in pairs(live) do pcall(t.cancel, t) end
      end
    end
    local outcomes = {}
    local ok, err = pcall(function()
      -- the collector steps on every allocation: finalizers run anywhere
      collectgarbage("setpause", 1)
      collectgarbage("setstepmul", 100000)
      for _ = 1, 60 do
        local batch = {}
        for i = 1, 20 do
          local t = paygate.spawn(function(fail)
            paygate.sleep(0)
            for _ = 1, 5 do arm() end
            if fail then error("x") end
            return 1
          end, i % 4 == 0)
          live[t] = true
          batch[#batch + 1] = t
        end
        for _, t in ipairs(batch) do
          local v, e = t:wait()
          live[t] = nil
          local o = v == 1 and "returned" or e.kind
          outcomes[o] = (outcomes[o] or 0) + 1
        end
      end
    end)
    collectgarbage("setpause", 200)
    collectgarbage("setstepmul", 200)
    assert(ok, err)
    collectgarbage()
    collectgarbage()
    paygate.sleep(0.01)
    assert.equal(before, core.coroutines())
    assert.equal(1200, (outcomes.returned or 0) + (outcomes.task_failed or 0)
                       + (outcomes.cancelled or 0))
  end)

  it("while the collector is stopped a task starts on the next turn, and"
     .. " every wait still ends", function()
    -- (inside a finalizer the collector reads as stopped: the runtime
    -- cannot tell collectgarbage("stop") from it, so it defers both)
    collectgarbage("stop")
    local ok, err = pcall(function()
      local steps = {}
      local t = paygate.spawn(function()
        steps[#steps + 1] = "ran"
        paygate.sleep(0.01)
        steps[#steps + 1] = "woke"
        return "done"
      end)
      assert.same({}, steps)
      assert.equal("done", t:wait())
      assert.same({ "ran", "woke" }, steps)
    end)
    collectgarbage("restart")
    assert(ok, err)
  end)

  it("does not leak coroutines", function()
    local before = core.coroutines()
    for _ = 1, 200 do paygate.spawn(function() paygate.sleep(0) end):wait() end
    assert.equal(before, core.coroutines())
  end)
end)

describe("paygate.timer", function()
  it("at() runs once after the delay", function()
    local hits = 0
    local t = paygate.timer.at(0.02, function(n) hits = hits + n end, 2)
    t:wait()
    assert.equal(2, hits)
  end)

  it("at() can be cancelled before it fires", function()
    local hits = 0
    local t = paygate.timer.at(0.05, function() hits = hits + 1 end)
    t:cancel()
    paygate.sleep(0.08)
    assert.equal(0, hits)
  end)

  it("every() ticks repeatedly, survives an error, and stops on cancel", function()
    local hits = 0
    local t = paygate.timer.every(0.01, function()
      hits = hits + 1
      if hits == 2 then error("tick error is logged, not fatal") end
    end)
    local deadline = paygate.update_time() + 5
    while hits < 4 and paygate.update_time() < deadline do paygate.sleep(0.01) end
    t:cancel()
    local seen = hits
    assert.is_true(seen >= 4)
    paygate.sleep(0.05)
    assert.equal(seen, hits)
  end)

  it("rejects bad arguments", function()
    assert.has_error(function() paygate.timer.at(-1, function() end) end)
    assert.has_error(function() paygate.timer.every(0, function() end) end)
    assert.has_error(function() paygate.timer.every(1, "x") end)
  end)
end)

describe("paygate.error", function()
  it("makes errors that print as kind: message", function()
    local e = paygate.error("signature_mismatch", "bad signature")
    assert.equal("signature_mismatch: bad signature", tostring(e))
    assert.is_false(e.retryable)
  end)
end)

describe("paygate.config", function()
  it("is read-only", function()
    assert.has_error(function() paygate.config.x = 1 end)
  end)

  it("has a writable copy to iterate, which leaves the config alone", function()
    local c = paygate.config_copy()
    assert.is_table(c)
    c.x = 1
    assert.is_nil(paygate.config.x)
  end)
end)

describe("core.free_port (for specs' servers)", function()
  -- nothing listens on a port handed out until its server starts: a
  -- three-member etcd cluster once got the same port for two members
  local pickers = {
    { "core.free_port", core.free_port, 256 },
    { "the specs' servers.free_port", require("support.servers").free_port,
      200 },
  }
  for _, p in ipairs(pickers) do
    it(p[1] .. " never hands out the same port twice in a row of " .. p[3]
       .. " calls", function()
      local seen = {}
      for _ = 1, p[3] do
        local port = p[2]()
        assert.is_nil(seen[port], "port " .. port .. " handed out twice")
        seen[port] = true
      end
    end)
  end
end)

describe("core.log_level", function()
  it("says the level in force; given one, sets it and says the one before",
     function()
    local was = core.log_level()
    assert.is_true(was >= 0 and was <= 3)
    assert.equal(was, core.log_level(3))
    assert.equal(3, core.log_level())
    assert.is_false(core.log_enabled(2))       -- warn is off now
    assert.is_true(core.log_enabled(3))
    assert.equal(3, core.log_level(was))
    assert.equal(was, core.log_level())
    assert.has_error(function() core.log_level(4) end)
    assert.has_error(function() core.log_level(-1) end)
    assert.equal(was, core.log_level())        -- a refused one changes none
  end)
end)
