-- bench/storage.lua: durable single-row inserts from 100 concurrent
-- coroutines (SQLite group commit vs one commit per write vs PostgreSQL),
-- and Redis SET through paygate.redis vs redis-benchmark.
-- Run: bench/storage   (or paygate exec bench/storage.lua [seconds])
local sql = require "paygate.sql"
local redis = require "paygate.redis"
local paygate = require "paygate"
local servers = require "spec.support.servers"

local SECS = tonumber(arg and arg[1] or os.getenv("BENCH_SECS") or "3")
local CONC = 100
local tmp = servers.mktemp()

-- Runs op(worker, i) from CONC coroutines for SECS seconds; returns ops/s.
local function drive(op)
  local stop = paygate.now() + SECS
  local t0 = paygate.now()
  local count = 0
  local tasks = {}
  for w = 1, CONC do
    tasks[w] = paygate.spawn(function()
      local i = 0
      while paygate.now() < stop do
        i = i + 1
        assert(op(w, i))
        count = count + 1
      end
    end)
  end
  for w = 1, CONC do
    tasks[w]:wait()
  end
  return count / (paygate.now() - t0)
end

local function inserts(db)
  assert(db:exec_script("DROP TABLE IF EXISTS bench;"
    .. " CREATE TABLE bench (w INTEGER, i INTEGER, v TEXT)"))
  return drive(function(w, i)
    return db:exec("INSERT INTO bench (w, i, v) VALUES ($1, $2, $3)",
                   { w, i, "payload" })
  end)
end

local results = {}
local function report(name, v)
  results[name] = v
  print(string.format("%-44s %12.0f /s", name, v))
end

print(string.format("storage bench: %d coroutines, %g s per run", CONC, SECS))

local db = assert(sql.open("sqlite:" .. tmp .. "/group.db"))
report("sqlite insert, group commit", inserts(db))
local st = db:stats()
print(string.format("  (%d commits for %d writes: %.1f writes per fsync;"
                    .. " a commit %.2f ms on average, %.2f ms at most)",
                    st.commits, st.writes, st.writes / st.commits,
                    st.commit_seconds / st.commits * 1e3,
                    st.commit_seconds_max * 1e3))
db:close()

db = assert(sql.open("sqlite:" .. tmp .. "/single.db", { batch_max = 1 }))
report("sqlite insert, one commit per write", inserts(db))
db:close()

if servers.have_postgres() then
  local srv = servers.postgres()
  db = assert(sql.open(srv.url .. "?pool=8"))
  report("postgres insert (pool 8, synchronous_commit)", inserts(db))
  report("postgres transaction of 2 inserts (pool 8)", drive(function(w, i)
    return db:transaction(function(tx)
      assert(tx:exec("INSERT INTO bench (w, i, v) VALUES ($1, $2, $3)",
                     { w, i, "a" }))
      return tx:exec("INSERT INTO bench (w, i, v) VALUES ($1, $2, $3)",
                     { w, -i, "b" })
    end)
  end))
  db:close()
end

if servers.have_redis() then
  local srv = servers.redis()
  local c = assert(redis.connect(srv.url))
  report("redis SET via paygate.redis", drive(function(w, i)
    return c:call("SET", "key:" .. w, i)
  end))
  c:close()
  local out = servers.read_cmd("redis-benchmark -h 127.0.0.1 -p " .. srv.port
    .. " -t set -c " .. CONC .. " -n 200000 -q 2>/dev/null")
  local rb = tonumber(out:match("SET: ([%d.]+)"))
  if rb then
    report("redis SET via redis-benchmark -c " .. CONC, rb)
  end
end

print()
local g, s = results["sqlite insert, group commit"],
             results["sqlite insert, one commit per write"]
print(string.format("group commit vs one commit per write: %.1fx (target >= 10x)",
                    g / s))
local p = results["postgres insert (pool 8, synchronous_commit)"]
if p then
  print(string.format("sqlite group commit vs postgres:      %.1fx", g / p))
end
local r, rb = results["redis SET via paygate.redis"],
              results["redis SET via redis-benchmark -c " .. CONC]
if r and rb then
  print(string.format("paygate.redis vs redis-benchmark:     %.2fx (target >= 0.5x)",
                      r / rb))
end

servers.stop_all()
servers.sh("rm -rf " .. tmp)
