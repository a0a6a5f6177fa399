-- On PostgreSQL (READ COMMITTED: each statement reads what is committed
-- when it starts) a switch (POST /v1/payments/:id/attempts) moves the
-- payment to a new attempt without changing its version, so a transaction
-- that read the payment before the switch committed and wrote after it was
-- not caught by the version check:
--   * a close closed the payment and the switch's new attempt, the switch
--     answering 409 -- an outcome neither order of the two gives;
--   * a late payment on an older attempt made the payment paid and left
--     the switch's new attempt open;
--   * a payment check's PAYERROR about the previous attempt failed the
--     payment on the new one.
-- Made deterministic with row locks (as create_race_spec): the spec holds
-- a row the switch waits for inside its transaction, lets the other
-- transaction read and wait, then lets go.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")
local servers = require "spec.support.servers"
local locks = dofile("examples/gateway/spec/pg_locks.lua")

if not servers.have_postgres() then
  describe("gateway requests racing a switch on PostgreSQL", function()
    pending("PostgreSQL is not installed")
  end)
  return
end

-- The switch won: the payment is paying on its attempt 2 (open), attempt
-- 1 superseded, no `event` was raised for it, and attempt 2's code pays
-- the payment.
local function switched(gw, sim, p, event)
  local now_p = gw:get(p.id)
  assert.equal("paying", now_p.state)
  assert.equal(p.id .. "_2", now_p.out_trade_no)
  local rows = assert(gw.db:query("SELECT state FROM gw_attempts WHERE"
    .. " payment_id = $1 ORDER BY n", { p.id }))
  assert.equal("superseded", rows[1].state)
  assert.equal("open", rows[2].state)
  assert.equal(0, #assert(gw.db:query("SELECT id FROM paygate_outbox"
    .. " WHERE subject = $1 AND type = $2", { p.id, event })))
  sim:pay(p.id .. "_2")
  gw:wait_state(p.id, "paid", 20)
end

describe("gateway requests racing a switch on PostgreSQL", function()
  local sim, gw
  local spawn = require("paygate.core").spawn

  setup(function()
    local pg = servers.postgres_db()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { db = function() return pg.url .. "?pool=6" end,
                           gateway = { reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  -- how many sessions of the store wait for a lock (in a statement
  -- starting with prefix, if given)
  local function waiting(prefix) return locks.waiting(gw.db, prefix) end

  local function hold_payment(id) return locks.hold_payment(gw.db, id) end

  it("a close whose transaction read the payment before the switch"
     .. " committed does not close the switch's new attempt", function()
    local p = gw:create{ amount = 170 }
    assert.equal("paying", p.state)
    local release = hold_payment(p.id)
    local switch, close
    spawn(function()
      switch = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                       { channel = "native" })
    end)
    testing.wait_until(function()
      return waiting("UPDATE gw_payments SET channel") == 1
    end, 10, "the switch to wait for the payment's row")
    spawn(function()
      close = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    end)
    testing.wait_until(function() return waiting() == 2 end, 10,
                       "the close's transaction to wait")
    release()
    testing.wait_until(function() return switch and close end, 20,
                       "both to answer")
    -- the switch came first: its attempt is the payment's and open; the
    -- close, which WeChat made on the previous attempt only, is refused
    assert.equal(201, switch.status, switch.body)
    assert.equal(p.id .. "_2", switch.json.payment.out_trade_no)
    assert.equal(409, close.status, close.body)
    assert.equal("conflict", close.json.error)
    switched(gw, sim, p, "payment.closed")
  end)

  -- A late payment (on an attempt a switch superseded, still payable at
  -- WeChat: the switch's close of it was told "no such order") applied
  -- while a second switch moves the payment on: the payment, read on
  -- attempt 2 before that switch committed, was made paid after it, and
  -- attempt 2 (already superseded) was the one superseded -- attempt 3
  -- stayed open here, payable once the switch's own close of it failed.
  it("a late payment applied while a switch commits leaves no attempt"
     .. " open", function()
    local p = gw:create{ amount = 190 }
    sim:fault{ endpoint = "close", kind = "error", status = 404,
               code = "ORDER_NOT_EXIST", count = 1 }
    local first = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                          { channel = "native" })
    assert.equal(201, first.status, first.body)
    assert.equal(p.id .. "_2", first.json.payment.out_trade_no)
    local release = hold_payment(p.id)
    local switch
    spawn(function()
      switch = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                       { channel = "native" })
    end)
    testing.wait_until(function()
      return waiting("UPDATE gw_payments SET channel") == 1
    end, 10, "the second switch to wait for the payment's row")
    -- attempt 1 paid at WeChat: its notification's transaction waits too
    sim:pay(p.id .. "_1")
    testing.wait_until(function() return waiting() == 2 end, 20,
                       "the late payment's transaction to wait")
    release()
    testing.wait_until(function() return switch ~= nil end, 20,
                       "the switch to answer")
    gw:wait_state(p.id, "paid", 20)
    local rows = assert(gw.db:query("SELECT late FROM gw_payments WHERE"
                                    .. " id = $1", { p.id }))
    assert.equal(1, rows[1].late)
    -- attempt 3 is no payment's to pay: superseded here (and closed at
    -- WeChat), whichever of the switch's prepay and the payment came first
    testing.wait_until(function()
      local open = assert(gw.db:query("SELECT out_trade_no FROM"
        .. " gw_attempts WHERE payment_id = $1 AND state = 'open'",
        { p.id }))
      return open[1] == nil
    end, 10, "no attempt open")
    local wx = sim:client()
    testing.wait_until(function()
      local t = wx:query_by_out_trade_no(p.id .. "_3")
      return t == nil or t.trade_state == "CLOSED"
    end, 10, "attempt 3 closed at WeChat")
  end)
end)

-- The payment checks (reconcile:payments) racing a switch: the check asks
-- WeChat about the payment's attempt (PAYERROR: the payer's payment of it
-- failed), then in its transaction reads the payment and moves it (failed)
-- under its version check. A switch committed between that read and that
-- write went unnoticed: the payment failed on the switch's new attempt,
-- which was closed with it. Held at the check's fence (its transaction's
-- first statement: a share lock on the runner's lease row) until the
-- switch waits inside its transaction, then at the attempt's row.
describe("gateway payment checks racing a switch on PostgreSQL", function()
  local sim, gw
  local spawn = require("paygate.core").spawn

  setup(function()
    local pg = servers.postgres_db()
    sim = testing.simulator{ time_scale = 100 }
    -- lease_ttl 600: the runner does not renew its lease (an UPDATE of
    -- the row the spec holds) during the spec
    gw = core.start(sim, { db = function() return pg.url .. "?pool=6" end,
      gateway = { reconcile = { check_after = 3, first = 30,
                                interval = 0.1, lease_ttl = 600,
                                bill = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  local function waiting(prefix) return locks.waiting(gw.db, prefix) end

  local function hold(sql, args) return locks.hold(gw.db, sql, args) end

  -- The checks' lease row, which the cases hold to stop the checks at
  -- their fence: taken by the first run of the checks after the start
  -- (holding a row not there yet holds nothing). Each case waits for it
  -- itself, so it does not rely on an earlier case having waited.
  local function wait_lease()
    testing.wait_until(function()
      -- (no lease table until the first lease taken makes it: on a
      -- loaded machine the first poll can come before that)
      local rows, err = gw.db:query("SELECT 1 AS x FROM paygate_leases"
        .. " WHERE name = 'reconcile:payments'")
      if not rows and tostring(err):find("does not exist", 1, true) then
        return false
      end
      return assert(rows, err)[1] ~= nil
    end, 30, "the payment checks' lease")
  end

  it("a PAYERROR about the previous attempt does not fail the payment on"
     .. " the switch's new one", function()
    wait_lease()
    local release_lease = hold("SELECT token FROM paygate_leases WHERE"
                               .. " name = 'reconcile:payments'")
    local release_attempt
    -- a failure below must not leave the rows held (for up to 30 s): the
    -- next test holds the lease's row too, and timed out waiting for it
    finally(function()
      release_lease()
      if release_attempt then release_attempt() end
    end)
    local p = gw:create{ amount = 180 }
    assert.equal("paying", p.state)
    -- (the payment's first check is 3 s after its create)
    sim:fail(p.id .. "_1")
    testing.wait_until(function()
      return waiting("SELECT token FROM paygate_leases") == 1
    end, 20, "the check, told PAYERROR, to wait at its fence")
    -- the switch: its close of attempt 1 is held at WeChat until the
    -- spec has taken attempt 1's row, marked by the switch
    local h = sim:hold("close")
    local switch
    spawn(function()
      switch = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                       { channel = "native" })
    end)
    testing.wait_until(function()
      local rows = assert(gw.db:query("SELECT 1 AS x FROM gw_attempts"
        .. " WHERE out_trade_no = $1 AND close_check_at IS NOT NULL",
        { p.id .. "_1" }))
      return rows[1] ~= nil
    end, 10, "the switch's mark")
    h:wait_held()                         -- the switch's close at WeChat
    release_attempt = hold("SELECT state FROM gw_attempts WHERE"
                           .. " out_trade_no = $1", { p.id .. "_1" })
    h:release()
    testing.wait_until(function() return waiting() == 2 end, 20,
                       "the switch's transaction to wait")
    release_lease()
    testing.wait_until(function()
      return waiting("SELECT token FROM paygate_leases") == 0
             and waiting() == 2
    end, 10, "the check's transaction to wait")
    release_attempt()
    testing.wait_until(function() return switch ~= nil end, 20,
                       "the switch to answer")
    testing.wait_until(function()
      local rows = assert(gw.db:query("SELECT checks FROM gw_payments"
                                      .. " WHERE id = $1", { p.id }))
      return tonumber(rows[1].checks) >= 1
    end, 10, "the check to commit")
    sim:clear_faults()
    assert.equal(201, switch.status, switch.body)
    switched(gw, sim, p, "payment.failed")
  end)

  -- A switch's mark left by a request that died is dropped by the checks
  -- once due. Read due, it could be replaced by a new switch's mark before
  -- the check's transaction ran, and that live mark was dropped: a CLOSED
  -- for the attempt (the new switch's own close) read before the switch
  -- is recorded then closed the payment (model.switching said no).
  it("a live switch's mark is not dropped as a dead one's", function()
    local p = gw:create{ amount = 200 }
    local no = p.id .. "_1"
    -- (the payment's own checks out of the way: only the attempt's runs)
    assert(gw.db:exec("UPDATE gw_payments SET checks = 1, next_check_at ="
                      .. " $2 WHERE id = $1", { p.id, os.time() + 3600 }))
    wait_lease()
    local release_lease = hold("SELECT token FROM paygate_leases WHERE"
                               .. " name = 'reconcile:payments'")
    -- a dead switch's mark, due
    assert(gw.db:exec("UPDATE gw_attempts SET close_check_at = $2 WHERE"
                      .. " out_trade_no = $1", { no, os.time() - 1 }))
    testing.wait_until(function()
      return waiting("SELECT token FROM paygate_leases") == 1
    end, 20, "the check dropping the mark to wait at its fence")
    -- a new switch marks the attempt; its close is held at WeChat until
    -- the spec has read the mark after the check's commit (the switch
    -- recorded only once its close answered)
    local h = sim:hold("close")
    local switch
    spawn(function()
      switch = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                       { channel = "native" })
    end)
    local function mark()
      local rows = assert(gw.db:query("SELECT state, close_check_at FROM"
        .. " gw_attempts WHERE out_trade_no = $1 AND (close_check_at IS"
        .. " NULL OR close_check_at > $2)", { no, os.time() }))
      return rows[1]
    end
    testing.wait_until(function() return mark() ~= nil end, 10,
                       "the new switch's mark")
    h:wait_held()                         -- the switch's close at WeChat
    release_lease()
    -- the check's transaction committed once the lease's row is free
    hold("SELECT token FROM paygate_leases WHERE"
         .. " name = 'reconcile:payments'")()
    local a = mark()
    h:release()
    assert.equal("open", a.state)          -- the switch not recorded yet
    assert.truthy(tonumber(a.close_check_at), "the new switch's mark was"
                  .. " dropped")
    testing.wait_until(function() return switch ~= nil end, 20,
                       "the switch to answer")
    sim:clear_faults()
    assert.equal(201, switch.status, switch.body)
  end)
end)
