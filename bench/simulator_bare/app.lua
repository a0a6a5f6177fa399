-- bench/simulator_bare: the least a signed-answer server does for one
-- query, for bench/simulator's breakdown: the request's Authorization
-- parsed and its signature verified with the merchant's public key, then
-- a fixed answer body (one the simulator gave) signed and sent with the
-- Wechatpay-* headers. No state, no faults, no request log.
--   config: { bench = { merchant = "DIR/merchant.lua", body = "DIR/body.txt" } }
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local sign = require "paygate.wechatpay.sign"

local conf = paygate.config_copy().bench
local m = assert(loadfile(conf.merchant))()
local function read(p)
  local f = assert(io.open(p, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end
local pub = assert(crypto.public_key(read(m.public_key)))
local key = assert(crypto.private_key(read(m.private_key)))
local body = read(conf.body)
local SERIAL = m.serial

paygate.route("GET", "/v3/pay/transactions/out-trade-no/:no", function(req)
  local a = sign.parse_authorization(req:header("authorization") or "")
  if not a then return 401, { code = "SIGN_ERROR" } end
  local target = req.target   -- signed as sent
  local msg = sign.request_message("GET", target, a.timestamp, a.nonce_str, "")
  if not crypto.verify_base64(pub, msg, a.signature) then
    return 401, { code = "SIGN_ERROR" }
  end
  local ts, nonce = tostring(os.time()), crypto.random_nonce(32)
  local sig = assert(crypto.sign_base64(key, ts .. "\n" .. nonce .. "\n"
                                        .. body .. "\n"))
  return 200, body, {
    ["Content-Type"] = "application/json", ["Wechatpay-Timestamp"] = ts,
    ["Wechatpay-Nonce"] = nonce, ["Wechatpay-Signature"] = sig,
    ["Wechatpay-Serial"] = SERIAL, ["Request-ID"] = nonce }
end)
