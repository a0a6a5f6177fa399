-- Two creates of one order_id under different Idempotency-Keys (a caller
-- that retried with a new key while its first request still waited for
-- WeChat): the second resumes the payment with a new attempt. The first
-- one's prepay, answered after that, is of a superseded attempt: its code
-- must not be handed out (a payer who paid it had a late payment,
-- refunded), and it is closed at WeChat.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway create racing a resumed create", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { gateway = { reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  -- A create of a fresh order whose prepay waits at WeChat (held there),
  -- then a second create of the same order_id under another key, sent
  -- once the first's prepay is held; the first's prepay is answered once
  -- the second has answered. after_second(): run once the second
  -- answered. returns: both answers.
  local function racing_creates(amount, description, after_second)
    local body = { order_id = "race-" .. require("paygate.crypto")
                     .random_nonce(8), channel = "native", amount = amount,
                   description = description }
    local h = sim:hold("prepay")
    local first
    require("paygate.core").spawn(function()
      first = gw:call("POST", "/v1/payments", body)
    end)
    h:wait_held()                        -- the first's prepay at WeChat
    local second = gw:call("POST", "/v1/payments", body)
    if after_second then after_second() end
    h:release()
    testing.wait_until(function() return first ~= nil end, 30,
                       "the first create to answer")
    return first, second
  end

  it("only the current attempt's code is handed out", function()
    local first, second = racing_creates(130, "two creates")
    assert.equal(201, second.status, second.body)
    local p = second.json.payment
    assert.equal(p.id .. "_2", p.out_trade_no)
    -- the first is refused: its attempt was superseded while it waited
    assert.equal(409, first.status, first.body)
    assert.equal("conflict", first.json.error)
    -- and its attempt cannot be paid any more
    local wx = sim:client()
    testing.wait_until(function()
      local t = wx:query_by_out_trade_no(p.id .. "_1")
      return t and t.trade_state == "CLOSED"
    end, 10, "the superseded attempt closed at WeChat")
    assert.equal("NOTPAY", assert(wx:query_by_out_trade_no(p.id .. "_2"))
                 .trade_state)
    -- the handed-out code pays the payment, an ordinary payment
    sim:pay(p.out_trade_no)
    gw:wait_state(p.id, "paid", 20)
    local rows = assert(gw.db:query("SELECT late FROM gw_payments WHERE"
                                    .. " id = $1", { p.id }))
    assert.equal(0, rows[1].late)
  end)

  it("a failed prepay of the superseded attempt leaves the payment as the"
     .. " current attempt has it", function()
    -- once the second is answered, the first's answer will not verify
    -- (WeChat may have made the order: the outcome of that attempt is not
    -- known)
    local first, second = racing_creates(140, "two creates, the first fails",
      function()
        sim:fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
      end)
    sim:clear_faults()
    assert.equal(201, second.status, second.body)
    assert.is_true(first.status >= 500, first.body)
    local p = gw:get(second.json.payment.id)
    assert.equal(p.id .. "_2", p.out_trade_no)
    -- attempt 2 was handed out and is open: not unknown because of
    -- attempt 1
    assert.equal("paying", p.state)
    -- and attempt 1, which WeChat did make, cannot be paid
    local wx = sim:client()
    testing.wait_until(function()
      local t = wx:query_by_out_trade_no(p.id .. "_1")
      return t and t.trade_state == "CLOSED"
    end, 10, "the superseded attempt closed at WeChat")
  end)
end)

-- On PostgreSQL (READ COMMITTED: each statement reads what is committed
-- when it starts) the first create's last transaction could read the
-- payment before the second create's resume committed and write after it
-- (a resume moves the payment to a new attempt without changing its
-- version): found by model_cluster_spec (seeds 601, 602: "two creates at
-- once: 201 201"). Made deterministic here with row locks: the spec holds
-- the payment's row, so the second create's resume stops at its UPDATE of
-- it, holding attempt 1's row (marked superseded); the first create's
-- prepay then comes back, its transaction reads the payment (still on
-- attempt 1 for it: the resume is not committed) and waits for a row;
-- then the spec lets go.
local servers = require "spec.support.servers"
local locks = dofile("examples/gateway/spec/pg_locks.lua")
if not servers.have_postgres() then
  describe("gateway create racing a resumed create on PostgreSQL", function()
    pending("PostgreSQL is not installed")
  end)
  return
end

describe("gateway create racing a resumed create on PostgreSQL", function()
  local sim, gw
  local spawn = require("paygate.core").spawn

  setup(function()
    local pg = servers.postgres()
    sim = testing.simulator{ time_scale = 100 }
    -- one try per call: a prepay's 5xx is not tried again
    gw = core.start(sim, { db = function() return pg.url .. "?pool=6" end,
                           gateway = { reconcile = { enabled = false } },
                           merchant = { max_attempts = 1 } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  after_each(function() sim:clear_faults() end)

  -- sessions waiting for a lock (in a statement starting with prefix)
  local function waiting(prefix) return locks.waiting(gw.db, prefix) end

  -- The race above (the first create's prepay held by the simulator
  -- until the second create waits for the payment's row, then answered
  -- normally or as `fault` says). returns: the payment's id, and both
  -- answers.
  local function racing_creates(amount, fault)
    local body = { order_id = "race-pg-" .. require("paygate.crypto")
                     .random_nonce(8), channel = "native", amount = amount,
                   description = "two creates on PostgreSQL" }
    local h = sim:hold("prepay")
    if fault then sim:fault(fault) end
    local first, second
    spawn(function() first = gw:call("POST", "/v1/payments", body) end)
    local id
    testing.wait_until(function()
      local rows = gw.db:query("SELECT p.id FROM gw_attempts a JOIN"
        .. " gw_payments p ON p.id = a.payment_id WHERE p.order_id = $1",
        { body.order_id })
      id = rows and rows[1] and rows[1].id
      return id ~= nil
    end, 10, "the first create's attempt")
    h:wait_held()                        -- its prepay at WeChat
    local release = locks.hold_payment(gw.db, id)
    spawn(function() second = gw:call("POST", "/v1/payments", body) end)
    testing.wait_until(function()
      return waiting("UPDATE gw_payments SET channel") == 1
    end, 10, "the second create's resume to wait for the payment's row")
    -- the first create's prepay answered now: its transaction waits too
    h:release()
    testing.wait_until(function() return waiting() == 2 end, 30,
                       "the first create's transaction to wait")
    release()
    testing.wait_until(function() return first and second end, 20,
                       "both creates to answer")
    return id, first, second
  end

  local function events_of(id, etype)
    return #assert(gw.db:query("SELECT id FROM paygate_outbox WHERE subject"
      .. " = $1 AND type = $2", { id, etype }))
  end

  it("the first create's code is not handed out when the resume commits"
     .. " between its read and its write", function()
    local id, first, second = racing_creates(150)
    assert.equal(201, second.status, second.body)
    assert.equal(id .. "_2", second.json.payment.out_trade_no)
    assert.equal(409, first.status, first.body)
    assert.equal("conflict", first.json.error)
    local rows = assert(gw.db:query("SELECT state FROM gw_attempts"
      .. " WHERE out_trade_no = $1", { id .. "_1" }))
    assert.equal("superseded", rows[1].state)
  end)

  it("the first create's unknown outcome is not the payment's when the"
     .. " resume commits between its read and its write", function()
    -- WeChat's 5xx: attempt 1 may have been made there (unknown); the
    -- payment is on attempt 2 by then, which that says nothing about
    local id, first, second = racing_creates(160, { endpoint = "prepay",
      kind = "error", status = 500, count = 1 })
    assert.is_true(first.status >= 500, first.body)
    assert.equal(201, second.status, second.body)
    assert.equal(id .. "_2", second.json.payment.out_trade_no)
    assert.equal("paying", gw:get(id).state)
    assert.equal(0, events_of(id, "payment.unknown"))
    assert.equal(1, events_of(id, "payment.paying"))
  end)
end)
