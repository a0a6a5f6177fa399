-- db:transaction(): a failed FIRST statement is undone alone and the
-- transaction goes on, as a failed later one is (docs/storage.md,
-- Transactions). On PostgreSQL the first statement of a transaction once
-- ran without a savepoint and its undo left the next statement failing
-- "current transaction is aborted". Each case runs on a fresh pool (no
-- savepoint command prepared on its connection yet) and on a warm one
-- (a transaction with savepoints ran on the same connection before), on
-- PostgreSQL and, for parity, on SQLite.
local sql = require "paygate.sql"
local servers = require "spec.support.servers"

local engines = { "sqlite" }
if servers.have_postgres() then
  engines[#engines + 1] = "postgres"
end

local tmp = servers.mktemp()
local pg_srv
local counter = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- A fresh handle (PostgreSQL: one connection, so every transaction of a
-- test runs on the same one) with table u holding the row 1.
local function open(engine)
  counter = counter + 1
  local db
  if engine == "sqlite" then
    db = assert(sql.open("sqlite:" .. tmp .. "/f" .. counter .. ".db"))
  else
    pg_srv = pg_srv or servers.postgres()
    db = assert(sql.open(pg_srv.url, { pool = 1 }))
    assert(db:exec_script("DROP TABLE IF EXISTS u"))
  end
  assert(db:exec("CREATE TABLE u (id INT PRIMARY KEY)"))
  assert(db:exec("INSERT INTO u VALUES (1)"))
  return db
end

local function ids(db)
  local out = {}
  for _, r in ipairs(assert(db:query("SELECT id FROM u ORDER BY id"))) do
    out[#out + 1] = r.id
  end
  return out
end

-- Runs a transaction with two statements, the second failing, so that
-- the connection has used (and prepared) its savepoint commands.
local function warm(db)
  assert(db:transaction(function(tx)
    assert(tx:query("SELECT 1 AS one"))
    local _, e = tx:exec("INSERT INTO u VALUES (1)")
    assert.equal("constraint", e.kind)
    return true
  end, { retries = 1 }))
end

for _, engine in ipairs(engines) do
  for _, conn in ipairs({ "fresh", "warm" }) do
    describe("db:transaction on " .. engine .. " (" .. conn
             .. " connection), first statement failing", function()
      local db

      before_each(function()
        db = open(engine)
        if conn == "warm" then warm(db) end
      end)

      after_each(function()
        db:close()
      end)

      it("goes on: later statements succeed and commit", function()
        local ok, err = db:transaction(function(tx)
          local r, e = tx:exec("INSERT INTO u VALUES (1)")
          assert.is_nil(r)
          assert.equal("constraint", e.kind)
          assert(tx:exec("INSERT INTO u VALUES (2)"))
          assert(tx:exec("INSERT INTO u VALUES ($1)", { 3 }))
          assert.same({ { c = 3 } }, tx:query("SELECT count(*) AS c FROM u"))
          return true
        end, { retries = 1 })
        assert.is_true(ok, tostring(err))
        assert.same({ 1, 2, 3 }, ids(db))
      end)

      it("goes on after a missing table", function()
        local ok, err = db:transaction(function(tx)
          local r, e = tx:query("SELECT * FROM no_such_table")
          assert.is_nil(r)
          assert.is_table(e)
          assert(tx:exec("INSERT INTO u VALUES (2)"))
          return "done"
        end, { retries = 1 })
        assert.equal("done", ok, tostring(err))
        assert.same({ 1, 2 }, ids(db))
      end)

      it("goes on after several failures in a row", function()
        local ok, err = db:transaction(function(tx)
          local _, e = tx:exec("INSERT INTO u VALUES (1)")
          assert.equal("constraint", e.kind)
          _, e = tx:exec("INSERT INTO u VALUES (1)")
          assert.equal("constraint", e.kind)
          assert(tx:exec("INSERT INTO u VALUES (2)"))
          _, e = tx:exec("INSERT INTO u VALUES (2)")
          assert.equal("constraint", e.kind)
          assert(tx:exec("INSERT INTO u VALUES (4)"))
          return true
        end, { retries = 1 })
        assert.is_true(ok, tostring(err))
        assert.same({ 1, 2, 4 }, ids(db))
      end)

      it("goes on after a failed script, first or later", function()
        local ok, err = db:transaction(function(tx)
          local _, e = tx:exec_script("INSERT INTO u VALUES (7);"
                                      .. " INSERT INTO u VALUES (1)")
          assert.equal("constraint", e.kind)
          assert(tx:exec("INSERT INTO u VALUES (2)"))
          _, e = tx:exec_script("INSERT INTO u VALUES (8);"
                                .. " INSERT INTO u VALUES (2)")
          assert.equal("constraint", e.kind)
          assert(tx:exec("INSERT INTO u VALUES ($1)", { 3 }))
          return true
        end, { retries = 1 })
        assert.is_true(ok, tostring(err))
        assert.same({ 1, 2, 3 }, ids(db))
      end)

      it("rolls back when fn then returns nil, err", function()
        local ok, err = db:transaction(function(tx)
          local _, e = tx:exec("INSERT INTO u VALUES (1)")
          assert.equal("constraint", e.kind)
          assert(tx:exec("INSERT INTO u VALUES (2)"))
          return nil, e
        end, { retries = 1 })
        assert.is_nil(ok)
        assert.equal("constraint", err.kind)
        assert.same({ 1 }, ids(db))
        -- the connection serves the next transaction
        assert(db:transaction(function(tx)
          return tx:exec("INSERT INTO u VALUES (5)")
        end, { retries = 1 }))
        assert.same({ 1, 5 }, ids(db))
      end)

      it("commits an otherwise empty transaction", function()
        local ok, err = db:transaction(function(tx)
          local _, e = tx:exec("INSERT INTO u VALUES (1)")
          assert.equal("constraint", e.kind)
          return "empty"
        end, { retries = 1 })
        assert.equal("empty", ok, tostring(err))
        assert.same({ 1 }, ids(db))
        -- and the connection is clean for plain statements afterwards
        assert(db:exec("INSERT INTO u VALUES (6)"))
        assert.same({ 1, 6 }, ids(db))
      end)

      it("goes on after a failure, then a statement refused unsent",
         function()
        -- the failure's undo was taken by the refused statement (more
        -- parameters than PostgreSQL takes: nothing sent) and dropped, so
        -- the next one failed "current transaction is aborted"
        local many = { n = 300 }
        for i = 1, 300 do many[i] = i end
        local ok, err = db:transaction(function(tx)
          local _, e = tx:exec("INSERT INTO u VALUES (1)")
          assert.equal("constraint", e.kind)
          if engine == "postgres" then
            _, e = tx:query("SELECT $300::int AS x", many)
            assert.equal("misuse", e.kind)
          end
          assert(tx:exec("INSERT INTO u VALUES (7)"))
          return true
        end, { retries = 1 })
        assert.is_true(ok, tostring(err))
        assert.same({ 1, 7 }, ids(db))
      end)
    end)
  end
end
