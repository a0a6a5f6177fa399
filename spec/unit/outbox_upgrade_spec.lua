-- paygate.outbox on a table an older paygate made (no prior_attempts).
-- Only outbox.setup and the dispatcher add the column: a list, a replay or
-- a prune leaves the table as it is, so a role that may only read lists
-- it. On PostgreSQL the ALTER takes an ACCESS EXCLUSIVE lock, and waiting
-- for it behind a long transaction queued every enqueue (the notification
-- path) behind the waiting ALTER: it now gives up after a short lock
-- timeout, the outbox works without the column meanwhile, and the
-- dispatcher adds it later.
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local outbox = require "paygate.outbox"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"
local kit = require "support.outbox_kit"
local wait_until, enqueue = kit.wait_until, kit.enqueue

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"
local tmp = servers.mktemp()
local pg_srv
local n = 0

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

-- The table as paygate made it before prior_attempts, with one dead
-- letter tried twice; returns its id.
local function old_table(db)
  local pg = db.engine == "postgres"
  assert(db:exec_script("DROP TABLE IF EXISTS paygate_outbox;"
    .. " DROP TABLE IF EXISTS paygate_leases;"
    .. " CREATE TABLE paygate_outbox (id "
    .. (pg and "BIGSERIAL" or "INTEGER") .. " PRIMARY KEY"
    .. (pg and "" or " AUTOINCREMENT")
    .. ", subject TEXT NOT NULL, type TEXT NOT NULL, payload TEXT NOT"
    .. " NULL, shard INTEGER NOT NULL, state TEXT NOT NULL DEFAULT"
    .. " 'pending', attempts INTEGER NOT NULL DEFAULT 0, next_at DOUBLE"
    .. " PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
    .. " delivered_at DOUBLE PRECISION, sinks_done TEXT NOT NULL"
    .. " DEFAULT '', last_error TEXT)"))
  local res = assert(db:exec("INSERT INTO paygate_outbox (subject, type,"
    .. " payload, shard, next_at, created_at, attempts, state) VALUES"
    .. " ('pay_old', 't', '{}', $1, $2, $2, 2, 'dead')"
    .. (pg and " RETURNING id" or ""),
    { outbox.shard_of("pay_old"), core.time() }))
  return res.last_id
end

local function has_column(db)
  local rows = assert(db:query(db.engine == "postgres"
    and "SELECT 1 AS x FROM pg_attribute WHERE attrelid ="
        .. " to_regclass('paygate_outbox') AND attname = 'prior_attempts'"
        .. " AND NOT attisdropped"
    or "SELECT 1 AS x FROM pragma_table_info('paygate_outbox') WHERE"
        .. " name = 'prior_attempts'"))
  return rows[1] ~= nil
end

local stores = {
  sqlite = function()
    n = n + 1
    return assert(sql.open("sqlite:" .. tmp .. "/u" .. n .. ".db"))
  end,
}
if servers.have_postgres() then
  stores.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    return assert(sql.open(pg_srv.url))
  end
end

for engine, open in pairs(stores) do
  describe("paygate.outbox on an older paygate's table, " .. engine, function()
    it("a list, a replay and a prune leave the table as it is (no ALTER)",
       function()
      local db = open()
      local id = old_table(db)
      -- (was: the list added the column)
      local rows = assert(outbox.list(db))
      assert.equal(1, #rows)
      assert.same({ id, 2, 0 }, { rows[1].id, rows[1].attempts,
                                  rows[1].prior_attempts })
      assert.is_false(has_column(db))
      assert.equal(1, assert(outbox.replay(db, id)))
      rows = assert(outbox.list(db))
      assert.same({ "pending", 0 }, { rows[1].state, rows[1].attempts })
      assert.equal(0, assert(outbox.prune(db)))
      assert.is_false(has_column(db))
      -- setup adds it
      assert(outbox.setup(db))
      assert.is_true(has_column(db))
      db:close()
    end)
  end)
end

if not stores.postgres then
  describe("paygate.outbox upgrade on PostgreSQL", function()
    pending("PostgreSQL is not installed")
  end)
  return
end

describe("paygate.outbox upgrade on PostgreSQL", function()
  it("a role that may only read lists an older paygate's table (the"
     .. " library and scripts/outbox.lua)", function()
    local adm = stores.postgres()
    local id = old_table(adm)
    assert(adm:exec_script("DROP ROLE IF EXISTS outbox_reader;"
      .. " CREATE ROLE outbox_reader LOGIN;"
      .. " GRANT SELECT ON paygate_outbox TO outbox_reader"))
    local url = "postgres://outbox_reader@127.0.0.1:" .. pg_srv.port
                .. "/postgres"
    local ro = assert(sql.open(url))
    -- (was: permission denied, "must be owner of table paygate_outbox")
    local rows, err = outbox.list(ro, { state = "dead" })
    assert.is_nil(err)
    assert.same({ id, "dead", 0 }, { rows[1].id, rows[1].state,
                                     rows[1].prior_attempts })
    ro:close()
    local out = tmp .. "/cli.out"
    local p = proc.spawn({ BIN, "exec", "scripts/outbox.lua", url, "list" },
                         { log = out })
    local rc = p:wait(30)
    local text = proc.read(out)
    assert.equal(0, rc, text)
    assert.matches('"subject":"pay_old"', text, 1, true)
    assert.is_false(has_column(adm))
    assert(adm:exec_script("DROP TABLE paygate_outbox;"
      .. " DROP ROLE outbox_reader"))
    adm:close()
  end)

  it("an ALTER blocked by a long transaction gives up within its lock"
     .. " timeout, enqueues go on meanwhile, and the dispatcher adds the"
     .. " column once it ended", function()
    local db = stores.postgres()
    local old = old_table(db)
    assert(db:exec("UPDATE paygate_outbox SET state = 'pending'"))
    local blocker = stores.postgres()
    local other = stores.postgres()
    local watch = stores.postgres()
    -- a long transaction that read the table: it holds ACCESS SHARE,
    -- which the ALTER's ACCESS EXCLUSIVE waits for
    local holding, release = false, false
    finally(function() release = true end)
    local blk = paygate.spawn(function()
      return blocker:transaction(function(tx)
        assert(tx:query("SELECT count(*) AS n FROM paygate_outbox"))
        holding = true
        wait_until(function() return release end, 60, "the release")
        return true
      end)
    end)
    wait_until(function() return holding end, 10, "the blocker")
    local got = {}
    local clock = { t = core.time() + 1 }
    local d = outbox.dispatcher(db, {
      sinks = { function(event) got[#got + 1] = event end },
      now = function() return clock.t end })
    local t0 = core.mono()
    local stepping = paygate.spawn(function() return d:step() end)
    wait_until(function()
      local rows = assert(watch:query("SELECT count(*)::int AS n FROM"
        .. " pg_stat_activity WHERE wait_event_type = 'Lock' AND query"
        .. " LIKE 'ALTER TABLE paygate_outbox%'"))
      return rows[1].n == 1
    end, 10, "the ALTER to wait for its lock")
    -- an enqueue now queues behind the waiting ALTER: it must complete
    -- while the blocker still holds its lock (was: only once the ALTER
    -- failed, after the query timeout, 10 s)
    local id
    paygate.spawn(function() id = enqueue(other, "pay_new", "t") end)
    wait_until(function() return id ~= nil end, 5, "the enqueue")
    assert.is_true(holding and not release)
    local attempted, err = stepping:wait()
    assert.is_nil(err)
    assert.truthy(attempted >= 1)
    assert.truthy(core.mono() - t0 < 5, "the step took "
                  .. (core.mono() - t0) .. " s")
    assert.is_false(has_column(db))
    -- delivered without the column
    assert.same({ "pay_old", 3 }, { got[1].subject, got[1].attempt })
    -- setup (the gateway calls it on its notification path) does not
    -- wait for the lock again, nor does the dispatcher's next round
    local t1 = core.mono()
    assert(outbox.setup(db))
    clock.t = clock.t + 1
    d:step()
    assert.truthy(core.mono() - t1 < 0.5, "took " .. (core.mono() - t1))
    assert.is_false(has_column(db))
    local listed = {}
    for _, e in ipairs(got) do listed[e.id] = true end
    assert.is_true(listed[id])
    -- the blocker ends: the dispatcher adds the column at its next try
    release = true
    assert(blk:wait())
    clock.t = clock.t + 31
    d:step()
    assert.is_true(has_column(db))
    assert.equal(1, assert(outbox.replay(db, old)))
    clock.t = clock.t + 1
    assert.equal(1, d:step())
    assert.equal(4, got[#got].attempt)     -- the 3 before the replay kept
    d:stop()
    for _, h in ipairs({ db, blocker, other, watch }) do h:close() end
  end)
end)
