-- wx:parse_notification: the derived end-to-end known-answer notification,
-- and every failure provoked for real. Notifications are built here with
-- paygate.crypto directly (not with the client's code).
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local wechatpay = require "paygate.wechatpay"
local wxtest = require "support.wxtest"

local FIX = "spec/fixtures/wechatpay/"
local read = wxtest.fixture

local APIV3 = wxtest.APIV3
local PUB_ID = wxtest.PUB_ID

-- the known-answer notification (TRANSACTION.SUCCESS, AES-256-GCM, signed
-- with the official sample key as the WeChat Pay key)
local KAT_CT = "LYUKn3qlhLs+EMh+tyF3lJvg8SJOP4J2r7281BieiORPGu1SQya9roNCRpLrpmBBwyFr9bgF2Dcl6yFJZ+GPjRtz5FOc9nZ78r2u36CB3CJLDx0axvbX0fGVzeUMfvkvQG7hZeLFYFWRG/pwXTJ1/y3IIsw4mmTN7dWZp1Fstnilk6jHRsFSfYRtI+IUQr8wQ99AaA+9z2wNKI4Bm1FAXceqXFAIWngcJME31vwvc7ji2du2l3NwYX6jUjVgSf2417gxe0GAIEzMKaY2yP3PEH0eh1eL5zNuhPZO25Qe2aWiNuPRFJFQS8jSsKIsRwMAR6eG4WmISvlleRC/K4WbVX5sLl7yjYn5Y07xbOldvASrxw5HpkH0Ue5HHNRU6Y8ABAHg9R8RITUji3FRfqy7+gvIt18WZi83t7U33M1Rj1Exv0HnyvXj7Fynk3HbGef/HTCHh+yu0dR8BJ5GW0DWlS5lPMAxBWw4SyU06tRF7XLokpCIYTVEnS9CP6v4HhkMXlhVEFl3obhEUsiWcMSLADgmhG5mh+X2Wx/L1temLKpY6xEuBI9p6da9gUWVfXqVKlM0CcFOzMvyYm1UHCnl"
local KAT_SIG = "C75YhEPOncP+snkd9UCd47AGW/9MkQtoVvvPL7Jn0uuMG80E0S93MvYCt9+bimSSqP8nEAkAMjcZu52o9eNWniPj8hceJyQgCecn1QlaWvxKwo8C1MMyLKFtUL2JMCNAqodyVTpLGo2HUvzD64OMya0KW9Voe6qc0EIryk6YUBQTwZ7R5+3YKxYKwkY53yosFoWbUxBLRbWnRQTSz9O5hJaCWuF+95ZUaQWAFw7iwgaFBIVg/GZRP8IerZ8FIatHpg1vTkeosRtbHxtcZpxvZg+eJncjo8M8E2B/CKtKFhNQxuFQsqhhaygoZ75zkuNWpcQYXTdeLUQCE0xVBvArvQ=="
local KAT_BODY = '{"id":"EV-2018022511223320873","create_time":'
  .. '"2025-01-01T12:00:06+08:00","resource_type":"encrypt-resource",'
  .. '"event_type":"TRANSACTION.SUCCESS","summary":"支付成功","resource":'
  .. '{"original_type":"transaction","algorithm":"AEAD_AES_256_GCM",'
  .. '"ciphertext":"' .. KAT_CT .. '","associated_data":"transaction",'
  .. '"nonce":"0123456789ab"}}'
local KAT_TS = 1735704006

local wechat_key          -- signs notifications (A.1: the public key's half)

-- A notification as WeChat builds it. o: resource (table), apiv3, nonce
-- (resource), aad, id, ts, key, serial, body_hook
local function note(o)
  o = o or {}
  local plain = json.encode(o.resource or { out_trade_no = "T1",
    trade_state = "SUCCESS", amount = { total = 100 } })
  local rnonce = o.nonce or crypto.random_nonce(12)
  local aad = o.aad or "transaction"
  local alg = o.alg or "AEAD_AES_256_GCM"
  local key = o.apiv3 or APIV3
  if alg == "AEAD_SM4_GCM" then key = crypto.sm4_key(key) end
  local ct = crypto.aead_encrypt(alg, key, rnonce, aad, plain)
  if o.truncate then ct = ct:sub(1, #ct - o.truncate) end
  local body = json.encode({ id = o.id or "EV-" .. crypto.random_nonce(8),
    create_time = "2025-01-01T12:00:06+08:00",
    resource_type = "encrypt-resource", event_type = "TRANSACTION.SUCCESS",
    summary = "支付成功", resource = { original_type = "transaction",
      algorithm = alg, ciphertext = crypto.base64_encode(ct),
      associated_data = aad, nonce = rnonce } })
  if o.body_hook then body = o.body_hook(body) end
  local ts = tostring(o.ts or os.time())
  local nonce = crypto.random_nonce(32)
  local sig = crypto.sign_base64(o.key or wechat_key,
                                 ts .. "\n" .. nonce .. "\n" .. body .. "\n")
  local headers = { ["wechatpay-timestamp"] = ts, ["wechatpay-nonce"] = nonce,
                    ["wechatpay-signature"] = sig,
                    ["wechatpay-serial"] = o.serial or PUB_ID }
  if o.sig_type then headers["wechatpay-signature-type"] = o.sig_type end
  return { headers = headers, body = body }
end

local function client(over)
  local k = { merchant_key = FIX .. "a3_merchant_key.pem" }
  local conf = wxtest.client_conf(nil, k, { public_key = FIX .. "a1_pub.pem",
    public_key_id = PUB_ID })
  for kk, v in pairs(over or {}) do conf[kk] = v or nil end
  return assert(wechatpay.client(conf))
end

local NR = { replay = false }

setup(function()
  wechat_key = assert(crypto.private_key(read("a1_merchant_key.pem")))
end)

describe("parse_notification: known answer", function()
  it("verifies, decrypts and parses the derived TRANSACTION.SUCCESS", function()
    local wx = client()
    local ev = assert(wx:parse_notification({ headers = {
      ["Wechatpay-Timestamp"] = tostring(KAT_TS),
      ["Wechatpay-Nonce"] = "5K8264ILTKCH16CQ2502SI8ZNMTM67VS",
      ["Wechatpay-Serial"] = PUB_ID, ["Wechatpay-Signature"] = KAT_SIG },
      body = KAT_BODY }, { replay = false, now = KAT_TS + 10 }))
    assert.equal("EV-2018022511223320873", ev.id)
    assert.equal("TRANSACTION.SUCCESS", ev.event_type)
    assert.equal("encrypt-resource", ev.resource_type)
    assert.equal("支付成功", ev.summary)
    assert.equal("2025-01-01T12:00:06+08:00", ev.create_time)
    assert.equal("1217752501201407033233368018", ev.resource.out_trade_no)
    assert.equal("4200000000202501010000000001", ev.resource.transaction_id)
    assert.equal(100, ev.resource.amount.total)
    assert.equal("SUCCESS", ev.resource.trade_state)
  end)
  it("takes the server's request as it is: headers through req:header, "
     .. "no req.headers table", function()
    local given = {
      ["wechatpay-timestamp"] = tostring(KAT_TS),
      ["wechatpay-nonce"] = "5K8264ILTKCH16CQ2502SI8ZNMTM67VS",
      ["wechatpay-serial"] = PUB_ID, ["wechatpay-signature"] = KAT_SIG }
    local asked = {}
    local req = newproxy(true)
    getmetatable(req).__index = function(_, k)
      if k == "body" then return KAT_BODY end
      if k == "header" then
        -- (as the server's: several names in one call, a value and a
        -- count for each, nil, nil for an absent one)
        return function(_, ...)
          local out, n = {}, select("#", ...)
          for i = 1, n do
            local name = select(i, ...)
            asked[#asked + 1] = name
            local v = given[name:lower()]
            out[2 * i - 1], out[2 * i] = v, v and 1 or nil
          end
          return unpack(out, 1, 2 * n)
        end
      end
      error("req." .. tostring(k) .. " read")   -- req.headers: not built
    end
    local ev = assert(client():parse_notification(req, { replay = false,
                                                          now = KAT_TS + 10 }))
    assert.equal("EV-2018022511223320873", ev.id)
    assert.equal("1217752501201407033233368018", ev.resource.out_trade_no)
    assert.is_true(#asked >= 4)
    -- a userdata that is no request: malformed, never a raise
    local ev2, err = client():parse_notification(io.stdout, NR)
    assert.is_nil(ev2)
    assert.equal("malformed", err.kind)
  end)
  it("at its real age it is stale", function()
    local _, err = client():parse_notification({ headers = {
      ["wechatpay-timestamp"] = tostring(KAT_TS),
      ["wechatpay-nonce"] = "5K8264ILTKCH16CQ2502SI8ZNMTM67VS",
      ["wechatpay-serial"] = PUB_ID, ["wechatpay-signature"] = KAT_SIG },
      body = KAT_BODY }, NR)
    assert.equal("stale_timestamp", err.kind)
  end)
end)

describe("parse_notification: failures", function()
  local wx
  before_each(function() wx = client() end)

  it("a notification signed by another key is bad_signature", function()
    local n = note{ key = assert(crypto.private_key(read("a5_platform_key.pem"))) }
    local _, err = wx:parse_notification(n, NR)
    assert.equal("bad_signature", err.kind)
  end)
  it("a tampered body is bad_signature", function()
    local n = note()
    n.body = n.body:gsub("TRANSACTION", "TRANSACTIoN")
    local _, err = wx:parse_notification(n, NR)
    assert.equal("bad_signature", err.kind)
  end)
  it("the body re-encoded (spaces, key order, escaped unicode) fails",
     function()
    local n = note()
    local doc = json.decode(n.body)
    for _, b in ipairs({ n.body:gsub('","', '", "'),
                         json.encode(doc),                -- key order
                         (n.body:gsub("支", "\\u652f")) }) do
      if b ~= n.body then
        local _, err = wx:parse_notification({ headers = n.headers, body = b },
                                             NR)
        assert.equal("bad_signature", err.kind)
      end
    end
  end)
  it("299 s old is accepted, 300 s old is stale_timestamp", function()
    -- one clock for both ends (a second may tick between them)
    local now = os.time()
    local at = { replay = false, now = now }
    assert(wx:parse_notification(note{ ts = now - 299 }, at))
    local _, err = wx:parse_notification(note{ ts = now - 300 }, at)
    assert.equal("stale_timestamp", err.kind)
    _, err = wx:parse_notification(note{ ts = now + 301 }, at)
    assert.equal("stale_timestamp", err.kind)
  end)
  it("an unknown serial is unknown_serial (no download in public-key mode)",
     function()
    local _, err = wx:parse_notification(note{ serial = wxtest.P1 }, NR)
    assert.equal("unknown_serial", err.kind)
    assert.matches("platform_certificates", err.message)
    _, err = wx:parse_notification(note{ serial = "PUB_KEY_ID_99" }, NR)
    assert.equal("unknown_serial", err.kind)
  end)
  it("a refusal quoting a hostile header is valid UTF-8 text", function()
    -- bytes that are not UTF-8 and a character cut by the 64-byte bound:
    -- the message goes to logs and to records (PostgreSQL refuses a text
    -- that is not UTF-8), so each bad byte is "?" and no cut splits one
    local utf8 = require "paygate.utf8"
    for _, serial in ipairs({ "AB\255\254CD\0",
                              ("x"):rep(62) .. "中文中文" }) do
      local _, err = wx:parse_notification(note{ serial = serial }, NR)
      assert.equal("unknown_serial", err.kind)
      assert.truthy(utf8.len(err.message), err.message)
      assert.is_nil(err.message:find("[%z\1-\31\127]"))
    end
    local _, err = wx:parse_notification(note{ serial = "AB\255\254CD" }, NR)
    assert.matches("AB??CD", err.message, 1, true)
  end)
  it("a wrong APIv3 key is decrypt_failed, naming the APIv3 key", function()
    local _, err = wx:parse_notification(note{
      apiv3 = "0123456789abcdef0123456789abcdef" }, NR)
    assert.equal("decrypt_failed", err.kind)
    assert.matches("APIv3 key", err.message)
    -- by the client's own option names when nothing else is said
    assert.matches("wrong APIv3 key (apiv3_key, previous_apiv3_keys)",
                   err.message, 1, true)
  end)
  it("a wrong APIv3 key is named as the owner's config names it "
     .. "(key_names)", function()
    -- was: always "(apiv3_key, previous_apiv3_keys)", options the
    -- reference gateway's config refuses (it has apiv3_key_file)
    local wx2 = client{ key_names = {
      apiv3_key = "merchants[2].apiv3_key_file",
      previous_apiv3_keys = "merchants[2].previous_apiv3_key_files" } }
    local _, err = wx2:parse_notification(note{
      apiv3 = "0123456789abcdef0123456789abcdef" }, NR)
    assert.equal("decrypt_failed", err.kind)
    assert.matches("wrong APIv3 key (merchants[2].apiv3_key_file, "
                   .. "merchants[2].previous_apiv3_key_files)", err.message,
                   1, true)
    assert.is_nil(err.message:find(APIV3, 1, true))
    -- no place for previous keys (paygate certs --download): none named
    local wx3 = client{ key_names = { apiv3_key = "--apiv3-key-file",
                                      previous_apiv3_keys = false } }
    _, err = wx3:parse_notification(note{
      apiv3 = "0123456789abcdef0123456789abcdef" }, NR)
    assert.equal("decrypt_failed", err.kind)
    assert.matches("wrong APIv3 key (--apiv3-key-file) or altered",
                   err.message, 1, true)
  end)
  it("the previous APIv3 key still decrypts after a rotation", function()
    local new = "NEWKEY0123456789abcdef0123456789"
    local wx2 = client{ apiv3_key = new, previous_apiv3_keys = { APIV3 } }
    assert(wx2:parse_notification(note(), NR))
    assert(wx2:parse_notification(note{ apiv3 = new }, NR))
    local _, err = client{ apiv3_key = new }:parse_notification(note(), NR)
    assert.equal("decrypt_failed", err.kind)
  end)
  it("a 13-character resource nonce (the doc example's) decrypts", function()
    local ev = assert(wx:parse_notification(note{ nonce = "fdasflkja484w" },
                                            NR))
    assert.equal("T1", ev.resource.out_trade_no)
    assert(wx:parse_notification(note{ nonce = "0123456789abcdef" }, NR))
  end)
  it("a truncated ciphertext is decrypt_failed", function()
    for _, cut in ipairs({ 1, 16, 40 }) do
      local _, err = wx:parse_notification(note{ truncate = cut }, NR)
      assert.equal("decrypt_failed", err.kind)
    end
  end)
  it("a changed associated_data is decrypt_failed", function()
    local n = note{ body_hook = function(b)
      return (b:gsub('"associated_data":"transaction"',
                     '"associated_data":"refund"')) end }
    local _, err = wx:parse_notification(n, NR)
    assert.equal("decrypt_failed", err.kind)
  end)
  it("bad JSON, bad base64, missing resource or headers are malformed",
     function()
    local cases = {
      note{ body_hook = function() return "{not json" end },
      note{ body_hook = function(b)
        return (b:gsub('"ciphertext":"', '"ciphertext":"%%')) end },
      note{ body_hook = function() return '{"id":"x"}' end },
      note{ body_hook = function(b)
        return (b:gsub('"nonce":"%w+"', '"nonce":""')) end },
      note{ body_hook = function(b)
        return (b:gsub('AEAD_AES_256_GCM', 'AEAD_XYZ')) end },
    }
    for i, n in ipairs(cases) do
      local _, err = wx:parse_notification(n, NR)
      assert.equal("malformed", err.kind, "case " .. i)
    end
    local n = note()
    n.headers["wechatpay-nonce"] = nil
    local _, err = wx:parse_notification(n, NR)
    assert.equal("malformed", err.kind)
  end)
  -- a notification whose resource decrypts to the bytes plain
  local function with_plaintext(plain)
    local rnonce = "abcdefabcdef"
    local ct = crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3, rnonce,
                                   "transaction", plain)
    return note{ body_hook = function(b)
      local d = json.decode(b)
      d.resource.nonce = rnonce
      d.resource.ciphertext = crypto.base64_encode(ct)
      return json.encode(d)
    end }
  end
  it("a plaintext that is not JSON is malformed", function()
    local _, err = wx:parse_notification(with_plaintext("not json"), NR)
    assert.equal("malformed", err.kind)
  end)
  it("a plaintext that is a JSON array is malformed, not a resource",
     function()
    for _, plain in ipairs{ '[1,2]', '[{"out_trade_no":"T1"}]', '["x"]',
                            '[]', ' [ ] ' } do
      local res, err = wx:parse_notification(with_plaintext(plain), NR)
      assert.is_nil(res, plain)
      assert.equal("malformed", err.kind, plain)
      assert.equal("notification: decrypted resource is not a JSON object",
                   err.message)
    end
  end)
  it("a plaintext with a non-JSON or overflowing number is malformed",
     function()
    for _, plain in ipairs{ '{"out_trade_no":"T1","amount":{"total":Infinity}}',
                            '{"out_trade_no":"T1","amount":{"total":1e999}}',
                            '{"out_trade_no":"T1","amount":{"total":0x10}}' } do
      local res, err = wx:parse_notification(with_plaintext(plain), NR)
      assert.is_nil(res, plain)
      assert.equal("malformed", err.kind, plain)
    end
  end)
  it("a resource field of the wrong type, or no id or event_type, is"
     .. " malformed", function()
    -- signed and encrypted as WeChat would: a handler must still never
    -- get a table as an id or "lots" as an amount
    local bad = {
      { transaction_id = { a = 1 } }, { out_trade_no = 5 },
      { trade_state = true }, { amount = { total = 100, payer_total = "lots" } },
      { amount = { total = 100, payer_total = -5 } },
      { amount = { total = 1.5 } }, { amount = "100" },
      { amount = { total = 100, currency = {} } }, { payer = "x" },
      { success_time = 1 }, { refund_id = { a = 1 } },
    }
    for i, over in ipairs(bad) do
      local r = { out_trade_no = "T1", trade_state = "SUCCESS",
                  amount = { total = 100 } }
      for k, v in pairs(over) do r[k] = v end
      local res, err = wx:parse_notification(note{ resource = r }, NR)
      assert.is_nil(res, i)
      assert.equal("malformed", err.kind, i)
      assert.matches("resource field", err.message, 1, true)
      assert.is_nil(err.message:find("lots", 1, true))
      assert.is_nil(err.message:find("table: 0x", 1, true))
    end
    -- nulls and absent fields are fine; so are other products' resources
    local ok = assert(wx:parse_notification(note{ resource = {
      out_trade_no = "T1", trade_state = "SUCCESS", transaction_id = json.null,
      amount = { total = 100, payer_total = 0 } } }, NR))
    assert.equal("T1", ok.resource.out_trade_no)
    for _, field in ipairs({ "id", "event_type" }) do
      for _, v in ipairs({ json.null, 5, "" }) do
        local n = note{ body_hook = function(b)
          local d = json.decode(b)
          d[field] = v
          return json.encode(d)
        end }
        local res, err = wx:parse_notification(n, NR)
        assert.is_nil(res, field)
        assert.equal("malformed", err.kind, field)
        assert.matches("no " .. field, err.message, 1, true)
      end
    end
  end)

  it("a SIGNTEST probe is bad_signature", function()
    local n = note()
    n.headers["wechatpay-signature"] = "WECHATPAY/SIGNTEST/" .. crypto.random_nonce(40)
    local _, err = wx:parse_notification(n, NR)
    assert.equal("bad_signature", err.kind)
  end)
  it("never raises on 10,000 random byte strings as headers and bodies",
     function()
    local rb = crypto.random_bytes
    local good = note()
    for i = 1, 10000 do
      local h = {}
      for k, v in pairs(good.headers) do
        if (i + #k) % 3 ~= 0 then h[k] = v else h[k] = rb(i % 64) end
      end
      if i % 17 == 0 then h = rb(5) end
      local body = (i % 4 == 0) and good.body:sub(1, i % #good.body)
                   or rb(i % 512)
      local req = i % 23 == 0 and rb(3) or { headers = h, body = body }
      local ok, ev, err = pcall(wx.parse_notification, wx, req, NR)
      assert(ok, ev)
      assert.is_nil(ev)
      assert.is_truthy(err.kind)
      -- refused by a check, never by a Lua error caught inside (internal)
      assert(err.kind ~= "internal", tostring(err))
    end
  end)
end)

describe("parse_notification: SM variant", function()
  it("verifies SM2-with-SM3 and decrypts SM4-GCM", function()
    local dir = require("support.server").tmpdir()
    assert(os.execute("openssl genpkey -algorithm SM2 -out " .. dir
                      .. "/sm2.pem 2>/dev/null && openssl pkey -in " .. dir
                      .. "/sm2.pem -pubout -out " .. dir .. "/sm2pub.pem"))
    local sm_key = assert(crypto.private_key(io.open(dir .. "/sm2.pem"):read("*a")))
    local wx = assert(wechatpay.client{ mchid = "1900000001",
      sign_type = "WECHATPAY2-SM2-WITH-SM3",
      merchant_private_key = FIX .. "a10a_sm2_key.pem",
      merchant_certificate = FIX .. "a10b_sm2_cert.pem", apiv3_key = APIV3,
      public_key = dir .. "/sm2pub.pem", public_key_id = PUB_ID })
    local n = note{ key = sm_key, alg = "AEAD_SM4_GCM",
                    sig_type = "WECHATPAY2-SM2-WITH-SM3" }
    local ev = assert(wx:parse_notification(n, NR))
    assert.equal("T1", ev.resource.out_trade_no)
    -- without the type header the notification is RSA's (the header's
    -- default), not this SM client's: refused, though the SM2 signature
    -- itself would verify
    n = note{ key = sm_key, alg = "AEAD_SM4_GCM" }
    local _, terr = wx:parse_notification(n, NR)
    assert.equal("bad_signature", terr.kind)
    assert.equal("signature_type_mismatch", terr.cause_kind)
    assert.matches("no Wechatpay%-Signature%-Type, which means "
                   .. "WECHATPAY2%-SHA256%-RSA2048", terr.message)
    -- an RSA signature type against the SM2 key is refused
    n = note{ key = sm_key, alg = "AEAD_SM4_GCM",
              sig_type = "WECHATPAY2-SHA256-RSA2048" }
    local _, err = wx:parse_notification(n, NR)
    assert.equal("bad_signature", err.kind)
    assert.equal("signature_type_mismatch", err.cause_kind)
    os.execute("rm -rf " .. dir)
  end)

  it("an SM-typed notification to an RSA client is the other variant's, "
     .. "whatever its serial", function()
    local wx = client()
    -- under a certificate serial this client never saw: refused for its
    -- type, not as a serial to look for
    local n = note{ alg = "AEAD_SM4_GCM", sig_type = "WECHATPAY2-SM2-WITH-SM3",
                    serial = "3F1E989910B253E069A11568C91C57CA44568158" }
    local _, err = wx:parse_notification(n, NR)
    assert.equal("bad_signature", err.kind)
    assert.equal("signature_type_mismatch", err.cause_kind)
    assert.matches("configured for WECHATPAY2%-SHA256%-RSA2048", err.message)
    -- the RSA type named explicitly is this client's: it verifies
    n = note{ sig_type = "WECHATPAY2-SHA256-RSA2048" }
    assert(wx:parse_notification(n, NR))
  end)
end)

describe("notify_ack / notify_fail", function()
  it("answer 204 and 500 with WeChat's FAIL body", function()
    local s, b = wechatpay.notify_ack()
    assert.equal(204, s)
    assert.equal("", b)
    s, b = wechatpay.notify_fail("db down")
    assert.equal(500, s)
    assert.same({ code = "FAIL", message = "db down" }, b)
    s, b = wechatpay.notify_fail("bad_signature", 401)
    assert.equal(401, s)
    assert.same({ code = "FAIL", message = "bad_signature" }, b)
    for _, bad in ipairs({ 200, 204, 302, 600, 401.5, "401" }) do
      assert.has_error(function() wechatpay.notify_fail("x", bad) end,
                       "wechatpay.notify_fail: status must be a 4xx or 5xx code")
    end
  end)
end)

describe("the replay cache", function()
  it("uses a dict of its own by default (wechatpay_replay)", function()
    local wx = client()
    assert.equal("wechatpay_replay", wx.replay_dict_name)
    local n = note()
    assert(wx:parse_notification(n))
    local _, err = wx:parse_notification(n)
    assert.equal("replayed", err.kind)
    wx:stop()
  end)

  it("keeps a record until the notification's timestamp leaves the window"
     .. " (a clock ahead of ours makes it fresh for up to 600 s)", function()
    local wx = client()
    local real = wx.replay_dict
    local ttls = {}
    -- the real dict behind a spy on the ttl each record is given
    wx.replay_dict = setmetatable({ safe_add = function(_, k, v, ttl)
      ttls[#ttls + 1] = ttl
      return real:safe_add(k, v, ttl)
    end }, { __index = real })
    local now = os.time()
    local ahead = note{ ts = now + 299 }
    assert(wx:parse_notification(ahead, { now = now }))
    -- fresh until now + 299 + 300: the record must live at least that
    assert.is_true(ttls[1] >= 599, "ttl " .. tostring(ttls[1]))
    local _, err = wx:parse_notification(ahead, { now = now + 598 })
    assert.equal("replayed", err.kind)
    assert(wx:parse_notification(note{ ts = now - 299 }, { now = now }))
    assert.is_true(ttls[2] >= 1 and ttls[2] <= 330, tostring(ttls[2]))
    wx.replay_dict = real
    wx:stop()
  end)

  it("a full dict refuses (replay_check_unavailable) and never evicts a "
     .. "record, so a replay stays refused", function()
    local d = require("paygate.shared").get_dict("spec_replay_full", "32k")
    local wx = client{ replay_dict = "spec_replay_full" }
    assert.equal("spec_replay_full", wx.replay_dict_name)
    local first = note()
    assert(wx:parse_notification(first))
    local accepted, err = 1, nil
    while accepted < 2000 do
      local ev
      ev, err = wx:parse_notification(note())
      if not ev then break end
      accepted = accepted + 1
    end
    assert.is_table(err, "the dict never filled")
    assert.equal("replay_check_unavailable", err.kind)
    assert.is_true(err.retryable)
    assert.is_true(accepted > 100)
    local _, rerr = wx:parse_notification(first)
    assert.equal("replayed", rerr.kind)
    assert.equal(0, d:stats().evictions)
    -- { replay = false } still parses
    assert(wx:parse_notification(note(), NR))
    wx:stop()
  end)
end)

describe("wx:notification_facts", function()
  local wx
  before_each(function() wx = client() end)

  it("of a notification signed by another key: authentic, with its order",
     function()
    local n = note{ key = assert(crypto.private_key(read("a5_platform_key.pem"))),
                    id = "EV-facts-1", resource = { out_trade_no = "T-facts",
                    transaction_id = "4200", trade_state = "SUCCESS" } }
    local _, err = wx:parse_notification(n, NR)
    assert.equal("bad_signature", err.kind)
    local f = wx:notification_facts(n)
    assert.is_true(f.authentic)
    assert.equal("T-facts", f.out_trade_no)
    assert.equal("4200", f.transaction_id)
    assert.equal("SUCCESS", f.trade_state)
    assert.equal("EV-facts-1", f.id)
    assert.equal("TRANSACTION.SUCCESS", f.event_type)
    assert.equal(PUB_ID, f.serial)
    assert.equal(n.headers["wechatpay-timestamp"], f.timestamp)
    -- nothing else of the decrypted resource is handed out
    assert.is_nil(f.amount)
    assert.is_nil(f.resource)
  end)
  it("of one encrypted with another APIv3 key: not authentic, no order",
     function()
    local n = note{ apiv3 = ("k"):rep(32), id = "EV-facts-2" }
    local f = wx:notification_facts(n)
    assert.is_false(f.authentic)
    assert.is_nil(f.out_trade_no)
    assert.equal("EV-facts-2", f.id)
  end)
  it("never raises, and keeps no markup or control bytes", function()
    for _, req in ipairs({ nil, 5, {}, { headers = 5, body = {} },
        { headers = {}, body = "not json" },
        { headers = { ["Wechatpay-Serial"] = "<b>\1\n" },
          body = '{"id":"<script>","event_type":"' .. ("x"):rep(100)
                 .. '","resource":7}' } }) do
      local f = wx:notification_facts(req)
      assert.is_false(f.authentic)
      assert.is_nil(f.id)
      assert.is_nil(f.event_type)
      if f.serial then assert.equal("<b>??", f.serial) end
    end
  end)
end)
