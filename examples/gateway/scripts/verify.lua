-- paygate exec examples/gateway/scripts/verify.lua DB_URL
--
-- The gateway's audit check. `paygate audit verify` proves each chain is
-- intact, but a chain deleted whole (entries and head), or cut short with
-- its head rewritten to the new last entry, is an intact chain (or none).
-- This also holds every gw_payments and gw_refunds row against its chain:
-- paygate.fsm writes one entry per transition (the first on create) and
-- raises the row's version by one with each, so the row's version is the
-- number of its transition entries, and its state is the last one's `to`.
-- Entries that change no state (payment.alarm, ...) are not counted: such
-- entries cut from a chain's end, with its head moved back, stay unseen.
-- Reported (one line each, on stdout):
--   broken SUBJECT seq N REASON: ...   a chain that does not verify
--   missing SUBJECT: ...               a row whose chain is gone
--   short SUBJECT: ...                 fewer transition entries than the
--                                      row's version (a tail deleted)
--   long SUBJECT: ...                  more than its version
--   state SUBJECT: ...                 the last transition's `to` is not
--                                      the row's state
--   orphan SUBJECT: ...                a chain whose row is gone
-- A renamed chain is one "broken SUBJECT ... renamed" line; neither of
-- its names is held against a row.
-- Exit: 0 nothing found, 1 a finding, 2 usage or the store failed.
local audit = require "paygate.audit"
local fsm = require "paygate.fsm"

local args = { ... }
local PAGE = 500

-- The `what` of each entry paygate.fsm writes for a machine: "<name>.created"
-- and "<name>.<event>" per declared event. The gateway's other entries on
-- the same chains (payment.attempt, payment.alarm, ...) change no state.
local function fsm_whats(def)
  local list, seen = { "'" .. def.name .. ".created'" }, {}
  for _, t in ipairs(def.transitions) do
    if not seen[t.event] then
      seen[t.event] = true
      list[#list + 1] = "'" .. def.name .. "." .. t.event .. "'"
    end
  end
  return table.concat(list, ", ")
end

local KINDS = {
  { table = "gw_payments", prefix = "payment:", def = fsm.payment },
  { table = "gw_refunds", prefix = "refund:", def = fsm.refund },
}

local findings = 0
local function report(kind, subject, msg)
  findings = findings + 1
  io.stdout:write(kind, " ", subject, ": ", msg, "\n")
end

-- the two names of each renamed chain (audit.verify_all reports it once,
-- under its own name): the rows are not held against either, or one
-- rename would show again as a short chain or an orphan head
local renamed = {}

local function check_rows(db, k)
  local whats = fsm_whats(k.def)
  local subj = "('" .. k.prefix .. "' || p.id)"
  local q = "SELECT p.id, p.state, p.version,"
    .. " (SELECT count(*) FROM paygate_audit a WHERE a.subject = " .. subj
    .. " AND a.what IN (" .. whats .. ")) AS n,"
    .. " (SELECT a.to_state FROM paygate_audit a WHERE a.subject = " .. subj
    .. " AND a.what IN (" .. whats .. ") ORDER BY a.seq DESC LIMIT 1)"
    .. " AS last_to,"
    .. " (SELECT h.seq FROM paygate_audit_heads h WHERE h.subject = " .. subj
    .. ") AS head"
    .. " FROM " .. k.table .. " p WHERE p.id > $1 ORDER BY p.id LIMIT " .. PAGE
  local after, rows_seen = "", 0
  while true do
    local rows, err = db:query(q, { after })
    if not rows then return nil, err end
    for _, r in ipairs(rows) do
      local subject = k.prefix .. r.id
      local n = tonumber(r.n) or 0
      local version = tonumber(r.version)
      if renamed[subject] then                  -- reported as broken
      elseif n == 0 and r.head == nil then
        report("missing", subject, "no audit chain for a " .. k.table
               .. " row at version " .. tostring(r.version)
               .. " (deleted)")
      elseif n < version then
        report("short", subject, n .. " transition entries for version "
               .. version .. " (entries deleted)")
      elseif n > version then
        report("long", subject, n .. " transition entries for version "
               .. version .. " (the row's version was set back)")
      elseif r.last_to ~= r.state then
        report("state", subject, "the last transition is to "
               .. tostring(r.last_to) .. ", the row is "
               .. tostring(r.state))
      end
    end
    rows_seen = rows_seen + #rows
    if #rows < PAGE then break end
    after = rows[#rows].id
  end
  return rows_seen
end

local function check_orphans(db, k)
  local len = #k.prefix
  local q = "SELECT h.subject FROM paygate_audit_heads h WHERE h.subject > $1"
    .. " AND h.subject LIKE '" .. k.prefix .. "%' AND NOT EXISTS (SELECT 1"
    .. " FROM " .. k.table .. " p WHERE p.id = substr(h.subject, "
    .. (len + 1) .. ")) ORDER BY h.subject LIMIT " .. PAGE
  local after = ""
  while true do
    local rows, err = db:query(q, { after })
    if not rows then return nil, err end
    for _, r in ipairs(rows) do
      if not renamed[r.subject] then
        report("orphan", r.subject, "a chain whose " .. k.table
               .. " row is gone (deleted)")
      end
    end
    if #rows < PAGE then return true end
    after = rows[#rows].subject
  end
end

local function main()
  local url = args[1]
  if url == nil or url:sub(1, 1) == "-" or args[2] ~= nil then
    local help = url == "-h" or url == "--help"
    local out = help and io.stdout or io.stderr
    out:write("usage: paygate exec examples/gateway/scripts/verify.lua"
              .. " DB_URL\n")
    if help then
      out:write([[
The gateway's audit check: every audit chain verifies, and every payment
and refund row agrees with its chain (its version is the number of its
transitions, its state the last one's). One line per finding (broken,
missing, short, long, state, orphan). DB_URL: the gateway's store
(sqlite:var/gateway.db, postgres://...).
Exit: 0 nothing found, 1 a finding, 2 usage or the store failed.
]])
      return 0
    end
    return 2
  end
  -- (a URL of no known scheme raises: a usage error all the same)
  -- (quietly: the PostgreSQL pool's own "pool down" line would stand
  -- beside this one-line reason)
  local db, why, bad_url = require("paygate.cli.common").open_for_script(url)
  if not db then
    -- (a URL sql.open refuses is a usage error, exit 2)
    io.stderr:write("verify: ", bad_url and "bad store URL: " or
                    "cannot open the store: ", why, "\n")
    return bad_url and 2 or 2
  end
  local ok, summary = audit.verify_all(db, { on_broken = function(b)
    if b.reason == "renamed" then
      renamed[b.subject], renamed[b.renamed] = true, true
    end
    report("broken", b.subject, "seq " .. tostring(b.seq) .. " "
           .. tostring(b.reason) .. ": " .. tostring(b.message))
  end })
  if ok == nil then
    io.stderr:write("verify: ", tostring(summary), "\n")
    return 2
  end
  local counted = {}
  for _, k in ipairs(KINDS) do
    local n, cerr = check_rows(db, k)
    if not n then
      io.stderr:write("verify: ", tostring(cerr), "\n")
      return 2
    end
    counted[#counted + 1] = n .. " " .. k.table:gsub("^gw_", "")
    local done, oerr = check_orphans(db, k)
    if not done then
      io.stderr:write("verify: ", tostring(oerr), "\n")
      return 2
    end
  end
  io.stdout:write(summary.subjects, " chains, ", summary.entries,
                  " entries, ", table.concat(counted, ", "), ", ", findings,
                  " findings\n")
  return findings == 0 and 0 or 1
end

return main()
