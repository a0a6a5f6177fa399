-- bench/wechatpay_app: the paygate notification receiver of bench/wechatpay:
-- POST /notify -> wx:parse_notification (verify, decrypt, parse) -> 204.
-- The config (--config) says whether the replay check is on:
--   return { bench = { replay = true }, shared = { paygate = "64m" } }
package.path = "bench/?.lua;" .. package.path
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local B = require "wechatpay"

local wx = assert(wechatpay.client(B.client_conf()))
local replay = paygate.config.bench and paygate.config.bench.replay
local opts = not replay and { replay = false } or nil

paygate.route("POST", "/notify", function(req)
  local event, err = wx:parse_notification(req, opts)
  if not event then return 401, { code = "FAIL", message = err.kind } end
  return wechatpay.notify_ack()
end)
