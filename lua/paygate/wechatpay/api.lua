-- paygate.wechatpay.api: the WeChat Pay v3 calls (prepay, query, close,
-- refund, bills, pay-sign parameters, partner paths).
--
-- Placeholder: the "wxapi" work fills this module. Every function it
-- returns is mixed into the client's methods (see init.lua), so each is
-- called as wx:name(...) and reaches WeChat through wx:request().
return {}
