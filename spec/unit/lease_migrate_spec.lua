-- paygate.lease and paygate.migrate on SQLite, PostgreSQL and Redis.
local sql = require "paygate.sql"
local lease = require "paygate.lease"
local migrate = require "paygate.migrate"
local paygate = require "paygate"
local servers = require "spec.support.servers"
local proc = require "support.proc"
local json = require "paygate.json"

local tmp = servers.mktemp()
local pg_srv
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- Each store: a fresh one per test.
local stores = {
  sqlite = function()
    n = n + 1
    return assert(sql.open("sqlite:" .. tmp .. "/l" .. n .. ".db"))
  end,
}
if servers.have_postgres() then
  stores.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    local db = assert(sql.open(pg_srv.url))
    assert(db:exec_script("DROP TABLE IF EXISTS paygate_leases;"
      .. " DROP TABLE IF EXISTS refunds; DROP TABLE IF EXISTS orders;"
      .. " DROP TABLE IF EXISTS paygate_migrations; DROP TABLE IF EXISTS f;"
      .. " DROP TABLE IF EXISTS m_one; DROP TABLE IF EXISTS m_two"))
    return db
  end
end
if servers.have_redis() then
  stores.redis = servers.redis_store()
end

for name, new_store in pairs(stores) do
  describe("paygate.lease on " .. name, function()
    local store

    before_each(function() store = new_store() end)
    after_each(function() store:close() end)

    it("refuses a held lease with kind held", function()
      local l = assert(lease.acquire(store, "job", 5, { owner = "a" }))
      local l2, err = lease.acquire(store, "job", 5, { owner = "b" })
      assert.is_nil(l2)
      assert.equal("held", err.kind)
      assert.truthy(err.ttl > 0 and err.ttl <= 5)
      assert.truthy(l.token >= 1)
    end)

    it("hands out increasing tokens across expiry and release", function()
      local l1 = assert(lease.acquire(store, "job", 0.05, { owner = "a" }))
      servers.wait_for(function()
        return lease.acquire(store, "job", 5, { owner = "b" }) ~= nil
      end, 3, "the lease to expire")
      local l2, err = lease.acquire(store, "job", 5, { owner = "c" })
      assert.is_nil(l2)
      assert.equal("held", err.kind)
      local cur = assert(lease.acquire(store, "job", 5, { owner = "b" }))
      assert.truthy(cur.token > l1.token)
      assert(lease.release(store, cur))
      local l3 = assert(lease.acquire(store, "job", 5, { owner = "c" }))
      assert.truthy(l3.token > cur.token)
    end)

    it("renews a live lease; renewing a superseded one fails with lost", function()
      -- (a ttl of 2 s: the ttl runs from before acquire's commit, and
      -- with 0.2 s a commit or a stall that long on a loaded machine let
      -- the lease expire before the renewal, which then failed "lost".
      -- Still under the 4 s the renewal is checked to give.)
      local l = assert(lease.acquire(store, "job", 2, { owner = "a" }))
      assert(lease.renew(store, l, 5))
      assert.truthy(l.expires_at > paygate.now() + 4)
      assert(lease.release(store, l))
      assert(lease.acquire(store, "job", 5, { owner = "b" }))
      local ok, err = lease.renew(store, l, 5)
      assert.is_nil(ok)
      assert.equal("lost", err.kind)
    end)

    it("refuses a write guarded by an older token", function()
      local old = assert(lease.acquire(store, "res", 0.05, { owner = "a" }))
      local new
      servers.wait_for(function()
        new = lease.acquire(store, "res", 5, { owner = "b" })
        return new ~= nil
      end, 3, "the lease to expire")
      if name == "redis" then
        assert.equal("OK", lease.fenced_call(store, "res", new.token,
                                             "SET", "f", "new"))
        local res, err = lease.fenced_call(store, "res", old.token,
                                           "SET", "f", "old")
        assert.is_nil(res)
        assert.equal("fenced", err.kind)
        assert.equal("new", store:call("GET", "f"))
      else
        assert(store:exec_script("CREATE TABLE f (v TEXT)"))
        local function write(l, v)
          return store:transaction(function(tx)
            local ok, err = lease.check(tx, "res", l.token)
            if not ok then
              return nil, err
            end
            return tx:exec("INSERT INTO f (v) VALUES ($1)", { v })
          end)
        end
        assert(write(new, "new"))
        local ok, err = write(old, "old")
        assert.is_nil(ok)
        assert.equal("fenced", err.kind)
        assert.same({ { v = "new" } }, store:query("SELECT v FROM f"))
      end
    end)

    it("gives exactly one of many concurrent acquirers the lease", function()
      local tasks = {}
      for i = 1, 10 do
        tasks[i] = paygate.spawn(function()
          return lease.acquire(store, "race", 5, { owner = "o" .. i })
        end)
      end
      local winners = 0
      for i = 1, 10 do
        local l, err = tasks[i]:wait()
        if l then
          winners = winners + 1
        else
          assert.equal("held", err.kind)
        end
      end
      assert.equal(1, winners)
    end)

    if name ~= "redis" then
      -- The SQL twin of redis_lease_safety_spec's case: a store that lost
      -- the grant (a PostgreSQL failover to a standby that had not
      -- received it, a backup restored, the row deleted by hand to "free"
      -- a stuck lease) starts the key's tokens again, and another owner
      -- then holds the token an old holder still has.
      it("an old lease object neither renews nor releases another owner's"
         .. " lease with the same token (the store lost the grant)",
         function()
        local la = assert(lease.acquire(store, "settle", 10))
        assert(store:exec("DELETE FROM paygate_leases WHERE name = $1",
                          { "settle" }))
        local lb = assert(lease.acquire(store, "settle", 10))
        assert.equal(la.token, lb.token)
        assert.are_not.equal(la.owner, lb.owner)
        local ok, err = lease.renew(store, la)
        assert.is_nil(ok, "A renewed B's lease")
        assert.equal("lost", err.kind)
        ok, err = lease.release(store, la)
        assert.is_nil(ok, "A released B's lease")
        assert.equal("lost", err.kind)
        local l2, herr = lease.acquire(store, "settle", 10)
        assert.is_nil(l2, "B's lease was free to a third owner")
        assert.equal("held", herr.kind)
        assert(lease.renew(store, lb))
        assert(lease.release(store, lb))
      end)
    end

    if name == "redis" then
      it("never hands this client a token below one it was granted, even when Redis lost the counter", function()
        local l1 = assert(lease.acquire(store, "lossy", 5, { owner = "a" }))
        assert(lease.release(store, l1))
        local l2 = assert(lease.acquire(store, "lossy", 5, { owner = "a" }))
        assert(lease.release(store, l2))
        assert.is_true(l2.token > l1.token)
        -- what a failover to a replica that had not caught up leaves: the
        -- fencing counter (and the lease) as they were long ago
        assert(store:call("DEL", "paygate:fence:lossy"))
        local l3 = assert(lease.acquire(store, "lossy", 5, { owner = "b" }))
        assert.equal(l2.token + 1, l3.token)
        -- the counter itself moved on: a fenced call with the new token
        -- runs, one with the older token is refused
        assert.equal("OK", lease.fenced_call(store, "lossy", l3.token,
                                             "SET", "res", "x"))
        local _, err = lease.fenced_call(store, "lossy", l2.token, "SET",
                                         "res", "y")
        assert.equal("fenced", err.kind)
      end)
    end
  end)
end

for name, new_store in pairs(stores) do
  if name ~= "redis" then
    describe("paygate.migrate on " .. name, function()
      local dir = "spec/fixtures/migrations"

      it("fails with unavailable for a missing folder", function()
        local db = new_store()
        local res, err = migrate.run(db, tmp .. "/nope")
        assert.is_nil(res)
        assert.equal("unavailable", err.kind)
        db:close()
      end)

      it("applies each migration once, in order", function()
        local db = new_store()
        local applied = assert(migrate.run(db, dir))
        assert.same({ 1, 2 }, { applied[1].version, applied[2].version })
        -- the time each took, for paygate migrate apply's lines
        assert.equal("number", type(applied[1].seconds))
        assert.truthy(applied[2].seconds >= 0)
        assert.same({}, assert(migrate.run(db, dir)))
        assert.equal(1, db:query("SELECT count(*) AS c FROM orders")[1].c)
        db:close()
      end)

      it("applies once when two instances start together", function()
        local db1, db2
        if name == "sqlite" then
          n = n + 1
          local path = "sqlite:" .. tmp .. "/m" .. n .. ".db"
          db1, db2 = assert(sql.open(path)), assert(sql.open(path))
        else
          db1 = new_store()
          db2 = assert(sql.open(pg_srv.url))
        end
        local t1 = paygate.spawn(function() return migrate.run(db1, dir) end)
        local t2 = paygate.spawn(function() return migrate.run(db2, dir) end)
        local a1, e1 = t1:wait()
        local a2, e2 = t2:wait()
        assert.truthy(a1, tostring(e1))
        assert.truthy(a2, tostring(e2))
        assert.equal(2, #a1 + #a2)
        assert.equal(1, db1:query("SELECT count(*) AS c FROM orders")[1].c)
        assert.equal(2, db1:query("SELECT count(*) AS c FROM"
                                  .. " paygate_migrations")[1].c)
        db1:close()
        db2:close()
      end)

      it("rolls back a failing migration entirely", function()
        local bad = tmp .. "/bad" .. name
        servers.sh("mkdir -p " .. bad .. "/" .. name)
        local f = io.open(bad .. "/" .. name .. "/001_bad.sql", "w")
        f:write("CREATE TABLE half (x INTEGER); CREATE TABLEE broken;")
        f:close()
        local db = new_store()
        local res, err = migrate.run(db, bad)
        assert.is_nil(res)
        assert.equal("syntax", err.kind)
        assert.truthy(err.message:find("001_bad.sql", 1, true))
        local rows, qerr = db:query("SELECT * FROM half")
        assert.is_nil(rows)
        assert.equal("syntax", qerr.kind)
        db:close()
      end)

      -- An older app (fewer migrations) started on a store a newer one
      -- migrated: it does not know that schema, and would write rows the
      -- newer one reads wrong; it is refused, saying so, nothing written.
      it("refuses a database migrated past the app's newest migration",
         function()
        local db = new_store()
        assert(migrate.run(db, dir))
        local old = tmp .. "/old" .. name
        servers.sh("mkdir -p " .. old .. "/" .. name .. " && cp " .. dir
                   .. "/" .. name .. "/001_orders.sql " .. old .. "/"
                   .. name .. "/")
        local res, err = migrate.run(db, old)
        assert.is_nil(res)
        assert.equal("config", err.kind)
        assert.equal("migrate: the database holds migration 2"
          .. " (002_refunds.sql), newer than this app's newest, 1"
          .. " (001_orders.sql): a newer version of the app migrated it,"
          .. " or another app's migrations share the database; start the"
          .. " version that knows its schema", err.message)
        assert.equal(2, db:query("SELECT count(*) AS c FROM"
                                 .. " paygate_migrations")[1].c)
        -- the same app again: up to date
        assert.same({}, assert(migrate.run(db, dir)))
        db:close()
      end)

      -- Checksums: each applied migration's SQL is recorded as a digest
      -- (comments and whitespace aside) and compared at every run; a real
      -- change is a warning naming the file, never a refusal (the database
      -- is migrated already).
      local ONE = "-- m_one: the first table\n"
        .. "CREATE TABLE m_one (id TEXT PRIMARY KEY,\n"
        .. "  note TEXT NOT NULL DEFAULT 'a--b');\n"
      local TWO = "CREATE TABLE m_two (id TEXT PRIMARY KEY);\n"
        .. "INSERT INTO m_two (id) VALUES ('x');\n"
      local HEX64 = "^" .. ("%x"):rep(64) .. "$"
      local seq = 0

      local function write(path, text)
        local f = assert(io.open(path, "w"))
        f:write(text)
        f:close()
      end

      -- a migrations folder of its own: dir, and the engine's folder
      local function mig_dir(files)
        seq = seq + 1
        local d = tmp .. "/ck_" .. name .. seq
        servers.sh("mkdir -p " .. d .. "/" .. name)
        for fname, text in pairs(files) do
          write(d .. "/" .. name .. "/" .. fname, text)
        end
        return d, d .. "/" .. name
      end

      -- migrate.run(db, d), and the lines it logged: { warn = {...},
      -- info = {...} }, each { msg = ..., fields = ... }
      local function run_logged(db, d)
        local lines = { warn = {}, info = {} }
        local saved = { warn = paygate.log.warn, info = paygate.log.info }
        for level in pairs(lines) do
          paygate.log[level] = function(msg, fields)
            table.insert(lines[level], { msg = msg, fields = fields })
          end
        end
        local ok, res, err = pcall(migrate.run, db, d)
        paygate.log.warn, paygate.log.info = saved.warn, saved.info
        assert(ok, tostring(res))
        return res, err, lines
      end

      local function checksums(db)
        local t = {}
        for _, r in ipairs(assert(db:query("SELECT version, checksum FROM"
                                           .. " paygate_migrations"))) do
          t[tonumber(r.version)] = r.checksum or false
        end
        return t
      end

      it("does not report a comment or whitespace edit of an applied"
         .. " migration", function()
        local d, folder = mig_dir({ ["001_one.sql"] = ONE,
                                    ["002_two.sql"] = TWO })
        local db = new_store()
        assert(migrate.run(db, d))
        local before = checksums(db)
        assert.matches(HEX64, before[1])
        assert.matches(HEX64, before[2])
        assert.are_not.equal(before[1], before[2])
        -- what the project did to its own applied migrations: comments
        -- reworded and moved, lines re-wrapped and re-indented, trailing
        -- spaces, blank lines, CRLF
        write(folder .. "/001_one.sql", "-- m_one: the first table, where"
          .. " notes go\n\n/* a block\n   comment */\nCREATE TABLE m_one (\r\n"
          .. "    id   TEXT PRIMARY KEY,   \n"
          .. "    -- note: what the caller said\n"
          .. "    note TEXT NOT NULL DEFAULT 'a--b'\n);\n\n\n")
        local res, err, lines = run_logged(db, d)
        assert.same({}, res, tostring(err))
        assert.same({}, lines.warn)
        assert.same(before, checksums(db))
        db:close()
      end)

      it("warns, naming the version and file, when an applied migration's"
         .. " SQL changed, and goes on", function()
        local d, folder = mig_dir({ ["001_one.sql"] = ONE,
                                    ["002_two.sql"] = TWO })
        local db = new_store()
        assert(migrate.run(db, d))
        local before = checksums(db)
        -- inside a string literal, -- is text, not a comment
        write(folder .. "/001_one.sql", (ONE:gsub("'a%-%-b'", "'a--c'")))
        write(folder .. "/003_three.sql", "CREATE INDEX m_two_id ON m_two"
              .. " (id);")
        for round = 1, 2 do   -- at every run, not once
          local res, err, lines = run_logged(db, d)
          assert.truthy(res, tostring(err))
          assert.equal(round == 1 and 1 or 0, #res)
          assert.equal(1, #lines.warn)
          local w = lines.warn[1]
          assert.truthy(tostring(w.msg):find("migration 1 (001_one.sql)",
                                             1, true), tostring(w.msg))
          assert.equal(1, w.fields.version)
          assert.equal(folder .. "/001_one.sql", w.fields.file)
        end
        -- the database keeps the checksum of what was applied
        assert.equal(before[1], checksums(db)[1])
        db:close()
      end)

      it("upgrades an older paygate_migrations table in place and records"
         .. " the checksums its rows lack, saying so once", function()
        local d, folder = mig_dir({ ["001_one.sql"] = ONE,
                                    ["002_two.sql"] = TWO })
        -- the checksums a fresh database records for these files (on
        -- PostgreSQL the stores share one database: this one first)
        local fresh = new_store()
        assert(migrate.run(fresh, d))
        local want = checksums(fresh)
        fresh:close()
        local db = new_store()
        -- what an older paygate left: 001 applied, recorded without a
        -- checksum column
        assert(db:exec_script("CREATE TABLE paygate_migrations ("
          .. " version BIGINT PRIMARY KEY, name TEXT NOT NULL,"
          .. " applied_at DOUBLE PRECISION NOT NULL); " .. ONE))
        assert(db:exec("INSERT INTO paygate_migrations (version, name,"
          .. " applied_at) VALUES (1, '001_one.sql', 1)"))
        local res, err, lines = run_logged(db, d)
        assert.truthy(res, tostring(err))
        assert.equal(1, #res)
        assert.equal(2, res[1].version)
        assert.same({}, lines.warn)
        local recorded = {}
        for _, l in ipairs(lines.info) do
          if tostring(l.msg):find("recorded the checksums", 1, true) then
            recorded[#recorded + 1] = l.msg
          end
        end
        assert.equal(1, #recorded)
        assert.truthy(recorded[1]:find("001_one.sql", 1, true))
        local sums = checksums(db)
        assert.matches(HEX64, sums[1])
        assert.same(want, sums)
        -- said once: the next run has nothing to record
        res, err, lines = run_logged(db, d)
        assert.same({}, res, tostring(err))
        assert.same({}, lines.info)
        assert.same({}, lines.warn)
        -- an older paygate's INSERT (no checksum) still works on the
        -- upgraded table
        assert(db:exec("INSERT INTO paygate_migrations (version, name,"
          .. " applied_at) VALUES (3, '003_x.sql', 1)"))
        assert(db:exec("DELETE FROM paygate_migrations WHERE version = 3"))
        -- and a change of 001 is now seen
        write(folder .. "/001_one.sql", (ONE:gsub("a%-%-b", "b")))
        res, err, lines = run_logged(db, d)
        assert.same({}, res, tostring(err))
        assert.equal(1, #lines.warn)
        db:close()
      end)

      -- A start that applies migrations says so, before (a big table's
      -- index may hold the start for minutes) and once they committed,
      -- with the time each took; a start with nothing to apply says
      -- nothing. (Was: nothing at all, the upgrade trial's 013 and 014
      -- applied without a line.)
      it("says which migrations it applies, before and once committed"
         .. " with the time each took", function()
        local d = mig_dir({ ["001_one.sql"] = ONE, ["002_two.sql"] = TWO })
        local db = new_store()
        local res, err, lines = run_logged(db, d)
        assert.equal(2, #res, tostring(err))
        assert.same({}, lines.warn)
        assert.equal(2, #lines.info)
        assert.equal("migrate: applying 2 migration(s): 001_one.sql,"
          .. " 002_two.sql (the app loads once they are committed)",
          lines.info[1].msg)
        assert.matches("^migrate: applied 2 migration%(s%) in %d+%.%d%d%d s:"
          .. " 1 %(001_one%.sql, %d+%.%d%d%d s%), 2 %(002_two%.sql,"
          .. " %d+%.%d%d%d s%)$", lines.info[2].msg)
        assert.equal(2, lines.info[2].fields.migrations)
        res, err, lines = run_logged(db, d)
        assert.same({}, res, tostring(err))
        assert.same({}, lines.info)
        db:close()
      end)

      -- PostgreSQL: ALTER TABLE waits for the table's ACCESS EXCLUSIVE
      -- lock behind any open transaction that read the table, and every
      -- later query of the table queues behind the waiting ALTER: the
      -- running version's requests stalled until that transaction ended
      -- (the upgrade trial: 013's ALTER of gw_refunds behind a 15 s
      -- report, 13 s of no answers, then 503s). A run waits at most 1 s
      -- for a lock, rolls back, says so and tries again.
      if name == "postgres" then
        it("a migration waits at most 1 s for a table's lock, then rolls"
           .. " back and tries again: the table's readers are not held"
           .. " behind it", function()
          local core = require "paygate.core"
          local db = new_store()
          assert(db:exec_script("DROP TABLE IF EXISTS m_locked;"
            .. " CREATE TABLE m_locked (id INTEGER)"))
          local d = mig_dir({ ["001_alter.sql"] = "ALTER TABLE m_locked"
                                .. " ADD COLUMN note TEXT;" })
          local holder = assert(sql.open(pg_srv.url))
          local reader = assert(sql.open(pg_srv.url))
          local read_done, holding = false, false
          -- a long transaction that read the table (a report, a console
          -- export): held until the reader got its answer, 6 s at most
          local held = paygate.spawn(function()
            return holder:transaction(function(tx)
              assert(tx:query("SELECT count(*) AS n FROM m_locked"))
              holding = true
              local deadline = core.mono() + 6
              while not read_done and core.mono() < deadline do
                paygate.sleep(0.02)
              end
              return true
            end)
          end)
          local deadline = core.mono() + 5
          while not holding and core.mono() < deadline do
            paygate.sleep(0.01)
          end
          assert.is_true(holding)
          local mig = paygate.spawn(function() return run_logged(db, d) end)
          -- the ALTER is waiting for its lock
          local waiting = false
          deadline = core.mono() + 5
          while not waiting and core.mono() < deadline do
            local r = assert(reader:query("SELECT count(*) AS n FROM"
              .. " pg_locks WHERE relation = to_regclass('m_locked')"
              .. " AND NOT granted"))
            waiting = tonumber(r[1].n) > 0
            if not waiting then paygate.sleep(0.01) end
          end
          assert.is_true(waiting)
          local t0 = core.mono()
          local rows, rerr = reader:query("SELECT count(*) AS n FROM"
                                          .. " m_locked")
          local took = core.mono() - t0
          read_done = true
          assert.truthy(rows, tostring(rerr))
          assert.truthy(took < 2.5, ("the read waited %.1f s"):format(took))
          assert(held:wait())
          local res, err, lines = mig:wait()
          assert.truthy(res, tostring(err))
          assert.equal(1, #res)
          assert(db:query("SELECT note FROM m_locked"))
          assert.truthy(#lines.warn >= 1)
          assert.matches("^migrate: migration 001_alter%.sql waited over"
            .. " 1 s for a lock", lines.warn[1].msg)
          assert.truthy(lines.warn[1].msg:find("trying again in 2 s", 1,
                                               true), lines.warn[1].msg)
          holder:close()
          reader:close()
          db:close()
        end)
      end

      -- migrate.status: each version's state at a glance (the warning
      -- above is a log line at start, the only sign there was), read only.
      -- { version, name, state, file? (basename), applied? } per entry
      local function states(list)
        local t = {}
        for i, e in ipairs(list) do
          t[i] = { version = e.version, name = e.name, state = e.state,
                   file = e.file and e.file:match("[^/]+$"),
                   applied = type(e.applied_at) == "number" or nil }
        end
        return t
      end

      local function row_count(db)
        return tonumber(db:query("SELECT count(*) AS c FROM"
                                 .. " paygate_migrations")[1].c)
      end

      it("status: every file's and every recorded version's state, and"
         .. " nothing written", function()
        local d, folder = mig_dir({ ["001_one.sql"] = ONE,
                                    ["002_two.sql"] = TWO })
        local db = new_store()
        -- a database never migrated: all pending, and no table made
        assert.same({
          { version = 1, name = "001_one.sql", file = "001_one.sql",
            state = "pending" },
          { version = 2, name = "002_two.sql", file = "002_two.sql",
            state = "pending" },
        }, states(assert(migrate.status(db, d))))
        assert.is_false(db:has_table("paygate_migrations"))
        assert(migrate.run(db, d))
        local list = assert(migrate.status(db, d))
        assert.same({
          { version = 1, name = "001_one.sql", file = "001_one.sql",
            state = "applied", applied = true },
          { version = 2, name = "002_two.sql", file = "002_two.sql",
            state = "applied", applied = true },
        }, states(list))
        assert.equal(folder .. "/001_one.sql", list[1].file)
        assert.truthy(math.abs(list[1].applied_at - paygate.now()) < 60)
        -- a comment reworded: still applied; a string changed: changed; a
        -- new file: pending; a file gone: missing; a version recorded by
        -- a newer app: missing
        write(folder .. "/002_two.sql", "-- two\n" .. TWO)
        write(folder .. "/001_one.sql", (ONE:gsub("'a%-%-b'", "'a--c'")))
        write(folder .. "/003_three.sql", "CREATE INDEX m_two_id ON m_two"
              .. " (id);")
        write(folder .. "/004_four.sql", "SELECT 1;")
        assert(run_logged(db, d))          -- (its warning not printed)
        os.remove(folder .. "/004_four.sql")
        write(folder .. "/005_five.sql", "SELECT 5;")
        assert(db:exec("INSERT INTO paygate_migrations (version, name,"
          .. " applied_at, checksum) VALUES (9, '009_future.sql', 1, 'x')"))
        local before = checksums(db)
        assert.same({
          { version = 1, name = "001_one.sql", file = "001_one.sql",
            state = "changed", applied = true },
          { version = 2, name = "002_two.sql", file = "002_two.sql",
            state = "applied", applied = true },
          { version = 3, name = "003_three.sql", file = "003_three.sql",
            state = "applied", applied = true },
          { version = 4, name = "004_four.sql", state = "missing",
            applied = true },
          { version = 5, name = "005_five.sql", file = "005_five.sql",
            state = "pending" },
          { version = 9, name = "009_future.sql", state = "missing",
            applied = true },
        }, states(assert(migrate.status(db, d))))
        -- nothing recorded nor applied by it
        assert.same(before, checksums(db))
        assert.equal(5, row_count(db))
        db:close()
      end)

      it("status: a version applied with no checksum is unchecked, and an"
         .. " older paygate's table is left as it is", function()
        local d = mig_dir({ ["001_one.sql"] = ONE, ["002_two.sql"] = TWO })
        local db = new_store()
        assert(db:exec_script("CREATE TABLE paygate_migrations ("
          .. " version BIGINT PRIMARY KEY, name TEXT NOT NULL,"
          .. " applied_at DOUBLE PRECISION NOT NULL); " .. ONE))
        assert(db:exec("INSERT INTO paygate_migrations (version, name,"
          .. " applied_at) VALUES (1, '001_one.sql', 1)"))
        assert.same({
          { version = 1, name = "001_one.sql", file = "001_one.sql",
            state = "unchecked", applied = true },
          { version = 2, name = "002_two.sql", file = "002_two.sql",
            state = "pending" },
        }, states(assert(migrate.status(db, d))))
        -- no checksum column added (a status writes nothing)
        local _, qerr = db:query("SELECT checksum FROM paygate_migrations")
        assert.truthy(qerr, "status added the checksum column")
        -- a checksum cleared by hand (an edit meant to stay) is unchecked
        -- until the next run records the file's
        assert(run_logged(db, d))          -- (its info line not printed)
        assert(db:exec("UPDATE paygate_migrations SET checksum = NULL"
                       .. " WHERE version = 2"))
        assert.same({ "applied", "unchecked" }, {
          migrate.status(db, d)[1].state, migrate.status(db, d)[2].state })
        assert(run_logged(db, d))
        assert.equal("applied", migrate.status(db, d)[2].state)
        db:close()
      end)

      it("status: misuse raises; a missing folder is unavailable", function()
        local db = new_store()
        assert.has_error(function() migrate.status({}, dir) end,
                         "migrate.status: db must be a paygate.sql db")
        assert.has_error(function() migrate.status(db, 1) end,
                         "migrate.status: dir must be a string")
        local res, err = migrate.status(db, tmp .. "/nope")
        assert.is_nil(res)
        assert.equal("unavailable", err.kind)
        db:close()
      end)

      -- paygate migrate status: the command an operator runs
      local PASSWORD = "Pw-not-shown-7781"
      -- a store and its URL (PostgreSQL's with a password in it: the
      -- test server trusts, so it is never asked for, only carried)
      local function store_url()
        if name == "sqlite" then
          n = n + 1
          local url = "sqlite:" .. tmp .. "/cli" .. n .. ".db"
          return assert(sql.open(url)), url
        end
        local db = new_store()
        return db, (pg_srv.url:gsub("^postgres://postgres@",
                                    "postgres://postgres:" .. PASSWORD .. "@"))
      end

      local function cli(args)
        local argv = { PAYGATE_BIN, "migrate" }
        for _, a in ipairs(args) do argv[#argv + 1] = a end
        local code, out = proc.run(argv, { timeout = 30 })
        assert.is_nil(out:find(PASSWORD, 1, true), out)
        assert.is_nil(out:find("CREATE", 1, true), out)
        return code, out
      end

      it("paygate migrate status prints the table, exit 1 when a migration"
         .. " changed or is missing, without SQL or the URL's password",
         function()
        local d, folder = mig_dir({ ["001_one.sql"] = ONE,
                                    ["002_two.sql"] = TWO })
        local db, url = store_url()
        local code, out = cli({ "status", url, d })
        assert.equal(0, code, out)
        assert.matches("2 migrations: 0 applied, 2 pending, 0 changed, 0"
                       .. " missing, 0 unchecked", out, 1, true)
        assert.matches("no paygate_migrations table", out, 1, true)
        assert.is_false(db:has_table("paygate_migrations"))
        assert(migrate.run(db, d))
        write(folder .. "/003_three.sql", "CREATE INDEX m_two_id ON m_two"
              .. " (id);")
        code, out = cli({ "status", url, d })
        assert.equal(0, code, out)
        assert.matches("\n%s*1  001_one%.sql%s+%d%d%d%d%-%d%d%-%d%d"
                       .. " %d%d:%d%d:%d%dZ  applied\n", out)
        assert.matches("\n%s*3  003_three%.sql%s+%-%s+pending\n", out)
        assert.matches("3 migrations: 2 applied, 1 pending, 0 changed", out,
                       1, true)
        assert.is_nil(out:find("no paygate_migrations table", 1, true))
        -- an applied file's SQL changed, a recorded version's file gone
        write(folder .. "/001_one.sql", (ONE:gsub("'a%-%-b'", "'a--c'")))
        os.remove(folder .. "/002_two.sql")
        code, out = cli({ "status", url, d })
        assert.equal(1, code, out)
        assert.matches("001_one%.sql%s+%S+ %S+  changed\n", out)
        assert.matches("002_two%.sql%s+%S+ %S+  missing\n", out)
        assert.matches("3 migrations: 0 applied, 1 pending, 1 changed, 1"
                       .. " missing, 0 unchecked", out, 1, true)
        code, out = cli({ "status", url, d, "--json" })
        assert.equal(1, code, out)
        local lines = {}
        for l in out:gmatch("[^\n]+") do lines[#lines + 1] = json.decode(l) end
        assert.equal(4, #lines, out)
        assert.same({ 1, "001_one.sql", "changed" }, { lines[1].version,
                    lines[1].name, lines[1].state })
        assert.equal(folder .. "/001_one.sql", lines[1].file)
        assert.same({ 2, "002_two.sql", "missing" }, { lines[2].version,
                    lines[2].name, lines[2].state })
        assert.is_nil(lines[2].file)
        assert.equal("number", type(lines[2].applied_at))
        assert.same({ status = "fail", migrations = 3, applied = 0,
                      pending = 1, changed = 1, missing = 1, unchecked = 0 },
                    lines[4])
        -- nothing written by any of it
        assert.equal(2, row_count(db))
        db:close()
      end)

      it("paygate migrate status: usage and unreadable input exit 2",
         function()
        local d = mig_dir({ ["001_one.sql"] = ONE })
        local db, url = store_url()
        local code, out = cli({ "status", url })
        assert.equal(2, code, out)
        assert.matches("status takes DB_URL and DIR", out, 1, true)
        code, out = cli({ "status", url, tmp .. "/nope" })
        assert.equal(2, code, out)
        assert.matches("cannot read the migrations of", out, 1, true)
        code, out = cli({ "show", url, d })
        assert.equal(2, code, out)
        code, out = cli({ "--help" })
        assert.equal(0, code, out)
        assert.matches("usage: paygate migrate status", out, 1, true)
        if name == "sqlite" then
          -- no SQLite file made where there was none
          local absent = tmp .. "/absent" .. n .. ".db"
          code, out = cli({ "status", "sqlite:" .. absent, d })
          assert.equal(2, code, out)
          assert.matches("no database file", out, 1, true)
          assert.is_nil(io.open(absent))
        end
        db:close()
      end)
    end)
  end
end
