-- spec/support/wxapi_server: a small WeChat Pay v3 stand-in for the API
-- specs (spec/unit/wechatpay_api_spec.lua). Run with one worker: its state
-- lives in this Lua state.
--
-- It checks each /v3 request as WeChat does -- Accept and User-Agent
-- present, the Authorization header (any parameter order) signed with the
-- merchant key over METHOD\nTARGET\nTIMESTAMP\nNONCE\nBODY\n, the raw target
-- and raw body bytes, timestamp within 5 minutes -- records it, and answers
-- what the spec canned for that method and path, signing every 2xx answer
-- (TIMESTAMP\nNONCE\nBODY\n with the platform key) with its own code here,
-- not the client's. Errors go out unsigned, like WeChat's.
-- Bill files (/v3/billdownload/file?token=T) are served unsigned from the
-- file the spec registered under T.
--
-- Test control (no signature needed):
--   POST /_test/canned { method, path, status, body (string or object),
--                        headers, sign (default: 2xx), times (default:
--                        sticky), tamper (a body sent in place of the
--                        signed one), delay (seconds before answering) }
--   POST /_test/bill   { token, file }
--   POST /_test/reset
--   GET  /_test/requests -> { requests = [ { method, path, query, target,
--                        body, headers, decrypted = { field = plain } } ] }
--
-- Config (paygate.config.wxapi_server): mchids (array), merchant_serial,
-- merchant_public_key (path), platform_key (path), platform_serial.
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"

local conf = paygate.config_copy().wxapi_server

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local merchant_pub = assert(crypto.public_key(read(conf.merchant_public_key)))
local platform_key = assert(crypto.private_key(read(conf.platform_key)))

local canned, log, bills = {}, {}, {}

-- the merchant ids whose requests are accepted (a direct merchant and a
-- service provider may share the test key)
local mchids = {}
for _, m in ipairs(conf.mchids) do mchids[m] = true end

local function err_answer(status, code, message)
  return status, json.encode({ code = code, message = message }),
         { ["Content-Type"] = "application/json" }
end

local function signed(status, body, headers)
  local ts = tostring(os.time())
  local nonce = crypto.random_nonce(32)
  local sig = assert(crypto.sign_base64(platform_key,
                     ts .. "\n" .. nonce .. "\n" .. body .. "\n",
                     "sha256-rsa"))
  local h = { ["Wechatpay-Timestamp"] = ts, ["Wechatpay-Nonce"] = nonce,
              ["Wechatpay-Signature"] = sig,
              ["Wechatpay-Serial"] = conf.platform_serial,
              ["Wechatpay-Signature-Type"] = "WECHATPAY2-SHA256-RSA2048",
              ["Request-ID"] = "08F0" .. crypto.random_nonce(16):upper()
                               .. "-0" }
  if body ~= "" then h["Content-Type"] = "application/json" end
  for k, v in pairs(headers or {}) do h[k] = v end
  return status, body, h
end

-- Checks the Authorization header: nil when good, else an error answer.
local function check_auth(req, target)
  local h = req.headers
  if not h["accept"] or not h["user-agent"] then
    return { err_answer(400, "INVALID_REQUEST",
                        "Http头缺少Accept或User-Agent") }
  end
  local auth = h["authorization"] or ""
  local schema, params = auth:match("^(%S+) (.*)$")
  if schema ~= "WECHATPAY2-SHA256-RSA2048" then
    return { err_answer(401, "SIGN_ERROR", "bad Authorization schema") }
  end
  local p = {}
  for k, v in params:gmatch('([%w_]+)="([^"]*)"') do p[k] = v end
  if not mchids[p.mchid or ""] then
    return { err_answer(401, "SIGN_ERROR", "mchid mismatch") }
  end
  if p.serial_no ~= conf.merchant_serial then
    return { err_answer(401, "SIGN_ERROR", "商户证书序列号有误") }
  end
  local ts = tonumber(p.timestamp)
  if not ts or math.abs(os.time() - ts) > 300 then
    return { err_answer(401, "SIGN_ERROR", "timestamp out of window") }
  end
  local msg = req.method .. "\n" .. target .. "\n" .. p.timestamp .. "\n"
              .. (p.nonce_str or "") .. "\n" .. req.body .. "\n"
  if not crypto.verify_base64(merchant_pub, msg, p.signature or "") then
    return { err_answer(401, "SIGN_ERROR", "错误的签名，验签失败") }
  end
  return nil
end

local function record(req, target)
  local body = req.body
  local entry = { method = req.method, path = req.path,
                  query = req.query_string, target = target, body = body,
                  headers = req.headers }
  local t = json.decode(body)
  if type(t) == "table" then
    for _, k in ipairs({ "bank_account", "real_name" }) do
      if type(t[k]) == "string" then
        entry.decrypted = entry.decrypted or {}
        local ct = crypto.base64_decode(t[k])
        entry.decrypted[k] = ct and crypto.oaep_decrypt(platform_key, ct)
                             or false
      end
    end
  end
  log[#log + 1] = entry
end

local function control(req)
  if req.path == "/_test/reset" then
    canned, log, bills = {}, {}, {}
    return 200, { ok = true }
  elseif req.path == "/_test/requests" then
    return 200, json.encode({ requests = log })
  elseif req.path == "/_test/canned" then
    local c = req:json()
    if type(c.body) == "table" then c.body = json.encode(c.body) end
    local key = c.method .. " " .. c.path
    canned[key] = canned[key] or {}
    table.insert(canned[key], c)
    return 200, { ok = true }
  elseif req.path == "/_test/bill" then
    local b = req:json()
    bills[b.token] = b.file
    return 200, { ok = true }
  end
  return 404, { error = "no such control" }
end

paygate.before(function(req)
  local path = req.path
  if path:sub(1, 7) == "/_test/" then return control(req) end
  local target = req.target     -- signed as sent
  local bad = check_auth(req, target)
  record(req, target)
  if bad then return bad[1], bad[2], bad[3] end
  if path == "/v3/billdownload/file" and not canned["GET " .. path] then
    local file = bills[req:query().token or ""]
    if not file then
      return err_answer(404, "RESOURCE_NOT_EXISTS", "no such bill")
    end
    return 200, read(file), { ["Content-Type"] = "application/octet-stream" }
  end
  local list = canned[req.method .. " " .. path]
  local c = list and list[1]
  if not c then
    return err_answer(404, "RESOURCE_NOT_EXISTS", "nothing canned for "
                      .. req.method .. " " .. path)
  end
  if c.times then
    c.times = c.times - 1
    if c.times <= 0 then
      table.remove(list, 1)
      if #list == 0 then canned[req.method .. " " .. path] = nil end
    end
  end
  if c.delay then paygate.sleep(c.delay) end
  local status = c.status or 200
  local body = c.body or ""
  local sign = c.sign
  if sign == nil then sign = status >= 200 and status < 300 end
  if sign then
    local st, b, h = signed(status, body, c.headers)
    if c.tamper then b = c.tamper end       -- signed, then altered
    return st, b, h
  end
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(c.headers or {}) do h[k] = v end
  return status, body, h
end)
