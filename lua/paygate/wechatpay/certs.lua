-- paygate.wechatpay.certs (work in progress)
local _M = {}
return _M
