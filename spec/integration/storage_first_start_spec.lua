-- Several workers start at once on a SQLite database that does not exist
-- yet (a first deploy of `paygate run --workers N`): each one's sql.open
-- (creating the file, switching it to WAL) and migrate.run must wait for
-- the others within busy_timeout, never fail with "busy" -- a worker that
-- fails to load its app on the first start stops the server.
local paygate = require "paygate"
local proc = require "support.proc"
local server = require "support.server"
local servers = require "spec.support.servers"

local WORKERS = 8
local ROUNDS = tonumber(os.getenv("PAYGATE_ROUNDS") or "20")

local tmp = servers.mktemp()

teardown(function()
  servers.sh("rm -rf " .. tmp)
end)

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- Each worker, at load: open, migrate, record its pid.
local APP = [[
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local function check(v, err)
  if v == nil then error(tostring(err), 2) end
  return v
end
local db = check(sql.open("sqlite:" .. %q))
check(migrate.run(db, %q))
check(db:exec("INSERT INTO starts (pid) VALUES ($1)",
              { tonumber(io.open("/proc/self/stat"):read("*l"):match("^%%d+")) }))
]]

describe("sqlite first start", function()
  it(WORKERS .. " workers open and migrate a missing database at once, "
     .. ROUNDS .. " times", function()
    local mig = tmp .. "/migrations"
    assert(servers.sh("mkdir -p " .. mig .. "/sqlite"))
    write(mig .. "/sqlite/001_starts.sql",
          "CREATE TABLE starts (id INTEGER PRIMARY KEY, pid INTEGER);")
    write(mig .. "/sqlite/002_index.sql",
          "CREATE INDEX starts_pid ON starts (pid);")
    local sql = require "paygate.sql"
    local t0 = paygate.update_time()
    for round = 1, ROUNDS do
      local path = tmp .. "/r" .. round .. ".db"
      local s = server.start{ source = APP:format(path, mig),
                              workers = WORKERS }
      local db = assert(sql.open("sqlite:" .. path))
      -- every worker loaded the app (or the master gave up and exited)
      proc.wait_until(function()
        if s.proc:poll() then return true end
        local rows = db:query("SELECT count(*) AS c FROM starts")
        return rows and rows[1].c >= WORKERS
      end, 15, "round " .. round .. ": " .. WORKERS .. " workers to start")
      local alive = s.proc:poll() == nil
      local logs = s:logs()
      local migs = db:query("SELECT count(*) AS c FROM paygate_migrations")
      s:stop()
      db:close()
      assert.is_true(alive, "round " .. round .. ": the server stopped:\n"
                     .. logs)
      assert.falsy(logs:find("busy"), logs)
      assert.equal(2, migs[1].c)          -- each migration applied once
    end
    print(string.format("\n%d rounds of %d workers: %.1f s", ROUNDS, WORKERS,
                        paygate.update_time() - t0))
  end)
end)
