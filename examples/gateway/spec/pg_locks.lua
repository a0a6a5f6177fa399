-- Row locks for the gateway's PostgreSQL race specs (create_race_spec,
-- switch_race_spec): a race made deterministic by holding a row the
-- racing transaction needs, waiting until the store shows it waiting,
-- then letting go.
local testing = require "paygate.testing"
local spawn = require("paygate.core").spawn

local _M = {}

--- syntax: n = pg_locks.waiting(db[, prefix])
-- How many sessions of the store wait for a lock (in a statement starting
-- with prefix, if given).
function _M.waiting(db, prefix)
  local rows = assert(db:query("SELECT count(*) AS n FROM"
    .. " pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE"
    .. " $1", { (prefix or "") .. "%" }))
  return tonumber(rows[1].n)
end

--- syntax: release = pg_locks.hold(db, sql, args)
-- Holds the rows `sql` selects FOR UPDATE (in a transaction of its own)
-- until release() is called; returns once they are held.
function _M.hold(db, sql, args)
  local held, release = false, false
  spawn(function()
    assert(db:transaction(function(tx)
      assert(tx:query(sql .. " FOR UPDATE", args))
      held = true
      testing.wait_until(function() return release end, 30, "release")
    end))
  end)
  testing.wait_until(function() return held end, 10, "the lock")
  return function() release = true end
end

--- syntax: release = pg_locks.hold_payment(db, id)
function _M.hold_payment(db, id)
  return _M.hold(db, "SELECT id FROM gw_payments WHERE id = $1", { id })
end

return _M
