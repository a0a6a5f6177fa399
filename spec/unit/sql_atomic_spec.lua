-- db:atomic on every engine: several statements as one durable write, all
-- or none; on SQLite one job of the writer's group commit.
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

local SCHEMA = {
  sqlite = [[
CREATE TABLE acct (id TEXT PRIMARY KEY, bal INTEGER NOT NULL
  CONSTRAINT bal_nonneg CHECK (bal >= 0), version INTEGER NOT NULL);
CREATE TABLE seen (k TEXT PRIMARY KEY);
CREATE TABLE log (id INTEGER PRIMARY KEY, acct TEXT, note TEXT)]],
  postgres = [[
CREATE TABLE acct (id TEXT PRIMARY KEY, bal INTEGER NOT NULL
  CONSTRAINT bal_nonneg CHECK (bal >= 0), version INTEGER NOT NULL);
CREATE TABLE seen (k TEXT PRIMARY KEY);
CREATE TABLE log (id BIGSERIAL PRIMARY KEY, acct TEXT, note TEXT)]],
}

local stores = servers.stores(tmp, SCHEMA, "acct, seen, log")

local function open(engine)
  local db = stores[engine]()
  assert(db:exec("INSERT INTO acct (id, bal, version) VALUES ('A', 100, 1)"))
  return db
end

local wait_until = require("paygate.testing").wait_until

local function count(db, tbl)
  return assert(db:query("SELECT count(*) AS n FROM " .. tbl))[1].n
end

-- A transfer-like job: version-guarded update, a dedupe insert, a log row.
local function job(key, version, amount)
  return {
    { "UPDATE acct SET bal = bal - $2, version = version + 1"
      .. " WHERE id = $1 AND version = $3", { "A", amount, version },
      expect = 1, name = "version" },
    { "INSERT INTO seen (k) VALUES ($1)", { key }, expect = 1,
      name = "dedupe" },
    { "INSERT INTO log (acct, note) VALUES ($1, $2) RETURNING id, note",
      { "A", "paid " .. key }, name = "log" },
  }
end

for _, engine in ipairs(engines) do
  describe("db:atomic on " .. engine, function()
    local db

    before_each(function()
      db = open(engine)
    end)

    after_each(function()
      db:close()
    end)

    it("runs every statement and returns one result each, durable", function()
      local res = assert(db:atomic(job("k1", 1, 10)))
      assert.equal(3, #res)
      assert.equal(1, res[1].changes)
      assert.equal(1, res[2].changes)
      assert.equal(1, res[3].changes)
      assert.equal("paid k1", res[3].rows[1].note)
      assert.equal(res[3].rows[1].id, res[3].last_id)
      local a = assert(db:query("SELECT bal, version FROM acct"))[1]
      assert.same({ bal = 90, version = 2 }, a)
      assert.equal(1, count(db, "seen"))
      assert.equal(1, count(db, "log"))
    end)

    it("an unmet expect (stale version) is a conflict naming the statement, nothing kept", function()
      assert(db:atomic(job("k1", 1, 10)))
      local res, err = db:atomic(job("k2", 1, 10))  -- version is 2 now
      assert.is_nil(res)
      assert.equal("conflict", err.kind)
      assert.equal(1, err.index)
      assert.equal("version", err.name)
      assert.equal("expect", err.reason)
      assert.equal(1, err.expected)
      assert.equal(0, err.got)
      assert.is_false(err.retryable)
      assert.truthy(tostring(err):find("^conflict: statement 1 %(version%)"))
      assert.equal(1, count(db, "seen"))
      assert.equal(1, count(db, "log"))
    end)

    it("a failing 3rd statement leaves nothing of the job", function()
      local stmts = job("k1", 1, 10)
      stmts[3] = { "INSERT INTO log (id, acct, note) VALUES ($1, 'A', 'x')",
                   { 7 } }
      assert(db:exec("INSERT INTO log (id, acct, note) VALUES (7, 'B', 'y')"))
      local res, err = db:atomic(stmts)
      assert.is_nil(res)
      assert.equal("conflict", err.kind)         -- primary key: unique
      assert.equal("unique", err.reason)
      assert.equal(3, err.index)
      assert.is_nil(err.name)
      assert.equal("constraint", err.cause.kind)
      local a = assert(db:query("SELECT bal, version FROM acct"))[1]
      assert.same({ bal = 100, version = 1 }, a)
      assert.equal(0, count(db, "seen"))
      assert.equal(1, count(db, "log"))
    end)

    it("a dedupe insert that must insert: a duplicate is a conflict", function()
      assert(db:atomic(job("k1", 1, 10)))
      local stmts = job("k1", 2, 10)
      stmts[2][1] = "INSERT INTO seen (k) VALUES ($1) ON CONFLICT DO NOTHING"
      local _, err = db:atomic(stmts)
      assert.equal("conflict", err.kind)
      assert.equal(2, err.index)
      assert.equal("dedupe", err.name)
      assert.equal("expect", err.reason)
      assert.equal(0, err.got)
      -- the same without ON CONFLICT: the unique violation
      _, err = db:atomic(job("k1", 2, 10))
      assert.equal("conflict", err.kind)
      assert.equal("unique", err.reason)
      assert.equal("dedupe", err.name)
      assert.same({ bal = 90, version = 2 },
                  assert(db:query("SELECT bal, version FROM acct"))[1])
    end)

    it("other failures keep the statement's own kind", function()
      local stmts = job("k1", 1, 500)            -- balance below zero
      local _, err = db:atomic(stmts)
      assert.equal("constraint", err.kind)
      assert.equal("constraint", err.reason)
      assert.equal(1, err.index)
      assert.truthy(err.constraint)
      stmts = job("k1", 1, 10)
      stmts[2] = { "INSERT INTO nope (k) VALUES ($1)", { "x" } }
      _, err = db:atomic(stmts)
      assert.equal("syntax", err.kind)
      assert.equal(2, err.index)
      assert.equal(0, count(db, "log"))
      assert.same({ bal = 100, version = 1 },
                  assert(db:query("SELECT bal, version FROM acct"))[1])
    end)

    it("expect on a read counts its rows (a guard inside the job)", function()
      local stmts = job("k1", 1, 10)
      table.insert(stmts, 1, { "SELECT id FROM acct WHERE id = $1 AND bal >= $2",
                               { "A", 1000 }, expect = 1, name = "funds" })
      local _, err = db:atomic(stmts)
      assert.equal("conflict", err.kind)
      assert.equal("funds", err.name)
      assert.equal(0, err.got)
      stmts[1][2][2] = 50
      local res = assert(db:atomic(stmts))
      assert.equal(1, res[1].changes)
      assert.equal("A", res[1].rows[1].id)
    end)

    it("binds hostile parameters as values", function()
      local evil = "x'); DELETE FROM acct; --\0tail"
      if engine == "postgres" then
        evil = "x'); DELETE FROM acct; -- \226\128\174 tail"  -- no NUL in pg text
      end
      local res = assert(db:atomic({
        { "INSERT INTO seen (k) VALUES ($1)", { evil }, expect = 1 },
        { sql = "INSERT INTO log (acct, note) VALUES ($1, $2)",
          params = { n = 2, sql.null, evil } },
      }))
      assert.equal(2, #res)
      assert.equal(evil, assert(db:query("SELECT k FROM seen"))[1].k)
      assert.equal(1, count(db, "acct"))
      -- transaction control in the SQL is refused; nothing kept
      local _, err = db:atomic({
        { "INSERT INTO seen (k) VALUES ('y')" }, { "ROLLBACK" } })
      assert.equal("misuse", err.kind)
      assert.equal(2, err.index)
      if engine == "sqlite" then
        assert.equal(1, count(db, "seen"))
      end
    end)

    it("raises on misuse, naming the statement", function()
      local function msg(f)
        local ok, e = pcall(f)
        assert.is_false(ok)
        return tostring(e)
      end
      assert.matches("db:atomic: stmts must be", msg(function() db:atomic("x") end))
      assert.matches("want 1 to 1000 statements", msg(function() db:atomic({}) end))
      assert.matches("stmts%[2%] must be a table",
                     msg(function() db:atomic({ { "SELECT 1" }, 5 }) end))
      assert.matches("stmts%[1%]: sql must be a string",
                     msg(function() db:atomic({ { 5 } }) end))
      assert.matches("stmts%[1%]: params%[2%] cannot be bound",
                     msg(function() db:atomic({ { "SELECT $1", { 1, {} } } }) end))
      assert.matches("stmts%[1%]: params%[1%] cannot be bound %(a userdata",
                     msg(function() db:atomic({ { "SELECT $1", { io.stdout } } }) end))
      assert.matches("expect must be a whole number",
                     msg(function() db:atomic({ { "SELECT 1", expect = -1 } }) end))
      assert.matches("sql_atomic_spec.lua", msg(function() db:atomic({}) end))
      -- nothing was queued by the raising calls
      assert.equal(0, count(db, "seen"))
    end)

    it("concurrent jobs: one failing does not disturb the others", function()
      local tasks, n = {}, 20
      for i = 1, n do
        tasks[i] = paygate.spawn(function()
          local stmts = {
            { "INSERT INTO seen (k) VALUES ($1)", { "c" .. i }, expect = 1 },
            { "INSERT INTO log (acct, note) VALUES ('A', $1)", { "c" .. i } },
          }
          if i % 4 == 0 then
            stmts[3] = { "UPDATE acct SET bal = bal WHERE id = 'none'", nil,
                         expect = 1 }
          end
          return db:atomic(stmts)
        end)
      end
      for i = 1, n do
        wait_until(function() return tasks[i]:finished() end, 10, "job " .. i)
        local res, err = tasks[i]:wait()
        if i % 4 == 0 then
          assert.equal("conflict", err.kind)
          assert.equal(3, err.index)
        else
          assert(res, tostring(err))
          assert.equal(2, #res)
        end
      end
      assert.equal(15, count(db, "seen"))
      assert.equal(15, count(db, "log"))
      assert.equal(0, #assert(db:query("SELECT k FROM seen WHERE k IN ('c4', 'c8')")))
    end)

    if engine == "sqlite" then
      it("joins the group commit: a failing job and a good one share one commit", function()
        local before = db:stats()
        local started, tasks = 0, {}
        assert(db:transaction(function(tx)
          -- the writer serves this transaction: the jobs below queue
          -- behind it and run in the next batch, both together (the
          -- transaction's batch is its own, committed when it ends)
          assert(tx:exec("INSERT INTO seen (k) VALUES ('tx')"))
          for i = 1, 2 do
            tasks[i] = paygate.spawn(function()
              started = started + 1
              local stmts = {
                { "INSERT INTO seen (k) VALUES ($1)", { "g" .. i } },
                { "INSERT INTO log (acct, note) VALUES ('A', $1)", { "g" .. i } },
                { "UPDATE acct SET version = version + 1 WHERE id = 'A'"
                  .. " AND version = $1", { i == 1 and 1 or 99 }, expect = 1 },
              }
              return db:atomic(stmts)
            end)
          end
          wait_until(function() return started == 2 end, 5, "both jobs queued")
        end))
        for i = 1, 2 do
          wait_until(function() return tasks[i]:finished() end, 10, "job " .. i)
        end
        assert.equal(3, #assert(tasks[1]:wait()))
        local _, err = tasks[2]:wait()
        assert.equal("conflict", err.kind)
        assert.equal(3, err.index)
        local after = db:stats()
        -- the transaction's fsync, and one for both jobs
        assert.equal(2, after.commits - before.commits)
        assert.equal(2, after.writes - before.writes)     -- tx + job 1
        assert.same({ { k = "g1" }, { k = "tx" } },
                    assert(db:query("SELECT k FROM seen ORDER BY k")))
        assert.equal(1, count(db, "log"))
      end)
    end
  end)
end

if servers.have_postgres() then
  describe("db:atomic on postgres, pipelined", function()
    local proc = require "spec.support.proc"
    local db, relay, turns_file

    setup(function()
      local srv = servers.postgres()
      local target = assert(tonumber(srv.url:match(":(%d+)/")))
      local port = servers.free_port()
      turns_file = tmp .. "/turns"
      relay = proc.spawn({ "python3", "spec/support/turn_proxy.py",
                           tostring(port), tostring(target), turns_file,
                           "120" })
      proc.wait_until(function()
        return proc.read(turns_file) ~= ""
      end, 10, "the relay")
      db = assert(sql.open(srv.url:gsub(":%d+/", ":" .. port .. "/", 1)
                           .. "?pool=1"))
      assert(db:exec_script("DROP TABLE IF EXISTS acct, seen, log;\n"
                            .. SCHEMA.postgres))  -- connected through it
      assert(db:exec("INSERT INTO acct (id, bal, version) VALUES ('A', 100, 1)"))
    end)

    teardown(function()
      if db then db:close() end
      if relay then relay:stop() end
    end)

    local function turns() return tonumber(proc.read(turns_file)) end

    it("sends a job's statements together: BEGIN with them, COMMIT", function()
      assert(db:exec("DELETE FROM log"))
      local stmts = {}
      for i = 1, 20 do
        stmts[i] = { "INSERT INTO log (acct, note) VALUES ('P', $1)",
                     { "n" .. i }, expect = 1 }
      end
      local before, trips = turns(), db:stats().round_trips
      assert(db:atomic(stmts))
      -- one statement at a time would be 22 round trips
      proc.wait_until(function() return turns() >= before + 2 end, 5,
                      "the relay's count")
      assert.equal(before + 2, turns())
      -- and the server answers BEGIN and the 20 as one (one Sync, not
      -- one each)
      assert.equal(trips + 2, db:stats().round_trips)
      assert.equal(20, count(db, "log"))
    end)

    it("more statements than one connection pipelines (64) run in order", function()
      assert(db:exec("DELETE FROM log"))
      local stmts = {}
      for i = 1, 150 do
        stmts[i] = { "INSERT INTO log (acct, note) VALUES ('P', $1)"
                     .. " RETURNING id", { "n" .. i }, expect = 1 }
      end
      local trips = db:stats().round_trips
      local res = assert(db:atomic(stmts))
      -- BEGIN + 63, 64 and 23 statements, COMMIT
      assert.equal(trips + 4, db:stats().round_trips)
      assert.equal(150, #res)
      for i = 2, 150 do
        assert.is_true(tonumber(res[i].last_id) > tonumber(res[i - 1].last_id))
      end
      local rows = assert(db:query("SELECT note FROM log ORDER BY id"))
      assert.equal(150, #rows)
      assert.equal("n1", rows[1].note)
      assert.equal("n150", rows[150].note)
    end)

    it("the first failure decides, the statements after it are undone, the connection serves on", function()
      assert(db:exec("DELETE FROM log"))
      assert(db:exec("DELETE FROM seen"))
      assert(db:exec("INSERT INTO seen (k) VALUES ('dup')"))
      local res, err = db:atomic({
        { "INSERT INTO log (acct, note) VALUES ('P', 'a')" },
        { "UPDATE acct SET bal = bal WHERE id = 'nobody'", expect = 1,
          name = "guard" },
        { "INSERT INTO seen (k) VALUES ('dup')", name = "dupe" },
        { "INSERT INTO log (acct, note) VALUES ('P', 'b')" },
      })
      assert.is_nil(res)
      assert.equal("conflict", err.kind)
      assert.equal(2, err.index)                -- not the later unique one
      assert.equal("guard", err.name)
      _, err = db:atomic({
        { "INSERT INTO log (acct, note) VALUES ('P', 'a')" },
        { "INSERT INTO seen (k) VALUES ('dup')", name = "dupe" },
        { "INSERT INTO nope (k) VALUES (1)" },  -- fails too: aborted
      })
      assert.equal(2, err.index)
      assert.equal("unique", err.reason)
      assert.equal(0, count(db, "log"))
      assert(db:atomic({ { "INSERT INTO log (acct, note) VALUES ('P', 'c')",
                           expect = 1 } }))
      assert.equal(1, count(db, "log"))
    end)

    -- transaction control in a job's SQL is misuse; the statements after
    -- it, already sent, must not run outside the transaction (each one
    -- committed on its own), nor their job be reported done
    for _, word in ipairs({ "ROLLBACK", "COMMIT" }) do
      it("a " .. word .. " in a job's SQL fails it, and what follows it is not kept", function()
        assert(db:exec("DELETE FROM log"))
        local res, err = db:atomic({
          { "INSERT INTO log (acct, note) VALUES ('P', 'before')" },
          { word },
          { "INSERT INTO log (acct, note) VALUES ('P', 'after1')" },
          { "INSERT INTO log (acct, note) VALUES ('P', 'after2')" },
        })
        assert.is_nil(res)
        assert.equal("misuse", err.kind)
        local rows = assert(db:query("SELECT note FROM log WHERE note"
                                     .. " LIKE 'after%'"))
        assert.equal(0, #rows)
        assert.equal(2, err.index)
        assert(db:atomic({ { "INSERT INTO log (acct, note) VALUES ('P', 'c')",
                             expect = 1 } }))
      end)
    end

    -- The batch's statements run in the job's transaction itself, not
    -- each in a savepoint (a subtransaction each, for nothing: one failing
    -- fails the job). A row written in a savepoint carries the
    -- subtransaction's id as its xmin, not the transaction's.
    it("runs a job's statements in its transaction, no savepoint each", function()
      assert(db:exec("DELETE FROM log"))
      assert(db:atomic({
        { "INSERT INTO log (acct, note) VALUES ('X', 'a')" },
        { "INSERT INTO log (acct, note) VALUES ('X',"
          .. " pg_current_xact_id()::text)" },
      }))
      local rows = assert(db:query("SELECT note, xmin::text AS xmin FROM log"
                                   .. " WHERE acct = 'X' ORDER BY id"))
      assert.equal(2, #rows)
      local top = tonumber(rows[2].note) % 2 ^ 32   -- xmin is 32 bits
      assert.equal(top, tonumber(rows[1].xmin))
      assert.equal(top, tonumber(rows[2].xmin))
    end)

    -- so transaction control in a job's SQL is refused before anything
    -- of the job is sent, however it is spelt: not even its BEGIN
    it("refuses transaction control in any spelling before sending the job", function()
      assert(db:exec("DELETE FROM log"))
      for _, word in ipairs({ "commit", "  /* a /* nested */ one */ ROLLBACK",
                              "-- a note\nEND", "savepoint s1",
                              "RELEASE s1", "PREPARE /* c */\n TRANSACTION 'x'",
                              ";COMMIT", " ; ;COMMIT", "-- x\rCOMMIT",
                              ";ROLLBACK",
                              "start transaction", "Abort", "BEGIN" }) do
        local before = turns()
        local res, err = db:atomic({
          { "INSERT INTO log (acct, note) VALUES ('P', 'before')" },
          { word },
          { "INSERT INTO log (acct, note) VALUES ('P', 'after')" },
        })
        assert.is_nil(res, word)
        assert.equal("misuse", err.kind, word)
        assert.equal(2, err.index, word)
        assert.equal(before, turns(), word)
      end
      assert.equal(0, count(db, "log"))
      -- so is a parameter PostgreSQL cannot take (a NUL byte in text)
      local trips = db:stats().round_trips
      local res, err = db:atomic({
        { "INSERT INTO log (acct, note) VALUES ('P', 'before')" },
        { "INSERT INTO log (acct, note) VALUES ('P', $1)", { "a\0b" } },
      })
      assert.is_nil(res)
      assert.equal("misuse", err.kind)
      assert.equal(2, err.index)
      assert.matches("NUL", err.message)
      assert.equal(trips, db:stats().round_trips)
      assert.equal(0, count(db, "log"))
      -- the words elsewhere, or a PREPARE of a statement, are not refused
      assert(db:atomic({
        { "/* commit */ INSERT INTO log (acct, note) VALUES ('P', 'end')" },
        { "PREPARE transactional AS SELECT 1" },
        { "DEALLOCATE transactional" },
      }))
      assert.equal(1, count(db, "log"))
    end)

    it("a statement first seen behind a failure is prepared again next time", function()
      assert(db:exec("DELETE FROM log"))
      assert(db:exec("DELETE FROM seen"))
      assert(db:exec("INSERT INTO seen (k) VALUES ('dup2')"))
      -- the second one's Parse is skipped: the transaction is aborted
      local fresh = "INSERT INTO log (note, acct) VALUES ($1, 'fresh')"
      local _, err = db:atomic({
        { "INSERT INTO seen (k) VALUES ('dup2')" },
        { fresh, { "x" } },
      })
      assert.equal(1, err.index)
      assert(db:atomic({ { fresh, { "y" }, expect = 1 } }))
      assert(db:atomic({ { fresh, { "z" }, expect = 1 } }))
      assert.equal(2, count(db, "log"))
    end)

    it("past the 64 in flight, nothing after a failure is sent, and the connection serves on", function()
      assert(db:exec("DELETE FROM seen"))
      assert(db:exec_script("DROP SEQUENCE IF EXISTS after_fail;"
                            .. " CREATE SEQUENCE after_fail"))
      assert(db:exec("INSERT INTO seen (k) VALUES ('dup3')"))
      local pid = assert(db:query("SELECT pg_backend_pid() AS p"))[1].p
      -- nextval is not undone by a rollback: it tells what ran
      local stmts = { { "SELECT nextval('after_fail')" },
                      { "INSERT INTO seen (k) VALUES ('dup3')", name = "dupe" } }
      for i = 3, 200 do
        stmts[i] = { "SELECT nextval('after_fail')" }
      end
      local res, err = db:atomic(stmts)
      assert.is_nil(res)
      assert.equal(2, err.index)
      assert.equal("unique", err.reason)
      -- statements 3..63 went out in its segment (skipped); none after
      -- them was sent, nor run in the transaction after an undo
      assert.equal(2, assert(db:query("SELECT nextval('after_fail') AS v"))[1].v)
      -- its rollback went through: the same session serves on
      assert.equal(pid, assert(db:query("SELECT pg_backend_pid() AS p"))[1].p)
      assert(db:atomic({ { "INSERT INTO seen (k) VALUES ('after3')", expect = 1 } }))
      assert.equal(2, count(db, "seen"))
    end)

    -- The server flushes a segment's answers every 8 KB: big rows ahead
    -- of a failure make them come in several reads. The next segment
    -- starts only once the whole one before is answered, so it is never
    -- cut short by the failure, without its Sync (the connection was
    -- then lost to a pipeline left aborted).
    it("a failure behind big answers stops the job cleanly past 64 statements", function()
      assert(db:exec_script("DROP SEQUENCE IF EXISTS after_big;"
                            .. " CREATE SEQUENCE after_big"))
      local pid = assert(db:query("SELECT pg_backend_pid() AS p"))[1].p
      local stmts = {}
      for i = 1, 40 do
        stmts[i] = { "SELECT repeat('x', 4000)" }
      end
      stmts[41] = { "SELECT 1 / 0", name = "zero" }
      for i = 42, 130 do
        stmts[i] = { "SELECT nextval('after_big')" }
      end
      local res, err = db:atomic(stmts)
      assert.is_nil(res)
      assert.equal(41, err.index)
      assert.equal("zero", err.name)
      assert.equal(1, assert(db:query("SELECT nextval('after_big') AS v"))[1].v)
      assert.equal(pid, assert(db:query("SELECT pg_backend_pid() AS p"))[1].p)
    end)

    -- A serialization failure runs the job again (db.retries times), as
    -- db:transaction does; nextval, not undone by a rollback, makes the
    -- first try fail and the second pass
    it("runs a job again after a serialization failure", function()
      assert(db:exec("DELETE FROM log"))
      assert(db:exec_script("DROP SEQUENCE IF EXISTS retry_seq;"
                            .. " CREATE SEQUENCE retry_seq"))
      local function raise(cond)
        return { "DO $$ BEGIN IF " .. cond .. " THEN RAISE EXCEPTION"
                 .. " 'try again' USING ERRCODE = '40001'; END IF; END $$",
                 name = "flaky" }
      end
      local trips = db:stats().round_trips
      assert(db:atomic({
        { "INSERT INTO log (acct, note) VALUES ('R', 'once')" },
        raise("nextval('retry_seq') = 1"),
      }))
      -- BEGIN with the job, ROLLBACK, again, COMMIT
      assert.equal(trips + 4, db:stats().round_trips)
      assert.same({ { note = "once" } }, assert(db:query(
        "SELECT note FROM log WHERE acct = 'R'")))
      -- failing every time: the last failure is the answer
      trips = db:stats().round_trips
      local _, err = db:atomic({
        { "INSERT INTO log (acct, note) VALUES ('R', 'never')" },
        raise("true"),
      })
      assert.equal("serialization", err.kind)
      assert.equal(2, err.index)
      assert.equal("flaky", err.name)
      assert.equal(trips + 2 * db.retries, db:stats().round_trips)
      assert.equal(1, count(db, "log"))
    end)

    -- prepared statements on the server, once the DEALLOCATEs pending
    -- went out (behind a statement: the count's first run carries them,
    -- its second, a cache hit, sees the result)
    local function prepared()
      local q = "SELECT count(*) AS n FROM pg_prepared_statements"
      assert(db:query(q))
      return assert(db:query(q))[1].n
    end

    it("prepared statements pushed out of the cache are deallocated on the server", function()
      -- 200 distinct statements, three rounds: each use past the cache's
      -- 64 pushes another out and prepares again. The server keeps what
      -- the cache holds (and the 3 savepoint commands and tx_timeout's
      -- SET LOCAL), not one per Parse (it kept 602 before).
      for _ = 1, 3 do
        for i = 1, 200 do
          assert.equal(i, assert(db:query("SELECT " .. i .. " AS v"))[1].v)
        end
        -- inside transactions too, one of them rolled back: a
        -- DEALLOCATE is not undone with it
        for i = 201, 210 do
          assert(db:atomic({ { "SELECT " .. i .. " AS v" } }))
        end
        db:transaction(function(tx)
          for i = 211, 220 do
            assert(tx:query("SELECT " .. i .. " AS v"))
          end
          return nil, "roll back"
        end)
      end
      local n = prepared()
      assert.is_true(n <= 64 + 4, "prepared on the server: " .. n)
      -- what was pushed out comes back, what stayed is used as it is
      for i = 1, 200 do
        assert.equal(i, assert(db:query("SELECT " .. i .. " AS v"))[1].v)
      end
    end)

    it("a failed job rolls back with DEALLOCATEs pending, and none is lost behind the failure", function()
      -- In an aborted transaction every command but ROLLBACK fails:
      -- a DEALLOCATE sent ahead of the job's ROLLBACK failed, and the
      -- ROLLBACK never ran (the session stayed in the aborted
      -- transaction and was discarded); one sent with a statement
      -- behind the failure was skipped, its statement left on the
      -- server.
      local pid = assert(db:query("SELECT pg_backend_pid() AS p"))[1].p
      local function fill(from)
        -- every entry of the cache in use, each one's Parse done: the
        -- next statement missing it pushes one out
        for i = from, from + 199 do
          assert(db:query("SELECT " .. i .. " AS v"))
        end
      end
      for round = 1, 3 do
        -- the job alone: its ROLLBACK pushes an entry out
        fill(10000 * round)
        local res, err = db:atomic({ { "SELECT 1/0 AS boom" } })
        assert.is_nil(res)
        assert.equal(1, err.index)
        -- the rollback went through: the same session serves on
        assert.equal(pid, assert(db:query("SELECT pg_backend_pid() AS p"))[1].p)
        -- statements behind the failure push entries out
        fill(10000 * round + 1000)
        local stmts = { { "SELECT 1/0 AS boom" } }
        for i = 1, 30 do
          stmts[#stmts + 1] = { "SELECT " .. (10000 * round + 5000 + i) .. " AS v" }
        end
        res, err = db:atomic(stmts)
        assert.is_nil(res)
        assert.equal(1, err.index)
        assert.equal(pid, assert(db:query("SELECT pg_backend_pid() AS p"))[1].p)
      end
      local n = prepared()
      assert.is_true(n <= 64 + 4, "prepared on the server: " .. n)
    end)

    it("a statement that refuses a pipeline (VACUUM) runs with DEALLOCATEs riding along", function()
      -- A DEALLOCATE executed ahead of it in its pipeline made the
      -- server refuse it ("cannot be executed within a pipeline").
      for round = 1, 3 do
        for i = 1, 200 do
          assert(db:query("SELECT " .. (100000 * round + i) .. " AS v"))
        end
        assert(db:exec("VACUUM log"))
        assert(db:exec("VACUUM seen"))
      end
    end)

    it("a connection lost mid-job fails the job as unavailable and the pool reconnects", function()
      assert(db:exec("DELETE FROM log"))
      local res, err = db:atomic({
        { "INSERT INTO log (acct, note) VALUES ('P', 'lost')" },
        { "SELECT pg_terminate_backend(pg_backend_pid())" },
        { "INSERT INTO log (acct, note) VALUES ('P', 'after')" },
      })
      assert.is_nil(res)
      assert.equal("unavailable", err.kind)
      assert.equal(0, count(db, "log"))
      assert(db:atomic({ { "INSERT INTO log (acct, note) VALUES ('P', 'ok')",
                           expect = 1 } }))
      assert.equal(1, count(db, "log"))
    end)
  end)
end
