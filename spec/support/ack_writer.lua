-- Child process for the kill -9 durability spec:
--   paygate exec spec/support/ack_writer.lua URL
-- Streams inserts from 20 coroutines and prints each id on stdout once
-- db:exec acknowledged it (unbuffered), until it is killed.
local sql = require "paygate.sql"
local paygate = require "paygate"

local url = arg[1]
io.stdout:setvbuf("no")
local db = assert(sql.open(url))
assert(db:exec_script("CREATE TABLE IF NOT EXISTS acks (id TEXT PRIMARY KEY)"))
local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9))
io.stdout:write("ready\n")
local tasks = {}
for w = 1, 20 do
  tasks[w] = paygate.spawn(function()
    for i = 1, 1e9 do
      local id = run .. "-" .. w .. "-" .. i
      local ok, err = db:exec("INSERT INTO acks (id) VALUES ($1)", { id })
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
