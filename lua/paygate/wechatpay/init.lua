-- paygate.wechatpay: the WeChat Pay API v3 client.
--
--   local wechatpay = require "paygate.wechatpay"
--   local wx, err = wechatpay.client(conf)      -- see docs/wechatpay.md
--   local res, err = wx:request("GET", "/v3/certificates")
--   local event, err = wx:parse_notification(req)
--   return wechatpay.notify_ack()               -- 204, ""
local config = require "paygate.wechatpay.config"
local api = require "paygate.wechatpay.api"

local _M = {}

local methods = {}
for name, fn in pairs(api) do methods[name] = fn end
local client_mt = { __index = methods }
_M.methods = methods

--- syntax: wx, err = wechatpay.client(conf)
-- returns: a client, or nil, err (kind invalid_config, err.key names the
-- configuration key at fault).
function _M.client(conf)
  local cfg, err = config.check(conf)
  if not cfg then return nil, err end
  return setmetatable({ conf = cfg }, client_mt)
end

--- syntax: return wechatpay.notify_ack()
-- returns: 204, "" — what WeChat Pay counts as a received notification.
function _M.notify_ack() return 204, "" end

--- syntax: return wechatpay.notify_fail(message)
-- returns: 500, { code = "FAIL", message = message }: WeChat Pay retries.
function _M.notify_fail(message)
  return 500, { code = "FAIL", message = tostring(message or "failed") }
end

return _M
