-- paygate.wechatpay.sign (work in progress)
local _M = {}
return _M
