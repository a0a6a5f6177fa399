-- paygate.wechatpay.verify (work in progress)
local _M = {}
return _M
