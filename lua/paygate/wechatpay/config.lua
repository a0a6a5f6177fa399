-- paygate.wechatpay.config (work in progress)
local _M = {}
return _M
