-- paygate backup: a consistent copy of a live SQLite store, taken while
-- another process (spec/support/ack_writer.lua, 20 coroutines) commits
-- rows without pause. The copy opens, passes quick_check, and holds every
-- row acknowledged before the backup began (a marker row written first,
-- then every acknowledged id); DEST is never replaced without --force,
-- nor ever the store itself; a bad source is refused in one line.
local sql = require "paygate.sql"
local crypto = require "paygate.crypto"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local function backup(...)
  local argv = { BIN, "backup", ... }
  return proc.run(argv, { timeout = 60 })
end

-- the writer's acknowledged ids so far (stdout and stderr share the
-- log: only the lines that are ids; a cut last line is no id)
local function acked(log)
  local t = {}
  for l in proc.read(log):gmatch("([^\n]*)\n") do
    if l:match("^%d+%-%d+%-%d+%-%d+$") then t[#t + 1] = l end
  end
  return t
end

local function size(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

local function digest(path)
  return crypto.digest("sha256", proc.read(path))
end

local function lines(s)
  local n = 0
  for _ in s:gmatch("[^\n]+") do n = n + 1 end
  return n
end

describe("paygate backup", function()
  local store = tmp .. "/gw.db"
  local url = "sqlite:" .. store
  local writer, wlog

  setup(function()
    -- a few MB, so the copy takes a while of the writer's commits
    local db = assert(sql.open(url))
    assert(db:exec_script([[
CREATE TABLE pad (n INTEGER PRIMARY KEY, v TEXT NOT NULL);
WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c
  WHERE n < 20000)
INSERT INTO pad (n, v) SELECT n, hex(randomblob(100)) FROM c]]))
    db:close()
    wlog = tmp .. "/writer.out"
    writer = proc.spawn({ BIN, "exec", "spec/support/ack_writer.lua", url },
                        { log = wlog })
    proc.wait_until(function() return #acked(wlog) > 200 end, 20,
                    "the writer's first acknowledgements")
  end)

  teardown(function()
    if writer then writer:stop(5) end
  end)

  it("copies the live store, -wal included, while the writer commits",
     function()
    -- the marker: committed (and acknowledged) before the backup begins
    -- (the writer process commits without a pause, and SQLite's lock
    -- waits are not fair: on a loaded machine, under ASan, the default
    -- 5 s was seen to run out)
    local db = assert(sql.open(url .. "?busy_timeout=60000"))
    local marker = "marker-" .. crypto.random_nonce(12)
    assert(db:exec("INSERT INTO acks (id) VALUES ($1)", { marker }))
    db:close()
    local before = acked(wlog)
    -- committed rows the file itself does not have yet
    assert.truthy(size(store .. "-wal") > 0, "no -wal to copy")
    local dest = tmp .. "/copy.db"
    local code, out = backup(url, dest)
    assert.equal(0, code, out)
    assert.matches("^" .. url:gsub("%p", "%%%0") .. " copied to "
                   .. dest:gsub("%p", "%%%0") .. ": %d+ pages of 4096 bytes"
                   .. " %(%d+ bytes%), quick_check ok", out)
    -- the writer went on meanwhile: not stopped, not blocked for good
    local n = #before
    proc.wait_until(function() return #acked(wlog) > n + 100 end, 20,
                    "the writer's acknowledgements after the backup")
    assert.is_nil(writer:poll(), "the writer ended")
    -- one file: no -wal, no .tmp left; private
    assert.is_nil(size(dest .. "-wal"))
    assert.is_nil(size(dest .. ".tmp"))
    assert.equal("600", servers.read_cmd("stat -c %a " .. dest):match("%d+"))
    local pages = tonumber(out:match(": (%d+) pages"))
    assert.equal(pages * 4096, size(dest))
    -- it opens, passes the check, and holds everything acknowledged
    local copy = assert(sql.open("sqlite:" .. dest))
    assert.same({ { quick_check = "ok" } },
                assert(copy:query("PRAGMA quick_check")))
    local have = {}
    for _, r in ipairs(assert(copy:query("SELECT id FROM acks"))) do
      have[r.id] = true
    end
    assert.equal(20000, copy:query("SELECT count(*) AS c FROM pad")[1].c)
    copy:close()
    assert.truthy(have[marker], "the marker row is not in the copy")
    local missing = {}
    for _, id in ipairs(before) do
      if not have[id] then missing[#missing + 1] = id end
    end
    assert.same({}, missing)
  end)

  it("refuses an existing DEST without --force, and replaces it with it",
     function()
    local dest = tmp .. "/again.db"
    assert.equal(0, (backup(url, dest)))
    local was = digest(dest)
    local code, out = backup(url, dest)
    assert.equal(2, code)
    assert.equal("paygate backup: DEST " .. dest .. " exists: give another"
                 .. " name, or --force to replace it\n", out)
    assert.equal(was, digest(dest))
    -- --json, and a newer copy (the writer has committed since)
    code, out = backup(url, dest, "--force", "--json")
    assert.equal(0, code, out)
    local r = require("paygate.json").decode(out)
    assert.equal("ok", r.status)
    assert.equal("ok", r.check)
    assert.equal(dest, r.dest)
    assert.equal(r.pages * r.page_size, r.bytes)
    assert.equal(r.bytes, size(dest))
    assert.not_equal(was, digest(dest))
  end)

  it("never replaces the store itself, nor its -wal, even with --force;"
     .. " nor writes its -journal or -shm, which a WAL store may not have",
     function()
    -- (a copy written as the store's -journal would be taken for a hot
    -- journal at the store's next open, and removed)
    for _, dest in ipairs({ store, store .. "-wal", store .. "-journal",
                            store .. "-turn",
                            tmp .. "/./" .. store:match("[^/]+$")
                              .. "-journal" }) do
      local code, out = backup(url, dest, "--force")
      assert.equal(1, code)
      assert.equal(1, lines(out), out)
      assert.matches("is the store being copied", out, 1, true)
    end
    -- still the live store: the writer commits on, every row is there
    local n = #acked(wlog)
    proc.wait_until(function() return #acked(wlog) > n + 100 end, 20,
                    "the writer's acknowledgements")
    local db = assert(sql.open(url))
    assert.same({ { quick_check = "ok" } },
                assert(db:query("PRAGMA quick_check")))
    db:close()
  end)

  it("refuses a bad source in one line, and makes no DEST", function()
    local dest = tmp .. "/none.db"
    local junk = tmp .. "/junk.db"
    proc.write(junk, ("not a database\n"):rep(400))
    local cases = {
      { "sqlite:" .. junk, "cannot open sqlite:" .. junk .. ": .*file is"
        .. " not a database" },
      { "sqlite:" .. tmp .. "/absent.db", "no database file " },
      { "sqlite:" .. tmp, "cannot open sqlite:" .. tmp },
      { "postgres://gw:s3cr3t-pw@db.example/gw", "postgres://gw@db.example/gw"
        .. " is a PostgreSQL store: .*pg_dump" },
      { "mysql://gw:s3cr3t-pw@db.example/gw", "SQLITE_URL must be"
        .. " sqlite:PATH" },
    }
    for _, c in ipairs(cases) do
      local code, out = backup(c[1], dest)
      assert.equal(2, code, out)
      assert.equal(1, lines(out), out)
      assert.matches("^paygate backup: " .. c[2]:gsub("[%-%.]", "%%%0")
                     :gsub("%%%.%*", ".*"), out)
      assert.not_matches("s3cr3t", out, 1, true)
      assert.is_nil(size(dest), c[1])
      assert.is_nil(size(dest .. ".tmp"), c[1])
    end
    assert.equal(("not a database\n"):rep(400), proc.read(junk))
    assert.is_nil(size(tmp .. "/absent.db"))
  end)

  it("gives PostgreSQL's command with a dump only its owner reads",
     function()
    -- before: "back PostgreSQL up with pg_dump -Fc", and pg_dump under
    -- the usual umask 022 writes a dump every local user reads: it holds
    -- paygate_api_keys' verifiers, the keys that sign merchant-API
    -- requests (a refund among them), where paygate backup makes its
    -- SQLite copy 0600
    local code, out = backup("postgres://gw:s3cr3t-pw@db.example/gw",
                             tmp .. "/none.db")
    assert.equal(2, code, out)
    assert.equal(1, lines(out), out)
    assert.matches("(umask 077; pg_dump -Fc -f '" .. tmp .. "/none.db' "
                   .. "'postgres://gw@db.example/gw')", out, 1, true)
    assert.matches("signing keys", out, 1, true)
    assert.not_matches("s3cr3t", out, 1, true)
    -- the command runs as printed: paygate's own options (pg_dump refuses
    -- them) and a password parameter (its *** would be sent as the
    -- password) left out, the URL quoted for the shell (an & would end
    -- the command)
    code, out = backup("postgres://gw@db.example/gw?pool=8&password=s3cr3t"
                       .. "&sslmode=require&query_timeout=5", tmp
                       .. "/none.db")
    assert.equal(2, code, out)
    assert.matches("(umask 077; pg_dump -Fc -f '" .. tmp .. "/none.db' "
                   .. "'postgres://gw@db.example/gw?sslmode=require')", out,
                   1, true)
    assert.not_matches("s3cr3t", out, 1, true)
    -- DEST as given (it said DEST, and the docs call the command ready to
    -- run), quoted for the shell; one with a newline stays DEST (one line)
    code, out = backup("postgres://gw@db.example/gw", "it's a dump")
    assert.equal(2, code, out)
    assert.matches("pg_dump -Fc -f 'it'\\''s a dump' 'postgres://gw@db."
                   .. "example/gw')", out, 1, true)
    code, out = backup("postgres://gw@db.example/gw", "two\nlines")
    assert.equal(2, code, out)
    assert.equal(1, lines(out), out)
    assert.matches("pg_dump -Fc -f DEST 'postgres://gw@db.example/gw')",
                   out, 1, true)
  end)
end)
