-- Two gateway instances (two `paygate run` processes, 2 workers each) on
-- one PostgreSQL and one Redis. The simulator's notifications -- with
-- duplicates and some held back to arrive out of order -- go through the
-- notification tee, which hands each to one instance and the same signed
-- request at once to the other: both instances see every notification id,
-- interleaved and concurrently. Each payment must be applied exactly once
-- (one transition to paid in its audit chain, which verifies), and each
-- event delivered once per sink: once to the webhook receiver (some first
-- attempts refused, so retries are in play), once to the Redis stream, once
-- to the in-process hooks, with the dispatchers of both instances at work.
local testing = require "paygate.testing"
local redis = require "paygate.redis"
local core_lib = require "paygate.core"
local servers = require "spec.support.servers"
local cluster = dofile("examples/gateway/spec/cluster_support.lua")
local core = cluster.core

if not (servers.have_postgres() and servers.have_redis()) then
  describe("two gateway instances", function()
    pending("PostgreSQL and Redis are needed")
  end)
  return
end

local N = 40          -- payments
local STREAM = "gw:events"

describe("two gateway instances on one PostgreSQL and Redis", function()
  local rd, sim, rcv, tee, hooks_log, gws
  local c = cluster.cluster()

  setup(function()
    c.start{ stream = STREAM }
    rd, sim, rcv, tee = c.rd, c.sim, c.rcv, c.tee
    hooks_log, gws = c.hooks_log, c.gws
  end)

  teardown(function() c.stop() end)

  -- Each case sets the notification faults it wants: a fault without a
  -- count stays set, and one left by a case (or not used up when it
  -- failed) would change the next case's notifications.
  after_each(function() sim:clear_faults() end)

  local function check_sinks(rows)
    local retried, workers, instances = cluster.check_sinks(rows, {
      rcv = rcv, hooks_log = hooks_log, redis = rd.url, stream = STREAM })
    assert.is_true(retried > 0)
    assert.equal(2, instances)
    assert.is_true(workers >= 3)
    return retried, workers
  end

  -- The tee's records from index `from` on, once each has its copy and
  -- its replay answered: the primary, the copy and the replay all 204. returns: the records,
  -- and { [instance url] = 2xx answers }.
  local function check_tee(from)
    local log
    testing.wait_until(function()
      log = tee.log()
      for i = from, #log do
        if #log[i].copies == 0 or not log[i].again then return false end
      end
      return true
    end, 10, "the tee's copies answered")
    local ok_at, out = {}, {}
    for i = from, #log do
      local r = log[i]
      out[#out + 1] = r
      local c = r.copies[1]
      assert(r.status == 204, "primary answered " .. tostring(r.status))
      -- a copy to the other instance is 204 (applied there, or a
      -- duplicate of what the first committed)
      assert(c.status == 204, "copy to " .. c.target .. " answered "
             .. tostring(c.status) .. " " .. tostring(c.error))
      -- the same signed request again: a replay of an acknowledged one
      assert(r.again == 204, "replay to " .. r.primary .. " answered "
             .. tostring(r.again))
      ok_at[r.primary] = (ok_at[r.primary] or 0) + 1
      ok_at[c.target] = (ok_at[c.target] or 0) + 1
    end
    return out, ok_at
  end

  it("applies interleaved duplicate notifications once, dispatches each"
     .. " event once per sink", function()
    -- each notification delivered, then sent again twice (same id and
    -- body, new signature); a few held until a later one was delivered
    sim:fault{ endpoint = "notify", kind = "duplicate", times = 2 }
    sim:fault{ endpoint = "notify", kind = "out_of_order", count = 4 }
    local ids, nos = {}, {}
    for i = 1, N do
      local p = gws[i % 2 + 1]:create{ amount = 100 + i }
      ids[i], nos[i] = p.id, p.out_trade_no
    end
    for i = 1, N do sim:pay(nos[i]) end

    -- every notification delivered; every duplicate answered
    testing.wait_until(function()
      local list = sim:notifications{ event_type = "TRANSACTION.SUCCESS" }
      local done = 0
      for _, d in ipairs(list) do
        local dups = 0
        for _, a in ipairs(d.attempts or {}) do
          if a.duplicate and a.status then dups = dups + 1 end
        end
        if d.state == "delivered" and dups == 2 then done = done + 1 end
      end
      return done == N
    end, 30, "every notification delivered with its two duplicates")
    local db = gws[1].db
    cluster.assert_paid_once(db, ids)

    -- both instances answered deliveries of the same notification ids:
    -- the tee's copies to the other instance, and the simulator's
    -- duplicates, which the tee hands to the next instance in turn
    local log, ok_at = check_tee(1)
    local per_id = {}
    for _, r in ipairs(log) do
      per_id[r.id] = (per_id[r.id] or 0) + 1
    end
    local n_ids = 0
    for _, k in pairs(per_id) do
      n_ids = n_ids + 1
      assert.is_true(k >= 3)      -- the delivery and its two duplicates
    end
    assert.equal(N, n_ids)
    assert.is_true(ok_at[gws[1].srv:url("")] >= 3 * N)
    assert.is_true(ok_at[gws[2].srv:url("")] >= 3 * N)
    -- the gateway's own record: one applied per id, the rest duplicates
    local applied = assert(db:query("SELECT count(*) AS n FROM"
      .. " gw_notifications WHERE outcome = 'applied'"))
    assert.equal(N, tonumber(applied[1].n))

    -- events: payment.paying and payment.paid per payment
    local rows = cluster.wait_outbox_drained(db, 30)
    assert.equal(2 * N, #rows)
    local retried, workers = check_sinks(rows)
    print(("\n%d payments, %d notification deliveries through the tee,"
      .. " answered by the instances %d and %d times; %d events, %d retried"
      .. " by the webhook sink; hooks run in %d workers"):format(N, #log,
      ok_at[gws[1].srv:url("")], ok_at[gws[2].srv:url("")], #rows,
      retried, workers))
  end)

  it("applies interleaved duplicate refund notifications once, two"
     .. " refunds of one payment settled at once", function()
    local M = 12
    local db = gws[1].db
    local from = #tee.log() + 1
    -- each notification sent again twice, as in the case above
    sim:fault{ endpoint = "notify", kind = "duplicate", times = 2 }
    local ids, nos, amounts = {}, {}, {}
    for i = 1, M do
      local p = gws[i % 2 + 1]:create{ amount = 100 + i }
      ids[i], nos[i], amounts[i] = p.id, p.out_trade_no, p.amount
    end
    for i = 1, M do sim:pay(nos[i]) end
    testing.wait_until(function()
      local rows = assert(db:query("SELECT count(*) AS n FROM gw_payments"
        .. " WHERE state = 'paid' AND id = ANY(string_to_array($1, ','))",
        { table.concat(ids, ",") }))
      return tonumber(rows[1].n) == M
    end, 20, "the payments paid")
    -- two refunds per payment, one through each instance, settled at
    -- WeChat together: their notifications (each with two duplicates)
    -- reach both instances at once and move the same payment row
    local refunds = {}
    for i = 1, M do
      for k, amount in ipairs({ 40, amounts[i] - 40 }) do
        local res = gws[k]:call("POST", "/v1/payments/" .. ids[i]
                                .. "/refunds", { amount = amount })
        assert(res.status == 201, res.status .. " " .. res.body)
        refunds[#refunds + 1] = { id = res.json.id, payment = ids[i],
                                  no = res.json.out_refund_no }
      end
    end
    for _, r in ipairs(refunds) do sim:settle(r.no) end
    testing.wait_until(function()
      local done = 0
      for _, d in ipairs(sim:notifications{ event_type = "REFUND.SUCCESS" }) do
        local dups = 0
        for _, a in ipairs(d.attempts or {}) do
          if a.duplicate and a.status then dups = dups + 1 end
        end
        if d.state == "delivered" and dups == 2 then done = done + 1 end
      end
      return done == #refunds
    end, 30, "every refund notification delivered with its duplicates")
    local log, ok_at = check_tee(from)
    assert.is_true(#log >= 3 * (M + #refunds))

    local to = {}
    for _, r in ipairs(assert(db:query("SELECT subject, to_state FROM"
                                       .. " paygate_audit"))) do
      local k = r.subject .. ">" .. tostring(r.to_state)
      to[k] = (to[k] or 0) + 1
    end
    local audit = require "paygate.audit"
    for _, r in ipairs(refunds) do
      local row = assert(db:query("SELECT state FROM gw_refunds WHERE id ="
                                  .. " $1", { r.id }))[1]
      assert.equal("succeeded", row.state)
      assert.equal(1, to["refund:" .. r.id .. ">succeeded"])
      assert.is_true((audit.verify(db, "refund:" .. r.id)))
    end
    local want = { "payment.paying", "payment.paid", "refund.succeeded",
                   "payment.partially_refunded", "refund.succeeded",
                   "payment.refunded" }
    for i, id in ipairs(ids) do
      local p = assert(db:query("SELECT state, version, refunded FROM"
                                .. " gw_payments WHERE id = $1", { id }))[1]
      assert.equal("refunded", p.state)
      assert.equal(amounts[i], p.refunded)
      assert.equal(5, p.version)
      for _, st in ipairs({ "paid", "partially_refunded", "refunded" }) do
        assert(to["payment:" .. id .. ">" .. st] == 1, id .. ": "
               .. tostring(to["payment:" .. id .. ">" .. st])
               .. " transitions to " .. st)
      end
      local ok, rep = audit.verify(db, "payment:" .. id)
      assert(ok, rep and rep.message)
      local types = {}
      for j, e in ipairs(assert(db:query("SELECT type FROM paygate_outbox"
          .. " WHERE subject = $1 ORDER BY id", { id }))) do
        types[j] = e.type
      end
      assert.same(want, types)
    end
    local rows = cluster.wait_outbox_drained(db, 30)
    local retried, workers = check_sinks(rows)
    print(("%d payments with 2 refunds each: %d deliveries through the tee,"
      .. " answered %d and %d times; %d events in all, %d retried by the"
      .. " webhook sink; hooks in %d workers"):format(M, #log,
      ok_at[gws[1].srv:url("")], ok_at[gws[2].srv:url("")], #rows,
      retried, workers))
  end)

  -- Last: it leaves instance 2 dead.
  it("keeps every payment and event when one instance is killed with"
     .. " SIGKILL mid-stream", function()
    local M = 30
    local db = gws[1].db
    sim:fault{ endpoint = "notify", kind = "duplicate", times = 2 }
    local ids, nos = {}, {}
    for i = 1, M do
      local p = gws[i % 2 + 1]:create{ amount = 500 + i }
      ids[i], nos[i] = p.id, p.out_trade_no
    end
    local function count()
      local rows = assert(db:query("SELECT count(*) AS n FROM"
                                   .. " gw_notifications"))
      return tonumber(rows[1].n)
    end
    local before = count()
    local paying = true
    core_lib.spawn(function()
      for i = 1, M do
        sim:pay(nos[i])
        core_lib.sleep(0.01)
      end
      paying = false
    end)
    -- killed in the middle of the burst; the simulator's retries (and
    -- its duplicates) then reach the survivor through the tee, which
    -- answers 502 for the dead one. (A notification whose deliveries the
    -- round robin hands to the dead one k times in a row is acknowledged
    -- at its k-th retry: WeChat's schedule / 100 puts the 6th retry at
    -- 20.4 s, the 7th at 38.4 s, the 8th at 56.4 s, the 9th at 74.4 s)
    testing.wait_until(function() return count() >= before + M / 3 end,
                       20, "a third of the notifications")
    local killed = cluster.kill9(gws[2].srv)
    testing.wait_until(function() return not paying end, 20, "the stream")
    -- the deliveries not acknowledged yet (as JSON: what they met)
    local left
    local acked = pcall(testing.wait_until, function()
      left = {}
      for _, no in ipairs(nos) do
        local d = sim:notifications{ out_trade_no = no }[1]
        if not (d and d.state == "delivered") then
          left[#left + 1] = require("paygate.json").encode(d or { no = no })
        end
      end
      return #left == 0
    end, 90, "every notification acknowledged by the survivor")
    assert(acked, "not acknowledged by the survivor in 90 s:\n"
                  .. table.concat(left, "\n"))
    cluster.assert_paid_once(db, ids)
    -- the dead instance's shards pass to the survivor after lease_ttl;
    -- every event then reaches every sink at least once
    local rows = cluster.wait_outbox_drained(db, 30)
    local st = rcv.stats()
    local c = assert(redis.connect(rd.url))
    local in_stream = {}
    for _, e in ipairs(assert(c:call("XRANGE", STREAM, "-", "+"))) do
      for j = 1, #e[2], 2 do
        if e[2][j] == "id" then
          in_stream[e[2][j + 1]] = (in_stream[e[2][j + 1]] or 0) + 1
        end
      end
    end
    c:close()
    local runs = cluster.hook_runs(hooks_log)
    local twice = 0
    for _, r in ipairs(rows) do
      local k = tostring(r.id)
      assert((st.ok[k] or 0) >= 1, "event " .. k .. " not at the webhook")
      assert((in_stream[k] or 0) >= 1, "event " .. k .. " not in the stream")
      assert((runs.by_event[r.id] or 0) >= 1, "event " .. k .. " not hooked")
      if st.ok[k] > 1 or in_stream[k] > 1 or runs.by_event[r.id] > 1 then
        twice = twice + 1
      end
    end
    print(("one instance killed (%d processes) after %d notifications:"
      .. " %d payments paid once; %d events, %d delivered more than once"
      .. " to some sink (at least once allows it)"):format(killed, M / 3,
      M, #rows, twice))
  end)
end)
