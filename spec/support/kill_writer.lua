-- spec/support/kill_writer.lua: the kill -9 half of the durability
-- specs. A writer script (run with `paygate exec`) prints "ready", then
-- one id per write it saw acknowledged; run_and_kill kills it with
-- SIGKILL at a random moment after its first acknowledgements and
-- returns those ids.
local paygate = require "paygate"
local servers = require "spec.support.servers"

local _M = {}

local function lines(path)
  local t = {}
  local f = io.open(path)
  if f then
    for l in f:lines() do
      t[#t + 1] = l
    end
    f:close()
  end
  return t
end

local function alive(pid)
  return servers.sh("kill -0 " .. pid .. " 2>/dev/null")
end

-- bin: the paygate binary; writer: the script; url: its store; out: the
-- file its acknowledgements go to (stderr to out .. ".err").
function _M.run_and_kill(bin, writer, url, out)
  local pid = servers.read_cmd("sh -c '" .. bin .. " exec " .. writer
    .. " " .. url .. " >" .. out .. " 2>" .. out .. ".err & echo $!'")
    :match("%d+")
  assert(pid, "writer did not start")
  servers.wait_for(function() return #lines(out) > 5 end, 20,
                   "the writer's first acknowledgements")
  paygate.sleep(math.random() * 0.3)
  servers.sh("kill -9 " .. pid)
  servers.wait_for(function() return not alive(pid) end, 10, "writer exit")
  local acked = {}
  for _, l in ipairs(lines(out)) do
    if l ~= "ready" then
      acked[#acked + 1] = l
    end
  end
  return acked
end

return _M
