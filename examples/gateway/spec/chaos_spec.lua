-- Chaos: the gateway killed with SIGKILL (master and workers at once) at
-- random points of a stream of payments while the simulator keeps
-- retrying its notifications on WeChat's schedule, time-scaled; started
-- again on the same port. Then every payment paid at the simulator is
-- paid locally exactly once, every audit chain verifies, every event
-- reached the webhook receiver at least once, and no transition was
-- applied twice. And the store (PostgreSQL) stopped mid-stream:
-- notifications are answered FAIL, none is acknowledged before its effect
-- committed, and the simulator's retries succeed once it is back.
--
-- The kill points come from a seeded generator; the seed is printed.
-- Re-run a failure with CHAOS_SEED=<seed>.
local testing = require "paygate.testing"
local core = require "paygate.core"
local audit = require "paygate.audit"
local servers = require "spec.support.servers"
local cluster = dofile("examples/gateway/spec/cluster_support.lua")

local seeded = dofile("examples/gateway/spec/seeded.lua")
local SEED = seeded.seed("CHAOS_SEED", "chaos_spec")

local N = 40           -- payments per stream
local KILLS = 4

local function gateway_opts(rcv)
  return {
    webhooks = { { url = rcv.url, secret_file = rcv.secret_file,
                   timeout = 1 } },
    reconcile = { enabled = false },   -- the simulator's retries alone
    -- a killed dispatcher's shards go to the new workers after lease_ttl
    dispatcher = { interval = 0.05, lease_ttl = 3, backoff_base = 0.05,
                   backoff_cap = 0.5 },
  }
end

-- Pays each order, `gap` seconds apart, in a task; returns a function
-- telling whether it is done.
local function pay_stream(sim, nos, gap)
  local done = false
  core.spawn(function()
    for _, no in ipairs(nos) do
      sim:pay(no)
      core.sleep(gap)
    end
    done = true
  end)
  return function() return done end
end

local function wait_delivered(sim, nos, timeout)
  local want = {}
  for _, no in ipairs(nos) do want[no] = true end
  local list
  testing.wait_until(function()
    list = sim:notifications{ event_type = "TRANSACTION.SUCCESS" }
    local n = 0
    for _, d in ipairs(list) do
      if want[d.out_trade_no] and d.state == "delivered" then n = n + 1 end
    end
    return n == #nos
  end, timeout, "every payment's notification acknowledged")
  local by_no = {}
  for _, d in ipairs(list) do
    if want[d.out_trade_no] then
      assert(by_no[d.out_trade_no] == nil, "two notifications of "
             .. d.out_trade_no)
      by_no[d.out_trade_no] = d
    end
  end
  return by_no
end

-- No (from, to) transition twice in a payment's audit trail.
local function assert_no_transition_twice(db, ids)
  for _, id in ipairs(ids) do
    local rows = assert(db:query("SELECT from_state, to_state FROM"
      .. " paygate_audit WHERE subject = $1 AND to_state IS NOT NULL",
      { "payment:" .. id }))
    local seen = {}
    for _, r in ipairs(rows) do
      local k = tostring(r.from_state) .. ">" .. tostring(r.to_state)
      assert(not seen[k], id .. ": transition " .. k .. " applied twice")
      seen[k] = true
    end
  end
end

local engines = { { "SQLite", function()
  local dir = testing.tmpdir()
  return "sqlite:" .. dir .. "/gw.db", dir
end } }
if servers.have_postgres() then
  engines[2] = { "PostgreSQL", function()
    return servers.postgres().url .. "?pool=6"
  end }
end

for _, engine in ipairs(engines) do
describe("gateway killed with SIGKILL on " .. engine[1], function()
  local sim, rcv, gw, dir

  setup(function()
    -- retries after 15 ms, 15 ms, 30 ms, 0.18 s, 0.6 s, 1.2 s, 1.8 s...
    sim = testing.simulator{ time_scale = 1000 }
    rcv = cluster.receiver()
    local url
    url, dir = engine[2]()
    gw = cluster.gateway(sim, { db = url, gateway = gateway_opts(rcv) })
    gw:start()
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    if dir then testing.server.rmdir(dir) end
    servers.stop_all()
  end)

  it("ends with every paid payment paid once and every event delivered",
     function()
    local rand = seeded.rng(SEED).float
    local ids, nos = {}, {}
    for i = 1, N do
      local p = gw:create{ amount = 200 + i }
      ids[i], nos[i] = p.id, p.out_trade_no
    end
    -- the schedule, drawn before anything else runs: kill k comes
    -- `extra` seconds after the at-th notification committed (so it lands
    -- inside a burst of deliveries: the listening socket outlives a
    -- worker's start, so a kill between requests is hardly noticed)
    local points = {}
    for k = 1, KILLS do
      points[k] = { at = math.floor(rand(k - 1, k) * (N - 4) / KILLS) + 1,
                    extra = rand(0, 0.02) }
    end
    local gap = rand(0.002, 0.01)
    local desc = {}
    for k, pt in ipairs(points) do
      desc[k] = ("%d+%.3fs"):format(pt.at, pt.extra)
    end
    print(("%s: %d payments paid %.3f s apart; SIGKILL after notification"
      .. " %s"):format(engine[1], N, gap, table.concat(desc, ", ")))
    local db = gw.db
    local function committed()
      local rows = assert(db:query("SELECT count(*) AS n FROM"
                                   .. " gw_notifications"))
      return tonumber(rows[1].n)
    end
    local stream_done = pay_stream(sim, nos, gap)
    local killed, down = 0, {}
    for k, pt in ipairs(points) do
      testing.proc.wait_until(function() return committed() >= pt.at end,
                              30, "notification " .. pt.at)
      core.sleep(pt.extra)
      local t0 = core.time()
      killed = killed + gw:kill9()
      gw:start()
      down[k] = ("%.2f"):format(core.time() - t0)
    end
    testing.wait_until(stream_done, 30, "the payment stream")
    local by_no = wait_delivered(sim, nos, 60)
    local failed = 0
    for _, d in pairs(by_no) do
      for _, a in ipairs(d.attempts) do
        if a.status ~= 200 and a.status ~= 204 then failed = failed + 1 end
      end
    end
    print(("%s: %d processes killed over %d restarts (down %s s); %d"
      .. " delivery attempts failed and were retried"):format(engine[1],
      killed, KILLS, table.concat(down, ", "), failed))

    cluster.assert_paid_once(db, ids)
    assert_no_transition_twice(db, ids)
    local ok, rep = audit.verify_all(db)
    assert(ok, "audit.verify_all: " .. tostring(rep and rep.message))
    assert.equal(0, #rep.broken)
    -- every event (payment.paying and payment.paid of each) reached the
    -- webhook receiver at least once
    local rows = cluster.wait_outbox_drained(db, 30)
    assert.equal(2 * N, #rows)
    local st = rcv.stats()
    local twice = 0
    for _, r in ipairs(rows) do
      local n = st.ok[tostring(r.id)] or 0
      assert(n >= 1, "event " .. r.id .. " (" .. r.type .. ") never"
             .. " accepted by the receiver")
      if n > 1 then twice = twice + 1 end
    end
    print(("%s: %d events, %d of them delivered more than once (at least"
      .. " once allows it)"):format(engine[1], #rows, twice))
  end)
end)
end

if not servers.have_postgres() then
  describe("gateway with its store stopped", function()
    pending("PostgreSQL is not installed")
  end)
  return
end

describe("gateway with its store (PostgreSQL) stopped mid-stream", function()
  local sim, rcv, gw, pg

  setup(function()
    pg = servers.postgres()
    sim = testing.simulator{ time_scale = 1000 }
    rcv = cluster.receiver()
    gw = cluster.gateway(sim, { db = pg.url .. "?pool=6",
                                gateway = gateway_opts(rcv) })
    gw:start()
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
    servers.stop_all()
  end)

  it("answers FAIL while it is down, acknowledges only what committed,"
     .. " recovers by itself", function()
    local rand = seeded.rng(SEED + 1).float
    local ids, nos = {}, {}
    for i = 1, N do
      local p = gw:create{ amount = 300 + i }
      ids[i], nos[i] = p.id, p.out_trade_no
    end
    local stop_at = math.floor(rand(0.2, 0.6) * N)
    local gap = rand(0.01, 0.03)
    local outage = rand(0.3, 1.0)
    print(("store stop: %d payments paid %.3f s apart; PostgreSQL stopped"
      .. " after notification %d, kept down %.2f s after the third failed"
      .. " delivery"):format(N, gap, stop_at, outage))
    local db = gw.db
    local stream_done = pay_stream(sim, nos, gap)
    testing.wait_until(function()
      local rows = assert(db:query("SELECT count(*) AS n FROM"
                                   .. " gw_notifications"))
      return tonumber(rows[1].n) >= stop_at
    end, 30, "notification " .. stop_at)
    local t_stop = core.time()
    pg.stop()
    local t_down = core.time()
    local ok, err = pcall(function()
      testing.wait_until(stream_done, 30, "the payment stream")
      testing.wait_until(function()
        local n = 0
        for _, d in ipairs(sim:notifications{
                             event_type = "TRANSACTION.SUCCESS" }) do
          for _, a in ipairs(d.attempts or {}) do
            if a.status and a.status >= 300 then n = n + 1 end
          end
        end
        return n >= 3
      end, 20, "three deliveries answered FAIL")
      core.sleep(outage)
    end)
    pg.start()
    local t_up = core.time()
    assert(ok, err)
    local by_no = wait_delivered(sim, nos, 60)
    assert.is_nil(gw.srv.proc:poll())        -- the same gateway recovered

    local failed, recovered, in_doubt = 0, 0, 0
    for i, no in ipairs(nos) do
      local d = by_no[no]
      local rows = assert(db:query("SELECT at FROM paygate_audit WHERE"
        .. " subject = $1 AND to_state = 'paid'", { "payment:" .. ids[i] }))
      assert(#rows == 1, ids[i] .. ": " .. #rows .. " entries to paid")
      local committed_ms = tonumber(rows[1].at)
      local first_ok
      for _, a in ipairs(d.attempts) do
        if a.status == 200 or a.status == 204 then
          first_ok = first_ok or a
        else
          -- answered FAIL (or cut off), and nothing was committed by
          -- it: the effect came after this attempt ended (`at` is taken
          -- before the send, so at + latency is no later than its end)
          assert(a.status == nil or a.status == 500, no .. ": answered "
                 .. tostring(a.status))
          assert(not first_ok, no .. ": a failure after an ack")
          local ended_ms = math.floor((a.at + (a.latency or 0)) * 1000)
          if committed_ms < ended_ms - 1 and a.at * 1000 > committed_ms + 1
          then
            -- sent after the commit: the retry of an attempt the stop left
            -- in doubt (counted below), answered FAIL while the store was
            -- still down (the duplicate cannot be looked up then), or
            -- within the pool's down_for (0.5 s) after a connect that
            -- failed just before it came back, noticed late on a slow
            -- machine
            assert(a.at <= t_up + 1.5, ("%s: attempt %s sent at %.3f s,"
                   .. " after its commit and after the store was back"
                   .. " (%.3f s), answered FAIL"):format(no, tostring(a.n),
                   a.at, t_up))
          elseif committed_ms < ended_ms - 1 then
            -- committed, yet answered FAIL: only when the stop cut the
            -- connection while its COMMIT was on the way (the driver's
            -- "connection lost (outcome unknown)"): the attempt was
            -- being answered when the store went down, and the commit
            -- came no later than the server stopped
            assert(a.at <= t_down and ended_ms >= math.floor(t_stop
                   * 1000) - 1 and committed_ms <= math.ceil(t_down
                   * 1000) + 1, ("%s: committed at %d ms, before attempt"
                   .. " %s (sent at %.3f s, status %s, error %s, latency"
                   .. " %s) ended, which was not in flight at the stop"
                   .. " (%.3f-%.3f s)"):format(no, committed_ms,
                   tostring(a.n), a.at, tostring(a.status),
                   tostring(a.error), tostring(a.latency), t_stop, t_down))
            in_doubt = in_doubt + 1
          end
          failed = failed + 1
        end
      end
      -- the acknowledgement came after the commit (done_at: when the
      -- simulator recorded the 2xx, after it arrived)
      assert(first_ok, no .. ": never acknowledged")
      assert(committed_ms <= math.ceil(d.done_at * 1000) + 1, no
             .. ": acknowledged before its commit")
      local n = assert(db:query("SELECT outcome FROM gw_notifications WHERE"
                                .. " id = $1", { d.id }))
      assert.equal("applied", n[1] and n[1].outcome)
      if #d.attempts > 1 then
        recovered = recovered + 1
        -- acknowledged once the store was back (pg_ctl's readiness poll
        -- may report it up to a few tenths late)
        assert(first_ok.at >= t_up - 0.5, no .. ": acknowledged while the"
               .. " store was down")
      end
    end
    assert.is_true(failed >= 3)
    assert.is_true(recovered >= 1)
    -- in doubt: no more than the pool's connections (6) at the stop
    assert(in_doubt <= 6, in_doubt .. " commits in doubt")
    print(("store stop: down %.2f s; %d attempts answered FAIL; %d"
      .. " notifications applied by a retry after the store came back; %d"
      .. " committed by an attempt the stop cut off (outcome unknown to"
      .. " the gateway: it answered FAIL)")
      :format(t_up - t_down, failed, recovered, in_doubt))
    cluster.assert_paid_once(db, ids)
    local rows = cluster.wait_outbox_drained(db, 30)
    assert.equal(2 * N, #rows)
    local st = rcv.stats()
    for _, r in ipairs(rows) do
      assert((st.ok[tostring(r.id)] or 0) >= 1, "event " .. r.id
             .. " never accepted by the receiver")
    end
  end)
end)
