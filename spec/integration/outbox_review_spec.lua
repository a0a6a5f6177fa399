-- paygate.outbox: what a review found (each case failed before its fix): a
-- 2xx answer whose body is slow is still delivered; on PostgreSQL a
-- subject's events go out in id order even when their transactions commit
-- out of order; two dispatchers never deliver one event at once while a
-- delivery outlasts half the lease.
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local outbox = require "paygate.outbox"
local servers = require "spec.support.servers"
local proc = require "paygate.testing.proc"
local kit = require "support.outbox_kit"
local slow_http = require "support.slow_http"
local wait_until, enqueue = kit.wait_until, kit.enqueue

local tmp = servers.mktemp()
local n = 0
teardown(function()
  proc.stop_all()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local function sqlite()
  n = n + 1
  return assert(sql.open("sqlite:" .. tmp .. "/r" .. n .. ".db"))
end

local function row(db, id)
  return assert(outbox.list(db, { id = id }))[1]
end

local lines = slow_http.lines

local function receiver(mode)
  return slow_http.start(tmp, mode)
end

describe("outbox", function()
  it("a webhook that answered 2xx is delivered, however slowly its"
     .. " (discarded) body comes", function()
    local port, log = receiver("drip")
    local db = sqlite()
    local d = outbox.dispatcher(db, { sinks = {
      outbox.webhook{ url = "http://127.0.0.1:" .. port .. "/hook",
                      secret = "s3cret", timeout = 2 } } })
    local id = enqueue(db, "pay_drip", "payment.paid")
    assert.equal(1, d:step())
    wait_until(function() return #lines(log) >= 2 end, 5, "the request")
    local r = row(db, id)
    assert.equal("delivered", r.state, "last_error: " .. tostring(r.last_error))
    d:stop()
    db:close()
  end)

  it("on PostgreSQL, events of one subject are delivered in id order even"
     .. " when their transactions commit out of order", function()
    if not servers.have_postgres() then
      pending("no PostgreSQL")
      return
    end
    local pg = servers.postgres()
    local db = assert(sql.open(pg.url))
    assert(outbox.setup(db))
    local first, go = nil, false
    local t1 = paygate.spawn(function()
      return db:transaction(function(tx)
        first = assert(outbox.enqueue(tx, { subject = "pay_o",
                                            type = "payment.paying" }))
        wait_until(function() return go end, 20, "go")
        return true
      end)
    end)
    wait_until(function() return first ~= nil end, 10, "the first enqueue")
    -- a later change of the same subject, in a transaction that commits
    -- first (or, once fixed, waits for the first's commit)
    local second
    local t2 = paygate.spawn(function()
      second = enqueue(db, "pay_o", "payment.paid")
      return true
    end)
    wait_until(function()
      if second then return true end
      local r = assert(db:query("SELECT count(*) AS n FROM pg_locks WHERE"
                                .. " locktype = 'advisory' AND NOT granted"))
      return tonumber(r[1].n) > 0
    end, 10, "the second enqueue to commit or wait")
    local got = {}
    local d = outbox.dispatcher(db, { partitions = 1, sinks = {
      function(event) got[#got + 1] = event.id end } })
    d:step()
    go = true
    assert(t1:wait())
    assert(t2:wait())
    assert.truthy(second > first)
    d:step()
    d:step()
    assert.same({ first, second }, got)
    d:stop()
    db:close()
  end)

  it("two dispatchers never deliver one event at the same time when each"
     .. " sink answers well within the lease ttl", function()
    local db = sqlite()
    local inflight, most, calls = 0, 0, 0
    -- two receivers, each answering in 35% of the lease ttl (as two
    -- webhooks answering in 10.5 s under the default lease_ttl of 30 s).
    -- A renewal comes when less than half of the ttl is left, checked
    -- every eighth of it: a stall of the whole process longer than 3/8 of
    -- the ttl can let b take the shard while a still delivers. That was
    -- 0.75 s of a 2 s ttl, too close for a loaded CI run; 1.5 s of 4 s.
    local function slow(name)
      return { name = name, deliver = function()
        calls = calls + 1
        inflight = inflight + 1
        most = math.max(most, inflight)
        paygate.sleep(1.4)
        inflight = inflight - 1
      end }
    end
    local sinks = { slow("webhook1"), slow("webhook2") }
    local a = outbox.dispatcher(db, { sinks = sinks, partitions = 1,
                                      lease_ttl = 4 })
    local b = outbox.dispatcher(db, { sinks = sinks, partitions = 1,
                                      lease_ttl = 4 })
    assert.equal(0, a:step())                 -- a takes the shard
    local la = assert(a.leases[0])
    -- a's next round starts with just over half its lease left (no
    -- renewal): without one during the round, the lease would end in the
    -- second delivery
    wait_until(function() return core.time() >= la.expires_at - 2.2 end, 10,
               "the next round")
    enqueue(db, "pay_l", "payment.paid")
    local a_done = false
    local ta = paygate.spawn(function()
      local n = a:step()
      a_done = true
      return n
    end)
    wait_until(function() return calls >= 1 end, 10, "a to deliver")
    -- b, a standby worker, takes the shard once a's lease expired; it
    -- tries for as long as a delivers (only then could both deliver)
    local tb = paygate.spawn(function()
      local deadline = core.time() + 30
      while not a_done and core.time() < deadline do
        if b:step() > 0 then return true end
        paygate.sleep(0.05)
      end
    end)
    ta:wait()
    tb:wait()
    assert.equal(1, most, "deliveries of one event in flight at once")
    a:stop()
    b:stop()
    db:close()
  end)
end)
