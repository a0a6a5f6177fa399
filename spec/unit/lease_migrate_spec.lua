-- paygate.lease and paygate.migrate on SQLite, PostgreSQL and Redis.
local sql = require "paygate.sql"
local lease = require "paygate.lease"
local migrate = require "paygate.migrate"
local paygate = require "paygate"
local servers = require "spec.support.servers"

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
      local l = assert(lease.acquire(store, "job", 0.2, { owner = "a" }))
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
        assert.equal(1, #lines.info)
        assert.truthy(tostring(lines.info[1].msg):find("001_one.sql", 1,
                                                        true))
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
    end)
  end
end
