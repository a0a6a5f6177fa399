-- The store's health: db:stats()'s commit figures (SQLite's writer times
-- each COMMIT, its fsync) and their series on /metrics (paygate.sql
-- publishes them; here, the exec process's private metrics, one round at
-- a time through sql._publish_health, which a worker runs every second).
-- The series on a running server: spec/integration/store_metrics_spec.lua.
local sql = require "paygate.sql"
local paygate = require "paygate"
local metrics = require "paygate.metrics"
local servers = require "spec.support.servers"

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- n concurrent inserts, each acknowledged
local function writes(db, n)
  local tasks = {}
  for i = 1, n do
    tasks[i] = paygate.spawn(function()
      return assert(db:exec("INSERT INTO t VALUES ($1)", { i }))
    end)
  end
  for i = 1, n do tasks[i]:wait() end
end

describe("db:stats() on SQLite", function()
  it("times each COMMIT: count per bucket, seconds, the longest", function()
    local db = assert(sql.open("sqlite:" .. tmp .. "/stats.db"))
    local st = db:stats()
    assert.equal(0, st.commits)
    assert.equal(0, st.commit_seconds)
    assert.equal(0, st.commit_seconds_max)
    local le = require("paygate.sqlite.core").commit_le
    assert.equal(#le + 1, #st.commit_buckets)
    for i, b in ipairs(st.commit_buckets) do
      assert.equal(le[i] or math.huge, b.le)
      assert.equal(0, b.count)
      assert.equal(0, b.seconds)
    end

    assert(db:exec("CREATE TABLE t (v INTEGER)"))
    writes(db, 60)
    st = db:stats()
    assert.equal(61, st.writes)
    assert.truthy(st.commits >= 2 and st.commits < 61, st.commits)
    local count, seconds, lo = 0, 0, 0
    for _, b in ipairs(st.commit_buckets) do
      count = count + b.count
      seconds = seconds + b.seconds
      -- each bucket's commits took between its bounds
      if b.count > 0 then
        assert.truthy(b.seconds > lo * b.count, b.le)
        assert.truthy(b.seconds <= b.le * b.count, b.le)
      end
      lo = b.le
    end
    assert.equal(st.commits, count)
    assert.truthy(st.commit_seconds > 0)
    assert.near(st.commit_seconds, seconds, 1e-9)
    assert.truthy(st.commit_seconds_max > 0)
    assert.truthy(st.commit_seconds_max <= st.commit_seconds)
    assert.truthy(st.commit_seconds_max * st.commits >= st.commit_seconds)

    -- what it was before: the old fields as they were
    assert.equal(0, st.reads_inline)
    assert.equal(0, st.reads_moved)
    assert.equal(0, st.reads_reader)
    db:close()
  end)

  -- a batch whose writes all failed commits nothing (no fsync): counted,
  -- it made commits without writes and put microseconds in the fastest
  -- bucket, pulling the commit time's p99 down under failing writes
  it("counts no commit, and no commit time, for writes that all failed",
     function()
    local db = assert(sql.open("sqlite:" .. tmp .. "/failing.db"))
    assert(db:exec("CREATE TABLE t (v INTEGER PRIMARY KEY)"))
    assert(db:exec("INSERT INTO t VALUES (1)"))
    local before = db:stats()
    for _ = 1, 20 do
      local res, err = db:exec("INSERT INTO t VALUES (1)")
      assert.is_nil(res)
      assert.equal("constraint", err.kind)
    end
    -- a transaction rolled back: nothing committed either
    assert.is_false(pcall(db.transaction, db, function(tx)
      assert(tx:exec("INSERT INTO t VALUES (2)"))
      error("rolled back")
    end))
    local st = db:stats()
    assert.equal(before.writes, st.writes)
    assert.equal(before.commits, st.commits)
    assert.equal(before.commit_seconds, st.commit_seconds)
    -- a write that succeeds is a commit, as before
    assert(db:exec("INSERT INTO t VALUES (3)"))
    st = db:stats()
    assert.equal(before.commits + 1, st.commits)
    assert.equal(before.writes + 1, st.writes)
    db:close()
  end)

  it("counts the queries handed to the reader threads", function()
    local db = assert(sql.open("sqlite:" .. tmp .. "/reads.db"))
    assert(db:exec("CREATE TABLE t (v INTEGER)"))
    assert(db:query("SELECT count(*) AS c FROM t"))
    local st = db:stats()
    assert.equal(1, st.reads_inline)
    assert.equal(0, st.reads_reader)
    -- inline reads off: every query goes to a reader thread
    local off = assert(sql.open("sqlite:" .. tmp .. "/reads.db",
                                { inline_reads = 0 }))
    assert(off:query("SELECT count(*) AS c FROM t"))
    local ost = off:stats()
    assert.equal(0, ost.reads_inline)
    assert.equal(1, ost.reads_reader)
    off:close()
    db:close()
  end)
end)

describe("the store's series", function()
  local L = { "engine", "store" }
  local commits = metrics.counter("paygate_store_commits_total", "", L)
  local written = metrics.counter("paygate_store_committed_writes_total",
                                  "", L)
  local reads = metrics.counter("paygate_store_reads_total", "",
                                { "engine", "store", "where" })
  local dur = metrics.histogram("paygate_store_commit_duration_seconds", "",
    L, { buckets = require("paygate.sqlite.core").commit_le })

  it("adds each handle's commits, writes, reads and commit times", function()
    local lab = { engine = "sqlite", store = "published.db" }
    local db = assert(sql.open("sqlite:" .. tmp .. "/published.db"))
    assert(db:exec("CREATE TABLE t (v INTEGER)"))
    writes(db, 30)
    assert(db:query("SELECT count(*) AS c FROM t"))
    sql._publish_health()
    local st = db:stats()
    assert.equal(st.commits, commits:get(lab))
    assert.equal(31, written:get(lab))
    assert.equal(1, reads:get({ engine = "sqlite", store = "published.db",
                                where = "inline" }))
    local n, sum = dur:get(lab)
    assert.equal(st.commits, n)
    assert.near(st.commit_seconds, sum, 1e-9)
    -- a round adds what came since the last, once
    sql._publish_health()
    assert.equal(st.commits, commits:get(lab))
    writes(db, 5)
    -- db:close() adds its last counts
    db:close()
    assert.equal(36, written:get(lab))
    assert.equal(commits:get(lab), (dur:get(lab)))
    -- a handle opened on it again adds to the same series, from 0
    db = assert(sql.open("sqlite:" .. tmp .. "/published.db"))
    writes(db, 2)
    db:close()
    assert.equal(38, written:get(lab))
  end)

  -- a long name is cut at 64 bytes at a character's end: cut inside one,
  -- the half character showed as U+FFFD; a control character shows as ?
  it("names a store by its file's name, cut at a character's end",
     function()
    local long = ("a"):rep(63) .. "\u{e9}x.db"          -- é: bytes 64, 65
    local odd = "tab\there.db"
    for _, name in ipairs({ long, odd }) do
      local db = assert(sql.open("sqlite:" .. tmp .. "/" .. name))
      assert(db:exec("CREATE TABLE t (v INTEGER)"))
      db:close()
    end
    assert.equal(1, written:get({ engine = "sqlite", store = ("a"):rep(63) }))
    assert.equal(1, written:get({ engine = "sqlite", store = "tab?here.db" }))
  end)

  it("holds a bounded number of stores: handles on new files opened and"
     .. " closed one after another count in the overflow series", function()
    sql._publish_health()
    local before = written:get("overflow")
    for i = 1, 20 do
      local db = assert(sql.open("sqlite:" .. tmp .. "/churn" .. i .. ".db"))
      assert(db:exec("CREATE TABLE t (v INTEGER)"))
      db:close()
    end
    local shown = 0
    for i = 1, 20 do
      if written:get({ engine = "sqlite", store = "churn" .. i .. ".db" })
         > 0 then
        shown = shown + 1
      end
    end
    assert.truthy(shown <= 8, shown)
    assert.truthy(written:get("overflow") - before >= 20 - shown)
  end)

  if servers.have_postgres() then
    it("PostgreSQL: the round trips, the store named without its password",
       function()
      local pg = servers.postgres{ password = "s3cret-pw" }
      assert.truthy(pg.url:find("s3cret-pw", 1, true))
      local rt = metrics.counter("paygate_store_round_trips_total", "", L)
      local store = pg.url:match("@([^?]*)")
      local lab = { engine = "postgres", store = store }
      local db = assert(sql.open(pg.url))
      sql._publish_health()
      local before = rt:get(lab)
      for _ = 1, 3 do assert(db:query("SELECT 1 AS x")) end
      sql._publish_health()
      assert.equal(before + 3, rt:get(lab))
      assert.equal(db:stats().round_trips, rt:get(lab))
      assert.is_nil(store:find("s3cret", 1, true))
      assert.is_nil(store:find("@", 1, true))
      db:close()
    end)
  end
end)
