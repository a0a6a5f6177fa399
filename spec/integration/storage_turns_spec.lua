-- Writers of several processes on one SQLite file (the workers of an
-- app) take turns: SQLite's own wait for its write lock is not fair
-- between processes (a busy handler that sleeps up to 100 ms between
-- tries, against a writer that takes the lock again microseconds after
-- each COMMIT), and one process writing flat out could keep its
-- neighbour's batch waiting past busy_timeout: writes failed "busy".
local core = require "paygate.core"
local sql = require "paygate.sql"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"
local SECONDS, BUSY_MS = 4, 500

local tmp = servers.mktemp()

teardown(function()
  servers.sh("rm -rf " .. tmp)
end)

local function mode_of(path)
  return servers.read_cmd("stat -c %a " .. path):match("%d+")
end

describe("sqlite writers of two processes", function()
  it("take turns: writing flat out, neither waits out busy_timeout",
     function()
    local path = tmp .. "/flat.db"
    local db = assert(sql.open("sqlite:" .. path))
    assert(db:exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    db:close()
    local start_at = core.time() + 1.0
    local list = {}
    for i = 1, 2 do
      list[i] = proc.spawn({ BIN, "exec", "spec/support/flat_writer.lua",
                             path, string.format("%.3f", start_at),
                             tostring(SECONDS), tostring(BUSY_MS) },
                           { log = tmp .. "/w" .. i .. ".out" })
    end
    local lines = {}
    for i, p in ipairs(list) do
      local rc = p:wait(SECONDS + 30)
      if rc == nil then
        p:kill(proc.SIGKILL)
        p:wait(5)
      end
      lines[i] = proc.read(p.log) or ""
      assert(rc == 0, "writer " .. i .. " exited with " .. tostring(rc)
             .. ": " .. lines[i])
    end
    local all = table.concat(lines)
    for i, line in ipairs(lines) do
      local writes, failed = line:match("writes=(%d+) failed=(%d+)")
      assert(writes, "writer " .. i .. ": " .. line)
      assert.is_true(tonumber(writes) > 0, all)
      assert.equal(0, tonumber(failed), "writer " .. i .. " (busy_timeout "
                   .. BUSY_MS .. " ms): " .. all)
    end
    -- what they wrote is there, once
    db = assert(sql.open("sqlite:" .. path))
    local n = db:query("SELECT count(*) AS c FROM t")[1].c
    db:close()
    local sum = 0
    for w in all:gmatch("writes=(%d+)") do sum = sum + tonumber(w) end
    assert.equal(sum, n)
  end)

  it("wait out a lock held long without spinning a core", function()
    -- another writer holds the lock past busy_timeout (a migration, a
    -- transaction of another tool): the waiting writer's thread tries
    -- in turn, but it must not burn a core for it (it did: some 20 % of
    -- one, a BEGIN every 50 us, for the whole wait)
    local paygate = require "paygate"
    local path = tmp .. "/held.db"
    local holder = assert(sql.open("sqlite:" .. path))
    assert(holder:exec("CREATE TABLE t (v TEXT)"))
    local waiter = assert(sql.open("sqlite:" .. path,
                                   { busy_timeout = 2000 }))
    local holding, release = false, false
    local held = paygate.spawn(function()
      return holder:transaction(function(tx)
        assert(tx:exec("INSERT INTO t (v) VALUES ('held')"))
        holding = true
        local deadline = core.mono() + 30
        while not release and core.mono() < deadline do
          paygate.sleep(0.02)
        end
        return true
      end)
    end)
    proc.wait_until(function() return holding end, 10, "the lock held")
    local cpu0, t0 = os.clock(), core.mono()
    local ok, err = waiter:exec("INSERT INTO t (v) VALUES ('w')")
    local cpu, waited = os.clock() - cpu0, core.mono() - t0
    release = true
    assert(held:wait())
    waiter:close()
    holder:close()
    assert.is_nil(ok)
    assert.equal("busy", err.kind)
    assert.is_true(waited >= 1.9, "waited " .. waited .. " s")
    -- this process's CPU over the 2 s wait, every thread of it (some
    -- 0.06 s: tries up to every 1 ms; 0.3 to 0.4 s before)
    assert.is_true(cpu < 0.15, ("%.3f s of CPU in a %.1f s wait")
                   :format(cpu, waited))
  end)

  it("ask for turns through PATH-turn, made 0600 beside the file",
     function()
    local path = tmp .. "/mode.db"
    local db = assert(sql.open("sqlite:" .. path))
    assert(db:exec("CREATE TABLE t (v TEXT)"))
    db:close()
    assert.equal("file", core.file_type(path .. "-turn"))
    assert.equal("600", mode_of(path .. "-turn"))
  end)

  it("made by root, belong to the store's owner, as SQLite's -wal and"
     .. " -shm do", function()
    -- root running a tool on the gateway's store (paygate backup, doctor,
    -- migrate apply) made PATH-turn root's, 0600: the gateway's workers,
    -- another user, could not open it and never took turns
    if not servers.read_cmd("id -u"):match("^0\n?$") then
      pending("not root: the files this process makes are its own")
      return
    end
    local path = tmp .. "/owned.db"
    local db = assert(sql.open("sqlite:" .. path))
    assert(db:exec("CREATE TABLE t (v TEXT)"))
    db:close()
    assert(servers.sh("rm -f " .. path .. "-turn " .. path .. "-wal "
                      .. path .. "-shm && chown 65534:65534 " .. path))
    db = assert(sql.open("sqlite:" .. path))
    assert(db:exec("INSERT INTO t (v) VALUES ('a')"))
    local function owner(f)
      return servers.read_cmd("stat -c %u:%g " .. f):match("[%d:]+")
    end
    assert.equal("65534:65534", owner(path .. "-wal"))  -- SQLite's doing
    assert.equal("65534:65534", owner(path .. "-turn"))
    assert.equal("600", mode_of(path .. "-turn"))
    db:close()
    -- one root made before (an older paygate) is given over too; a file
    -- of another owner is left as it is
    assert(servers.sh("chown 0:0 " .. path .. "-turn"))
    db = assert(sql.open("sqlite:" .. path))
    db:close()
    assert.equal("65534:65534", owner(path .. "-turn"))
    assert(servers.sh("chown 1:1 " .. path .. "-turn"))
    db = assert(sql.open("sqlite:" .. path))
    db:close()
    assert.equal("1:1", owner(path .. "-turn"))
    -- nor is root's file linked there from elsewhere
    local other = tmp .. "/roots_own"
    assert(servers.sh("rm -f " .. path .. "-turn && : > " .. other
                      .. " && ln " .. other .. " " .. path .. "-turn"))
    db = assert(sql.open("sqlite:" .. path))
    db:close()
    assert.equal("0:0", owner(other))
  end)

  it("write as before where PATH-turn cannot be opened, and follow no"
     .. " link there", function()
    -- a folder in its place: writes wait as SQLite waits
    local path = tmp .. "/dir.db"
    assert(servers.sh("mkdir " .. path .. "-turn"))
    local db = assert(sql.open("sqlite:" .. path))
    assert(db:exec("CREATE TABLE t (v TEXT)"))
    assert(db:exec("INSERT INTO t (v) VALUES ('a')"))
    db:close()
    -- a link planted there is not followed (nothing made where it points)
    local linked = tmp .. "/link.db"
    assert(servers.sh("ln -s " .. tmp .. "/elsewhere " .. linked .. "-turn"))
    db = assert(sql.open("sqlite:" .. linked))
    assert(db:exec("CREATE TABLE t (v TEXT)"))
    db:close()
    assert.is_nil(core.file_type(tmp .. "/elsewhere"))
  end)
end)
