-- The gateway's payment and refund checks through a WeChat outage: a
-- payment paid and a refund settled while WeChat's query endpoints fail
-- (500, then refused here by their open circuit breakers), their
-- notifications lost, end settled within a short, bounded while of
-- WeChat's return; the failed checks did not count as checks.
--
-- Before: each failed check -- a refusal of the open breaker, which sent
-- nothing, included -- counted as one of the row's checks (checks + 1)
-- and doubled its next wait, so after a long outage a payment whose
-- notification was lost waited up to reconcile.ceiling (1 h by default)
-- after WeChat was back: money taken, order not shown paid.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")

-- the warn lines "reconcile: check failed" whose error names `no` (the
-- query's path holds the out_trade_no or out_refund_no)
local function failed_checks(gw, no)
  local n = 0
  for line in (gw.srv:logs() or ""):gmatch("[^\n]+") do
    if line:find("reconcile: check failed", 1, true)
       and line:find(no, 1, true) then
      n = n + 1
    end
  end
  return n
end

local function checks(gw, tbl, id)
  local row = assert(gw.db:query("SELECT checks FROM " .. tbl
                                 .. " WHERE id = $1", { id }))[1]
  return tonumber(row.checks)
end

-- the sum of paygate_wechatpay_calls_total for endpoint ep and outcome
local function calls(gw, ep, outcome)
  local m = assert(gw.srv:admin_get("/metrics")).body
  local n = 0
  for line in m:gmatch("[^\n]+") do
    if line:find('endpoint="' .. ep .. '"', 1, true)
       and line:find('outcome="' .. outcome .. '"', 1, true) then
      n = n + tonumber(line:match(" (%d+)$"))
    end
  end
  return n
end

local QUERY = "GET /v3/pay/transactions/out-trade-no/{}"

describe("gateway reconciliation through a WeChat outage", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    -- time-scaled: a schedule from 0.5 s growing fourfold up to 120 s,
    -- and breakers that open after two failed calls, for 2 s (a failed
    -- check is tried again within 1.5 s: next_check_at is in whole
    -- seconds; the breaker refuses it, and it is tried again once its
    -- cool-down is over)
    gw = core.start(sim, {
      gateway = { reconcile = { check_after = 0.5, first = 0.5, factor = 4,
        ceiling = 120, interval = 0.1, bill = false } },
      merchant = { max_attempts = 1, breaker_min_calls = 2,
                   breaker_failure_ratio = 0.5, breaker_open_for = 2 } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("a payment and a refund settled during it end settled soon after;"
     .. " the failed checks did not count", function()
    local q = gw:create{ amount = 300 }
    sim:pay_and_wait(q.out_trade_no)
    gw:wait_state(q.id, "paid")
    -- WeChat's queries fail from now on
    sim:fault{ endpoint = "query", kind = "error", status = 500 }
    sim:fault{ endpoint = "refund_query", kind = "error", status = 500 }
    local p = gw:create{ amount = 200 }
    local r = gw:call("POST", "/v1/payments/" .. q.id .. "/refunds",
                      { amount = 100 })
    assert.equal(201, r.status, r.body)
    r = r.json
    -- paid and settled meanwhile, both notifications lost
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 2 }
    sim:pay(p.out_trade_no)
    sim:settle(r.out_refund_no, "SUCCESS")
    testing.wait_until(function()
      local a = sim:notifications{ out_trade_no = p.out_trade_no }[1]
      local b = sim:notifications{ out_refund_no = r.out_refund_no }[1]
      return a and a.state == "dropped" and b and b.state == "dropped"
    end, 10, "both notifications dropped")
    -- the outage: four checks of each failed at WeChat (500); between
    -- them the breakers refused the checks, sending nothing (not logged
    -- per row: the breaker said it opened)
    local N = 4
    testing.wait_until(function()
      return failed_checks(gw, p.out_trade_no) >= N
             and failed_checks(gw, r.out_refund_no) >= N
    end, 60, N .. " failed checks of the payment and of the refund")
    -- none of them counted as a check of the row
    assert.equal(0, checks(gw, "gw_payments", p.id))
    assert.equal(0, checks(gw, "gw_refunds", r.id))
    assert.equal("paying", gw:get(p.id).state)
    local m = assert(gw.srv:admin_get("/metrics")).body
    for _, ep in ipairs({ "GET /v3/pay/transactions/out-trade-no/{}",
                          "GET /v3/refund/domestic/refunds/{}" }) do
      local refused = 0
      for line in m:gmatch("[^\n]+") do
        if line:find('endpoint="' .. ep .. '"', 1, true)
           and line:find('outcome="circuit_open"', 1, true) then
          refused = refused + tonumber(line:match(" (%d+)$"))
        end
      end
      assert.is_true(refused > 0, ep .. " refused by its breaker: " .. m)
    end
    -- WeChat is back: within the breaker's cool-down (2 s) and a short
    -- retry (the schedule's next step, 0.5 s, jittered), not after a wait
    -- grown by each failure (0.5, 2, 8, 32 s, then the 120 s ceiling)
    sim:clear_faults()
    local t0 = require("paygate.core").mono()
    gw:wait_state(p.id, "paid", 6)
    testing.wait_until(function()
      return gw:call("GET", "/v1/refunds/" .. r.id).json.state
             == "succeeded"
    end, math.max(0.1, 6 - (require("paygate.core").mono() - t0)),
       "the refund settled")
    -- one check each: the answer that settled it
    assert.equal(1, checks(gw, "gw_payments", p.id))
    assert.equal(1, checks(gw, "gw_refunds", r.id))
    for _, n in ipairs({
        sim:notifications{ out_trade_no = p.out_trade_no }[1],
        sim:notifications{ out_refund_no = r.out_refund_no }[1] }) do
      assert.equal("dropped", n.state)
    end
  end)
  -- Before: every row the open breaker refused was rescheduled (one
  -- write each) and the runner, its batch full, started its next round at
  -- once: during a long outage every open row was written about once per
  -- cool-down, with nothing sent (10,000 open rows: ~250 writes/s).
  it("while the breaker stays open, the open rows are left untouched:"
     .. " about one write per probe, not one per row; all checked after",
     function()
    -- a spec table counting the writes of the payments' next checks
    assert(gw.db:exec("CREATE TABLE IF NOT EXISTS spec_writes"
                      .. " (id TEXT, at REAL)"))
    assert(gw.db:exec("DROP TRIGGER IF EXISTS spec_writes_pay"))
    assert(gw.db:exec("CREATE TRIGGER spec_writes_pay AFTER UPDATE OF"
      .. " next_check_at ON gw_payments BEGIN INSERT INTO spec_writes"
      .. " VALUES (new.id, julianday('now')); END"))
    local function writes()
      return tonumber(assert(gw.db:query(
        "SELECT count(*) AS n FROM spec_writes"))[1].n)
    end
    -- WeChat's queries fail from before the rows are due: none answered
    sim:fault{ endpoint = "query", kind = "error", status = 500 }
    local N = 30
    for i = 1, N do gw:create{ amount = 100 + i } end
    -- the breaker opens, and the probes after its cool-downs keep failing
    local fails0 = calls(gw, QUERY, "http_5xx")
    testing.wait_until(function()
      return calls(gw, QUERY, "circuit_open") > 0
             and calls(gw, QUERY, "http_5xx") >= fails0 + 2
    end, 30, "the query breaker open")
    local w0, f0 = writes(), calls(gw, QUERY, "http_5xx")
    local refused0 = calls(gw, QUERY, "circuit_open")
    -- three more cool-downs (2 s each), each ended by a failed probe
    testing.wait_until(function()
      return calls(gw, QUERY, "http_5xx") >= f0 + 3
    end, 30, "three failed probes")
    local probes = calls(gw, QUERY, "http_5xx") - f0
    local w = writes() - w0
    local refused = calls(gw, QUERY, "circuit_open") - refused0
    -- each probe's failure reschedules its row (one write); the rows the
    -- breaker refused are not written (was: each of the 30, each time)
    assert.is_true(w <= probes + 2, w .. " writes for " .. probes
      .. " probes and " .. refused .. " refusals, " .. N .. " open rows")
    -- nor were they asked: the first refused holds the merchant's queries
    -- for the cool-down left, the first due after it is the probe (rounds
    -- every 0.1 s here; was: every row due refused, each time)
    assert.is_true(refused <= 2 * probes + 4, refused .. " refusals for "
                   .. probes .. " probes")
    -- WeChat is back: every open row is checked soon (NOTPAY: a check)
    sim:clear_faults()
    testing.wait_until(function()
      local r = assert(gw.db:query("SELECT count(*) AS n FROM gw_payments"
        .. " WHERE checks = 0 AND state = 'paying'"))
      return tonumber(r[1].n) == 0
    end, 10, "every open row checked after the recovery")
    assert(gw.db:exec("DROP TRIGGER spec_writes_pay"))
  end)
end)
