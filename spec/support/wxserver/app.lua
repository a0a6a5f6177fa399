-- spec/support/wxserver/app.lua: a small WeChat Pay v3 test server for the
-- client's specs (until the simulator exists). Written from the protocol
-- facts with paygate.crypto directly — it uses none of the client's
-- modules, so a bug shared by both cannot hide.
--
-- Config (paygate.config.wxserver):
--   apiv3_key      32 bytes: encrypts /v3/certificates
--   merchant_pub   PEM path: verifies the Authorization of every request
--   merchant_serial
--   keys           { [serial or PUB_KEY_ID_...] = private key PEM path }
--   certs          { [serial] = certificate PEM path } (served, in order
--                  of cert_order)
--   default_signer serial used when the request names none we hold
--   sm             true: the ShangMi variant -- requests must carry
--                  WECHATPAY2-SM2-WITH-SM3 (SM2 with SM3, ID
--                  1234567812345678), answers are signed with SM2 keys
--                  and say so in Wechatpay-Signature-Type
--
-- /v3/certificates?algorithm_type=RSA|SM2|ALL serves the certificates of
-- that key type (RSA without the parameter); RSA ones are encrypted with
-- AEAD_AES_256_GCM under the APIv3 key, SM2 ones with AEAD_SM4_GCM under
-- the first 16 bytes of SM3(APIv3 key).
--
-- Control (JSON):
--   POST /_ctl/reset
--   POST /_ctl/queue  { method, path, responses = [ resp, ... ] }: answers
--        for that METHOD path (query ignored), in order, then the default
--        resp: { status, body (string), delay (s),
--                sign = false | { serial, ts_offset,
--                nonce, signature, sig_type (false: no header, also in
--                SM mode), body (sign these bytes instead of the sent
--                ones) }, headers }
--   POST /_ctl/certs  { status = 200|404|500, serials = [...],
--                       signer = serial, apiv3_key = "...", delay = s }
--   GET  /_ctl/requests -> [ { method, target, headers, body, auth } ]
--   POST /_ctl/add_cert { serial, pem }: serves pem under serial_no serial
--        when /_ctl/certs lists serial (any certificate, e.g. an expired
--        one, or one whose own serial differs); kept across resets
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"

local conf = paygate.config_copy().wxserver

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local keys, cert_pem, cert_obj = {}, {}, {}
for id, path in pairs(conf.keys) do
  keys[id] = assert(crypto.private_key(read(path)))
end
local all_serials = {}
for serial, path in pairs(conf.certs or {}) do
  cert_pem[serial] = read(path)
  cert_obj[serial] = assert(crypto.certificate(cert_pem[serial]))
  all_serials[#all_serials + 1] = serial
end
table.sort(all_serials)
local merchant_pub = assert(crypto.public_key(read(conf.merchant_pub)))

local state
local function reset()
  state = { queue = {}, requests = {},
            certs = { status = 200, serials = all_serials,
                      signer = nil, apiv3_key = conf.apiv3_key } }
end
reset()

-- Authorization: SCHEMA k="v",k="v",... in any order
local function check_auth(method, target, body, value)
  if type(value) ~= "string" then return "missing" end
  local schema, rest = value:match("^(%S+) (.+)$")
  if schema ~= (conf.sm and "WECHATPAY2-SM2-WITH-SM3"
                or "WECHATPAY2-SHA256-RSA2048") then
    return "schema"
  end
  local p = {}
  for k, v in rest:gmatch('([%w_]+)="([^"]*)"') do p[k] = v end
  if p.mchid ~= conf.mchid then return "mchid" end
  if p.serial_no ~= conf.merchant_serial then return "serial_no" end
  local ts = tonumber(p.timestamp)
  if not ts or math.abs(os.time() - ts) >= 300 then return "timestamp" end
  if not p.nonce_str or not p.signature then return "incomplete" end
  local msg = method .. "\n" .. target .. "\n" .. p.timestamp .. "\n"
              .. p.nonce_str .. "\n" .. body .. "\n"
  if not crypto.verify_base64(merchant_pub, msg, p.signature) then
    return "signature"
  end
  return "ok"
end

local function signed(req, status, body, s, extra)
  local headers = { ["Request-ID"] = "08E6TEST" .. crypto.random_nonce(8)
                                     .. "-0" }
  for k, v in pairs(extra or {}) do headers[k] = v end
  if s == false then return status, body, headers end
  s = s or {}
  local asked = req.headers["wechatpay-serial"]
  local id = s.serial or (asked and keys[asked] and asked)
             or conf.default_signer
  local ts = tostring(os.time() + (s.ts_offset or 0))
  local nonce = s.nonce or crypto.random_nonce(32)
  local sig = s.signature
  if not sig then
    local key = keys[id] or keys[conf.default_signer]
    sig = crypto.sign_base64(key, ts .. "\n" .. nonce .. "\n"
                             .. (s.body or body) .. "\n")
  end
  headers["Wechatpay-Timestamp"] = ts
  headers["Wechatpay-Nonce"] = nonce
  headers["Wechatpay-Signature"] = sig
  headers["Wechatpay-Serial"] = id
  if s.sig_type then
    headers["Wechatpay-Signature-Type"] = s.sig_type
  elseif conf.sm and s.sig_type ~= false then
    headers["Wechatpay-Signature-Type"] = "WECHATPAY2-SM2-WITH-SM3"
  end
  return status, body, headers
end

local function rfc3339(t) return os.date("!%Y-%m-%dT%H:%M:%S+00:00", t) end

local function certificates(req)
  local c = state.certs
  if c.delay then paygate.sleep(c.delay) end
  if c.status == 404 then
    return 404, json.encode({ code = "RESOURCE_NOT_EXISTS",
      message = "无可用的平台证书，请在商户平台-API安全申请使用微信支付公钥" })
  elseif c.status ~= 200 then
    return c.status, json.encode({ code = "SYSTEM_ERROR",
                                   message = "系统繁忙,请稍后重试" })
  end
  local want = req:query().algorithm_type or "RSA"
  if want ~= "RSA" and want ~= "SM2" and want ~= "ALL" then
    return 400, json.encode({ code = "PARAM_ERROR",
                              message = "algorithm_type 取值错误" })
  end
  local data = {}
  for _, serial in ipairs(c.serials) do
    local nonce = crypto.random_nonce(12)
    local cert = cert_obj[serial]
    local sm2 = cert:key_type() == "SM2"
    if want == "ALL" or want == (sm2 and "SM2" or "RSA") then
      local alg = sm2 and "AEAD_SM4_GCM" or "AEAD_AES_256_GCM"
      local key = sm2 and crypto.digest("sm3", c.apiv3_key):sub(1, 16)
                  or c.apiv3_key
      local ct = crypto.aead_encrypt(alg, key, nonce, "certificate",
                                     cert_pem[serial])
      data[#data + 1] = {
        serial_no = serial, effective_time = rfc3339(cert:not_before()),
        expire_time = rfc3339(cert:not_after()),
        encrypt_certificate = { algorithm = alg, nonce = nonce,
          associated_data = "certificate",
          ciphertext = crypto.base64_encode(ct) } }
    end
  end
  return signed(req, 200, json.encode({ data = data }),
                c.signer and { serial = c.signer } or nil,
                { ["Content-Type"] = "application/json" })
end

local function control(req, path)
  if path == "/_ctl/reset" then
    reset()
    return 200, { ok = true }
  elseif path == "/_ctl/queue" then
    local t = req:json()
    local k = t.method .. " " .. t.path
    state.queue[k] = state.queue[k] or {}
    for _, r in ipairs(t.responses) do table.insert(state.queue[k], r) end
    return 200, { ok = true }
  elseif path == "/_ctl/certs" then
    local t = req:json()
    for k, v in pairs(t) do state.certs[k] = v end
    return 200, { ok = true }
  elseif path == "/_ctl/add_cert" then
    local t = req:json()
    local cert = crypto.certificate(t.pem)
    if not cert then return 400, { error = "not a certificate" } end
    cert_pem[t.serial], cert_obj[t.serial] = t.pem, cert
    return 200, { ok = true }
  elseif path == "/_ctl/requests" then
    return 200, json.encode(state.requests)
  end
  return 404, { error = "no such control" }
end

paygate.before(function(req)
  local path = req.path
  if path:sub(1, 6) == "/_ctl/" then return control(req, path) end
  local target = req.target     -- signed as sent
  local body = req.body or ""
  local auth = check_auth(req.method, target, body,
                          req.headers["authorization"])
  table.insert(state.requests, { method = req.method, target = target,
    headers = req.headers, body = body, auth = auth })
  if not req.headers["accept"] or not req.headers["user-agent"] then
    return 400, json.encode({ code = "INVALID_REQUEST",
                              message = "Http头缺少Accept或User-Agent" })
  end
  if auth ~= "ok" then
    return 401, json.encode({ code = "SIGN_ERROR", message = "错误的签名，验签失败",
                              detail = { issue = auth } })
  end
  local q = state.queue[req.method .. " " .. path]
  local r = q and table.remove(q, 1)
  if r then
    if r.delay then paygate.sleep(r.delay) end
    local status = r.status or 200
    local rbody = r.body or ""
    if status >= 200 and status < 300 then
      return signed(req, status, rbody, r.sign, r.headers)
    end
    return status, rbody, r.headers
  end
  if path == "/v3/certificates" then return certificates(req) end
  return signed(req, 200, json.encode({ method = req.method,
                target = target, body = body }), nil,
                { ["Content-Type"] = "application/json" })
end)
