-- Child process for the migration race spec:
--   paygate exec spec/support/sqlite_opener.lua PREFIX START_AT NAME...
-- Opens (and closes) sqlite:PREFIX..NAME for each NAME in turn, the k-th
-- at START_AT + k * 25 ms by the wall clock, so that other processes
-- doing the same open each file at the same moment. Prints "error: ..."
-- for each failed open, then "opened=N".
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"

local prefix, start_at = arg[1], tonumber(arg[2])
io.stdout:setvbuf("no")

local STEP = 0.025

local opened = 0
for i = 3, #arg do
  local at = start_at + (i - 3) * STEP
  while core.time() < at do
    paygate.sleep(0.001)
  end
  local db, err = sql.open("sqlite:" .. prefix .. arg[i])
  if db then
    opened = opened + 1
    db:close()
  else
    io.stdout:write("error: " .. tostring(err) .. "\n")
  end
end
io.stdout:write("opened=" .. opened .. "\n")
