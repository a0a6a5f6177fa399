-- Child process for the writer-turns spec:
--   paygate exec spec/support/flat_writer.lua PATH START_AT SECONDS BUSY_MS
-- Waits until the wall clock reaches START_AT (so that the writers start
-- together), then writes into the SQLite file PATH as fast as 32
-- coroutines can for SECONDS, with busy_timeout BUSY_MS, and prints one
-- line: "writes=N failed=N max_wait=S first_error=..." (the longest one
-- write waited, whether it succeeded or failed).
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"

local path, start_at = arg[1], tonumber(arg[2])
local seconds, busy_ms = tonumber(arg[3]), tonumber(arg[4])
io.stdout:setvbuf("no")

local db, err = sql.open("sqlite:" .. path, { busy_timeout = busy_ms })
if not db then
  io.stdout:write("error: open: " .. tostring(err) .. "\n")
  return
end
while core.time() < start_at do
  paygate.sleep(0.005)
end
local stop = core.mono() + seconds
local writes, failed, max_wait, first = 0, 0, 0, ""
local tasks = {}
for i = 1, 32 do
  tasks[i] = paygate.spawn(function()
    while core.mono() < stop do
      local t0 = core.mono()
      local ok, werr = db:exec("INSERT INTO t (v) VALUES ($1)",
                               { string.rep("x", 200) })
      local w = core.mono() - t0
      if w > max_wait then max_wait = w end
      if ok then
        writes = writes + 1
      else
        failed = failed + 1
        if first == "" then first = tostring(werr) end
      end
    end
  end)
end
for _, t in ipairs(tasks) do t:wait() end
db:close()
io.stdout:write(string.format("writes=%d failed=%d max_wait=%.3f"
  .. " first_error=%s\n", writes, failed, max_wait, first))
