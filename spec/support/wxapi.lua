-- spec/support/wxapi.lua: starts spec/support/wxapi_server (a WeChat Pay
-- stand-in) and makes clients that talk to it; helpers to can answers and
-- read back the requests the client really sent.
local json = require "cjson.safe"
local server = require "support.server"
local wechatpay = require "paygate.wechatpay"

local _M = {}

local FIX = "spec/fixtures/wechatpay/"
_M.FIX = FIX
_M.MCHID = "1900000001"
_M.SP_MCHID = "1900000100"
_M.SERIAL = "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C"
_M.PUB_ID = "PUB_KEY_ID_0114232020260101000000000001"
_M.APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"

local Stub = {}
Stub.__index = Stub

--- stub = wxapi.start() -- one worker, signing with the test platform key
function _M.start()
  local conf = ([[
return { wxapi_server = {
  mchids = { %q, %q }, merchant_serial = %q, platform_serial = %q,
  merchant_public_key = %q, platform_key = %q,
} }]]):format(_M.MCHID, _M.SP_MCHID, _M.SERIAL, _M.PUB_ID,
              FIX .. "a1_pub.pem", FIX .. "a5_platform_key.pem")
  local srv = server.start{ app = "spec/support/wxapi_server", config = conf,
                            args = { "--log-level", "warn" } }
  return setmetatable({ srv = srv }, Stub)
end

function Stub:base_url() return self.srv:url("") end

--- wx = stub:client([extra conf]) -- public-key mode, direct merchant
function Stub:client(extra)
  local conf = {
    mchid = _M.MCHID, merchant_private_key = FIX .. "a1_merchant_key.pem",
    merchant_serial = _M.SERIAL, apiv3_key = _M.APIV3,
    public_key = FIX .. "a7_platform_pubkey.pem", public_key_id = _M.PUB_ID,
    base_url = self:base_url(), backup_url = false, deadline = 10,
    timeout = 5,
  }
  for k, v in pairs(extra or {}) do
    if v == false and k ~= "backup_url" then conf[k] = nil else conf[k] = v end
  end
  return assert(wechatpay.client(conf))
end

--- stub:partner_client() -- a service provider (sp_mchid)
function Stub:partner_client(extra)
  local e = { mchid = false, sp_mchid = _M.SP_MCHID }
  for k, v in pairs(extra or {}) do e[k] = v end
  return self:client(e)
end

local function control(self, method, path, body)
  local res = assert(self.srv:request{ method = method, path = path,
    body = body and json.encode(body),
    headers = body and { ["Content-Type"] = "application/json" } })
  assert(res.status == 200, "wxapi_server " .. path .. ": " .. res.status
         .. " " .. tostring(res.body))
  return json.decode(res.body)
end

--- stub:can(method, path, status, body[, extra]) -- the next answers there
-- (body: a table is sent as JSON, a string as is; extra: sign, times,
-- headers)
function Stub:can(method, path, status, body, extra)
  local c = { method = method, path = path, status = status, body = body }
  for k, v in pairs(extra or {}) do c[k] = v end
  control(self, "POST", "/_test/canned", c)
end

function Stub:bill(token, file)
  control(self, "POST", "/_test/bill", { token = token, file = file })
end

function Stub:reset() control(self, "POST", "/_test/reset", {}) end

--- list = stub:requests() -- every /v3 request received since the reset;
-- each { method, path, query, target, body, headers, json, decrypted }
function Stub:requests()
  local list = control(self, "GET", "/_test/requests").requests
  for _, r in ipairs(list) do r.json = json.decode(r.body) end
  return list
end

function Stub:last()
  local list = self:requests()
  return list[#list], #list
end

function Stub:stop() self.srv:stop() end

return _M
