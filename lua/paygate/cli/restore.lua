-- paygate restore: put a copy `paygate backup` made back in place of a
-- SQLite store, and make the restored store safe to start on.
--
--   paygate restore BACKUP SQLITE_URL [--last-event-id N] [--force] [--json]
--   (also: paygate exec lua/paygate/cli/restore.lua BACKUP SQLITE_URL ...)
local common = require "paygate.cli.common"
local core = require "paygate.core"
local json = require "paygate.json"
local sql = require "paygate.sql"

local tostring, floor = tostring, math.floor

local usage = [[
usage: paygate restore BACKUP SQLITE_URL [--last-event-id N] [--force] [--json]

Puts BACKUP (a copy `paygate backup` made) in place of the SQLite store
at SQLITE_URL (sqlite:PATH, as the gateway's config names it), with the
gateway stopped. BACKUP itself is only read. Each step is printed:

  1. BACKUP is copied beside PATH and read: the newest audit entry in it
     (what it knows up to) and its last event id;
  2. event ids are moved on, so that no event made after the copy has
     its id reused (a receiver that saw it would drop the new one as a
     repeat): past N with --last-event-id N (the highest Paygate-Event-Id
     your receivers have seen), else past the copy's last by 1000000000
     (a gap is harmless; a reused id is not);
  3. the restore is recorded in the store's audit trail (chain "store",
     what store.restored): the gateway then says at every start that it
     runs on a restored store, and since when it knows nothing;
  4. the result is checked (PRAGMA quick_check) and renamed to PATH; a
     PATH-wal and PATH-shm left beside PATH are removed first (an old log
     beside a restored file would be read into it).

An existing PATH is refused without --force, and refused even with it
while a process has the store open (the gateway still running).

Payments and refunds made after the copy are not in it: see
docs/gateway.md, Backups and recovery, for what to do next.

  --last-event-id N  the highest event id a receiver has seen
  --force            replace an existing store at PATH
  --json             one JSON object: status, store, backup, copy_newest,
                     copy_last_event_id, next_event_id, seconds

exit: 0 restored, 1 the restore failed (PATH left as it was), 2 usage
error, BACKUP unreadable or not a store, PATH exists (without --force)
or is in use.
]]

local SPEC = { ["--force"] = "flag", ["--json"] = "flag",
               ["--last-event-id"] = "value" }

-- the jump past the copy's last event id when the receivers' highest is
-- not given: more events than a gateway makes in months
local JUMP = 1000000000
local MAX_ID = 2 ^ 53 - 1

local shown, one_line = common.shown, common.one_line

-- Whether a process has the SQLite store at path open: every connection
-- in WAL mode holds a read lock on the -shm file's DMS byte (offset 128)
-- while it is open, so a write lock there conflicts with it.
local function in_use(path)
  if core.file_type(path .. "-shm") ~= "file" then return nil end
  local ffi = require "ffi"
  pcall(ffi.cdef, [[
    struct pg_flock { short l_type; short l_whence; int64_t l_start;
                      int64_t l_len; int l_pid; };
    int open(const char *path, int flags, ...);
    int close(int fd);
    int fcntl(int fd, int cmd, ...);
  ]])
  local fd = ffi.C.open(path .. "-shm", 0)           -- O_RDONLY
  if fd < 0 then return nil end
  local lk = ffi.new("struct pg_flock")
  lk.l_type, lk.l_whence, lk.l_start, lk.l_len = 1, 0, 128, 1  -- F_WRLCK
  local rc = ffi.C.fcntl(fd, 5, lk)                  -- F_GETLK
  ffi.C.close(fd)
  if rc == 0 and lk.l_type ~= 2 then                 -- not F_UNLCK
    return tonumber(lk.l_pid)
  end
  return nil
end

-- copies the file src to dst (made 0600), in pieces
local function copy_file(src, dst)
  local i, ierr = io.open(src, "rb")
  if not i then return nil, ierr end
  local o, oerr = io.open(dst, "wb")
  if not o then i:close() return nil, oerr end
  -- (the store's own mode, before a byte of it is written: it holds the
  -- API keys' signing keys)
  local cok, cerr = core.chmod(dst, 384)                 -- 0600
  if not cok then i:close() o:close() return nil, cerr.message or cerr end
  while true do
    local chunk = i:read(1048576)
    if not chunk then break end
    local ok, werr = o:write(chunk)
    if not ok then i:close() o:close() return nil, werr end
  end
  i:close()
  local ok, clerr = o:close()
  if not ok then return nil, clerr end
  return true
end

local function remove_work(work)
  for _, s in ipairs({ "", "-wal", "-shm", "-journal", "-turn" }) do
    os.remove(work .. s)
  end
end

local function iso(t)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", floor(t))
end

local function main(args)
  local opts, pos = common.parse(args, SPEC)
  local backup, url = pos[1], pos[2]
  if not url or pos[3] then
    common.usage_error("restore takes BACKUP and SQLITE_URL")
  end
  if not url:match("^sqlite3?:") then
    common.usage_error("SQLITE_URL must be sqlite:PATH, not %s (a "
      .. "PostgreSQL store is restored with pg_restore: docs/gateway.md,"
      .. " Backups and recovery)", shown(require("paygate.redact").url(url)))
  end
  local path = sql.sqlite_path(url)
  if not path then
    common.usage_error("the sqlite: URL names no file (sqlite:PATH)")
  end
  local seen
  if opts["--last-event-id"] then
    seen = tonumber(opts["--last-event-id"])
    if not (opts["--last-event-id"]:match("^%d+$") and seen
            and seen <= MAX_ID) then
      common.usage_error("--last-event-id must be a whole number from 0 to"
        .. " 2^53-1 (the highest Paygate-Event-Id a receiver has seen), not"
        .. " %s", shown(opts["--last-event-id"]))
    end
  end
  if core.file_type(backup) ~= "file" then
    common.input_error("BACKUP %s is not a file", shown(backup))
  end
  local exists = core.file_type(path)
  if exists and exists ~= "file" then
    common.input_error("%s is a %s, not a store", shown(path), exists)
  elseif exists and not opts["--force"] then
    common.input_error("%s exists: restoring replaces it; give --force to"
      .. " do so (with the gateway stopped)", shown(path))
  end
  local holder = exists and in_use(path)
  if holder then
    common.input_error("%s is in use (process %d has it open): stop the"
      .. " gateway first", shown(path), holder)
  end
  local t0 = core.mono()
  local say = opts["--json"] and function() end or function(fmt, ...)
    io.stdout:write("paygate restore: ", fmt:format(...), "\n")
  end

  -- 1. a working copy beside PATH (BACKUP is only read)
  local work = path .. ".restore"
  remove_work(work)
  local ok, cerr = copy_file(backup, work)
  if not ok then
    remove_work(work)
    io.stderr:write("paygate restore: cannot copy ", shown(backup), " to ",
      shown(work), ": ", one_line(cerr), " (", shown(path),
      " left as it was)\n")
    return 1
  end
  local okopen, db, oerr = common.open_store("sqlite:" .. work)
  local function fail(status, fmt, ...)
    if okopen and db then db:close() end
    remove_work(work)
    io.stderr:write("paygate restore: ", fmt:format(...), " (",
      shown(path), " left as it was)\n")
    return status
  end
  if not okopen or not db then
    return fail(2, "%s does not open as a SQLite store: %s", shown(backup),
                one_line(okopen and oerr or db))
  end
  local rows, qerr = db:query("SELECT name FROM sqlite_master WHERE type ="
    .. " 'table' AND name IN ('paygate_audit', 'paygate_outbox')")
  if not rows then
    return fail(2, "%s is not a store: %s", shown(backup),
                one_line(qerr.message or qerr))
  end
  local has = {}
  for _, r in ipairs(rows) do has[r.name] = true end
  local newest
  if has.paygate_audit then
    local r = assert(db:query("SELECT max(at) AS at FROM paygate_audit"))
    newest = r[1].at and r[1].at / 1000
  end
  local last = 0
  if has.paygate_outbox then
    local r = assert(db:query("SELECT max(seq) AS seq FROM sqlite_sequence"
      .. " WHERE name = 'paygate_outbox'"))
    last = r[1].seq or 0
    local m = assert(db:query("SELECT max(id) AS id FROM paygate_outbox"))
    if (m[1].id or 0) > last then last = m[1].id end
  end
  say("%s read: its newest audit entry is of %s; its last event id %d",
      shown(backup), newest and iso(newest) or "(none)", last)

  -- 2. event ids moved on
  local next_id = (seen and math.max(last, seen) or last + JUMP) + 1
  -- 3. the restore recorded
  local now = core.time()
  local audit = require "paygate.audit"
  local res, werr = db:transaction(function(tx)
    if has.paygate_outbox then
      -- the table's AUTOINCREMENT counter, whether it has a row yet or not
      -- (sqlite_sequence has no key to upsert on)
      local _, e = tx:exec("DELETE FROM sqlite_sequence WHERE name ="
        .. " 'paygate_outbox'")
      if e then return nil, e end
      _, e = tx:exec("INSERT INTO sqlite_sequence (name, seq) VALUES"
        .. " ('paygate_outbox', $1)", { next_id - 1 })
      if e then return nil, e end
    end
    local _, e = audit.append(tx, "store", {
      what = "store.restored", actor = "paygate restore",
      cause = "restored from a backup", at = floor(now * 1000),
      evidence = { backup = backup, copy_newest = newest,
                   copy_last_event_id = last, next_event_id = next_id,
                   restored_at = now } })
    if e then return nil, e end
    return true
  end)
  if not res then
    return fail(1, "cannot write to the copy: %s",
                one_line(werr.message or werr))
  end
  if has.paygate_outbox then
    say("event ids go on from %d (%s)", next_id, seen
      and ("past the highest a receiver has seen, " .. seen)
      or ("the copy's last, " .. last .. ", plus " .. JUMP
          .. ": ids given out after the copy are not reused"))
  end
  say("recorded in the audit trail (chain store, store.restored)")

  -- 4. checked, and renamed to PATH (the old log beside it removed)
  holder = core.file_type(path) and in_use(path)
  if holder then
    return fail(2, "%s is in use (process %d has it open): stop the gateway"
                .. " first", shown(path), holder)
  end
  local removed = {}
  for _, s in ipairs({ "-wal", "-shm", "-journal" }) do
    if core.file_type(path .. s) then
      local rok, rerr = os.remove(path .. s)
      if not rok then
        return fail(1, "cannot remove %s: %s", shown(path .. s),
                    one_line(rerr))
      end
      removed[#removed + 1] = path .. s
    end
  end
  if #removed > 0 then
    say("removed %s", table.concat(removed, ", "))
  end
  local info, berr = db:backup(path, { replace = true })
  if not info then
    return fail(1, "the restored copy was not put in place: %s",
      one_line(tostring(berr.message or berr):gsub("^sqlite: ", "")))
  end
  db:close()
  okopen = false
  remove_work(work)
  local seconds = core.mono() - t0
  if opts["--json"] then
    io.stdout:write(json.encode({ status = "ok", store = path,
      backup = backup, copy_newest = newest or json.null,
      copy_last_event_id = last, next_event_id = next_id,
      seconds = floor(seconds * 1000 + 0.5) / 1000 }), "\n")
    return 0
  end
  say("%s restored (%d pages, quick_check ok) in %.1f s", shown(path),
      info.pages, seconds)
  say("next: start the gateway; payments and refunds made after %s are not"
    .. " in the store: run the bill reconciliation of each day since then"
    .. " (docs/gateway.md, Backups and recovery)",
    newest and iso(newest) or "the copy")
  return 0
end

return common.run("restore", usage, main, { ... })
