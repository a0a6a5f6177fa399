-- spec/support/days.lua's days.within, on a clock the spec moves: fn runs
-- once within one day; again, all in the new day, when a midnight passed
-- while it ran -- also when it raised then (a failure the midnight may
-- have caused, e.g. a day left without the records); raised within one
-- day, the error goes on.
local days = require "support.days"

describe("days.within", function()
  local real_time = os.time
  -- the clock: epoch s, moved by the fns below
  local now

  before_each(function()
    -- 23:59:58 Beijing, 2026-03-01
    now = 1772380798
    os.time = function(t)
      if t ~= nil then return real_time(t) end
      return now
    end
  end)

  after_each(function() os.time = real_time end)

  it("runs fn once within one day and gives its day and results",
     function()
    local runs = 0
    local d, a, b, c = days.within(days.BEIJING, function(x)
      runs = runs + 1
      return x, nil, 3
    end, 1)
    assert.same({ "2026-03-01", 1, nil, 3, 1 }, { d, a, b, c, runs })
  end)

  it("runs fn again in the new day when a midnight passed", function()
    local runs = 0
    local d, got = days.within(days.BEIJING, function()
      runs = runs + 1
      now = now + 5                      -- past midnight the first time
      return runs
    end)
    assert.same({ "2026-03-02", 2, 2 }, { d, got, runs })
  end)

  it("runs fn again in the new day when it raised after a midnight passed",
     function()
    local runs = 0
    local d = days.within(days.BEIJING, function()
      runs = runs + 1
      if runs == 1 then
        now = now + 5
        error("no trade that day")
      end
    end)
    assert.same({ "2026-03-02", 2 }, { d, runs })
  end)

  it("raises fn's error when it raised within one day", function()
    local runs = 0
    assert.has_error(function()
      days.within(days.BEIJING, function()
        runs = runs + 1
        error({ kind = "spec" })
      end)
    end, { kind = "spec" })
    assert.equal(1, runs)
    -- and in the new day, after a midnight passed: the second run's
    runs = 0
    assert.has_error(function()
      days.within(days.BEIJING, function()
        runs = runs + 1
        if runs == 1 then now = now + 5 end
        error("run " .. runs, 0)
      end)
    end, "run 2")
    assert.equal(2, runs)
  end)
end)
