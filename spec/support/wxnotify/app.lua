-- spec/support/wxnotify/app.lua: a notification receiver for specs:
-- POST /notify answers 204 after wx:parse_notification, or 401 with the
-- error kind; GET /call makes a call to WeChat (base_url); every answer
-- names the worker (X-Pid).
local paygate = require "paygate"
local core = require "paygate.core"
local wechatpay = require "paygate.wechatpay"

local conf = paygate.config_copy().wechatpay
local wx = assert(wechatpay.client(conf))

paygate.route("POST", "/notify", function(req)
  local ev, err = wx:parse_notification(req)
  local h = { ["X-Pid"] = tostring(core.pid()) }
  if not ev then return 401, { code = "FAIL", message = err.kind }, h end
  return 204, "", h
end)

-- GET /call?path=/v3/...: one wx:request, answered with its outcome
paygate.route("GET", "/call", function(req)
  local res, err = wx:request("GET", req:query().path)
  local h = { ["X-Pid"] = tostring(core.pid()) }
  if not res then return 502, { kind = err.kind, message = err.message }, h end
  return 200, { status = res.status }, h
end)
