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

-- Yields until cond() holds; raises after secs (a hung writer or an
-- exhausted pool fails the spec instead of hanging the suite).
local function wait_until(cond, secs, what)
  local deadline = paygate.update_time() + secs
  while not cond() do
    if paygate.update_time() > deadline then
      error("timed out after " .. secs .. " s waiting for " .. what, 2)
    end
    paygate.sleep(0.005)
  end
end

-- Runs fn while a task ticks every millisecond. returns: how long fn
-- took and the longest gap between two ticks (how long the loop stalled).
local function timed_with_ticker(fn)
  local gap, last, done = 0, paygate.update_time(), false
  local ticker = paygate.spawn(function()
    while not done do
      paygate.sleep(0.001)
      local now = paygate.update_time()
      if now - last > gap then gap = now - last end
      last = now
    end
  end)
  paygate.sleep(0.01)
  local t0 = paygate.update_time()
  fn()
  local took = paygate.update_time() - t0
  done = true
  ticker:wait()
  return took, gap
end

-- Calls read 20,000 times, and on until secs have passed: a run long
-- enough for "the loop stalled for less than half of it" to mean
-- something on a fast machine too (20,000 inline reads can take < 50 ms).
local function reads_for(secs, read)
  local mono = require("paygate.core").mono
  local t0, n = mono(), 0
  repeat
    for _ = 1, 1000 do read() end
    n = n + 1000
  until n >= 20000 and mono() - t0 >= secs
end

-- task:wait() with a deadline.
local function wait_task(t, secs, what)
  wait_until(function() return t:finished() end, secs, what)
  return t:wait()
end

-- A transaction that inserts a row, reports "in", then waits in fn.
local function tx_then_wait(db, state, i, wait)
  return paygate.spawn(function()
    return db:transaction(function(tx)
      assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "x" .. i, i }))
      state[i] = "in"
      wait(tx)
      state[i] = "out"                   -- never: the task is cancelled
    end)
  end)
end

-- Two transactions that each insert a row. On PostgreSQL (pool 2) both
-- must be open at the same time, which needs both connections free; the
-- SQLite writer serves them in turn.
local function two_at_once(db, engine)
  local need = engine == "postgres" and 2 or 1
  local inside, tasks = 0, {}
  for i = 1, 2 do
    tasks[i] = paygate.spawn(function()
      return db:transaction(function(tx)
        assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "c" .. i, i }))
        inside = inside + 1
        wait_until(function() return inside >= need end, 1,
                   "the other transaction to be open too")
        return true
      end)
    end)
  end
  for i = 1, 2 do
    assert.is_true(wait_task(tasks[i], 2, "transaction " .. i))
  end
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

    it("a params table whose metamethod closes the handle: the call"
       .. " raises 'closed' and uses nothing of the freed handle", function()
      -- Reading the parameters runs Lua (the params table's __index for
      -- its n); a handle closed there may be freed by the time the job
      -- would use it (PostgreSQL frees the pool at once).
      local function closing(d)
        return setmetatable({ "v1" }, { __index = function(_, k)
          if k == "n" and not d.closed then d:close() end
        end })
      end
      local function again()             -- another handle, same database
        if engine == "sqlite" then
          return assert(sql.open("sqlite:" .. db.path))
        end
        return assert(sql.open(pg_srv.url))
      end
      local calls = {
        function(h, d)
          return h:query("SELECT v FROM t WHERE v = $1", closing(d))
        end,
        function(h, d)
          return h:exec("INSERT INTO t (v, n) VALUES ($1, 1)", closing(d))
        end,
        function(h, d)                   -- below db:atomic's own checks
          local stmts = { { "INSERT INTO t (v, n) VALUES ($1, 1)",
                            closing(d) } }
          if engine == "sqlite" then return h:atomic(stmts) end
          return h:begin_atomic(stmts)
        end,
      }
      for i, call in ipairs(calls) do
        local d = again()
        local ok, err = pcall(call, d.h, d)
        assert.is_false(ok, "call " .. i)
        assert.matches("closed", tostring(err))
      end
      -- nothing was written, and the database answers as before
      local watch = again()
      assert.same({}, assert(watch:query("SELECT v FROM t")))
      watch:close()
    end)

    it("the engine reads a params table's n once: its answer is what is"
       .. " bound, and a job is checked and copied in one pass", function()
      -- A metamethod's n that changes between reads: read once, the
      -- statement binds that count. (SQLite's h:atomic read it three
      -- times, PostgreSQL's h:begin_atomic twice: the check saw 1, the
      -- copy 2, and the copy raised "cannot bind a table" with the job's
      -- earlier statements copied, never freed.) The values are read raw:
      -- [2] is never bound.
      local reads = 0
      local function shifty(v)
        return setmetatable({ v, {} }, { __index = function(_, k)
          if k == "n" then
            reads = reads + 1
            return reads == 1 and 1 or 2
          end
        end })
      end
      local h = db.h
      local function once(call)
        reads = 0
        local res = assert(call())
        assert.equal(1, reads)
        return res
      end
      assert.same({ { a = "one" } }, once(function()
        return h:query("SELECT $1 AS a", shifty("one"))
      end))
      once(function()
        return h:exec("INSERT INTO t (v, n) VALUES ($1, 1)", shifty("one"))
      end)
      local job = { { "SELECT 1" },
                    { "INSERT INTO t (v, n) VALUES ($1, 2)", shifty("two") } }
      if engine == "sqlite" then
        local res = once(function() return h:atomic(job) end)
        assert.equal(1, res[2].changes)
      else
        -- PostgreSQL's h:begin_atomic read it twice: its check saw 1, its
        -- copy 2 and raised from there, with BEGIN and statement 1 copied
        -- and never freed
        reads = 0
        local txid, res, ei, e = h:begin_atomic(job)
        assert(txid, tostring(res))
        assert.equal(1, reads)
        assert.is_nil(ei, tostring(e))
        assert.equal(1, res[2].changes)
        assert(h:commit(txid))
      end
      -- a misuse found after earlier statements were copied answers as
      -- ever (what was copied is freed: the ASan build's leak check)
      local bad = { { "SELECT 1" }, { "SELECT $1", { {} } } }
      if engine == "sqlite" then
        local ok, err = pcall(h.atomic, h, bad)
        assert.is_false(ok)
        assert.matches("statement 2: params%[1%] cannot be bound %(a table%)",
                       tostring(err))
      else
        local txid, err = h:begin_atomic(bad)
        assert.is_nil(txid)
        assert.equal("misuse", err.kind)
        assert.matches("statement 2 of the batch is not", err.message)
      end
      -- an n whose metamethod raises once earlier statements (and their
      -- parameters) are copied: the call raises that error and nothing is
      -- sent. What was copied is held by a userdata the raise leaves to
      -- the collector: the full cycle below frees it, and an ASan build
      -- run with detect_leaks=1 checks that nothing stayed (SQLite's
      -- h:atomic leaked its job and the copies here)
      local atomic = engine == "sqlite" and h.atomic or h.begin_atomic
      local raising = setmetatable({ "three" }, { __index = function(_, k)
        if k == "n" then error("n refused") end
      end })
      local ok, err = pcall(atomic, h,
        { { "INSERT INTO t (v, n) VALUES ($1, $2)", { "three", 3 } },
          { "SELECT $1", raising } })
      assert.is_false(ok)
      assert.matches("n refused", tostring(err))
      if engine == "sqlite" then
        -- and so does a statement's expect whose metamethod raises
        local stmt = setmetatable({ "SELECT $1", { "four" } },
          { __index = function(_, k)
            if k == "expect" then error("expect refused") end
          end })
        ok, err = pcall(atomic, h,
          { { "INSERT INTO t (v, n) VALUES ($1, $2)", { "four", 4 } },
            stmt })
        assert.is_false(ok)
        assert.matches("expect refused", tostring(err))
      end
      collectgarbage()
      assert.same({ { v = "one" }, { v = "two" } },
                  assert(db:query("SELECT v FROM t ORDER BY id")))
    end)

    -- A write from a coroutine that cannot yield (inside string.gsub's
    -- callback, table.sort's comparator, require) used to be queued (or
    -- sent) before the yield was refused: it committed while the caller
    -- was told that the call raised.
    it("a write where the caller cannot yield raises and writes nothing",
       function()
      -- (PostgreSQL: one connection, so that the count below is answered
      -- after anything sent before it)
      local one = engine == "sqlite" and db
                  or assert(sql.open(pg_srv.url, { pool = 1 }))
      local function in_gsub(fn)
        local ok, err = pcall(string.gsub, "x", "x", fn)
        assert.is_false(ok)
        assert.matches("yield", tostring(err))
      end
      local ins = "INSERT INTO t (v, n) VALUES ('ny', 1)"
      in_gsub(function() one:exec(ins) end)
      in_gsub(function() one:exec_script(ins) end)
      in_gsub(function() one:atomic({ { ins } }) end)
      -- refused inside a transaction, and at its COMMIT: the transaction
      -- is left to its coroutine, which rolls it back when it ends
      local r, err = one:transaction(function(tx)
        assert(tx:exec(ins))
        in_gsub(function() tx:exec(ins) end)
        return nil, { kind = "undo" }
      end)
      assert.is_nil(r)
      assert.equal("undo", err.kind)
      -- (SQLite: one writer, in order; PostgreSQL: one connection)
      assert(one:exec("INSERT INTO t (v, n) VALUES ('after', 1)"))
      assert.same({ { n = 0 } }, assert(one:query("SELECT count(*) AS n"
                                        .. " FROM t WHERE v = 'ny'")))
      if one ~= db then one:close() end
    end)

    describe("errors", function()
      it("refuses transaction control in SQL (misuse), in and out of transactions", function()
        local stmts = { "BEGIN", "  -- why\nbegin", "COMMIT", "ROLLBACK",
                        "SAVEPOINT s", "RELEASE s" }
        if engine == "postgres" then stmts[#stmts + 1] = "START TRANSACTION" end
        for _, stmt in ipairs(stmts) do
          local r, err = db:exec(stmt)
          assert.is_nil(r, stmt)
          assert.equal("misuse", err.kind, stmt)
          r, err = db:query(stmt)
          assert.is_nil(r, stmt)
          assert.equal("misuse", err.kind, stmt)
        end
        local r, err = db:exec_script("INSERT INTO t (v, n) VALUES ('s', 1); COMMIT")
        assert.is_nil(r)
        assert.equal("misuse", err.kind)
        -- SQLite: a transaction cannot be ended from inside, it commits
        -- as a whole (PostgreSQL: see "fails a transaction whose SQL
        -- ended it early" below)
        if engine == "sqlite" then
          assert(db:transaction(function(tx)
            assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "in", 1 }))
            local _, cerr = tx:exec("COMMIT")
            assert.equal("misuse", cerr.kind)
            return tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "in2", 2 })
          end))
          assert.equal(2, #db:query("SELECT v FROM t WHERE v LIKE 'in%'"))
        end
        -- and the pool was left clean: plain writes are durable
        assert(db:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "after", 3 }))
        assert.equal(1, #db:query("SELECT v FROM t WHERE v = 'after'"))
      end)

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

      it("refuses SQL with a NUL byte (misuse): it would end there", function()
        -- each engine reads the text as a C string: the part before the
        -- NUL ran, the rest was dropped without a word
        local ins = "INSERT INTO t (v, n) VALUES ('cut', 1)\0; SELECT 1"
        local function refused(r, err, what)
          assert.is_nil(r, what)
          assert.equal("misuse", err.kind, what)
          assert.matches("NUL byte", err.message, 1, true)
        end
        refused(db:exec(ins)); refused(db:query(ins))
        refused(db:exec_script(ins))
        refused(db:query("SELECT 1 AS a\0 UNION SELECT 2"))
        local ok, err = db:transaction(function(tx)
          refused(tx:exec(ins)); refused(tx:query(ins))
          refused(tx:exec_script(ins))
          return true
        end)
        assert.is_true(ok, tostring(err))
        local res, aerr = db:atomic({
          { "INSERT INTO t (v, n) VALUES ('a', 2)" }, { ins } })
        refused(res, aerr)
        assert.equal(2, aerr.index)
        assert.equal(0, db:query("SELECT count(*) AS c FROM t")[1].c)
      end)

      it("raises on a params.n that is no whole count up to 65535", function()
        -- the engines cast n to an int: -1 or 1.5 dropped or cut the
        -- parameters silently, 2^31 wrapped negative (every parameter
        -- dropped), 1e9 walked a billion slots before a huge calloc
        local msg = "params.n must be a whole number from 0 to 65535"
        for _, n in ipairs({ -1, 1.5, 0 / 0, 1 / 0, 65536, 2 ^ 31, 1e9 }) do
          local p = { n = n, 5 }
          local ok, err = pcall(db.query, db, "SELECT $1 AS a", p)
          assert.is_false(ok, tostring(n))
          assert.matches("db:query: " .. msg, err, 1, true)
          ok, err = pcall(db.exec, db, "SELECT $1 AS a", p)
          assert.matches("db:exec: " .. msg, err, 1, true)
          ok, err = pcall(db.atomic, db, { { "SELECT $1 AS a", p } })
          assert.matches("db:atomic: stmts[1]: " .. msg, err, 1, true)
          -- the engine's own check, under paygate.sql's
          ok, err = pcall(db.h.query, db.h, "SELECT $1 AS a", p)
          assert.is_false(ok, tostring(n))
          assert.matches(msg, err, 1, true)
        end
        -- (PostgreSQL answers the untyped $1 as text)
        assert.equal("5", tostring(assert(
          db:query("SELECT $1 AS a", { n = 1, 5 }))[1].a))
        if engine == "sqlite" then   -- (PostgreSQL: at most 256)
          assert.same({ { a = 5 } },
                      db:query("SELECT $1 AS a", { n = 65535, 5 }))
        end
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

      it("refuses a statement given fewer parameters than it takes"
         .. " (misuse, nothing written), never binding NULL for them",
         function()
        -- { "a", nil, 4 }: # may be 1, and $2, $3 would be NULL (SQLite)
        -- or the session's end, "unknown_outcome" (PostgreSQL)
        local params = { "a" }
        params[3] = 4
        local res, err = db:exec("INSERT INTO t (v, n) SELECT $1, $3"
                                 .. " WHERE CAST($2 AS TEXT) IS NULL", params)
        if #params == 1 then
          assert.is_nil(res)
          assert.equal("misuse", err.kind)
          assert.is_false(err.retryable)
        end
        res, err = db:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "b" })
        assert.is_nil(res)
        assert.equal("misuse", err.kind)
        assert.matches("parameter", err.message)
        res, err = db:atomic({ { "INSERT INTO t (v, n) VALUES ($1, $2)",
                                 { "c" } } })
        assert.is_nil(res)
        assert.equal("misuse", err.kind)
        res, err = db:transaction(function(tx)
          local r, e = tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                               { "d" })
          assert.is_nil(r)
          assert.equal("misuse", e.kind)
          return "went on"
        end)
        assert.equal("went on", res)
        -- the connection serves on, and nothing of the refused ones ran
        assert.same({ { c = 0 } },
                    assert(db:query("SELECT count(*) AS c FROM t")))
        assert(db:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                       { n = 2, "e" }))
        assert.same({ { v = "e" } }, assert(db:query("SELECT v FROM t")))
      end)

      it("raises on a params.n that is no count", function()
        for _, n in ipairs({ -1, 1.5, 0 / 0, math.huge, 1e9, "2" }) do
          assert.has_error(function()
            db:exec("INSERT INTO t (v) VALUES ($1)", { n = n, "a" })
          end, "db:exec: params.n must be a whole number from 0 to 65535")
        end
        assert.has_error(function()
          db:atomic({ { "INSERT INTO t (v) VALUES ($1)", { n = 1e9 } } })
        end, "db:atomic: stmts[1]: params.n must be a whole number from 0"
             .. " to 65535")
        assert.same({ { c = 0 } },
                    assert(db:query("SELECT count(*) AS c FROM t")))
      end)

      it("never truncates a string parameter at a NUL byte", function()
        -- Bound exactly, or refused: never silently cut to "a".
        local res, err = db:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                                 { "a\0b", 1 })
        if res then
          local rows = assert(db:query("SELECT v FROM t WHERE n = 1"))
          assert.equal("a\0b", rows[1].v)
        else
          assert.equal("misuse", err.kind)
          assert.equal(0, db:query("SELECT count(*) AS c FROM t")[1].c)
        end
      end)

      it("refuses a NaN parameter (misuse, nothing runs), never binding"
         .. " NULL for it", function()
        -- SQLite bound a NaN as NULL without a word; PostgreSQL stored it
        -- in a float column, or failed an integer one as bad input
        local nan = 0 / 0
        local ins = "INSERT INTO t (v, n) VALUES ($1, $2)"
        local function refused(what, r, err)
          assert.is_nil(r, what)
          assert.equal("misuse", err.kind, what)
          assert.is_false(err.retryable, what)
          assert.matches("params[2] is NaN", err.message, 1, true)
        end
        refused("exec", db:exec(ins, { "a", nan }))
        refused("query", db:query("SELECT $1 AS a, $2 AS b", { 1, nan }))
        refused("exec with n", db:exec(ins, { n = 2, sql.null, nan }))
        local ok, err = db:transaction(function(tx)
          refused("tx:exec", tx:exec(ins, { "b", nan }))
          refused("tx:query", tx:query("SELECT $1 AS a, $2 AS b", { 1, nan }))
          return true
        end)
        assert.is_true(ok, tostring(err))
        local res, aerr = db:atomic({
          { ins, { "c", 1 } }, { ins, { "d", nan } } })
        refused("atomic", res, aerr)
        assert.equal(2, aerr.index)
        assert.same({ { c = 0 } },
                    assert(db:query("SELECT count(*) AS c FROM t")))
        -- the infinities are numbers each engine keeps as they are
        local rows = assert(db:query("SELECT CAST($1 AS "
          .. (engine == "sqlite" and "REAL" or "DOUBLE PRECISION")
          .. ") AS a", { -1 / 0 }))
        assert.equal(-1 / 0, rows[1].a)
      end)

      it("returns integers past 2^53 exactly, as decimal strings", function()
        -- SQLite's last_id is the rowid: make id that rowid
        assert(db:exec_script("CREATE TABLE big (id "
          .. (engine == "sqlite" and "INTEGER" or "BIGINT")
          .. " PRIMARY KEY, k BIGINT)"))
        local big = { "9007199254740993", "-9223372036854775808",
                      "9223372036854775807", "-9007199254740993" }
        for i, v in ipairs(big) do
          local res = assert(db:exec("INSERT INTO big (id, k) VALUES ($1, $2)"
                                     .. " RETURNING id", { v, v }))
          assert.equal(v, res.last_id, v)
          assert.equal(v, res.rows[1].id, v)
          assert.equal(i, #db:query("SELECT k FROM big"))
        end
        for _, v in ipairs({ 2^53, -2^53, 0, 1 }) do
          assert(db:exec("INSERT INTO big (id, k) VALUES ($1, $2)",
                         { #big + v, v }))
        end
        local rows = assert(db:query("SELECT k FROM big ORDER BY k"))
        local got = {}
        for _, r in ipairs(rows) do
          got[#got + 1] = r.k
        end
        assert.same({ big[2], big[4], -2^53, 0, 1, 2^53, big[1], big[3] }, got)
        assert.equal("number", type(got[6]))
        assert.equal("string", type(got[7]))
        -- computed on the server, too
        local r = assert(db:query("SELECT k + 1 AS s FROM big WHERE k = $1",
                                  { 2^53 }))
        assert.same({ { s = "9007199254740993" } }, r)
      end)

      it("counts changes of an UPDATE", function()
        for i = 1, 3 do
          assert(db:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "r" .. i, i }))
        end
        local res = assert(db:exec("UPDATE t SET n = n + 10 WHERE n >= $1",
                                   { 2 }))
        assert.equal(2, res.changes)
      end)

      it("counts no changes for a statement that changes no row", function()
        -- (SQLite's sqlite3_changes() after DDL is the last write's count,
        -- maybe another job's of the same batch)
        assert(db:exec("INSERT INTO t (v, n) VALUES ('a', 1), ('b', 2)"))
        local res = assert(db:exec("CREATE TABLE IF NOT EXISTS ddl1 (x INT)"))
        assert.equal(0, res.changes)
        res = assert(db:atomic({
          { "CREATE INDEX IF NOT EXISTS ddl1_x ON ddl1 (x)", expect = 0 } }))
        assert.equal(0, res[1].changes)
        assert(db:exec_script("DROP TABLE ddl1"))
      end)

      it("answers a statement run before a schema change with the new"
         .. " shape, never a stale cached plan", function()
        -- one connection: the statements hit its cache of prepared ones
        local d = open(engine, { pool = 1 })
        local function q(s, p)
          local rows, err = d:query(s, p)
          assert(rows, s .. ": " .. tostring(err))
          return rows
        end
        assert(d:exec_script("CREATE TABLE acct (id INT PRIMARY KEY, a TEXT)"))
        assert(d:exec("INSERT INTO acct (id, a) VALUES (1, 'x')"))
        local all = "SELECT * FROM acct WHERE id = $1"
        assert.same({ { id = 1, a = "x" } }, q(all, { 1 }))
        assert(d:exec_script("ALTER TABLE acct ADD COLUMN b INT DEFAULT 7"))
        assert.same({ { id = 1, a = "x", b = 7 } }, q(all, { 1 }))
        assert.same({ { id = 1, a = "x", b = 7 } }, q(all, { 1 }))
        assert(d:exec_script("ALTER TABLE acct DROP COLUMN a"))
        assert.same({ { id = 1, b = 7 } }, q(all, { 1 }))
        if engine == "postgres" then
          local one = "SELECT b FROM acct WHERE id = $1"
          assert.same({ { b = 7 } }, q(one, { 1 }))
          assert(d:exec_script("ALTER TABLE acct ALTER COLUMN b TYPE TEXT"))
          assert.same({ { b = "7" } }, q(one, { 1 }))
        end
        -- a table dropped and made again, other columns
        assert(d:exec_script("DROP TABLE acct;"
                             .. " CREATE TABLE acct (id INT, c TEXT)"))
        local ins = "INSERT INTO acct (id, c) VALUES ($1, $2) RETURNING *"
        assert.same({ { id = 2, c = "y" } }, assert(d:exec(ins, { 2, "y" })).rows)
        assert.same({ { id = 2, c = "y" } }, q(all, { 2 }))
        -- inside a transaction, and in a db:atomic job
        assert(d:exec_script("ALTER TABLE acct ADD COLUMN e INT DEFAULT 3"))
        local got = assert(d:transaction(function(tx)
          local rows = assert(tx:query(all, { 2 }))
          assert(tx:exec("INSERT INTO acct (id, c) VALUES (3, 'z')"))
          return rows
        end))
        assert.same({ { id = 2, c = "y", e = 3 } }, got)
        assert.same({ { id = 3, c = "z", e = 3 } }, q(all, { 3 }))
        assert(d:exec_script("ALTER TABLE acct ADD COLUMN f INT DEFAULT 4"))
        local res = assert(d:atomic({ { ins, { 4, "w" } }, { all, { 2 } } }))
        assert.same({ { id = 4, c = "w", e = 3, f = 4 } }, res[1].rows)
        assert.same({ { id = 2, c = "y", e = 3, f = 4 } }, res[2].rows)
        d:close()
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

      it("tx:has_table answers as db:has_table, a table made in the"
         .. " transaction included", function()
        local schema = engine == "postgres" and "public" or "main"
        assert.is_true(db:has_table("t"))
        assert.is_true(db:has_table(schema .. ".t"))
        assert.is_false(db:has_table("made_here"))
        local seen = assert(db:transaction(function(tx)
          assert(tx:exec("CREATE TABLE made_here (x INTEGER)"))
          local ok, msg = pcall(tx.has_table, tx, "a b")
          assert.is_false(ok)
          assert.matches("tx:has_table: name must be a table name", msg, 1,
                         true)
          return { tx:has_table("t"), tx:has_table(schema .. ".made_here"),
                   tx:has_table("nope") }
        end))
        assert.same({ true, true, false }, seen)
        assert.is_true(db:has_table("made_here"))
      end)

      it("refuses a write through db inside its own transaction at once,"
         .. " naming tx (SQLite would wait for its own COMMIT)", function()
        local t0 = paygate.update_time()
        for _, call in ipairs({
          { "db:exec", function() return db:exec("INSERT INTO t (v, n)"
              .. " VALUES ('inner', 1)") end },
          { "db:atomic", function() return db:atomic({ { "INSERT INTO t"
              .. " (v, n) VALUES ('inner', 1)" } }) end },
          { "db:transaction", function() return db:transaction(
              function() return true end) end },
          { "db:exec_script", function() return db:exec_script(
              "UPDATE t SET n = 2") end },
        }) do
          local ok, err = pcall(db.transaction, db, function(tx)
            assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                           { "outer", 1 }))
            -- a read through db is no write: allowed
            assert(db:query("SELECT count(*) AS c FROM t"))
            return call[2]()
          end)
          assert.is_false(ok, call[1])
          assert.matches(call[1] .. ": called inside this store's own"
                         .. " transaction", tostring(err), 1, true)
          assert.matches("tx:exec", tostring(err), 1, true)
          -- rolled back, and nothing of the inner write either
          assert.equal(0, db:query("SELECT count(*) AS c FROM t")[1].c)
        end
        -- at once, not after tx_timeout
        assert.is_true(paygate.update_time() - t0 < 5)
        -- after the transaction, the same writes work; so does one from
        -- another coroutine while a transaction is open
        assert(db:exec("INSERT INTO t (v, n) VALUES ('after', 1)"))
        local other
        assert(db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ('in', 1)"))
          other = paygate.spawn(function()
            return db:exec("INSERT INTO t (v, n) VALUES ('other', 1)")
          end)
          return true
        end))
        assert(wait_task(other, 5, "the other coroutine's write"))
        assert.equal(3, db:query("SELECT count(*) AS c FROM t")[1].c)
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

      it("runs tx:on_commit functions after the commit, in order, never"
         .. " after a rollback", function()
        local ran = {}
        local a = db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "oc", 1 }))
          tx:on_commit(function()
            -- committed already: another connection sees the row
            ran[#ran + 1] = db:query("SELECT count(*) AS c FROM t")[1].c
          end)
          tx:on_commit(function() error("a raising one: logged") end)
          tx:on_commit(function() ran[#ran + 1] = "second" end)
          assert.same({}, ran)                 -- not before the commit
          return "value"
        end)
        assert.equal("value", a)
        assert.same({ 1, "second" }, ran)
        -- rolled back: by nil, err and by a raised error table
        ran = {}
        assert.is_nil(db:transaction(function(tx)
          tx:on_commit(function() ran[#ran + 1] = "nil, err" end)
          return nil, "no"
        end))
        assert.is_nil(db:transaction(function(tx)
          tx:on_commit(function() ran[#ran + 1] = "raised" end)
          error({ kind = "conflict", message = "no" })
        end))
        assert.same({}, ran)
        -- not a function; after the commit
        local kept
        db:transaction(function(tx)
          assert.has_error(function() tx:on_commit("x") end)
          kept = tx
        end)
        assert.has_error(function() kept:on_commit(function() end) end)
      end)

      it("never reports a commit that did not happen", function()
        -- fn handles a failed statement and goes on: either the commit
        -- succeeds with the good row, or it fails and nothing is there.
        local ok, err = db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "g", 1 }))
          local _, e = tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                               { "bad", -1 })
          assert.equal("constraint", e.kind)
          tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "h", 2 })
          return true
        end)
        local c = db:query("SELECT count(*) AS c FROM t")[1].c
        if ok then
          assert.is_true(c >= 1, "commit reported but no row committed")
        else
          assert.equal(0, c)
          assert.is_table(err)
        end
      end)

      it("goes on after a failed statement, which alone is undone", function()
        local ok, err = db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "g", 1 }))
          local r, e = tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                               { "g", 2 })
          assert.is_nil(r)
          assert.equal("constraint", e.kind)
          -- a script that fails half way is undone as a whole
          r, e = tx:exec_script("INSERT INTO t (v, n) VALUES ('s1', 3);"
                                .. " INSERT INTO t (v, n) VALUES ('s2', -1)")
          assert.is_nil(r)
          assert.equal("constraint", e.kind)
          assert.same({ { c = 1 } }, tx:query("SELECT count(*) AS c FROM t"))
          r, e = tx:query("SELECT nope FROM t")
          assert.equal("syntax", e.kind)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "h", 2 }))
          return "done"
        end, { retries = 1 })
        assert.equal("done", ok, tostring(err))
        assert.same({ { v = "g", n = 1 }, { v = "h", n = 2 } },
                    db:query("SELECT v, n FROM t ORDER BY v"))
        -- and a failure right before COMMIT does not undo the rest
        assert(db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "i", 3 }))
          local _, e = tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                               { "i", 4 })
          assert.equal("constraint", e.kind)
          return true
        end, { retries = 1 }))
        assert.equal(3, db:query("SELECT count(*) AS c FROM t")[1].c)
        -- the first statement fails, then a script, which fails too
        assert(db:transaction(function(tx)
          local _, e = tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                               { "g", 9 })
          assert.equal("constraint", e.kind)
          assert(tx:exec_script("INSERT INTO t (v, n) VALUES ('j', 5)"))
          _, e = tx:exec_script("INSERT INTO t (v, n) VALUES ('k', 6);"
                                .. " INSERT INTO t (v, n) VALUES ('g', 7)")
          assert.equal("constraint", e.kind)
          return true
        end, { retries = 1 }))
        assert.same({ { v = "g" }, { v = "h" }, { v = "i" }, { v = "j" } },
                    db:query("SELECT v FROM t ORDER BY v"))
        local _, e = db:transaction(function(tx)
          return tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "g", 9 })
        end, { retries = 1 })
        assert.equal("constraint", e.kind)
        assert.equal("handled", db:transaction(function(tx)
          local r = tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "g", 9 })
          return r or "handled"
        end, { retries = 1 }))
        assert.equal(4, db:query("SELECT count(*) AS c FROM t")[1].c)
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

      it("raises on a retries bound that is not a whole number >= 1", function()
        for _, bad in ipairs({ 0, -1, 1.5, "3" }) do
          assert.has_error(function()
            db:transaction(function() return true end, { retries = bad })
          end)
        end
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

    -- The coroutine of db:transaction(fn) goes away in the middle (task
    -- cancelled, request deadline): no Lua code runs after that, yet the
    -- writer (SQLite) or the reserved connection (PostgreSQL) must come
    -- back at once, rolled back. Pool size 2, tx_timeout 5 s.
    describe("abandoned transaction", function()
      local adb

      before_each(function()
        adb = open(engine, { pool = 2, tx_timeout = 5000 })
        assert(adb:exec_script(T_SQL[engine]))
      end)

      after_each(function()
        adb:close()
      end)

      local function count()
        return adb:query("SELECT count(*) AS c FROM t")[1].c
      end

      it("is rolled back when cancelled while fn waits, 5 times > pool", function()
        local state = {}
        for i = 1, 5 do
          local t = tx_then_wait(adb, state, i, function()
            paygate.sleep(30)
          end)
          wait_until(function() return state[i] == "in" end, 2,
                     "transaction " .. i .. " to begin")
          t:cancel()
        end
        local t0 = paygate.update_time()
        assert(adb:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "after", 1 }))
        assert.truthy(paygate.update_time() - t0 < 1,
                      "write waited " .. (paygate.update_time() - t0) .. " s")
        assert.equal(1, count())                 -- the 5 inserts are gone
        assert.equal("ok", adb:transaction(function(tx)
          assert(tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "y", 2 }))
          return "ok"
        end))
        for i = 1, 5 do
          assert.equal("in", state[i])
        end
      end)

      it("lets the pool serve 2 transactions at once afterwards", function()
        local state = {}
        for i = 1, 3 do
          local t = tx_then_wait(adb, state, i, function()
            paygate.sleep(30)
          end)
          wait_until(function() return state[i] == "in" end, 2,
                     "transaction " .. i .. " to begin")
          t:cancel()
        end
        two_at_once(adb, engine)
        assert.equal(2, count())
      end)

      it("is dropped when cancelled while its BEGIN still waits", function()
        -- pool 2: two holders take both connections (SQLite: the first
        -- holds the writer), so the third one's BEGIN queues.
        local state = {}
        local holders = {}
        for i = 1, 2 do
          holders[i] = tx_then_wait(adb, state, i, function()
            paygate.sleep(30)
          end)
          if engine == "postgres" then
            wait_until(function() return state[i] == "in" end, 2,
                       "holder " .. i)
          end
        end
        wait_until(function() return state[1] == "in" end, 2, "holder 1")
        local queued = tx_then_wait(adb, state, 3, function()
          paygate.sleep(30)
        end)
        assert.is_nil(state[3])   -- spawn ran it to its BEGIN, which waits
        queued:cancel()
        holders[1]:cancel()
        holders[2]:cancel()
        local t0 = paygate.update_time()
        assert(wait_task(paygate.spawn(function()
          return adb:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "after", 1 })
        end), 1, "a write"))
        -- and two transactions at once: no connection stayed reserved
        two_at_once(adb, engine)
        assert.truthy(paygate.update_time() - t0 < 1,
                      "waited " .. (paygate.update_time() - t0) .. " s")
        assert.equal(3, count())
        assert.is_nil(state[3])
      end)

      it("is rolled back when its coroutine returns with it open", function()
        for _ = 1, 3 do
          local txid = wait_task(paygate.spawn(function()
            local id = assert(adb.h:begin())
            assert(adb.h:tx_exec(id, "INSERT INTO t (v, n) VALUES ($1, $2)",
                                 { "leak", 1 }))
            return id
          end), 2, "begin")
          assert.truthy(txid)
        end
        local t0 = paygate.update_time()
        local tasks = {}
        for i = 1, 2 do
          tasks[i] = paygate.spawn(function()
            return adb:transaction(function(tx)
              return tx:exec("INSERT INTO t (v, n) VALUES ($1, $2)",
                             { "c" .. i, i })
            end)
          end)
        end
        for i = 1, 2 do
          assert.truthy(wait_task(tasks[i], 2, "transaction " .. i))
        end
        assert.truthy(paygate.update_time() - t0 < 1,
                      "waited " .. (paygate.update_time() - t0) .. " s")
        assert.equal(2, count())
      end)

      if engine == "postgres" then
        it("discards the connection when cancelled mid-statement", function()
          local state = {}
          for i = 1, 5 do
            local t = tx_then_wait(adb, state, i, function(tx)
              tx:query("SELECT pg_sleep(3)")
            end)
            wait_until(function() return state[i] == "in" end, 2,
                       "transaction " .. i .. " to begin")
            t:cancel()
          end
          local t0 = paygate.update_time()
          assert.same({ { one = 1 } }, adb:query("SELECT 1 AS one"))
          assert(adb:exec("INSERT INTO t (v, n) VALUES ($1, $2)", { "a", 1 }))
          assert.truthy(paygate.update_time() - t0 < 1,
                        "waited " .. (paygate.update_time() - t0) .. " s")
          assert.equal(1, count())
        end)

        it("leaves no session idle in transaction", function()
          local state = {}
          for i = 1, 4 do
            local t = tx_then_wait(adb, state, i, function()
              paygate.sleep(30)
            end)
            wait_until(function() return state[i] == "in" end, 2,
                       "transaction " .. i .. " to begin")
            t:cancel()
          end
          wait_until(function()
            return adb:query("SELECT count(*) AS c FROM pg_stat_activity"
                             .. " WHERE state = 'idle in transaction'")[1].c
                   == 0
          end, 2, "the ROLLBACKs")
        end)
      end
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

describe("sql.open on SQLite without WAL", function()
  it("refuses :memory: (its readers would be databases of their own),"
     .. " kind config, naming the journal mode", function()
    local db, err = sql.open("sqlite::memory:")
    assert.is_nil(db)
    assert.equal("config", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.matches("cannot use WAL journal mode (it stays in memory mode)",
                   err.message, 1, true)
  end)
end)

-- A wrong password (28P01) is fixed where it came from: the URL, when it
-- gives one (libpq then reads no PGPASSWORD or ~/.pgpass), else the
-- connecting program's environment (from_env, for the caller to say whose
-- environment counts). Was: one sentence for both, "fix it where doctor
-- reads it", as if doctor's password were the one to fix.
describe("sql.login_fix", function()
  local core = require "paygate.core"
  local refused = core.error("config", "postgres: connect: connection to"
    .. ' server at "127.0.0.1", port 5432 failed: FATAL:  28P01: password'
    .. ' authentication failed for user "gw"')

  it("a refused password: the URL's, or the environment's", function()
    for _, url in ipairs({ "postgres://gw:pw@127.0.0.1/gw",
                           "postgresql://gw:p%40w@h1,h2/gw?sslmode=require",
                           "postgres://gw@127.0.0.1/gw?password=pw" }) do
      local fix, why, from_env = sql.login_fix(url, refused, "doctor",
                                               "gateway.db")
      assert.equal("the server refused the password the URL in gateway.db"
                   .. " gives for its user: fix it there", fix, url)
      assert.equal("28P01", why)
      assert.is_nil(from_env)
    end
    for _, url in ipairs({ "postgres://gw@127.0.0.1/gw",
                           "postgres://gw:@127.0.0.1/gw?sslpassword=x",
                           "postgres://127.0.0.1/gw?password=" }) do
      local fix, why, from_env = sql.login_fix(url, refused, "doctor")
      assert.matches("the server refused the password for the URL's user,"
        .. " which the URL does not give: fix it where libpq took it from,"
        .. " PGPASSFILE (default ~/.pgpass of the user running doctor", fix,
        1, true)
      assert.equal("28P01", why)
      assert.is_true(from_env, url)
    end
    local _, why, from_env = sql.login_fix("postgres://gw@h/gw",
      core.error("config", "postgres: connect: fe_sendauth: no password"
                 .. " supplied"))
    assert.same({ "no_password", true }, { why, from_env })
    assert.is_nil(sql.login_fix("sqlite:x.db", refused))
  end)
end)

describe("sql.open options", function()
  local function raises(url, opts, pattern)
    local ok, err = pcall(sql.open, url, opts)
    assert.is_false(ok, pattern)
    assert.truthy(tostring(err):find(pattern, 1, true),
                  tostring(err) .. " lacks " .. pattern)
  end

  local bad = {
    sqlite = { readers = 0, batch_max = "x", busy_timeout = "5",
               tx_timeout = -1, synchronous = 9, retries = 0 },
    postgres = { pool = "x", connect_timeout = "1", query_timeout = 0,
                 down_for = -1, retries = "3" },
  }

  for _, engine in ipairs(engines) do
    it("raises on a mistyped option on " .. engine .. ", naming it", function()
      local url = engine == "sqlite" and "sqlite:" .. tmp .. "/opts.db"
        or (pg_srv or servers.postgres()).url
      pg_srv = pg_srv or (engine == "postgres" and servers.postgres()) or nil
      for name, v in pairs(bad[engine]) do
        raises(url, { [name] = v }, "sql.open: opts." .. name .. " must be")
      end
      if engine == "postgres" then
        raises(url, { pool = 1.5 },
               "sql.open: opts.pool must be an integer from 1 to")
      end
      raises(url, { pol = 4 }, "sql.open: unknown option opts.pol")
      -- the error names the caller's line, not paygate's
      local ok, err = pcall(function() sql.open(url, { retries = 0 }) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("sql_spec.lua:%d+: sql.open: "), err)
      -- an option of the other engine is accepted (one table for both)
      local db = assert(sql.open(url, engine == "sqlite" and { pool = 2 }
                                 or { busy_timeout = 10 }))
      db:close()
    end)
  end

  if servers.have_postgres() then
    it("raises on a mistyped option in a postgres url", function()
      pg_srv = pg_srv or servers.postgres()
      raises(pg_srv.url .. "?pool=x", nil, "sql.open: opts.pool must be")
    end)
  end
end)

describe("paygate.sql on sqlite (engine specifics)", function()
  it("fails to open an unusable path with unavailable", function()
    local db, err = sql.open("sqlite:/nonexistent-dir/x/y.db")
    assert.is_nil(db)
    assert.equal("unavailable", err.kind)
  end)

  it("makes a new database file, its -wal and -shm 0600 under umask 022",
     function()
    -- was: SQLite's 0644 less the umask: a service's store (payments,
    -- what payers bought, the API keys' signing keys) readable by every
    -- local user, while its backups were kept 0600
    local mode = servers.file_mode
    local path = tmp .. "/private.db"
    local ok, db, err = servers.under_umask(18, sql.open,      -- 022
                                            "sqlite:" .. path)
    assert(ok, db)
    assert(db, err)
    assert(db:exec_script("CREATE TABLE t (k INTEGER PRIMARY KEY)"))
    assert(db:exec("INSERT INTO t (k) VALUES (1)"))
    for _, p in ipairs({ path, path .. "-wal", path .. "-shm" }) do
      assert.equal("600", mode(p), p)
    end
    db:close()
    -- a file already there keeps the mode its owner gave it
    servers.sh("chmod 640 '" .. path .. "'")
    db = assert(sql.open("sqlite:" .. path))
    assert.equal(1, db:query("SELECT count(*) AS c FROM t")[1].c)
    assert.equal("640", mode(path))
    db:close()
  end)

  it("raises on an unknown url scheme", function()
    assert.has_error(function() sql.open("mysql://x") end)
  end)

  it("db:backup copies the database to a file, checked, never over one",
     function()
    local db = open("sqlite")
    assert(db:exec_script("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
    for k = 1, 50 do
      assert(db:exec("INSERT INTO t (k, v) VALUES ($1, $2)",
                     { k, ("v"):rep(300) }))
    end
    local dest = tmp .. "/backup_unit.db"
    local info = assert(db:backup(dest))
    assert.equal(4096, info.page_size)
    assert.equal(info.pages * info.page_size, info.bytes)
    -- the rows (in the -wal: the file itself has none yet) are there
    local copy = assert(sql.open("sqlite:" .. dest))
    assert.equal(50, copy:query("SELECT count(*) AS c FROM t")[1].c)
    copy:close()
    assert(db:exec("INSERT INTO t (k, v) VALUES (51, 'x')"))
    local r, err = db:backup(dest)
    assert.is_nil(r)
    assert.equal("unavailable", err.kind)
    assert.equal("sqlite: backup: " .. dest .. " exists (not replaced)",
                 err.message)
    assert(db:backup(dest, { replace = true }))
    copy = assert(sql.open("sqlite:" .. dest))
    assert.equal(51, copy:query("SELECT count(*) AS c FROM t")[1].c)
    copy:close()
    r, err = db:backup(tmp .. "/no-such-dir/x.db")
    assert.is_nil(r)
    assert.equal("unavailable", err.kind)
    assert.matches("cannot make .*/no%-such%-dir/x%.db%.tmp: No such file",
                   err.message)
    assert.has_error(function() db:backup() end,
                     "db:backup: path must be a file name")
    assert.has_error(function() db:backup(dest, true) end,
                     "db:backup: opts must be a table")
    db:close()
  end)

  it("db:close() during a transaction rolls it back and lets the file go"
     .. " at once, not at tx_timeout", function()
    -- (the writer waited in the transaction until tx_timeout: another
    -- handle's writes failed busy meanwhile, and the transaction's own
    -- commit raised 'sqlite: database is closed' from inside paygate)
    local url = "sqlite:" .. tmp .. "/closed_tx.db"
    local db = assert(sql.open(url .. "?tx_timeout=20000"))
    assert(db:exec("CREATE TABLE t (x INTEGER)"))
    local res
    local task = paygate.spawn(function()
      res = { db:transaction(function(tx)
        assert(tx:exec("INSERT INTO t VALUES (1)"))
        paygate.sleep(0.3)
        return tx:exec("INSERT INTO t VALUES (2)")
      end) }
    end)
    paygate.sleep(0.05)
    db:close()
    local other = assert(sql.open(url .. "?busy_timeout=2000"))
    assert(other:exec("INSERT INTO t VALUES (3)"))
    task:wait()
    assert.is_nil(res[1])
    assert.equal("closed", res[2].kind)
    assert.matches("rolled back", res[2].message, 1, true)
    assert.same({ { x = 3 } }, assert(other:query("SELECT x FROM t")))
    other:close()
  end)

  it("classifies a string or blob too big as too_large", function()
    local db = assert(sql.open("sqlite:" .. tmp .. "/toobig.db"))
    -- over SQLite's length limit (1e9 bytes), refused before allocating
    local rows, err = db:query("SELECT zeroblob(2000000000) AS b")
    assert.is_nil(rows)
    assert.equal("too_large", err.kind)
    assert.is_false(err.retryable)
    assert.equal(18, err.code)                 -- SQLITE_TOOBIG
    db:close()
  end)

  if servers.have_postgres() then
    it("classifies PostgreSQL's program limits (class 54) as too_large",
       function()
      pg_srv = pg_srv or servers.postgres()
      local db = assert(sql.open(pg_srv.url, { pool = 1 }))
      -- "requested length too large" (54000), refused before allocating
      local rows, err = db:query("SELECT repeat('x', 1100000000) AS s")
      assert.is_nil(rows)
      assert.equal("too_large", err.kind)
      assert.is_false(err.retryable)
      db:close()
    end)
  end

  it("classifies out of memory as unavailable, retryable", function()
    -- in a process of its own: SQLite's heap limit is the process's and
    -- the pragma can only lower it
    local script = tmp .. "/nomem.lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
      local sql = require "paygate.sql"
      local db = assert(sql.open("sqlite:%s/nomem.db"))
      assert(db:exec("PRAGMA hard_heap_limit = 8000000"))
      local rows, err = db:query("SELECT length(randomblob(50000000)) AS n")
      io.write(rows and "rows" or err.kind .. " " .. tostring(err.retryable)
               .. " " .. tostring(err.code))
    ]]):format(tmp))
    f:close()
    local out = servers.read_cmd((os.getenv("PAYGATE_BIN") or "build/paygate")
                                 .. " exec " .. script .. " 2>&1")
    assert.equal("unavailable true 7", out)    -- SQLITE_NOMEM
  end)

  it("writes queued while another process holds the write lock all fail"
     .. " busy within busy_timeout of their request (not one after"
     .. " another), and a later one still waits its own", function()
    local proc = require "paygate.testing.proc"
    local core = require "paygate.core"
    local file = tmp .. "/held.db"
    local db = assert(sql.open("sqlite:" .. file, { busy_timeout = 400 }))
    assert(db:exec("CREATE TABLE h (id INTEGER PRIMARY KEY)"))
    -- another process: BEGIN IMMEDIATE, then says so (the marker) and
    -- holds the lock until the marker is gone
    local marker = tmp .. "/held.marker"
    local holder = proc.spawn({ "sqlite3", file, "BEGIN IMMEDIATE;",
      "INSERT INTO h VALUES (0);", ".shell touch " .. marker,
      ".shell while [ -e " .. marker .. " ]; do sleep 0.05; done" },
      { watchdog = true })
    local ok, err = pcall(function()
      proc.wait_until(function() return io.open(marker) ~= nil end, 10,
                      "the other process to hold the lock")
      local K, done, kinds = 6, 0, {}
      local t0 = core.mono()
      local last = t0
      for i = 1, K do
        paygate.spawn(function()
          local r, e = db:exec("INSERT INTO h VALUES (?)", { i })
          kinds[#kinds + 1] = r and "ok" or e.kind
          last = core.mono()
          done = done + 1
        end)
      end
      wait_until(function() return done == K end, 30, "the writes")
      for i = 1, K do assert.equal("busy", kinds[i]) end
      -- each waited the whole busy_timeout before: the last after K x
      -- 0.4 s = 2.4 s
      assert.truthy(last - t0 >= 0.35, "waited " .. (last - t0) .. " s")
      assert.truthy(last - t0 < 1.2, "the last failed after "
                    .. (last - t0) .. " s (busy_timeout 0.4 s)")
      -- a write made 0.2 s after another, while that one waits for the
      -- lock, waits its own whole busy_timeout (a deadline shared with
      -- the first failed it at the first's, after 0.2 s of waiting)
      local n2, made, failed = 0, nil, nil
      paygate.spawn(function()
        db:exec("INSERT INTO h VALUES (?)", { 20 })
        n2 = n2 + 1
      end)
      paygate.sleep(0.2)
      paygate.spawn(function()
        made = core.mono()
        local r, e = db:exec("INSERT INTO h VALUES (?)", { 21 })
        assert(not r and e.kind == "busy", tostring(e))
        failed = core.mono()
        n2 = n2 + 1
      end)
      wait_until(function() return n2 == 2 end, 30, "the later writes")
      assert.truthy(failed - made >= 0.35, "the later write waited "
                    .. (failed - made) .. " s (busy_timeout 0.4 s)")
    end)
    os.remove(marker)
    if holder:wait(10) == nil then holder:kill(9) end
    assert(ok, tostring(err))
    -- the lock gone, writes work again
    assert(db:exec("INSERT INTO h VALUES (100)"))
    db:close()
  end)

  -- the monitoring trial: the store failing (PostgreSQL down, a SQLite
  -- disk full) showed on no metric; the notification route answered FAIL
  it("counts the store's failures on paygate_store_errors_total by engine"
     .. " and kind, once each, not the caller's own", function()
    local c = require("paygate.metrics").counter(
      "paygate_store_errors_total", "", { "engine", "kind" })
    local function n(kind) return c:get({ engine = "sqlite", kind = kind }) end
    local file = tmp .. "/counted.db"
    local db = assert(sql.open("sqlite:" .. file))
    local before = {}
    for _, kind in ipairs({ "unavailable", "error", "busy", "constraint",
                            "syntax" }) do
      before[kind] = n(kind)
    end
    assert(db:exec("CREATE TABLE k (v INTEGER PRIMARY KEY)"))
    assert(db:exec("INSERT INTO k VALUES (1)"))
    -- the caller's own: not the store failing
    local _, cerr = db:exec("INSERT INTO k VALUES (1)")
    assert.equal("constraint", cerr.kind)
    local _, serr = db:query("SELECT v FROM nowhere")
    assert.equal("syntax", serr.kind)
    for kind, was in pairs(before) do assert.equal(was, n(kind), kind) end
    -- the store failing: each failed operation counted once (a statement
    -- of a transaction where it failed, not again by the transaction)
    assert(os.remove(file))
    assert.is_nil(db:exec("INSERT INTO k VALUES (2)"))
    assert.equal(before.unavailable + 1, n("unavailable"))
    local ok, terr = db:transaction(function(tx)
      return tx:exec("INSERT INTO k VALUES (3)")
    end)
    assert.is_nil(ok)
    assert.equal("unavailable", terr.kind)
    assert.equal(before.unavailable + 2, n("unavailable"))
    db:close()
  end)

  it("refuses writes once its file was deleted or replaced (unavailable,"
     .. " naming the file): none is acknowledged that a reopen would not"
     .. " find", function()
    for _, how in ipairs({ "deleted", "replaced" }) do
      local file = tmp .. "/moved-" .. how .. ".db"
      local db = assert(sql.open("sqlite:" .. file))
      assert(db:exec("CREATE TABLE m (v INTEGER)"))
      assert(db:exec("INSERT INTO m VALUES (1)"))
      if how == "deleted" then
        assert(os.remove(file))
      else
        local other = assert(sql.open("sqlite:" .. tmp .. "/other.db"))
        assert(other:exec("CREATE TABLE m (v INTEGER)"))
        other:close()
        assert(os.rename(tmp .. "/other.db", file))
      end
      local r, err = db:exec("INSERT INTO m VALUES (2)")
      assert.is_nil(r, how .. ": a write to the " .. how
                    .. " file was acknowledged")
      assert.equal("unavailable", err.kind, tostring(err))
      assert.is_false(err.retryable)
      assert.matches("the database file " .. file .. " was deleted or"
                     .. " replaced", err.message, 1, true)
      local ok, terr = db:transaction(function(tx)
        return assert(tx:exec("INSERT INTO m VALUES (3)"))
      end)
      assert.is_nil(ok)
      assert.equal("unavailable", terr.kind, tostring(terr))
      db:close()
      -- what is at the path now holds none of the refused writes
      local again = assert(sql.open("sqlite:" .. file))
      local rows = again:query("SELECT count(*) AS c FROM m WHERE v > 1")
      if rows then assert.equal(0, rows[1].c) end
      again:close()
    end
  end)

  it("raises on an unknown url scheme without the URL's password",
     function()
    -- a typo'd scheme (postgress://) on a URL that holds a password:
    -- paygate audit verify and paygate apikey print this message
    local ok, msg = pcall(sql.open,
                          "postgress://gw:SECRETMARKER123@127.0.0.1/gw")
    assert.is_false(ok)
    assert.truthy(tostring(msg):find("unknown url scheme", 1, true), msg)
    assert.truthy(tostring(msg):find("postgress://gw@127.0.0.1/gw", 1, true),
                  msg)
    assert.is_nil(tostring(msg):find("SECRETMARKER123", 1, true), msg)
  end)

  it("sqlite_path names the file sql.open opens, for both schemes",
     function()
    for url, want in pairs{
      ["sqlite:var/gw.db"] = "var/gw.db",
      ["sqlite3:var/gw.db"] = "var/gw.db",
      ["sqlite:var/gw.db?inline_reads=0&batch_max=8"] = "var/gw.db",
      ["sqlite3:///srv/pay/gw.db?x=1"] = "/srv/pay/gw.db",
      ["sqlite://rel.db"] = "rel.db",
    } do
      assert.equal(want, sql.sqlite_path(url), url)
    end
    for _, url in ipairs{ "sqlite:", "sqlite3:?x=1", "postgres://h/db",
                          "mysql://x", "var/gw.db" } do
      assert.is_nil(sql.sqlite_path(url), url)
    end
    assert.is_nil(sql.sqlite_path(nil))
    assert.is_nil(sql.sqlite_path({}))
    -- what it names is the file the store writes
    local url = "sqlite3:" .. tmp .. "/named.db?batch_max=4"
    local db = assert(sql.open(url))
    assert(db:exec("CREATE TABLE t (x INTEGER)"))
    db:close()
    local f = assert(io.open(sql.sqlite_path(url), "rb"))
    f:close()
  end)

  -- A deferred foreign key is checked at the outer COMMIT, the batch's:
  -- one write left violating it failed that COMMIT, and so every write of
  -- the group commit with "constraint". Only that write fails now.
  it("fails only the write that leaves a deferred foreign key unmet", function()
    local db = open("sqlite")
    assert(db:exec_script([[
      CREATE TABLE fp (id INTEGER PRIMARY KEY);
      CREATE TABLE fc (id INTEGER PRIMARY KEY, pid INTEGER
        REFERENCES fp (id) DEFERRABLE INITIALLY DEFERRED);
      CREATE TABLE fo (v INTEGER);
      INSERT INTO fp VALUES (1);
    ]]))
    -- four neighbours and bad() queued in one loop turn: one batch
    local function batch(bad)
      local tasks = {}
      for i = 1, 4 do
        tasks[i] = paygate.spawn(function()
          return db:exec("INSERT INTO fo VALUES ($1)", { i })
        end)
      end
      local culprit = paygate.spawn(bad)
      for i = 1, 4 do assert(tasks[i]:wait()) end
      return culprit:wait()
    end
    local r, err = batch(function()
      return db:exec("INSERT INTO fc VALUES (1, 999)")
    end)
    assert.is_nil(r)
    assert.equal("constraint", err.kind)
    assert.matches("FOREIGN KEY", err.message)
    -- the same through a transaction (checked at its COMMIT), a script
    -- and db:atomic
    r, err = batch(function()
      return db:transaction(function(tx)
        assert(tx:exec("INSERT INTO fc VALUES (2, 999)"))
      end)
    end)
    assert.is_nil(r)
    assert.equal("constraint", err.kind)
    r, err = batch(function()
      return db:exec_script("INSERT INTO fc VALUES (3, 999)")
    end)
    assert.is_nil(r)
    assert.equal("constraint", err.kind)
    r, err = batch(function()
      return db:atomic({ { "INSERT INTO fc VALUES (4, 999)" } })
    end)
    assert.is_nil(r)
    assert.equal("constraint", err.kind)
    -- a violation mended before the end commits
    assert(db:transaction(function(tx)
      assert(tx:exec("INSERT INTO fc VALUES (5, 2)"))
      assert(tx:exec("INSERT INTO fp VALUES (2)"))
    end))
    assert.same({ { n = 16 } }, db:query("SELECT count(*) AS n FROM fo"))
    assert.same({ { id = 5 } }, db:query("SELECT id FROM fc"))
  end)

  it("refuses transaction control in SQL, which would commit or undo its neighbours", function()
    local db = open("sqlite")
    assert(db:exec_script("CREATE TABLE tc (k INTEGER)"))
    -- a neighbour's write waits in the same group while we try
    local other = paygate.spawn(function()
      return db:exec("INSERT INTO tc VALUES (1)")
    end)
    for _, stmt in ipairs({ "BEGIN", "COMMIT", "ROLLBACK", "END",
                            "SAVEPOINT x", "RELEASE gw", "SAVEPOINT gw" }) do
      local r, err = db:exec(stmt)
      assert.is_nil(r, stmt)
      assert.equal("misuse", err.kind, stmt)
      r, err = db:query(stmt)
      assert.is_nil(r, stmt)
      assert.equal("misuse", err.kind, stmt)
    end
    local r, err = db:exec_script("BEGIN; INSERT INTO tc VALUES (2); COMMIT;")
    assert.is_nil(r)
    assert.equal("misuse", err.kind)
    assert(other:wait())
    -- the neighbour's row is there, the script's is not, and writes go on
    assert.same({ { k = 1 } }, db:query("SELECT k FROM tc ORDER BY k"))
    assert(db:exec("INSERT INTO tc VALUES (3)"))
    assert(db:transaction(function(tx)
      return tx:exec("INSERT INTO tc VALUES (4)")
    end))
    assert.equal(3, db:query("SELECT count(*) AS c FROM tc")[1].c)
    db:close()
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

  -- The writer ran every interactive transaction of a batch inside its
  -- group commit: a write or a transaction that ended at once was
  -- acknowledged only at the batch's COMMIT, after a transaction begun
  -- behind it in the same batch had idled (up to tx_timeout). A
  -- transaction now has a batch of its own, committed when it ends.
  describe("a transaction that idles", function()
    -- Spawns B: a transaction that inserts 2 and then idles until
    -- released (1.5 s at most: before the change, what came before it
    -- was acknowledged only then). st.b_done is set once it returned.
    local function idler(db, st)
      return paygate.spawn(function()
        local ok = db:transaction(function(tx)
          assert(tx:exec("INSERT INTO g VALUES (2)"))
          local deadline = paygate.update_time() + 1.5
          while not st.release and paygate.update_time() < deadline do
            paygate.sleep(0.005)
          end
          return true
        end)
        st.b_done = true
        return ok
      end)
    end

    -- first() is spawned in the same loop turn as B, and so queued in the
    -- writer's batch just before B's BEGIN (each spawn runs to its first
    -- writer job). Its write must be acknowledged, and visible to reads,
    -- while B is still open.
    local function not_behind(first)
      local db = open("sqlite")
      assert(db:exec_script("CREATE TABLE g (k INTEGER)"))
      local st = {}
      local a = paygate.spawn(function()
        local ok = first(db)
        st.a_done = true
        return ok
      end)
      local b = idler(db, st)
      wait_until(function() return st.a_done end, 1,
                 "the first write's acknowledgement (B idles 1.5 s)")
      assert.is_nil(st.b_done)
      assert.truthy(a:wait())
      -- durable and visible: a read sees it, and not B's uncommitted row
      assert.same({ { k = 1 } }, db:query("SELECT k FROM g ORDER BY k"))
      st.release = true
      assert.truthy(wait_task(b, 5, "B's commit"))
      assert.same({ { k = 1 }, { k = 2 } },
                  db:query("SELECT k FROM g ORDER BY k"))
      db:close()
    end

    it("does not delay the commit of a transaction begun before it",
       function()
      not_behind(function(db)
        return db:transaction(function(tx)
          return tx:exec("INSERT INTO g VALUES (1)")
        end)
      end)
    end)

    it("does not delay a write queued before its BEGIN", function()
      not_behind(function(db)
        return db:atomic({ { "INSERT INTO g VALUES (1)", expect = 1 } })
      end)
    end)
  end)

  it("routes a writing query to the writer", function()
    local db = open("sqlite")
    assert(db:exec_script("CREATE TABLE g (k INTEGER)"))
    local rows = assert(db:query("INSERT INTO g VALUES ($1) RETURNING k", { 9 }))
    assert.same({ { k = 9 } }, rows)
    db:close()
  end)

  it("serves a lookup on the loop thread (inline), seeing every commit",
     function()
    -- (a generous budget: a lookup preempted past 200 us on a busy machine
    -- would send its next runs to the readers, and the counts below are
    -- exact)
    local db = open("sqlite", { inline_reads = 500000 })
    -- a schema of some size: loading it is more than a budget's work,
    -- and must not be cut short (it would be, every time)
    local ddl = {}
    for i = 1, 40 do
      ddl[i] = ("CREATE TABLE s%d (a INTEGER PRIMARY KEY, b TEXT UNIQUE,"
                .. " c REAL, d BLOB); CREATE INDEX s%d_c ON s%d (c, b);")
               :format(i, i, i)
    end
    assert(db:exec_script(table.concat(ddl)))
    assert(db:exec_script("CREATE TABLE g (k INTEGER PRIMARY KEY, v TEXT)"))
    local before = db:stats()
    for i = 1, 50 do
      assert(db:exec("INSERT INTO g VALUES ($1, $2)", { i, "v" .. i }))
      assert.same({ { v = "v" .. i } },
                  db:query("SELECT v FROM g WHERE k = $1", { i }))
    end
    local after = db:stats()
    assert.equal(50, after.reads_inline - before.reads_inline)
    assert.equal(0, after.reads_moved - before.reads_moved)
    -- a query's own error comes back as from a reader
    local rows, err = db:query("SELECT nope FROM g")
    assert.is_nil(rows)
    assert.matches("no such column", err.message)
    db:close()
  end)

  it("moves a query over its inline budget to a reader; the loop runs on",
     function()
    local db = open("sqlite", { inline_reads = 200 })
    -- about a second of SQLite work: far over 200 microseconds
    local SLOW = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1"
      .. " FROM c WHERE x < $1) SELECT count(*) AS n FROM c"
    local rows
    local took, gap = timed_with_ticker(function()
      rows = assert(db:query(SLOW, { 3000000 }))
    end)
    assert.equal(3000000, rows[1].n)
    assert.equal(1, db:stats().reads_moved)
    -- the loop was held for the budget at most, not for the query
    assert.truthy(took > 0.1, "the query took " .. took .. " s")
    assert.truthy(gap < took / 2, ("the loop stalled %.3f s of the"
                  .. " query's %.3f s"):format(gap, took))
    -- cut short twice in a row (the first time might have been a schema
    -- reload), its next runs go to the readers at once: no budget spent
    assert.equal(300000, assert(db:query(SLOW, { 300000 }))[1].n)
    assert.equal(2, db:stats().reads_moved)
    local inline = db:stats().reads_inline
    assert.equal(10, assert(db:query(SLOW, { 10 }))[1].n)
    local st = db:stats()
    assert.equal(2, st.reads_moved)
    assert.equal(inline, st.reads_inline)
    -- and other queries are still served inline after the interruption
    assert.same({ { one = 1 } }, db:query("SELECT 1 AS one"))
    assert.equal(inline + 1, db:stats().reads_inline)
    db:close()
  end)

  it("serves lookups inline again after the schema changed", function()
    -- a schema whose reload takes longer than the budget: the reload
    -- happens inside a cached statement's step, under the budget
    local db = open("sqlite", { inline_reads = 200 })
    local ddl = {}
    for i = 1, 120 do
      ddl[i] = ("CREATE TABLE s%d (a INTEGER PRIMARY KEY, b TEXT UNIQUE,"
                .. " c REAL, d BLOB); CREATE INDEX s%d_c ON s%d (c, b);")
               :format(i, i, i)
    end
    assert(db:exec_script(table.concat(ddl)))
    assert(db:exec_script("CREATE TABLE g (k INTEGER PRIMARY KEY, v TEXT);"
                          .. " INSERT INTO g VALUES (1, 'one')"))
    local LOOKUP = "SELECT v FROM g WHERE k = $1"
    assert.same({ { v = "one" } }, db:query(LOOKUP, { 1 }))
    assert(db:exec_script("CREATE TABLE late (x INTEGER)"))
    -- (a read that took longer than the budget -- the process preempted
    -- mid-read on a loaded machine is enough -- sends the next 64 runs
    -- of its SQL to the readers: so up to 2,000 lookups, until 100 were
    -- served inline; a lookup stuck on the readers after the schema
    -- change would serve none)
    local before = db:stats().reads_inline
    local served, n = 0, 0
    while served < 100 and n < 2000 do
      assert.same({ { v = "one" } }, db:query(LOOKUP, { 1 }))
      n = n + 1
      served = db:stats().reads_inline - before
    end
    assert.truthy(served >= 100, served .. " of " .. n .. " served inline")
    db:close()
  end)

  it("classifies a cached statement that no longer prepares (another"
     .. " connection dropped its column or table) as syntax, as a fresh"
     .. " one", function()
    -- each statement runs once first, so that every connection (the
    -- writer, the inline one, the readers) holds it prepared; SQLite
    -- then prepares it again inside its step, and that fails
    local file = tmp .. "/stale-" .. counter .. ".db"
    counter = counter + 1
    local inl = assert(sql.open("sqlite:" .. file, { inline_reads = 200000 }))
    local rdr = assert(sql.open("sqlite:" .. file, { inline_reads = 0,
                                                      readers = 1 }))
    local other = assert(sql.open("sqlite:" .. file))
    assert(inl:exec_script("CREATE TABLE s (id INTEGER PRIMARY KEY, v TEXT,"
                           .. " w TEXT); INSERT INTO s VALUES (1, 'a', 'b')"))
    local READ, WRITE = "SELECT w FROM s WHERE id = $1",
                        "UPDATE s SET w = $1 WHERE id = 1"
    local function each(want)
      local seen = {}
      local function check(what, r, err)
        if want == "ok" then
          assert(r, what .. ": " .. tostring(err))
        else
          assert.is_nil(r, what)
          assert.equal("syntax", err.kind, what .. ": " .. tostring(err))
          assert.matches("no such column: w", err.message, 1, true)
        end
        seen[#seen + 1] = what
      end
      check("inline read", inl:query(READ, { 1 }))
      check("reader", rdr:query(READ, { 1 }))
      check("write", inl:exec(WRITE, { "c" }))
      local r, err = inl:transaction(function(tx)
        local res, e = tx:exec(WRITE, { "d" })
        if not res then return nil, e end
        res, e = tx:query(READ, { 1 })
        if not res then return nil, e end
        return res
      end)
      check("transaction", r, err)
      local res, aerr = inl:atomic({ { WRITE, { "e" } } })
      if want ~= "ok" then
        assert.equal(1, aerr.index)
        aerr = aerr.cause
      end
      check("atomic", res, aerr)
      return seen
    end
    each("ok")
    assert.equal(1, inl:stats().reads_inline)
    assert(other:exec_script("ALTER TABLE s DROP COLUMN w"))
    each("syntax")
    assert(other:exec_script("ALTER TABLE s ADD COLUMN w TEXT"))
    each("ok")
    inl:close()
    rdr:close()
    other:close()
  end)

  it("gives the log back once a long reader has let it grow: it keeps to"
     .. " about checkpoint_pages again", function()
    -- another process reads in one transaction while the writes go on:
    -- no checkpoint may pass its snapshot, so the log grows far past
    -- checkpoint_pages; once it is gone, the log must not stay that big
    local proc = require "paygate.testing.proc"
    local file = tmp .. "/walgrow.db"
    local PAGES = 50
    local db = assert(sql.open("sqlite:" .. file,
                               { checkpoint_pages = PAGES }))
    assert(db:exec_script("CREATE TABLE g (id INTEGER PRIMARY KEY, b BLOB);"
                          .. " INSERT INTO g (b) VALUES (zeroblob(100))"))
    local function wal_size()
      local f = assert(io.open(file .. "-wal", "rb"))
      local n = f:seek("end")
      f:close()
      return n
    end
    local marker = tmp .. "/walgrow.marker"
    local reader = proc.spawn({ "sqlite3", file, "BEGIN;",
      "SELECT count(*) FROM g;", ".shell touch " .. marker,
      ".shell while [ -e " .. marker .. " ]; do sleep 0.05; done",
      "COMMIT;" }, { watchdog = true })
    local ok, err = pcall(function()
      proc.wait_until(function() return io.open(marker) ~= nil end, 10,
                      "the other process to hold its snapshot")
      local blob = ("w"):rep(8000)
      for _ = 1, 200 do       -- some 400 pages, 8 times checkpoint_pages
        assert(db:exec("INSERT INTO g (b) VALUES ($1)", { blob }))
      end
      assert.truthy(wal_size() > 4 * PAGES * 4096, "the log did not grow")
    end)
    os.remove(marker)
    if reader:wait(10) == nil then reader:kill(9) end
    assert(ok, tostring(err))
    -- writes go on: a checkpoint copies the whole log, the next write
    -- starts it over, and then the file must be cut back
    local limit = 2 * PAGES * (4096 + 24) + 32
    local n = 0
    wait_until(function()
      n = n + 1
      assert(db:exec("INSERT INTO g (b) VALUES ($1)", { "x" }))
      return wal_size() <= limit or n >= 2000
    end, 30, "writes")
    assert.truthy(wal_size() <= limit, "the log stayed at " .. wal_size()
                  .. " bytes after " .. n .. " writes (checkpoint_pages "
                  .. PAGES .. ": " .. limit .. ")")
    db:close()
  end)

  it("sends a query that ran long in one step to the readers next time",
     function()
    local db = open("sqlite", { inline_reads = 200 })
    assert(db:exec_script("CREATE TABLE big (k INTEGER PRIMARY KEY, v TEXT);"
      .. " WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
      .. " WHERE x < 300000) INSERT INTO big SELECT x, hex(x) FROM c"))
    local COUNT = "SELECT count(*) AS n FROM big"
    -- count(*) walks the table in one VM step: nothing can stop it, but it
    -- is not run inline again for a while
    assert.equal(300000, assert(db:query(COUNT))[1].n)
    local st = db:stats()
    assert.equal(300000, assert(db:query(COUNT))[1].n)
    assert.equal(st.reads_inline, db:stats().reads_inline)
    db:close()
  end)

  it("runs no PRAGMA inline (the worker's own connection stays as it is)",
     function()
    local db = open("sqlite")
    local before = db:stats().reads_inline
    assert(db:query("PRAGMA busy_timeout = 3000"))
    assert(db:query("PRAGMA user_version"))
    assert.equal(before, db:stats().reads_inline)
    db:close()
  end)

  it("a query where the caller cannot yield raises, fast or not",
     function()
    local db = open("sqlite")
    local ok, err = pcall(table.sort, { 3, 1, 2 }, function(a, b)
      db:query("SELECT 1 AS one")
      return a < b
    end)
    assert.is_false(ok)
    assert.matches("yield", tostring(err))
    db:close()
  end)

  it("a coroutine reading in a loop still lets the loop run", function()
    local db = open("sqlite")
    assert(db:exec_script("CREATE TABLE g (k INTEGER PRIMARY KEY)"))
    assert(db:exec("INSERT INTO g VALUES (1)"))
    local took, gap = timed_with_ticker(function()
      reads_for(0.2, function()
        assert(db:query("SELECT k FROM g WHERE k = $1", { 1 }))
      end)
    end)
    local st = db:stats()
    -- most ran inline, and every few milliseconds one went to a reader
    -- (a yield); without that, the loop would have stalled for all of it
    assert.truthy(st.reads_inline > 10000, "inline: " .. st.reads_inline)
    -- (a share of the run, not a time: ASan at ctest -j4 saw a 0.27 s gap
    -- in a 4 s run from the machine alone, where an absolute 50 ms failed)
    assert.truthy(gap < took / 2, ("the loop stalled %.3f s of %.3f s")
                  :format(gap, took))
    db:close()
  end)

  it("a coroutine reading in a loop still lets the loop run when it"
     .. " calls paygate.update_time() between reads", function()
    -- the budget is per loop turn: refreshing the cached time (which
    -- code with deadlines does) is not a new turn
    local db = open("sqlite")
    assert(db:exec_script("CREATE TABLE g (k INTEGER PRIMARY KEY)"))
    assert(db:exec("INSERT INTO g VALUES (1)"))
    local took, gap = timed_with_ticker(function()
      reads_for(0.2, function()
        paygate.update_time()
        assert(db:query("SELECT k FROM g WHERE k = $1", { 1 }))
      end)
    end)
    local st = db:stats()
    assert.truthy(st.reads_inline > 10000, "inline: " .. st.reads_inline)
    assert.truthy(gap < took / 2, ("the loop stalled %.3f s of %.3f s")
                  :format(gap, took))
    db:close()
  end)

  it("an inline read answers exactly what a reader answers", function()
    -- the loop thread's read and a reader thread's give the same values
    -- (NULL absent, NUL bytes kept, reals, integers past 2^53 as
    -- strings), no row, many rows, and an error met after some rows
    -- were made leaves no partial answer
    local inl = open("sqlite", { inline_reads = 500000 })
    -- (a second handle on the same file: open() named it t<counter>.db)
    local rdr = assert(sql.open("sqlite:" .. tmp .. "/t" .. counter .. ".db",
                                { inline_reads = 0 }))
    assert(inl:exec_script("CREATE TABLE m (k INTEGER PRIMARY KEY, t TEXT,"
      .. " r REAL, b BLOB, n INTEGER, j TEXT)"))
    for i = 1, 40 do
      assert(inl:exec("INSERT INTO m (k, t, r, b, n, j) VALUES ($1, $2, $3,"
        .. " $4, $5, $6)", { i, i % 3 == 0 and sql.null or ("v" .. i .. "\0x"),
        i + 0.25, ("\0\1"):rep(i), i == 7 and "9223372036854775807" or i,
        i == 30 and "not json" or '{"a":1}' }))
    end
    local before = inl:stats().reads_inline
    for _, q in ipairs({
      { "SELECT * FROM m ORDER BY k" },
      { "SELECT * FROM m WHERE k = $1", { 7 } },
      { "SELECT * FROM m WHERE k = $1", { 99 } },
      { "SELECT k, t FROM m WHERE t IS NULL ORDER BY k" },
      { "SELECT count(*) AS c, sum(r) AS s FROM m" },
    }) do
      local a = assert(inl:query(q[1], q[2]))
      assert.same(assert(rdr:query(q[1], q[2])), a, q[1])
    end
    assert.equal(5, inl:stats().reads_inline - before)
    local big = inl:query("SELECT n FROM m WHERE k = 7")
    assert.same({ { n = "9223372036854775807" } }, big)
    -- an error at the 30th row: nil, err, on both paths alike
    local q = "SELECT k, json_extract(j, '$.a') AS a FROM m ORDER BY k"
    local r1, e1 = inl:query(q)
    local r2, e2 = rdr:query(q)
    assert.is_nil(r1)
    assert.is_nil(r2)
    assert.equal(e2.kind, e1.kind)
    assert.matches("JSON", e1.message)
    -- and the statement serves again afterwards
    assert.same({ { k = 1, a = 1 } }, assert(inl:query(q .. " LIMIT 1")))
    inl:close()
    rdr:close()
  end)

  it("an inline read names its columns as the schema now has them, and"
     .. " each statement its own", function()
    -- the inline connection keeps each cached statement's column names
    -- between reads; SQLite prepares a statement again inside its step
    -- after a schema change, and SELECT * then has other columns
    local db = open("sqlite", { inline_reads = 1000000 })
    assert(db:exec_script("CREATE TABLE c (k INTEGER PRIMARY KEY, a TEXT);"
      .. " INSERT INTO c VALUES (1, 'x'), (2, 'y')"))
    local ALL = "SELECT * FROM c WHERE k = $1"
    local before = db:stats().reads_inline
    assert.same({ { k = 1, a = "x" } }, assert(db:query(ALL, { 1 })))
    assert.same({ { k = 2, a = "y" } }, assert(db:query(ALL, { 2 })))
    -- another statement: its own names (a collision keeps the last)
    assert.same({ { z = 1, k = 1 } },
                assert(db:query("SELECT a AS z, k, k AS z FROM c WHERE k = 1"
                  .. " AND a = $1", { "x" })))
    assert.same({ { z = 1, k = 1 } },
                assert(db:query("SELECT a AS z, k, k AS z FROM c WHERE k = 1"
                  .. " AND a = $1", { "x" })))
    assert(db:exec_script("ALTER TABLE c RENAME COLUMN a TO b;"
      .. " ALTER TABLE c ADD COLUMN d INTEGER DEFAULT 7"))
    assert.same({ { k = 1, b = "x", d = 7 } }, assert(db:query(ALL, { 1 })))
    assert.same({ { k = 2, b = "y", d = 7 } }, assert(db:query(ALL, { 2 })))
    assert(db:exec_script("DROP TABLE c; CREATE TABLE c (k INTEGER PRIMARY"
      .. " KEY, e TEXT); INSERT INTO c VALUES (1, 'w')"))
    assert.same({ { k = 1, e = "w" } }, assert(db:query(ALL, { 1 })))
    assert.equal(7, db:stats().reads_inline - before)
    db:close()
  end)

  it("an inline read of a UTF-16 database answers its text in UTF-8, as a"
     .. " reader does", function()
    -- SQLite keeps text in the file's encoding; a file made elsewhere may
    -- be UTF-16. Read straight from the statement, text must be asked for
    -- as text (converted), not as bytes (the file's UTF-16 as it is).
    local inl = open("sqlite", { inline_reads = 500000 })
    local rdr = assert(sql.open("sqlite:" .. tmp .. "/t" .. counter .. ".db",
                                { inline_reads = 0 }))
    assert(inl:exec_script("PRAGMA encoding = 'UTF-16le';"
      .. " CREATE TABLE u (k INTEGER PRIMARY KEY, t TEXT, b BLOB)"))
    assert.same({ { encoding = "UTF-16le" } },
                assert(rdr:query("PRAGMA encoding")))
    assert(inl:exec("INSERT INTO u (k, t, b) VALUES (1, $1, $2)",
                    { "h\195\169llo \230\148\175\228\187\152", "\0\1raw" }))
    local before = inl:stats().reads_inline
    local q = "SELECT k, t, b, t || '!' AS x FROM u"
    local rows = assert(inl:query(q))
    assert.equal(1, inl:stats().reads_inline - before)
    assert.same({ { k = 1, t = "h\195\169llo \230\148\175\228\187\152",
                    b = "\0\1raw",
                    x = "h\195\169llo \230\148\175\228\187\152!" } }, rows)
    assert.same(assert(rdr:query(q)), rows)
    inl:close()
    rdr:close()
  end)

  it("a finalizer that raises during an inline read leaves no read open:"
     .. " the next reads see every commit", function()
    -- Building the rows allocates Lua objects, hence GC steps and __gc
    -- finalizers; LuaJIT raises a finalizer's error through the
    -- allocation. The statement is then between two steps: left so, it
    -- would hold its read transaction on the inline connection, and
    -- every later inline read would see the data of that moment.
    local db = open("sqlite", { inline_reads = 1000000 })
    assert(db:exec_script("CREATE TABLE m (k INTEGER PRIMARY KEY, a TEXT,"
      .. " b TEXT, c TEXT, d TEXT); WITH RECURSIVE c(x) AS (SELECT 1 UNION"
      .. " ALL SELECT x + 1 FROM c WHERE x < 2000) INSERT INTO m SELECT x,"
      .. " 'a' || x, 'b' || x, 'c' || x, 'd' || x FROM c;"
      .. " CREATE TABLE f (k INTEGER PRIMARY KEY); INSERT INTO f VALUES (1)"))
    local ALL = "SELECT * FROM m ORDER BY k"
    local COUNT = "SELECT count(*) AS n FROM f"
    assert.same({ { n = 1 } }, assert(db:query(COUNT)))
    local armed, raised = false, false
    collectgarbage()
    collectgarbage("stop")
    local ok, err = pcall(function()
      for _ = 1, 200 do
        local p = newproxy(true)
        getmetatable(p).__gc = function()
          if armed and not raised then
            raised = true
            error("finalizer raised")
          end
        end
      end
      for i = 1, 20000 do
        local _ = { {}, "garbage" .. i }           -- work for the GC
      end
      armed = true
      collectgarbage("restart")        -- the read's allocations step it
      local rows = db:query(ALL)
      collectgarbage()                 -- (if the read was done first)
      return rows
    end)
    collectgarbage("restart")
    assert.is_true(raised, "the finalizer ran")
    assert.is_false(ok)
    assert.matches("finalizer raised", tostring(err))
    local before = db:stats().reads_inline
    assert(db:exec("INSERT INTO f VALUES (2)"))
    assert.same({ { n = 2 } }, assert(db:query(COUNT)))
    local rows = assert(db:query(ALL))
    assert.equal(2000, #rows)
    assert.same({ k = 2000, a = "a2000", b = "b2000", c = "c2000",
                  d = "d2000" }, rows[2000])
    assert.equal(2, db:stats().reads_inline - before)
    db:close()
  end)

  it("a finalizer that closes the db during an inline read frees nothing"
     .. " the read still uses", function()
    -- Building the rows allocates Lua objects, hence GC steps and __gc
    -- finalizers; one that closes the db finalizes the inline
    -- connection's statements. An inline read that made its Lua rows
    -- straight from the stepping statement (5a276d2, reverted) then read a
    -- freed statement: heap-use-after-free under ASan, a general
    -- protection fault in sqlite3_column_type without it.
    local db = open("sqlite", { inline_reads = 1000000 })
    local path = db.path
    assert(db:exec_script("CREATE TABLE m (k INTEGER PRIMARY KEY, a TEXT,"
      .. " b TEXT, c TEXT, d TEXT); WITH RECURSIVE c(x) AS (SELECT 1 UNION"
      .. " ALL SELECT x + 1 FROM c WHERE x < 2000) INSERT INTO m SELECT x,"
      .. " 'a' || x, 'b' || x, 'c' || x, 'd' || x FROM c"))
    local ALL = "SELECT * FROM m ORDER BY k"
    assert(db:query("SELECT * FROM m WHERE k = 1"))  -- the inline conn
    local armed, closed = false, false
    collectgarbage()
    collectgarbage("stop")
    local ok, rows, err = pcall(function()
      for _ = 1, 200 do
        local p = newproxy(true)
        getmetatable(p).__gc = function()
          if armed and not closed then
            closed = true
            db:close()
          end
        end
      end
      for i = 1, 20000 do
        local _ = { {}, "garbage" .. i }           -- work for the GC
      end
      armed = true
      collectgarbage("restart")        -- the read's allocations step it
      return db:query(ALL)
    end)
    collectgarbage("restart")
    collectgarbage()
    assert.is_true(closed, "the finalizer ran")
    if ok and rows then
      -- the finalizer ran once the statement was done: whole answer
      assert.equal(2000, #rows)
      assert.same({ k = 2000, a = "a2000", b = "b2000", c = "c2000",
                    d = "d2000" }, rows[2000])
    else
      -- (or before the read began: a closed db, nothing read)
      assert.matches("closed", tostring(ok and err.message or rows))
    end
    local again = assert(sql.open("sqlite:" .. path))
    assert.equal(2000, #assert(again:query(ALL)))
    again:close()
  end)

  it("a task a finalizer starts during an inline read reads without"
     .. " touching the statement that read is stepping", function()
    -- Building the rows runs finalizers (see above); one may start a
    -- task. paygate.spawn ran it at once there, and that task's db:query
    -- came to the inline connection while the outer read was between two
    -- steps: the same SQL reset the outer statement (its read began
    -- again: rows twice), another SQL of its cache slot finalized it
    -- (heap-use-after-free under ASan). A reader served it then; now a
    -- task a finalizer starts runs on the next loop turn (unit/runtime),
    -- after the read, and gets its whole answer.
    local db = open("sqlite", { inline_reads = 1000000 })
    assert(db:exec_script("CREATE TABLE m (k INTEGER PRIMARY KEY, a TEXT,"
      .. " b TEXT, c TEXT, d TEXT); WITH RECURSIVE c(x) AS (SELECT 1 UNION"
      .. " ALL SELECT x + 1 FROM c WHERE x < 2000) INSERT INTO m SELECT x,"
      .. " 'a' || x, 'b' || x, 'c' || x, 'd' || x FROM c"))
    local ALL = "SELECT * FROM m ORDER BY k"
    -- the statement cache's slot of a text: FNV-1a mod 64 (its low six
    -- bits depend only on the low six bits of each step)
    local function slot(s)
      local h = 2166136261 % 64
      for i = 1, #s do
        h = (bit.bxor(h, s:byte(i)) * 16777619) % 64
      end
      return h
    end
    local OTHER, OTHER_K
    for n = 1, 1000 do
      local q = "SELECT count(*) AS n FROM m WHERE k > " .. n
      if slot(q) == slot(ALL) then OTHER, OTHER_K = q, n break end
    end
    assert.is_not_nil(OTHER)
    assert.equal(2000, #assert(db:query(ALL)))       -- the inline conn
    local before
    local reading, started = false, false
    local tasks = {}
    local ok, rows, pause, stepmul
    -- until a finalizer runs during the read (the GC's pace decides)
    for _ = 1, 20 do
      paygate.sleep(0)                 -- a new turn: inline reads' budget
      collectgarbage()
      collectgarbage("stop")
      before = db:stats().reads_inline
      ok, rows = pcall(function()
        for _ = 1, 200 do
          local p = newproxy(true)
          getmetatable(p).__gc = function()
            if reading and not started then
              started = true
              tasks[1] = paygate.spawn(function() return db:query(ALL) end)
              tasks[2] = paygate.spawn(function() return db:query(OTHER) end)
            end
          end
        end
        for i = 1, 20000 do
          local _ = { {}, "garbage" .. i }         -- work for the GC
        end
        -- a big heap (the specs before) would not end a cycle within
        -- the read's allocations: a new cycle at once, and faster
        pause = collectgarbage("setpause", 1)
        stepmul = collectgarbage("setstepmul", 1000)
        collectgarbage("restart")      -- the read's allocations step it
        reading = true
        local r = db:query(ALL)
        reading = false
        return r
      end)
      reading = false
      collectgarbage("restart")
      collectgarbage("setpause", pause)
      collectgarbage("setstepmul", stepmul)
      if started then break end
    end
    assert.is_true(started, "the finalizer ran")
    assert.is_true(ok, rows)
    assert.equal(1, db:stats().reads_inline - before)  -- the outer one
    assert.equal(2000, #assert(tasks[1]:wait()))
    assert.same({ { n = 2000 - OTHER_K } }, assert(tasks[2]:wait()))
    assert.equal(2000, #rows)
    for i = 1, 2000, 97 do
      assert.same({ k = i, a = "a" .. i, b = "b" .. i, c = "c" .. i,
                    d = "d" .. i }, rows[i])
    end
    assert.same({ k = 2000, a = "a2000", b = "b2000", c = "c2000",
                  d = "d2000" }, rows[2000])
    db:close()
  end)

  it("inline_reads = 0 sends every query to the readers", function()
    local db = open("sqlite", { inline_reads = 0 })
    assert(db:exec_script("CREATE TABLE g (k INTEGER)"))
    assert(db:exec("INSERT INTO g VALUES (1)"))
    assert.same({ { k = 1 } }, db:query("SELECT k FROM g"))
    assert.equal(0, db:stats().reads_inline)
    db:close()
  end)

  it("answers a writing query in flight when the handle closes", function()
    -- The reader hands it to the writer, which may already have left.
    for round = 1, 20 do
      local db = open("sqlite", { readers = 1 })
      assert(db:exec_script("CREATE TABLE g (k INTEGER)"))
      local t = paygate.spawn(function()
        return db:query("INSERT INTO g VALUES ($1) RETURNING k", { round })
      end)
      paygate.sleep(0)
      db:close()
      wait_task(t, 2, "the query of round " .. round)
    end
  end)
end)

if servers.have_postgres() then
  describe("paygate.sql on postgres (engine specifics)", function()
    -- A second pool on the same server: what it sees is committed.
    local function other()
      return assert(sql.open(pg_srv.url))
    end

    it("db:backup is refused: pg_dump backs PostgreSQL up", function()
      local db = open("postgres", { pool = 1 })
      assert.has_error(function() db:backup(tmp .. "/pg.db") end,
        "db:backup: SQLite only (back up PostgreSQL with pg_dump)")
      db:close()
    end)

    it("runs ordinary SQL that merely contains transaction words", function()
      local db = open("postgres", { pool = 1 })
      assert(db:exec_script("DROP FUNCTION IF EXISTS gw_f();"
        .. " DROP TABLE IF EXISTS tw"))
      local fn = "CREATE FUNCTION gw_f() RETURNS integer AS $$ BEGIN"
        .. " RETURN 1; END; $$ LANGUAGE plpgsql"
      assert(db:exec_script("CREATE TABLE tw (k INTEGER);\n" .. fn))
      assert(db:exec("COMMENT ON TABLE tw IS 'paid; end of day'"))
      assert(db:exec_script("COMMENT ON TABLE tw IS 'paid;\nbegin'"))
      assert.same({ { f = 1 } }, db:query("SELECT gw_f() AS f"))
      assert(db:transaction(function(tx)
        assert(tx:exec_script("DROP FUNCTION gw_f(); " .. fn))
        return tx:exec("COMMENT ON TABLE tw IS 'rollback; commit'")
      end))
      db:close()
    end)

    it("refuses SQL that leaves a pooled connection inside a transaction", function()
      local db = open("postgres", { pool = 1 })
      local o = other()
      assert(db:exec_script("CREATE TABLE t (k INTEGER, v TEXT)"))
      assert(db:exec("INSERT INTO t VALUES (1, 'x')"))
      local r, err = db:exec_script("UPDATE t SET v = 'a--b'; BEGIN")
      assert.is_nil(r)
      assert.equal("misuse", err.kind)
      r, err = db:exec("BEGIN")
      assert.is_nil(r)
      assert.equal("misuse", err.kind)
      r, err = db:query("START TRANSACTION")
      assert.is_nil(r)
      assert.equal("misuse", err.kind)
      -- rolled back, and the next write on the pool is committed
      assert(db:exec("INSERT INTO t VALUES (2, 'y')"))
      assert.same({ { k = 1, v = "x" }, { k = 2, v = "y" } },
                  o:query("SELECT k, v FROM t ORDER BY k"))
      assert.equal(0, o:query("SELECT count(*) AS c FROM pg_stat_activity"
        .. " WHERE state LIKE 'idle in transaction%'")[1].c)
      o:close()
      db:close()
    end)

    it("fails a transaction whose SQL ended it early", function()
      local db = open("postgres", { pool = 1 })
      local o = other()
      assert(db:exec_script("CREATE TABLE t (k INTEGER)"))
      for _, stmt in ipairs({ "COMMIT", "ROLLBACK", "END" }) do
        local ok, err = db:transaction(function(tx)
          assert(tx:exec("INSERT INTO t VALUES (1)"))
          local r, cerr = tx:exec(stmt)
          assert.is_nil(r, stmt)
          assert.equal("misuse", cerr.kind, stmt)
          return tx:exec("INSERT INTO t VALUES (2)")
        end, { retries = 1 })
        assert.is_nil(ok, stmt)
        assert.equal("misuse", err.kind, stmt)
        -- what ran after the early end was not committed
        assert.equal(0, o:query("SELECT count(*) AS c FROM t WHERE k = 2")[1].c)
      end
      local ok, err = db:transaction(function(tx)
        return tx:exec_script("INSERT INTO t VALUES (3); COMMIT")
      end, { retries = 1 })
      assert.is_nil(ok)
      assert.equal("misuse", err.kind)
      -- the pool is clean: plain writes and transactions commit
      assert(db:exec("INSERT INTO t VALUES (4)"))
      assert(db:transaction(function(tx)
        return tx:exec("INSERT INTO t VALUES (5)")
      end))
      assert.equal(2, o:query("SELECT count(*) AS c FROM t WHERE k >= 4")[1].c)
      o:close()
      db:close()
    end)
  end)
end
