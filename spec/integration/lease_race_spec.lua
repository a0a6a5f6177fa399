-- A lease has at most one holder: many processes, each with many
-- coroutines, race for one lease on SQLite, Redis and PostgreSQL; every
-- holder checks, through a counter kept in the store, that it is alone.
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local redis = require "paygate.redis"
local lease = require "paygate.lease"
local servers = require "spec.support.servers"
local proc = require "spec.support.proc"

local BIN = os.getenv("PAYGATE_BIN") or "build/paygate"

local tmp = servers.mktemp()

teardown(function()
  servers.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local n = 0
local pg_srv, redis_srv

-- Each engine: a fresh store URL with the counter the racers use.
local engines = {
  sqlite = function()
    n = n + 1
    -- synchronous=1: durability is not what this spec is about
    local url = "sqlite:" .. tmp .. "/race" .. n .. ".db?synchronous=1"
    local db = assert(sql.open(url))
    assert(db:exec_script("CREATE TABLE race_inside (n INTEGER NOT NULL);"
                          .. " INSERT INTO race_inside (n) VALUES (0)"))
    return url, db
  end,
}
if servers.have_redis() then
  engines.redis = function()
    redis_srv = redis_srv or servers.redis()
    local c = assert(redis.connect(redis_srv.url))
    assert(c:call("FLUSHALL"))
    return redis_srv.url, c
  end
end
if servers.have_postgres() then
  engines.postgres = function()
    pg_srv = pg_srv or servers.postgres()
    local db = assert(sql.open(pg_srv.url))
    assert(db:exec_script("DROP TABLE IF EXISTS paygate_leases;"
      .. " DROP TABLE IF EXISTS race_inside;"
      .. " CREATE TABLE race_inside (n INTEGER NOT NULL);"
      .. " INSERT INTO race_inside (n) VALUES (0)"))
    return pg_srv.url, db
  end
end

-- Runs `procs` racers with `cos` coroutines each; returns the summed
-- counts and the racers' output.
local function race(url, procs, cos, holds)
  local start_at = core.time() + 1.0
  local list = {}
  for i = 1, procs do
    local out = tmp .. "/racer" .. n .. "-" .. i .. ".out"
    list[i] = proc.spawn({ BIN, "exec", "spec/support/lease_racer.lua", url,
                           string.format("%.3f", start_at), tostring(cos),
                           tostring(holds) }, { log = out })
  end
  local sum = { holds = 0, overlaps = 0, errors = 0 }
  local text = {}
  for i = 1, procs do
    local rc = list[i]:wait(60)
    if rc == nil then
      list[i]:kill(proc.SIGKILL)
      list[i]:wait(5)
    end
    local s = proc.read(list[i].log)
    text[#text + 1] = s
    assert(rc == 0, "racer " .. i .. " failed (" .. tostring(rc) .. "): "
           .. s)
    local h, o, e = s:match("holds=(%d+) overlaps=(%d+) errors=(%d+)")
    assert(h, "racer " .. i .. " printed no summary: " .. s)
    sum.holds = sum.holds + tonumber(h)
    sum.overlaps = sum.overlaps + tonumber(o)
    sum.errors = sum.errors + tonumber(e)
  end
  return sum, table.concat(text)
end

for name, new_store in pairs(engines) do
  describe("paygate.lease race on " .. name, function()
    it("two acquirers in one instant after math.random was reseeded:"
       .. " one holds, the other gets held", function()
      local _, store = new_store()
      -- Both run up to their first wait in this loop turn: same clock,
      -- and the same math.random sequence (a library reseeded it).
      local function try()
        math.randomseed(42)
        return lease.acquire(store, "same-instant", 5)
      end
      local t1, t2 = paygate.spawn(try), paygate.spawn(try)
      local l1, e1 = t1:wait()
      local l2, e2 = t2:wait()
      assert.truthy((l1 == nil) ~= (l2 == nil),
                    "exactly one holder; got " .. tostring(e1) .. ", "
                    .. tostring(e2))
      local err = e1 or e2
      assert.equal("held", err.kind)
      local l = l1 or l2
      assert.is_string(l.owner)
      assert.truthy(#l.owner >= 16)
      store:close()
    end)

    it("many processes and coroutines never both hold it", function()
      local url, store = new_store()
      local t0 = core.mono()
      local sum, text = race(url, 4, 4, 3)
      assert.equal(0, sum.overlaps, text)
      assert.equal(0, sum.errors, text)
      assert.equal(4 * 4 * 3, sum.holds, text)
      assert.truthy(core.mono() - t0 < 60)
      store:close()
    end)
  end)
end
