-- paygate migrate status: what paygate.migrate has applied to a database
-- against an app's migrations folder, one line per version, read only.
--
--   paygate migrate status DB_URL DIR [--json]
--   (also: paygate exec lua/paygate/cli/migrate.lua status DB_URL DIR ...)
local common = require "paygate.cli.common"
local migrate = require "paygate.migrate"
local json = require "paygate.json"

local tostring, type, ipairs = tostring, type, ipairs

local usage = [[
usage: paygate migrate status DB_URL DIR [--json]

Shows which of the migrations in DIR (the app's migrations folder, the
one it gives migrate.run: DIR/sqlite/NNN_name.sql, DIR/postgres/...) the
database at DB_URL (sqlite:PATH or postgres://...) has applied, and
which of its recorded ones have no file. Nothing is written to the
database, nor made in it. One line per version:

  applied    applied, and the file is what was applied
  pending    not applied yet: the app's next start applies it
  changed    applied, and the file's SQL has changed since (comments and
             whitespace aside): the database's schema is what it said then
  missing    recorded as applied, and no file has its version (deleted or
             renumbered; or a newer version of the app migrated the
             database, and this one refuses to start on it)
  unchecked  applied by a paygate that kept no checksums (or its checksum
             cleared by hand): the app's next start records the file's

then one summary line. No SQL is printed, and DB_URL's password is not.

  --json   one JSON object per version (version, name, file, applied_at,
           state), then the summary (status, and the count of each state)

exit: 0 nothing changed or missing, 1 a migration changed or missing, 2
usage error, or the folder or the database cannot be read.
]]

local SPEC = { ["--json"] = "flag" }

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
  pending = "pending: the app applies them at its next start",
  changed = "changed: put a schema change in a new migration and restore"
    .. " the file; an edit meant to stay: clear its recorded checksum"
    .. " (docs/storage.md, paygate.migrate)",
  missing = "missing: restore the file, or run the app version that"
    .. " has it",
  unchecked = "unchecked: the app records the file's checksum at its"
    .. " next start",
}

local function main(args)
  local opts, pos = common.parse(args, SPEC)
  if pos[1] ~= "status" then
    common.usage_error("expected the command status (see --help)")
  end
  local url, dir = pos[2], pos[3]
  if not dir or pos[4] then
    common.usage_error("status takes DB_URL and DIR (see --help)")
  end
  -- (sql.open creates a missing SQLite file: a status must not)
  local db = common.open_existing(url, "DB_URL")
  local ok, list, serr = pcall(migrate.status, db, dir)
  if not ok then
    -- two files with one version: the folder's fault, said as such
    db:close()
    common.usage_error("%s", one_line(tostring(list):gsub("^[^\n]-:%d+: ",
                                                          "")))
  end
  local has = list and db:has_table("paygate_migrations")
  db:close()
  if not list then
    common.usage_error("cannot read the migrations of %s in %s: %s",
                       redact(url), dir, one_line(serr))
  end
  local count = {}
  for _, s in ipairs(STATES) do count[s] = 0 end
  for _, e in ipairs(list) do count[e.state] = count[e.state] + 1 end
  local bad = count.changed + count.missing > 0
  if opts["--json"] then
    for _, e in ipairs(list) do
      io.stdout:write(json.encode({ version = e.version, name = e.name,
        file = e.file, applied_at = e.applied_at, state = e.state }), "\n")
    end
    local summary = { status = bad and "fail" or "ok",
                      migrations = #list }
    for _, s in ipairs(STATES) do summary[s] = count[s] end
    io.stdout:write(json.encode(summary), "\n")
  else
    io.stdout:write(("database %s (%s), migrations %s/%s\n\n"):format(
      redact(url), db.engine, one_line(dir), db.engine))
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

return common.run("migrate", usage, main, { ... })
