-- paygate.wechatpay.payparams: the parameters a front end passes to WeChat
-- to open the payment sheet after a prepay, signed by the merchant's key.
--
-- JSAPI (Official Account pages) and mini-programs sign four lines, each
-- ending in "\n": appId, timeStamp, nonceStr, package, where package is
-- "prepay_id=" .. prepay_id. The App SDK signs appid, timestamp, noncestr
-- and the bare prepay_id (no "prepay_id=" prefix), and is handed the
-- constant package "Sign=WXPay". The timestamp is Unix seconds as a string,
-- the nonce 32 random characters, the signature SHA256withRSA (base64) with
-- the merchant's private key -- or SM2 with SM3 for an SM2 merchant key (the
-- signType WeChat expects from SM merchants is not documented publicly; we
-- send "SM2", an assumption).

local core = require "paygate.core"
local crypto = require "paygate.crypto"
local sign = require "paygate.wechatpay.sign"  -- the one pay-sign builder

local type, tostring, floor = type, tostring, math.floor

local _M = {}

local function check(fn, key, appid, prepay_id, o)
  if type(key) ~= "userdata" then
    error(fn .. ": key must be a private key handle", 3)
  end
  if o ~= nil and type(o) ~= "table" then
    error(fn .. ": opts must be a table", 3)
  end
  return type(appid) == "string" and appid ~= "" and #appid <= 32
         and not appid:find("[%c%s]")
         and type(prepay_id) == "string" and prepay_id ~= ""
         and #prepay_id <= 64 and not prepay_id:find("[%c%s]")
end

local function stamp(o)
  local ts = o and o.timestamp
  if ts == nil then
    ts = tostring(floor(core.time()))
  else
    ts = tostring(ts)
  end
  return ts, (o and o.nonce) or crypto.random_nonce(32)
end

--- syntax: t, err = payparams.jsapi(key, appid, prepay_id[, opts])
-- opts: timestamp (seconds), nonce (fixed values, for known-answer tests)
-- returns: { appId, timeStamp, nonceStr, package, signType, paySign }, or
-- nil, err (invalid_params when appid or prepay_id is missing/mistyped).
function _M.jsapi(key, appid, prepay_id, o)
  if not check("jsapi_pay_params", key, appid, prepay_id, o) then
    return nil, _M.bad_args("jsapi_pay_params", appid, prepay_id)
  end
  local ts, nonce = stamp(o)
  local package = "prepay_id=" .. prepay_id
  local sig, err = sign.pay_sign({ key = key },
                                 { appid, ts, nonce, package })
  if not sig then return nil, err end
  return {
    appId = appid, timeStamp = ts, nonceStr = nonce, package = package,
    signType = key:type() == "SM2" and "SM2" or "RSA", paySign = sig,
  }
end

--- syntax: t, err = payparams.app(key, mchid, appid, prepay_id[, opts])
-- returns: { appid, partnerid, prepayid, package = "Sign=WXPay", noncestr,
-- timestamp, sign }, or nil, err.
function _M.app(key, mchid, appid, prepay_id, o)
  if not check("app_pay_params", key, appid, prepay_id, o) then
    return nil, _M.bad_args("app_pay_params", appid, prepay_id)
  end
  local ts, nonce = stamp(o)
  local sig, err = sign.pay_sign({ key = key },
                                 { appid, ts, nonce, prepay_id })
  if not sig then return nil, err end
  return {
    appid = appid, partnerid = mchid, prepayid = prepay_id,
    package = "Sign=WXPay", noncestr = nonce, timestamp = ts, sign = sig,
  }
end

function _M.bad_args(fn, appid, prepay_id)
  local field = "appid"
  if type(appid) == "string" and appid ~= "" and #appid <= 32
     and not appid:find("[%c%s]") then
    field = "prepay_id"
  end
  -- (not `field == "appid" and appid or prepay_id`: a nil appid would
  -- be judged by the prepay_id's value)
  local v = prepay_id
  if field == "appid" then v = appid end
  local why = v == nil and (field == "appid" and "is required (the appid"
                .. " that ordered)" or "is required")
              or type(v) ~= "string" and "must be a string"
              or v == "" and "must not be empty"
              or "must be at most " .. (field == "appid" and 32 or 64)
                 .. " characters without spaces or control characters"
  return core.error("invalid_params", fn .. ": " .. field .. ": " .. why,
                    { field = field })
end

return _M
