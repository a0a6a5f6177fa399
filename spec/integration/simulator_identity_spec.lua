-- The simulator's identity: /v3/certificates, the verifier modes (platform
-- certificates, public key, migration), rotation, the SM variant; and the
-- injected faults and the request log of its control API.
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"
local sc = require "support.simclient"

local function start(extra, o)
  local dir = server.tmpdir()
  local s = server.start{ app = "examples/simulator",
    config = (o and o.config or sc.config)(dir .. "/state", extra) }
  local base = "http://127.0.0.1:" .. s.port
  local c = sc.new{ base = base, key = o and o.key, serial = o and o.serial,
                    schema = o and o.schema }
  return s, c, base, dir
end

local function stop(s, dir)
  s:stop()
  os.execute("rm -rf " .. dir)
end

local function body(no)
  return { appid = sc.APPID, mchid = sc.MCHID, description = "x",
           out_trade_no = no, notify_url = "https://m.example/n",
           amount = { total = 1 }, payer = { openid = "o1" } }
end

-- An ABNORMAL refund of a fresh order, then apply-abnormal-refund with the
-- bank fields encrypted for key and Wechatpay-Serial = serial.
local function apply_abnormal(c, base, no, serial, key)
  assert.equal(200, c:call("POST", "/v3/pay/transactions/jsapi",
                           body(no)).status)
  assert.equal(200, sc.control(base, "POST", "/sim/transactions/" .. no
                               .. "/pay", {}).status)
  local r = c:call("POST", "/v3/refund/domestic/refunds", {
    out_trade_no = no, out_refund_no = no .. "-r",
    amount = { refund = 1, total = 1, currency = "CNY" } })
  assert.equal(200, r.status, r.body)
  assert.equal(200, sc.control(base, "POST", "/sim/refunds/" .. no
                               .. "-r/settle", { status = "ABNORMAL" }).status)
  local function enc(v)
    return crypto.base64_encode(assert(crypto.oaep_encrypt(key, v)))
  end
  return c:call("POST", "/v3/refund/domestic/refunds/" .. r.json.refund_id
    .. "/apply-abnormal-refund", { out_refund_no = no .. "-r",
    type = "USER_BANK_CARD", bank_type = "ICBC_DEBIT",
    bank_account = enc("6212260000000000000"), real_name = enc("张三") },
    { headers = { ["Wechatpay-Serial"] = serial } })
end

describe("simulator: platform certificates mode", function()
  local s, c, base, dir
  setup(function() s, c, base, dir = start("workers = 2, rotation_delay = 1,") end)
  teardown(function() stop(s, dir) end)

  local function download()
    local res = c:call("GET", "/v3/certificates")
    assert.equal(200, res.status, res.body)
    local certs = {}
    for _, d in ipairs(res.json.data) do
      local e = d.encrypt_certificate
      assert.equal("AEAD_AES_256_GCM", e.algorithm)
      assert.equal("certificate", e.associated_data)
      assert.equal(12, #e.nonce)
      local pem = assert(sc.decrypt(e, sc.APIV3))
      local cert = assert(x509.load(pem))
      assert.equal(d.serial_no, cert:serial())
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT.*%+08:00$", d.effective_time)
      assert.matches("CN=Tenpay.com sign", cert:subject(), 1, true)
      assert.equal("RSA", cert:key_type())
      certs[d.serial_no] = cert
    end
    return certs, res
  end

  it("serves its certificates encrypted; the answer verifies with them",
     function()
    local certs, res = download()
    local ok, serial = sc.verify(res, certs)
    assert(ok, serial)
    assert.equal(40, #serial)
    -- the other merchant's APIv3 key does not open them
    local e = res.json.data[1].encrypt_certificate
    assert.is_nil(sc.decrypt(e, sc.APIV3_2))
  end)

  it("rotates: the new one is served at once, used after the delay",
     function()
    local before = download()
    local old
    for k in pairs(before) do old = k end
    local r = sc.control(base, "POST", "/sim/certificates/rotate", {})
    assert.equal(200, r.status, r.body)
    local new = r.json.serial_no
    assert.not_equal(old, new)
    local certs, res = download()
    assert.truthy(certs[old])
    assert.truthy(certs[new])
    -- still signed by the old one (rotation_delay = 1 s) ...
    local _, serial = sc.verify(res, certs)
    assert.equal(old, serial)
    -- ... and by the new one once the delay has passed
    assert(proc.wait_until(function()
      local q = c:call("GET", "/v3/certificates")
      local ok, sn = sc.verify(q, certs)
      return ok and sn == new
    end, 10, "responses signed by the new certificate"))
    -- the control API lists both
    local list = sc.control(base, "GET", "/sim/platform-certificates").json
    assert.equal(2, #list)
  end)

  it("signs with the certificate the request's Wechatpay-Serial names",
     function()
    local certs = download()
    for serial in pairs(certs) do
      local res = c:call("GET", "/v3/certificates", nil,
                         { headers = { ["Wechatpay-Serial"] = serial } })
      local ok, sn = sc.verify(res, certs)
      assert(ok, sn)
      assert.equal(serial, sn)
    end
  end)

  it("takes sensitive fields encrypted for a platform certificate only",
     function()
    -- the merchant has not enabled the WeChat Pay public key: fields
    -- encrypted for it are refused as WeChat would
    local keys, pub_id = c:platform_keys()
    local res = apply_abnormal(c, base, "pc-abn-001", pub_id, keys[pub_id])
    assert.equal(400, res.status, res.body)
    assert.equal("PARAM_ERROR", res.json.code)
    assert.equal("Wechatpay-Serial", res.json.detail.field)
    local serial = next((download()))
    res = apply_abnormal(c, base, "pc-abn-002", serial, keys[serial])
    assert.equal(200, res.status, res.body)
  end)
end)

describe("simulator: public key mode", function()
  local s, c, base, dir
  setup(function()
    s, c, base, dir = start("workers = 1, verifier_mode = 'public_key',")
  end)
  teardown(function() stop(s, dir) end)

  it("signs with the public key and has no certificates", function()
    local keys, pub_id = c:platform_keys()
    assert.matches("^PUB_KEY_ID_%d+$", pub_id)
    local res = c:call("POST", "/v3/pay/transactions/jsapi", body("pk-000001"))
    local ok, serial = sc.verify(res, keys)
    assert(ok, serial)
    assert.equal(pub_id, serial)
    res = c:call("GET", "/v3/certificates")
    assert.equal(404, res.status)
    assert.equal("RESOURCE_NOT_EXISTS", res.json.code)
    assert.matches("微信支付公钥", res.json.message, 1, true)
  end)

  it("takes sensitive fields encrypted for the public key only", function()
    -- the merchant has no platform certificate (its /v3/certificates is
    -- 404): fields encrypted for one, named by Wechatpay-Serial, are
    -- refused as WeChat would
    local keys, pub_id = c:platform_keys()
    local serial, cert = next(keys)
    while serial == pub_id do serial, cert = next(keys, serial) end
    local res = apply_abnormal(c, base, "pk-abn-001", serial, cert)
    assert.equal(400, res.status, res.body)
    assert.equal("PARAM_ERROR", res.json.code)
    assert.equal("Wechatpay-Serial", res.json.detail.field)
    res = apply_abnormal(c, base, "pk-abn-002", pub_id, keys[pub_id])
    assert.equal(200, res.status, res.body)
    assert.equal("PROCESSING", res.json.status)
  end)
end)

describe("simulator: migration mode (both)", function()
  local s, c, base, dir
  setup(function() s, c, base, dir = start("workers = 1, verifier_mode = 'both',") end)
  teardown(function() stop(s, dir) end)

  it("signs with the key type the request's Wechatpay-Serial names",
     function()
    local keys, pub_id = c:platform_keys()
    local res = c:call("GET", "/v3/certificates", nil,
                       { headers = { ["Wechatpay-Serial"] = pub_id } })
    local ok, serial = sc.verify(res, keys)
    assert(ok, serial)
    assert.equal(pub_id, serial)
    res = c:call("GET", "/v3/certificates")
    ok, serial = sc.verify(res, keys)
    assert(ok, serial)
    assert.equal(40, #serial)
    assert.equal(1, #res.json.data)
  end)
end)

describe("simulator: the SM variant", function()
  local s, c, base, dir
  local sm_conf = function(state, extra)
    return ([[return { merchants = { { mchid = %q,
      merchant_certificate = %q, apiv3_key = %q, appids = { %q } } },
      state_dir = %q, sign_type = "WECHATPAY2-SM2-WITH-SM3", %s }]]):format(
      sc.MCHID, sc.sm2_merchant_cert(), sc.APIV3, sc.APPID,
      state, extra or "")
  end
  setup(function()
    s, c, base, dir = start("workers = 1,", { config = sm_conf,
      schema = sc.SM2, serial = "54E7F59ED8DF4570CFB14780EA8152D45A675EE6",
      key = assert(crypto.private_key(sc.read(sc.FIX .. "a10a_sm2_key.pem")))
    })
  end)
  teardown(function() stop(s, dir) end)

  it("checks SM2 request signatures and signs with SM2", function()
    local res = c:call("GET", "/v3/certificates?algorithm_type=SM2")
    assert.equal(200, res.status, res.body)
    assert.equal(sc.SM2, res.headers["wechatpay-signature-type"])
    local certs = {}
    for _, d in ipairs(res.json.data) do
      assert.equal("AEAD_SM4_GCM", d.encrypt_certificate.algorithm)
      local cert = assert(x509.load(assert(sc.decrypt(d.encrypt_certificate,
                                                       sc.APIV3))))
      assert.equal("SM2", cert:key_type())
      certs[d.serial_no] = cert
    end
    assert(sc.verify(res, certs, sc.SM2))
    -- an RSA scheme is refused
    local r2 = c:call("GET", "/v3/certificates", nil, { schema = sc.RSA })
    assert.equal(401, r2.status)
  end)
end)

describe("simulator: faults and the request log", function()
  local s, c, base, dir, keys
  setup(function()
    s, c, base, dir = start("workers = 2,")
    keys = c:platform_keys()
  end)
  teardown(function() stop(s, dir) end)
  before_each(function()
    assert.equal(204, sc.control(base, "DELETE", "/sim/faults").status)
  end)

  local function fault(f)
    local r = sc.control(base, "POST", "/sim/faults", f)
    assert.equal(200, r.status, r.body)
    return r.json
  end

  it("answers an error a given number of times, then normally", function()
    fault{ endpoint = "prepay", kind = "error", status = 500, count = 2 }
    for i = 1, 2 do
      local r = c:call("POST", "/v3/pay/transactions/jsapi",
                       body("ft-err-000" .. i))
      assert.equal(500, r.status)
      assert.equal("SYSTEM_ERROR", r.json.code)
    end
    local r = c:call("POST", "/v3/pay/transactions/jsapi", body("ft-err-0003"))
    assert(sc.verify(r, keys))
    -- the failed ones were not created
    r = c:call("GET", "/v3/pay/transactions/out-trade-no/ft-err-0001?mchid="
               .. sc.MCHID)
    assert.equal(404, r.status)
    local list = sc.control(base, "GET", "/sim/faults").json
    assert.equal(2, list[1].fired)
  end)

  it("injects FREQUENCY_LIMITED and NOT_ENOUGH", function()
    fault{ endpoint = "query", kind = "error", status = 429, count = 1 }
    fault{ endpoint = "refund", kind = "error", status = 403,
           code = "NOT_ENOUGH", message = "余额不足", count = 1 }
    local r = c:call("GET", "/v3/pay/transactions/out-trade-no/whatever?mchid="
                     .. sc.MCHID)
    assert.equal(429, r.status)
    assert.equal("FREQUENCY_LIMITED", r.json.code)
    r = c:call("POST", "/v3/refund/domestic/refunds", { out_trade_no = "x",
      out_refund_no = "y", amount = { refund = 1, total = 1, currency = "CNY" } })
    assert.equal(403, r.status)
    assert.equal("NOT_ENOUGH", r.json.code)
  end)

  it("delays an answer", function()
    fault{ endpoint = "certificates", kind = "latency", seconds = 0.6,
           count = 1 }
    local core = require "paygate.core"
    local t0 = core.mono()
    local r = c:call("GET", "/v3/certificates")
    assert.equal(200, r.status)
    -- timers on two loops and clocks: a few ms either way
    assert.is_true(core.mono() - t0 >= 0.55)
    r = c:call("GET", "/v3/certificates")     -- count = 1: not again
    assert.equal(200, r.status)
    assert.equal(1, sc.control(base, "GET", "/sim/faults").json[1].fired)
  end)

  it("mangles a response after doing the work", function()
    fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
    fault{ endpoint = "query", kind = "stale_timestamp", count = 1 }
    fault{ endpoint = "close", kind = "unknown_serial", count = 1 }
    local r = c:call("POST", "/v3/pay/transactions/jsapi", body("ft-bad-0001"))
    assert.equal(200, r.status)
    local ok, why = sc.verify(r, keys)
    assert.is_nil(ok)
    assert.equal("bad_signature", why)
    -- the order was created all the same
    r = c:call("GET", "/v3/pay/transactions/out-trade-no/ft-bad-0001?mchid="
               .. sc.MCHID)
    assert.equal(200, r.status)
    ok, why = sc.verify(r, keys)
    assert.equal("stale", why)
    r = c:call("POST", "/v3/pay/transactions/out-trade-no/ft-bad-0001/close",
               { mchid = sc.MCHID })
    assert.equal(204, r.status)
    ok, why = sc.verify(r, keys)
    assert.equal("unknown_serial", why)
    -- and the next answers verify
    r = c:call("GET", "/v3/pay/transactions/out-trade-no/ft-bad-0001?mchid="
               .. sc.MCHID)
    assert(sc.verify(r, keys))
    assert.equal("CLOSED", r.json.trade_state)
  end)

  it("answers an error after creating the order (an unknown outcome)",
     function()
    fault{ endpoint = "prepay", kind = "error", status = 500, after = true,
           count = 1 }
    local r = c:call("POST", "/v3/pay/transactions/jsapi", body("ft-after-01"))
    assert.equal(500, r.status)
    r = c:call("GET", "/v3/pay/transactions/out-trade-no/ft-after-01?mchid="
               .. sc.MCHID)
    assert.equal(200, r.status)
    assert.equal("NOTPAY", r.json.trade_state)
  end)

  it("sends a SIGNTEST probe", function()
    fault{ endpoint = "*", kind = "bad_signature", signtest = true,
           count = 1 }
    local r = c:call("GET", "/v3/certificates")
    assert.matches("^WECHATPAY/SIGNTEST/", r.headers["wechatpay-signature"])
    assert.is_nil(sc.verify(r, keys))
  end)

  it("refuses a bad fault", function()
    local r = sc.control(base, "POST", "/sim/faults", { endpoint = "x",
                                                        kind = "gremlins" })
    assert.equal(400, r.status)
    r = sc.control(base, "POST", "/sim/faults", { endpoint = "x",
      kind = "error", count = 0 })
    assert.equal(400, r.status)
  end)

  it("lists the requests it received, from every worker", function()
    local n0 = #sc.control(base, "GET", "/sim/requests").json
    for i = 1, 6 do c:call("GET", "/v3/certificates?i=" .. i) end
    c:call("GET", "/v3/certificates", nil, { mchid = "42" })
    local l = sc.control(base, "GET", "/sim/requests").json
    assert.equal(n0 + 7, #l)
    local last = l[#l]
    assert.equal("GET", last.method)
    assert.equal("/v3/certificates", last.target)
    assert.equal(401, last.status)
    assert.equal("SIGN_ERROR", last.code)
    assert.equal("/v3/certificates?i=6", l[#l - 1].target)
    assert.equal(sc.MCHID, l[#l - 1].mchid)
    local since = sc.control(base, "GET", "/sim/requests?since="
                             .. l[#l - 1].seq).json
    assert.equal(1, #since)
    -- a since that is no seq is refused, not read as "all of them"
    for _, bad in ipairs({ "abc", "-1", "1.5", "1e3" }) do
      local r = sc.control(base, "GET", "/sim/requests?since=" .. bad)
      assert.equal(400, r.status, bad)
      assert.equal("PARAM_ERROR", r.json.code)
    end
  end)
end)

describe("simulator: control = false", function()
  it("serves no /sim/ route", function()
    local s, c, base, dir = start("workers = 1, control = false,")
    local r = sc.control(base, "GET", "/sim/public-key")
    local r2 = c:call("GET", "/v3/certificates")
    stop(s, dir)
    assert.equal(404, r.status)
    assert.equal(200, r2.status)
  end)
end)
