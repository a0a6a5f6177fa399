-- paygate backup: a consistent copy of a SQLite store, taken while the
-- gateway (or any app) goes on writing to it.
--
--   paygate backup SQLITE_URL DEST [--force] [--json]
--   (also: paygate exec lua/paygate/cli/backup.lua SQLITE_URL DEST ...)
local common = require "paygate.cli.common"
local core = require "paygate.core"
local json = require "paygate.json"

local tostring = tostring

local usage = [[
usage: paygate backup SQLITE_URL DEST [--force] [--json]

Copies the SQLite store at SQLITE_URL (sqlite:PATH, as the gateway's
config names it) to the file DEST while the gateway runs: one consistent
snapshot of what was committed when the copy began, the committed data
still in PATH-wal included, with SQLite's online backup. Writers go on
meanwhile (the copy holds a read snapshot, not a lock).

DEST is one file (journal mode DELETE, no -wal beside it; mode 0600),
written as DEST.tmp, checked (opened read-only, PRAGMA quick_check),
flushed to the disk and only then renamed to DEST: DEST is never a
partial copy. To restore: stop the gateway, then paygate restore DEST
SQLITE_URL --force (docs/gateway.md, Backups and recovery).

  --force   replace an existing DEST (and a DEST.tmp left by an
            interrupted backup)
  --json    one JSON object: status, source, dest, pages, page_size,
            bytes, check, seconds

A PostgreSQL store is refused: back it up with pg_dump, under umask 077
(the dump holds the API keys' signing keys): (umask 077; pg_dump -Fc -f
'DEST' 'URL'), the URL without paygate's own options (pool, ...) and its
password (pg_dump reads it from PGPASSFILE); the refusal prints it so,
ready to run.

exit: 0 the copy is at DEST and passed its check, 1 the copy failed (a
full disk, the check failed: DEST was left as it was), 2 usage error,
the store cannot be opened, or DEST exists.
]]

local SPEC = { ["--force"] = "flag", ["--json"] = "flag" }

-- A URL without its password (postgres://user:secret@host -> user@host).
local redact_mod = require "paygate.redact"
local redact = redact_mod.url

local one_line = common.one_line

-- url as pg_dump takes it, quoted for a shell: without paygate's own
-- options (pg_dump refuses a parameter libpq does not know) and without
-- its password (user info or a *password parameter: pg_dump reads it from
-- PGPASSFILE, and a masked *** would be sent as the password)
local function pg_dump_url(url)
  local main, query = redact_mod.split_query(redact(url))
  local ours, kept = require("paygate.sql").PG_URL_OPTS, {}
  for pair in query:sub(2):gmatch("[^&]+") do
    local name = pair:match("^([^=]*)")
    if not ours[name] and not name:lower():match("password$") then
      kept[#kept + 1] = pair
    end
  end
  local u = main .. (#kept > 0 and "?" .. table.concat(kept, "&") or "")
  return "'" .. u:gsub("'", "'\\''") .. "'"
end

-- DEST as the pg_dump command takes it: quoted for a shell, or the word
-- DEST when it holds a control character (the refusal is one line)
local function pg_dump_dest(dest)
  if dest:find("%c") then return "DEST" end
  return "'" .. dest:gsub("'", "'\\''") .. "'"
end

local function main(args)
  local opts, pos = common.parse(args, SPEC)
  local url, dest = pos[1], pos[2]
  if not dest or pos[3] then
    common.usage_error("backup takes SQLITE_URL and DEST")
  end
  if url:match("^postgres") then
    -- the command to run instead, under umask 077 (in a subshell: the
    -- operator's shell keeps its own): pg_dump writes with the shell's
    -- umask (022: every local user reads the dump), and the dump holds
    -- paygate_api_keys' verifiers, which sign merchant-API requests; the
    -- copy this command makes is 0600 for the same reason
    common.usage_error("%s is a PostgreSQL store: paygate backup copies "
      .. "a SQLite one; back PostgreSQL up with pg_dump, the dump readable "
      .. "by its owner only (it holds the API keys' signing keys): (umask "
      .. "077; pg_dump -Fc -f %s %s) (docs/gateway.md, Backups and recovery)",
      redact(url), pg_dump_dest(dest), pg_dump_url(url))
  end
  if not url:match("^sqlite3?:") then
    common.usage_error("SQLITE_URL must be sqlite:PATH, not %s",
                       common.shown(redact(url)))
  end
  -- sql.open creates a missing SQLite file: a backup of nothing must
  -- not make one
  common.sqlite_must_exist(url)
  local kind = core.file_type(dest)
  if kind == "directory" then
    common.input_error("DEST %s is a folder: give the backup file's name",
                       common.shown(dest))
  elseif kind and not opts["--force"] then
    common.input_error("DEST %s exists: give another name, or --force to "
                       .. "replace it", common.shown(dest))
  end
  local t0 = core.mono()
  local db = common.open_existing(url, "SQLITE_URL")
  local info, berr = db:backup(dest, { replace = opts["--force"] })
  db:close()
  if not info then
    io.stderr:write("paygate backup: ", redact(url), " not copied (",
      common.shown(dest), " left as it was): ",
      one_line(tostring(berr.message or berr):gsub("^sqlite: ", "")),
      "\n")
    return 1
  end
  local seconds = core.mono() - t0
  if opts["--json"] then
    io.stdout:write(json.encode({ status = "ok", source = redact(url),
      dest = dest, pages = info.pages, page_size = info.page_size,
      bytes = info.bytes, check = "ok",
      seconds = math.floor(seconds * 1000 + 0.5) / 1000 }), "\n")
  else
    io.stdout:write(("%s copied to %s: %d pages of %d bytes (%d bytes),"
      .. " quick_check ok, in %.1f s\n"):format(redact(url),
      common.shown(dest), info.pages, info.page_size, info.bytes, seconds))
  end
  return 0
end

return common.run("backup", usage, main, { ... })
