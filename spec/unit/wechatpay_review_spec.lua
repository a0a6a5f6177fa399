-- paygate.wechatpay, fixes from a review: key material given in the wrong
-- shape never reaches an error message; empty arrays are refused rather
-- than sent as {}; "/" goes out unescaped; 500 codes that say "do not
-- retry" are not retryable.
local wechatpay = require "paygate.wechatpay"
local transport = require "paygate.wechatpay.transport"
local errors = require "paygate.wechatpay.errors"
local core = require "paygate.core"
local json = require "cjson.safe"
local wxtest = require "support.wxtest"

local FIX = "spec/fixtures/wechatpay/"
local read = wxtest.fixture
local APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
local PUB_ID = "PUB_KEY_ID_0114232134912410000000000000000001"

-- public-key mode: no network at all
local function base(over)
  local c = { mchid = "1234567891",
    merchant_private_key = FIX .. "a3_merchant_key.pem",
    merchant_serial = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115",
    apiv3_key = APIV3, public_key = FIX .. "a7_platform_pubkey.pem",
    public_key_id = PUB_ID, base_url = "http://127.0.0.1:1" }
  for k, v in pairs(over or {}) do c[k] = v end
  return c
end

-- The base64 body of a PEM file (no BEGIN/END lines), as lines.
local function body_lines(pem)
  local t = {}
  for line in pem:gmatch("[^\n]+") do
    if not line:find("-----", 1, true) then t[#t + 1] = line end
  end
  return t
end

-- Whether s holds any 12 consecutive characters of the secret (its
-- whitespace and dashes left out).
local function leaks(s, secret)
  local core_chars = secret:gsub("[%s%-]", "")
  for i = 1, #core_chars - 11 do
    if s:find(core_chars:sub(i, i + 11), 1, true) then
      return core_chars:sub(i, i + 11)
    end
  end
  return nil
end

describe("key material in the wrong shape (B1)", function()
  local key_pem = read("a3_merchant_key.pem")
  local cert_pem = read("a4_merchant_cert.pem")
  local pub_pem = read("a7_platform_pubkey.pem")
  local secrets = {
    ["a key body on one line"] = table.concat(body_lines(key_pem)),
    ["a key body over several lines"] =
      table.concat(body_lines(key_pem), "\n") .. "\n",
    ["a key whose BEGIN line lost its dashes"] =
      key_pem:gsub("%-%-%-%-%-", ""),
    ["a certificate body on one line"] = table.concat(body_lines(cert_pem)),
    ["a public key body over several lines"] =
      table.concat(body_lines(pub_pem), "\n"),
    ["the APIv3 key"] = APIV3,
  }
  local fields = { "merchant_private_key", "merchant_certificate",
                   "platform_certificates", "public_key", "platform_ca" }

  for what, secret in pairs(secrets) do
    for _, field in ipairs(fields) do
      it(what .. " as " .. field .. " is refused without repeating it",
         function()
        local wx, err = wechatpay.client(base{ [field] = secret })
        assert.is_nil(wx)
        assert.is_true(core.is_error(err))
        assert.equal("invalid_config", err.kind)
        assert.equal(field, err.key)
        assert.is_nil(leaks(err.message, secret))
        assert.is_nil(leaks(tostring(err), secret))
        assert.matches("not PEM text", err.message)
      end)
    end
  end

  it("the same inside platform_certificates' list", function()
    local secret = secrets["a key body on one line"]
    local _, err = wechatpay.client(base{
      platform_certificates = { FIX .. "a9_go_platform_cert.pem", secret } })
    assert.equal("platform_certificates", err.key)
    assert.matches("entry 2", err.message)
    assert.is_nil(leaks(tostring(err), secret))
  end)

  it("a missing file gives the reason, not the path", function()
    local path = "/nonexistent-dir-7Qz/apiclient_key.pem"
    local _, err = wechatpay.client(base{ merchant_private_key = path })
    assert.equal("merchant_private_key", err.key)
    assert.matches("cannot read the file %(No such file or directory%)",
                   err.message)
    assert.is_nil(tostring(err):find("nonexistent-dir-7Qz", 1, true))
  end)

  it("a path with a long run of letters is still read", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/"
                      .. ("abcdefgh"):rep(5)) == 0)
    local path = dir .. "/" .. ("abcdefgh"):rep(5) .. "/key.pem"
    local f = assert(io.open(path, "wb"))
    f:write(key_pem)
    f:close()
    local wx, err = wechatpay.client(base{ merchant_private_key = path })
    os.execute("rm -rf " .. dir)
    assert.is_table(wx, tostring(err))
    wx:stop()
  end)
end)

describe("empty arrays (S3)", function()
  local wx
  before_each(function() wx = assert(wechatpay.client(base())) end)
  after_each(function() wx:stop() end)

  local function prepay(over)
    local p = { appid = "wx2421b1c4370ec43b", description = "d",
                out_trade_no = "T123456", amount = { total = 1 },
                notify_url = "https://a.example/n" }
    for k, v in pairs(over) do p[k] = v end
    return p
  end

  it("an empty limit_pay is invalid_params, not sent as {}", function()
    local m, err = wx:prepay_request("native", prepay{ limit_pay = {} })
    assert.is_nil(m)
    assert.equal("invalid_params", err.kind)
    assert.equal("limit_pay", err.field)
    -- a filled one goes out as an array
    local _, _, b = assert(wx:prepay_request("native",
                                             prepay{ limit_pay = { "no_credit" } }))
    assert.matches('"limit_pay":%["no_credit"%]', b)
  end)

  it("an empty amount.from is invalid_params before any I/O", function()
    local data, err = wx:refund{ out_refund_no = "R123456",
      out_trade_no = "T123456",
      amount = { refund = 1, total = 1, currency = "CNY", from = {} } }
    assert.is_nil(data)
    assert.equal("invalid_params", err.kind)
    assert.equal("amount.from", err.field)
  end)
end)

describe("request bodies keep '/' unescaped (S5)", function()
  it("notify_url is written as given", function()
    assert.equal('{"notify_url":"https://a.example/n"}',
                 transport.encode({ notify_url = "https://a.example/n" }))
  end)
  it("backslashes before a '/' survive, and the JSON decodes the same",
     function()
    for _, s in ipairs({ "a\\/b", "a\\\\/b", "\\", "/", "//", "\\/\\/",
                         "x\\\\\\/y", "\\\"/" }) do
      local out = transport.encode({ s = s })
      -- no escaped "/" once the escaped backslashes are set aside
      assert.is_nil(out:gsub("\\\\", ""):find("\\/", 1, true), out)
      assert.same({ s = s }, json.decode(out))
    end
  end)
  it("any mix of backslashes, slashes and quotes round-trips", function()
    math.randomseed(8)
    local alphabet = { "\\", "/", "a", '"', "\n" }
    for _ = 1, 3000 do
      local t = {}
      for k = 1, math.random(0, 10) do
        t[k] = alphabet[math.random(#alphabet)]
      end
      local v = { [table.concat(t)] = { table.concat(t, "/") } }
      local out = transport.encode(v)
      assert.is_nil(out:gsub("\\\\", ""):find("\\/", 1, true), out)
      assert.same(v, json.decode(out))
    end
  end)
  it("prepay_request sends notify_url unescaped", function()
    local wx = assert(wechatpay.client(base()))
    local _, _, body = assert(wx:prepay_request("native", {
      appid = "wx2421b1c4370ec43b", description = "d",
      out_trade_no = "T123456", amount = { total = 1 },
      notify_url = "https://a.example/wechatpay/notify" }))
    wx:stop()
    assert.truthy(body:find('"https://a.example/wechatpay/notify"', 1, true))
  end)
end)

describe("5xx codes WeChat says not to retry (nit)", function()
  for _, code in ipairs({ "OPENID_MISMATCH", "INVALID_TRANSACTIONID" }) do
    it("500 " .. code .. " is not retryable", function()
      local err = errors.from_response("POST /v3/x", { status = 500,
        body = json.encode({ code = code, message = "m" }) })
      assert.equal("param_error", err.kind)
      assert.equal(code, err.code)
      assert.is_false(err.retryable)
    end)
  end
  it("500 SYSTEM_ERROR and an unknown 5xx stay retryable", function()
    assert.is_true(errors.from_response("GET /v3/x", { status = 500,
      body = '{"code":"SYSTEM_ERROR","message":"m"}' }).retryable)
    assert.is_true(errors.from_response("GET /v3/x", { status = 502,
      body = "bad gateway" }).retryable)
  end)
end)

describe("a refusal that blames the clock says by how much it is off", function()
  local date = "Mon, 07 Dec 2026 06:38:48 GMT"    -- 1796625528
  local function refused(status, code, message, detail, now)
    return errors.from_response("POST /v3/pay/transactions/native", {
      status = status, headers = { date = date },
      body = json.encode({ code = code, message = message, detail = detail })
    }, now)
  end

  it("a SIGN_ERROR over the timestamp: this host 400 s behind", function()
    local err = refused(401, "SIGN_ERROR", "Http头Authorization中的timestamp"
      .. "与发起请求的时间不得超过5分钟", nil, 1796625528.5 - 400)
    assert.equal("sign_error", err.kind)
    assert.equal(-400, err.clock_skew)
    assert.matches("this host's clock is 400 s behind WeChat's, by its Date"
                   .. " header: sync it, NTP", err.message, 1, true)
  end)

  it("a time_expire refused: this host 200 s ahead", function()
    local err = refused(400, "PARAM_ERROR", "输入源“/body/time_expire”映射到"
      .. "值字段“/time_expire”校验失败：订单失效时间应晚于当前时间",
      { field = "/time_expire", location = "body" }, 1796625528.5 + 200)
    assert.equal("param_error", err.kind)
    assert.equal(200, err.clock_skew)
    assert.matches("this host's clock is 200 s ahead of WeChat's",
                   err.message, 1, true)
  end)

  it("says the clocks agree when they do", function()
    local err = refused(401, "SIGN_ERROR", "timestamp too old", nil,
                        1796625529)
    assert.matches("agrees with WeChat's Date header", err.message, 1, true)
  end)

  it("says nothing of the clock for another refusal, or without a Date",
     function()
    local err = refused(401, "SIGN_ERROR", "签名错误", { field = "signature" },
                        1796625528.5 - 400)
    assert.is_nil(err.clock_skew)
    assert.is_nil(err.message:find("clock", 1, true))
    err = errors.from_response("POST /v3/x", { status = 401,
      body = '{"code":"SIGN_ERROR","message":"timestamp"}' }, 1)
    assert.is_nil(err.clock_skew)
  end)
end)
