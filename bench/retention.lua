-- bench/retention.lua: what pruning costs the writes beside it. A SQLite
-- table holds N rows past their policy (200-byte rows, indexed time
-- column); one coroutine writes single durable rows every 2 ms (the
-- notification path's shape) while retention prunes the table, first in
-- batches of 500 with a 50 ms pause (the defaults), then as one DELETE.
-- Prints the pass and the writes' latency during it.
-- Run: paygate exec bench/retention.lua [N]   (default 100000)
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local retention = require "paygate.retention"

local servers = require "spec.support.servers"

local N = tonumber((...)) or 100000
local tmp = servers.mktemp()
local NOW = core.time()

local function setup(path)
  os.remove(path); os.remove(path .. "-wal"); os.remove(path .. "-shm")
  local db = assert(sql.open("sqlite:" .. path))
  assert(db:exec_script([[CREATE TABLE events (id INTEGER PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL, payload TEXT NOT NULL);
    CREATE INDEX events_at ON events (at);
    CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)]]))
  local pad = string.rep("x", 200)
  local i = 0
  while i < N do
    assert(db:transaction(function(tx)
      for _ = 1, 5000 do
        i = i + 1
        assert(tx:exec("INSERT INTO events (at, payload) VALUES ($1, $2)",
                       { NOW - 2 * 86400 - i, pad }))
      end
    end))
  end
  return db
end

local function writer(db, stop)
  local lat = {}
  while not stop.flag do
    local t0 = core.mono()
    assert(db:exec("INSERT INTO notes (body) VALUES ('n')"))
    lat[#lat + 1] = core.mono() - t0
    core.sleep(0.002)
  end
  table.sort(lat)
  local function q(p)
    return lat[math.max(1, math.ceil(p * #lat))] * 1000
  end
  return string.format("writes=%d p50=%.1fms p99=%.1fms max=%.1fms", #lat,
                       q(0.5), q(0.99), q(1))
end

local function run(label, batch)
  local db = setup(tmp .. "/p.db")
  local stop = {}
  local w = paygate.spawn(writer, db, stop)
  local t0 = core.mono()
  local r = retention.new(db, { { table = "events", column = "at",
    max_age = 86400 } }, { batch = batch, pause = 0.05 })
  local s = assert(r:run_once())
  local el = core.mono() - t0
  stop.flag = true
  print(string.format("%-22s pruned=%d statements=%d pass=%.2fs  %s",
        label, s.pruned, s.statements, el, w:wait()))
  db:close()
end

run("batch 500, pause 50ms", 500)
run("one DELETE", N * 2)
servers.sh("rm -rf " .. tmp)
