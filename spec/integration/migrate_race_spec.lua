-- Several workers migrating one fresh database at once (SQLite: an empty
-- file; PostgreSQL: an empty database): every process succeeds, each
-- migration is applied exactly once in all, and the migrations' effects
-- are there once. (Workers creating the file itself at the same moment:
-- storage_first_start_spec.)
local core = require "paygate.core"
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"
local PROCS = 5

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- Three migrations: a table, a slow one (many rows, so the others have
-- to wait for it), and one that is visibly not idempotent.
local function make_dir(engine)
  local dir = tmp .. "/mig"
  servers.sh("mkdir -p " .. dir .. "/" .. engine)
  local d = dir .. "/" .. engine .. "/"
  write(d .. "001_hits.sql", "CREATE TABLE hits (n INTEGER NOT NULL);"
        .. " CREATE TABLE bulk (n INTEGER NOT NULL)")
  if engine == "sqlite" then
    write(d .. "002_bulk.sql", "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL"
          .. " SELECT n + 1 FROM c WHERE n < 200000)"
          .. " INSERT INTO bulk (n) SELECT n FROM c")
  else
    write(d .. "002_bulk.sql", "INSERT INTO bulk (n)"
          .. " SELECT generate_series(1, 200000)")
  end
  write(d .. "003_hit.sql", "INSERT INTO hits (n) VALUES (1)")
  return dir
end

-- Waits for each process, asserts it exited 0; returns their outputs.
local function wait_all(list, what)
  local outs = {}
  for i, p in ipairs(list) do
    local rc = p:wait(60)
    if rc == nil then
      p:kill(proc.SIGKILL)
      p:wait(5)
    end
    outs[i] = proc.read(p.log)
    assert(rc == 0, what .. " " .. i .. " exited with " .. tostring(rc)
           .. ": " .. outs[i])
  end
  return outs
end

local engines = {
  sqlite = function()
    local url = "sqlite:" .. tmp .. "/fresh.db"
    assert(sql.open(url)):close()
    return url
  end,
}
if servers.have_postgres() then
  engines.postgres = function() return servers.postgres().url end
end

for engine, new_url in pairs(engines) do
  describe("paygate.migrate by " .. PROCS .. " processes at once on "
           .. engine, function()
    it("applies each migration exactly once and every process succeeds",
       function()
      local url, dir = new_url(), make_dir(engine)
      local start_at = core.time() + 1.0
      local list = {}
      for i = 1, PROCS do
        list[i] = proc.spawn({ BIN, "exec", "spec/support/migrator.lua", url,
                               dir, string.format("%.3f", start_at) },
                             { log = tmp .. "/" .. engine .. i .. ".out" })
      end
      local counts, text = {}, wait_all(list, "migrator")
      for i, out in ipairs(text) do
        local applied = out:match("applied=([%d,]*)")
        assert(applied, "migrator " .. i .. ": " .. out)
        for v in applied:gmatch("%d+") do
          counts[v] = (counts[v] or 0) + 1
        end
      end
      assert.same({ ["1"] = 1, ["2"] = 1, ["3"] = 1 }, counts,
                  table.concat(text))
      local db = assert(sql.open(url))
      assert.equal(1, db:query("SELECT count(*) AS c FROM hits")[1].c)
      assert.equal(200000, db:query("SELECT count(*) AS c FROM bulk")[1].c)
      assert.equal(3, db:query("SELECT count(*) AS c FROM"
                               .. " paygate_migrations")[1].c)
      db:close()
    end)
  end)
end

if servers.have_postgres() then
  describe("paygate.migrate on PostgreSQL", function()
    it("serialises concurrent runs when the database defaults to"
       .. " REPEATABLE READ", function()
      local paygate = require "paygate"
      local srv = servers.postgres()
      local admin = assert(sql.open(srv.url))
      assert(admin:exec("CREATE DATABASE rr"))
      assert(admin:exec("ALTER DATABASE rr SET default_transaction_isolation"
                        .. " = 'repeatable read'"))
      admin:close()
      local url = srv.url:gsub("/postgres$", "/rr")
      local dbs, tasks = {}, {}
      for i = 1, 3 do
        dbs[i] = assert(sql.open(url))
      end
      assert.equal("repeatable read", dbs[1]:query("SHOW"
        .. " default_transaction_isolation")[1].default_transaction_isolation)
      for i = 1, 3 do
        tasks[i] = paygate.spawn(function()
          return migrate.run(dbs[i], "spec/fixtures/migrations")
        end)
      end
      local total = 0
      for i = 1, 3 do
        local applied, err = tasks[i]:wait()
        assert.truthy(applied, tostring(err))
        total = total + #applied
      end
      assert.equal(2, total)
      assert.equal(1, dbs[1]:query("SELECT count(*) AS c FROM orders")[1].c)
      for i = 1, 3 do
        dbs[i]:close()
      end
    end)

    -- A migration's statement, and a run waiting for the lock behind it,
    -- are not a server gone silent: neither is cut at the pool's
    -- query_timeout (an index built on a big store takes minutes; the
    -- start failed at every try, and the waiting workers with it).
    it("lets a migration run past the pool's query_timeout, and the runs"
       .. " waiting for it wait", function()
      local paygate = require "paygate"
      local srv = servers.postgres()
      local dir = tmp .. "/slow"
      servers.sh("mkdir -p " .. dir .. "/postgres")
      write(dir .. "/postgres/001_slow.sql", "CREATE TABLE slow (n INTEGER);"
            .. " SELECT pg_sleep(2.5); INSERT INTO slow (n) VALUES (1)")
      local url = srv.url .. "?query_timeout=1"
      local dbs, tasks = {}, {}
      for i = 1, 2 do
        dbs[i] = assert(sql.open(url))
      end
      for i = 1, 2 do
        tasks[i] = paygate.spawn(function()
          return migrate.run(dbs[i], dir)
        end)
      end
      local total = 0
      for i = 1, 2 do
        local applied, err = tasks[i]:wait()
        assert.truthy(applied, tostring(err))
        total = total + #applied
      end
      assert.equal(1, total)
      assert.equal(1, dbs[1]:query("SELECT count(*) AS c FROM slow")[1].c)
      -- other statements keep the pool's query_timeout
      local _, err = dbs[1]:query("SELECT pg_sleep(2)")
      assert.equal("timeout", err and err.kind)
      for i = 1, 2 do
        dbs[i]:close()
      end
    end)
  end)
end
