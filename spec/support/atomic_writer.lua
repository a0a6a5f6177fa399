-- Child process for the db:atomic kill -9 spec:
--   paygate exec spec/support/atomic_writer.lua URL
-- 20 coroutines stream db:atomic jobs of three statements (two inserts
-- and a counter update guarded by expect = 1) and print each job's id on
-- stdout once db:atomic acknowledged it (unbuffered), until killed.
local sql = require "paygate.sql"
local paygate = require "paygate"

local url = arg[1]
io.stdout:setvbuf("no")
local db = assert(sql.open(url))
assert(db:exec_script([[
CREATE TABLE IF NOT EXISTS acks (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS acks_b (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS counters (w INTEGER PRIMARY KEY, n INTEGER NOT NULL)]]))
for w = 1, 20 do
  local ins = db.engine == "sqlite"
    and "INSERT OR IGNORE INTO counters (w, n) VALUES ($1, 0)"
    or "INSERT INTO counters (w, n) VALUES ($1, 0) ON CONFLICT DO NOTHING"
  assert(db:exec(ins, { w }))
end
local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9))
io.stdout:write("ready\n")
local tasks = {}
for w = 1, 20 do
  tasks[w] = paygate.spawn(function()
    for i = 1, 1e9 do
      local id = run .. "-" .. w .. "-" .. i
      local ok, err = db:atomic({
        { "INSERT INTO acks (id) VALUES ($1)", { id }, expect = 1 },
        { "INSERT INTO acks_b (id) VALUES ($1)", { id }, expect = 1 },
        { "UPDATE counters SET n = n + 1 WHERE w = $1", { w }, expect = 1 },
      })
      if ok then
        io.stdout:write(id, "\n")
      else
        io.stderr:write("write failed: ", tostring(err), "\n")
      end
    end
  end)
end
for w = 1, 20 do
  tasks[w]:wait()
end
