-- sim.orders: orders and refunds (being written).
local certificates = require "sim.certificates"

local _M = {}

function _M.init(ctx) _M.ctx = ctx end

function _M.routes(ctx)
  certificates.routes(ctx)
end

function _M.start(ctx) end

return _M
