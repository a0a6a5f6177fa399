-- paygate.outbox against a hostile world: what an audit of event delivery
-- found (each case failed before its fix). A store that refuses the
-- outcomes' writes must not turn the dispatcher into a hot loop that
-- delivers the same head to the receivers thousands of times a second; a
-- Redis that refuses the stream sink's password at its first connect is
-- retried like the same refusal on a later command, not dead-lettered.
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local outbox = require "paygate.outbox"
local servers = require "spec.support.servers"
local kit = require "support.outbox_kit"
local wait_until, enqueue = kit.wait_until, kit.enqueue

local tmp = servers.mktemp()
local n = 0
teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local function sqlite()
  n = n + 1
  return assert(sql.open("sqlite:" .. tmp .. "/h" .. n .. ".db"))
end

local function row(db, id)
  return assert(outbox.list(db, { id = id }))[1]
end

describe("outbox dispatcher", function()
  it("a store that refuses the outcomes' writes slows the rounds down"
     .. " (interval, doubling): no hot loop of deliveries", function()
    local db = sqlite()
    local got = 0
    local d = outbox.dispatcher(db, { interval = 0.1, sinks = {
      { name = "s", deliver = function() got = got + 1 end } } })
    assert.equal(0, d:step())               -- the table, the leases
    local id = enqueue(db, "pay_hot", "payment.paid")
    -- every write job fails (disk full, a read-only standby); reads work
    db.atomic = function()
      return nil, paygate.error("io", "disk I/O error")
    end
    local t0 = core.mono()
    d:start()
    wait_until(function() return got >= 4 end, 10, "4 deliveries")
    local took = core.mono() - t0
    -- the three waits between them: 0.1 + 0.2 + 0.4 s (before: 4
    -- deliveries in a few ms, ~14,000 a second)
    assert.is_true(took >= 0.65, ("4 deliveries in %.3f s"):format(took))
    assert.is_true(got <= 5, got .. " deliveries")
    assert.equal(0, d.stats.delivered)
    assert.equal("pending", row(db, id).state)
    -- the store back: the event is recorded delivered
    db.atomic = nil                         -- the method again
    wait_until(function() return d.stats.delivered == 1 end, 15,
               "the delivery recorded")
    assert.equal("delivered", row(db, id).state)
    d:stop()
    db:close()
  end)
end)

describe("outbox.redis_stream", function()
  it("a password Redis refuses at the first connect is retried with"
     .. " backoff, as on a later command, not dead-lettered", function()
    local srv = servers.redis{ requirepass = "right_pw" }
    local db = sqlite()
    local d = outbox.dispatcher(db, { max_attempts = 5, sinks = {
      outbox.redis_stream{ url = "redis://127.0.0.1:" .. srv.port,
                           connect = { password = "old_pw" } } } })
    local id = enqueue(db, "pay_pw", "payment.paid")
    assert.equal(1, d:step())
    local r = row(db, id)
    assert.equal("pending", r.state, "last_error: " .. tostring(r.last_error))
    assert.equal(1, r.attempts)
    assert.truthy(r.last_error:find("WRONGPASS", 1, true), r.last_error)
    -- never the password in the stored error
    assert.is_nil(r.last_error:find("old_pw", 1, true))
    d:stop()
    db:close()
  end)
end)
