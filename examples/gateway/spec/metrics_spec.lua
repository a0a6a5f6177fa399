-- examples/gateway: its counters on /metrics (fsm transitions, illegal
-- transitions, alarms) are paygate.metrics counters: one series each,
-- summed over the workers, with no per-worker label, and kept when a
-- worker is restarted.
local testing = require "paygate.testing"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

describe("gateway metrics", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = gwcore.start(sim, { workers = 2 })
  end)

  teardown(function()
    if gw then gw.srv:stop() gw:stop() end
    testing.stop_all()
  end)

  local function metrics()
    local res = gw.srv:admin_get("/metrics")
    return res and res.status == 200 and res.body or ""
  end

  local function transitions()
    return tonumber(metrics():match(
      '\npaygate_gateway_fsm_transitions_total{machine="payment"} (%d+)\n'))
  end

  -- was: these series appeared with their first count, at 1, and
  -- Prometheus sees no increase in a series' first sample: an alert on
  -- increase() of dead letters, alarms or payments settled without their
  -- notification stayed silent for the first one (until a second came)
  it("has every counter alerted on at 0 from the start", function()
    local mchid = sim.merchant.mchid
    local want = {
      'paygate_outbox_events_total{outbox="gateway",outcome="dead"}',
      'paygate_outbox_events_total{outbox="gateway",outcome="unrecorded"}',
      'paygate_gateway_alarms_total{kind="amount_mismatch"}',
      'paygate_gateway_alarms_total{kind="refund_failed"}',
      'paygate_gateway_settled_without_notification_total{merchant="'
        .. mchid .. '",kind="payment",source="reconcile"}',
      'paygate_gateway_settled_without_notification_total{merchant="'
        .. mchid .. '",kind="refund",source="refresh"}',
      'paygate_gateway_notification_after_query_total{merchant="'
        .. mchid .. '",kind="payment"}',
      'paygate_gateway_unknown_notifications_total{kind="payment"}',
      'paygate_gateway_unknown_notifications_total{kind="refund"}',
      'paygate_store_errors_total{engine="sqlite",kind="unavailable"}',
    }
    -- was: a refused notification's series appeared with its first
    -- count, so rate() saw nothing of the first one (a single
    -- merchant_mismatch: money of another merchant's order)
    for _, kind in ipairs{ "merchant_mismatch", "bad_signature",
                           "unknown_serial", "decrypt_failed",
                           "stale_timestamp", "malformed" } do
      want[#want + 1] = 'paygate_gateway_notifications_refused_total{merchant="'
        .. mchid .. '",kind="' .. kind .. '"}'
    end
    -- (the dispatcher publishes its outcomes once its task starts)
    local text = testing.wait_until(function()
      local t = metrics()
      return t:find(want[1], 1, true) and t
    end, 10, "the outbox's outcomes on /metrics")
    for _, series in ipairs(want) do
      assert.truthy(text:find("\n" .. series .. " 0\n", 1, true), series)
    end
  end)

  it("keeps the counts of a restarted worker, with no pid label", function()
    for i = 1, 3 do
      gw:create{ order_id = "m-" .. i }
    end
    -- each create: created (no transition), then paying
    local before = testing.wait_until(function()
      local n = transitions()
      return n and n >= 3 and n
    end, 15, "the transitions counted")
    local text = metrics()
    assert.not_matches('paygate_gateway_[%w_]*{[^}]*worker=', text)
    assert.matches("# TYPE paygate_gateway_fsm_transitions_total counter",
                   text, 1, true)
    assert.matches('\npaygate_gateway_fsm_illegal_transitions_total{machine='
                   .. '"refund"} %d+\n', text)
    -- each worker killed in turn (one of them counted the creates): the
    -- master restarts it, the counts stay
    local old = gw.srv:workers()
    assert.equal(2, #old)
    for _, victim in ipairs(old) do
      gw.srv:kill_worker(victim)
      assert.equal(before, transitions())
    end
    gw:create{ order_id = "m-4" }
    testing.wait_until(function()
      local n = transitions()
      return n and n >= before + 1
    end, 15, "the new worker's transitions added")
  end)

  it("counts the events by type: refunds succeeded, abnormal, closed, the"
     .. " payment refunded", function()
    -- was: nothing on /metrics counted them (only the fsm's transitions
    -- by machine, and deliveries when a sink took them): an abnormal
    -- refund, money owed to a payer until a person applies for it, could
    -- not be alerted on
    local function count(t)
      return tonumber(metrics():match('\npaygate_gateway_events_total{type="'
        .. t:gsub("%.", "%%.") .. '"} (%d+)\n'))
    end
    -- every type is there from the start, at 0 or more
    assert.is_number(count("refund.abnormal"))
    local before = {}
    for _, t in ipairs{ "payment.paid", "refund.succeeded", "refund.abnormal",
                        "refund.closed", "payment.partially_refunded" } do
      before[t] = count(t)
    end
    local p = gw:create{ order_id = "m-refunds", amount = 100 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    local rf = {}
    for i, st in ipairs{ "SUCCESS", "ABNORMAL", "CLOSED" } do
      local res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                          { amount = 10 })
      assert.equal(201, res.status, res.body)
      rf[i] = res.json
      sim:settle(res.json.out_refund_no, st)
      sim:wait_notification({ out_refund_no = res.json.out_refund_no,
                              event_type = "REFUND." .. st })
    end
    testing.wait_until(function()
      return count("refund.closed") == before["refund.closed"] + 1
    end, 15, "the events counted")
    for _, t in ipairs{ "payment.paid", "refund.succeeded", "refund.abnormal",
                        "refund.closed", "payment.partially_refunded" } do
      assert.equal(before[t] + 1, count(t), t)
    end
  end)

  -- was: the runtime's own metrics (requests, durations, workers,
  -- reloads, shared dictionaries, idempotency, ...) were in no table of
  -- the docs, and the docs had no alert rules to check against the names
  it("names every metric it shows in docs/gateway.md, and its alert rules"
     .. " name only metrics it shows", function()
    local f = assert(io.open("docs/gateway.md"))
    local doc = f:read("*a")
    f:close()
    local from = assert(doc:find("\n### Metrics and health\n", 1, true))
    local to = assert(doc:find("\n## On PostgreSQL\n", from, true))
    local section = doc:sub(from, to)
    local rules = assert(section:match("%*%*Alert rules%.%*%*.-```yaml\n"
                                       .. "(.-)```"), "the alert rules")
    -- a refused notification (its counter appears with the first one)
    gw.srv:request{ method = "POST", path = "/wechatpay/notify/"
      .. sim.merchant.mchid, body = "{}",
      headers = { ["Content-Type"] = "application/json" } }
    local families
    testing.wait_until(function()
      families = {}
      for name in metrics():gmatch("# TYPE (paygate_[%w_]+) ") do
        families[name] = true
      end
      return families.paygate_gateway_notifications_refused_total
        and families.paygate_reconcile_bill_failed
    end, 15, "the refusal and the bill job's gauge on /metrics")
    for name in pairs(families) do
      assert.truthy(section:find(name .. "[^%w_]"), name .. " documented")
    end
    local HIST = { _bucket = true, _sum = true, _count = true }
    for name in rules:gmatch("paygate_[%w_]+") do
      local base, suffix = name:match("^(.-)(_%a+)$")
      if not families[name] and HIST[suffix] then name = base end
      assert.truthy(families[name], name .. " (alert rules) on /metrics")
    end
  end)
end)

-- On call in a WeChat outage nothing on /metrics said the degradation
-- switch was on (a switch left on could not be alerted on), nor which
-- circuit breakers were open.
describe("gateway metrics of WeChat's health", function()
  local sim, gw
  local QUERY = "GET /v3/pay/transactions/out-trade-no/{}"
  local NATIVE = "POST /v3/pay/transactions/native"

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = gwcore.start(sim, { workers = 2,
      gateway = { reconcile = { enabled = false } },
      merchant = { max_attempts = 1, breaker_min_calls = 2,
                   breaker_failure_ratio = 0.5, breaker_open_for = 60 } })
  end)

  teardown(function()
    if gw then
      gw.srv:request{ method = "POST", path = "/admin/degrade",
        body = '{"on":false}',
        headers = { ["Content-Type"] = "application/json" } }
      gw:stop()
    end
    testing.stop_all()
  end)

  local function metrics()
    local res = gw.srv:admin_get("/metrics")
    return res and res.status == 200 and res.body or ""
  end

  -- the value of a series, waited for (the gauges are set every second)
  local function wait_value(series, want)
    local pat = "\n" .. series:gsub("%p", "%%%0") .. " (%S+)\n"
    return testing.wait_until(function()
      return tonumber(metrics():match(pat)) == want
    end, 10, series .. " = " .. want)
  end

  local function degrade(on)
    local res = gw.srv:request{ method = "POST", path = "/admin/degrade",
      body = '{"on":' .. tostring(on) .. "}",
      headers = { ["Content-Type"] = "application/json" } }
    assert.equal(200, res.status, res.body)
  end

  it("paygate_gateway_degraded follows the switch", function()
    assert.matches("# TYPE paygate_gateway_degraded gauge", metrics(), 1,
                   true)
    wait_value("paygate_gateway_degraded", 0)
    degrade(true)
    wait_value("paygate_gateway_degraded", 1)
    degrade(false)
    wait_value("paygate_gateway_degraded", 0)
  end)

  it("paygate_gateway_circuit_breaker_state: 0 closed, 1 open, per"
     .. " merchant and endpoint", function()
    local mchid = sim.merchant.mchid
    local function series(ep)
      return 'paygate_gateway_circuit_breaker_state{endpoint="' .. ep
             .. '",merchant="' .. mchid .. '"}'
    end
    local p = gw:create{}                       -- a prepay: its breaker
    wait_value(series(NATIVE), 0)
    -- WeChat fails every query: its breaker opens
    sim:fault{ endpoint = "query", kind = "error", status = 500 }
    testing.wait_until(function()
      gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=1")
      local u = gw.srv:request{ method = "GET", path = "/admin/upstream" }
      local e = u.json.merchants[mchid][QUERY]
      return e and e.breaker == "open"
    end, 30, "the query breaker open")
    wait_value(series(QUERY), 1)
    assert.equal(0, tonumber(metrics():match("\n" .. series(NATIVE):gsub(
      "%p", "%%%0") .. " (%S+)\n")))
    -- once each, whichever worker set it
    for _, ep in ipairs({ QUERY, NATIVE }) do
      local _, n = metrics():gsub("\n" .. series(ep):gsub("%p", "%%%0"), "")
      assert.equal(1, n, ep)
    end
    sim:clear_faults()
  end)
end)

-- Once an open breaker's cool-down was over the gauge still said 1 (open)
-- until a call probed: an alert kept firing after WeChat recovered,
-- though the next call would go through. It says 2 (half-open) then, as
-- GET /admin/upstream says "open" with retry_after 0 (the next call is
-- the probe). A short cool-down (real seconds: the breaker's clock).
describe("gateway metrics: a breaker past its cool-down", function()
  local sim, gw
  local QUERY = "GET /v3/pay/transactions/out-trade-no/{}"
  local OPEN_FOR = 2

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = gwcore.start(sim, { workers = 1,
      gateway = { reconcile = { enabled = false } },
      merchant = { max_attempts = 1, breaker_min_calls = 2,
                   breaker_failure_ratio = 0.5,
                   breaker_open_for = OPEN_FOR } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  local function gauge(series)
    local res = gw.srv:admin_get("/metrics")
    local body = res and res.status == 200 and res.body or ""
    return tonumber(body:match("\n" .. series:gsub("%p", "%%%0")
                               .. " (%S+)\n"))
  end

  local function breaker()
    local u = gw.srv:request{ method = "GET", path = "/admin/upstream" }
    return u.json.merchants[sim.merchant.mchid][QUERY]
  end

  it("says 2 (half-open) once a probe may go, 0 once it is answered",
     function()
    local series = 'paygate_gateway_circuit_breaker_state{endpoint="'
      .. QUERY .. '",merchant="' .. sim.merchant.mchid .. '"}'
    local p = gw:create{}
    sim:fault{ endpoint = "query", kind = "error", status = 500 }
    testing.wait_until(function()
      gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=1")
      local e = breaker()
      return e and e.breaker == "open"
    end, 30, "the query breaker open")
    -- no call meanwhile: the cool-down passes, nothing probes
    testing.wait_until(function() return gauge(series) == 2 end,
                       OPEN_FOR + 10, series .. " = 2 after the cool-down")
    local e = breaker()
    assert.equal("open", e.breaker)          -- nothing probed yet
    assert.equal(0, e.retry_after)           -- the next call is the probe
    -- WeChat is back: the next call probes, is answered, closes it
    sim:clear_faults()
    local res = gw:call("GET", "/v1/payments/" .. p.id .. "?refresh=1")
    assert.equal(200, res.status, res.body)
    assert.equal("closed", breaker().breaker)
    testing.wait_until(function() return gauge(series) == 0 end, 10,
                       series .. " = 0 once the probe was answered")
  end)
end)

-- The monitoring trial: with the webhook receiver down, events piled up
-- (pending, retrying) and nothing on /metrics said how many or how old
-- the oldest was, nor how many dead letters waited for a replay (the
-- outcome counter says how many died since the start, not how many are
-- left); and with the store down the notification route answered FAIL
-- while no metric said the store failed. On PostgreSQL, two workers: the
-- backlog gauges are the table's, shown once (not once per worker, not
-- summed); the store's errors a counter summed over the workers.
describe("gateway metrics of the outbox backlog and the store", function()
  local servers = require "spec.support.servers"
  if not servers.have_postgres() then
    pending("PostgreSQL is not installed")
    return
  end
  local sim, gw, pg, rcv

  setup(function()
    pg = servers.postgres()
    sim = testing.simulator{ time_scale = 100 }
    rcv = gwcore.receiver()
    gw = gwcore.start(sim, { workers = 2, db = function() return pg.url end,
      gateway = { reconcile = { enabled = false },
        webhooks = { { url = rcv:url("/hook"),
                       secret_file = rcv.secret_file } },
        dispatcher = { interval = 0.05, backlog_interval = 0.2,
                       backoff_base = 0.2, backoff_cap = 0.5 } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  local function metrics()
    local res = gw.srv:admin_get("/metrics")
    return res and res.status == 200 and res.body or ""
  end

  local function value(text, series)
    return tonumber(text:match("\n" .. series:gsub("%p", "%%%0")
                               .. " (%S+)\n"))
  end

  local PENDING = 'paygate_outbox_pending_events{outbox="gateway"}'
  local AGE = 'paygate_outbox_oldest_pending_age_seconds{outbox="gateway"}'
  local DEAD = 'paygate_outbox_dead_events{outbox="gateway"}'

  local function mode(status)
    local res = rcv:request{ method = "POST", path = "/mode",
                             body = tostring(status) }
    assert.equal(204, res.status)
  end

  it("shows the events not delivered, the oldest one's age and the dead"
     .. " letters left, once each", function()
    local pending = function() return value(metrics(), PENDING) end
    testing.wait_until(function() return pending() == 0 end, 15,
                       PENDING .. " = 0 at the start")
    mode(500)                              -- the receiver fails: retried
    local p = gw:create{}                  -- payment.paying, not delivered
    local text = testing.wait_until(function()
      local t = metrics()
      return (value(t, PENDING) or 0) >= 1 and (value(t, AGE) or 0) > 0
             and t
    end, 15, "the event pending on /metrics, with an age")
    assert.equal(0, value(text, DEAD))
    -- shown once, whichever worker read it last (the table's count, not
    -- each worker's: never summed)
    for _, series in ipairs({ PENDING, AGE, DEAD }) do
      local _, n = text:gsub("\n" .. series:gsub("%p", "%%%0") .. " ", "")
      assert.equal(1, n, series)
    end
    assert.matches("# TYPE paygate_outbox_pending_events gauge", text, 1,
                   true)
    -- the receiver refuses it (400): a dead letter, nothing pending
    mode(400)
    testing.wait_until(function()
      local t = metrics()
      return value(t, DEAD) == 1 and value(t, PENDING) == 0
             and value(t, AGE) == 0
    end, 15, DEAD .. " = 1, nothing pending")
    local rows = assert(gw.db:query("SELECT state FROM paygate_outbox"
      .. " WHERE subject = $1", { p.id }))
    assert.equal("dead", rows[1].state)
    -- replayed and delivered: no dead letter left
    mode(204)
    assert(require("paygate.outbox").replay(gw.db, { subject = p.id }))
    testing.wait_until(function()
      local t = metrics()
      return value(t, DEAD) == 0 and value(t, PENDING) == 0
    end, 15, "the replayed event delivered, no dead letter left")
  end)

  it("counts the store's failures by kind while PostgreSQL is down",
     function()
    local series = 'paygate_store_errors_total{engine="postgres",kind='
                   .. '"unavailable"}'
    -- there from the start, at 0 or more (an increase() alert sees the
    -- first)
    local before = value(metrics(), series)
    assert.is_number(before, series)
    pg.stop()
    -- the dispatcher's rounds fail (no request needed), each counted
    local ok, err = pcall(testing.wait_until, function()
      return (value(metrics(), series) or 0) > before
    end, 30, series .. " counting")
    pg.start()
    assert(ok, err)
    -- the store back: the gateway serves again
    testing.wait_until(function()
      return gw:call("GET", "/v1/payments/pay_none").status == 404
    end, 30, "the merchant API served again")
  end)
end)
