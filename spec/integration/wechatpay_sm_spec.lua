-- The ShangMi variant (sign_type WECHATPAY2-SM2-WITH-SM3) against
-- spec/support/wxserver in its SM mode: requests signed with SM2/SM3,
-- /v3/certificates?algorithm_type=SM2 answered with SM2 certificates in
-- AEAD_SM4_GCM, answers signed with SM2, a rotation, a wrong APIv3 key,
-- an SM4-GCM notification and SM2 sensitive-field encryption.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local wxtest = require "support.wxtest"

local S1, S2 = wxtest.S1, wxtest.S2
local CERTS = "/v3/certificates?algorithm_type=SM2"

local dir, keys, srv

local function count(target) return wxtest.count(srv, nil, target) end

local function client(over) return wxtest.client(srv, keys, over) end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

setup(function() dir, keys, srv = wxtest.serve(wxtest.make_sm) end)

teardown(function() wxtest.stop(srv, dir) end)

before_each(function() wxtest.fresh(srv, S1) end)

describe("the SM variant against a server", function()
  it("downloads the SM2 certificates (SM4-GCM) and verifies SM2 answers",
     function()
    local wx = client()
    assert.equal(1, count(CERTS))
    assert.equal(0, count("/v3/certificates"))
    assert.same({ S1 }, wx:certificate_status().serials)
    local res = assert(wx:request("POST", "/v3/echo", '{"a":1}'))
    assert.equal(200, res.status)
    local reqs = wxtest.requests(srv)
    local r = reqs[#reqs]
    assert.equal("ok", r.auth)            -- the server checked SM2/SM3
    assert.matches("^WECHATPAY2%-SM2%-WITH%-SM3 ", r.headers.authorization)
    assert.equal(S1, r.headers["wechatpay-serial"])
    wx:stop()
  end)

  it("the server keeps RSA and SM2 apart (the query is what selects)",
     function()
    -- asking without algorithm_type gets the RSA list: none here
    local wx = client()
    local res = assert(wx:request("GET", "/v3/certificates"))
    assert.same({}, res.json.data)
    res = assert(wx:request("GET", CERTS))
    assert.equal(1, #res.json.data)
    assert.equal("AEAD_SM4_GCM",
                 res.json.data[1].encrypt_certificate.algorithm)
    wx:stop()
  end)

  it("a rotated-in SM2 certificate: one download, then both verify",
     function()
    local wx = client()
    wxtest.certs(srv, { serials = { S1, S2 } })
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = { serial = S2 } },
      { body = "{}", sign = { serial = S1 } } })
    assert(wx:request("GET", "/v3/x"))
    assert(wx:request("GET", "/v3/x"))
    assert.equal(2, count(CERTS))
    assert.same({ S1, S2 }, wx:certificate_status().serials)
    assert.equal(S2, wx:certificate_status().newest)
    wx:stop()
  end)

  it("an answer that names no Wechatpay-Signature-Type is RSA's: refused, "
     .. "though its SM2 signature verifies", function()
    -- the header is optional and its absence means
    -- WECHATPAY2-SHA256-RSA2048: an SM client never takes an untyped
    -- answer as its own
    local wx = client()
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}",
                                          sign = { sig_type = false } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("bad_signature", err.kind)
    assert.equal("signature_type_mismatch", err.cause_kind)
    assert.matches("no Wechatpay%-Signature%-Type, which means "
                   .. "WECHATPAY2%-SHA256%-RSA2048", err.message)
    assert.equal(1, count(CERTS))             -- no download for it
    -- the same answer naming its type verifies
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}" } })
    assert(wx:request("GET", "/v3/x"))
    wx:stop()
  end)

  it("an answer signed with the wrong SM2 key is bad_signature", function()
    local wx = client()
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = {
      serial = S1, signature = crypto.sign_base64(
        crypto.private_key(read(keys.s2_key)), "1\n2\n{}\n") } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("bad_signature", err.kind)
    wx:stop()
  end)

  it("an answer typed RSA (another variant's) is refused as such, "
     .. "with no certificate download", function()
    -- an SM merchant answered under an RSA platform certificate: the
    -- serial is none of its SM2 ones, the header says RSA. The type is
    -- what is wrong, not a certificate to fetch.
    local wx = client()
    assert.equal(1, count(CERTS))
    local rsa = crypto.private_key(read("spec/fixtures/wechatpay/a1_merchant_key.pem"))
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = {
      serial = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
      sig_type = "WECHATPAY2-SHA256-RSA2048",
      signature = crypto.sign_base64(rsa, "1\n2\n{}\n") } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("bad_signature", err.kind)
    assert.matches("WECHATPAY2%-SHA256%-RSA2048", err.message)
    assert.matches("WECHATPAY2%-SM2%-WITH%-SM3", err.message)
    assert.equal(1, count(CERTS))
    wx:stop()
  end)

  it("an RSA-sized signature with no type header is refused as the other "
     .. "variant's, with no certificate download", function()
    -- the same answer as an RSA merchant's usually comes: no
    -- Wechatpay-Signature-Type. The serial is unknown, and a 256-byte
    -- signature cannot be SM2's (DER, at most 72 bytes): the answer is
    -- of the other variant, not signed by a certificate to download.
    local wx = client()
    assert.equal(1, count(CERTS))
    local rsa = crypto.private_key(read("spec/fixtures/wechatpay/a1_merchant_key.pem"))
    wxtest.queue(srv, "GET", "/v3/x", { { body = "{}", sign = {
      serial = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
      signature = crypto.sign_base64(rsa, "1\n2\n{}\n") } } })
    local _, err = wx:request("GET", "/v3/x")
    assert.equal("bad_signature", err.kind)
    assert.equal("signature_type_mismatch", err.cause_kind)
    assert.matches("RSA%-sized", err.message)
    assert.matches("WECHATPAY2%-SM2%-WITH%-SM3", err.message)
    assert.equal(1, count(CERTS))
    wx:stop()
  end)

  it("a download that brings only certificates of the other variant is "
     .. "said at once (a warning naming them)", function()
    -- an SM merchant's /v3/certificates holding RSA certificates only:
    -- none can join the ring; the warning says so, with their serials
    -- and why, instead of an unknown_serial on the next answer only
    local wx = client()
    local rsa_key, rsa_pem = dir .. "/other_rsa.key", dir .. "/other_rsa.pem"
    assert(os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s"
      .. " -out %s -days 30 -set_serial 0x7E57 -subj '/CN=Tenpay.com sign'"
      .. " >/dev/null 2>&1"):format(rsa_key, rsa_pem)))
    local nonce = crypto.random_nonce(12)
    local sm4 = crypto.digest("sm3", wxtest.APIV3):sub(1, 16)
    local ct = assert(crypto.aead_encrypt("AEAD_SM4_GCM", sm4, nonce,
                                          "certificate", read(rsa_pem)))
    local body = json.encode({ data = { { serial_no = "7E57",
      effective_time = "2026-01-01T00:00:00+08:00",
      expire_time = "2036-01-01T00:00:00+08:00",
      encrypt_certificate = { algorithm = "AEAD_SM4_GCM", nonce = nonce,
        associated_data = "certificate",
        ciphertext = crypto.base64_encode(ct) } } } })
    wxtest.queue(srv, "GET", "/v3/certificates",
                 { { body = body, sign = { serial = S1 } } })
    local paygate = require "paygate"
    local warned, warn = {}, paygate.log.warn
    paygate.log.warn = function(msg, f)
      warned[#warned + 1] = msg
      return warn(msg, f)
    end
    local ok, err = pcall(wx.refresh_certificates, wx)
    paygate.log.warn = warn
    assert(ok, err)
    assert.equal(2, count(CERTS))
    assert.same({ S1 }, wx:certificate_status().serials)
    local said = table.concat(warned, "\n")
    assert.matches("brought no certificate this client can use", said)
    assert.matches("7E57 %(key type RSA%)", said)
    assert.matches("needs SM2", said)
    wx:stop()
  end)

  it("a download under another APIv3 key is refused (decrypt_failed)",
     function()
    wxtest.certs(srv, { apiv3_key = ("k"):rep(32) })
    local wx = client{ timeout = 2 }
    assert.same({}, wx:certificate_status().serials)
    local _, err = wx:refresh_certificates()
    assert.equal("decrypt_failed", err.kind)
    wx:stop()
  end)

  it("parses an SM4-GCM notification signed with SM2", function()
    local wx = client()
    local resource = json.encode({ out_trade_no = "sm-1", trade_state = "SUCCESS" })
    local nonce = crypto.random_nonce(12)
    local ct = crypto.aead_encrypt("AEAD_SM4_GCM",
      crypto.digest("sm3", wxtest.APIV3):sub(1, 16), nonce, "transaction",
      resource)
    local body = json.encode({ id = "EV-sm-1", event_type = "TRANSACTION.SUCCESS",
      resource_type = "encrypt-resource", resource = {
        algorithm = "AEAD_SM4_GCM", ciphertext = crypto.base64_encode(ct),
        nonce = nonce, associated_data = "transaction",
        original_type = "transaction" } })
    local ts = tostring(os.time())
    local hnonce = crypto.random_nonce(32)
    local sig = crypto.sign_base64(crypto.private_key(read(keys.s1_key)),
                                   ts .. "\n" .. hnonce .. "\n" .. body .. "\n")
    local headers = { ["wechatpay-timestamp"] = ts, ["wechatpay-nonce"] = hnonce,
      ["wechatpay-signature"] = sig, ["wechatpay-serial"] = S1,
      ["wechatpay-signature-type"] = "WECHATPAY2-SM2-WITH-SM3" }
    local ev = assert(wx:parse_notification({ headers = headers, body = body },
                                            { replay = false }))
    assert.equal("EV-sm-1", ev.id)
    assert.equal("sm-1", ev.resource.out_trade_no)
    wx:stop()
  end)

  it("encrypts a sensitive field with SM2 for the newest certificate",
     function()
    wxtest.certs(srv, { serials = { S1, S2 } })
    local wx = client()
    local ct, serial = assert(wx:encrypt_sensitive("6222021234567890"))
    assert.equal(S2, serial)                 -- S2 ends 30 days later
    local raw = crypto.base64_decode(ct)
    local key = crypto.private_key(read(keys.s2_key))
    assert.equal("6222021234567890", crypto.sm2_decrypt(key, raw))
    -- and by the openssl CLI, independently of paygate.crypto's decrypt
    local f = assert(io.open(dir .. "/sens.bin", "wb"))
    f:write(raw)
    f:close()
    local p = io.popen(("openssl pkeyutl -decrypt -inkey %s -in %s/sens.bin")
                       :format(keys.s2_key, dir))
    local out = p:read("*a")
    p:close()
    assert.equal("6222021234567890", out)
    wx:stop()
  end)
end)
