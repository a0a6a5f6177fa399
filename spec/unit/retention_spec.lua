-- paygate.retention: prune jobs in small batches under a lease, on SQLite
-- and PostgreSQL.
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local retention = require "paygate.retention"
local idem = require "paygate.idempotency"
local outbox = require "paygate.outbox"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()
local pg_srv
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local NOW = 1764500000          -- the clock the runners are given
local function clock() return NOW end

describe("retention jobs: misuse", function()
  it("refuses a job on the audit trail", function()
    for _, t in ipairs({ "paygate_audit", "paygate_audit_heads",
                         "public.paygate_audit", "PAYGATE_AUDIT",
                         "paygate_audit_2026_11" }) do
      assert.has_error(function()
        retention.table({ table = t, column = "at", max_age = 86400 })
      end, "retention.table: " .. t:lower():gsub("^public%.", "")
        .. " holds the audit trail, which is evidence and kept: no"
        .. " retention job may prune it")
    end
    local db = assert(sql.open("sqlite:" .. tmp .. "/misuse.db"))
    assert.has_error(function()
      retention.new(db, { { table = "paygate_audit", column = "at",
                            max_age = 1 } })
    end, "retention.new: paygate_audit holds the audit trail, which is"
      .. " evidence and kept: no retention job may prune it")
    assert.has_error(function()
      retention.start(db, { tables = { { table = "paygate_audit",
                                         column = "at", max_age = 1 } } })
    end, "retention.start: paygate_audit holds the audit trail, which is"
      .. " evidence and kept: no retention job may prune it")
    db:close()
  end)

  it("refuses a notification dedupe window inside WeChat's retries",
     function()
    assert.has_error(function()
      retention.notifications({ max_age = 24 * 3600 })
    end, "retention.notifications: spec.max_age must exceed WeChat's retry"
      .. " window (24 h 4 min = 86640 s): a retry arriving after its"
      .. " dedupe row was pruned would be applied again")
    assert.equal(25 * 3600, retention.notifications().max_age)
    local ok, err = retention.check({ notification_hours = 24 })
    assert.is_nil(ok)
    assert.equal("notification_hours must be a number above 24.07 (WeChat"
                 .. " retries a notification for 24 h 4 min)", err)
    -- false is refused with the way to keep the rows (before: taken as
    -- the default, 25 hours, without a word)
    ok, err = retention.check({ notification_hours = false })
    assert.is_nil(ok)
    assert.equal("notification_hours must be a number above 24.07 (WeChat"
                 .. " retries a notification for 24 h 4 min); to keep the"
                 .. " dedupe rows, set notifications = false", err)
    -- ... and taken once notifications = false is set (before: refused
    -- with the same hint)
    assert(retention.check({ notification_hours = false,
                             notifications = false }))
    ok, err = retention.check({ notification_hours = 24,
                                notifications = false })
    assert.is_nil(ok)
    assert(retention.check({ notification_hours = 30 }))
    assert(retention.check({ notifications = false }))
  end)

  it("checks names, keys and options", function()
    assert.has_error(function()
      retention.table({ table = "t; DROP TABLE x", column = "c",
                        max_age = 1 })
    end, "retention.table: spec.table must be an identifier (or"
      .. " schema.name)")
    assert.has_error(function()
      retention.table({ table = "t", column = "c", max_age = 0 })
    end, "retention.table: spec.max_age must be a positive number")
    assert.has_error(function()
      retention.table({ table = "t", column = "c", max_age = 1,
                        where = "1; DELETE FROM y" })
    end, "retention.table: spec.where must be one SQL condition (a string"
      .. " without ';')")
    -- age is a word of max_age (before: "did you mean name?", two edits
    -- of three letters)
    assert.has_error(function()
      retention.table({ table = "t", column = "c", max_age = 1, age = 2 })
    end, "retention.table: unknown key spec.age (did you mean max_age?)")
    -- a misspelt key is named with the one meant, as the top-level
    -- options are (before: "unknown key spec.nam" alone, and a required
    -- key misspelt was said to be missing: "spec.column must be a
    -- string")
    assert.has_error(function()
      retention.table({ table = "t", column = "c", max_age = 1, nam = "x" })
    end, "retention.table: unknown key spec.nam (did you mean name?)")
    assert.has_error(function()
      retention.table({ table = "t", colum = "c", max_age = 1 })
    end, "retention.table: unknown key spec.colum (did you mean column?)")
    assert.same({ nil, "unknown key spec.max_ag (did you mean max_age?)" },
                { retention.check({ tables = { { table = "t", column = "c",
                                                 max_ag = 1 } } }) })
    assert.same({ nil, "unknown retention option outbox_dayz (did you mean"
                  .. " outbox_days?)" },
                { retention.check({ outbox_dayz = 3 }) })
    assert.same({ nil, "unknown retention option speed" },
                { retention.check({ speed = 3 }) })
    assert.same({ nil, "outbox_days must be a positive number (or false:"
                  .. " keep delivered rows)" },
                { retention.check({ outbox_days = "7" }) })
    assert.same({ nil, "batch must be a positive number" },
                { retention.check({ batch = -1 }) })
    -- past 1e8 s a runner's first sleep raised and ended its task
    assert.same({ nil, "interval must be at most 1e8" },
                { retention.check({ interval = 2e8 }) })
    -- what retention.new refuses, check refuses too (before: it passed,
    -- and the gateway's workers raised at start)
    assert.same({ nil, "batch and max_batches must be integers" },
                { retention.check({ batch = 10.5 }) })
    assert.same({ nil, "batch and max_batches must be integers" },
                { retention.check({ max_batches = 2.5 }) })
    assert.same({ nil, "two jobs are named gw_notifications (set name)" },
                { retention.check({ tables = { { table = "gw_notifications",
                  column = "at", max_age = 60 } } }) })
    assert.is_true(retention.check({ tables = { { table = "gw_notifications",
      column = "at", max_age = 60, name = "mine" } } }))
    assert.is_true(retention.check({ outbox_days = false, interval = 60,
      notifications = { { table = "n", column = "at" } } }))
    assert.is_true(retention.check(nil))
  end)

  it("refuses an age past 100 years, naming its key; takes pause = 0",
     function()
    -- before: notification_hours = 1e308 overflowed to inf and was refused
    -- as "retention.notifications: spec.max_age must be a positive
    -- number" (a key the config does not hold), and outbox_days = 1e300
    -- was taken: a cutoff of -8.64e304, a job that never prunes
    assert.same({ nil, "notification_hours must be at most 876000 (100"
                  .. " years; to keep the dedupe rows, set notifications ="
                  .. " false)" },
                { retention.check({ notification_hours = 1e308 }) })
    assert.same({ nil, "notification_hours must be at most 876000 (100"
                  .. " years; to keep the dedupe rows, set notifications ="
                  .. " false)" },
                { retention.check({ notification_hours = 0 / 0 }) })
    assert.same({ nil, "outbox_days must be at most 36500 (100 years; false"
                  .. " keeps delivered rows)" },
                { retention.check({ outbox_days = 1e300 }) })
    assert.has_error(function()
      retention.table({ table = "t", column = "c", max_age = 1e300 })
    end, "retention.table: spec.max_age must be at most 3153600000 (100"
      .. " years, in seconds)")
    assert.has_error(function()
      retention.outbox({ keep_days = 1e300 })
    end, "retention.outbox: spec.keep_days must be at most 36500 (100"
      .. " years)")
    -- the bounds themselves are taken
    assert.is_true(retention.check({ notification_hours = 876000,
                                     outbox_days = 36500 }))
    assert.equal(3153600000, retention.table({ table = "t", column = "c",
                   max_age = 3153600000 }).max_age)
    -- pause = 0: batches back to back (before: refused, "pause must be a
    -- positive number", which docs/retention.md did not say)
    assert.is_true(retention.check({ pause = 0 }))
    local db = assert(sql.open("sqlite:" .. tmp .. "/pause.db"))
    assert.equal(0, retention.new(db, {}, { pause = 0 }).pause)
    -- a misspelt option of the runner names the one meant, as a job's
    -- keys do (before: "unknown option opts.intervall" alone)
    for key, want in pairs({ intervall = " (did you mean interval?)",
                             max_batch = " (did you mean max_batches?)",
                             batches = " (did you mean max_batches?)",
                             leas = " (did you mean lease?)",
                             speed = "" }) do
      assert.has_error(function()
        retention.new(db, {}, { [key] = 1 })
      end, "retention.new: unknown option opts." .. key .. want)
    end
    assert.has_error(function()
      retention.start(db, {}, { nam = "x" })
    end, "retention.start: unknown option opts.nam (did you mean name?)")
    db:close()
    assert.same({ nil, "pause must be a number of seconds, 0 .. 1e8" },
                { retention.check({ pause = -1 }) })
    assert.same({ nil, "delay must be a positive number" },
                { retention.check({ delay = 0 }) })
  end)

  it("refuses a dedupe table's key it would ignore, and a list that is one"
     .. " spec", function()
    -- before: taken without a word; max_age was dropped (the rows went
    -- after notification_hours, 25 h, not the 30 days written), a typo'd
    -- column became received_at, and one spec where the list belongs
    -- made no job at all (the dedupe rows, or the table, kept forever)
    assert.same({ nil, "notifications[1]: unknown key max_age (a dedupe"
                  .. " table's rows are kept notification_hours)" },
                { retention.check({ notifications = { { table = "notes",
                  column = "at", max_age = 30 * 86400 } } }) })
    -- a misspelt key: the one meant (before: the dedupe note, which
    -- does not say what is wrong with colum)
    assert.same({ nil, "notifications[2]: unknown key colum (did you mean"
                  .. " column?)" },
                { retention.check({ notifications = { { table = "a",
                  column = "at" }, { table = "notes", colum = "at" } } }) })
    assert.same({ nil, "notifications must be an array of { table, column }"
                  .. " (or false)" },
                { retention.check({ notifications = { table = "notes",
                                                      column = "at" } }) })
    assert.same({ nil, "tables must be an array of retention.table specs" },
                { retention.check({ tables = { table = "gw_sessions",
                  column = "created_at", max_age = 86400 } }) })
    local db = assert(sql.open("sqlite:" .. tmp .. "/lists.db"))
    assert.has_error(function()
      retention.new(db, { tables = { table = "s", column = "at",
                                     max_age = 60 } })
    end, "retention.new: tables must be an array of retention.table specs")
    db:close()
    -- an empty list is no job, as before
    assert.is_true(retention.check({ notifications = {}, tables = {} }))
  end)
end)

describe("retention.stats", function()
  it("shows the instance's totals of a job this worker did not prune",
     function()
    -- another worker of the instance held the lease and pruned 7 rows
    -- of job "elsewhere" (its counts go to the shared dictionary); this
    -- worker runs the same jobs but never pruned. Before: instance held
    -- only the jobs this worker had pruned itself, so here nothing.
    local d = require("paygate.shared").get_dict("paygate")
    d:incr("paygate.retention.pruned|elsewhere", 7, 0)
    local db = assert(sql.open("sqlite:" .. tmp .. "/stats.db"))
    retention.new(db, { { table = "elsewhere", column = "at",
                          max_age = 60 } })
    local t = retention.stats()
    assert.equal(7, t.instance.elsewhere)
    assert.is_nil(t.jobs.elsewhere)          -- this worker's: none
    db:close()
  end)
end)

local engines = {
  sqlite = function()
    n = n + 1
    local url = "sqlite:" .. tmp .. "/r" .. n .. ".db"
    return assert(sql.open(url)), function() return assert(sql.open(url)) end
  end,
}
if servers.have_postgres() then
  engines.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    local db = assert(sql.open(pg_srv.url))
    assert(db:exec_script([[
      DROP TABLE IF EXISTS events; DROP TABLE IF EXISTS paygate_leases;
      DROP TABLE IF EXISTS paygate_idempotency;
      DROP TABLE IF EXISTS paygate_outbox;
      DROP TABLE IF EXISTS notes]]))
    return db, function() return assert(sql.open(pg_srv.url)) end
  end
end

for engine, open in pairs(engines) do
  describe("paygate.retention on " .. engine, function()
    local db, reopen

    before_each(function() db, reopen = open() end)
    after_each(function() db:close() end)

    -- events: `old` rows older than a day, `young` rows within it
    local function fill(old, young, extra)
      assert(db:exec_script([[CREATE TABLE events (
        id INTEGER PRIMARY KEY, at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL)]]))
      assert(db:exec_script("CREATE INDEX events_at ON events (at)"))
      assert(db:transaction(function(tx)
        local id = 0
        for i = 1, old do
          id = id + 1
          assert(tx:exec("INSERT INTO events (id, at, state) VALUES ($1, $2,"
            .. " $3)", { id, NOW - 86400 - i, (extra and i % 2 == 0)
                         and "pending" or "done" }))
        end
        for i = 1, young do
          id = id + 1
          assert(tx:exec("INSERT INTO events (id, at, state) VALUES ($1, $2,"
            .. " 'done')", { id, NOW - 86400 + 60 + i }))
        end
      end))
    end

    local function count(where)
      return assert(db:query("SELECT count(*) AS n FROM events"
                             .. (where and " WHERE " .. where or "")))[1].n
    end

    it("deletes what is older than the policy, keeps what is younger, a"
       .. " batch per statement", function()
      fill(1000, 300)
      local r = retention.new(db, { { table = "events", column = "at",
                                      max_age = 86400 } },
                              { batch = 100, pause = 0.001, now = clock })
      local before = retention.stats()
      local s = assert(r:run_once())
      assert.equal(1000, s.pruned)
      assert.equal(11, s.statements)          -- 10 full batches, 1 short
      assert.equal(11, s.jobs.events.statements)
      assert.equal(0, count("at < " .. (NOW - 86400)))
      assert.equal(300, count())
      -- counted in this worker and across the instance
      local after = retention.stats()
      assert.equal(before.pruned + 1000, after.pruned)
      assert.equal((before.instance.events or 0) + 1000,
                   after.instance.events)
      -- nothing left to do: one short statement
      s = assert(r:run_once())
      assert.equal(0, s.pruned)
      assert.equal(1, s.statements)
    end)

    it("cuts an integer seconds column at a fractional clock", function()
      -- the gateway's notification tables keep BIGINT seconds: before,
      -- PostgreSQL refused the cut 1796318449.94 ("invalid input syntax
      -- for type bigint") and nothing was ever pruned there
      assert(db:exec_script("CREATE TABLE stamps (id INTEGER PRIMARY KEY,"
        .. " at BIGINT NOT NULL)"))
      assert(db:exec("INSERT INTO stamps (id, at) VALUES (1, $1), (2, $2)",
                     { NOW - 86400 - 5, NOW - 86400 + 5 }))
      local r = retention.new(db, { { table = "stamps", column = "at",
                                      max_age = 86400 } },
        { batch = 100, pause = 0.001, now = function() return NOW + 0.25 end })
      local s = assert(r:run_once())
      assert.equal(1, s.pruned)
      assert.equal(1, tonumber(assert(db:query(
        "SELECT count(*) AS n FROM stamps"))[1].n))
    end)

    it("honours an extra condition and a named key", function()
      fill(200, 10, true)
      local r = retention.new(db, { { name = "done-events", table = "events",
        column = "at", max_age = 86400, where = "state = 'done'",
        key = "id" } }, { batch = 30, pause = 0.001, now = clock })
      local s = assert(r:run_once())
      assert.equal(100, s.pruned)
      assert.equal(4, s.statements)
      assert.equal(100, count("state = 'pending'"))
      assert.equal(110, count())
    end)

    it("addresses a batch by a composite key", function()
      fill(25, 5)
      local r = retention.new(db, { { table = "events", column = "at",
        max_age = 86400, key = "id, at" } },
        { batch = 10, pause = 0.001, now = clock })
      local s = assert(r:run_once())
      assert.equal(25, s.pruned)
      assert.equal(3, s.statements)
      assert.equal(5, count())
    end)

    it("reads an epoch-ms column with unit = ms", function()
      assert(db:exec_script("CREATE TABLE notes (id INTEGER PRIMARY KEY,"
                            .. " at BIGINT NOT NULL)"))
      assert(db:exec("INSERT INTO notes (id, at) VALUES (1, $1), (2, $2)",
                     { (NOW - 7200) * 1000, (NOW - 60) * 1000 }))
      local r = retention.new(db, { { table = "notes", column = "at",
        max_age = 3600, unit = "ms" } }, { now = clock })
      assert.equal(1, assert(r:run_once()).pruned)
      assert.same({ { id = 2 } }, db:query("SELECT id FROM notes"))
    end)

    it("skips a table that does not exist yet, and says so once", function()
      local r = retention.new(db, {
        retention.notifications({ table = "gw_nothing_here" }) },
        { now = clock })
      local s = assert(r:run_once())
      assert.is_true(s.jobs.gw_nothing_here.missing)
      assert.equal(0, s.errors)
    end)

    it("prunes expired idempotency records through idempotency.prune",
       function()
      for i = 1, 25 do
        local h = assert(idem.begin(db, "app", "k" .. i, "fp",
                                    { ttl = i <= 20 and 60 or 7200 }))
        assert(idem.complete(db, h, 201, "{}"))
      end
      local r = retention.new(db, { retention.idempotency() },
        { batch = 8, pause = 0.001,
          now = function() return core.time() + 600 end })
      local s = assert(r:run_once())
      assert.equal(20, s.pruned)
      assert.equal(3, s.statements)
      assert.equal(5, assert(db:query("SELECT count(*) AS n FROM"
                                      .. " paygate_idempotency"))[1].n)
    end)

    it("prunes delivered outbox rows after keep_days; pending stay",
       function()
      assert(db:transaction(function(tx)
        for i = 1, 12 do
          assert(outbox.enqueue(tx, { subject = "pay_" .. i,
                                      type = "payment.paid" }))
        end
      end))
      -- ten delivered 8 days ago, one yesterday, one still pending
      assert(db:exec("UPDATE paygate_outbox SET state = 'delivered',"
        .. " delivered_at = $1 WHERE id <= 10", { NOW - 8 * 86400 }))
      assert(db:exec("UPDATE paygate_outbox SET state = 'delivered',"
        .. " delivered_at = $1 WHERE id = 11", { NOW - 86400 }))
      -- the dispatcher, told retention prunes, leaves them alone (and
      -- with its clock before event 12's due time, delivers nothing)
      local d = outbox.dispatcher(db, { sinks = { function() end },
                                        prune = false, now = clock })
      d:step()
      assert.equal(0, d.stats.pruned)
      local r = retention.new(db, { outbox_days = 7, idempotency = false,
                                    notifications = false },
                              { batch = 4, pause = 0.001, now = clock })
      local s = assert(r:run_once())
      assert.equal(10, s.jobs.outbox.pruned)
      assert.equal(3, s.jobs.outbox.statements)
      local left = db:query("SELECT id, state FROM paygate_outbox ORDER BY"
                            .. " id")
      assert.same({ { id = 11, state = "delivered" },
                    { id = 12, state = "pending" } }, left)
    end)

    it("one instance prunes at a time: the other finds the lease held",
       function()
      fill(600, 0)
      local other = reopen()
      local a = retention.new(db, { { table = "events", column = "at",
        max_age = 86400 } }, { batch = 10, pause = 0.01, now = clock })
      local b = retention.new(other, { { table = "events", column = "at",
        max_age = 86400 } }, { batch = 10, pause = 0.01, now = clock })
      local ta = paygate.spawn(function() return a:run_once() end)
      servers.wait_for(function() return count() < 600 end, 10,
                       "instance A to start pruning")
      local s, err = b:run_once()
      assert.is_nil(s)
      assert.equal("held", err.kind)
      local sa = assert(ta:wait())
      assert.equal(600, sa.pruned)
      assert.equal(1, b.stats.held)
      assert.equal(0, b.stats.pruned)
      assert.equal(0, count())
      -- once A is done, B may prune (nothing left)
      assert.equal(0, assert(b:run_once()).pruned)
      other:close()
    end)

    it("start() runs passes in the background until stop()", function()
      fill(50, 5)
      local r = retention.start(db, { tables = { { table = "events",
        column = "at", max_age = 86400 } }, idempotency = false,
        outbox_days = false, notifications = false },
        { delay = 0.01, interval = 0.05, now = clock })
      servers.wait_for(function() return r.stats.passes >= 2 end, 10,
                       "two passes")
      r:stop()
      assert.equal(50, r.stats.pruned)
      assert.equal(5, count())
    end)
  end)
end

if servers.have_redis() then
  describe("paygate.retention with its lease on Redis", function()
    it("lets one of two instances prune", function()
      local redis = require "paygate.redis"
      local srv = servers.redis()
      local c1 = assert(redis.connect(srv.url))
      local c2 = assert(redis.connect(srv.url))
      n = n + 1
      local url = "sqlite:" .. tmp .. "/redis" .. n .. ".db"
      local db1, db2 = assert(sql.open(url)), assert(sql.open(url))
      assert(db1:exec_script("CREATE TABLE t (at DOUBLE PRECISION NOT NULL)"))
      assert(db1:transaction(function(tx)
        for i = 1, 300 do
          assert(tx:exec("INSERT INTO t (at) VALUES ($1)", { NOW - 7200 - i }))
        end
      end))
      local function runner(db, c)
        return retention.new(db, { { table = "t", column = "at",
          max_age = 3600 } }, { batch = 10, pause = 0.01, now = clock,
                                lease = c })
      end
      local a, b = runner(db1, c1), runner(db2, c2)
      local ta = paygate.spawn(function() return a:run_once() end)
      servers.wait_for(function()
        return assert(db2:query("SELECT count(*) AS n FROM t"))[1].n < 300
      end, 10, "instance A to start pruning")
      local s, err = b:run_once()
      assert.is_nil(s)
      assert.equal("held", err.kind)
      assert.equal(300, assert(ta:wait()).pruned)
      assert.equal(1, c1:call("EXISTS", "paygate:fence:retention:default"))
      db1:close(); db2:close(); c1:close(); c2:close()
    end)
  end)
end
