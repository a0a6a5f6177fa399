-- paygate.wechatpay.sign and .verify: the official known-answer vectors
-- and the verifier's failures, provoked for real.
local crypto = require "paygate.crypto"
local keyring = require "paygate.keyring"
local sign = require "paygate.wechatpay.sign"
local verify = require "paygate.wechatpay.verify"
local wxtest = require "support.wxtest"

local read = wxtest.fixture

-- WeChat Pay's official request-signing example (its documentation)
local A1_BODY = '{"appid":"wxd678efh567hg6787","mchid":"1900007291",'
  .. '"description":"Image形象店-深圳腾大-QQ公仔","out_trade_no":'
  .. '"1217752501201407033233368018","notify_url":'
  .. '"https://www.weixin.qq.com/wxpay/pay.php","amount":{"total":100,'
  .. '"currency":"CNY"},"payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}}'
local A1_SIG = "jnks4dlrPw3ZX+ozVvSK39oa0t7OMBsg83BHAwd8BRdUFiVaQNTLTvci+wURgP1O"
  .. "QBbKYhFGvt7iqYpDSTQkp7Uq1sltaQKyncCyrA1g88m5bsKERQfPyT0ahSwKTYJ1CAn9Qi"
  .. "JuSJRq1QsQs07eehbU/k9BCS51jTyc1Jpsi2H77HF9f/BnjXAOP3/sPObg6V5Ee4EzwLox6"
  .. "84hhuMuIwHo7D8KFk3LIHOKDcNI4It1aCXydFWNpNK+SG86VUDe5kwoDpw4Ulqfu9z8OFD"
  .. "GbDs9TCxEv8iqQzbpxOlEVoOe2kalSYM5kApQb3nZcxdUtoE0liJGW3RGUNE0t4v01A=="
local A1_GET_SIG = "JNEITrKv8DWEtBJGZtxG9ARa+eIZDIn1Ht3MQM5j9jP77TtHdfCqLjpwev"
  .. "fWftBuaGMfEdiu2sWYtLvnZIoLW3FH10OVCBzKncid5xClTwav8JX+uDeGBBX8w64iHvFyu"
  .. "Qj8ukZT+F1AFJii8hmXLD8Os90thnL0bfJYLo/4K237TH4dEd44NTH9ElFb/ykrvv9RBs+m"
  .. "CNpy5IUe2Qxhba3d3RiMqhWK2sSr3tsVzQihJ0TPMnjWqoU2W5Y/v3rBFDmLhqe0ZW6A4vy"
  .. "vjmiR0v/8XEI25Py4PNyZXszsdl4j0zLqelUJxGEMUBhYg1LIoDPjYMlA9HV1yKD6+JYZJA=="

-- WeChat Pay's official public-key response verification example
local PUB_ID = "PUB_KEY_ID_0000000000000024101100397200000006"
local R_BODY = '{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}'
local R_SIG = "mfI1CPqvBrgcXfgXMFjdNIhBf27ACE2YyeWsWV9ZI7T7RU0vHvbQpu9Z32ogzc+k8"
  .. "ZC5n3kz7h70eWKjgqNdKQF0eRp8mVKlmfzMLBVHbssB9jEZEDXThOX1XFqX7s7ymia1hoHQx"
  .. "QagPGzkdWxtlZPZ4ZPvr1RiqkgAu6Is8MZgXXrRoBKqjmSdrP1N7uxzJ/cjfSiis9FiLjuAD"
  .. "oqmQ1P7p2N876YPAol7Rn0+GswwAwxldbdLrmVSjfytfSBJFqTMHn4itojgxSWWN1byuckQt"
  .. "8hSTEv/Lg97QoeGniYP17T80pJeQyL3b+295FPHSO2AtvCgyIbKMZ0BALilAA=="
local R_TS = 1722850421
local function r_headers(over)
  local h = { ["wechatpay-timestamp"] = tostring(R_TS),
              ["wechatpay-nonce"] = "d824f2e086d3c1df967785d13fcd22ef",
              ["wechatpay-serial"] = PUB_ID,
              ["wechatpay-signature"] = R_SIG }
  for k, v in pairs(over or {}) do h[k] = v or nil end
  return h
end

local signer
local pub_ring

setup(function()
  signer = { key = assert(crypto.private_key(read("a1_merchant_key.pem"))),
             schema = sign.RSA, mchid = "1900007291",
             serial = "408B07E79B8269FEC3D5D3E6AB8ED163A6A380DB" }
  pub_ring = keyring.new()
  pub_ring:put(PUB_ID, assert(crypto.public_key(read("a2_wechatpay_pubkey.pem"))))
end)

describe("sign.request_message", function()
  it("is five lines each ending in a newline; no body gives an empty line",
     function()
    assert.equal("GET\n/v3/certificates\n1554208460\nN\n\n",
                 sign.request_message("GET", "/v3/certificates", 1554208460,
                                      "N", nil))
    assert.equal("POST\n/v3/x?a=1\n1\nN\n{}\n",
                 sign.request_message("POST", "/v3/x?a=1", "1", "N", "{}"))
  end)
end)

describe("sign.sign_request (official example)", function()
  it("reproduces the documented JSAPI prepay signature and header", function()
    local h = assert(sign.sign_request(signer, "POST",
      "/v3/pay/transactions/jsapi", A1_BODY, 1554208460,
      "593BEC0C930BF1AFEB40B4A08C8FB242"))
    assert.equal('WECHATPAY2-SHA256-RSA2048 mchid="1900007291",nonce_str='
      .. '"593BEC0C930BF1AFEB40B4A08C8FB242",timestamp="1554208460",'
      .. 'serial_no="408B07E79B8269FEC3D5D3E6AB8ED163A6A380DB",signature="'
      .. A1_SIG .. '"', h)
  end)
  it("signs a GET with an empty body line", function()
    local h = assert(sign.sign_request(signer, "GET", "/v3/certificates",
      nil, 1554208460, "593BEC0C930BF1AFEB40B4A08C8FB242"))
    assert.equal(A1_GET_SIG, sign.parse_authorization(h).signature)
  end)
  it("makes a fresh nonce and timestamp when none is given", function()
    local a = sign.parse_authorization(assert(sign.sign_request(signer,
      "GET", "/v3/certificates")))
    local b = sign.parse_authorization(assert(sign.sign_request(signer,
      "GET", "/v3/certificates")))
    assert.not_equal(a.nonce_str, b.nonce_str)
    assert.equal(32, #a.nonce_str)
    assert.is_true(math.abs(tonumber(a.timestamp) - os.time()) <= 2)
  end)
end)

describe("sign.sign_request (SM variant)", function()
  it("signs with SM2-with-SM3 under the WECHATPAY2-SM2-WITH-SM3 schema",
     function()
    local sm = { key = assert(crypto.private_key(read("a10a_sm2_key.pem"))),
                 schema = sign.SM2, mchid = "1900000001",
                 serial = "54E7F59ED8DF4570CFB14780EA8152D45A675EE6" }
    local h = assert(sign.sign_request(sm, "GET", "/v3/certificates?algorithm_type=SM2"))
    local t = assert(sign.parse_authorization(h))
    assert.equal("WECHATPAY2-SM2-WITH-SM3", t.schema)
    local cert = assert(crypto.certificate(read("a10b_sm2_cert.pem")))
    assert(crypto.verify_base64(cert, "GET\n/v3/certificates?algorithm_type=SM2\n"
      .. t.timestamp .. "\n" .. t.nonce_str .. "\n\n", t.signature,
      "sm2-sm3"))
  end)
end)

describe("sign.parse_authorization", function()
  it("refuses garbage and accepts any parameter order", function()
    assert.is_nil(sign.parse_authorization("nonsense"))
    assert.is_nil(sign.parse_authorization('X mchid="1"'))
    local t = assert(sign.parse_authorization('S serial_no="A",mchid="1",'
      .. 'timestamp="2",nonce_str="n",signature="s"'))
    assert.equal("A", t.serial_no)
    assert.equal("S", t.schema)
  end)
end)

describe("verify.check (official public-key example)", function()
  it("verifies the documented response at its own time", function()
    local h = assert(verify.check(r_headers(), R_BODY, pub_ring, R_TS))
    assert.equal(PUB_ID, h.serial)
  end)
  it("accepts header names in any case", function()
    local hh = {}
    for k, v in pairs(r_headers()) do
      hh[k:gsub("^w", "W"):gsub("%-(%l)", function(c) return "-" .. c:upper() end)] = v
    end
    assert(verify.check(hh, R_BODY, pub_ring, R_TS))
  end)
  it("299 s of skew either way is fine, 300 s is stale", function()
    assert(verify.check(r_headers(), R_BODY, pub_ring, R_TS + 299))
    assert(verify.check(r_headers(), R_BODY, pub_ring, R_TS - 299))
    local _, err = verify.check(r_headers(), R_BODY, pub_ring, R_TS + 300)
    assert.equal("stale_timestamp", err.kind)
    _, err = verify.check(r_headers(), R_BODY, pub_ring, R_TS - 300)
    assert.equal("stale_timestamp", err.kind)
  end)
  it("a tampered body is bad_signature", function()
    local _, err = verify.check(r_headers(), R_BODY:gsub("JyC9", "JyC8"),
                                pub_ring, R_TS)
    assert.equal("bad_signature", err.kind)
  end)
  it("the same JSON re-encoded does not verify: raw bytes are signed",
     function()
    for _, b in ipairs({
      '{"code_url": "weixin://wxpay/bizpayurl?pr=JyC91EIz1"}',   -- space
      '{"code_url":"weixin:\\/\\/wxpay\\/bizpayurl?pr=JyC91EIz1"}', -- escapes
      '{"code_url":"\\u0077eixin://wxpay/bizpayurl?pr=JyC91EIz1"}',  -- \u
      R_BODY .. "\n",                                              -- newline
    }) do
      local _, err = verify.check(r_headers(), b, pub_ring, R_TS)
      assert.equal("bad_signature", err.kind)
    end
  end)
  it("key order changed does not verify", function()
    local ring = keyring.new()
    ring:put("PUB_KEY_ID_1", crypto.public_key(read("a1_pub.pem")))
    local body = '{"a":1,"b":2}'
    local sig = crypto.sign_base64(signer.key, "5\nn\n" .. body .. "\n")
    local h = { ["wechatpay-timestamp"] = "5", ["wechatpay-nonce"] = "n",
                ["wechatpay-serial"] = "PUB_KEY_ID_1",
                ["wechatpay-signature"] = sig }
    assert(verify.check(h, body, ring, 5))
    local _, err = verify.check(h, '{"b":2,"a":1}', ring, 5)
    assert.equal("bad_signature", err.kind)
  end)
  it("a signature by another key is bad_signature", function()
    local sig = crypto.sign_base64(signer.key, R_TS .. "\nd824f2e086d3c1df9"
      .. "67785d13fcd22ef\n" .. R_BODY .. "\n")
    local _, err = verify.check(r_headers{ ["wechatpay-signature"] = sig },
                                R_BODY, pub_ring, R_TS)
    assert.equal("bad_signature", err.kind)
  end)
  it("a serial not in the ring is unknown_serial, naming it", function()
    local _, err = verify.check(r_headers{ ["wechatpay-serial"] = "ABCDEF" },
                                R_BODY, pub_ring, R_TS)
    assert.equal("unknown_serial", err.kind)
    assert.equal("ABCDEF", err.serial)
  end)
  it("a WECHATPAY/SIGNTEST/ probe and non-base64 are bad_signature", function()
    for _, s in ipairs({ "WECHATPAY/SIGNTEST/abcdefghijklmnop",
                         "WECHATPAY/SIGNTEST/" .. R_SIG, "%%%%", "abc" }) do
      local _, err = verify.check(r_headers{ ["wechatpay-signature"] = s },
                                  R_BODY, pub_ring, R_TS)
      assert.equal("bad_signature", err.kind)
    end
  end)
  it("a signature type that does not fit the key is bad_signature",
     function()
    local _, err = verify.check(r_headers{
      ["wechatpay-signature-type"] = "WECHATPAY2-SM2-WITH-SM3" },
      R_BODY, pub_ring, R_TS)
    assert.equal("bad_signature", err.kind)
    _, err = verify.check(r_headers{ ["wechatpay-signature-type"] = "MD5" },
                          R_BODY, pub_ring, R_TS)
    assert.equal("bad_signature", err.kind)
    assert(verify.check(r_headers{
      ["wechatpay-signature-type"] = "WECHATPAY2-SHA256-RSA2048" },
      R_BODY, pub_ring, R_TS))
  end)
  it("missing or garbled headers are malformed", function()
    for _, k in ipairs({ "wechatpay-timestamp", "wechatpay-nonce",
                         "wechatpay-serial" }) do
      local _, err = verify.check(r_headers{ [k] = false }, R_BODY, pub_ring,
                                  R_TS)
      assert.equal("malformed", err.kind)
    end
    for _, ts in ipairs({ "1e9", "-5", " 1722850421", "0x10", "" }) do
      local _, err = verify.check(r_headers{ ["wechatpay-timestamp"] = ts },
                                  R_BODY, pub_ring, R_TS)
      assert.equal("malformed", err.kind)
    end
    local _, err = verify.check(r_headers{
      ["wechatpay-serial"] = string.rep("A", 129) }, R_BODY, pub_ring, R_TS)
    assert.equal("malformed", err.kind)
    _, err = verify.check(r_headers{ ["wechatpay-signature"] = false },
                          R_BODY, pub_ring, R_TS)
    assert.equal("malformed", err.kind)
  end)
  it("never raises on random bytes as headers and bodies", function()
    local rb = crypto.random_bytes
    for i = 1, 10000 do
      local h = {}
      if i % 7 ~= 0 then
        h["wechatpay-timestamp"] = i % 3 == 0 and tostring(R_TS)
                                   or rb(i % 16)
        h["wechatpay-nonce"] = rb(i % 40)
        h["wechatpay-serial"] = i % 5 == 0 and PUB_ID or rb(i % 150)
        h["wechatpay-signature"] = i % 2 == 0 and crypto.base64_encode(rb(256))
                                   or rb(i % 400)
        if i % 11 == 0 then h["wechatpay-signature-type"] = rb(8) end
      end
      local ok, v, err = pcall(verify.check, h, rb(i % 300), pub_ring, R_TS)
      assert(ok, v)
      assert.is_nil(v)
      assert.is_truthy(err.kind)
    end
  end)
end)

describe("verify.fresh", function()
  it("fails a clock or timestamp that is not a finite number as stale,"
     .. " saying so", function()
    for _, c in ipairs({ { 100, 0 / 0 }, { 0 / 0, 100 }, { 100, math.huge },
                         { -math.huge, 100 } }) do
      local ok, err = verify.fresh(c[1], c[2])
      assert.is_nil(ok)
      assert.equal("stale_timestamp", err.kind)
      assert.matches("cannot be compared with the local clock", err.message,
                     1, true)
    end
    assert.is_true(verify.fresh(100, 399))
    assert.matches("300 s behind", select(2, verify.fresh(100, 400)).message,
                   1, true)
  end)
end)
