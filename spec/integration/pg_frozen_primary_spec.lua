-- PostgreSQL failover when the old primary does not die but hangs: every
-- process of it stopped (SIGSTOP), as a frozen host or a partition that
-- drops packets looks from the client. The kernel still completes TCP
-- handshakes on its socket, so a connect to it waits for an answer that
-- never comes, and its open connections give no error, only silence.
-- libpq's PQconnectPoll leaves the per-host connect_timeout to the caller:
-- the pool must pass such a host on to the next one of the URL (the
-- promoted standby), and stop handing statements to its idle connections
-- to the frozen server once one of them went unanswered.
local core = require "paygate.core"
local sql = require "paygate.sql"
local servers = require "spec.support.servers"
local pgha = require "spec.support.pgha"

local wait_for = servers.wait_for

describe("PostgreSQL failover from a frozen primary", function()
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

  it("new work goes to the promoted standby; the old primary's pooled"
     .. " connections are dropped; it is not used once it answers again",
     function()
    if not c then
      pending("postgres not installed")
      return
    end
    local db = assert(sql.open(c.url, { pool = 4, connect_timeout = 1,
                                        query_timeout = 2, down_for = 0.1 }))
    finally(function() db:close() end)
    assert(db:exec("CREATE TABLE fz (id int PRIMARY KEY)"))
    -- four connections open, all to the primary
    pgha.fill(db, 4)
    local function port() return pgha.port(db) end
    assert.equal(c.primary.port, port())
    c.replicated("fz")

    c.freeze_primary()
    c.promote()
    local t0 = core.mono()
    -- one writer, one write at a time
    local id, failures, first_ok = 0, {}, nil
    while core.mono() - t0 < 20 do
      id = id + 1
      local res, err = db:exec("INSERT INTO fz (id) VALUES ($1)", { id })
      if res then
        first_ok = core.mono() - t0
        break
      end
      failures[#failures + 1] = err
      core.sleep(0.02)
    end
    assert.is_truthy(first_ok, "no write reached the promoted standby")
    -- a connect passes the frozen host after connect_timeout (1 s); the
    -- write in flight on its connection fails after query_timeout (2 s)
    assert.is_true(first_ok < 6, first_ok)
    -- only the write that was in flight failed, and as what it is: it
    -- may have committed on the frozen server. The three idle
    -- connections to that server were dropped with it, not each handed
    -- a write to wait query_timeout on.
    assert.equal(1, #failures, #failures > 1 and tostring(failures[2]) or "")
    assert.equal("unknown_outcome", failures[1].kind, tostring(failures[1]))
    for _ = 1, 20 do
      id = id + 1
      assert(db:exec("INSERT INTO fz (id) VALUES ($1)", { id }))
      assert.equal(c.standby.port, port())
    end

    -- The old primary answers again, still a primary: two primaries.
    -- The pool stays with the one it found writable; the thawed one,
    -- first in the URL, was passed over for not answering and stays last.
    c.thaw_primary()
    wait_for(function()
      return c.primary.psql("SELECT pg_is_in_recovery()") == "f"
    end, 10, "the old primary to answer")
    -- new connections: four at once, each held by a query
    local ports = {}
    local n = 0
    for i = 1, 4 do
      core.spawn(function()
        local rows = assert(db:query("SELECT inet_server_port() AS p,"
                                     .. " pg_sleep(0.2)"))
        ports[i] = tonumber(rows[1].p)
        n = n + 1
      end)
    end
    wait_for(function() return n == 4 end, 10, "four queries")
    for i = 1, 4 do
      assert.equal(c.standby.port, ports[i])
    end
    -- nothing acknowledged went to the old primary: at most the write of
    -- unknown outcome, which its backend committed once thawed
    assert.equal("0", c.primary.psql("SELECT count(*) FROM fz WHERE id > 1"))
  end)
end)
