-- paygate.wechatpay.sign: the request signature and the Authorization
-- header. Pure functions (no I/O), the one implementation the client, the
-- simulator and the CLI share.
--
-- The signed message is five lines, each ending in "\n":
--   METHOD \n URL \n TIMESTAMP \n NONCE \n BODY \n
-- URL is the path plus "?query" exactly as sent (no scheme, no host), BODY
-- the exact body bytes sent ("" without a body). The header is
--   SCHEMA mchid="..",nonce_str="..",timestamp="..",serial_no="..",signature=".."
-- with SCHEMA "WECHATPAY2-SHA256-RSA2048" (or "WECHATPAY2-SM2-WITH-SM3").
local crypto = require "paygate.crypto"

local tostring, type = tostring, type

local _M = {}

_M.RSA = "WECHATPAY2-SHA256-RSA2048"
_M.SM2 = "WECHATPAY2-SM2-WITH-SM3"

--- syntax: msg = sign.request_message(method, url, ts, nonce, body)
function _M.request_message(method, url, ts, nonce, body)
  return method .. "\n" .. url .. "\n" .. tostring(ts) .. "\n" .. nonce
         .. "\n" .. (body or "") .. "\n"
end

--- syntax: h = sign.authorization(schema, mchid, nonce, ts, serial, sig)
function _M.authorization(schema, mchid, nonce, ts, serial, signature)
  return schema .. ' mchid="' .. mchid .. '",nonce_str="' .. nonce
         .. '",timestamp="' .. tostring(ts) .. '",serial_no="' .. serial
         .. '",signature="' .. signature .. '"'
end

--- syntax: header, err = sign.sign_request(signer, method, url, body[,
--                                           ts[, nonce]])
-- signer: { key = private key handle, schema = SCHEMA, mchid = "...",
--           serial = merchant certificate serial }
-- ts defaults to now, nonce to 32 random [0-9A-Za-z].
-- returns: the Authorization value, or nil, err (crypto's error).
function _M.sign_request(signer, method, url, body, ts, nonce)
  ts = ts or os.time()
  nonce = nonce or crypto.random_nonce(32)
  local sig, err = crypto.sign_base64(signer.key,
    _M.request_message(method, url, ts, nonce, body), signer.schema)
  if not sig then return nil, err end
  return _M.authorization(signer.schema, signer.mchid, nonce, ts,
                          signer.serial, sig)
end

--- syntax: t = sign.parse_authorization(value)
-- returns: { schema, mchid, nonce_str, timestamp, serial_no, signature }
-- (parameters in any order), or nil and a reason (an unknown, repeated
-- or missing parameter, a trailing ','). For servers and tools.
local AUTH_PARAMS = { mchid = true, nonce_str = true, timestamp = true,
                      serial_no = true, signature = true }
function _M.parse_authorization(value)
  if type(value) ~= "string" or #value > 4096 then
    return nil, "not a string of at most 4096 bytes"
  end
  local schema, rest = value:match("^(%S+) (.*)$")
  if not schema then return nil, "no schema" end
  local t = { schema = schema }
  local pos = 1
  while pos <= #rest do
    local k, v, nxt = rest:match('^([%w_]+)="([^"]*)"()', pos)
    if not k then return nil, "bad parameter at " .. pos end
    if not AUTH_PARAMS[k] then return nil, "unknown parameter " .. k end
    if t[k] ~= nil then return nil, "repeated parameter " .. k end
    t[k] = v
    pos = nxt
    if rest:sub(pos, pos) == "," then
      pos = pos + 1
      if pos > #rest then return nil, "trailing ','" end
    elseif pos <= #rest then return nil, "expected ',' at " .. pos end
  end
  for _, k in ipairs({ "mchid", "nonce_str", "timestamp", "serial_no",
                       "signature" }) do
    if not t[k] then return nil, "missing " .. k end
  end
  return t
end

--- syntax: msg = sign.pay_message(lines)
-- The client-side payment signing string: each element of lines followed
-- by "\n" (JSAPI: appId, timeStamp, nonceStr, package; App: appid,
-- timestamp, noncestr, prepayid). The one builder: the client signs it,
-- the simulator verifies it.
function _M.pay_message(lines)
  return table.concat(lines, "\n") .. "\n"
end

--- syntax: sig = sign.pay_sign(signer, lines)
-- The client-side payment signature: pay_message(lines) signed with the
-- merchant key, base64.
function _M.pay_sign(signer, lines)
  return crypto.sign_base64(signer.key, _M.pay_message(lines),
                            signer.schema)
end

return _M
