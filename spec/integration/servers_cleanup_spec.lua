-- The project's own spec helpers (spec/support/servers.lua) leave nothing
-- behind a spec run, as paygate.testing does: a spec file using them is
-- run here as a child `paygate exec busted`, and once it has ended, with
-- a test that errored and no teardown, or killed with its whole process
-- group, no server it started runs and no folder it made remains; every
-- folder was made in its TMPDIR.
local testing = require "paygate.testing"
local proc = require "paygate.testing.proc"
local core = require "paygate.core"
local servers = require "spec.support.servers"

local BUSTED = assert(io.popen("command -v busted")):read("*l")

-- what both child specs start with: the helpers, report(line) to the
-- REPORT file, first_line(path)
local PRELUDE = [[
local servers = require "spec.support.servers"
local function report(line)
  local f = assert(io.open(os.getenv("REPORT"), "a"))
  f:write(line, "\n")
  f:close()
end
local function first_line(path)
  local f = assert(io.open(path))
  local l = f:read("*l")
  f:close()
  return l
end
]]

-- the child's spec: a folder of its own, a Redis it stopped itself (what
-- a teardown calling srv.stop() and not servers.stop_all() did), a Redis
-- and a PostgreSQL left running; it reports each folder and each running
-- server's pid, then errors
local CHILD = PRELUDE .. [[
it("errors with its servers running", function()
  report("dir " .. servers.mktemp())
  if servers.have_redis() then
    local stopped = servers.redis()
    stopped.stop()
    report("dir " .. stopped.dir)
    local r = servers.redis()
    report("dir " .. r.dir)
    report("pid " .. first_line(r.pidfile))
  end
  if servers.have_postgres() then
    local pg = servers.postgres()
    report("dir " .. pg.dir)
    report("pid " .. first_line(pg.data .. "/postmaster.pid"))
    -- the run's shared server (servers.postgres_db)
    local db = servers.postgres_db()
    report("dir " .. db.dir)
    report("pid " .. first_line(db.dir .. "/data/postmaster.pid"))
  end
  error("the spec's own mistake")
end)
]]

-- the child's spec for a run whose kit made a folder before it loaded
-- the helpers (what the gateway's support.lua does: a simulator first):
-- the kit removes its folders at the run's end before the helpers stop
-- their servers. It leaves the run's shared PostgreSQL server running
local LATE = PRELUDE:gsub("^[^\n]*\n", "") .. [[
local testing = require "paygate.testing"
it("makes a kit folder, then takes a database of the shared server",
   function()
  report("dir " .. testing.tmpdir())
  local servers = require "spec.support.servers"
  local db = servers.postgres_db()
  report("dir " .. db.dir)
  report("pid " .. first_line(db.dir .. "/data/postmaster.pid"))
end)
]]

local function alive(pid)
  return proc.running(pid)
end

-- a folder for a child run, its TMPDIR inside: as root, PostgreSQL's
-- folder belongs to the postgres user, who must reach it through these
-- (mkdtemp made them 0700)
local function child_dirs()
  local dir = testing.tmpdir()
  local tmp = dir .. "/tmp"
  assert(core.mkdir_p(tmp))
  assert(servers.sh("chmod 711 " .. dir .. " " .. tmp))
  return dir, tmp
end

-- what the child reported: its folders, its servers' pids
local function reported(report)
  local dirs, pids = {}, {}
  for k, v in testing.read(report):gmatch("(%S+) ([^\n]+)") do
    if k == "dir" then dirs[#dirs + 1] = v
    elseif k == "pid" then pids[#pids + 1] = v end
  end
  return dirs, pids
end

-- the child's spec for a run that is killed: a Redis stopped by the spec
-- itself, a Redis and a PostgreSQL running; it reports each, then
-- "ready", then waits to be killed
local KILLED = PRELUDE .. [[
it("is killed with its servers running", function()
  if servers.have_redis() then
    local stopped = servers.redis()
    stopped.stop()
    report("dir " .. stopped.dir)
    local r = servers.redis()
    report("dir " .. r.dir)
    report("pid " .. first_line(r.pidfile))
  end
  if servers.have_postgres() then
    local pg = servers.postgres()
    report("dir " .. pg.dir)
    report("pid " .. first_line(pg.data .. "/postmaster.pid"))
    -- the run's shared server (servers.postgres_db)
    local db = servers.postgres_db()
    report("dir " .. db.dir)
    report("pid " .. first_line(db.dir .. "/data/postmaster.pid"))
  end
  report("ready -")
  require("paygate.core").sleep(300)
end)
]]

-- Runs source as a spec file of its own (name) in a busted run of its
-- own, TMPDIR a fresh folder; returns its exit code (nil: it did not
-- end), its log, the folders and server pids it reported, and its TMPDIR.
-- Whatever the case finds, nothing of the child outlives it (finally:
-- call it inside a case).
local function run_child(name, source)
  local dir, tmp = child_dirs()
  local spec = dir .. "/" .. name
  testing.write(spec, source)
  local report = dir .. "/report"
  local p = proc.spawn({ "env", "TMPDIR=" .. tmp, "REPORT=" .. report,
    "PAYGATE_TEST_KEEP=", testing.server.bin(), "exec", BUSTED,
    "--helper=spec/helpers.lua", "-o", "TAP", spec },
    { log = dir .. "/log" })
  local code = p:wait(180)
  if code == nil then p:stop(5) end
  local log = testing.read(dir .. "/log")
  local dirs, pids = reported(report)
  finally(function()
    for _, pid in ipairs(pids) do servers.sh("kill -9 " .. pid .. " 2>/dev/null") end
    for _, d in ipairs(dirs) do servers.sh("rm -rf '" .. d .. "'") end
  end)
  return code, log, dirs, pids, tmp
end

describe("a spec run using spec/support/servers.lua", function()
  it("that errors with no teardown leaves no server running and no"
     .. " folder behind, and made its folders in TMPDIR", function()
    local code, log, dirs, pids, tmp = run_child("child_spec.lua", CHILD)
    assert.is_not_nil(code, "the spec run did not end: " .. log)
    assert.are_not.equal(0, code, log)
    assert.matches("not ok 1", log, 1, true)
    assert.equal(1 + (servers.have_redis() and 2 or 0)
                 + (servers.have_postgres() and 2 or 0), #dirs, log)
    assert.equal((servers.have_redis() and 1 or 0)
                 + (servers.have_postgres() and 2 or 0), #pids, log)
    for _, d in ipairs(dirs) do
      assert.equal(tmp .. "/paygate-spec.", d:sub(1, #tmp + 14))
      assert.is_false(proc.exists(d .. "/."), d .. " remains")
    end
    -- stopped, it may take a moment more to be gone: PostgreSQL's
    -- postmaster removes its pid file (pg_ctl -w returns then) before it
    -- has exited and been reaped (seen on a loaded machine: "still runs")
    for _, pid in ipairs(pids) do
      testing.wait_until(function() return not alive(pid) end, 30,
                         "server " .. pid .. " to be gone")
    end
    assert.same({}, core.listdir(tmp))
  end)

  it("that loaded the helpers after its first kit folder leaves no"
     .. " shared PostgreSQL server running", function()
    if not servers.have_postgres() then
      pending("PostgreSQL is not installed")
      return
    end
    local code, log, dirs, pids = run_child("late_spec.lua", LATE)
    assert.equal(0, code, log)
    assert.equal(1, #pids, log)
    -- (a postmaster stopped may take a moment more to be gone)
    testing.wait_until(function() return not alive(pids[1]) end, 30,
                       "server " .. pids[1] .. " to be gone")
    for _, d in ipairs(dirs) do
      assert.is_false(proc.exists(d .. "/."), d .. " remains")
    end
  end)

  -- A CI's timeout (timeout(1), a runner cancelling a job) SIGKILLs the
  -- whole process group: busted and everything in its group get no
  -- chance to clean up. Redis and PostgreSQL run daemonized, outside it.
  it("that is killed with its process group (SIGKILL) leaves no server"
     .. " running and no folder behind", function()
    local dir, tmp = child_dirs()
    local spec = dir .. "/killed_spec.lua"
    testing.write(spec, KILLED)
    local report = dir .. "/report"
    -- setsid: the run leads a process group of its own, as a CI's job does
    local p = proc.spawn({ "setsid", "env", "TMPDIR=" .. tmp,
      "REPORT=" .. report, "PAYGATE_TEST_KEEP=", testing.server.bin(),
      "exec", BUSTED, "--helper=spec/helpers.lua", "-o", "TAP", spec },
      { log = dir .. "/log" })
    local dirs, pids = {}, {}
    finally(function()
      p:stop(5)
      for _, pid in ipairs(pids) do servers.sh("kill -9 " .. pid .. " 2>/dev/null") end
      for _, d in ipairs(dirs) do servers.sh("rm -rf '" .. d .. "'") end
    end)
    testing.wait_until(function()
      if p:poll() then error("the run ended: " .. testing.read(dir .. "/log")) end
      return testing.read(report):find("ready", 1, true)
    end, 120, "the run's servers")
    dirs, pids = reported(report)
    assert.equal(2 * (servers.have_redis() and 1 or 0)
                 + (servers.have_postgres() and 2 or 0), #dirs)
    for _, pid in ipairs(pids) do assert.is_true(alive(pid)) end
    proc.kill_pid(-p.pid, proc.SIGKILL)
    assert.is_not_nil(p:wait(10), "the spec run did not end")
    for _, pid in ipairs(pids) do
      testing.wait_until(function() return not alive(pid) end, 30,
                         "server " .. pid .. " to be gone")
    end
    for _, d in ipairs(dirs) do
      assert.equal(tmp .. "/paygate-spec.", d:sub(1, #tmp + 14))
      testing.wait_until(function() return not proc.exists(d .. "/.") end,
                         30, d .. " to be removed")
    end
    testing.wait_until(function()
      local left = core.listdir(tmp)
      return #left == 0, table.concat(left, " ")
    end, 30, "the run's TMPDIR to be empty")
  end)

  -- a stopped server's guard is ended with it: it could otherwise, once
  -- the run is gone, signal another process given the same pid
  it("ends a server's guard when the spec stops the server, and guards"
     .. " it again when it starts again", function()
    local list = {}
    if servers.have_redis() then list[#list + 1] = servers.redis() end
    if servers.have_postgres() then list[#list + 1] = servers.postgres() end
    for _, srv in ipairs(list) do
      local g = srv.guard
      assert.is_not_nil(g, srv.kind)
      assert.is_nil(g:poll(), srv.kind .. "'s guard runs")
      srv.stop()
      assert.is_nil(srv.guard)
      assert.is_not_nil(g:poll(), srv.kind .. "'s guard was not ended")
      srv.start()
      assert.is_not_nil(srv.guard, srv.kind)
      assert.are_not.equal(g.pid, srv.guard.pid)
      local again = srv.guard
      srv.cleanup()
      assert.is_not_nil(again:poll(), srv.kind .. "'s guard was not ended")
    end
  end)

  -- describe blocks of one spec file share one PostgreSQL server, each
  -- with databases of its own: a cluster per block cost 1.5-3 s each
  it("postgres_db: a fresh database per call on the run's one server;"
     .. " stop_all drops them and leaves the server to the next", function()
    if not servers.have_postgres() then
      pending("PostgreSQL is not installed")
      return
    end
    local sql = require "paygate.sql"
    local a, b = servers.postgres_db(), servers.postgres_db()
    assert.are_not.equal(a.name, b.name)
    assert.equal(a.port, b.port)
    assert.equal(a.dir, b.dir)
    local da = assert(sql.open(a.url))
    assert(da:exec("CREATE TABLE t (x INT)"))
    local db = assert(sql.open(b.url))
    -- fresh: the other database's table is not there
    assert.equal(0, #assert(db:query("SELECT 1 FROM pg_tables"
      .. " WHERE tablename = 't'")))
    db:close()
    local pid = testing.read(a.dir .. "/data/postmaster.pid"):match("^%d+")
    -- a session still open (an app not stopped yet) does not stop the drop
    servers.stop_all()
    da:close()
    assert.is_true(alive(pid))
    local c = servers.postgres_db()
    assert.equal(a.port, c.port)
    db = assert(sql.open(c.url))
    local names = {}
    for _, r in ipairs(assert(db:query("SELECT datname FROM pg_database"
        .. " WHERE datname LIKE 'spec_%' ORDER BY datname"))) do
      names[#names + 1] = r.datname
    end
    db:close()
    assert.same({ c.name }, names)
    servers.stop_all()
  end)

  -- the kill -9 durability specs' writer (servers.kill_writer) runs
  -- detached: a writer that never acknowledged anything (its store
  -- refusing every write) was left spinning after the spec failed
  it("kill_writer that sees no acknowledgement raises and leaves no"
     .. " writer running", function()
    local dir = servers.mktemp()
    local path = "sqlite:" .. dir .. "/refusing.db"
    local sql = require "paygate.sql"
    local db = assert(sql.open(path))
    assert(db:exec_script([[
CREATE TABLE acks (id TEXT PRIMARY KEY);
CREATE TRIGGER acks_refused BEFORE INSERT ON acks
  BEGIN SELECT RAISE(ABORT, 'refused by the spec'); END]]))
    db:close()
    local ok, err = pcall(servers.kill_writer, path, dir .. "/w.out")
    assert.is_false(ok)
    assert.matches("the writer's first acknowledgements", tostring(err))
    local left = servers.read_cmd("pgrep -f '[a]ck_writer.lua " .. path
                                  .. "' || true")
    assert.equal("", left or "", "a writer still runs: " .. tostring(left))
  end)
end)
