-- paygate.migrate: versioned schema migrations, applied once.
--
--   migrations/
--     sqlite/001_orders.sql  002_refunds.sql ...
--     postgres/001_orders.sql ...
--
--   local applied, err = migrate.run(db, "migrations")
--
-- Files are named NNN_name.sql (NNN a positive integer, the version) and
-- applied in version order, each in the same transaction as its row in
-- paygate_migrations. The whole run holds a lock, so instances that start
-- together apply each migration exactly once: PostgreSQL takes an
-- advisory transaction lock; SQLite's writer holds BEGIN IMMEDIATE.
-- Reading the folder blocks: call it at start, not on a request.

local sqlite_core = require "paygate.sqlite.core"

local _M = { _VERSION = "0.1.0" }

local LOCK_ID = 7217002

local SCHEMA = [[CREATE TABLE IF NOT EXISTS paygate_migrations (
  version BIGINT PRIMARY KEY, name TEXT NOT NULL,
  applied_at DOUBLE PRECISION NOT NULL)]]

-- syntax: list, err = migrate.list(dir, engine)
-- returns: { { version = n, name = "001_x.sql", path = ... }, ... } sorted
function _M.list(dir, engine)
  local folder = dir .. "/" .. engine
  local names, err = sqlite_core.listdir(folder)
  if not names then
    return nil, err
  end
  local list, seen = {}, {}
  for _, name in ipairs(names) do
    local v = name:match("^(%d+)_.*%.sql$")
    if v then
      v = tonumber(v)
      if seen[v] then
        error("migrate: two migrations with version " .. v .. " in "
              .. folder, 2)
      end
      seen[v] = true
      list[#list + 1] = { version = v, name = name,
                          path = folder .. "/" .. name }
    end
  end
  table.sort(list, function(a, b) return a.version < b.version end)
  return list
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then
    return nil, { kind = "unavailable", message = "migrate: " .. err,
                  retryable = false }
  end
  local s = f:read("*a")
  f:close()
  return s
end

-- syntax: applied, err = migrate.run(db, dir)
-- returns: the list of migrations applied by this call (maybe empty)
-- yields: one transaction
function _M.run(db, dir)
  local list, err = _M.list(dir, db.engine)
  if not list then
    return nil, err
  end
  for _, m in ipairs(list) do
    local body, rerr = read_file(m.path)
    if not body then
      return nil, rerr
    end
    m.sql = body
  end
  return db:transaction(function(tx)
    if tx.engine == "postgres" then
      local _, lerr = tx:exec("SELECT pg_advisory_xact_lock($1)", { LOCK_ID })
      if lerr then
        return nil, lerr
      end
    end
    local _, serr = tx:exec(SCHEMA)
    if serr then
      return nil, serr
    end
    local rows, qerr = tx:query("SELECT version FROM paygate_migrations")
    if not rows then
      return nil, qerr
    end
    local done = {}
    for _, r in ipairs(rows) do
      done[r.version] = true
    end
    local applied = {}
    for _, m in ipairs(list) do
      if not done[m.version] then
        local ok, merr = tx:exec_script(m.sql)
        if not ok then
          merr.message = "migration " .. m.name .. ": " .. merr.message
          return nil, merr
        end
        local _, ierr = tx:exec("INSERT INTO paygate_migrations (version,"
          .. " name, applied_at) VALUES ($1, $2, $3)",
          { m.version, m.name, sqlite_core.now() })
        if ierr then
          return nil, ierr
        end
        applied[#applied + 1] = { version = m.version, name = m.name }
      end
    end
    return applied
  end)
end

return _M
