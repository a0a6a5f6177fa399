-- bench/wechatpay_app: the paygate notification receiver of bench/wechatpay:
-- POST /notify -> wx:parse_notification (verify, decrypt, parse) -> 204.
-- The config (--config) says whether the replay check is on:
--   return { bench = { replay = true }, shared = { paygate = "64m" } }
-- or, with { bench = { verify_only = true } }, the route only verifies the
-- signature and answers 204 (the ceiling of any receiver here); with
-- { bench = { raw_steps = true } } it verifies, decodes the body, decrypts
-- the resource and decodes it, with none of parse_notification's checks
-- (what the work itself costs here: the floor under any client's parse).
package.path = "bench/?.lua;" .. package.path
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local B = require "wechatpay"

local wx = assert(wechatpay.client(B.client_conf()))
local conf = paygate.config.bench or {}
local opts = not conf.replay and { replay = false } or nil

if conf.verify_only or conf.raw_steps then
  -- the issue's ceiling: the signature verified (the platform public key,
  -- the same headers and body), nothing decrypted or parsed; or, raw
  -- steps, that and the bare decode, decrypt and decode after it
  local crypto = require "paygate.crypto"
  local json = require "paygate.json"
  local verify = require "paygate.wechatpay.verify"
  local f = assert(io.open(B.client_conf().public_key, "rb"))
  local pub = assert(crypto.public_key(f:read("*a")))
  f:close()
  local raw, key = conf.raw_steps, B.APIV3
  paygate.route("POST", "/notify", function(req)
    local h, body = req.headers, req.body
    local msg = verify.message(h["wechatpay-timestamp"] or "",
                               h["wechatpay-nonce"] or "", body)
    if not crypto.verify_base64(pub, msg, h["wechatpay-signature"] or "")
    then
      return 401, { code = "FAIL", message = "bad_signature" }
    end
    if raw then
      -- the bare steps on a body known to be well formed: no checks
      local r = json.decode(body).resource
      local plain = crypto.aead_decrypt(r.algorithm, key, r.nonce,
        r.associated_data, crypto.base64_decode(r.ciphertext))
      if not (plain and json.decode(plain).out_trade_no) then
        return 400, { code = "FAIL", message = "raw steps failed" }
      end
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
