-- sim.certificates: GET /v3/certificates. Each platform certificate not
-- expired (the one in use and one rotated in but not yet used) encrypted
-- with the calling merchant's APIv3 key: AEAD_AES_256_GCM (AEAD_SM4_GCM
-- under the SM variant), a 12-character nonce, associated_data
-- "certificate". A merchant in public_key mode has no platform
-- certificate: 404 RESOURCE_NOT_EXISTS, as WeChat answers.
local identity = require "sim.identity"

local _M = {}

local function rfc3339(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t) + 8 * 3600) .. "+08:00"
end
_M.rfc3339 = rfc3339

local NO_CERT = "无可用的平台证书，请在商户平台-API安全申请使用微信支付公钥。"
  .. "可查看指引https://pay.weixin.qq.com/docs/merchant/products/"
  .. "platform-certificate/wxp-pub-key-guide.html"

function _M.routes(ctx)
  local api, cfg = ctx.api, ctx.config
  api.route("GET", "/v3/certificates", "certificates", function(_, c)
    if c.m.verifier_mode == "public_key" then
      return nil, api.err(404, "RESOURCE_NOT_EXISTS", NO_CERT)
    end
    local at = c.query.algorithm_type
    if at ~= nil and at ~= "RSA" and at ~= "SM2" and at ~= "ALL" then
      return nil, api.param_error("algorithm_type", "取值应为RSA、SM2或ALL",
                                  at, "query")
    end
    local want = cfg.sm and "SM2" or "RSA"
    local data = {}
    if at == nil and want == "RSA" or at == want or at == "ALL" then
      -- (those not expired on WeChat's clock, c.now)
      for _, cert in ipairs(identity.certificates(c.now)) do
        data[#data + 1] = {
          serial_no = cert.serial,
          effective_time = rfc3339(cert.not_before),
          expire_time = rfc3339(cert.not_after),
          encrypt_certificate = identity.encrypt_resource(c.m, cert.pem,
                                                          "certificate"),
        }
      end
    end
    if data[1] == nil then
      -- (lua-cjson would write {} for an empty table)
      return 200, '{"data":[]}'
    end
    return 200, { data = data }
  end)
end

return _M
