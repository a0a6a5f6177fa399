-- examples/gateway/spec/rolling_upgrade_spec.lua: a store that a newer
-- version migrated while this one serves (a rolling upgrade: the new
-- instance starts first and applies its migrations, the old ones serve on
-- beside it, docs/gateway.md Upgrading). A worker of the running
-- generation that dies is restarted on that store and serves, with a
-- warning; a start or a reload of this version on it is still refused
-- (a rollback: this code does not know that schema). Was: the restarted
-- worker was refused ('the database holds migration 14 ..., newer than
-- this app's newest, 12'), exit 1 at every restart with the master's
-- backoff: the upgrade trial's old instance lost its workers one by one.
local json = require "paygate.json"
local S = dofile("examples/gateway/spec/support.lua")

describe("gateway on a store a newer version migrated", function()
  local env

  setup(function()
    env = S.start{ workers = 2 }
  end)
  teardown(S.stop)

  it("a restarted worker serves on, saying so; a reload is refused",
     function()
    -- what a newer version's start left: a column added, its migration
    -- recorded
    assert(env.db:exec("ALTER TABLE gw_payments ADD COLUMN newer_note"
                       .. " TEXT"))
    assert(env.db:exec("INSERT INTO paygate_migrations (version, name,"
      .. " applied_at, checksum) VALUES (999, '999_newer.sql', 1, 'x')"))
    local mark = #env.gw:logs()
    local pids = env.gw:workers()
    assert.equal(2, #pids)
    env.gw:kill_worker(pids[1])
    -- the replacement has loaded (its warning), or failed (the master's
    -- line for its exit)
    local said, failed
    S.wait_until(function()
      local logs = env.gw:logs():sub(mark + 1)
      said = logs:match('[^\n]*"gateway: the store holds migration 999[^\n]*')
      failed = logs:match('[^\n]*exited with status 1[^\n]*')
      return said or failed
    end, 20, "the restarted worker loaded or failed")
    assert.is_nil(failed)
    local e = json.decode(said)
    assert.equal("warn", e.level)
    assert.equal(999, e.database_newest)
    assert.truthy(e.msg:find("this restarted worker serves on", 1, true),
                  e.msg)
    -- both workers serve: payments made and read, as many as it takes
    -- for each worker to answer one (no refusal in the log meanwhile)
    for i = 1, 6 do
      local b = env:create{ order_id = S.order_id("ru" .. i) }
      assert.equal(b.payment.state, env:get(b.payment.id).state)
    end
    assert.equal(2, #env.gw:workers())
    assert.is_nil(env.gw:logs():sub(mark + 1):find("exited with status",
                                                   1, true))
    -- a new generation of this code on that store: refused, the old one
    -- serving on
    local ok, out = env.gw:reload()
    assert.is_nil(ok)
    assert.truthy(tostring(out):find("holds migration 999", 1, true),
                  tostring(out))
    local b = env:create{ order_id = S.order_id("ru-after") }
    assert.equal(b.payment.state, env:get(b.payment.id).state)
  end)
end)
