-- paygate migrate: what paygate.migrate has applied to a database against
-- an app's migrations folder (status, read only), and applying the
-- folder's pending migrations ahead of an upgrade (apply: migrate.run, as
-- the app's start would, under the same lock).
--
--   paygate migrate status DB_URL DIR [--json]
--   paygate migrate apply DB_URL DIR [--json] [--dry-run]
--   (also: paygate exec lua/paygate/cli/migrate.lua status DB_URL DIR ...)
local common = require "paygate.cli.common"
local core = require "paygate.core"
local migrate = require "paygate.migrate"
local json = require "paygate.json"

local tostring, type, ipairs = tostring, type, ipairs

local usage = [[
usage: paygate migrate status DB_URL DIR [--json]
       paygate migrate apply DB_URL DIR [--json] [--dry-run]

DIR is the app's migrations folder, the one it gives migrate.run
(DIR/sqlite/NNN_name.sql, DIR/postgres/...); DB_URL its store
(sqlite:PATH, a file that exists, or postgres://...).

status: which of DIR's migrations the database has applied, and which of
its recorded ones have no file. Nothing is written to the database, nor
made in it. One line per version:

  applied    applied, and the file is what was applied
  pending    not applied yet: the app's next start (or apply) applies it
  changed    applied, and the file's SQL has changed since (comments and
             whitespace aside): the database's schema is what it said then
  missing    recorded as applied, and no file has its version (deleted or
             renumbered; or a newer version of the app migrated the
             database, and this one refuses to start on it)
  unchecked  applied by a paygate that kept no checksums (or its checksum
             cleared by hand): the app's next start records the file's

then one summary line.
exit: 0 nothing changed or missing, 1 a migration changed or missing.

apply: applies DIR's pending migrations now, as the app's next start
would (migrate.run: in version order, all in one transaction, under the
lock that serialises the app's workers and instances: a gateway starting
meanwhile waits for it, then finds them applied). Run it with the new
version's folder before restarting or reloading onto that version: a
long migration (an index on a big table) then holds no start, and a
failing one is found while the old version still serves. Prints one line
per migration applied (version, file, seconds), then a summary. Refused,
nothing applied, when a migration is changed or missing (see status: the
folder is not the one that migrated this database).

  --dry-run  list what apply would apply (status's pending ones); write
             nothing
exit: 0 all applied (or nothing pending), 1 a migration failed (named,
with the database's error: the run is one transaction, so none of its
migrations is kept; those applied before it stay applied) or apply was
refused.

  --json   status: one JSON object per version (version, name, file,
           applied_at, state), then the summary (status, and the count of
           each state). apply: one per migration applied (version, name,
           seconds, state "applied"; --dry-run: each pending one, state
           "pending"; refused: each changed or missing one), then the
           summary (status ok or fail, and what happened)

Both: exit 2 for a usage error, or when the folder or the database cannot
be read. No SQL is printed, and DB_URL's password is not.
]]

local SPEC = { ["--json"] = "flag", ["--dry-run"] = "flag" }

-- A URL without its password (postgres://user:secret@host -> user@host).
local redact = require("paygate.redact").url

local STATES = { "applied", "pending", "changed", "missing", "unchecked" }

-- a name or an error read from the database (or a driver) on one line of
-- the table: control bytes shown as escapes, a line break as \n
local function one_line(v)
  return (common.visible(tostring(v)):gsub("\n", ""))
end

local function version_text(v)
  if type(v) == "number" and v == math.floor(v) and math.abs(v) < 2^53 then
    return ("%d"):format(v)
  end
  return one_line(v)
end

local function when(t)
  if t == nil then return "-" end
  -- (a row written by hand may hold anything: only a plausible time is
  -- formatted as one)
  if type(t) == "number" and t >= 0 and t < 253402300800 then
    return os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(t))
  end
  return one_line(t)
end

-- What each state needs of the operator, said once under the table.
local NOTES = {
  pending = "pending: the app applies them at its next start (or paygate"
    .. " migrate apply, now)",
  changed = "changed: put a schema change in a new migration and restore"
    .. " the file; an edit meant to stay: clear its recorded checksum"
    .. " (docs/storage.md, paygate.migrate)",
  missing = "missing: restore the file, or run the app version that"
    .. " has it",
  unchecked = "unchecked: the app records the file's checksum at its"
    .. " next start",
}

local function count_states(list)
  local count = {}
  for _, s in ipairs(STATES) do count[s] = 0 end
  for _, e in ipairs(list) do count[e.state] = count[e.state] + 1 end
  return count
end

local function json_line(t)
  io.stdout:write(json.encode(t), "\n")
  io.stdout:flush()
end

local function header(url, db, dir)
  io.stdout:write(("database %s (%s), migrations %s/%s\n"):format(
    redact(url), db.engine, one_line(dir), db.engine))
end

-- The store (left open) and migrate.status's list for it; a usage error
-- (exit 2) when the folder or the database cannot be read.
local function read_state(url, dir)
  -- (sql.open creates a missing SQLite file: neither command must)
  local db = common.open_existing(url, "DB_URL")
  local ok, list, serr = pcall(migrate.status, db, dir)
  if not ok then
    -- two files with one version: the folder's fault, said as such
    db:close()
    common.usage_error("%s", one_line(tostring(list):gsub("^[^\n]-:%d+: ",
                                                          "")))
  end
  if not list then
    db:close()
    common.input_error("cannot read the migrations of %s in %s: %s",
                       redact(url), dir, one_line(serr))
  end
  return db, list
end

local function status(opts, url, dir)
  local db, list = read_state(url, dir)
  local has = db:has_table("paygate_migrations")
  db:close()
  local count = count_states(list)
  local bad = count.changed + count.missing > 0
  if opts["--json"] then
    for _, e in ipairs(list) do
      json_line({ version = e.version, name = e.name, file = e.file,
                  applied_at = e.applied_at, state = e.state })
    end
    local summary = { status = bad and "fail" or "ok",
                      migrations = #list }
    for _, s in ipairs(STATES) do summary[s] = count[s] end
    json_line(summary)
  else
    header(url, db, dir)
    io.stdout:write("\n")
    local rows = { { "version", "file", "applied at", "state" } }
    for _, e in ipairs(list) do
      rows[#rows + 1] = { version_text(e.version), one_line(e.name),
                          when(e.applied_at), e.state }
    end
    local width = { 0, 0, 0 }
    for _, r in ipairs(rows) do
      for i = 1, 3 do
        if #r[i] > width[i] then width[i] = #r[i] end
      end
    end
    for _, r in ipairs(rows) do
      io.stdout:write(("%" .. width[1] .. "s  %-" .. width[2] .. "s  %-"
        .. width[3] .. "s  %s\n"):format(r[1], r[2], r[3], r[4]))
    end
    local parts = {}
    for _, s in ipairs(STATES) do parts[#parts + 1] = count[s] .. " " .. s end
    io.stdout:write(("\n%d migrations: %s\n"):format(#list,
                    table.concat(parts, ", ")))
    for _, s in ipairs(STATES) do
      if count[s] > 0 and NOTES[s] then
        io.stdout:write(NOTES[s], "\n")
      end
    end
  end
  if has == false then
    -- every file pending: a database the app has not started on yet, or
    -- not the app's database at all (a typo in DB_URL)
    io.stderr:write("paygate migrate: no paygate_migrations table in ",
      redact(url), ": nothing applied there yet (or not the app's",
      " database)\n")
  end
  return bad and 1 or 0
end

-- The run's failures that mean the database could not be used at all
-- (exit 2, as for one that does not open): not a migration's own error
-- (err.migration), nor a refusal.
local UNREACHABLE = { unavailable = true, dns = true, closed = true,
                      config = true, timeout = true }

-- "1 (001_x.sql)" for each entry
local function names(list)
  local t = {}
  for i, e in ipairs(list) do
    t[i] = version_text(e.version) .. " (" .. one_line(e.name) .. ")"
  end
  return table.concat(t, ", ")
end

-- apply: migrate.status for what is there (and a refusal of a changed or
-- missing migration, --dry-run's list), then migrate.run for the rest:
-- its order, checksums, lock and bookkeeping, the app's start's own.
local function apply(opts, url, dir)
  local as_json, dry = opts["--json"], opts["--dry-run"]
  local db, list = read_state(url, dir)
  local count = count_states(list)
  local pending, bad = {}, {}
  for _, e in ipairs(list) do
    if e.state == "pending" then
      pending[#pending + 1] = e
    elseif e.state == "changed" or e.state == "missing" then
      bad[#bad + 1] = e
    end
  end
  if not as_json then header(url, db, dir) end
  if #bad > 0 then
    db:close()
    -- the folder is not the one that migrated this database (an edited
    -- file, an older or another app's folder): applying its pending
    -- migrations on top would be a guess
    local said = {}
    for _, e in ipairs(bad) do
      if as_json then
        json_line({ version = e.version, name = e.name, file = e.file,
                    applied_at = e.applied_at, state = e.state })
      else
        io.stdout:write(("%s  %s  %s\n"):format(version_text(e.version),
                        one_line(e.name), e.state))
      end
      said[e.state] = true
    end
    if as_json then
      json_line({ status = "fail", refused = true, dry_run = dry or false,
                  applied = 0, pending = count.pending,
                  changed = count.changed, missing = count.missing })
    else
      for _, s in ipairs({ "changed", "missing" }) do
        if said[s] then io.stdout:write(NOTES[s], "\n") end
      end
    end
    io.stderr:write(("paygate migrate: refused, nothing applied: %d"
      .. " migration(s) changed or missing, %s: %s does not match what"
      .. " this database applied (paygate migrate status shows each)\n")
      :format(#bad, names(bad), one_line(dir)))
    return 1
  end
  if dry then
    db:close()
    for _, e in ipairs(pending) do
      if as_json then
        json_line({ version = e.version, name = e.name, file = e.file,
                    state = "pending" })
      else
        io.stdout:write(("would apply %s  %s\n"):format(
          version_text(e.version), one_line(e.name)))
      end
    end
    if as_json then
      json_line({ status = "ok", dry_run = true, pending = #pending,
                  migrations = #list })
    elseif #pending == 0 then
      io.stdout:write(("nothing to apply: %d migrations, all applied"
        .. " (dry run)\n"):format(#list))
    else
      io.stdout:write(("%d migration(s) would be applied, in one"
        .. " transaction (dry run: nothing written)\n"):format(#pending))
    end
    return 0
  end
  if #pending > 0 and not as_json then
    -- (a long one, an index on a big table, may take minutes)
    io.stdout:write(("applying %d migration(s) in one transaction: %s\n")
      :format(#pending, names(pending)))
    io.stdout:flush()
  end
  -- migrate.run's warnings (a migration waiting for a lock another
  -- transaction holds, tried again until it gets it) are the operator's
  -- to see meanwhile; its info lines are said here
  local level = core.log_level(2)
  local t0 = core.mono()
  local applied, err = migrate.run(db, dir)
  local took = core.mono() - t0
  core.log_level(level)
  db:close()
  if applied then
    for _, m in ipairs(applied) do
      if as_json then
        json_line({ version = m.version, name = m.name,
                    seconds = m.seconds, state = "applied" })
      else
        io.stdout:write(("applied %d  %s  %.3f s\n"):format(m.version,
                        one_line(m.name), m.seconds))
      end
    end
    -- fewer than were pending: another process (a gateway starting)
    -- applied the rest meanwhile
    local others = #pending - #applied
    if as_json then
      json_line({ status = "ok", applied = #applied, seconds = took,
                  by_others = others > 0 and others or 0,
                  migrations = #list })
    elseif #applied > 0 then
      io.stdout:write(("applied %d migration(s) in %.3f s; %d migrations,"
        .. " all applied\n"):format(#applied, took, #list))
    else
      io.stdout:write(("nothing to apply: %d migrations, all applied%s\n")
        :format(#list, others > 0 and (" (%d applied meanwhile by another"
        .. " process)"):format(others) or ""))
    end
    return 0
  end
  local kind = type(err) == "table" and err.kind or "error"
  local message = type(err) == "table" and err.message or tostring(err)
  if type(err) == "table" and err.migration then
    local failed = { version = "?", name = err.migration }
    local before = {}
    for _, e in ipairs(pending) do
      if e.name == err.migration then
        failed = e
        break
      end
      before[#before + 1] = e
    end
    -- (the message names the file: said once)
    message = message:gsub("^migration [^:]*: ", "", 1)
    local kept = count.applied + count.unchecked
    if as_json then
      json_line({ status = "fail", version = failed.version,
                  name = failed.name, kind = kind,
                  error = one_line(message), applied = 0,
                  rolled_back = #before, applied_before = kept })
    end
    io.stderr:write(("paygate migrate: migration %s (%s) failed: %s: %s;"
      .. " nothing of this run was kept (one transaction%s); the %d"
      .. " migration(s) applied before this run stay applied\n"):format(
      version_text(failed.version), one_line(failed.name), kind,
      one_line(message), #before > 0 and ": " .. names(before)
      .. " rolled back with it" or "", kept))
    return 1
  end
  if kind == "unknown_outcome" then
    if as_json then
      json_line({ status = "fail", kind = kind, error = one_line(message) })
    end
    io.stderr:write("paygate migrate: the answer to the run's commit was"
      .. " lost: its migrations may or may not be applied (paygate migrate"
      .. " status tells): ", one_line(message), "\n")
    return 1
  end
  if UNREACHABLE[kind] and not err.database_newest then
    common.input_error("cannot apply the migrations of %s in %s: %s",
                       redact(url), dir, one_line(err))
  end
  -- a refusal (a database newer than the folder: config), a busy lock
  if as_json then
    json_line({ status = "fail", kind = kind, error = one_line(message) })
  end
  io.stderr:write("paygate migrate: nothing applied: ", one_line(err), "\n")
  return 1
end

local function main(args)
  local opts, pos = common.parse(args, SPEC)
  local cmd = pos[1]
  if cmd ~= "status" and cmd ~= "apply" then
    common.usage_error("expected the command status or apply")
  end
  local url, dir = pos[2], pos[3]
  if not dir or pos[4] then
    common.usage_error("%s takes DB_URL and DIR", cmd)
  end
  if cmd == "status" then
    common.only(opts, cmd, { ["--json"] = true })
    return status(opts, url, dir)
  end
  return apply(opts, url, dir)
end

return common.run("migrate", usage, main, { ... })
