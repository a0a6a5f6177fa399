-- paygate restore: a copy paygate backup made put back in place of a
-- SQLite store. The events given out after the copy keep their ids (the
-- counter moves past them), the restore is recorded in the audit trail,
-- an old -wal beside the store is not read into the restored file, the
-- backup is only read, and a store in use or a bad backup is refused in
-- one line with the store left as it was.
local sql = require "paygate.sql"
local audit = require "paygate.audit"
local outbox = require "paygate.outbox"
local crypto = require "paygate.crypto"
local json = require "paygate.json"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"

local tmp = servers.mktemp()

teardown(function()
  servers.sh("rm -rf " .. tmp)
end)

local function run(...)
  return proc.run({ BIN, ... }, { timeout = 60 })
end

local function digest(path)
  return crypto.digest("sha256", proc.read(path))
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- n events enqueued (and their audit entries), in the store
local function work(db, n, tag)
  for i = 1, n do
    assert(db:transaction(function(tx)
      assert(outbox.enqueue(tx, { subject = "pay_" .. tag .. i,
                                  type = "payment.paid", payload = {} }))
      assert(audit.append(tx, "payment:pay_" .. tag .. i,
                          { what = "payment.paid", to = "paid" }))
      return true
    end))
  end
end

local function one(db, q)
  return assert(db:query(q))[1]
end

describe("paygate restore", function()
  local store = tmp .. "/gw.db"
  local url = "sqlite:" .. store
  local copy = tmp .. "/copy.db"

  setup(function()
    local db = assert(sql.open(url))
    assert(audit.ensure_schema(db))
    assert(outbox.setup(db))
    work(db, 5, "a")                       -- events 1 .. 5
    db:close()
    assert.equal(0, (run("backup", url, copy)))
  end)

  it("refuses a store that exists without --force, and one in use", function()
    local code, out = run("restore", copy, url)
    assert.equal(2, code, out)
    assert.equal("paygate restore: " .. store .. " exists: restoring replaces"
      .. " it; give --force to do so (with the gateway stopped)\n", out)
    -- a process has it open (this one): refused even with --force
    local db = assert(sql.open(url))
    work(db, 1, "live")
    code, out = run("restore", copy, url, "--force")
    assert.equal(2, code, out)
    assert.matches("^paygate restore: " .. store:gsub("%p", "%%%0")
      .. " is in use %(process %d+ has it open%): stop the gateway first\n$",
      out)
    -- the store as it was: the write above kept
    assert.equal(6, one(db, "SELECT count(*) AS n FROM paygate_outbox").n)
    db:close()
  end)

  it("puts the copy back; event ids go on past the ones given out after it",
     function()
    -- after the copy: more events (ids 6 .. 9 with the one above), left
    -- in the -wal as a crash would leave them
    local db = assert(sql.open(url))
    work(db, 3, "b")
    assert.equal(9, one(db, "SELECT max(id) AS id FROM paygate_outbox").id)
    db:close()
    local was = digest(copy)
    local code, out = run("restore", copy, url, "--force")
    assert.equal(0, code, out)
    assert.matches("its newest audit entry is of %d+%-%d+%-%d+T", out)
    assert.matches("its last event id 5\n", out, 1, true)
    assert.matches("event ids go on from 1000000006 (the copy's last, 5,"
      .. " plus 1000000000", out, 1, true)
    assert.matches("recorded in the audit trail", out, 1, true)
    assert.matches("restored (", out, 1, true)
    assert.matches("Backups and recovery", out, 1, true)
    assert.equal(was, digest(copy))             -- only read
    assert.is_false(exists(copy .. "-wal"))
    assert.is_false(exists(store .. ".restore"))
    assert.is_false(exists(store .. ".restore-turn"))

    db = assert(sql.open(url))
    -- the copy's rows, and none of those made after it
    assert.equal(5, one(db, "SELECT count(*) AS n FROM paygate_outbox").n)
    -- the next event's id is new to every receiver
    assert(db:transaction(function(tx)
      return outbox.enqueue(tx, { subject = "pay_c1", type = "payment.paid",
                                  payload = {} })
    end))
    assert.equal(1000000006,
                 one(db, "SELECT max(id) AS id FROM paygate_outbox").id)
    -- recorded, in a chain that verifies
    local e = one(db, "SELECT what, actor, evidence FROM paygate_audit"
                      .. " WHERE subject = 'store'")
    assert.equal("store.restored", e.what)
    local ev = json.decode(e.evidence)
    assert.equal(5, ev.copy_last_event_id)
    assert.equal(1000000006, ev.next_event_id)
    assert.is_number(ev.copy_newest)
    assert.is_number(ev.restored_at)
    db:close()
    code, out = run("audit", "verify", url)
    assert.equal(0, code, out)
    assert.matches(" 0 broken", out, 1, true)
  end)

  it("moves the ids past --last-event-id; --json", function()
    local dest = tmp .. "/fresh/gw.db"
    assert(os.execute("mkdir -p " .. tmp .. "/fresh"))
    local code, out = run("restore", copy, "sqlite:" .. dest,
                          "--last-event-id", "41", "--json")
    assert.equal(0, code, out)
    local r = json.decode(out)
    assert.equal("ok", r.status)
    assert.equal(5, r.copy_last_event_id)
    assert.equal(42, r.next_event_id)
    local db = assert(sql.open("sqlite:" .. dest))
    assert.equal(41, one(db, "SELECT seq FROM sqlite_sequence WHERE name ="
                             .. " 'paygate_outbox'").seq)
    db:close()
  end)

  it("refuses bad input in one line, the store left as it was", function()
    local before = digest(store)
    local junk = tmp .. "/junk.db"
    proc.write(junk, ("not a database\n"):rep(400))
    local cases = {
      { { junk, url, "--force" }, "junk.db does not open as a SQLite store" },
      { { tmp .. "/absent.db", url, "--force" }, "is not a file" },
      { { copy, url, "--force", "--last-event-id", "-3" },
        "--last-event-id must be a whole number" },
      { { copy, "postgres://gw:s3cr3t@db/gw" }, "pg_restore" },
    }
    for _, c in ipairs(cases) do
      local code, out = run("restore", table.unpack(c[1]))
      assert.equal(2, code, out)
      assert.equal(1, select(2, out:gsub("\n", "")), out)
      assert.matches(c[2], out, 1, true)
      assert.not_matches("s3cr3t", out, 1, true)
    end
    assert.equal(before, digest(store))
    assert.is_false(exists(store .. ".restore"))
    assert.is_false(exists(store .. ".restore-turn"))
  end)
end)
