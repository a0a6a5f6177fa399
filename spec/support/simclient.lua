-- spec/support/simclient.lua: a minimal WeChat Pay v3 client for the
-- simulator's specs, written from the protocol alone on paygate.crypto
-- primitives (not with paygate.wechatpay, nor the simulator's code), so
-- the specs check the simulator against the protocol, not against itself.
--
--   request signature: base64(SHA256withRSA(key,
--     METHOD \n TARGET \n TIMESTAMP \n NONCE \n BODY \n))
--   Authorization: SCHEMA mchid="..",nonce_str="..",timestamp="..",
--                  serial_no="..",signature=".."
--   response signature over TIMESTAMP \n NONCE \n BODY \n, from the
--   Wechatpay-Timestamp, -Nonce, -Signature and -Serial headers.
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local json = require "cjson.safe"
local luassert = require "luassert"

local _M = {}

_M.FIX = "spec/fixtures/wechatpay/"
_M.RSA = "WECHATPAY2-SHA256-RSA2048"
_M.SM2 = "WECHATPAY2-SM2-WITH-SM3"
_M.APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
_M.MCHID = "1234567891"                 -- merchant: A.3 key, A.4 cert
_M.SERIAL = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115"
_M.APPID = "wxd678efh567hg6787"
_M.MCHID2 = "1900007291"               -- merchant: A.1 key, public key
_M.SERIAL2 = "408B07E79B8269FEC3D5D3E6AB8ED163A6A380DB"
_M.APIV3_2 = "0123456789abcdef0123456789ABCDEF"
_M.SUB = "1900000109"                   -- sub-merchant of MCHID
_M.SUB_APPID = "wx8888888888888888"

function _M.read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

function _M.abs(p)
  if p:sub(1, 1) == "/" then return p end
  return io.popen("pwd"):read("*l") .. "/" .. p
end

-- The merchant's certificate: the A.4 fixture (SERIAL on the A.3 key)
-- expired in 2025, and the simulator refuses an expired one. A fresh
-- self-signed certificate with the same serial and key, valid 2 days,
-- made once per run (the SM2 one likewise for the A.10a key and A.10b's
-- serial).
_M.SM2_SERIAL = "54E7F59ED8DF4570CFB14780EA8152D45A675EE6"
local made = {}
local function fresh_cert(key, serial, sm)
  local id = serial .. (sm and ":sm" or "")
  if made[id] then return made[id] end
  local dir = require("support.server").tmpdir()
  local out = dir .. "/merchant_cert.pem"
  local cmd = ("openssl req -x509 -new -key %s -out %s -days 2 -subj "
    .. "/CN=%s -set_serial 0x%s %s >/dev/null 2>&1"):format(_M.abs(key),
    out, _M.MCHID, serial, sm and "-sm3 -sigopt distid:1234567812345678"
    or "")
  local ok = os.execute(cmd)
  assert(ok == 0 or ok == true, "command failed: " .. cmd)
  made[id] = out
  return out
end

--- path = simclient.merchant_cert() -- SERIAL's certificate, valid now
function _M.merchant_cert()
  return fresh_cert(_M.FIX .. "a3_merchant_key.pem", _M.SERIAL)
end

--- path = simclient.sm2_merchant_cert() -- the SM2 merchant's, valid now
function _M.sm2_merchant_cert()
  return fresh_cert(_M.FIX .. "a10a_sm2_key.pem", _M.SM2_SERIAL, true)
end

--- a config text for the simulator: both merchants, MCHID with a
--- sub-merchant; extra (a string of "key = value," lines) goes inside.
function _M.config(state_dir, extra)
  return ([[
return {
  merchants = {
    { mchid = %q, merchant_certificate = %q, apiv3_key = %q,
      appids = { %q }, sub_merchants = { { mchid = %q, appids = { %q } } } },
    { mchid = %q, merchant_public_key = %q, merchant_serial = %q,
      apiv3_key = %q, appids = { %q } },
  },
  state_dir = %q,
  %s
}]]):format(_M.MCHID, _M.merchant_cert(), _M.APIV3,
    _M.APPID, _M.SUB, _M.SUB_APPID, _M.MCHID2, _M.abs(_M.FIX .. "a1_pub.pem"),
    _M.SERIAL2, _M.APIV3_2, _M.APPID, state_dir, extra or "")
end

local Client = {}
Client.__index = Client

--- c = simclient.new{ base = "http://127.0.0.1:P", mchid, serial, key =
---                    private key handle, schema }
function _M.new(o)
  return setmetatable({ base = o.base, mchid = o.mchid or _M.MCHID,
    serial = o.serial or _M.SERIAL, schema = o.schema or _M.RSA,
    key = o.key or assert(crypto.private_key(_M.read(_M.FIX
      .. "a3_merchant_key.pem"))) }, Client)
end

--- the Authorization value for a request (o overrides any part)
function Client:authorization(method, target, body, o)
  o = o or {}
  local ts = o.ts or tostring(os.time())
  local nonce = o.nonce or crypto.random_nonce(32)
  local msg = method .. "\n" .. target .. "\n" .. ts .. "\n" .. nonce .. "\n"
              .. (body or "") .. "\n"
  local sig = assert(crypto.sign_base64(o.key or self.key, msg,
                                        o.alg or self.schema))
  local params = {
    ('mchid="%s"'):format(o.mchid or self.mchid),
    ('nonce_str="%s"'):format(nonce),
    ('timestamp="%s"'):format(ts),
    ('serial_no="%s"'):format(o.serial or self.serial),
    ('signature="%s"'):format(o.signature or sig),
  }
  if o.reorder then
    params = { params[4], params[1], params[5], params[3], params[2] }
  end
  return (o.schema or self.schema) .. " " .. table.concat(params, ",")
end

--- res = c:call(method, target, body (table or string or nil), o)
--- o: ts, nonce, key, serial, schema, mchid, signature, reorder,
---    headers (extra; false removes), tamper (body sent instead of the
---    signed one), timeout. res.json is the decoded body.
function Client:call(method, target, body, o)
  o = o or {}
  if type(body) == "table" then body = json.encode(body) end
  local h = {
    ["Accept"] = "application/json",
    ["User-Agent"] = "simclient-spec/1.0",
    ["Content-Type"] = "application/json",
    ["Authorization"] = self:authorization(method, target, body, o),
  }
  for k, v in pairs(o.headers or {}) do
    if v == false then h[k] = nil else h[k] = v end
  end
  local res, err = paygate.http.request{ method = method,
    url = self.base .. target, body = o.tamper or body, headers = h,
    timeout = o.timeout or 10 }
  assert(res, tostring(err))
  res.json = res.body ~= "" and json.decode(res.body) or nil
  return res
end

--- body = simclient.prepay_body(no[, over]): a direct JSAPI prepay's body
--- for order no (over: keys to set; false removes one)
function _M.prepay_body(no, over)
  local b = { appid = _M.APPID, mchid = _M.MCHID, description = "测试商品",
              out_trade_no = no,
              notify_url = "https://merchant.example/notify",
              amount = { total = 100, currency = "CNY" },
              payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } }
  for k, v in pairs(over or {}) do
    if v == false then b[k] = nil else b[k] = v end
  end
  return b
end

--- res = c:prepay(no[, over[, kind]]): POST /v3/pay/transactions/KIND
function Client:prepay(no, over, kind)
  return self:call("POST", "/v3/pay/transactions/" .. (kind or "jsapi"),
                   _M.prepay_body(no, over))
end

--- res = c:query(no): GET .../out-trade-no/NO?mchid=
function Client:query(no)
  return self:call("GET", "/v3/pay/transactions/out-trade-no/" .. no
                   .. "?mchid=" .. self.mchid)
end

--- res = c:refund(body): POST /v3/refund/domestic/refunds with body as is
function Client:refund(body)
  return self:call("POST", "/v3/refund/domestic/refunds", body)
end

--- res = c:pay(no[, body]): the payer pays order no (control API)
function Client:pay(no, body)
  return _M.control(self.base, "POST", "/sim/transactions/" .. no .. "/pay",
                    body or {})
end

--- simclient.assert_signed(res, keys[, status]): a signed answer
function _M.assert_signed(res, keys, status)
  luassert.equal(status or 200, res.status, res.body)
  local ok, why = _M.verify(res, keys)
  luassert(ok, why)
end

--- simclient.assert_err(res, status, code[, field]): an error answer in
--- WeChat's shape, unsigned, naming field (detail.field) when given
function _M.assert_err(res, status, code, field)
  luassert.equal(status, res.status, res.body)
  luassert.equal(code, res.json.code)
  luassert.is_string(res.json.message)
  luassert.is_nil(res.headers["wechatpay-signature"])
  if field then luassert.equal(field, res.json.detail.field, res.body) end
end

--- a key ring for verify: the simulator's certificates and public key,
--- fetched from its control API
function Client:platform_keys()
  local keys = {}
  local res = assert(paygate.http.request{
    url = self.base .. "/sim/platform-certificates", timeout = 5 })
  for _, c in ipairs(json.decode(res.body)) do
    keys[c.serial_no] = assert(x509.load(c.certificate))
  end
  res = assert(paygate.http.request{ url = self.base .. "/sim/public-key",
                                     timeout = 5 })
  local p = json.decode(res.body)
  keys[p.id] = assert(crypto.public_key(p.pem))
  return keys, p.id
end

--- ok, why = simclient.verify(res, keys[, alg]) -- a response's signature
function _M.verify(res, keys, alg)
  local h = res.headers
  local ts, nonce = h["wechatpay-timestamp"], h["wechatpay-nonce"]
  local sig, serial = h["wechatpay-signature"], h["wechatpay-serial"]
  if not (ts and nonce and sig and serial) then return nil, "unsigned" end
  if math.abs(os.time() - tonumber(ts)) >= 300 then return nil, "stale" end
  local key = keys[serial]
  if not key then return nil, "unknown_serial" end
  local ok = crypto.verify_base64(key, ts .. "\n" .. nonce .. "\n" .. res.body
                                  .. "\n", sig, alg)
  if not ok then return nil, "bad_signature" end
  return true, serial
end

--- plain = simclient.decrypt(r, apiv3_key[, sm])
function _M.decrypt(r, apiv3, sm)
  local key = r.algorithm == "AEAD_SM4_GCM" and crypto.sm4_key(apiv3) or apiv3
  return crypto.aead_decrypt(r.algorithm, key, r.nonce, r.associated_data,
                             assert(crypto.base64_decode(r.ciphertext)))
end

--- res = simclient.control(base, method, path[, body])
function _M.control(base, method, path, body)
  local res = assert(paygate.http.request{ method = method,
    url = base .. path, body = body and json.encode(body) or nil,
    headers = body and { ["Content-Type"] = "application/json" } or nil,
    timeout = 30 })
  res.json = res.body ~= "" and json.decode(res.body) or nil
  return res
end

--- srv, base, c = simclient.start(workers[, extra]): the simulator
--- started with the spec merchants (simclient.config; extra: more
--- "key = value," config lines) and a client of the first
function _M.start(workers, extra)
  local server = require "support.server"
  local dir = server.tmpdir()
  local srv = server.start{ app = "examples/simulator",
    config = _M.config(dir .. "/state", "workers = " .. workers .. ","
                       .. (extra or "")) }
  local base = "http://127.0.0.1:" .. srv.port
  return srv, base, _M.new{ base = base }
end

return _M
