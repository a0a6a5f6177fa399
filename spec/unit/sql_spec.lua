-- paygate.sql against every engine: SQLite (embedded) and PostgreSQL (a
-- real server started on loopback by spec/support/servers.lua).
local sql = require "paygate.sql"
local paygate = require "paygate"
local servers = require "spec.support.servers"

local engines = { "sqlite" }
if servers.have_postgres() then
  engines[#engines + 1] = "postgres"
end

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local pg_srv
local counter = 0

-- A fresh database for each test: a new SQLite file, or a new schema
-- name prefix on the shared PostgreSQL server.
local function open(engine, opts)
  counter = counter + 1
  if engine == "sqlite" then
    return assert(sql.open("sqlite:" .. tmp .. "/t" .. counter .. ".db", opts))
  end
  if not pg_srv then
    pg_srv = servers.postgres()
  end
  local db = assert(sql.open(pg_srv.url, opts))
  assert(db:exec_script("DROP TABLE IF EXISTS t; DROP TABLE IF EXISTS acct"))
  return db
end

local T_SQL = {
  sqlite = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE,"
    .. " n INTEGER CONSTRAINT n_nonneg CHECK (n >= 0))",
  postgres = "CREATE TABLE t (id BIGSERIAL PRIMARY KEY, v TEXT UNIQUE,"
    .. " n INTEGER CONSTRAINT n_nonneg CHECK (n >= 0))",
}

for _, engine in ipairs(engines) do
  describe("paygate.sql on " .. engine, function()
    local db

    before_each(function()
      db = open(engine)
      assert(db:exec_script(T_SQL[engine]))
    end)

    after_each(function()
      db:close()
    end)

    describe("errors", function()
      it("classifies a unique violation as constraint, with its name", function()
        assert(db:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "a", 1 }))
        local res, err = db:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                                 { "a", 2 })
        assert.is_nil(res)
        assert.equal("constraint", err.kind)
        assert.is_false(err.retryable)
        assert.truthy(err.constraint:find(engine == "sqlite" and "t.v"
                                          or "t_v_key", 1, true))
        assert.truthy(tostring(err):find("^constraint: "))
      end)

      it("names a CHECK constraint", function()
        local _, err = db:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                               { "b", -1 })
        assert.equal("constraint", err.kind)
        assert.equal("n_nonneg", err.constraint)
      end)

      it("classifies bad SQL as syntax", function()
        local res, err = db:exec("INSERTT INTO t VALUES (1)")
        assert.is_nil(res)
        assert.equal("syntax", err.kind)
        local rows, qerr = db:query("SELECT * FROM no_such_table")
        assert.is_nil(rows)
        assert.equal("syntax", qerr.kind)
      end)

      it("raises on a parameter that cannot be bound", function()
        assert.has_error(function()
          db:exec("INSERT INTO t (v) VALUES ($1)", { {} })
        end)
        assert.has_error(function() db:query({}) end)
      end)
    end)

    describe("exec and query", function()
      it("binds parameters and returns changes and the row", function()
        local res = assert(db:exec("INSERT INTO t (v, n) VALUES ($1, $2)"
                                   .. " RETURNING id", { "x'); DROP TABLE t;--", 7 }))
        assert.equal(1, res.changes)
        assert.equal(1, res.last_id)
        local rows = assert(db:query("SELECT id, v, n FROM t WHERE v = $1",
                                     { "x'); DROP TABLE t;--" }))
        assert.equal(1, #rows)
        assert.same({ id = 1, v = "x'); DROP TABLE t;--", n = 7 }, rows[1])
      end)

      it("maps NULL to an absent column and sql.null to NULL", function()
        assert(db:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                       { sql.null, 3 }))
        assert(db:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                       { n = 2, nil, 4 }))
        local rows = db:query("SELECT v, n FROM t ORDER BY n")
        assert.same({ { n = 3 }, { n = 4 } }, rows)
      end)

      it("counts changes of an UPDATE", function()
        for i = 1, 3 do
          assert(db:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "r" .. i, i }))
        end
        local res = assert(db:exec("UPDATE t SET n = n + 10 WHERE n >= $1",
                                   { 2 }))
        assert.equal(2, res.changes)
      end)
    end)

    describe("transaction", function()
      it("commits on return and gives back fn's values", function()
        local a, b = db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "t1", 1 }))
          local rows = tx:query("SELECT count(*) AS c FROM t")
          return rows[1].c, "second"
        end)
        assert.equal(1, a)
        assert.equal("second", b)
        assert.equal(1, db:query("SELECT count(*) AS c FROM t")[1].c)
      end)

      it("rolls back when fn raises an error table and returns it", function()
        local ok, err = db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "t2", 1 }))
          error({ kind = "illegal_transition", message = "no" })
        end)
        assert.is_nil(ok)
        assert.equal("illegal_transition", err.kind)
        assert.equal(0, db:query("SELECT count(*) AS c FROM t")[1].c)
      end)

      it("rolls back when fn returns nil, err", function()
        local ok, err = db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "t3", 1 }))
          return tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "t3", 1 })
        end)
        assert.is_nil(ok)
        assert.equal("constraint", err.kind)
        assert.equal(0, db:query("SELECT count(*) AS c FROM t")[1].c)
      end)

      it("rolls back and re-raises a programmer error", function()
        assert.has_error(function()
          db:transaction(function(tx)
            assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "t4", 1 }))
            error("bug")
          end)
        end)
        assert.equal(0, db:query("SELECT count(*) AS c FROM t")[1].c)
      end)

      it("retries fn on a serialization failure, within a bound", function()
        local calls = 0
        local ok, err = db:transaction(function(tx)
          calls = calls + 1
          if calls < 3 then
            error({ kind = "serialization", message = "conflict",
                    retryable = true })
          end
          return tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "t5", 1 })
        end)
        assert.truthy(ok, tostring(err))
        assert.equal(3, calls)
        calls = 0
        ok, err = db:transaction(function()
          calls = calls + 1
          error({ kind = "serialization", message = "always" })
        end, { retries = 4 })
        assert.is_nil(ok)
        assert.equal("serialization", err.kind)
        assert.equal(4, calls)
      end)
    end)

    describe("concurrency", function()
      it("one failing write among 100 concurrent ones fails alone", function()
        local tasks = {}
        for i = 1, 100 do
          tasks[i] = paygate.spawn(function()
            -- i == 50 violates the CHECK; its neighbours must commit
            return db:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                           { "c" .. i, i == 50 and -1 or i })
          end)
        end
        local failed = 0
        for i = 1, 100 do
          local res, err = tasks[i]:wait()
          if i == 50 then
            assert.is_nil(res)
            assert.equal("constraint", err.kind)
            failed = failed + 1
          else
            assert.truthy(res, tostring(err))
            assert.equal(1, res.changes)
          end
        end
        assert.equal(1, failed)
        assert.equal(99, db:query("SELECT count(*) AS c FROM t")[1].c)
      end)

      it("a failing transaction among concurrent ones fails alone", function()
        local tasks = {}
        for i = 1, 20 do
          tasks[i] = paygate.spawn(function()
            return db:transaction(function(tx)
              assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                             { "a" .. i, i }))
              if i == 7 then
                return tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                               { "a" .. i, i })        -- duplicate
              end
              return tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                             { "b" .. i, i })
            end)
          end)
        end
        for i = 1, 20 do
          local ok, err = tasks[i]:wait()
          if i == 7 then
            assert.is_nil(ok)
            assert.equal("constraint", err.kind)
          else
            assert.truthy(ok, tostring(err))
          end
        end
        assert.equal(38, db:query("SELECT count(*) AS c FROM t")[1].c)
        assert.equal(0, db:query("SELECT count(*) AS c FROM t WHERE v = $1",
                                 { "a7" })[1].c)
      end)
    end)
  end)
end

describe("paygate.sql on sqlite (engine specifics)", function()
  it("fails to open an unusable path with unavailable", function()
    local db, err = sql.open("sqlite:/nonexistent-dir/x/y.db")
    assert.is_nil(db)
    assert.equal("unavailable", err.kind)
  end)

  it("raises on an unknown url scheme", function()
    assert.has_error(function() sql.open("mysql://x") end)
  end)

  it("commits concurrent writes in groups (fewer commits than writes)", function()
    local db = open("sqlite")
    assert(db:exec_script("CREATE TABLE g (k INTEGER)"))
    local before = db:stats().commits
    local tasks = {}
    for i = 1, 100 do
      tasks[i] = paygate.spawn(function()
        return assert(db:exec("INSERT INTO g VALUES ($1)", { i }))
      end)
    end
    for i = 1, 100 do
      tasks[i]:wait()
    end
    local after = db:stats().commits
    assert.equal(100, db:query("SELECT count(*) AS c FROM g")[1].c)
    assert.truthy(after - before < 50, "commits: " .. (after - before))
    assert.truthy(after - before >= 1)
    db:close()
  end)

  it("batch_max=1 commits each write alone", function()
    local db = open("sqlite", { batch_max = 1 })
    assert(db:exec_script("CREATE TABLE g (k INTEGER)"))
    local before = db:stats().commits
    local tasks = {}
    for i = 1, 20 do
      tasks[i] = paygate.spawn(function()
        return assert(db:exec("INSERT INTO g VALUES ($1)", { i }))
      end)
    end
    for i = 1, 20 do
      tasks[i]:wait()
    end
    local after = db:stats().commits
    assert.equal(20, after - before)
    db:close()
  end)

  it("rolls back an idle transaction after tx_timeout", function()
    local db = open("sqlite", { tx_timeout = 100 })
    assert(db:exec_script("CREATE TABLE g (k INTEGER)"))
    local ok, err = db:transaction(function(tx)
      assert(tx:exec("INSERT INTO g VALUES (1)"))
      paygate.sleep(0.3)
      return tx:exec("INSERT INTO g VALUES (2)")
    end, { retries = 1 })
    assert.is_nil(ok)
    assert.equal("timeout", err.kind)
    assert.equal(0, db:query("SELECT count(*) AS c FROM g")[1].c)
    -- the writer serves others again
    assert(db:exec("INSERT INTO g VALUES (3)"))
    db:close()
  end)

  it("routes a writing query to the writer", function()
    local db = open("sqlite")
    assert(db:exec_script("CREATE TABLE g (k INTEGER)"))
    local rows = assert(db:query("INSERT INTO g VALUES ($1) RETURNING k", { 9 }))
    assert.same({ { k = 9 } }, rows)
    db:close()
  end)
end)
