-- paygate migrate apply: an app's pending migrations applied ahead of an
-- upgrade, by migrate.run (its order, checksums, lock and bookkeeping), on
-- SQLite and PostgreSQL: the lines it prints and its exit codes, a second
-- apply, a failing migration, a changed file, --dry-run, and a gateway's
-- workers migrating the same store at the same moment.
local core = require "paygate.core"
local sql = require "paygate.sql"
local json = require "paygate.json"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"
-- PostgreSQL's server asks for it (scram): carried in the URL, never shown
local PASSWORD = "Pw-apply-not-shown-5521"

local tmp = servers.mktemp()
local seq = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- A migrations folder of its own: dir, and the engine's folder in it.
local function mig_dir(engine, files)
  seq = seq + 1
  local d = tmp .. "/mig" .. seq
  servers.sh("mkdir -p " .. d .. "/" .. engine)
  for name, text in pairs(files) do
    write(d .. "/" .. engine .. "/" .. name, text)
  end
  return d, d .. "/" .. engine
end

local ONE = "-- one: a table\nCREATE TABLE m_one (id TEXT PRIMARY KEY);\n"
local TWO = "CREATE TABLE m_two (id TEXT PRIMARY KEY);\n"
  .. "INSERT INTO m_two (id) VALUES ('x');\n"
local THREE = "CREATE TABLE m_three (n INTEGER);\n"
local BAD = "CREATE TABLE m_half (n INTEGER); CREATE TABLEE broken;\n"

-- A fresh, empty store per call: its URL (an SQLite file that exists, as
-- the app's first start makes it; a PostgreSQL database of its own).
local engines = {
  sqlite = function()
    seq = seq + 1
    local url = "sqlite:" .. tmp .. "/apply" .. seq .. ".db"
    assert(sql.open(url)):close()
    return url
  end,
}
if servers.have_postgres() then
  local srv
  engines.postgres = function()
    srv = srv or servers.postgres({ password = PASSWORD })
    seq = seq + 1
    local admin = assert(sql.open(srv.url))
    assert(admin:exec("CREATE DATABASE apply" .. seq))
    admin:close()
    return (srv.url:gsub("/postgres$", "/apply" .. seq))
  end
end

-- paygate migrate ARGS: exit code, output (stdout and stderr), neither
-- holding the password nor any SQL
local function cli(args)
  local argv = { BIN, "migrate" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local code, out = proc.run(argv, { timeout = 60 })
  assert.is_nil(out:find(PASSWORD, 1, true), out)
  assert.is_nil(out:find("CREATE", 1, true), out)
  return code, out
end

-- the JSON lines of an output (stderr's lines are not JSON)
local function json_lines(out)
  local t = {}
  for l in out:gmatch("[^\n]+") do
    if l:sub(1, 1) == "{" then t[#t + 1] = json.decode(l) end
  end
  return t
end

local function with_db(url, fn)
  local db = assert(sql.open(url))
  local ok, a, b = pcall(fn, db)
  db:close()
  assert(ok, a)
  return a, b
end

-- { [version] = name } of paygate_migrations (none when no table)
local function recorded(url)
  return with_db(url, function(db)
    local t = {}
    if not db:has_table("paygate_migrations") then return t end
    for _, r in ipairs(assert(db:query("SELECT version, name FROM"
                                       .. " paygate_migrations"))) do
      t[tonumber(r.version)] = r.name
    end
    return t
  end)
end

local function has_table(url, name)
  return with_db(url, function(db) return db:has_table(name) end)
end

for engine, new_url in pairs(engines) do
  describe("paygate migrate apply on " .. engine, function()
    it("usage, an unreadable folder and an unreachable database exit 2,"
       .. " nothing applied", function()
      local url = new_url()
      local d = mig_dir(engine, { ["001_one.sql"] = ONE })
      local code, out = cli({ "apply", url })
      assert.equal(2, code, out)
      assert.matches("apply takes DB_URL and DIR", out, 1, true)
      code, out = cli({ "apply", url, d, "--force" })
      assert.equal(2, code, out)
      assert.matches("unknown option --force", out, 1, true)
      code, out = cli({ "apply", url, tmp .. "/nope" })
      assert.equal(2, code, out)
      assert.matches("cannot read the migrations of", out, 1, true)
      code, out = cli({ "--help" })
      assert.equal(0, code, out)
      assert.matches("paygate migrate apply DB_URL DIR [--json] [--dry-run]",
                     out, 1, true)
      if engine == "sqlite" then
        -- no SQLite file made where there was none (a typo in the path)
        local absent = tmp .. "/absent" .. seq .. ".db"
        code, out = cli({ "apply", "sqlite:" .. absent, d })
        assert.equal(2, code, out)
        assert.matches("no database file", out, 1, true)
        assert.is_nil(io.open(absent))
      else
        -- a port nobody listens on
        local gone = url:gsub(":%d+/", ":" .. servers.free_port() .. "/")
        code, out = cli({ "apply", gone, d })
        assert.equal(2, code, out)
        assert.matches("paygate migrate: cannot open postgres://postgres@",
                       out, 1, true)
      end
      assert.same({}, recorded(url))
      assert.is_false(has_table(url, "m_one"))
    end)

    it("applies a fresh database's migrations, a line each, and a second"
       .. " apply has nothing to do", function()
      local url = new_url()
      local d, folder = mig_dir(engine, { ["001_one.sql"] = ONE,
                                          ["002_two.sql"] = TWO })
      local code, out = cli({ "apply", url, d })
      assert.equal(0, code, out)
      assert.matches("applying 2 migration(s) in one transaction: 1"
                     .. " (001_one.sql), 2 (002_two.sql)\n", out, 1, true)
      assert.matches("\napplied 1  001_one%.sql  %d+%.%d%d%d s\n", out)
      assert.matches("\napplied 2  002_two%.sql  %d+%.%d%d%d s\n", out)
      assert.matches("\napplied 2 migration%(s%) in %d+%.%d%d%d s; 2"
                     .. " migrations, all applied\n", out)
      assert.same({ [1] = "001_one.sql", [2] = "002_two.sql" },
                  recorded(url))
      assert.is_true(has_table(url, "m_one"))
      assert.equal(1, with_db(url, function(db)
        return tonumber(db:query("SELECT count(*) AS c FROM m_two")[1].c)
      end))
      -- status agrees: all applied, exit 0
      code, out = cli({ "status", url, d })
      assert.equal(0, code, out)
      assert.matches("2 migrations: 2 applied, 0 pending, 0 changed", out,
                     1, true)
      -- again: nothing to do
      code, out = cli({ "apply", url, d })
      assert.equal(0, code, out)
      assert.matches("nothing to apply: 2 migrations, all applied\n", out,
                     1, true)
      assert.is_nil(out:find("applying", 1, true), out)
      -- a new version's folder: only its new migration, as JSON
      write(folder .. "/003_three.sql", THREE)
      code, out = cli({ "apply", url, d, "--json" })
      assert.equal(0, code, out)
      local lines = json_lines(out)
      assert.equal(2, #lines, out)
      assert.same({ 3, "003_three.sql", "applied" }, { lines[1].version,
                  lines[1].name, lines[1].state })
      assert.equal("number", type(lines[1].seconds))
      assert.same({ "ok", 1, 3, 0 }, { lines[2].status, lines[2].applied,
                  lines[2].migrations, lines[2].by_others })
      assert.is_true(has_table(url, "m_three"))
    end)

    it("--dry-run lists the pending migrations and writes nothing",
       function()
      local url = new_url()
      local d, folder = mig_dir(engine, { ["001_one.sql"] = ONE,
                                          ["002_two.sql"] = TWO })
      local code, out = cli({ "apply", url, d, "--dry-run" })
      assert.equal(0, code, out)
      assert.matches("\nwould apply 1  001_one.sql\nwould apply 2"
        .. "  002_two.sql\n2 migration(s) would be applied, in one"
        .. " transaction (dry run: nothing written)\n", out, 1, true)
      -- not even the bookkeeping table
      assert.is_false(has_table(url, "paygate_migrations"))
      assert.is_false(has_table(url, "m_one"))
      assert.equal(0, (cli({ "apply", url, d })))
      write(folder .. "/003_three.sql", THREE)
      code, out = cli({ "apply", url, d, "--dry-run", "--json" })
      assert.equal(0, code, out)
      local lines = json_lines(out)
      assert.equal(2, #lines, out)
      assert.same({ 3, "003_three.sql", "pending" }, { lines[1].version,
                  lines[1].name, lines[1].state })
      assert.same({ "ok", true, 1 }, { lines[2].status, lines[2].dry_run,
                  lines[2].pending })
      assert.is_false(has_table(url, "m_three"))
      assert.is_nil(recorded(url)[3])
    end)

    it("a failing migration: exit 1, named with the database's error; the"
       .. " run rolled back, what was applied before it kept", function()
      local url = new_url()
      local d, folder = mig_dir(engine, { ["001_one.sql"] = ONE,
                                          ["002_two.sql"] = TWO })
      assert.equal(0, (cli({ "apply", url, d })))
      write(folder .. "/003_three.sql", THREE)
      write(folder .. "/004_bad.sql", BAD)
      local code, out = cli({ "apply", url, d })
      assert.equal(1, code, out)
      local line = out:match("paygate migrate: [^\n]*")
      assert.matches("^paygate migrate: migration 4 %(004_bad%.sql%) failed:"
        .. " syntax: [^\n]*; nothing of this run was kept %(one"
        .. " transaction: 3 %(003_three%.sql%) rolled back with it%); the 2"
        .. " migration%(s%) applied before this run stay applied$", line)
      assert.matches("TABLEE", line, 1, true)
      -- 001 and 002 still applied; 003 (same run) and 004 neither made
      -- nor recorded
      assert.same({ [1] = "001_one.sql", [2] = "002_two.sql" },
                  recorded(url))
      assert.is_true(has_table(url, "m_two"))
      assert.is_false(has_table(url, "m_three"))
      assert.is_false(has_table(url, "m_half"))
      code, out = cli({ "apply", url, d, "--json" })
      assert.equal(1, code, out)
      local last = json_lines(out)[1]
      assert.same({ "fail", 4, "004_bad.sql", "syntax", 0, 1, 2 },
                  { last.status, last.version, last.name, last.kind,
                    last.applied, last.rolled_back, last.applied_before })
      -- the file fixed: applied
      write(folder .. "/004_bad.sql", "CREATE TABLE m_half (n INTEGER);")
      code, out = cli({ "apply", url, d })
      assert.equal(0, code, out)
      assert.same({ [1] = "001_one.sql", [2] = "002_two.sql",
                    [3] = "003_three.sql", [4] = "004_bad.sql" },
                  recorded(url))
    end)

    it("refuses a folder with a changed or missing migration: exit 1,"
       .. " nothing applied", function()
      local url = new_url()
      local d, folder = mig_dir(engine, { ["001_one.sql"] = ONE,
                                          ["002_two.sql"] = TWO })
      assert.equal(0, (cli({ "apply", url, d })))
      write(folder .. "/003_three.sql", THREE)
      -- a comment reworded is no change
      write(folder .. "/001_one.sql", "-- the first table\n" .. ONE)
      write(folder .. "/002_two.sql", (TWO:gsub("'x'", "'y'")))
      local code, out = cli({ "apply", url, d })
      assert.equal(1, code, out)
      assert.matches("\n2  002_two.sql  changed\n", out, 1, true)
      assert.matches("paygate migrate: refused, nothing applied: 1"
        .. " migration(s) changed or missing, 2 (002_two.sql)", out, 1, true)
      assert.is_nil(out:find("applying", 1, true), out)
      -- --dry-run says the same
      code, out = cli({ "apply", url, d, "--dry-run" })
      assert.equal(1, code, out)
      assert.matches("refused, nothing applied", out, 1, true)
      assert.is_false(has_table(url, "m_three"))
      assert.is_nil(recorded(url)[3])
      -- a recorded version with no file (an older folder)
      os.remove(folder .. "/002_two.sql")
      code, out = cli({ "apply", url, d, "--json" })
      assert.equal(1, code, out)
      local lines = json_lines(out)
      assert.same({ 2, "missing" }, { lines[1].version, lines[1].state })
      assert.same({ "fail", true, 0, 1 }, { lines[2].status,
                  lines[2].refused, lines[2].applied, lines[2].missing })
      assert.matches("2 (002_two.sql)", out, 1, true)
      assert.is_false(has_table(url, "m_three"))
      assert.same({ [1] = "001_one.sql", [2] = "002_two.sql" },
                  recorded(url))
    end)

    if engine == "postgres" then
      -- A migration waiting for its table's lock behind a long
      -- transaction is rolled back and tried again (migrate.run): the
      -- operator sees why the command waits, on stderr, as the app's
      -- start logs it.
      it("says when a migration waits for a lock another transaction"
         .. " holds, and applies it once that ends", function()
        local paygate = require "paygate"
        local url = new_url()
        with_db(url, function(db)
          assert(db:exec("CREATE TABLE m_locked (id INTEGER)"))
        end)
        local d = mig_dir(engine, { ["001_alter.sql"] = "ALTER TABLE"
                                      .. " m_locked ADD COLUMN note TEXT;" })
        local holder = assert(sql.open(url))
        local holding, release = false, false
        local held = paygate.spawn(function()
          return holder:transaction(function(tx)
            assert(tx:query("SELECT count(*) AS n FROM m_locked"))
            holding = true
            local deadline = core.mono() + 30
            while not release and core.mono() < deadline do
              paygate.sleep(0.02)
            end
            return true
          end)
        end)
        proc.wait_until(function() return holding end, 10, "the reader")
        local log = tmp .. "/locked" .. seq .. ".out"
        local p = proc.spawn({ BIN, "migrate", "apply", url, d },
                             { log = log })
        proc.wait_until(function()
          return proc.read(log):find("waited over 1 s for a lock", 1, true)
        end, 20, "the lock wait said")
        release = true
        assert(held:wait())
        holder:close()
        assert.equal(0, p:wait(30))
        local out = proc.read(log)
        assert.is_nil(out:find(PASSWORD, 1, true), out)
        assert.matches("migrate: migration 001_alter.sql waited over 1 s for"
                       .. " a lock", out, 1, true)
        assert.matches("\napplied 1  001_alter%.sql  ", out)
        assert.same({ [1] = "001_alter.sql" }, recorded(url))
      end)
    end

    -- A gateway's workers start (migrate.run each) while the operator
    -- applies: the same lock serialises them all, and each migration is
    -- applied once. The spec holds that lock until all four are on their
    -- way to it (PostgreSQL: waiting for it), so they contend for it.
    it("with gateway workers migrating at the same moment: each migration"
       .. " applied once, every process succeeds", function()
      local paygate = require "paygate"
      local url = new_url()
      -- paygate_migrations made (a folder with no migrations yet), so
      -- that PostgreSQL's lock of it can be held
      local d, folder = mig_dir(engine, {})
      assert.equal(0, (cli({ "apply", url, d })))
      write(folder .. "/001_hits.sql", "CREATE TABLE hits (n INTEGER NOT"
            .. " NULL); CREATE TABLE bulk (n INTEGER NOT NULL)")
      write(folder .. "/002_bulk.sql", engine == "sqlite"
        and "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c"
          .. " WHERE n < 200000) INSERT INTO bulk (n) SELECT n FROM c"
        or "INSERT INTO bulk (n) SELECT generate_series(1, 200000)")
      write(folder .. "/003_hit.sql", "INSERT INTO hits (n) VALUES (1)")
      -- the lock migrate.run takes: PostgreSQL's table lock; SQLite's
      -- write lock (the writer's BEGIN IMMEDIATE, a write to be sure)
      local holder = assert(sql.open(url))
      local holding, release = false, false
      local held = paygate.spawn(function()
        return holder:transaction(function(tx)
          if engine == "postgres" then
            assert(tx:exec("LOCK TABLE paygate_migrations IN SHARE ROW"
                           .. " EXCLUSIVE MODE"))
          else
            assert(tx:exec("DELETE FROM paygate_migrations WHERE"
                           .. " version < 0"))
          end
          holding = true
          local deadline = core.mono() + 30
          while not release and core.mono() < deadline do
            paygate.sleep(0.02)
          end
          return true
        end)
      end)
      proc.wait_until(function() return holding end, 10, "the lock held")
      local logs = {}
      local list = {}
      for i = 1, 3 do
        logs[i] = tmp .. "/worker" .. seq .. "_" .. i .. ".out"
        list[i] = proc.spawn({ BIN, "exec", "spec/support/migrator.lua",
          url, d, string.format("%.3f", core.time()) }, { log = logs[i] })
      end
      logs[4] = tmp .. "/apply" .. seq .. ".out"
      list[4] = proc.spawn({ BIN, "migrate", "apply", url, d },
                           { log = logs[4] })
      proc.wait_until(function()
        for i = 1, 3 do
          if not proc.read(logs[i]):find("running", 1, true) then
            return false
          end
        end
        -- the command found the three pending, and goes to migrate.run
        return proc.read(logs[4]):find("applying 3 migration(s)", 1, true)
      end, 20, "the workers and the command started")
      if engine == "postgres" then
        with_db(url, function(db)
          proc.wait_until(function()
            local r = assert(db:query("SELECT count(*) AS n FROM pg_locks"
              .. " WHERE relation = to_regclass('paygate_migrations') AND"
              .. " NOT granted"))
            return tonumber(r[1].n) == 4, r[1].n
          end, 20, "four runs waiting for the lock")
        end)
      end
      -- nothing applied while the lock is held
      assert.same({}, recorded(url))
      release = true
      assert(held:wait())
      holder:close()
      local counts, text = {}, {}
      for i, p in ipairs(list) do
        local rc = p:wait(60)
        if rc == nil then
          p:kill(proc.SIGKILL)
          p:wait(5)
        end
        text[i] = proc.read(logs[i])
        assert(rc == 0, "process " .. i .. " exited " .. tostring(rc)
               .. ": " .. text[i])
      end
      assert.is_nil(text[4]:find(PASSWORD, 1, true), text[4])
      -- the command's lines: what it applied, and the rest said applied
      -- by another process
      local mine = 0
      for v in text[4]:gmatch("\napplied (%d+)  ") do
        v = tonumber(v)
        counts[v] = (counts[v] or 0) + 1
        mine = mine + 1
      end
      if mine == 0 then
        assert.matches("nothing to apply: 3 migrations, all applied (3"
                       .. " applied meanwhile by another process)", text[4],
                       1, true)
      else
        assert.matches("applied " .. mine .. " migration(s) in", text[4], 1,
                       true)
      end
      for i = 1, 3 do
        local applied = text[i]:match("applied=([%d,]*)")
        assert(applied, "worker " .. i .. ": " .. text[i])
        for v in applied:gmatch("%d+") do
          v = tonumber(v)
          counts[v] = (counts[v] or 0) + 1
        end
      end
      assert.same({ 1, 1, 1 }, counts, table.concat(text, "\n"))
      with_db(url, function(db)
        assert.equal(1, tonumber(db:query("SELECT count(*) AS c FROM"
                                          .. " hits")[1].c))
        assert.equal(200000, tonumber(db:query("SELECT count(*) AS c FROM"
                                               .. " bulk")[1].c))
        assert.equal(3, tonumber(db:query("SELECT count(*) AS c FROM"
                                          .. " paygate_migrations")[1].c))
      end)
    end)
  end)
end
