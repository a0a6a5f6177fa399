-- spec/support/server.lua: `paygate run` on free loopback ports, from the
-- test kit users get (paygate.testing.server), started with the binary the
-- specs are told to test (PAYGATE_BIN, set in spec/helpers.lua).
local server = require "paygate.testing.server"

local _M = setmetatable({}, { __index = server })

--- server = start{ app = dir | source = "lua code", workers = 1,
---                 args = { ... }, config = "lua source", scheme = "http" }
function _M.start(o)
  o.bin = o.bin or PAYGATE_BIN
  return server.start(o)
end

return _M
