-- paygate.outbox: the shard leases' ttl is measured (paygate.lease's
-- ttl_for of the recorded delivery durations), with lease_ttl as the
-- initial value and the floor, lease_ttl_max as the ceiling.
local core = require "paygate.core"
local sql = require "paygate.sql"
local lease = require "paygate.lease"
local outbox = require "paygate.outbox"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
local n = 0

teardown(function()
  servers.sh("rm -rf " .. tmp)
end)

local function store()
  n = n + 1
  local db = assert(sql.open("sqlite:" .. tmp .. "/t" .. n .. ".db"))
  assert(outbox.setup(db))
  return db
end

-- the shard leases (not the pruner's)
local function lease_rows(db)
  return assert(db:query("SELECT name, expires_at FROM paygate_leases WHERE"
                         .. " name LIKE 'outbox:%:2:%'"))
end

describe("outbox lease ttl", function()
  it("starts at lease_ttl and follows the measured deliveries", function()
    local db = store()
    local name = "ttl" .. n .. "_" .. math.random(1e9)
    local got = {}
    local d = outbox.dispatcher(db, { name = name, partitions = 2,
      lease_ttl = 5, lease_ttl_max = 100,
      sinks = { { name = "s", deliver = function(ev)
        got[#got + 1] = ev.id
        return true
      end } } })
    assert.equal(5, d:lease_ttl_now())
    d:step()
    local rows = lease_rows(db)
    assert.equal(2, #rows)
    for _, r in ipairs(rows) do
      assert.near(core.time() + 5, r.expires_at, 1)
    end
    -- deliveries are measured under the dispatcher's name
    assert(db:transaction(function(tx)
      for i = 1, 3 do
        assert(outbox.enqueue(tx, { subject = "s" .. i, type = "t",
                                    payload = { i = i } }))
      end
      return true
    end))
    d:step()
    assert.equal(3, #got)
    assert.equal(3, lease.durations("outbox:" .. name .. ":delivery").samples)
    -- slow deliveries (as a receiver taking 8 s each would record): the
    -- ttl grows past lease_ttl, and renewals carry it to the leases
    for _ = 1, 30 do
      lease.measure("outbox:" .. name .. ":delivery", 8)
    end
    local ttl = d:lease_ttl_now()
    assert.is_true(ttl >= 2 * 8 * 1.5, "ttl " .. ttl)
    assert.is_true(ttl <= 100, "ttl " .. ttl)
    for _, l in pairs(d.leases) do
      l.deadline = core.mono() + 1     -- past half: renewed this round
    end
    d:step()
    for _, l in pairs(d.leases) do
      assert.equal(ttl, l.ttl)
    end
    for _, r in ipairs(lease_rows(db)) do
      assert.near(core.time() + ttl, r.expires_at, 1)
    end
    -- the ceiling holds
    for _ = 1, 100 do
      lease.measure("outbox:" .. name .. ":delivery", 500)
    end
    assert.equal(100, d:lease_ttl_now())
    d:stop()
    assert.equal(0, #assert(db:query("SELECT name FROM paygate_leases WHERE"
      .. " name LIKE 'outbox:%' AND expires_at > $1", { core.time() })))
  end)

  it("renews on time after the wall clock steps back an hour (NTP, a VM"
     .. " resumed): how much of a lease is left is monotonic", function()
    local db = store()
    local d = outbox.dispatcher(db, { name = "step" .. n, partitions = 2,
      lease_ttl = 0.4, lease_ttl_max = 0.4,
      sinks = { { name = "s", deliver = function() return true end } } })
    d:step()
    assert.equal(2, #lease_rows(db))
    local time, now = core.time, core.now
    core.time = function() return time() - 3600 end
    core.now = function() return now() - 3600 end
    local renewed
    local ok, err = pcall(function()
      local deadline = core.mono() + 3
      repeat
        require("paygate").sleep(0.05)
        d:step()
        renewed = true
        for _, r in ipairs(lease_rows(db)) do
          -- renewed: its expiry was written from the stepped clock
          if r.expires_at > time() - 1800 then renewed = false end
        end
      until renewed or core.mono() > deadline
    end)
    core.time, core.now = time, now
    d:stop()
    assert(ok, err)
    assert.is_true(renewed, "the shard leases were left to lapse")
  end)

  it("refuses a bad lease_ttl_max", function()
    assert.has_error(function()
      outbox.dispatcher(store(), { lease_ttl_max = 0, sinks = {
        { name = "s", deliver = function() return true end } } })
    end, "outbox.dispatcher: opts.lease_ttl_max must be a positive number"
         .. " (at most 1e8)")
  end)
end)
