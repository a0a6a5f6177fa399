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

describe("outbox dispatcher, the store refusing writes for real", function()
  -- Another process holds SQLite's write lock: every write of the
  -- dispatcher's (outcomes and leases alike) fails busy; reads go on.
  -- Each delivery whose outcome cannot be written is a duplicate for the
  -- receiver. Was: the head delivered again every round (the pause
  -- doubling up to 10 s) for as long as the shard's lease lasted; now the
  -- rounds deliver nothing until a write goes through, and once the lock
  -- is let go the event is delivered once more and recorded.
  it("pauses deliveries after an outcome it could not write, until the"
     .. " store takes writes", function()
    local proc = require "support.proc"
    n = n + 1
    local path = tmp .. "/locked" .. n .. ".db"
    local db = assert(sql.open("sqlite:" .. path, { busy_timeout = 100 }))
    local got = 0
    local d = outbox.dispatcher(db, { interval = 0.05, sinks = {
      { name = "s", deliver = function() got = got + 1 end } } })
    assert.equal(0, d:step())               -- the table, the leases
    local id = enqueue(db, "pay_locked", "payment.paid")
    local flag, release = path .. ".locked", path .. ".release"
    local script = tmp .. "/locker" .. n .. ".lua"
    proc.write(script, ([[
local sql, core = require "paygate.sql", require "paygate.core"
local db = assert(sql.open("sqlite:" .. %q))
assert(db:transaction(function(tx)
  assert(tx:exec("CREATE TABLE IF NOT EXISTS lock_holder (x INTEGER)"))
  assert(tx:exec("INSERT INTO lock_holder VALUES (1)"))
  local f = io.open(%q, "w"); f:write("locked"); f:close()
  local deadline = core.mono() + 60
  local function released()
    local r = io.open(%q)
    if r then r:close() end
    return r ~= nil
  end
  while not released() and core.mono() < deadline do core.sleep(0.01) end
  return true
end))
db:close()
]]):format(path, flag, release))
    local locker = proc.spawn({ PAYGATE_BIN, "exec", script },
                              { log = tmp .. "/locker" .. n .. ".out" })
    wait_until(function() return proc.read(flag) == "locked" end, 20,
               "the other process holding the write lock")
    d:start()
    wait_until(function() return got >= 1 end, 20, "the first delivery")
    -- then rounds in which the store keeps refusing writes
    local rounds = d.stats.rounds
    wait_until(function() return d.stats.rounds >= rounds + 4 end, 30,
               "four more rounds")
    assert.equal(1, got)          -- (was: one delivery each round)
    assert.equal(0, d.stats.delivered)
    assert.equal("pending", row(db, id).state)
    -- the lock let go: delivered once more (the unrecorded one was a
    -- duplicate nothing can prevent) and recorded
    proc.write(release, "")
    assert.equal(0, locker:wait(20))
    wait_until(function() return d.stats.delivered == 1 end, 30,
               "the delivery recorded")
    assert.equal(2, got)
    assert.equal("delivered", row(db, id).state)
    d:stop()
    db:close()
  end)
end)

describe("paygate_outbox_events_total", function()
  it("counts the outcomes per outbox: delivered, failed, dead,"
     .. " unrecorded", function()
    local metrics = require "paygate.metrics"
    local c = metrics.counter("paygate_outbox_events_total",
      "Outbox deliveries by outcome: delivered, failed (retried later),"
      .. " dead, fenced, unrecorded (the store failed).",
      { "outbox", "outcome" }, { max_series = 64 })
    local function count(outcome)
      return c:get({ outbox = "counted", outcome = outcome }) or 0
    end
    local db = sqlite()
    local verdict = {}
    -- (a backoff of about a minute, without jitter: pay_again is not due
    -- again in the second step, however slow the machine)
    local d = outbox.dispatcher(db, { name = "counted",
      backoff_base = 60, random = function() return 0.99 end, sinks = {
      { name = "s", deliver = function(event)
          local v = verdict[event.subject]
          if v == "fatal" then
            return nil, paygate.error("rejected", "no", { retryable = false })
          elseif v == "again" then
            return nil, "later"
          end
        end } } })
    enqueue(db, "pay_ok", "payment.paid")
    enqueue(db, "pay_dead", "payment.paid")
    enqueue(db, "pay_again", "payment.paid")
    verdict.pay_dead, verdict.pay_again = "fatal", "again"
    assert.equal(3, d:step())
    assert.equal(1, count("delivered"))
    assert.equal(1, count("dead"))
    assert.equal(1, count("failed"))
    assert.equal(0, count("unrecorded"))
    enqueue(db, "pay_lost", "payment.paid")
    db.atomic = function()
      return nil, paygate.error("io", "disk I/O error")
    end
    assert.equal(1, d:step())
    db.atomic = nil
    assert.equal(1, count("unrecorded"))
    assert.equal(1, count("delivered"))
    d:stop()
    db:close()
  end)

  -- was: a series appeared with its first count, and Prometheus sees no
  -- increase in a series' first sample: an alert on the increase of dead
  -- letters stayed silent for the first one
  it("has every outcome of a started dispatcher at 0", function()
    local metrics = require "paygate.metrics"
    local c = metrics.counter("paygate_outbox_events_total",
      "Outbox deliveries by outcome: delivered, failed (retried later),"
      .. " dead, fenced, unrecorded (the store failed).",
      { "outbox", "outcome" }, { max_series = 64 })
    -- (c:get says 0 for a series never made too: what the dispatcher
    -- made is seen through the counters' inc)
    local methods = getmetatable(c).__index
    local inc, made = methods.inc, {}
    methods.inc = function(self, labels, n)
      if labels.outbox == "fresh" then made[labels.outcome] = n end
      return inc(self, labels, n)
    end
    local db = sqlite()
    local d = outbox.dispatcher(db, { name = "fresh", sinks = {
      { name = "s", deliver = function() end } } })
    local ok, err = pcall(function()
      d:start()
      for _, o in ipairs{ "delivered", "failed", "dead", "fenced",
                          "unrecorded" } do
        assert.equal(0, made[o], o)
      end
    end)
    methods.inc = inc
    d:stop()
    db:close()
    assert(ok, err)
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

-- A receiver as hostile as HTTP allows (spec/support/hostile_http.py): one
-- event per behaviour, through a webhook with a 1 s timeout; each attempt
-- ends within bounds, never follows a redirect, keeps at most 200 bytes of
-- a refusal, and is retried or dead-lettered as docs/outbox.md says.
describe("outbox.webhook facing a hostile receiver", function()
  local proc = require "paygate.testing.proc"
  local slow_http = require "support.slow_http"
  local port, log
  setup(function()
    port, log = slow_http.hostile(tmp)
  end)
  teardown(function() proc.stop_all() end)

  local function requests(path) return slow_http.count(log, path) end

  -- path -> state, a piece of last_error (nil: none), requests it gets
  local cases = {
    { "/redirect", "dead", "answered 302" },
    { "/r429", "pending", "answered 429: slow down" },
    -- the receiver refuses our credentials, not the event (its secret not
    -- yet the sender's, mid-rotation): retried, so the fix delivers it in
    -- order; dead-lettered at once, every event of the outage went dead
    -- and the later events of each payment overtook it
    { "/r401", "pending", 'answered 401: {"error":"bad_signature"}' },
    { "/r403", "pending", 'answered 403: {"error":"bad_signature"}' },
    { "/hang500", "pending", "answered 500" },
    { "/silent", "pending", "timeout" },
    { "/endless200", "delivered" },
    { "/endless500", "pending", "answered 500: " .. ("z"):rep(186) },
    { "/garbage", "pending", "webhook_failed" },
    { "/hugehead", "pending", "header_too_large" },
    -- the head came whole, the body was cut: the status is the answer
    { "/cut200", "delivered" },
    { "/cut404", "dead", "answered 404: unknown order" },
    -- the reason whole, its trailing newline dropped (not shown as '?')
    { "/r400nl", "dead", 'answered 400: {"error":"unknown order"}',
      exact = true },
  }
  for _, c in ipairs(cases) do
    local path, state, want = c[1], c[2], c[3]
    it(path .. ": " .. state .. (want and (" (" .. want:sub(1, 24) .. ")")
                                 or ""), function()
      local db = sqlite()
      local d = outbox.dispatcher(db, { random = function() return 0.5 end,
        backoff_base = 60, sinks = {
          outbox.webhook{ url = "http://127.0.0.1:" .. port .. path,
                          secret = "hostile_secret_value", timeout = 1 } } })
      local id = enqueue(db, "pay" .. path:sub(2), "payment.paid")
      local t0 = core.mono()
      assert.equal(1, d:step())
      local took = core.mono() - t0
      assert.is_true(took < 3, ("the attempt took %.2f s"):format(took))
      local r = row(db, id)
      assert.equal(state, r.state, "last_error: " .. tostring(r.last_error))
      assert.equal(1, r.attempts)
      if want then
        assert.truthy(r.last_error:find(want, 1, true), r.last_error)
        if c.exact then
          assert.equal("webhook: webhook_status: webhook: " .. want,
                       r.last_error)
        end
        assert.is_true(#r.last_error <= 500)
        assert.is_nil(r.last_error:find("hostile_secret_value", 1, true))
      else
        assert.is_nil(r.last_error)
      end
      if state == "pending" then
        -- the backoff's, whatever a Retry-After said: 0.5 * 60 s
        assert.is_true(r.next_at - core.time() > 25, tostring(r.next_at))
        assert.equal(0, d:step())           -- not due again yet
      end
      assert.equal(1, requests(path))
      if path == "/redirect" then
        assert.equal(0, requests("/target")) -- never followed
      end
      d:stop()
      db:close()
    end)
  end

  it("a receiver that refuses connections: retried with backoff", function()
    local db = sqlite()
    local d = outbox.dispatcher(db, { sinks = {
      outbox.webhook{ url = "http://127.0.0.1:" .. servers.free_port()
                      .. "/x", secret = "s", timeout = 1 } } })
    local id = enqueue(db, "pay_refused", "payment.paid")
    assert.equal(1, d:step())
    local r = row(db, id)
    assert.equal("pending", r.state)
    assert.truthy(r.last_error:find("webhook_failed", 1, true), r.last_error)
    d:stop()
    db:close()
  end)
end)

describe("outbox dispatcher, a store that fails every shard", function()
  -- A full disk fails every shard's lease alike: the log said so once per
  -- shard each round (8 lines every 10 s per worker, for as long as the
  -- disk stayed full); one line a round now, with the count.
  it("logs one line a round for the shards it could not take", function()
    local db = sqlite()
    local d0 = outbox.dispatcher(db, { partitions = 8, sinks = {
      { name = "s", deliver = function() end } } })
    assert.equal(0, d0:step())              -- the tables, the leases
    d0:stop()                               -- the leases given back
    assert(db:exec("CREATE TRIGGER full BEFORE UPDATE ON paygate_leases"
                   .. " BEGIN SELECT RAISE(ABORT, 'the disk is full'); END"))
    local d = outbox.dispatcher(db, { partitions = 8, sinks = {
      { name = "s", deliver = function() end } } })
    local lines = {}
    local warn = paygate.log.warn
    paygate.log.warn = function(msg, fields)
      lines[#lines + 1] = { msg = msg, fields = fields }
    end
    local ok, err = pcall(d.step, d)
    paygate.log.warn = warn
    assert(ok, tostring(err))
    local leases = {}
    for _, l in ipairs(lines) do
      if l.msg == "outbox: lease" then leases[#leases + 1] = l end
    end
    assert.equal(1, #leases, #leases .. " lines for one round")
    assert.equal(8, leases[1].fields.shards)
    assert.matches("the disk is full", leases[1].fields.error, 1, true)
    assert.equal(8, d.stats.errors)
    d:stop()
    db:close()
  end)
end)
