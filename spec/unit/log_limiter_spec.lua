-- paygate.log.limiter: a line each request from outside can cause (a
-- refusal) logged in full the first `lines` times per key and window, for
-- all workers (the "paygate" shared dictionary), then counted and said in
-- one line once the window is over.
local paygate = require "paygate"
local testing = require "paygate.testing"

describe("paygate.log.limiter", function()
  local logged, saved = {}, {}

  setup(function()
    for _, lvl in ipairs({ "debug", "info", "warn", "error" }) do
      saved[lvl] = paygate.log[lvl]
      paygate.log[lvl] = function(msg, fields)
        logged[#logged + 1] = { level = lvl, msg = msg, fields = fields }
      end
    end
  end)
  teardown(function()
    for lvl, f in pairs(saved) do paygate.log[lvl] = f end
  end)
  before_each(function()
    for i = #logged, 1, -1 do logged[i] = nil end
  end)

  local function of(msg)
    local out = {}
    for _, l in ipairs(logged) do
      if l.msg == msg then out[#out + 1] = l end
    end
    return out
  end

  -- waits for a window of w seconds to begin (so that a burst falls in
  -- one)
  local function window_start(w)
    local w0 = math.floor(paygate.update_time() / w)
    testing.wait_until(function()
      return math.floor(paygate.update_time() / w) > w0
    end, w + 2, "a window to begin")
  end

  it("refuses what it cannot use", function()
    assert.has_error(function() paygate.log.limiter() end,
      "paygate.log.limiter: msg must be a non-empty string")
    assert.has_error(function() paygate.log.limiter("m", 5) end,
      "paygate.log.limiter: opts must be a table or false")
    for _, bad in ipairs({ 0, 1.5, -1, "3", 2e6 }) do
      assert.has_error(function()
        paygate.log.limiter("m", { lines = bad })
      end, "paygate.log.limiter: opts.lines must be a whole number,"
           .. " 1 .. 1000000")
    end
    for _, bad in ipairs({ 0, 0.5, 1 / 0, 0 / 0, 86401, "60" }) do
      assert.has_error(function()
        paygate.log.limiter("m", { window = bad })
      end, "paygate.log.limiter: opts.window must be seconds, 1 .. 86400")
    end
    -- the same check, for a config that takes a limiter's opts
    assert.same({ lines = 10, window = 60 }, paygate.log.limiter_opts({}))
    assert.same({ lines = 3, window = 5 },
                paygate.log.limiter_opts({ lines = 3, window = 5 }))
    assert.same({ nil, "must be a whole number, 1 .. 1000000", "lines" },
                { paygate.log.limiter_opts({ lines = 0 }) })
    assert.same({ nil, "must be seconds, 1 .. 86400", "window" },
                { paygate.log.limiter_opts({ window = 0 / 0 }) })
    local lim = paygate.log.limiter("m")
    assert.has_error(function() lim:warn("kind") end,
      "paygate.log.limiter: key must be a table of fields")
    assert.has_error(function() lim:warn({}, "x") end,
      "paygate.log: fields must be a table")
  end)

  it("logs the first lines of each key in full, then one line saying how"
     .. " many more once the window is over", function()
    local lim = paygate.log.limiter("spec: refused a", { lines = 3,
                                                         window = 1 })
    window_start(1)
    local got = {}
    for i = 1, 20 do
      got[i] = lim:warn({ mchid = "1", kind = "bad_signature" },
                        { reason = "try " .. i })
    end
    -- another key has lines of its own
    assert.is_true(lim:warn({ mchid = "2", kind = "bad_signature" }))
    assert.same({ true, true, true }, { got[1], got[2], got[3] })
    for i = 4, 20 do assert.is_false(got[i], i) end
    local full = of("spec: refused a")
    assert.equal(4, #full)
    assert.same({ mchid = "1", kind = "bad_signature", reason = "try 1" },
                full[1].fields)
    assert.equal("warn", full[1].level)
    local sum
    testing.wait_until(function()
      sum = of("spec: refused a: more lines like it not logged")
      return #sum > 0
    end, 5, "the summary line")
    -- one summary, for the key over the limit only, at the lines' level
    assert.equal(1, #sum)
    assert.equal("warn", sum[1].level)
    assert.same({ mchid = "1", kind = "bad_signature", suppressed = 17,
                  window = 1, lines = 3 }, sum[1].fields)
    -- the next window: lines in full again
    assert.is_true(lim:warn({ mchid = "1", kind = "bad_signature" }))
  end)

  it("holds the bound across limiters of one msg (as each worker makes"
     .. " its own)", function()
    local a = paygate.log.limiter("spec: refused b", { lines = 2,
                                                       window = 2 })
    local b = paygate.log.limiter("spec: refused b", { lines = 2,
                                                       window = 2 })
    window_start(2)
    for _ = 1, 5 do
      a:info({ reason = "x" })
      b:info({ reason = "x" })
    end
    assert.equal(2, #of("spec: refused b"))
    testing.wait_until(function()
      return #of("spec: refused b: more lines like it not logged") > 0
    end, 6, "the summary line")
    local sum = of("spec: refused b: more lines like it not logged")
    assert.equal(1, #sum)
    assert.equal("info", sum[1].level)
    assert.equal(8, sum[1].fields.suppressed)
  end)

  it("with opts false logs every line", function()
    local lim = paygate.log.limiter("spec: refused c", false)
    for _ = 1, 30 do
      assert.is_true(lim:error({ reason = "x" }, { n = 1 }))
    end
    assert.equal(30, #of("spec: refused c"))
  end)

  it("counts nothing below the log level", function()
    local lim = paygate.log.limiter("spec: refused d", { lines = 1 })
    assert.is_false(lim:debug({ reason = "x" }))
    assert.equal(0, #of("spec: refused d"))
  end)
end)
