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
-- Each applied migration's checksum (a digest of its SQL, comments and
-- whitespace aside) is recorded with it and compared with the file's at
-- every run: a file changed after it was applied (the database's schema
-- no longer what the file says) is logged as a warning, not refused --
-- the database is migrated already, and a start refused over it would
-- take the app down. Rows recorded before checksums were (an older
-- paygate; the column is added in place) get the file's as it is then.
-- migrate.status (`paygate migrate status`) shows, without writing, each
-- version's state: applied, pending, changed, missing or unchecked.
-- Reading the folder blocks: call it at start, not on a request.

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local sql = require "paygate.sql"

local _M = { _VERSION = "0.1.0" }

local LOCK_ID = 7217002
-- PostgreSQL: s a migration's statement (an index built on a big table),
-- or a run waiting for the lock behind it, may go without a reply: the
-- pool's query_timeout (10 s) is for a server gone silent, and cut them
-- at every start
local RUN_TIMEOUT = 3600
-- PostgreSQL: a migration's lock (ALTER TABLE takes the table's ACCESS
-- EXCLUSIVE lock) is waited for at most LOCK_WAIT. A lock request that
-- waits queues every later query of that table behind it, reads too: a
-- migration waiting for a long transaction on gw_refunds held every
-- request of the running version that read a refund, past WeChat's 5 s
-- for a notification (the upgrade trial: 13 s, then 503s). Past it the
-- run is rolled back (those queries go on), said, and tried again
-- LOCK_RETRY s later, doubling up to LOCK_RETRY_MAX, until it gets its
-- locks.
local LOCK_WAIT = "SET LOCAL lock_timeout = '1s'"
local LOCK_RETRY, LOCK_RETRY_MAX = 2, 30

local SCHEMA = [[CREATE TABLE IF NOT EXISTS paygate_migrations (
  version BIGINT PRIMARY KEY, name TEXT NOT NULL,
  applied_at DOUBLE PRECISION NOT NULL, checksum TEXT)]]

-- Whether paygate_migrations has its checksum column: a table an older
-- paygate made has not (the same table the unqualified statements name:
-- PostgreSQL's search_path resolves both).
local HAS_CHECKSUM = {
  sqlite = "SELECT 1 AS x FROM pragma_table_info('paygate_migrations')"
    .. " WHERE name = 'checksum'",
  postgres = "SELECT 1 AS x FROM pg_attribute WHERE attrelid ="
    .. " to_regclass('paygate_migrations') AND attname = 'checksum'"
    .. " AND NOT attisdropped",
}

-- paygate.log (required when first used: paygate requires the libraries
-- an app loads)
local function log()
  return require("paygate").log
end

-- Characters that run together into one token (words, numbers, quoted
-- text): whitespace between two of them is kept, as one space; beside
-- anything else (punctuation) it is dropped.
local STICKY = "[%w_$'\"\128-\255]"

-- The text a migration's checksum is taken over: its SQL with comments
-- (-- to the line's end, /* */) gone and whitespace only where it
-- separates two words, so that rewording a comment, re-indenting or
-- re-wrapping lines, trailing spaces and blank lines are no change (the
-- project edits comments of migrations long applied). Quoted text ('...',
-- "...", PostgreSQL's $tag$...$tag$) is kept as it is: a -- in a string
-- is text, and a change to it is a change.
local function canonical(s)
  local out, i, n = {}, 1, #s
  local last, gap = nil, false
  local function put(piece)
    if gap and last and last:match(STICKY)
       and piece:sub(1, 1):match(STICKY) then
      out[#out + 1] = " "
    end
    gap = false
    out[#out + 1] = piece
    last = piece:sub(-1)
  end
  while i <= n do
    local j = s:find("[%s'\"%-/$]", i)
    if not j then
      put(s:sub(i))
      break
    end
    if j > i then
      put(s:sub(i, j - 1))
    end
    local c, c2 = s:sub(j, j), s:sub(j + 1, j + 1)
    -- a dollar quote's opening: $$ or $tag$ (not a $ inside a name)
    local tag = c == "$" and not (j > 1 and s:sub(j - 1, j - 1):match("[%w_]"))
      and (s:match("^%$%$", j) or s:match("^%$[%a_][%w_]*%$", j))
    if c:match("%s") then
      gap = true
      i = select(2, s:find("^%s+", j)) + 1
    elseif c == "'" or c == '"' then
      -- to the closing quote (a doubled one is a quote inside); an
      -- unterminated one runs to the end
      local k = j + 1
      while true do
        local q = s:find(c, k, true)
        if not q then
          k = n
          break
        end
        if s:sub(q + 1, q + 1) ~= c then
          k = q
          break
        end
        k = q + 2
      end
      put(s:sub(j, k))
      i = k + 1
    elseif tag then
      local _, e = s:find(tag, j + #tag, true)
      e = e or n
      put(s:sub(j, e))
      i = e + 1
    elseif c == "-" and c2 == "-" then
      gap = true
      i = (s:find("\n", j, true) or n) + 1
    elseif c == "/" and c2 == "*" then
      gap = true
      local _, e = s:find("*/", j + 2, true)
      i = (e or n) + 1
    else
      put(c)
      i = j + 1
    end
  end
  return table.concat(out)
end

local function checksum(body)
  return crypto.hex(crypto.digest("sha256", canonical(body)))
end

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

-- run's and status's start: their arguments checked (raising at their
-- caller's caller, as misuse), then dir's files for db.engine with each
-- one's SQL and checksum (m.sql, m.checksum); nil, err when the folder or
-- a file cannot be read.
local function load_files(db, dir, fname)
  if getmetatable(db) ~= sql.DB then
    error(fname .. ": db must be a paygate.sql db", 3)
  end
  if type(dir) ~= "string" then
    error(fname .. ": dir must be a string", 3)
  end
  local list, err = scan(dir, db.engine, fname, 3)
  if not list then
    return nil, err
  end
  for _, m in ipairs(list) do
    local body, rerr = read_file(m.path)
    if not body then
      return nil, rerr
    end
    m.sql = body
    m.checksum = checksum(body)
  end
  return list
end

-- syntax: applied, err = migrate.run(db, dir)
-- returns: the list of { version, name, seconds } applied by this call
--          (maybe empty; seconds: the time its SQL took), or nil, err
--          (the failing file named in err.message and err.migration)
-- yields: one transaction
function _M.run(db, dir)
  local list, err = load_files(db, dir, "migrate.run")
  if not list then
    return nil, err
  end
  if db.engine == "postgres" then
    local ok, serr = pg_schema(db)
    if not ok then
      return nil, serr
    end
  end
  -- what the run found, logged once it committed (the transaction may
  -- run its function again: each run starts them afresh)
  local changed, filled, took, said
  local function run(tx)
    changed, filled, took = {}, {}, {}
    if tx.engine == "postgres" then
      -- The lock first: LOCK TABLE takes no snapshot, so even under a
      -- REPEATABLE READ or SERIALIZABLE default the SELECT below (which
      -- does) sees what the previous holder committed. (Waited for as
      -- long as it takes: another run holds it. The migrations' own
      -- locks, below, at most LOCK_WAIT each.)
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
    -- a table an older paygate made: its checksum column added in place
    -- (nullable: that paygate's INSERT still works, during a rolling
    -- upgrade too)
    local has, herr = tx:query(HAS_CHECKSUM[tx.engine])
    if not has then
      return nil, herr
    end
    if not has[1] then
      local _, aerr = tx:exec("ALTER TABLE paygate_migrations ADD COLUMN"
                              .. " checksum TEXT")
      if aerr then
        aerr.message = "migrate: adding the checksum column to"
          .. " paygate_migrations: " .. aerr.message
        return nil, aerr
      end
    end
    local rows, qerr = tx:query("SELECT version, name, checksum FROM"
                                .. " paygate_migrations")
    if not rows then
      return nil, qerr
    end
    local done, newest, ahead = {}, list[#list], nil
    for _, r in ipairs(rows) do
      local v = tonumber(r.version)
      done[v] = r
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
        newest.version, newest.name) or "none"), { retryable = false,
        database_newest = ahead.version,
        app_newest = newest and newest.version or 0 })
    end
    local applied, pending = {}, {}
    for _, m in ipairs(list) do
      if not done[m.version] then
        pending[#pending + 1] = m.name
      end
    end
    if #pending > 0 and tx.engine == "postgres" then
      -- (only for the migrations' statements: the bookkeeping above
      -- waits as before)
      local _, lerr = tx:exec(LOCK_WAIT)
      if lerr then
        return nil, lerr
      end
    end
    if #pending > 0 and not said then
      -- (a big table's index may take minutes: the start waits for it)
      said = true
      log().info("migrate: applying " .. #pending .. " migration(s): "
        .. table.concat(pending, ", ") .. " (the app loads once they are"
        .. " committed)", { migrations = #pending })
    end
    for _, m in ipairs(list) do
      local row = done[m.version]
      if row and row.checksum == nil then
        -- recorded before checksums were: what the file says now is all
        -- there is to go by
        local _, uerr = tx:exec("UPDATE paygate_migrations SET checksum"
          .. " = $1 WHERE version = $2", { m.checksum, m.version })
        if uerr then
          return nil, uerr
        end
        filled[#filled + 1] = m
      elseif row and row.checksum ~= m.checksum then
        changed[#changed + 1] = m
      end
      if not row then
        local t0 = core.mono()
        local ok, merr = tx:exec_script(m.sql)
        if not ok then
          if merr.code == "55P03" then
            -- a lock held past LOCK_WAIT: not db:transaction's busy (it
            -- would try again at once), run's wait below
            merr = core.error("lock_wait", merr.message,
                              { retryable = false, code = merr.code })
          end
          merr.message = "migration " .. m.name .. ": " .. merr.message
          merr.migration = m.name
          return nil, merr
        end
        local secs = core.mono() - t0
        took[#took + 1] = ("%d (%s, %.3f s)"):format(m.version, m.name,
                                                      secs)
        local _, ierr = tx:exec("INSERT INTO paygate_migrations (version,"
          .. " name, applied_at, checksum) VALUES ($1, $2, $3, $4)",
          { m.version, m.name, core.time(), m.checksum })
        if ierr then
          return nil, ierr
        end
        applied[#applied + 1] = { version = m.version, name = m.name,
                                  seconds = secs }
      end
    end
    return applied
  end
  local started, retry = core.mono(), LOCK_RETRY
  local applied, terr
  while true do
    applied, terr = db:transaction(run, { query_timeout = RUN_TIMEOUT })
    if applied or terr.kind ~= "lock_wait" then
      break
    end
    log().warn(("migrate: migration %s waited over 1 s for a lock that another"
      .. " transaction holds on its table (a long query, or a session"
      .. " idle in transaction: see pg_stat_activity); rolled back, so"
      .. " the queries queued behind it go on; trying again in %d s")
      :format(terr.migration, retry), { migration = terr.migration,
      retry_in = retry, error = terr.message })
    core.sleep(retry)
    retry = math.min(retry * 2, LOCK_RETRY_MAX)
  end
  if not applied then
    return nil, terr
  end
  if #applied > 0 then
    log().info(("migrate: applied %d migration(s) in %.3f s: %s")
      :format(#applied, core.mono() - started, table.concat(took, ", ")),
      { migrations = #applied })
  end
  if #filled > 0 then
    local names = {}
    for i, m in ipairs(filled) do names[i] = m.name end
    log().info("migrate: recorded the checksums of " .. #filled
      .. " migration(s) applied before paygate kept them ("
      .. table.concat(names, ", ") .. "), from the files as they are now:"
      .. " a change made to them before now cannot be seen")
  end
  for _, m in ipairs(changed) do
    log().warn(string.format("migrate: migration %d (%s) changed after it"
      .. " was applied to this database (its SQL, not only comments or"
      .. " whitespace): the schema here is what the file said then. Put"
      .. " a change in a new migration and restore this file; if the"
      .. " edit is meant (a new database gets the same schema either"
      .. " way), clear the recorded checksum (UPDATE paygate_migrations"
      .. " SET checksum = NULL WHERE version = %d) and the next start"
      .. " records the file's", m.version, m.name, m.version),
      { version = m.version, file = m.path })
  end
  return applied
end

-- syntax: entries, err = migrate.status(db, dir)
-- returns: one entry per version in dir's folder for db.engine or in
--          paygate_migrations, sorted by version:
--          { version, name, file, applied_at, state }
--          name: the file's (a row's recorded name when it has no file);
--          file: its path, nil when "missing"; applied_at: the row's
--          (epoch seconds), nil when "pending"; state: "applied",
--          "pending" (no row yet), "changed" (the file's checksum is not
--          the one recorded when it was applied), "missing" (a row with
--          no file: a file deleted or renamed to another version, or a
--          newer app migrated the database), "unchecked" (a row with no
--          checksum: applied by a paygate that kept none, or one cleared
--          by hand; the next run records the file's).
--          nil, err when the folder, a file or the table cannot be read.
-- Reads only: nothing is made or changed in the database (one never
-- migrated has every file pending; an older paygate's table, without its
-- checksum column, is left so). Reading the folder blocks: for tools.
function _M.status(db, dir)
  local list, err = load_files(db, dir, "migrate.status")
  if not list then
    return nil, err
  end
  local rows = {}
  local has, herr = db:has_table("paygate_migrations")
  if has == nil then
    return nil, herr
  end
  if has then
    local col, cerr = db:query(HAS_CHECKSUM[db.engine])
    if not col then
      return nil, cerr
    end
    local qerr
    rows, qerr = db:query("SELECT version, name, applied_at"
      .. (col[1] and ", checksum" or "") .. " FROM paygate_migrations")
    if not rows then
      return nil, qerr
    end
  end
  local out, by = {}, {}
  for _, m in ipairs(list) do
    local e = { version = m.version, name = m.name, file = m.path,
                state = "pending", checksum = m.checksum }
    out[#out + 1] = e
    by[m.version] = e
  end
  for _, r in ipairs(rows) do
    -- (on SQLite a row written by hand may hold a version that is no
    -- number: it is reported as it is, never dropped)
    local v = tonumber(r.version)
    local e = v and by[v]
    if not e then
      out[#out + 1] = { version = v or r.version, name = r.name,
                        applied_at = r.applied_at, state = "missing" }
    else
      e.applied_at = r.applied_at
      if r.checksum == nil then
        e.state = "unchecked"
      elseif r.checksum == e.checksum then
        e.state = "applied"
      else
        e.state = "changed"
      end
    end
  end
  for _, e in ipairs(out) do
    e.checksum = nil
  end
  table.sort(out, function(a, b)
    local na, nb = type(a.version) == "number", type(b.version) == "number"
    if na ~= nb then
      return na
    end
    if na then
      return a.version < b.version
    end
    return tostring(a.version) < tostring(b.version)
  end)
  return out
end

return _M
