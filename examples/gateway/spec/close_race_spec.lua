-- POST /v1/payments/:id/close racing the other requests that open an
-- attempt: a close that lands while a new attempt's prepay is on its way
-- to WeChat closes the payment here (WeChat does not know the new attempt
-- yet: its close answers ORDER_NOT_EXIST). The prepay answered after that
-- is of a closed payment: its code must not be handed out (a payer who
-- paid it would pay a closed order: a late payment, refunded or left to
-- an alarm), and it is closed at WeChat.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway close racing a new attempt", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { gateway = { reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  local function attempt_recorded(no)
    return function()
      local rows = gw.db:query("SELECT 1 AS x FROM gw_attempts WHERE"
                               .. " out_trade_no = $1", { no })
      return rows and rows[1] ~= nil
    end
  end

  it("a close while the new attempt's prepay waits: the code is not"
     .. " handed out, the attempt is closed at WeChat", function()
    local p = gw:create{ amount = 217 }
    assert.equal("paying", p.state)
    -- the new attempt's prepay held at WeChat until the close answered
    local h = sim:hold("prepay")
    finally(function() h:release() end)
    local attempt
    require("paygate.core").spawn(function()
      attempt = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    end)
    h:wait_held()
    local recorded = attempt_recorded(p.id .. "_2")()
    local closed = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    h:release()
    assert.truthy(recorded, "the new attempt not recorded before its"
                  .. " prepay")
    assert.equal(200, closed.status, closed.body)
    assert.equal("closed", closed.json.state)
    testing.wait_until(function() return attempt ~= nil end, 30,
                       "the attempt to answer")
    -- the payment is closed: no code of it is handed out
    assert.equal(409, attempt.status, attempt.body)
    assert.is_nil(attempt.json.pay)
    assert.equal("closed", gw:get(p.id).state)
    -- and nobody can pay the attempt WeChat made after the close
    local wx = sim:client()
    testing.wait_until(function()
      local t = wx:query_by_out_trade_no(p.id .. "_2")
      return t and t.trade_state == "CLOSED"
    end, 10, "the attempt made after the close closed at WeChat")
  end)

  it("a close while a resumed create's prepay waits: the same", function()
    -- a create whose prepay WeChat refused (not sent: the payment stays
    -- created), resumed by a second create whose prepay waits
    local order_id = "close-race-" .. require("paygate.crypto")
                       .random_nonce(8)
    local body = { order_id = order_id, channel = "native", amount = 218,
                   description = "close race" }
    sim:fault{ endpoint = "prepay", kind = "error", status = 400,
               code = "PARAM_ERROR", count = 1 }
    local first = gw:call("POST", "/v1/payments", body)
    assert.equal(502, first.status, first.body)
    local rows = assert(gw.db:query("SELECT id, state FROM gw_payments"
                                    .. " WHERE order_id = $1", { order_id }))
    local id = rows[1].id
    assert.equal("created", rows[1].state)
    local h = sim:hold("prepay")
    finally(function() h:release() end)
    local second
    require("paygate.core").spawn(function()
      second = gw:call("POST", "/v1/payments", body)
    end)
    h:wait_held()
    local recorded = attempt_recorded(id .. "_2")()
    local closed = gw:call("POST", "/v1/payments/" .. id .. "/close")
    h:release()
    assert.truthy(recorded, "the resumed create's attempt not recorded"
                  .. " before its prepay")
    assert.equal(200, closed.status, closed.body)
    assert.equal("closed", closed.json.state)
    testing.wait_until(function() return second ~= nil end, 30,
                       "the resumed create to answer")
    assert.equal(409, second.status, second.body)
    assert.is_nil(second.json.pay)
    assert.equal("closed", gw:get(id).state)
    local wx = sim:client()
    testing.wait_until(function()
      local t = wx:query_by_out_trade_no(id .. "_2")
      return t and t.trade_state == "CLOSED"
    end, 10, "the attempt made after the close closed at WeChat")
  end)
end)

-- A close that finds the payment paid (a late payment on a superseded
-- attempt applied while the close waited at WeChat) answers 409
-- payment_paid without trying paid -> closed: that is no illegal
-- transition, and paygate_gateway_fsm_illegal_transitions_total (the
-- alert for real bugs) stays as it was.
describe("gateway close finding the payment paid", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    -- one worker: its counters on /metrics are all of them
    gw = core.start(sim, { workers = 1,
                           gateway = { reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  local function counter(name)
    local res = gw.srv:admin_get("/metrics")
    local body = res and res.status == 200 and res.body or ""
    return tonumber(body:match("\n" .. name
                               .. '{machine="payment"} (%d+)\n'))
  end

  it("answers 409 payment_paid and counts no illegal transition",
     function()
    local pcore = require "paygate.core"
    local p = gw:create{ amount = 219 }
    -- the switch's close of attempt 1 is told "no such order": attempt 1
    -- stays payable at the simulator
    sim:fault{ endpoint = "close", kind = "error", status = 404,
               code = "ORDER_NOT_EXIST", count = 1 }
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    assert.equal(201, res.status, res.body)
    local before = testing.wait_until(function()
      return counter("paygate_gateway_fsm_illegal_transitions_total")
    end, 10, "the counters on /metrics")
    -- the close of attempt 2 is held at WeChat until the payer has paid
    -- attempt 1 and its notification is applied: paid, late
    local slow = sim:hold("close")
    finally(function() slow:release() end)
    local closed
    pcore.spawn(function()
      closed = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    end)
    slow:wait_held()                -- the close at WeChat
    sim:pay_and_wait(p.id .. "_1")
    local now = gw:get(p.id)
    slow:release()
    assert.equal("paid", now.state)
    testing.wait_until(function() return closed ~= nil end, 30,
                       "the close to answer")
    assert.equal(409, closed.status, closed.body)
    assert.equal("payment_paid", closed.json.error)
    assert.equal("paid", gw:get(p.id).state)
    -- a transition made after the close: once /metrics shows it, it shows
    -- whatever the close counted
    local moved = counter("paygate_gateway_fsm_transitions_total")
    gw:create{ amount = 1 }
    testing.wait_until(function()
      return (counter("paygate_gateway_fsm_transitions_total") or 0) > moved
    end, 10, "the later transition on /metrics")
    assert.equal(before,
                 counter("paygate_gateway_fsm_illegal_transitions_total"))
  end)
end)

-- An attempt closed here whose close at WeChat failed stays payable
-- there. The gateway remembers it and the payment checks finish the close
-- (on their backoff); money taken on it meanwhile, its notification lost,
-- is found by them and applied as a late payment (refunded). On SQLite
-- and, when installed, on PostgreSQL.
local servers = require "spec.support.servers"
local engines = { { "SQLite" } }
if servers.have_postgres() then
  engines[2] = { "PostgreSQL", function() return servers.postgres().url end }
end

for _, engine in ipairs(engines) do
describe("gateway attempt whose close at WeChat failed on " .. engine[1],
         function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, {
      db = engine[2],
      -- a short deadline: the checks take up a close left open once the
      -- calls that might still make the attempt (its prepay) are over.
      -- It also bounds the prepay's hold below: held past it, the
      -- gateway's call would time out (5 s for a close and a few
      -- loopback calls)
      merchant = { deadline = 5 },
      gateway = { reconcile = { check_after = 1, first = 0.5, ceiling = 1,
                                interval = 0.1, bill = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  it("money on it with its notification lost is applied as a late"
     .. " payment and refunded", function()
    local pcore = require "paygate.core"
    local p = gw:create{ amount = 223 }
    -- the new attempt's prepay held at WeChat until the close below has
    -- answered (a latency fault's window of 1.5 s, then 3 s, was not
    -- always enough on a loaded machine)
    local h = sim:hold("prepay")
    finally(function() h:release() end)   -- (nil once the faults cleared)
    local attempt
    pcore.spawn(function()
      attempt = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    end)
    h:wait_held()
    local rows = gw.db:query("SELECT 1 AS x FROM gw_attempts WHERE"
                             .. " out_trade_no = $1", { p.id .. "_2" })
    -- the close finds attempt 2 not yet made at WeChat: closed here; then
    -- the close of attempt 2, made after all, fails at WeChat. Both set
    -- before the close: the 500 set after it could come too late on a
    -- loaded machine (the attempt's own close of attempt 2, after its
    -- prepay, went through: CLOSED at WeChat)
    sim:fault{ endpoint = "close", kind = "error", status = 404,
               code = "ORDER_NOT_EXIST", count = 1 }
    sim:fault{ endpoint = "close", kind = "error", status = 500 }
    local closed = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    h:release()
    assert.truthy(rows and rows[1], "the new attempt not recorded before"
                  .. " its prepay")
    assert.equal(200, closed.status, closed.body)
    testing.wait_until(function() return attempt ~= nil end, 15,
                       "the attempt to answer")
    assert.equal(409, attempt.status, attempt.body)
    local wx = sim:client()
    assert.equal("NOTPAY", assert(wx:query_by_out_trade_no(p.id .. "_2"))
                             .trade_state)
    -- the payer pays it; the notification is lost
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    sim:pay(p.id .. "_2")
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = p.id .. "_2" }[1]
      return n and n.state == "dropped"
    end, 10, "the notification dropped")
    local got = gw:wait_state(p.id, "paid", 30)
    assert.is_true(got.late)
    assert.equal(p.id .. "_2", got.attempts[2].out_trade_no)
    assert.equal("paid", got.attempts[2].state)
    sim:clear_faults()
    testing.wait_until(function()
      local r = gw:get(p.id).refunds[1]
      return r and r.state == "processing"
    end, 20, "the automatic refund sent")
    local rf = gw:get(p.id).refunds[1]
    assert.same({ "late_payment", 223, p.id .. "_2" },
                { rf.kind, rf.amount, rf.out_trade_no })
  end)
end)
end
