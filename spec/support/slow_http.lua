-- support.slow_http: starts spec/support/slow_http.py (a raw HTTP server
-- answering slowly: modes drip, steady, stall; see its header) on a free
-- loopback port; and spec/support/hostile_http.py (an answer per path,
-- see its header). Stopped by paygate.testing.proc.stop_all().
local servers = require "spec.support.servers"
local proc = require "paygate.testing.proc"

local _M = {}

--- syntax: lines = slow_http.lines(path) -- a file's lines ({} if none)
function _M.lines(path)
  local f = io.open(path)
  if not f then return {} end
  local t = {}
  for l in f:lines() do t[#t + 1] = l end
  f:close()
  return t
end

--- syntax: port, log = slow_http.start(dir, mode)
-- log: its file in dir, a line "start" per request it took
function _M.start(dir, mode)
  local port = servers.free_port()
  local log = dir .. "/slow_http" .. port .. ".log"
  proc.spawn({ "python3", "spec/support/slow_http.py", tostring(port),
               mode, log })
  proc.wait_until(function() return _M.lines(log)[1] == "ready" end, 10,
                  "the slow HTTP server")
  return port, log
end

--- syntax: port, log, p = slow_http.hostile(dir)
-- log: its file in dir, a line per request, the request's target
function _M.hostile(dir)
  local port = servers.free_port()
  local log = dir .. "/hostile.log"
  local p = proc.spawn({ "python3", "spec/support/hostile_http.py",
                         tostring(port), log })
  proc.wait_until(function() return _M.lines(log)[1] == "ready" end, 10,
                  "the hostile HTTP server")
  return port, log, p
end

--- syntax: n = slow_http.count(log, line) -- how many of log's lines are line
function _M.count(log, line)
  local k = 0
  for _, l in ipairs(_M.lines(log)) do
    if l == line then k = k + 1 end
  end
  return k
end

return _M
