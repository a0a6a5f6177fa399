-- paygate.wechatpay.errors (work in progress)
local _M = {}
return _M
