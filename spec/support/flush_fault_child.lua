-- Child process for pg_flush_fault_spec, run with spec/support's
-- pq_flush_fault.so preloaded:
--   paygate exec spec/support/flush_fault_child.lua URL TRIGGER
-- On a pool of one connection (query_timeout 5 s), a write, a read, and a
-- read after a statement the server refused are sent with TRIGGER created
-- first, so that the flush at the end of their send fails (libpq closed
-- the socket). Prints for each
-- "<what> <kind or ok> <seconds> <message>", then whether the pool
-- serves again ("after ok").
local core = require "paygate.core"
local sql = require "paygate.sql"

local url, trigger = arg[1], arg[2]
io.stdout:setvbuf("no")
local db = assert(sql.open(url .. "?query_timeout=5", { pool = 1 }))
assert(db:exec_script("DROP TABLE IF EXISTS flush_fault;"
                      .. " CREATE TABLE flush_fault (v text)"))

local function faulted(what, fn)
  local f = assert(io.open(trigger, "w"))
  f:close()
  local t0 = core.mono()
  local res, err = fn()
  local el = core.mono() - t0
  -- the shim removes it as it arms
  local fired = not require("paygate.testing.proc").exists(trigger)
  io.stdout:write(("%s %s %.3f %s %s\n"):format(what,
    res and "ok" or err.kind, el, fired and "fired" or "not-fired",
    res and "" or tostring(err.message):gsub("\n", " ")))
  os.remove(trigger)
end

faulted("write", function()
  return db:exec("INSERT INTO flush_fault VALUES ($1)", { "x" })
end)
faulted("read", function()
  return db:query("SELECT 1 AS one")
end)
-- whether the pool serves again (it reconnects), within 10 s
local function serves()
  local deadline, ok = core.mono() + 10, nil
  repeat
    ok = db:query("SELECT 1 AS one")
    if not ok then core.sleep(0.05) end
  until ok or core.mono() > deadline
  return ok ~= nil
end

-- a statement the server refused, then a lost connection: the reason
-- told is the connection's, not the earlier error (libpq may keep that
-- text, and a server's DETAIL can quote values)
assert(serves(), "the pool does not serve again")
assert(not db:query("SELECT 1 / (0 * length($1)) AS bad", { "s3cret" }))
faulted("after_error", function()
  return db:query("SELECT 1 AS one")
end)
io.stdout:write("after ", serves() and "ok" or "failed", "\n")
db:close()
