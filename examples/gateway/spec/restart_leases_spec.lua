-- examples/gateway: a graceful stop releases the outbox leases
-- (paygate.on_stop -> the dispatcher's stop), so after a restart events
-- are delivered at once, not once the old leases' ttl (30 s) ran out; and
-- the reconciliation runners' leases (held from round to round), so that
-- a reload or a restart does not pause the checks for up to their ttl;
-- and the lease of a retention pass the stop cut off.
local testing = require "paygate.testing"
local core = require "paygate.core"
local outbox = require "paygate.outbox"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

describe("gateway restart", function()
  local sim, rcv, dir

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    rcv = gwcore.receiver()
    dir = testing.tmpdir()
  end)

  teardown(function()
    testing.stop_all()
    if dir then testing.server.rmdir(dir) end
  end)

  local function start()
    return gwcore.start(sim, {
      db = function() return "sqlite:" .. dir .. "/gw.db" end,
      gateway = { webhooks = { { url = rcv:url("/hook"),
                                 secret_file = rcv.secret_file } },
                  dispatcher = { interval = 0.05, lease_ttl = 30 } } })
  end

  -- The leases' rows; none while the lease table is not made yet (the
  -- first lease taken makes it: a query before that, on a loaded
  -- machine, found "no such table: paygate_leases" and failed the wait).
  local function leases(db, q, params)
    local rows, err = db:query(q, params)
    if not rows and tostring(err):find("no such table", 1, true) then
      return {}
    end
    return assert(rows, err)
  end

  local function live_leases(db)
    return #leases(db, "SELECT name FROM paygate_leases WHERE name"
      .. " LIKE 'outbox:gateway:%' AND expires_at > $1", { core.time() })
  end

  it("delivers events at once after a graceful restart", function()
    local gw = start()
    testing.wait_until(function() return live_leases(gw.db) > 0 end, 10,
                       "the dispatcher to take its leases")
    assert.equal(0, gw.srv:stop(15, true))
    assert.equal(0, live_leases(gw.db))
    -- an event committed while the gateway was down
    assert(gw.db:transaction(function(tx)
      return outbox.enqueue(tx, { subject = "pay_restart", type =
        "payment.paid", payload = { type = "payment.paid" } })
    end))
    gw:stop()
    local t0 = core.mono()
    local gw2 = start()
    testing.wait_until(function()
      for _, ev in ipairs(rcv:request("/got").json) do
        if ev.subject == "pay_restart" then return true end
      end
    end, 10, "the event delivered within 10 s (the old leases' ttl is 30 s)")
    assert.is_true(core.mono() - t0 < 15)
    gw2.srv:stop()
    gw2:stop()
  end)

  it("gives back the reconciliation leases on a graceful stop", function()
    local gw = start()
    local function reconcile_leases()
      local rows = leases(gw.db, "SELECT name FROM paygate_leases"
        .. " WHERE name LIKE 'reconcile:%' AND expires_at > $1",
        { core.time() })
      local names = {}
      for _, r in ipairs(rows) do names[#names + 1] = r.name end
      table.sort(names)
      return names
    end
    testing.wait_until(function() return #reconcile_leases() >= 2 end, 15,
                       "the reconciliation runners to take their leases")
    assert.equal(0, gw.srv:stop(15, true))
    assert.same({}, reconcile_leases())
    gw:stop()
  end)

  it("gives back the retention lease of a pass a graceful stop cut off",
     function()
    -- before: the runner was not stopped; the pass's lease stayed held
    -- for its ttl (120 s at first, up to 900) and the next workers and
    -- instances skipped their passes meanwhile
    local gw = gwcore.start(sim, {
      db = function() return "sqlite:" .. dir .. "/ret.db" end,
      gateway = { retention = { delay = 0.1, interval = 0.2, batch = 1,
        pause = 0.5, tables = { { table = "spec_rows", column = "at",
                                  max_age = 60 } } } } })
    -- made once the runner runs (a missing table is picked up later):
    -- 200 rows past their age, one per statement, half a second apart
    assert(gw.db:exec_script("CREATE TABLE spec_rows (id INTEGER PRIMARY"
                             .. " KEY, at DOUBLE PRECISION NOT NULL)"))
    assert(gw.db:transaction(function(tx)
      for i = 1, 200 do
        assert(tx:exec("INSERT INTO spec_rows (id, at) VALUES ($1, $2)",
                       { i, core.time() - 3600 }))
      end
    end))
    local function held()
      return #leases(gw.db, "SELECT name FROM paygate_leases WHERE"
        .. " name = 'retention:default' AND expires_at > $1",
        { core.time() })
    end
    testing.wait_until(function()
      return held() == 1 and tonumber(assert(gw.db:query(
        "SELECT COUNT(*) AS n FROM spec_rows"))[1].n) < 200
    end, 15, "a retention pass to be pruning spec_rows")
    assert.equal(0, gw.srv:stop(15, true))
    assert.equal(0, held())
    assert.is_true(tonumber(assert(gw.db:query(
      "SELECT COUNT(*) AS n FROM spec_rows"))[1].n) > 0)
    gw:stop()
  end)
end)
