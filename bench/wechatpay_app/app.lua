-- bench/wechatpay_app: the paygate notification receiver of bench/wechatpay:
-- POST /notify -> wx:parse_notification (verify, decrypt, parse) -> 204.
-- The config (--config) says whether the replay check is on:
--   return { bench = { replay = true }, shared = { paygate = "64m" } }
-- or, with { bench = { verify_only = true } }, the route only verifies the
-- signature and answers 204 (the ceiling of any receiver here).
package.path = "bench/?.lua;" .. package.path
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local B = require "wechatpay"

local wx = assert(wechatpay.client(B.client_conf()))
local conf = paygate.config.bench or {}
local opts = not conf.replay and { replay = false } or nil

if conf.verify_only then
  -- the issue's ceiling: the signature verified (the platform public key,
  -- the same headers and body), nothing decrypted or parsed
  local crypto = require "paygate.crypto"
  local verify = require "paygate.wechatpay.verify"
  local f = assert(io.open(B.client_conf().public_key, "rb"))
  local pub = assert(crypto.public_key(f:read("*a")))
  f:close()
  paygate.route("POST", "/notify", function(req)
    local h = req.headers
    local msg = verify.message(h["wechatpay-timestamp"] or "",
                               h["wechatpay-nonce"] or "", req.body)
    if not crypto.verify_base64(pub, msg, h["wechatpay-signature"] or "")
    then
      return 401, { code = "FAIL", message = "bad_signature" }
    end
    return 204
  end)
  return
end

paygate.route("POST", "/notify", function(req)
  local event, err = wx:parse_notification(req, opts)
  if not event then return 401, { code = "FAIL", message = err.kind } end
  return wechatpay.notify_ack()
end)
