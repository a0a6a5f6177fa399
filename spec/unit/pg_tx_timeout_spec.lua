-- PostgreSQL: tx_timeout (docs/storage.md). An instance that freezes
-- (a VM paused, SIGSTOP) inside a transaction kept its row locks for as
-- long as it was frozen: other instances' updates of those rows waited
-- until it resumed. The driver now starts every transaction with
-- SET LOCAL idle_in_transaction_session_timeout = tx_timeout, so the
-- server ends such a session and releases its locks; the frozen
-- transaction's next command fails "timeout" (it was rolled back, not of
-- unknown outcome) and its pooled connection is replaced.
local core = require "paygate.core"
local paygate = require "paygate"
local sql = require "paygate.sql"
local servers = require "spec.support.servers"
local proc = require "paygate.testing.proc"

local wait_until = proc.wait_until

local function wait_task(t, secs, what)
  wait_until(function() return t:finished() end, secs, what)
  return t:wait()
end

local function read_file(path)
  local f = io.open(path, "r")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

describe("PostgreSQL tx_timeout", function()
  local srv

  setup(function()
    if servers.have_postgres() then
      srv = servers.postgres()
    end
  end)

  teardown(function()
    servers.stop_all()
  end)

  -- A store with table tt holding row 1 (v = 'start'); pool 1: the
  -- transaction and the query after it share the one connection slot.
  local function open(opts)
    local db = assert(sql.open(srv.url, opts))
    assert(db:exec_script("DROP TABLE IF EXISTS tt;"
      .. " CREATE TABLE tt (id int PRIMARY KEY, v text);"
      .. " INSERT INTO tt VALUES (1, 'start')"))
    return db
  end

  local function value(db)
    return assert(db:query("SELECT v FROM tt WHERE id = 1"))[1].v
  end

  it("ends a transaction left idle: its row lock is released, its COMMIT"
     .. " fails timeout, the store goes on", function()
    if not srv then
      pending("postgres not installed")
      return
    end
    local db = open({ pool = 1, tx_timeout = 300 })
    finally(function() db:close() end)
    -- another instance: its update must not wait for the idle one
    local other = assert(sql.open(srv.url, { pool = 1, query_timeout = 5 }))
    finally(function() other:close() end)

    local state = {}
    local task = paygate.spawn(function()
      return db:transaction(function(tx)
        assert(tx:exec("UPDATE tt SET v = 'frozen' WHERE id = 1"))
        state.locked = true
        -- idle in the transaction (as a frozen instance would be) until
        -- the other instance's update got through
        wait_until(function() return state.other_done end, 20,
                   "the other update")
        return true
      end, { retries = 1 })
    end)
    wait_until(function() return state.locked end, 5, "the row lock")
    local t0 = core.mono()
    local res, err = other:exec("UPDATE tt SET v = 'other' WHERE id = 1")
    local waited = core.mono() - t0
    state.other_done = true
    assert(res, tostring(err))
    assert.equal(1, res.changes)
    -- (the server ends the session 0.3 s after the transaction went idle)
    assert.is_true(waited < 3, "the update waited " .. waited .. " s")

    local ok, cerr = wait_task(task, 10, "the idle transaction")
    assert.is_nil(ok)
    assert.equal("timeout", cerr.kind, tostring(cerr))
    assert.is_true(cerr.retryable)
    assert.truthy(tostring(cerr):find("tx_timeout", 1, true), tostring(cerr))
    -- rolled back: the other instance's value stands; the store's one
    -- connection was replaced, not reused broken
    assert.equal("other", value(db))
    assert(db:exec("UPDATE tt SET v = 'again' WHERE id = 1"))
    assert.equal("again", value(other))
  end)

  it("a frozen instance's COMMIT, sent before it read the server's"
     .. " goodbye, fails timeout, not unknown_outcome", function()
    if not srv then
      pending("postgres not installed")
      return
    end
    local db = open({ pool = 1, tx_timeout = 200 })
    finally(function() db:close() end)
    local log = srv.dir .. "/pg.log"
    local ok, err = db:transaction(function(tx)
      local pid = assert(tx:query("SELECT pg_backend_pid() AS pid"))[1].pid
      assert(tx:exec("UPDATE tt SET v = 'frozen' WHERE id = 1"))
      -- Frozen: the event loop does not run (nothing is read from the
      -- socket) until the server has ended this session, as its log says.
      local want = "[" .. math.floor(pid) .. "] FATAL:  terminating"
        .. " connection due to idle-in-transaction timeout"
      local deadline = core.mono() + 10
      while not read_file(log):find(want, 1, true) do
        assert(core.mono() < deadline, "the server never ended the idle"
               .. " session (" .. want .. ")")
      end
      return true                        -- COMMIT, on the loop's next turn
    end, { retries = 1 })
    assert.is_nil(ok)
    assert.equal("timeout", err.kind, tostring(err))
    assert.truthy(tostring(err):find("tx_timeout", 1, true), tostring(err))
    assert.equal("start", value(db))
  end)

  it("sets the server's limit from tx_timeout (default 30 s, 0: none)",
     function()
    if not srv then
      pending("postgres not installed")
      return
    end
    local function limit(db)
      local v
      assert(db:transaction(function(tx)
        v = assert(tx:query("SHOW idle_in_transaction_session_timeout"))[1]
        return true
      end))
      -- a db:atomic job's transaction too
      local res = assert(db:atomic({
        { "SHOW idle_in_transaction_session_timeout" } }))
      assert.equal(v.idle_in_transaction_session_timeout,
                   res[1].rows[1].idle_in_transaction_session_timeout)
      -- and only for the transaction: SET LOCAL
      local after = assert(db:query("SHOW idle_in_transaction_session_timeout"))
      assert.equal("0", after[1].idle_in_transaction_session_timeout)
      db:close()
      return v.idle_in_transaction_session_timeout
    end
    assert.equal("30s", limit(assert(sql.open(srv.url, { pool = 1 }))))
    assert.equal("1500ms", limit(assert(sql.open(srv.url,
                                         { pool = 1, tx_timeout = 1500 }))))
    assert.equal("250ms", limit(assert(sql.open(srv.url
                                                .. "?tx_timeout=250"))))
    assert.equal("0", limit(assert(sql.open(srv.url, { tx_timeout = 0 }))))
  end)
end)
