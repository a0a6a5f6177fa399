-- PostgreSQL through a failover: a primary with a synchronous streaming
-- standby (pg_basebackup -R), one pool on the multi-host URL with
-- target_session_attrs=read-write. The primary is killed and the standby
-- promoted during a stream of db:exec writes: every acknowledged write is
-- on the new primary, nothing is acknowledged twice, and the pool serves
-- again within seconds. A COMMIT whose answer is lost is reported
-- unknown_outcome; a write refused by a read-only server (25006) is
-- unavailable and retryable.
local core = require "paygate.core"
local sql = require "paygate.sql"
local servers = require "spec.support.servers"
local pgha = require "spec.support.pgha"

local wait_for = servers.wait_for

describe("PostgreSQL failover", function()
  local c

  setup(function()
    if servers.have_postgres() then
      c = pgha.start({ sync = true })
    end
  end)

  teardown(function()
    if c then
      c.cleanup()
    end
  end)

  it("a write sent to a read-only server fails unavailable (25006),"
     .. " retryable", function()
    if not c then
      pending("postgres not installed")
      return
    end
    local url = "postgres://postgres@127.0.0.1:" .. c.standby.port
      .. "/postgres"
    local db = assert(sql.open(url, { pool = 1 }))
    local res, err = db:exec("CREATE TABLE ro (id int)")
    assert.is_nil(res)
    assert.equal("unavailable", err.kind)
    assert.equal("25006", err.code)
    assert.is_true(err.retryable)
    -- the pool still answers reads (a fresh connection)
    assert.same({ { one = 1 } }, assert(db:query("SELECT 1 AS one")))
    db:close()
  end)

  it("require_sync: connects only to a server that commits with a"
     .. " synchronous standby", function()
    if not c then
      pending("postgres not installed")
      return
    end
    local ok, err = pcall(sql.open, c.url, { require_sync = "yes" })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("opts.require_sync must be a boolean",
                                     1, true), tostring(err))
    local db = assert(sql.open(c.url, { require_sync = true }))
    assert.same({ { one = 1 } }, assert(db:query("SELECT 1 AS one")))
    db:close()
    -- the same server with synchronous_commit = local does not qualify
    local loose = "postgres://postgres@127.0.0.1:" .. c.primary.port
      .. "/postgres?options=-csynchronous_commit%3Dlocal"
    local no, nerr = sql.open(loose, { require_sync = true })
    assert.is_nil(no)
    assert.equal("unavailable", nerr.kind)
    assert.truthy(tostring(nerr):find("require_sync", 1, true),
                  tostring(nerr))
    -- in the URL too (an app configured by URL alone, as the gateway's
    -- gateway.db): true|1, false|0; another word is refused
    no, nerr = sql.open(loose .. "&require_sync=true")
    assert.is_nil(no)
    assert.truthy(tostring(nerr):find("require_sync", 1, true),
                  tostring(nerr))
    local loose_ok = assert(sql.open(loose .. "&require_sync=0"))
    loose_ok:close()
    local sep = c.url:find("?", 1, true) and "&" or "?"
    db = assert(sql.open(c.url .. sep .. "require_sync=1&sync_recheck=5"))
    assert.same({ { one = 1 } }, assert(db:query("SELECT 1 AS one")))
    db:close()
    ok, err = pcall(sql.open, c.url .. sep .. "require_sync=yes")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("require_sync must be a boolean",
                                     1, true), tostring(err))
  end)

  it("require_sync: an open connection is checked again (sync_recheck):"
     .. " a server that stops committing with a synchronous standby is"
     .. " left", function()
    if not c then
      pending("postgres not installed")
      return
    end
    local recheck = tonumber(os.getenv("SPEC_SYNC_RECHECK") or "0.2")
    local url = "postgres://postgres@127.0.0.1:" .. c.primary.port
      .. "/postgres"
    local db = assert(sql.open(url, { require_sync = true, pool = 1,
                                      sync_recheck = recheck,
                                      down_for = 0.1 }))
    assert.same({ { one = 1 } }, assert(db:query("SELECT 1 AS one")))
    local function set_sync(names)
      c.primary.psql("ALTER SYSTEM SET synchronous_standby_names = '"
                     .. names .. "'")
      c.primary.psql("SELECT pg_reload_conf()")
    end
    finally(function()
      set_sync("*")
      db:close()
    end)
    set_sync("")
    -- the open connection is closed and the next ones are refused
    local err = wait_for(function()
      local _, e = db:query("SELECT 1 AS one")
      return e
    end, 10, "the pool to notice synchronous_standby_names = ''")
    assert.equal("unavailable", err.kind)
    assert.truthy(tostring(err):find("require_sync", 1, true), tostring(err))
    -- and a synchronous standby again: served again
    set_sync("*")
    wait_for(function() return db:query("SELECT 1 AS one") end, 10,
             "the pool to serve again")
  end)

  it("reports unknown_outcome, never success or failure, for a COMMIT"
     .. " whose answer was lost", function()
    if not c then
      pending("postgres not installed")
      return
    end
    local db = assert(sql.open(c.url, { pool = 2 }))
    local admin = assert(sql.open("postgres://postgres@127.0.0.1:"
                                  .. c.primary.port .. "/postgres"))
    assert(db:exec("CREATE TABLE lost (id int PRIMARY KEY)"))
    -- Without its synchronous standby the primary's COMMIT waits; the
    -- waiting backend is then terminated: the client never hears back.
    c.stop_standby()
    local result
    core.spawn(function()
      result = { db:transaction(function(tx)
        return tx:exec("INSERT INTO lost (id) VALUES (1)")
      end) }
    end)
    wait_for(function()
      local rows = admin:query("SELECT count(*) AS n FROM pg_stat_activity"
                               .. " WHERE wait_event = 'SyncRep'")
      return rows and rows[1].n == 1
    end, 10, "the COMMIT to wait for the standby")
    assert(admin:query("SELECT pg_terminate_backend(pid) FROM"
                       .. " pg_stat_activity WHERE wait_event = 'SyncRep'"))
    wait_for(function() return result end, 10, "the transaction's answer")
    assert.is_nil(result[1])
    assert.equal("unknown_outcome", result[2].kind)
    assert.is_false(result[2].retryable)
    -- it did commit locally: exactly why "failure" would be a lie
    local rows = assert(admin:query("SELECT count(*) AS n FROM lost"))
    assert.equal(1, rows[1].n)
    c.start_standby()
    wait_for(function()
      return c.primary.psql("SELECT sync_state FROM pg_stat_replication")
             == "sync"
    end, 30, "the standby to stream again")
    admin:close()
    db:close()
  end)

  it("reports unknown_outcome for a COMMIT answered by the end of the"
     .. " session (57P01)", function()
    if not c then
      pending("postgres not installed")
      return
    end
    local db = assert(sql.open(c.url, { pool = 1 }))
    local admin = assert(sql.open("postgres://postgres@127.0.0.1:"
                                  .. c.primary.port .. "/postgres"))
    -- a deferred trigger keeps COMMIT busy before it commits; the
    -- backend is terminated meanwhile and answers COMMIT with FATAL
    assert(db:exec("CREATE TABLE slowc (id int)"))
    assert(db:exec("CREATE FUNCTION slowc_wait() RETURNS trigger"
                   .. " LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(30);"
                   .. " RETURN NULL; END $$"))
    assert(db:exec("CREATE CONSTRAINT TRIGGER slowc_t AFTER INSERT ON"
                   .. " slowc DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                   .. " EXECUTE FUNCTION slowc_wait()"))
    local result
    core.spawn(function()
      result = { db:transaction(function(tx)
        return tx:exec("INSERT INTO slowc (id) VALUES (1)")
      end) }
    end)
    local busy = "FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                 .. " AND query = 'COMMIT'"
    wait_for(function()
      local rows = admin:query("SELECT count(*) AS n " .. busy)
      return rows and rows[1].n == 1
    end, 10, "the COMMIT to run the deferred trigger")
    assert(admin:query("SELECT pg_terminate_backend(pid) " .. busy))
    wait_for(function() return result end, 10, "the transaction's answer")
    assert.is_nil(result[1])
    -- the server's FATAL does not say on which side of the commit
    -- record the backend was: neither failure nor success
    assert.equal("unknown_outcome", result[2].kind, tostring(result[2]))
    assert.is_false(result[2].retryable)
    assert.equal("57P01", result[2].code)
    admin:close()
    db:close()
  end)

  it("follows the promotion of the standby during a stream of writes",
     function()
    if not c then
      pending("postgres not installed")
      return
    end
    local db = assert(sql.open(c.url, { pool = 4, connect_timeout = 2,
                                        down_for = 0.1 }))
    assert(db:exec("CREATE TABLE w (id int PRIMARY KEY, writer int)"))
    local WRITERS = 4
    local acked, acks, kinds = {}, 0, {}
    local stop, failed_at, first_ok_after = false, nil, nil
    local promoted_at
    local done = 0
    for wr = 1, WRITERS do
      core.spawn(function()
        local id = wr
        while not stop do
          local started = core.mono()
          local res, err = db:exec("INSERT INTO w (id, writer) VALUES"
                                   .. " ($1, $2)", { id, wr })
          if res then
            assert(not acked[id], "id " .. id .. " acknowledged twice")
            acked[id] = true
            acks = acks + 1
            if promoted_at and started >= promoted_at
               and not first_ok_after then
              first_ok_after = core.mono()
            end
            id = id + WRITERS
          elseif err.kind == "constraint" then
            -- the earlier attempt, whose answer was lost, went through:
            -- not acknowledged, but present; move on
            id = id + WRITERS
          else
            kinds[err.kind] = (kinds[err.kind] or 0) + 1
            failed_at = failed_at or core.mono()
            -- a write in flight at the kill may have committed
            -- (unknown_outcome): redone with the same id, a constraint
            -- error then says it had
            assert.is_true(err.retryable or err.kind == "unknown_outcome",
                           tostring(err))
            core.sleep(0.01)
          end
        end
        done = done + 1
      end)
    end
    wait_for(function() return acks >= 200 end, 20, "writes before")
    c.kill_primary()
    local killed_at = core.mono()
    -- the outage: writes fail meanwhile (nothing to connect to)
    wait_for(function()
      return (kinds.unavailable or 0) >= WRITERS
             and core.mono() - killed_at > 0.5
    end, 10, "writes to fail")
    c.promote()
    -- The promoted server has the same synchronous_standby_names and no
    -- standby of its own: its commits would wait forever. An operator
    -- (or a failover manager) relaxes it, as here, or runs two standbys.
    c.standby.psql("ALTER SYSTEM SET synchronous_standby_names = ''")
    c.standby.psql("SELECT pg_reload_conf()")
    promoted_at = core.mono()
    wait_for(function() return first_ok_after end, 15,
             "a write on the new primary")
    local before_stop = acks
    wait_for(function() return acks >= before_stop + 200 end, 15,
             "writes after")
    stop = true
    wait_for(function() return done == WRITERS end, 10, "the writers")
    -- the pool served again within seconds of the promotion
    local gap = first_ok_after - promoted_at
    print(string.format("\n  failover: %d acknowledged writes, first write"
                        .. " on the new primary %.2f s after promote;"
                        .. " errors meanwhile: %s", acks, gap,
                        require("cjson").encode(kinds)))
    assert.is_true(gap < 10, gap)
    assert.is_true(failed_at ~= nil, "no write saw the failover")
    -- every acknowledged write is on the new primary
    local newurl = "postgres://postgres@127.0.0.1:" .. c.standby.port
      .. "/postgres"
    local newdb = assert(sql.open(newurl))
    -- the promoted server has no synchronous standby of its own now
    local strict, serr = sql.open(newurl, { require_sync = true })
    assert.is_nil(strict)
    assert.equal("unavailable", serr.kind)
    local rows = assert(newdb:query("SELECT id FROM w"))
    local present = {}
    for _, r in ipairs(rows) do
      present[r.id] = true
    end
    local missing = {}
    for id in pairs(acked) do
      if not present[id] then
        missing[#missing + 1] = id
      end
    end
    assert.same({}, missing)
    newdb:close()
    db:close()
  end)
end)

describe("PostgreSQL switchover with the old primary kept up, read-only",
         function()
  local c

  setup(function()
    if servers.have_postgres() then
      c = pgha.start({ sync = false })
    end
  end)

  teardown(function()
    if c then
      c.cleanup()
    end
  end)

  it("a write refused read-only (25006) replaces every connection to"
     .. " that server: reads and writes go to the new primary", function()
    if not c then
      pending("postgres not installed")
      return
    end
    local db = assert(sql.open(c.url, { pool = 4, down_for = 0.1 }))
    finally(function() db:close() end)
    assert(db:exec("CREATE TABLE sw (id int PRIMARY KEY)"))
    -- four connections open, all to the primary
    pgha.fill(db, 4)
    local function port() return pgha.port(db) end
    assert.equal(c.primary.port, port())
    c.replicated("sw")
    -- the old primary is fenced (read-only, as a failover manager does
    -- when it cannot stop it), then the standby is promoted
    c.primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
    c.primary.psql("SELECT pg_reload_conf()")
    wait_for(function()
      return c.primary.psql("SHOW default_transaction_read_only") == "on"
    end, 10, "the old primary to be read-only")
    c.promote()
    wait_for(function()
      return c.standby.psql("SELECT pg_is_in_recovery()") == "f"
    end, 30, "the promotion")
    -- writes on the pool's connections are refused until one says 25006
    local id, err = 0, nil
    wait_for(function()
      id = id + 1
      local res
      res, err = db:exec("INSERT INTO sw (id) VALUES ($1)", { id })
      return not res and err.code == "25006"
    end, 10, "a write refused by the read-only server")
    assert.equal("unavailable", err.kind)
    -- from now on: the new primary, for reads and writes alike
    for _ = 1, 6 do
      assert.equal(c.standby.port, port())
    end
    for _ = 1, 6 do
      id = id + 1
      assert(db:exec("INSERT INTO sw (id) VALUES ($1)", { id }))
    end
  end)
end)
