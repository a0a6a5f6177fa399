-- The simulator's hold fault: a request held until the spec releases it
-- (POST /sim/faults/{id}/release), the fault is cleared, or its seconds
-- (the cap) have passed; GET /sim/faults shows how many it holds now, so
-- a spec waits on "the call is at WeChat" instead of racing a latency
-- fault's fixed window. Two workers: a release through either lets go
-- what both hold.
local sn = require "support.simnotify"
local crypto = require "paygate.crypto"
local core = require "paygate.core"
local paygate = require "paygate"
local json = require "cjson.safe"

local function order_no() return "HLD" .. crypto.random_nonce(16) end

describe("simulator hold fault", function()
  local sim
  setup(function() sim = sn.start{ workers = 2 } end)
  teardown(function() if sim then sim:stop() end end)
  after_each(function() sn.ctl(sim, "DELETE", "/sim/faults") end)

  local function fault(spec)
    local st, doc = sn.ctl(sim, "POST", "/sim/faults", spec)
    assert(st == 200, "fault: " .. tostring(st) .. " " .. json.encode(doc))
    return doc
  end

  -- the fault as GET /sim/faults lists it, or nil
  local function listed(id)
    local st, l = sn.ctl(sim, "GET", "/sim/faults")
    assert.equal(200, st)
    for _, f in ipairs(l) do if f.id == id then return f end end
  end

  local function wait_held(id, n)
    sn.wait_until(function()
      local f = listed(id)
      return f and f.held == n
    end, 10, n .. " request(s) held by fault " .. id)
  end

  local function release(id)
    local st, doc = sn.ctl(sim, "POST", "/sim/faults/" .. id .. "/release")
    assert(st == 200, "release: " .. tostring(st) .. " " .. json.encode(doc))
    return doc
  end

  -- a query of order no, sent in a task of its own: t.res once answered
  local function query(no)
    local t = {}
    t.task = paygate.spawn(function()
      t.res = sn.signed(sim, "GET", "/v3/pay/transactions/out-trade-no/"
                        .. no .. "?mchid=" .. sn.MCHID)
      t.at = core.mono()
    end)
    return t
  end

  local function entries(id)
    local st, l = sn.ctl(sim, "GET", "/sim/requests")
    assert.equal(200, st)
    local out = {}
    for _, r in ipairs(l) do
      if r.hold_fault == id then out[#out + 1] = r end
    end
    return out
  end

  it("holds a request until released, shown held meanwhile; then spent",
     function()
    local no = order_no()
    sn.prepay(sim, no, "http://127.0.0.1:9/notify")
    local f = fault{ endpoint = "query", kind = "hold", count = 2 }
    assert.equal(60, f.seconds)               -- the default cap
    local t = query(no)
    wait_held(f.id, 1)
    assert.is_nil(t.res, "answered while held")
    local l = listed(f.id)
    assert.equal(1, l.fired)
    assert.is_false(l.released)
    -- another endpoint is not held meanwhile
    sn.pay(sim, no)
    local r = release(f.id)
    assert.is_true(r.released)
    local t0 = core.mono()
    sn.wait_until(function() return t.res ~= nil end, 5, "the held query")
    -- let go within the poll, not at the cap
    assert(t.at - t0 < 2, "answered " .. (t.at - t0) .. " s after release")
    assert.equal(200, t.res.status, t.res.body)
    -- the work was done after the hold: the payment made meanwhile shows
    assert.equal("SUCCESS", json.decode(t.res.body).trade_state)
    l = listed(f.id)
    assert.equal(0, l.held)
    assert.is_true(l.released)
    -- released: its second firing is never taken
    local t2 = query(no)
    sn.wait_until(function() return t2.res ~= nil end, 5, "a later query")
    assert.equal(200, t2.res.status)
    assert.equal(1, listed(f.id).fired)
    local e = entries(f.id)
    assert.equal(1, #e)
    assert.equal("released", e[1].hold_ended)
    -- releasing again does nothing, and says so
    assert.is_true(release(f.id).released)
  end)

  it("lets a request go at its seconds when nobody releases it", function()
    local f = fault{ endpoint = "query", kind = "hold", seconds = 0.5,
                     count = 1 }
    local t0 = core.mono()
    local t = query(order_no())
    sn.wait_until(function() return t.res ~= nil end, 10, "the held query")
    local took = t.at - t0
    assert(took >= 0.49, "answered after " .. took .. " s")
    assert.equal(404, t.res.status)           -- no such order: the work ran
    assert.equal("cap", entries(f.id)[1].hold_ended)
    assert.equal(0, listed(f.id).held)
  end)

  it("lets held requests go when the faults are cleared", function()
    local f = fault{ endpoint = "query", kind = "hold" }
    local t = query(order_no())
    wait_held(f.id, 1)
    assert.equal(204, (sn.ctl(sim, "DELETE", "/sim/faults")))
    sn.wait_until(function() return t.res ~= nil end, 5, "the held query")
    assert.equal(404, t.res.status)
    assert.equal("cleared", entries(f.id)[1].hold_ended)
  end)

  it("an error fault on the same endpoint still fires after the hold",
     function()
    local f = fault{ endpoint = "query", kind = "hold", count = 1 }
    fault{ endpoint = "query", kind = "error", status = 503, count = 1 }
    local t = query(order_no())
    wait_held(f.id, 1)
    release(f.id)
    sn.wait_until(function() return t.res ~= nil end, 5, "the held query")
    assert.equal(503, t.res.status)
  end)

  it("refuses what it cannot hold or release", function()
    local function refused(path, body, want, code)
      local st, doc = sn.ctl(sim, "POST", path, body)
      assert.equal(want, st, json.encode(doc))
      assert.equal(code, doc.code)
      return doc.message
    end
    assert.matches("seconds", refused("/sim/faults", { endpoint = "query",
      kind = "hold", seconds = 601 }, 400, "PARAM_ERROR"))
    assert.matches("unknown key", refused("/sim/faults", { endpoint =
      "query", kind = "hold", secs = 5 }, 400, "PARAM_ERROR"))
    assert.matches("not a notification fault", refused("/sim/faults",
      { endpoint = "notify", kind = "hold" }, 400, "PARAM_ERROR"))
    refused("/sim/faults/999999/release", nil, 404, "NOT_FOUND")
    refused("/sim/faults/x1/release", nil, 404, "NOT_FOUND")
    local lat = fault{ endpoint = "query", kind = "latency", seconds = 0.1 }
    assert.matches("only a hold", refused("/sim/faults/" .. lat.id
      .. "/release", nil, 400, "PARAM_ERROR"))
    -- one cleared is gone
    local h = fault{ endpoint = "query", kind = "hold" }
    sn.ctl(sim, "DELETE", "/sim/faults")
    refused("/sim/faults/" .. h.id .. "/release", nil, 404, "NOT_FOUND")
  end)

  it("a release through one worker lets go what both workers hold",
     function()
    -- (the kernel hands connections to either worker, and a worker woken
    -- by a burst accepts the whole burst: the requests go one at a time,
    -- each held before the next connects, so each is a fresh race between
    -- the two workers; a round whose requests all landed on one is made
    -- again, so the release is shown reaching the other worker's)
    local N, spanned = 16, false
    for round = 1, 10 do
      local f = fault{ endpoint = "query", kind = "hold", count = N }
      local ts = {}
      for i = 1, N do
        ts[i] = query(order_no())
        wait_held(f.id, i)
      end
      local t0 = core.mono()
      release(f.id)
      sn.wait_until(function()
        for _, t in ipairs(ts) do if not t.res then return false end end
        return true
      end, 5, "every held query after the release, round " .. round)
      local workers, n = {}, 0
      for _, t in ipairs(ts) do
        assert.equal(404, t.res.status)
        assert(t.at - t0 < 2, "answered " .. (t.at - t0) .. " s after")
      end
      local e = entries(f.id)
      assert.equal(N, #e)
      for _, r in ipairs(e) do
        assert.equal("released", r.hold_ended)
        assert.matches("^%d+$", tostring(r.worker))
        if not workers[r.worker] then n = n + 1 end
        workers[r.worker] = true
      end
      assert.equal(0, listed(f.id).held)
      if n == 2 then spanned = true; break end
    end
    assert.is_true(spanned, "no round's held requests spanned both workers")
  end)
end)
