-- Child process for the kill -9 durability specs:
--   paygate exec spec/support/ack_writer.lua URL [atomic]
-- 20 coroutines stream writes and print each one's id on stdout once it
-- was acknowledged (unbuffered, id and newline in one write()), until
-- killed. Only complete lines are acknowledgements (servers.acked_ids):
-- the kill may cut the last one short. A write is one db:exec
-- insert, or with `atomic` one db:atomic job of three statements (two
-- inserts and a counter update guarded by expect = 1).
local sql = require "paygate.sql"
local paygate = require "paygate"

local url, atomic = arg[1], arg[2] == "atomic"
io.stdout:setvbuf("no")
local db = assert(sql.open(url))
assert(db:exec_script("CREATE TABLE IF NOT EXISTS acks (id TEXT PRIMARY KEY)"))
if atomic then
  assert(db:exec_script([[
CREATE TABLE IF NOT EXISTS acks_b (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS counters (w INTEGER PRIMARY KEY, n INTEGER NOT NULL)]]))
  for w = 1, 20 do
    local ins = db.engine == "sqlite"
      and "INSERT OR IGNORE INTO counters (w, n) VALUES ($1, 0)"
      or "INSERT INTO counters (w, n) VALUES ($1, 0) ON CONFLICT DO NOTHING"
    assert(db:exec(ins, { w }))
  end
end

local function write(w, id)
  if not atomic then
    return db:exec("INSERT INTO acks (id) VALUES ($1)", { id })
  end
  return db:atomic({
    { "INSERT INTO acks (id) VALUES ($1)", { id }, expect = 1 },
    { "INSERT INTO acks_b (id) VALUES ($1)", { id }, expect = 1 },
    { "UPDATE counters SET n = n + 1 WHERE w = $1", { w }, expect = 1 },
  })
end

local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9))
io.stdout:write("ready\n")
local tasks = {}
for w = 1, 20 do
  tasks[w] = paygate.spawn(function()
    for i = 1, 1e9 do
      local id = run .. "-" .. w .. "-" .. i
      local ok, err = write(w, id)
      if ok then
        io.stdout:write(id .. "\n")
      else
        io.stderr:write("write failed: ", tostring(err), "\n")
      end
    end
  end)
end
for w = 1, 20 do
  tasks[w]:wait()
end
