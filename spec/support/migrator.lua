-- Child process for the migration race spec:
--   paygate exec spec/support/migrator.lua URL DIR START_AT
-- Waits until the wall clock reaches START_AT (so that every migrator
-- starts together), opens URL (maybe a SQLite file nobody created yet),
-- prints "running" and runs migrate.run(db, DIR), then prints
-- "applied=V1,V2,..." (the versions this process applied, maybe none) or
-- "error: ...".
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"

local url, dir, start_at = arg[1], arg[2], tonumber(arg[3])
io.stdout:setvbuf("no")

while core.time() < start_at do
  paygate.sleep(0.005)
end

local db, err = sql.open(url)
if not db then
  io.stdout:write("error: open: " .. tostring(err) .. "\n")
  return
end
io.stdout:write("running\n")
local applied, merr = migrate.run(db, dir)
if not applied then
  io.stdout:write("error: run: " .. tostring(merr) .. "\n")
else
  local v = {}
  for i, m in ipairs(applied) do
    v[i] = tostring(m.version)
  end
  io.stdout:write("applied=" .. table.concat(v, ",") .. "\n")
end
db:close()
