-- outbox.prune on PostgreSQL against a replay that commits while the
-- prune's DELETE waits for the row: the replayed (pending again) event
-- must stay. Without the condition repeated outside the subquery the
-- DELETE rechecks only "id IN (...)" on the new row version and deletes
-- an event that is pending again.
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local outbox = require "paygate.outbox"
local servers = require "spec.support.servers"

if not servers.have_postgres() then
  describe("outbox.prune race", function()
    pending("PostgreSQL is not installed")
  end)
  return
end

local pg_srv = servers.postgres()
teardown(function() servers.stop_all() end)

describe("outbox.prune on PostgreSQL", function()
  it("keeps an event replayed while the prune waited for it", function()
    local db = assert(sql.open(pg_srv.url))
    local other = assert(sql.open(pg_srv.url))
    -- a third handle watches: a statement on `other` would be pipelined
    -- behind the waiting DELETE
    local watch = assert(sql.open(pg_srv.url))
    assert(db:exec_script("DROP TABLE IF EXISTS paygate_outbox"))
    assert(outbox.setup(db))
    assert(outbox.setup(other))   -- its schema check must not be what waits
    local id
    assert(db:transaction(function(tx)
      id = assert(outbox.enqueue(tx, { subject = "pay_1",
                                       type = "payment.paid" }))
    end))
    local now = core.time()
    assert(db:exec("UPDATE paygate_outbox SET state = 'delivered',"
                   .. " delivered_at = $1 WHERE id = $2",
                   { now - 8 * 86400, id }))
    local pruning
    local replay = paygate.spawn(function()
      return db:transaction(function(tx)
        -- what outbox.replay does, held open until the prune waits
        assert(tx:exec("UPDATE paygate_outbox SET state = 'pending',"
          .. " attempts = 0, delivered_at = NULL WHERE id = $1", { id }))
        pruning = paygate.spawn(function()
          return outbox.prune(other, { now = now })
        end)
        servers.wait_for(function()
          local rows = assert(watch:query("SELECT count(*)::int AS n FROM"
            .. " pg_stat_activity WHERE wait_event_type = 'Lock' AND query"
            .. " LIKE 'DELETE FROM paygate_outbox%'"))
          return rows[1].n == 1
        end, 10, "the prune to wait for the row lock")
        return true
      end)
    end)
    assert(replay:wait())
    local n = assert(pruning:wait())
    assert.equal(0, n)
    local rows = assert(db:query("SELECT state FROM paygate_outbox WHERE"
                                 .. " id = $1", { id }))
    assert.same({ { state = "pending" } }, rows)
    db:close()
    other:close()
    watch:close()
  end)
end)
