-- An autocommit write (db:exec, db:exec_script outside a transaction) on
-- PostgreSQL whose answer is the end of the session -- FATAL 57P01 from
-- a terminated backend, or the connection gone with no answer -- may have
-- committed: it fails unknown_outcome (not retryable), and paygate.sql
-- does not run it again (docs/storage.md, Error kinds). It once failed
-- unavailable, retryable, as if nothing had been written. A read ended
-- the same way, and a write that was never sent, stay unavailable.
local core = require "paygate.core"
local sql = require "paygate.sql"
local servers = require "spec.support.servers"

local wait_for = servers.wait_for

describe("PostgreSQL autocommit write whose session ends", function()
  local srv, db, admin

  setup(function()
    if servers.have_postgres() then
      srv = servers.postgres()
    end
  end)

  teardown(function()
    servers.stop_all()
  end)

  before_each(function()
    if not srv then
      return
    end
    db = assert(sql.open(srv.url, { pool = 1 }))
    admin = assert(sql.open(srv.url, { pool = 1 }))
    assert(admin:exec_script("DROP TABLE IF EXISTS t;"
      .. " DROP SEQUENCE IF EXISTS s; CREATE SEQUENCE s;"
      .. " CREATE TABLE t (id int);"
      .. " CREATE OR REPLACE FUNCTION slow_id() RETURNS int LANGUAGE plpgsql"
      .. " AS $$ BEGIN PERFORM nextval('s'); PERFORM pg_sleep(30);"
      .. " RETURN 1; END $$"))
  end)

  after_each(function()
    if db then
      db:close()
      admin:close()
    end
  end)

  -- a case that needs the server (pending where PostgreSQL is missing)
  local function it_pg(name, fn)
    it(name, function()
      if not srv then
        pending("postgres not installed")
        return
      end
      fn()
    end)
  end

  -- db's session (the pool holds one connection): the one whose
  -- statement the cases make sleep on the server
  local function session()
    return assert(db:query("SELECT pg_backend_pid() AS pid"))[1].pid
  end

  -- Waits until session pid sleeps on the server. By pid, not by "some
  -- session sleeps": a session of an earlier case whose client gave up
  -- (query_timeout) may still be asleep, and ending that one instead
  -- left this case's statement asleep for 30 s.
  local function wait_sleeping(pid)
    wait_for(function()
      local rows = admin:query("SELECT count(*) AS n FROM pg_stat_activity"
        .. " WHERE wait_event = 'PgSleep' AND pid = " .. math.floor(pid))
      return rows and rows[1].n == 1
    end, 10, "the statement to run")
  end

  -- Runs fn(db) in a task (and after, if given, in another one: its
  -- statement queued behind fn's on the connection); once fn's statement
  -- sleeps on the server, terminates its backend from the admin
  -- connection. Returns what fn returned.
  local function terminated(fn, after)
    local pid = session()
    local result
    core.spawn(function()
      result = { fn(db) }
    end)
    if after then
      core.spawn(after)
    end
    wait_sleeping(pid)
    assert(admin:query("SELECT pg_terminate_backend(" .. math.floor(pid)
                       .. ") AS ok"))
    wait_for(function() return result end, 10, "the statement's answer")
    return result
  end

  local function nextvals()
    local rows = assert(admin:query("SELECT last_value, is_called FROM s"))
    return rows[1].is_called and rows[1].last_value or 0
  end

  it_pg("db:exec answered by FATAL 57P01 fails unknown_outcome, once",
     function()
    local r = terminated(function(d)
      return d:exec("INSERT INTO t VALUES (slow_id())")
    end)
    assert.is_nil(r[1])
    assert.equal("unknown_outcome", r[2].kind, tostring(r[2]))
    assert.is_false(r[2].retryable)
    assert.equal("57P01", r[2].code)
    -- the statement ran once: nothing ran it again
    assert.equal(1, nextvals())
    -- the pool reconnects: the next write goes through
    assert.equal(1, assert(db:exec("INSERT INTO t VALUES (2)")).changes)
  end)

  it_pg("a write sent behind it on the connection never ran: unavailable,"
     .. " retryable", function()
    local behind
    local r = terminated(function(d)
      return d:exec("INSERT INTO t VALUES (slow_id())")
    end, function()
      behind = { db:exec("INSERT INTO t VALUES (nextval('s'))") }
    end)
    assert.equal("unknown_outcome", r[2].kind, tostring(r[2]))
    wait_for(function() return behind end, 10, "the second answer")
    assert.is_nil(behind[1])
    assert.equal("unavailable", behind[2].kind, tostring(behind[2]))
    assert.is_true(behind[2].retryable)
    assert.equal(1, nextvals())
  end)

  it_pg("db:exec_script answered by FATAL 57P01 fails unknown_outcome",
     function()
    local r = terminated(function(d)
      return d:exec_script("INSERT INTO t VALUES (slow_id());"
                           .. " INSERT INTO t VALUES (3)")
    end)
    assert.is_nil(r[1])
    assert.equal("unknown_outcome", r[2].kind, tostring(r[2]))
    assert.is_false(r[2].retryable)
    assert.equal(1, nextvals())
  end)

  it_pg("a statement that ends its own session fails unknown_outcome",
     function()
    local res, err = db:exec("INSERT INTO t SELECT 1 WHERE"
                             .. " pg_terminate_backend(pg_backend_pid())")
    assert.is_nil(res)
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.is_false(err.retryable)
  end)

  it_pg("db:exec with no answer within query_timeout fails unknown_outcome"
     .. " (it commits later on the server)", function()
    local q = assert(sql.open(srv.url .. "?query_timeout=0.5", { pool = 1 }))
    assert(admin:exec("CREATE OR REPLACE FUNCTION slow_two() RETURNS int"
      .. " LANGUAGE plpgsql AS $$ BEGIN PERFORM nextval('s');"
      .. " PERFORM pg_sleep(1.5); RETURN 2; END $$"))
    local res, err = q:exec("INSERT INTO t VALUES (slow_two())")
    assert.is_nil(res)
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.matches("no reply within 0.5 s", err.message, 1, true)
    -- the server never saw the client go: the row lands once the sleep
    -- ends, and nothing ran the statement again
    wait_for(function()
      local rows = admin:query("SELECT count(*) AS n FROM t WHERE id = 2")
      return rows and rows[1].n == 1
    end, 10, "the write to commit on the server")
    assert.equal(1, nextvals())
    -- a read past query_timeout stays timeout, retryable
    local rres, rerr = q:query("SELECT pg_sleep(1.5) AS z")
    assert.is_nil(rres)
    assert.equal("timeout", rerr.kind, tostring(rerr))
    assert.is_true(rerr.retryable)
    q:close()
  end)

  it_pg("db:query of a write (INSERT ... RETURNING) answered by FATAL fails"
     .. " unknown_outcome, as db:exec does", function()
    local r = terminated(function(d)
      return d:query("INSERT INTO t VALUES (slow_id()) RETURNING id")
    end)
    assert.is_nil(r[1])
    assert.equal("unknown_outcome", r[2].kind, tostring(r[2]))
    assert.is_false(r[2].retryable)
    assert.equal(1, nextvals())
    -- a data-modifying WITH is a write too
    r = terminated(function(d)
      return d:query("WITH x AS (INSERT INTO t VALUES (slow_id())"
                     .. " RETURNING id) SELECT id FROM x")
    end)
    assert.equal("unknown_outcome", r[2].kind, tostring(r[2]))
    -- a read through WITH stays unavailable, retryable
    r = terminated(function(d)
      return d:query("WITH x AS (SELECT pg_sleep(30) AS z) SELECT z FROM x")
    end)
    assert.equal("unavailable", r[2].kind, tostring(r[2]))
    assert.is_true(r[2].retryable)
  end)

  it_pg("db:exec in flight when its pool is closed fails unknown_outcome"
     .. " (as a COMMIT does): the server commits it", function()
    assert(admin:exec("CREATE OR REPLACE FUNCTION slow_two() RETURNS int"
      .. " LANGUAGE plpgsql AS $$ BEGIN PERFORM nextval('s');"
      .. " PERFORM pg_sleep(1); RETURN 2; END $$"))
    local pid = session()
    local result
    core.spawn(function()
      result = { db:exec("INSERT INTO t VALUES (slow_two())") }
    end)
    wait_sleeping(pid)
    db:close()
    wait_for(function() return result end, 10, "the statement's answer")
    assert.is_nil(result[1])
    assert.equal("unknown_outcome", result[2].kind, tostring(result[2]))
    assert.is_false(result[2].retryable)
    wait_for(function()
      local rows = admin:query("SELECT count(*) AS n FROM t WHERE id = 2")
      return rows and rows[1].n == 1
    end, 10, "the write to commit on the server")
  end)

  it_pg("a read answered by FATAL stays unavailable, retryable", function()
    local r = terminated(function(d)
      return d:query("SELECT pg_sleep(30) AS z")
    end)
    assert.is_nil(r[1])
    assert.equal("unavailable", r[2].kind, tostring(r[2]))
    assert.is_true(r[2].retryable)
    assert.equal("57P01", r[2].code)
  end)

  it_pg("a write that was never sent stays unavailable, retryable",
     function()
    assert(db:query("SELECT 1 AS one"))    -- db has a connection
    -- the shutdown ends its idle session (FATAL 57P01, then EOF) while
    -- this loop is blocked (os.execute): the write must not be sent on it
    -- (answered by that FATAL, it would read as of unknown outcome), and
    -- with the server gone it finds no connection
    srv.stop()
    local res, err = db:exec("INSERT INTO t VALUES (5)")
    srv.start()
    assert.is_nil(res)
    assert.equal("unavailable", err.kind, tostring(err))
    assert.is_true(err.retryable)
  end)

  it_pg("db:exec whose connection is lost with no answer fails"
     .. " unknown_outcome", function()
    local pid = session()
    local result
    core.spawn(function()
      result = { db:exec("INSERT INTO t VALUES (slow_id())") }
    end)
    wait_sleeping(pid)
    -- SIGKILL: the backend says nothing (the server then restarts its
    -- other sessions too)
    assert(os.execute("kill -KILL " .. math.floor(pid)))
    wait_for(function() return result end, 10, "the statement's answer")
    assert.is_nil(result[1])
    assert.equal("unknown_outcome", result[2].kind, tostring(result[2]))
    assert.is_false(result[2].retryable)
    -- the server restarts its sessions and recovers; the pool serves
    -- again
    wait_for(function()
      return db:exec("INSERT INTO t VALUES (4)")
    end, 20, "the server to recover")
  end)
end)
