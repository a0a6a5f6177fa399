-- Child process for the lease race spec:
--   paygate exec spec/support/lease_racer.lua URL START_AT COROUTINES HOLDS
-- Waits until the wall clock reaches START_AT (so that every racer starts
-- together), then COROUTINES coroutines race for the lease "race" until
-- each has held it HOLDS times (or 20 s passed). While holding it, a
-- holder increments a counter kept in the store itself and checks that it
-- is the only one inside (the counter reads 1), stays a moment, then
-- decrements it and releases the lease.
--
-- Before each attempt the racer reseeds math.random the way many
-- libraries do (math.randomseed(os.time())): lease owners must not depend
-- on math.random's state.
--
-- Prints one line: "holds=H overlaps=O errors=E" (then "first error: ...").
local paygate = require "paygate"
local core = require "paygate.core"
local sql = require "paygate.sql"
local redis = require "paygate.redis"
local lease = require "paygate.lease"

local url, start_at = arg[1], tonumber(arg[2])
local ncos, nholds = tonumber(arg[3]), tonumber(arg[4])
io.stdout:setvbuf("no")

local store, enter, leave
if url:match("^redis:") then
  store = assert(redis.connect(url))
  enter = function() return store:call("INCR", "race:inside") end
  leave = function() return store:call("DECR", "race:inside") end
else
  store = assert(sql.open(url))
  local function bump(d)
    local res, err = store:exec("UPDATE race_inside SET n = n + $1"
                                .. " RETURNING n", { d })
    if not res then
      return nil, err
    end
    return res.rows[1].n
  end
  enter = function() return bump(1) end
  leave = function() return bump(-1) end
end

while core.time() < start_at do
  paygate.sleep(0.005)
end

local holds, overlaps, errors, first_err = 0, 0, 0, nil
local deadline = core.mono() + 20

local function note(err)
  errors = errors + 1
  first_err = first_err or tostring(err)
end

local tasks = {}
for c = 1, ncos do
  tasks[c] = paygate.spawn(function()
    local mine = 0
    while mine < nholds and core.mono() < deadline do
      math.randomseed(os.time())
      local l, err = lease.acquire(store, "race", 5)
      if l then
        local n, eerr = enter()
        if not n then
          note(eerr)
        elseif n ~= 1 then
          overlaps = overlaps + 1
        end
        paygate.sleep(0.002)
        local _, lerr = leave()
        if lerr then
          note(lerr)
        end
        local ok, rerr = lease.release(store, l)
        if not ok then
          note(rerr)
        end
        mine = mine + 1
        holds = holds + 1
      elseif err.kind ~= "held" and err.kind ~= "busy" then
        note(err)
        paygate.sleep(0.01)
      else
        paygate.sleep(0.001 + math.random() * 0.003)
      end
    end
  end)
end
for c = 1, ncos do
  tasks[c]:wait()
end
io.stdout:write(string.format("holds=%d overlaps=%d errors=%d\n", holds,
                              overlaps, errors))
if first_err then
  io.stdout:write("first error: " .. first_err .. "\n")
end
store:close()
