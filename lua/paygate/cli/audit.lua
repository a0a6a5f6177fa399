-- paygate audit verify: checks every hash chain of paygate.audit in a
-- database (or one subject's) and prints one line per broken chain.
--
--   paygate audit verify DB_URL [--subject S] [--json]
--   (also: paygate exec lua/paygate/cli/audit.lua verify DB_URL ...)
local common = require "paygate.cli.common"
local audit = require "paygate.audit"
local json = require "paygate.json"

local tostring = tostring

local usage = [[
usage: paygate audit verify DB_URL [--subject S] [--json]

Verifies the audit trail that paygate.audit keeps in the database at
DB_URL (sqlite:PATH or postgres://...): every subject's chain of entries
(one chain per payment) is read in seq order, each entry's hash is
computed again over its fields and the previous entry's hash, and the
last one is compared with the chain's head row. An edited, inserted,
deleted or renumbered row breaks its chain from that seq on. Not seen:
a chain's last entries deleted with its head moved back to the new last
entry, a chain deleted whole with its head, a chain rewritten with every
later hash and its head recomputed (no key is involved): compare the
heads with a copy kept elsewhere to catch those.

Prints one line per broken chain:
  broken SUBJECT seq N REASON: what was found
then one summary line: CHAINS chains, ENTRIES entries, BROKEN broken.

  --subject S   verify that subject's chain only
  --json        one JSON object per broken chain, then the summary

exit: 0 every chain verified, 1 a chain is broken (or --subject names no
chain), 2 usage error, the database cannot be read, or it holds no audit
trail.
]]

local SPEC = { ["--subject"] = "value", ["--json"] = "flag" }

-- A URL without its password (postgres://user:secret@host -> user@host).
local redact = require("paygate.redact").url

local one_line = common.one_line

local function main(args)
  local opts, pos = common.parse(args, SPEC)
  if pos[1] ~= "verify" then
    common.usage_error("expected the command verify")
  end
  local url = pos[2]
  if not url or pos[3] then
    common.usage_error("verify takes one DB_URL")
  end
  -- (sql.open creates a missing SQLite file: a verifier must not)
  local db = common.open_existing(url, "DB_URL")
  local line = function(b)
    if opts["--json"] then
      io.stdout:write(json.encode({ status = "broken", subject = b.subject,
        seq = b.seq, reason = b.reason, message = b.message,
        renamed = b.renamed }), "\n")
    else
      io.stdout:write(("broken %s seq %s %s: %s\n"):format(b.subject,
        tostring(b.seq), b.reason, b.message))
    end
    io.stdout:flush()
  end
  local good, summary
  if opts["--subject"] then
    local report
    good, report = audit.verify(db, opts["--subject"])
    if good ~= nil then
      -- a store with no audit trail is said to be one, as without
      -- --subject (was: "0 chains", exit 0, for the wrong database)
      summary = { subjects = report.entries > 0 and 1 or 0,
                  entries = report.entries, broken = {},
                  tables = report.tables ~= false }
      if not good then
        summary.broken[1] = report
        line(report)
      end
    else
      err = report
    end
  else
    good, summary = audit.verify_all(db, { on_broken = line })
    if good == nil then
      err = summary
    end
  end
  db:close()
  if good == nil then
    common.input_error("cannot read the audit trail: %s", one_line(err))
  end
  if summary.tables == false then
    common.usage_error("no audit trail in %s (no paygate_audit table)",
                       redact(url))
  end
  if opts["--json"] then
    io.stdout:write(json.encode({ status = good and "ok" or "broken",
      chains = summary.subjects, entries = summary.entries,
      broken = #summary.broken }), "\n")
  else
    io.stdout:write(("%d chains, %d entries, %d broken\n"):format(
      summary.subjects, summary.entries, #summary.broken))
  end
  if good and opts["--subject"] and summary.entries == 0 then
    -- (a typo in the subject verified "0 chains", exit 0)
    io.stderr:write("paygate audit: no chain for subject ",
                    one_line(opts["--subject"]), " in ", redact(url), "\n")
    return 1
  end
  return good and 0 or 1
end

return common.run("audit", usage, main, { ... })
