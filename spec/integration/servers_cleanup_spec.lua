-- The project's own spec helpers (spec/support/servers.lua) leave nothing
-- behind a spec run, as paygate.testing does: a spec file using them is
-- run here as a child `paygate exec busted`, and once it has ended, with
-- a test that errored and no teardown, no server it started runs and no
-- folder it made remains; every folder was made in its TMPDIR.
local testing = require "paygate.testing"
local proc = require "paygate.testing.proc"
local core = require "paygate.core"
local servers = require "spec.support.servers"

local BUSTED = assert(io.popen("command -v busted")):read("*l")

-- the child's spec: a folder of its own, a Redis it stopped itself (what
-- a teardown calling srv.stop() and not servers.stop_all() did), a Redis
-- and a PostgreSQL left running; it reports each folder and each running
-- server's pid, then errors
local CHILD = [[
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
  end
  error("the spec's own mistake")
end)
]]

local function alive(pid)
  return servers.sh("kill -0 " .. pid .. " 2>/dev/null")
end

describe("a spec run using spec/support/servers.lua", function()
  it("that errors with no teardown leaves no server running and no"
     .. " folder behind, and made its folders in TMPDIR", function()
    local dir = testing.tmpdir()
    local tmp = dir .. "/tmp"
    assert(core.mkdir_p(tmp))
    -- as root, PostgreSQL's folder belongs to the postgres user, who must
    -- reach it through these (mkdtemp made them 0700)
    assert(servers.sh("chmod 711 " .. dir .. " " .. tmp))
    local spec = dir .. "/child_spec.lua"
    testing.write(spec, CHILD)
    local report = dir .. "/report"
    local p = proc.spawn({ "env", "TMPDIR=" .. tmp, "REPORT=" .. report,
      "PAYGATE_TEST_KEEP=", testing.server.bin(), "exec", BUSTED,
      "--helper=spec/helpers.lua", "-o", "TAP", spec },
      { log = dir .. "/log" })
    local code = p:wait(180)
    if code == nil then p:stop(5) end
    local log = testing.read(dir .. "/log")
    local dirs, pids = {}, {}
    for k, v in testing.read(report):gmatch("(%S+) ([^\n]+)") do
      if k == "dir" then dirs[#dirs + 1] = v else pids[#pids + 1] = v end
    end
    -- whatever this spec finds, nothing of the child outlives it
    finally(function()
      for _, pid in ipairs(pids) do servers.sh("kill -9 " .. pid .. " 2>/dev/null") end
      for _, d in ipairs(dirs) do servers.sh("rm -rf '" .. d .. "'") end
    end)
    assert.is_not_nil(code, "the spec run did not end: " .. log)
    assert.are_not.equal(0, code, log)
    assert.matches("not ok 1", log, 1, true)
    assert.equal(1 + (servers.have_redis() and 2 or 0)
                 + (servers.have_postgres() and 1 or 0), #dirs, log)
    assert.equal((servers.have_redis() and 1 or 0)
                 + (servers.have_postgres() and 1 or 0), #pids, log)
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
end)
