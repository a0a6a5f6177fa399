-- GET /v1/payments/:id?refresh=1 racing a new attempt: the query asked
-- about the attempt that was current when the GET read the payment; an
-- answer about it (CLOSED: the new attempt's request closed it at WeChat)
-- must not close the payment, which moved to a new, open attempt.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway ?refresh=1 and a new attempt", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { gateway = { reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("a CLOSED about the previous attempt leaves the new one open",
     function()
    local pcore = require "paygate.core"
    local p = gw:create{ amount = 321 }
    assert.equal("paying", p.state)
    -- the refresh's query is held at WeChat until a new attempt has
    -- closed the first one there and taken its place
    local slow = sim:hold("query")
    local got
    pcore.spawn(function()
      got = gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=1")
    end)
    finally(function() slow:release() end)
    slow:wait_held()                -- the refresh's query at WeChat
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    slow:release()
    assert.equal(201, res.status, res.body)
    testing.wait_until(function() return got ~= nil end, 10,
                       "the refresh to answer")
    local now = gw:get(p.id)
    assert.equal(p.id .. "_2", now.out_trade_no)
    -- the new attempt is open at WeChat, and so is the payment here
    assert.equal("NOTPAY", assert(sim:client():query_by_out_trade_no(
      now.out_trade_no)).trade_state)
    assert.equal("paying", now.state)
    -- paid on it: an ordinary payment, not a late one
    sim:pay(now.out_trade_no)
    local paid = gw:wait_state(p.id, "paid", 20)
    local rows = assert(gw.db:query("SELECT late FROM gw_payments WHERE"
                                    .. " id = $1", { p.id }))
    assert.equal(0, rows[1].late)
    assert.equal(321, paid.amount)
  end)

  it("a CLOSED made by a switch's own close, before the switch is"
     .. " recorded, does not close the payment", function()
    local p = gw:create{ amount = 322 }
    -- the switch's close of attempt 1: done at WeChat, then answered 500;
    -- its retry is held there until the spec has looked. Between the two
    -- the attempt is CLOSED at WeChat and still the current one here.
    -- (Two holds, taken in turn: the first, let go at once, keeps the
    -- second for the retry.)
    local first = sim:hold("close")
    local retry = sim:hold("close")
    sim:fault{ endpoint = "close", kind = "error", status = 500,
               after = true, count = 1 }
    local res
    require("paygate.core").spawn(function()
      res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                    { channel = "native" })
    end)
    finally(function() first:release(); retry:release() end)
    first:wait_held()
    first:release()
    retry:wait_held()               -- the retry at WeChat: the 500 answered
    local closed = sim:client():query_by_out_trade_no(p.id .. "_1")
    -- a refresh now reads CLOSED for the payment's current attempt
    local got = gw:get(p.id, "?refresh=1")
    retry:release()
    assert.equal("CLOSED", assert(closed).trade_state)
    assert.equal("paying", got.state)
    testing.wait_until(function() return res ~= nil end, 15,
                       "the switch to answer")
    assert.equal(201, res.status, res.body)
    assert.equal(p.id .. "_2", res.json.payment.out_trade_no)
    assert.equal("paying", gw:get(p.id).state)
    sim:pay(p.id .. "_2")
    gw:wait_state(p.id, "paid", 20)
  end)

  -- the close of the attempt done at WeChat, every answer to it lost (a
  -- 500 after the work, through the client's retries)
  local function close_unanswered()
    sim:fault{ endpoint = "close", kind = "error", status = 500,
               after = true, count = 10 }
  end

  it("a switch whose close WeChat made but never answered goes on",
     function()
    -- was: 502 and the attempt left the payment's; the next check read
    -- CLOSED and closed the payment: its order could not be paid again
    local p = gw:create{ amount = 323 }
    close_unanswered()
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    sim:control("DELETE", "/sim/faults")
    assert.equal(201, res.status, res.body)
    assert.equal(p.id .. "_2", res.json.payment.out_trade_no)
    assert.equal("CLOSED", assert(sim:client():query_by_out_trade_no(
      p.id .. "_1")).trade_state)
    -- a refresh reads the new attempt, open
    assert.equal("paying", gw:get(p.id, "?refresh=1").state)
    sim:pay(p.id .. "_2")
    gw:wait_state(p.id, "paid", 20)
  end)

  it("a close WeChat made but never answered is answered closed",
     function()
    local p = gw:create{ amount = 324 }
    close_unanswered()
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    sim:control("DELETE", "/sim/faults")
    assert.equal(200, res.status, res.body)
    assert.equal("closed", res.json.state)
    -- WeChat's own failure (nothing closed) is still an error
    local q = gw:create{ amount = 325 }
    sim:fault{ endpoint = "close", kind = "error", status = 500, count = 10 }
    res = gw:call("POST", "/v1/payments/" .. q.id .. "/attempts",
                  { channel = "native" })
    sim:control("DELETE", "/sim/faults")
    assert.equal(502, res.status, res.body)
    assert.equal(q.id .. "_1", gw:get(q.id).out_trade_no)
    assert.equal("NOTPAY", assert(sim:client():query_by_out_trade_no(
      q.id .. "_1")).trade_state)
  end)
end)
