-- paygate.wechatpay.notify (work in progress)
local _M = {}
return _M
