-- wx:set_credentials(creds): a checked, all-or-nothing swap of a running
-- client's merchant key, certificate, APIv3 key and public key.
local wechatpay = require "paygate.wechatpay"
local sign = require "paygate.wechatpay.sign"
local core = require "paygate.core"
local wxtest = require "support.wxtest"

local FIX = "spec/fixtures/wechatpay/"
local read = wxtest.fixture
local APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
local APIV3_NEW = "0123456789abcdef0123456789ABCDEF"
local PUB_ID = "PUB_KEY_ID_0114232134912410000000000000000001"
local SERIAL_A4 = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115"

-- public-key mode (no network): signs with A.1's key under serial S1
local function client()
  return assert(wechatpay.client{ mchid = "1234567891",
    merchant_private_key = FIX .. "a1_merchant_key.pem",
    merchant_serial = "0A1B2C", apiv3_key = APIV3,
    public_key = FIX .. "a7_platform_pubkey.pem", public_key_id = PUB_ID,
    base_url = "http://127.0.0.1:1" })
end

-- A.3's key with its certificate A.4 (a matching pair)
local function creds(over)
  local c = { merchant_private_key = read("a3_merchant_key.pem"),
              merchant_certificate = read("a4_merchant_cert.pem"),
              apiv3_key = APIV3_NEW,
              public_key = read("a7_platform_pubkey.pem"),
              public_key_id = PUB_ID }
  for k, v in pairs(over or {}) do
    if v == false then c[k] = nil else c[k] = v end
  end
  return c
end

describe("wx:set_credentials", function()
  it("raises on misuse", function()
    local wx = client()
    assert.has_error(function() wx:set_credentials("x") end)
  end)

  it("refuses a key that does not match the certificate; nothing changes",
     function()
    local wx = client()
    local before = wx.conf.signer
    local ok, err = wx:set_credentials(creds{
      merchant_private_key = read("a1_merchant_key.pem") })
    assert.is_nil(ok)
    assert.is_true(core.is_error(err))
    assert.equal("invalid_config", err.kind)
    assert.equal("merchant_private_key", err.key)
    assert.is_nil(err.message:find("PRIVATE KEY", 1, true))
    assert.equal(before, wx.conf.signer)
    assert.equal("0A1B2C", wx.conf.signer.serial)
    assert.same({ APIV3 }, wx.conf.apiv3_keys)
  end)

  it("refuses a wrong APIv3 key and a missing certificate", function()
    local wx = client()
    local _, err = wx:set_credentials(creds{ apiv3_key = "short" })
    assert.equal("apiv3_key", err.key)
    _, err = wx:set_credentials(creds{ merchant_certificate = false })
    assert.equal("merchant_certificate", err.key)
    assert.equal("0A1B2C", wx.conf.signer.serial)
  end)

  it("warns of a merchant certificate that has expired, as at start",
     function()
    local log = require("paygate").log
    local warn, seen = log.warn, {}
    log.warn = function(msg, fields) seen[#seen + 1] = { msg, fields } end
    local ok, err = pcall(function()
      local wx = client()
      assert.equal(0, #seen)         -- given by serial: nothing to judge
      assert.is_true(wx:set_credentials(creds()))  -- A.4: ended 2025-05-09
    end)
    log.warn = warn
    assert(ok, tostring(err))
    assert.equal(1, #seen)
    assert.matches("merchant_certificate has expired", seen[1][1], 1, true)
    assert.equal(SERIAL_A4, seen[1][2].serial)
    assert.equal("2025-05-09", seen[1][2].not_after:sub(1, 10))
  end)

  it("swaps the signer and serial at once, keeps the old APIv3 key",
     function()
    local wx = client()
    assert.is_true(wx:set_credentials(creds()))
    assert.equal(SERIAL_A4, wx.conf.signer.serial)
    assert.same({ APIV3_NEW, APIV3 }, wx.conf.apiv3_keys)
    local auth = assert(sign.sign_request(wx.conf.signer, "GET", "/v3/x", ""))
    assert.matches('serial_no="' .. SERIAL_A4 .. '"', auth, 1, true)
    assert.equal(PUB_ID, wx:request_serial())
    -- a key coming back is not listed twice; at most two previous ones
    assert.is_true(wx:set_credentials(creds{ apiv3_key = APIV3 }))
    assert.same({ APIV3, APIV3_NEW }, wx.conf.apiv3_keys)
    local third = ("x"):rep(32)
    assert.is_true(wx:set_credentials(creds{ apiv3_key = third }))
    local fourth = ("y"):rep(32)
    assert.is_true(wx:set_credentials(creds{ apiv3_key = fourth }))
    assert.same({ fourth, third, APIV3 }, wx.conf.apiv3_keys)
  end)
end)
