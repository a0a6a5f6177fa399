-- paygate.migrate: versioned schema migrations, applied once.
--
--   migrations/
--     sqlite/001_orders.sql  002_refunds.sql ...
--     postgres/001_orders.sql ...
--
--   local applied, err = migrate.run(db, "migrations")
--
-- Files are named NNN_name.sql (NNN a positive integer, the version) and
-- applied in version order; the whole run (the check of what is applied,
-- every missing migration and its row in paygate_migrations) is one
-- write transaction, so a failure keeps nothing of the run. Instances
-- that run it together apply each migration exactly once: on PostgreSQL
-- (once the table exists) the transaction's first statement locks
-- paygate_migrations against other runs, before any snapshot is taken,
-- so its check sees what the previous holder committed whatever the
-- isolation level; on SQLite the transaction runs inside the writer's
-- BEGIN IMMEDIATE, which holds the database's write lock from before the
-- check until the commit, and other processes wait for it (busy_timeout,
-- then the transaction's retries).
-- A database holding a version above the folder's newest (a newer app
-- migrated it) is refused, kind "config": the older code does not know
-- its schema.
-- Reading the folder blocks: call it at start, not on a request.

local core = require "paygate.core"
local sql = require "paygate.sql"

local _M = { _VERSION = "0.1.0" }

local LOCK_ID = 7217002
-- PostgreSQL: s a migration's statement (an index built on a big table),
-- or a run waiting for the lock behind it, may go without a reply: the
-- pool's query_timeout (10 s) is for a server gone silent, and cut them
-- at every start
local RUN_TIMEOUT = 3600

local SCHEMA = [[CREATE TABLE IF NOT EXISTS paygate_migrations (
  version BIGINT PRIMARY KEY, name TEXT NOT NULL,
  applied_at DOUBLE PRECISION NOT NULL)]]

-- Raises at `level` (counted from the caller of this function) when two
-- files share a version; else the sorted list, or nil, err.
local function scan(dir, engine, fname, level)
  local folder = dir .. "/" .. engine
  local names, err = core.listdir(folder)
  if not names then
    local hint = ""
    local top = core.listdir(dir)
    if top then
      -- .sql files straight in dir: the engine's folder is missing
      for _, n in ipairs(top) do
        if n:match("%.sql$") then
          hint = " (the .sql files are in " .. dir .. " itself: put each"
            .. " engine's in its own folder, " .. folder .. "/NNN_name.sql)"
          break
        end
      end
    end
    return nil, core.error("unavailable", "migrate: " .. err.message .. hint,
                           { retryable = false })
  end
  local list, seen = {}, {}
  for _, name in ipairs(names) do
    local v = name:match("^(%d+)_.*%.sql$")
    if v then
      v = tonumber(v)
      if seen[v] then
        error(fname .. ": two migrations with version " .. v .. " in "
              .. folder .. " (" .. seen[v] .. ", " .. name .. ")", level + 1)
      end
      seen[v] = name
      list[#list + 1] = { version = v, name = name,
                          path = folder .. "/" .. name }
    end
  end
  table.sort(list, function(a, b) return a.version < b.version end)
  return list
end

-- syntax: list, err = migrate.list(dir, engine)
-- returns: { { version = n, name = "001_x.sql", path = ... }, ... } sorted
--          by version, or nil, err ("unavailable": no such folder)
function _M.list(dir, engine)
  if type(dir) ~= "string" then
    error("migrate.list: dir must be a string", 2)
  end
  if type(engine) ~= "string" then
    error("migrate.list: engine must be a string", 2)
  end
  local list, err = scan(dir, engine, "migrate.list", 2)
  return list, err
end

-- PostgreSQL: paygate_migrations exists (its own transaction, under an
-- advisory lock: CREATE TABLE IF NOT EXISTS races between sessions).
local function pg_schema(db)
  return db:transaction(function(tx)
    local _, lerr = tx:exec("SELECT pg_advisory_xact_lock($1)", { LOCK_ID })
    if lerr then
      return nil, lerr
    end
    local _, serr = tx:exec(SCHEMA)
    if serr then
      return nil, serr
    end
    return true
  end)
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then
    return nil, core.error("unavailable", "migrate: " .. err)
  end
  local s, rerr = f:read("*a")
  f:close()
  if not s then
    return nil, core.error("unavailable", "migrate: " .. path .. ": "
                           .. tostring(rerr))
  end
  return s
end

-- syntax: applied, err = migrate.run(db, dir)
-- returns: the list of { version, name } applied by this call (maybe
--          empty), or nil, err (the failing file named in err.message)
-- yields: one transaction
function _M.run(db, dir)
  if getmetatable(db) ~= sql.DB then
    error("migrate.run: db must be a paygate.sql db", 2)
  end
  if type(dir) ~= "string" then
    error("migrate.run: dir must be a string", 2)
  end
  local list, err = scan(dir, db.engine, "migrate.run", 2)
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
  if db.engine == "postgres" then
    local ok, serr = pg_schema(db)
    if not ok then
      return nil, serr
    end
  end
  return db:transaction(function(tx)
    if tx.engine == "postgres" then
      -- The lock first: LOCK TABLE takes no snapshot, so even under a
      -- REPEATABLE READ or SERIALIZABLE default the SELECT below (which
      -- does) sees what the previous holder committed.
      local _, lerr = tx:exec("LOCK TABLE paygate_migrations IN SHARE ROW"
                              .. " EXCLUSIVE MODE")
      if lerr then
        return nil, lerr
      end
    else
      local _, serr = tx:exec(SCHEMA)
      if serr then
        return nil, serr
      end
    end
    local rows, qerr = tx:query("SELECT version, name FROM"
                                .. " paygate_migrations")
    if not rows then
      return nil, qerr
    end
    local done, newest, ahead = {}, list[#list], nil
    for _, r in ipairs(rows) do
      local v = tonumber(r.version)
      done[v] = true
      if (not newest or v > newest.version)
         and (not ahead or v > ahead.version) then
        ahead = { version = v, name = r.name }
      end
    end
    if ahead then
      -- an older app on a store a newer one migrated: it does not know
      -- that schema (and would write rows the newer one reads wrong)
      return nil, core.error("config", string.format("migrate: the"
        .. " database holds migration %d (%s), newer than this app's"
        .. " newest, %s: a newer version of the app migrated it, or"
        .. " another app's migrations share the database; start the"
        .. " version that knows its schema", ahead.version,
        tostring(ahead.name), newest and string.format("%d (%s)",
        newest.version, newest.name) or "none"), { retryable = false })
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
          { m.version, m.name, core.time() })
        if ierr then
          return nil, ierr
        end
        applied[#applied + 1] = { version = m.version, name = m.name }
      end
    end
    return applied
  end, { query_timeout = RUN_TIMEOUT })
end

return _M
