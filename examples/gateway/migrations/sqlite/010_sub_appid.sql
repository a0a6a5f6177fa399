-- A service provider's payment made under its sub-merchant's own appid
-- (the sub-merchant's mini program or official account): sub_appid, sent
-- to WeChat with the prepay, the JSAPI payer then being that appid's
-- sub_openid and the pay parameters signed for it. NULL: under the
-- provider's sp_appid (every payment before this). On the payment, the
-- current one; on each attempt, the one its order at WeChat was made
-- under (a resumed create may correct it).
ALTER TABLE gw_payments ADD COLUMN sub_appid TEXT;
ALTER TABLE gw_attempts ADD COLUMN sub_appid TEXT;
