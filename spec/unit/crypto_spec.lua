-- paygate.crypto: keys, signatures, AEAD, OAEP, digests, encodings.
-- Known answers from NIST (GCM), RFC 8998 (SM4-GCM), GB/T 32905 (SM3),
-- RFC 4231 (HMAC), WeChat Pay's documentation and SDK test vectors
-- (spec/fixtures/wechatpay), and the openssl CLI.
local crypto = require "paygate.crypto"
local T = dofile("spec/fixtures/cryptotest.lua")

local unhex, hex = T.unhex, T.hex
local APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"

local function fails_with(kind, v, err)
  assert.is_nil(v)
  assert.is_table(err)
  assert.equal(kind, err.kind)
  assert.is_string(err.message)
  assert.is_false(err.retryable)
  return err
end

describe("paygate.crypto", function()
  local dir
  setup(function() dir = T.tmpdir() end)
  teardown(function() T.cleanup(dir) end)

  describe("private_key", function()
    it("rejects input that is not PEM, DER or PKCS#12 (not_pem)", function()
      fails_with("not_pem", crypto.private_key("\0\1\2garbage\255\254"))
      fails_with("not_pem", crypto.private_key(""))
    end)

    it("rejects a PEM body without BEGIN/END lines (truncated_pem)", function()
      local pem = T.fixture("a1_merchant_key.pem")
      local body = pem:gsub("%-%-%-%-%-[^\n]*%-%-%-%-%-\n?", "")
      fails_with("truncated_pem", crypto.private_key(body))
      -- cut in the middle: BEGIN without END
      fails_with("truncated_pem", crypto.private_key(pem:sub(1, 300)))
    end)

    it("rejects damaged PEM and the wrong block type (malformed)", function()
      local pem = T.fixture("a1_merchant_key.pem")
      local damaged = pem:gsub("MIIEvAIBADAN", "MIIEvAIBA!!N")
      fails_with("malformed", crypto.private_key(damaged))
      local err = fails_with("malformed",
        crypto.private_key(T.fixture("a4_merchant_cert.pem")))
      assert.matches("CERTIFICATE", err.message)
    end)

    it("classifies wrong and missing passwords (bad_password)", function()
      T.sh(("openssl pkcs8 -topk8 -in %s -out %s/enc.pem -passout pass:s3cret-pw -v2 aes-256-cbc")
        :format("spec/fixtures/wechatpay/a3_merchant_key.pem", dir))
      local enc = T.read(dir .. "/enc.pem")
      local err = fails_with("bad_password", crypto.private_key(enc, "wrong-guess"))
      assert.is_nil(err.message:find("wrong-guess", 1, true))
      fails_with("bad_password", crypto.private_key(enc))
      local key = assert(crypto.private_key(enc, "s3cret-pw"))
      assert.equal(assert(crypto.private_key(T.fixture("a3_merchant_key.pem"))):fingerprint(),
                   key:fingerprint())
    end)

    it("rejects key types WeChat Pay does not use (unsupported_key_type)", function()
      T.sh(("openssl genpkey -algorithm ed25519 -out %s/ed.pem"):format(dir))
      T.sh(("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out %s/p256.pem"):format(dir))
      fails_with("unsupported_key_type", crypto.private_key(T.read(dir .. "/ed.pem")))
      fails_with("unsupported_key_type", crypto.private_key(T.read(dir .. "/p256.pem")))
      T.sh(("openssl pkey -in %s/p256.pem -pubout -out %s/p256.pub"):format(dir, dir))
      fails_with("unsupported_key_type", crypto.public_key(T.read(dir .. "/p256.pub")))
    end)

    it("loads PKCS#8 PEM, PKCS#1 PEM and DER to the same key", function()
      local src = "spec/fixtures/wechatpay/a1_merchant_key.pem"
      T.sh(("openssl rsa -in %s -traditional -out %s/pkcs1.pem"):format(src, dir))
      T.sh(("openssl pkey -in %s -outform DER -out %s/key.der"):format(src, dir))
      local a = assert(crypto.private_key(T.read(src)))
      local pkcs1 = T.read(dir .. "/pkcs1.pem")
      assert.matches("BEGIN RSA PRIVATE KEY", pkcs1)
      local b = assert(crypto.private_key(pkcs1))
      local c = assert(crypto.private_key(T.read(dir .. "/key.der")))
      assert.equal(a:fingerprint(), b:fingerprint())
      assert.equal(a:fingerprint(), c:fingerprint())
      assert.equal("RSA", a:type())
      assert.equal(2048, a:bits())
      assert.is_true(a:is_private())
    end)

    it("loads PKCS#12 with its password, modern and legacy ciphers", function()
      local key = "spec/fixtures/wechatpay/a3_merchant_key.pem"
      local cert = "spec/fixtures/wechatpay/a4_merchant_cert.pem"
      T.sh(("openssl pkcs12 -export -inkey %s -in %s -out %s/a.p12 -passout pass:1234567891")
        :format(key, cert, dir))
      T.sh(("openssl pkcs12 -export -legacy -inkey %s -in %s -out %s/legacy.p12 -passout pass:1234567891")
        :format(key, cert, dir))
      for _, name in ipairs({ "a.p12", "legacy.p12" }) do
        local p12 = T.read(dir .. "/" .. name)
        local err = fails_with("bad_password", crypto.private_key(p12, "1234567890"))
        assert.is_nil(err.message:find("1234567890", 1, true))
        local k = assert(crypto.private_key(p12, "1234567891"))
        assert.equal("RSA", k:type())
        local k2, c2 = crypto.pkcs12(p12, "1234567891")
        assert.equal(k:fingerprint(), k2:fingerprint())
        assert.equal("5F1C72E2A8931B72A2E13AF8DEE92471EB397115", c2:serial())
        assert.is_true(crypto.check_pair(k2, c2))
      end
    end)

    it("detects a key that does not match its certificate (key_cert_mismatch)", function()
      local k = assert(crypto.private_key(T.fixture("a1_merchant_key.pem")))
      local c = assert(crypto.certificate(T.fixture("a4_merchant_cert.pem")))
      fails_with("key_cert_mismatch", crypto.check_pair(k, c))
      local k3 = assert(crypto.private_key(T.fixture("a3_merchant_key.pem")))
      assert.is_true(crypto.check_pair(k3, c))
    end)

    it("never shows key material in tostring; shows type, bits, fingerprint", function()
      local pem = T.fixture("a1_merchant_key.pem")
      local k = assert(crypto.private_key(pem))
      local s = tostring(k)
      assert.matches("RSA%-2048", s)
      assert.matches("private", s)
      -- the fingerprint is SHA-256 over the SubjectPublicKeyInfo DER
      local want = T.sh(("openssl pkey -in spec/fixtures/wechatpay/a1_merchant_key.pem -pubout -outform DER"
        .. " | openssl dgst -sha256 -r"):format()):match("^(%x+)")
      assert.equal(want:upper(), k:fingerprint())
      assert.matches(want:upper(), s)
      for line in pem:gmatch("[^\n]+") do
        if not line:find("-----", 1, true) then
          assert.is_nil(s:find(line:sub(1, 16), 1, true))
        end
      end
      -- only the public half can be exported
      assert.matches("BEGIN PUBLIC KEY", k:public_pem())
      assert.equal(T.fixture("a1_pub.pem"), k:public_pem())
      assert.is_nil(k.private_pem)
    end)

    it("__gc and close are safe twice; closed handles raise on use", function()
      local k = assert(crypto.private_key(T.fixture("a1_merchant_key.pem")))
      k:close()
      k:close()
      assert.matches("closed", tostring(k))
      assert.has_error(function() crypto.sign(k, "x") end)
      local mt = getmetatable(k)
      mt.__gc(k)
    end)

    it("raises on misuse (wrong argument types)", function()
      assert.has_error(function() crypto.private_key(nil) end)
      assert.has_error(function() crypto.sign("not a key", "x") end)
      assert.has_error(function() crypto.verify({}, "x", "y") end)
    end)
  end)

  describe("public_key and certificate", function()
    it("classifies the wrong kinds of input", function()
      fails_with("malformed", crypto.public_key(T.fixture("a4_merchant_cert.pem")))
      fails_with("malformed", crypto.public_key(T.fixture("a1_merchant_key.pem")))
      fails_with("not_pem", crypto.public_key("\48\1\2\3"))
      local body = T.fixture("a2_wechatpay_pubkey.pem"):gsub("%-%-%-%-%-[^\n]*%-%-%-%-%-\n?", "")
      fails_with("truncated_pem", crypto.public_key(body))
      fails_with("not_pem", crypto.certificate("\1\2\3\4"))
      fails_with("malformed", crypto.certificate(T.fixture("a2_wechatpay_pubkey.pem")))
      local cert = T.fixture("a4_merchant_cert.pem")
      fails_with("truncated_pem", crypto.certificate(cert:sub(1, 200)))
      fails_with("malformed", crypto.certificate((cert:gsub("MIIDrTCC", "MIIDrTCA"))))
    end)

    it("loads SPKI, PKCS#1 public keys, PEM and DER certificates", function()
      local pub = assert(crypto.public_key(T.fixture("a2_wechatpay_pubkey.pem")))
      assert.equal("RSA", pub:type())
      assert.is_false(pub:is_private())
      assert.matches("public", tostring(pub))
      T.sh(("openssl rsa -pubin -in spec/fixtures/wechatpay/a2_wechatpay_pubkey.pem -RSAPublicKey_out -out %s/p1.pem"):format(dir))
      local p1 = assert(crypto.public_key(T.read(dir .. "/p1.pem")))
      assert.equal(pub:fingerprint(), p1:fingerprint())
      T.sh(("openssl x509 -in spec/fixtures/wechatpay/a4_merchant_cert.pem -outform DER -out %s/c.der"):format(dir))
      local c1 = assert(crypto.certificate(T.fixture("a4_merchant_cert.pem")))
      local c2 = assert(crypto.certificate(T.read(dir .. "/c.der")))
      assert.equal(c1:fingerprint(), c2:fingerprint())
      local sm2 = assert(crypto.public_key(assert(crypto.private_key(T.fixture("a10a_sm2_key.pem"))):public_pem()))
      assert.equal("SM2", sm2:type())
      assert.equal(256, sm2:bits())
    end)
  end)

  describe("sign / verify sha256-rsa", function()
    local body = '{"appid":"wxd678efh567hg6787","mchid":"1900007291","description":"Image形象店-深圳腾大-QQ公仔","out_trade_no":"1217752501201407033233368018","notify_url":"https://www.weixin.qq.com/wxpay/pay.php","amount":{"total":100,"currency":"CNY"},"payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}}'
    local msg = "POST\n/v3/pay/transactions/jsapi\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n" .. body .. "\n"

    it("rejects an algorithm that does not fit the key (key_type_mismatch)", function()
      local rsa = assert(crypto.private_key(T.fixture("a1_merchant_key.pem")))
      local sm2 = assert(crypto.private_key(T.fixture("a10a_sm2_key.pem")))
      fails_with("key_type_mismatch", crypto.sign(rsa, "x", "sm2-sm3"))
      fails_with("key_type_mismatch", crypto.sign(sm2, "x", "sha256-rsa"))
      local cert = assert(crypto.certificate(T.fixture("a10b_sm2_cert.pem")))
      fails_with("key_type_mismatch", crypto.verify(cert, "x", "sig", "WECHATPAY2-SHA256-RSA2048"))
      local pub = assert(crypto.public_key(T.fixture("a1_pub.pem")))
      fails_with("key_type_mismatch", crypto.sign(pub, "x"))
      fails_with("unsupported_algorithm", crypto.sign(rsa, "x", "md5-rsa"))
      fails_with("unsupported_algorithm", crypto.verify(pub, "x", "y", "HMAC"))
    end)

    it("rejects altered data, altered or non-base64 signatures (signature_mismatch)", function()
      local pub = assert(crypto.public_key(T.fixture("a1_pub.pem")))
      local sig = assert(crypto.base64_decode("jnks4dlrPw3ZX+ozVvSK39oa0t7OMBsg83BHAwd8BRdUFiVaQNTLTvci+wURgP1OQBbKYhFGvt7iqYpDSTQkp7Uq1sltaQKyncCyrA1g88m5bsKERQfPyT0ahSwKTYJ1CAn9QiJuSJRq1QsQs07eehbU/k9BCS51jTyc1Jpsi2H77HF9f/BnjXAOP3/sPObg6V5Ee4EzwLox684hhuMuIwHo7D8KFk3LIHOKDcNI4It1aCXydFWNpNK+SG86VUDe5kwoDpw4Ulqfu9z8OFDGbDs9TCxEv8iqQzbpxOlEVoOe2kalSYM5kApQb3nZcxdUtoE0liJGW3RGUNE0t4v01A=="))
      assert.is_true(crypto.verify(pub, msg, sig, "sha256-rsa"))
      fails_with("signature_mismatch", crypto.verify(pub, msg .. " ", sig, "sha256-rsa"))
      local bad = sig:sub(1, 10) .. string.char((sig:byte(11) + 1) % 256) .. sig:sub(12)
      fails_with("signature_mismatch", crypto.verify(pub, msg, bad, "sha256-rsa"))
      fails_with("signature_mismatch", crypto.verify(pub, msg, sig:sub(1, 100)))
      -- WeChat Pay's WECHATPAY/SIGNTEST/ probe signature is an ordinary failure
      fails_with("signature_mismatch", crypto.verify_base64(pub, msg, "WECHATPAY/SIGNTEST/abcdefghijklmnopqrstuvwxyz"))
      fails_with("signature_mismatch", crypto.verify_base64(pub, msg, "WECHATPAY/SIGNTEST/abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXY="))
    end)

    it("reproduces the official doc request signature", function()
      local key = assert(crypto.private_key(T.fixture("a1_merchant_key.pem")))
      assert.equal("jnks4dlrPw3ZX+ozVvSK39oa0t7OMBsg83BHAwd8BRdUFiVaQNTLTvci+wURgP1OQBbKYhFGvt7iqYpDSTQkp7Uq1sltaQKyncCyrA1g88m5bsKERQfPyT0ahSwKTYJ1CAn9QiJuSJRq1QsQs07eehbU/k9BCS51jTyc1Jpsi2H77HF9f/BnjXAOP3/sPObg6V5Ee4EzwLox684hhuMuIwHo7D8KFk3LIHOKDcNI4It1aCXydFWNpNK+SG86VUDe5kwoDpw4Ulqfu9z8OFDGbDs9TCxEv8iqQzbpxOlEVoOe2kalSYM5kApQb3nZcxdUtoE0liJGW3RGUNE0t4v01A==",
        crypto.sign_base64(key, msg, "WECHATPAY2-SHA256-RSA2048"))
      assert.equal("JNEITrKv8DWEtBJGZtxG9ARa+eIZDIn1Ht3MQM5j9jP77TtHdfCqLjpwevfWftBuaGMfEdiu2sWYtLvnZIoLW3FH10OVCBzKncid5xClTwav8JX+uDeGBBX8w64iHvFyuQj8ukZT+F1AFJii8hmXLD8Os90thnL0bfJYLo/4K237TH4dEd44NTH9ElFb/ykrvv9RBs+mCNpy5IUe2Qxhba3d3RiMqhWK2sSr3tsVzQihJ0TPMnjWqoU2W5Y/v3rBFDmLhqe0ZW6A4vyvjmiR0v/8XEI25Py4PNyZXszsdl4j0zLqelUJxGEMUBhYg1LIoDPjYMlA9HV1yKD6+JYZJA==",
        crypto.sign_base64(key, "GET\n/v3/certificates\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n"))
      assert.equal("mI35pfNEQV6777ke/1T+LJLQDNTm7yeoUJH+j/adPGhmCCi0PbgkvYQTRcXH0uibcLVtvFLdGLpmoYO9FV6lBBsTAjuhh5YOvQi0e2g3e0yytitiNET9FEuqM0pjnKfRW4K6LIZDdbWJv9KhZUx3DrJa5TL7OJ7VdADVivxVySIlPVKjGwuCXzuXSJes0UcILgWQUMyha5/3nYofuHtS7r+KYyMuxD+oJ9VM1Qdxk4UIG59CP5Y3wtYIFybyF3bdu1caHTRRX+DLyMXyYA/IrTmiW01c4RPjpHBX5Dk1sZyY1zVsWNsvMHr2e1NTWtBxKJ+qk5N61J7caYoepHFaxw==",
        crypto.sign_base64(key, "wx2421b1c4370ec43b\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\nprepay_id=wx201410272009395522657a690389285100\n"))
    end)

    it("reproduces the SDK vectors (java, go)", function()
      local java = assert(crypto.private_key(T.fixture("a3_merchant_key.pem")))
      assert.equal("Rq+5ZpWV6IHTWE1+9gCrYJKguNgbItpMdlIA+PVCPCdUAKNlohZz7CL7Y8xWDIFJjdGnErMj6Z+Q/h9CF5MV+nAVkqDmBR0uP5ppsUEzco4ijvKHsvI2ro4boSW6vSfQs3W8I4QSI9a0/NFIgvj83Fv27LIYZf7deaFWmEwd1fpAeJRCyoKyBeJPdsjVx0//Lqe6Wze2zVdliLcBvaHCfpd8+rAVGS+FQDeWgHqJ7n/Zy09LmV1/ghs7pO1mdjdD16SHKlysAD3K5hNGUJX/SHrEXEcu1yO1AOb/YvOVkjNh8243rcfXNE5L4ph2XS11vS+2aToKYSOcKUagf0LLaw==",
        crypto.sign_base64(java, "message"))
      local go = assert(crypto.private_key(T.fixture("a8_go_key.pem")))
      assert.equal("BKyAfU4iMCuvXMXS0Wzam3V/cnxZ+JaqigPM5OhljS2iOT95OO6Fsuml2JkFANJU9K6q9bLlDhPXuoVz+pp4hAm6pHU4ld815U4jsKu1RkyaII+1CYBUYC8TK0XtJ8FwUXXz8vZHh58rrAVN1XwNyvD1vfpxrMT4SL536GLwvpUHlCqIMzoZUguLli/K8V29QiOhuH6IEqLNJn8e9b3nwNcQ7be3CzYGpDAKBfDGPCqCv8Rw5zndhlffk2FEA70G4hvMwe51qMN/RAJbknXG23bSlObuTCN7Ndj1aJGH6/L+hdwfLpUtJm4QYVazzW7DFD27EpSQEqA8bX9+8m1rLg==",
        crypto.sign_base64(go, "source"))
    end)

    it("verifies the official public-key response example and notifications", function()
      local wxpub = assert(crypto.public_key(T.fixture("a2_wechatpay_pubkey.pem")))
      assert.is_true(crypto.verify_base64(wxpub,
        '1722850421\nd824f2e086d3c1df967785d13fcd22ef\n{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}\n',
        "mfI1CPqvBrgcXfgXMFjdNIhBf27ACE2YyeWsWV9ZI7T7RU0vHvbQpu9Z32ogzc+k8ZC5n3kz7h70eWKjgqNdKQF0eRp8mVKlmfzMLBVHbssB9jEZEDXThOX1XFqX7s7ymia1hoHQxQagPGzkdWxtlZPZ4ZPvr1RiqkgAu6Is8MZgXXrRoBKqjmSdrP1N7uxzJ/cjfSiis9FiLjuADoqmQ1P7p2N876YPAol7Rn0+GswwAwxldbdLrmVSjfytfSBJFqTMHn4itojgxSWWN1byuckQt8hSTEv/Lg97QoeGniYP17T80pJeQyL3b+295FPHSO2AtvCgyIbKMZ0BALilAA=="))
      local gocert = assert(crypto.certificate(T.fixture("a9_go_platform_cert.pem")))
      local gobody = '{"id":"3119dfba-e649-5eec-ab1e-3412bc4d2e17","create_time":"2021-06-24T16:37:26+08:00","resource_type":"encrypt-resource","event_type":"PAYSCORE.USER_OPEN_SERVICE","summary":"签约成功","resource":{"original_type":"payscore","algorithm":"AEAD_AES_256_GCM","ciphertext":"YDS3lKPaC4Y52Gf3uhft5qUBlIa8b428AWTtTauHQfQrRw+X1WpiuHIDy0vo1Vd6VEq67aVyqPdDYMkRVSDaZL3iZttevRMOoPKMifozg6XPWjIZumks/GpT48lI4NizyeaqLBokNebthah3o1H76qSlO9NkDjp9bzmKLEYYH9TEklFUpsvPqOTOcgSLgh21YJXYR7dEBXFgRLiNIKRgO5JdXh1hccRUAlyVWxE54PXpnQ==","associated_data":"payscore","nonce":"Kj7QIyUiYx1q"}}'
      assert.equal(568, #gobody)
      assert.is_true(crypto.verify_base64(gocert, "1624523846\nEcZ9Cmy4Xyx1i6RlJQzLcCyEqDa26NBz\n" .. gobody .. "\n",
        "tJHIiIS9eB2hAYstmAmbbD3ZE5LiIm/Ug5tuL4fC0YOFRWIHV39UFIZXC0e9Wl6lBu6sKvkqDkzpqzBsVHyXFlbYZTOQrVdG4b6LfTnK4mikv9++ixJMd3vTf2yCqvBkh98zs3Ds5zsYQakzbcwhmw4fMJs4nPLws28H0UW9FjDR//rxELLwXvV1VEA1IBLX70xptjL8hrfUjEE8kkry6yNJTHZRU8CAc7qHli2Ng1V1qb9ARbK8A3ThmFmPQvRGrapI/jS2laKKgYUmfdEdkNO6B2Cke5e8VTxY406ArAmQ90GAihDwIcb16TQMnzCMBoutnwZKNiKRACrFmtxw2Q=="))
    end)

    it("matches the openssl CLI byte for byte (PKCS#1 v1.5 is deterministic)", function()
      local key = assert(crypto.private_key(T.fixture("a5_platform_key.pem")))
      local data = crypto.random_bytes(777) .. "\0tail"
      T.write(dir .. "/data.bin", data)
      T.sh(("openssl dgst -sha256 -sign spec/fixtures/wechatpay/a5_platform_key.pem -out %s/cli.sig %s/data.bin")
        :format(dir, dir))
      local sig = assert(crypto.sign(key, data, "sha256-rsa"))
      assert.equal(256, #sig)
      assert.equal(T.read(dir .. "/cli.sig"), sig)
      local cert = assert(crypto.certificate(T.fixture("a6_platform_cert.pem")))
      assert.is_true(crypto.verify(cert, data, sig))
      -- the CLI verifies ours with the public key
      T.write(dir .. "/ours.sig", sig)
      assert.matches("Verified OK", T.sh(("openssl dgst -sha256 -verify spec/fixtures/wechatpay/a7_platform_pubkey.pem -signature %s/ours.sig %s/data.bin")
        :format(dir, dir)))
    end)
  end)

  describe("sign / verify sm2-sm3", function()
    local key, cert
    setup(function()
      key = assert(crypto.private_key(T.fixture("a10a_sm2_key.pem")))
      cert = assert(crypto.certificate(T.fixture("a10b_sm2_cert.pem")))
    end)

    it("rejects a signature over other data or made without the WeChat ID", function()
      local sig = assert(crypto.sign(key, "message", "sm2-sm3"))
      fails_with("signature_mismatch", crypto.verify(cert, "messagE", sig, "sm2-sm3"))
      fails_with("signature_mismatch", crypto.verify(cert, "message", "\48\3\2\1\1", "sm2-sm3"))
      -- the CLI with OpenSSL's default (empty) ID: must not verify here
      T.write(dir .. "/m.txt", "message")
      T.sh(("openssl dgst -sm3 -sign spec/fixtures/wechatpay/a10a_sm2_key.pem -out %s/noid.sig %s/m.txt"):format(dir, dir))
      fails_with("signature_mismatch", crypto.verify(cert, "message", T.read(dir .. "/noid.sig"), "sm2-sm3"))
    end)

    it("verifies the shangmi-testing vector", function()
      assert.is_true(crypto.verify_base64(cert, "message",
        "MEYCIQD35Rp3CKt7pLme/a0GaCVmwSeOl7X/12+ppRivcJuf6QIhAO5Vpy4tSk9SJUrgH5I5Qy0aYhFG9lN0aof1f5wJOI05",
        "WECHATPAY2-SM2-WITH-SM3"))
    end)

    it("interoperates with the openssl CLI in both directions (distid 1234567812345678)", function()
      local data = "1554208460\nnonce\n" .. crypto.random_nonce(64) .. "\n"
      T.write(dir .. "/d.txt", data)
      T.sh(("openssl x509 -in spec/fixtures/wechatpay/a10b_sm2_cert.pem -pubkey -noout > %s/sm2.pub"):format(dir))
      for i = 1, 3 do   -- repeated signing reuses the key's contexts
        local sig = assert(crypto.sign(key, data, "sm2-sm3"))
        -- DER: r and s are 1..33 bytes each (a leading zero is dropped,
        -- or added before a high bit): 8..72 bytes, mostly 70..72
        assert.is_true(#sig >= 8 and #sig <= 72, "length " .. #sig)
        assert.equal(0x30, sig:byte(1))  -- DER SEQUENCE, not raw r||s
        T.write(dir .. "/ours.sig", sig)
        assert.matches("Verified OK", T.sh(("openssl dgst -sm3 -verify %s/sm2.pub -sigopt distid:1234567812345678 -signature %s/ours.sig %s/d.txt")
          :format(dir, dir, dir)))
      end
      T.sh(("openssl dgst -sm3 -sign spec/fixtures/wechatpay/a10a_sm2_key.pem -sigopt distid:1234567812345678 -out %s/cli.sig %s/d.txt")
        :format(dir, dir))
      assert.is_true(crypto.verify(cert, data, T.read(dir .. "/cli.sig"), "sm2-sm3"))
      local pub = assert(crypto.public_key(T.read(dir .. "/sm2.pub")))
      assert.is_true(crypto.verify(pub, data, T.read(dir .. "/cli.sig")))
    end)
  end)

  describe("aead", function()
    it("rejects bad key and nonce lengths before decrypting", function()
      local ct = assert(crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3, "uluk4a9R25RW", "", "hi"))
      fails_with("bad_key", crypto.aead_decrypt("AEAD_AES_256_GCM", APIV3:sub(2), "uluk4a9R25RW", "", ct))
      fails_with("bad_key", crypto.aead_decrypt("AEAD_SM4_GCM", APIV3, "uluk4a9R25RW", "", ct))
      -- GCM takes a nonce of any length; empty, and over OpenSSL's 128-byte
      -- limit, are refused for both algorithms
      for _, nonce in ipairs({ "", ("n"):rep(129), ("n"):rep(4096) }) do
        local err = fails_with("bad_nonce", crypto.aead_decrypt("AEAD_AES_256_GCM", APIV3, nonce, "", ct))
        assert.matches("nonce of 1%.%.128 bytes", err.message)
        fails_with("bad_nonce", crypto.aead_decrypt("AEAD_SM4_GCM", ("k"):rep(16), nonce, "", ct))
        fails_with("bad_nonce", crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3, nonce, "", "x"))
        fails_with("bad_nonce", crypto.aead_encrypt("AEAD_SM4_GCM", ("k"):rep(16), nonce, "", "x"))
      end
      fails_with("unsupported_algorithm", crypto.aead_decrypt("AEAD_AES_128_CBC", APIV3, "uluk4a9R25RW", "", ct))
    end)

    it("never returns plaintext when the tag does not match (decrypt_failed)", function()
      for _, alg in ipairs({ "AEAD_AES_256_GCM", "AEAD_SM4_GCM" }) do
        local key = alg == "AEAD_SM4_GCM" and crypto.sm4_key(APIV3) or APIV3
        local ct = assert(crypto.aead_encrypt(alg, key, "0123456789ab", "transaction", "secret payload"))
        assert.equal(#"secret payload" + 16, #ct)
        local wrongkey = alg == "AEAD_SM4_GCM" and ("x"):rep(16) or ("x"):rep(32)
        local err = fails_with("decrypt_failed", crypto.aead_decrypt(alg, wrongkey, "0123456789ab", "transaction", ct))
        assert.is_nil(err.message:find(key, 1, true))
        fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, "0123456789ac", "transaction", ct))
        fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, "0123456789ab", "refund", ct))
        local flipped = ct:sub(1, 3) .. string.char((ct:byte(4) + 1) % 256) .. ct:sub(5)
        fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, "0123456789ab", "transaction", flipped))
        local tagflip = ct:sub(1, -2) .. string.char((ct:byte(-1) + 1) % 256)
        fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, "0123456789ab", "transaction", tagflip))
        fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, "0123456789ab", "transaction", ct:sub(1, 15)))
        fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, "0123456789ab", "transaction", ct:sub(2)))
        assert.equal("secret payload", crypto.aead_decrypt(alg, key, "0123456789ab", "transaction", ct))
      end
    end)

    it("matches the NIST GCM AES-256 vectors (test cases 13, 14, 16)", function()
      local k0 = ("\0"):rep(32)
      local n0 = ("\0"):rep(12)
      assert.equal("530f8afbc74536b9a963b4f1c4cb738b", hex(crypto.aead_encrypt("AEAD_AES_256_GCM", k0, n0, "", "")))
      assert.equal("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919",
        hex(crypto.aead_encrypt("AEAD_AES_256_GCM", k0, n0, "", ("\0"):rep(16))))
      local K = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
      local IV = unhex("cafebabefacedbaddecaf888")
      local P = unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
      local A = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
      local CT = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        .. "76fc6ece0f4e1768cddf8853bb2d551b"
      assert.equal(CT, hex(crypto.aead_encrypt("AEAD_AES_256_GCM", K, IV, A, P)))
      assert.equal(P, crypto.aead_decrypt("AEAD_AES_256_GCM", K, IV, A, unhex(CT)))
    end)

    it("takes nonces of any length: NIST GCM AES-256 with 8- and 60-byte IVs (test cases 17, 18)", function()
      local K = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
      local P = unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
      local A = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
      local cases = {
        { iv = "cafebabefacedbad",
          ct = "c3762df1ca787d32ae47c13bf19844cbaf1ae14d0b976afac52ff7d79bba9de0feb582d33934a4f0954cc2363bc73f7862ac430e64abe499f47c9b1f"
            .. "3a337dbf46a792c45e454913fe2ea8f2" },
        { iv = "9313225df88406e555909c5aff5269aa6a7a9538534f7da1e4c303d2a318a728c3c0c95156809539fcf0e2429a6b525416aedbf5a0de6a57a637b39b",
          ct = "5a8def2f0c9e53f1f75d7853659e2a20eeb2b22aafde6419a058ab4f6f746bf40fc0c3b780f244452da3ebf1c5d82cdea2418997200ef82e44ae7e3f"
            .. "a44a8266ee1c8eb0c8b5d4cf5ae9f19a" },
      }
      for _, c in ipairs(cases) do
        local iv = unhex(c.iv)
        assert.equal(c.ct, hex(crypto.aead_encrypt("AEAD_AES_256_GCM", K, iv, A, P)))
        assert.equal(P, crypto.aead_decrypt("AEAD_AES_256_GCM", K, iv, A, unhex(c.ct)))
        -- the nonce is authenticated, including its length
        fails_with("decrypt_failed", crypto.aead_decrypt("AEAD_AES_256_GCM", K, iv:sub(2), A, unhex(c.ct)))
        fails_with("decrypt_failed", crypto.aead_decrypt("AEAD_AES_256_GCM", K, iv .. "\0", A, unhex(c.ct)))
      end
      -- a nonce of other length after a 12-byte one (the context is reused)
      assert.equal("ulwSiIajGClcvcOYvOQ7+l+0PAbzzwI=", crypto.base64_encode(
        crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3, "uluk4a9R25RW", "associatedData", "message")))
    end)

    it("keeps keys apart across more keys than it holds schedules for (interleaved, both directions, both ciphers)", function()
      -- the C side keeps the schedules of 4 keys: 7 keys of each cipher,
      -- used round-robin, evict each other on every call
      local K = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
      local IV = unhex("cafebabefacedbaddecaf888")
      local P = unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
      local A = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
      local CT = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        .. "76fc6ece0f4e1768cddf8853bb2d551b"
      local keys, cts = {}, {}
      for i = 1, 7 do
        local aes = (("%d"):format(i)):rep(32)
        keys[#keys + 1] = { "AEAD_AES_256_GCM", aes }
        keys[#keys + 1] = { "AEAD_SM4_GCM", crypto.sm4_key(aes) }
      end
      for round = 1, 3 do
        for i, k in ipairs(keys) do
          local nonce = round == 2 and ("n"):rep(16) or "0123456789ab"
          local ct = assert(crypto.aead_encrypt(k[1], k[2], nonce, "transaction", "payload " .. i))
          if cts[i] and round ~= 2 then assert.equal(cts[i], ct) end
          if round ~= 2 then cts[i] = ct end
          assert.equal("payload " .. i, crypto.aead_decrypt(k[1], k[2], nonce, "transaction", ct))
          -- another key of the same cipher (two calls back) never opens it
          local prev = keys[(i - 3) % #keys + 1]
          fails_with("decrypt_failed", crypto.aead_decrypt(k[1], prev[2], nonce, "transaction", ct))
          -- the NIST vector still holds between them
          assert.equal(CT, hex(crypto.aead_encrypt("AEAD_AES_256_GCM", K, IV, A, P)))
        end
      end
      -- decrypting in reverse order, after all the others were used
      for i = #keys, 1, -1 do
        assert.equal("payload " .. i, crypto.aead_decrypt(keys[i][1], keys[i][2], "0123456789ab", "transaction", cts[i]))
      end
    end)

    it("round-trips nonces of 1..128 bytes, WeChat-style strings included (13, 16, 32 characters)", function()
      local sm4key = crypto.sm4_key(APIV3)
      for _, alg in ipairs({ "AEAD_AES_256_GCM", "AEAD_SM4_GCM" }) do
        local key = alg == "AEAD_SM4_GCM" and sm4key or APIV3
        local seen = {}
        for _, n in ipairs({ 1, 7, 11, 12, 13, 16, 17, 32, 60, 127, 128 }) do
          local nonce = crypto.random_nonce(n)
          local ct = assert(crypto.aead_encrypt(alg, key, nonce, "transaction", "resource ciphertext"))
          assert.is_nil(seen[ct])
          seen[ct] = true
          assert.equal("resource ciphertext", crypto.aead_decrypt(alg, key, nonce, "transaction", ct))
          local other = nonce:sub(1, -2) .. (nonce:sub(-1) == "x" and "y" or "x")
          fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, other, "transaction", ct))
          fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, nonce, "refund", ct))
          local tagflip = ct:sub(1, -2) .. string.char((ct:byte(-1) + 1) % 256)
          fails_with("decrypt_failed", crypto.aead_decrypt(alg, key, nonce, "transaction", tagflip))
        end
      end
    end)

    it("SM4-GCM with nonces other than 12 bytes matches an independent implementation", function()
      -- answers from spec/c/gen_sm4gcm_vectors.py (the cryptography
      -- package's SM4-GCM), also checked in spec/c/test_sm4gcm.c
      local K = unhex("0123456789abcdeffedcba9876543210")
      local P = {}
      for i = 0, 63 do P[#P + 1] = string.char(i) end
      P = table.concat(P) .. "paygate any-length nonce"
      local cases = {
        { "0123456789abc", "f2f9ebe934049b04e48d367d8b41b34b50ee3b54877dcb2e6e54c65747f00482c744160e1b306858bbf5bfd114f113f02e61d65f10564f3cb75d264c59c6d531f4ea4747618d726caab73a053af4b21171b729eb96cc4cd82ffe27436fff0095f8458866a90e0e9e" },
        { "0123456789abcdef0123456789abcdef", "5e112ae9261f424556ac7d6896f3cbb1902e83d223f19cbff6485f75fcf7c35003ff69f91d2a4c34fedf8ecb565244003dbda14fbb679b15df6ccc757f2c146784e1d4b4b3d99cdeeaab64ed7084fbfedb4c61b21ea14d817eab6ac741ec3548d23705c979e6fb97" },
      }
      for _, c in ipairs(cases) do
        assert.equal(c[2], hex(crypto.aead_encrypt("AEAD_SM4_GCM", K, c[1], "transaction", P)))
        assert.equal(P, crypto.aead_decrypt("AEAD_SM4_GCM", K, c[1], "transaction", unhex(c[2])))
      end
    end)

    it("matches RFC 8998 SM4-GCM and the shangmi-testing vector", function()
      local K = unhex("0123456789ABCDEFFEDCBA9876543210")
      local IV = unhex("00001234567800000000ABCD")
      local A = unhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
      local P = unhex("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDDEEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA")
      local CT = ("17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
        .. "83DE3541E4C2B58177E065A9BF7B62EC"):lower()
      assert.equal(CT, hex(crypto.aead_encrypt("AEAD_SM4_GCM", K, IV, A, P)))
      assert.equal(P, crypto.aead_decrypt("AEAD_SM4_GCM", K, IV, A, unhex(CT)))
      local sm4key = crypto.sm4_key(APIV3)
      assert.equal("fa2028801e86d45f5638cadafb5db2e9", hex(sm4key))
      assert.equal("plaintext", crypto.aead_decrypt("AEAD_SM4_GCM", sm4key, "uluk4a9R25RW", "associatedData",
        crypto.base64_decode("+lcLNfkZQQx+iQm20Apa3x9Mb/5L7PgZ7w==")))
      assert.is_boolean(crypto.sm4gcm_native)
    end)

    it("decrypts the WeChat Pay vectors (SDK, a11 certificate download, notification)", function()
      assert.equal("ulwSiIajGClcvcOYvOQ7+l+0PAbzzwI=", crypto.base64_encode(
        crypto.aead_encrypt("AEAD_AES_256_GCM", APIV3, "uluk4a9R25RW", "associatedData", "message")))
      local pem = assert(crypto.aead_decrypt("AEAD_AES_256_GCM", APIV3, "14b16c03dc1b", "certificate",
        assert(crypto.base64_decode(T.fixture("a11_cert_ciphertext.txt")))))
      local cert = assert(crypto.certificate(pem))
      assert.equal("5DEA10EF55877E3CF6C33255C2E7DEFFF7E427EC", cert:serial())
      local ct = "LYUKn3qlhLs+EMh+tyF3lJvg8SJOP4J2r7281BieiORPGu1SQya9roNCRpLrpmBBwyFr9bgF2Dcl6yFJZ+GPjRtz5FOc9nZ78r2u36CB3CJLDx0axvbX0fGVzeUMfvkvQG7hZeLFYFWRG/pwXTJ1/y3IIsw4mmTN7dWZp1Fstnilk6jHRsFSfYRtI+IUQr8wQ99AaA+9z2wNKI4Bm1FAXceqXFAIWngcJME31vwvc7ji2du2l3NwYX6jUjVgSf2417gxe0GAIEzMKaY2yP3PEH0eh1eL5zNuhPZO25Qe2aWiNuPRFJFQS8jSsKIsRwMAR6eG4WmISvlleRC/K4WbVX5sLl7yjYn5Y07xbOldvASrxw5HpkH0Ue5HHNRU6Y8ABAHg9R8RITUji3FRfqy7+gvIt18WZi83t7U33M1Rj1Exv0HnyvXj7Fynk3HbGef/HTCHh+yu0dR8BJ5GW0DWlS5lPMAxBWw4SyU06tRF7XLokpCIYTVEnS9CP6v4HhkMXlhVEFl3obhEUsiWcMSLADgmhG5mh+X2Wx/L1temLKpY6xEuBI9p6da9gUWVfXqVKlM0CcFOzMvyYm1UHCnl"
      local pt = assert(crypto.aead_decrypt("AEAD_AES_256_GCM", APIV3, "0123456789ab", "transaction", crypto.base64_decode(ct)))
      assert.equal('{"mchid":"1900007291","appid":"wxd678efh567hg6787","out_trade_no":"1217752501201407033233368018","transaction_id":"4200000000202501010000000001","trade_type":"JSAPI","trade_state":"SUCCESS","trade_state_desc":"支付成功","bank_type":"OTHERS","attach":"","success_time":"2025-01-01T12:00:05+08:00","payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},"amount":{"total":100,"payer_total":100,"currency":"CNY","payer_currency":"CNY"}}', pt)
    end)

    it("round-trips every length from 0 to 100 with both algorithms", function()
      for _, alg in ipairs({ "AEAD_AES_256_GCM", "AEAD_SM4_GCM" }) do
        local key = crypto.random_bytes(alg == "AEAD_SM4_GCM" and 16 or 32)
        for n = 0, 100 do
          local pt = crypto.random_bytes(n)
          local ct = crypto.aead_encrypt(alg, key, "abcdefghijkl", "aad", pt)
          assert.equal(pt, crypto.aead_decrypt(alg, key, "abcdefghijkl", "aad", ct))
        end
      end
    end)
  end)

  describe("oaep", function()
    it("classifies failures", function()
      local k1 = assert(crypto.private_key(T.fixture("a1_merchant_key.pem")))
      local c4 = assert(crypto.certificate(T.fixture("a4_merchant_cert.pem")))
      local ct = assert(crypto.oaep_encrypt(c4, "13800138000"))
      fails_with("decrypt_failed", crypto.oaep_decrypt(k1, ct))
      fails_with("decrypt_failed", crypto.oaep_decrypt(k1, "short"))
      local sm2 = assert(crypto.private_key(T.fixture("a10a_sm2_key.pem")))
      fails_with("key_type_mismatch", crypto.oaep_decrypt(sm2, ct))
      fails_with("key_type_mismatch", crypto.oaep_encrypt(sm2, "x"))
      fails_with("too_long", crypto.oaep_encrypt(c4, ("x"):rep(215)))
      assert.is_string(crypto.oaep_encrypt(c4, ("x"):rep(214)))
    end)

    it("decrypts the wechatpay-java vector with SHA-1 / MGF1-SHA-1", function()
      local k3 = assert(crypto.private_key(T.fixture("a3_merchant_key.pem")))
      assert.equal("plaintext", crypto.oaep_decrypt(k3, crypto.base64_decode("Qqsluo7R1IZyAqdkm/jBzwXDP5VndCwwFbRA+yILFTYciZzrRChQIQ7SKuI2k3YSR5auB3ZspdjR1WPB3PTCKe6BCFx3NnaPWhSwonYTmW8ZseXjkbcYSbKL5O/6dr6Zftg3t2A2FUd97acjM1fr2EIvIvRieQ3Hl8qVkDBY9520wm1rzvePUnxQWN70RZiBcqr7O7Gb0gU3l7FkvoUFSbY44HgDJetmVow3yGIV3Tcd45o2MNQ+5F1qvjIjb3/6dkGKce4/kNTYraUMO6o6kfFXlfg+bFRIiz8hiUpbToWdu7g0R5Hq0/YIE5vw/5Ms4gbk2HIQIfOLkY8sEPjYHA==")))
    end)

    it("encrypts what the openssl CLI decrypts with the same padding", function()
      local pub = assert(crypto.public_key(T.fixture("a7_platform_pubkey.pem")))
      local ct = assert(crypto.oaep_encrypt(pub, "张三 13800138000"))
      assert.equal(256, #ct)
      T.write(dir .. "/oaep.bin", ct)
      local out = T.sh(("openssl pkeyutl -decrypt -inkey spec/fixtures/wechatpay/a5_platform_key.pem -in %s/oaep.bin"
        .. " -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 -pkeyopt rsa_mgf1_md:sha1"):format(dir))
      assert.equal("张三 13800138000", out)
      local k5 = assert(crypto.private_key(T.fixture("a5_platform_key.pem")))
      assert.equal("张三 13800138000", crypto.oaep_decrypt(k5, ct))
      assert.not_equal(ct, crypto.oaep_encrypt(pub, "张三 13800138000"))  -- randomized
    end)
  end)

  describe("sm2_encrypt / sm2_decrypt", function()
    it("classifies failures", function()
      local sm2 = assert(crypto.private_key(T.fixture("a10a_sm2_key.pem")))
      local cert = assert(crypto.certificate(T.fixture("a10b_sm2_cert.pem")))
      local rsa = assert(crypto.private_key(T.fixture("a1_merchant_key.pem")))
      local c4 = assert(crypto.certificate(T.fixture("a4_merchant_cert.pem")))
      fails_with("key_type_mismatch", crypto.sm2_encrypt(c4, "x"))
      fails_with("key_type_mismatch", crypto.sm2_decrypt(rsa, "x"))
      fails_with("too_long", crypto.sm2_encrypt(cert, ""))
      fails_with("too_long", crypto.sm2_encrypt(cert, ("x"):rep(65537)))
      fails_with("decrypt_failed", crypto.sm2_decrypt(sm2, "short"))
      local ct = assert(crypto.sm2_encrypt(cert, "13800138000"))
      -- one bit flipped in C2 (the last byte): the SM3 hash C3 catches it
      local bad = ct:sub(1, -2) .. string.char((ct:byte(-1) + 1) % 256)
      fails_with("decrypt_failed", crypto.sm2_decrypt(sm2, bad))
      -- another SM2 key
      T.sh(("openssl genpkey -algorithm SM2 -out %s/other_sm2.pem"):format(dir))
      local other = assert(crypto.private_key(T.read(dir .. "/other_sm2.pem")))
      fails_with("decrypt_failed", crypto.sm2_decrypt(other, ct))
      assert.has_error(function() crypto.sm2_encrypt(cert) end)
    end)

    it("round-trips, randomized, DER C1C3C2 as GM/T 0009 lays it out",
       function()
      local sm2 = assert(crypto.private_key(T.fixture("a10a_sm2_key.pem")))
      local cert = assert(crypto.certificate(T.fixture("a10b_sm2_cert.pem")))
      local text = "张三 6222021234567890"
      local ct = assert(crypto.sm2_encrypt(cert, text))
      assert.equal(text, crypto.sm2_decrypt(sm2, ct))
      assert.not_equal(ct, crypto.sm2_encrypt(cert, text))
      -- SEQUENCE { INTEGER x, INTEGER y, OCTET STRING C3 (32), OCTET
      -- STRING C2 (as long as the plaintext) }, read by the openssl CLI
      T.write(dir .. "/sm2ct.der", ct)
      local asn = T.sh(("openssl asn1parse -inform DER -in %s/sm2ct.der")
                       :format(dir))
      local prims = {}
      for what in asn:gmatch("prim: (%u[%u ]*%u)") do
        prims[#prims + 1] = what
      end
      assert.same({ "INTEGER", "INTEGER", "OCTET STRING", "OCTET STRING" },
                  prims)
      local lens = {}
      for l in asn:gmatch("hl=%s*%d+ l=%s*(%d+) prim: OCTET STRING") do
        lens[#lens + 1] = tonumber(l)
      end
      assert.same({ 32, #text }, lens)
    end)

    it("interoperates with the openssl CLI both ways", function()
      local sm2 = assert(crypto.private_key(T.fixture("a10a_sm2_key.pem")))
      local pub = assert(crypto.public_key(T.sh(
        "openssl pkey -in spec/fixtures/wechatpay/a10a_sm2_key.pem -pubout")))
      local ct = assert(crypto.sm2_encrypt(pub, "13800138000"))
      T.write(dir .. "/sm2a.bin", ct)
      assert.equal("13800138000", T.sh(("openssl pkeyutl -decrypt -inkey "
        .. "spec/fixtures/wechatpay/a10a_sm2_key.pem -in %s/sm2a.bin")
        :format(dir)))
      T.write(dir .. "/sm2p.txt", "李四")
      T.sh(("openssl pkey -in spec/fixtures/wechatpay/a10a_sm2_key.pem "
            .. "-pubout -out %s/sm2pub.pem"):format(dir))
      T.sh(("openssl pkeyutl -encrypt -pubin -inkey %s/sm2pub.pem -in "
            .. "%s/sm2p.txt -out %s/sm2b.bin"):format(dir, dir, dir))
      assert.equal("李四", crypto.sm2_decrypt(sm2, T.read(dir .. "/sm2b.bin")))
    end)
  end)

  describe("digest and hmac", function()
    it("raises on unknown algorithms", function()
      assert.has_error(function() crypto.digest("md5", "x") end)
      assert.has_error(function() crypto.hmac("crc32", "k", "x") end)
    end)

    it("matches the standard vectors", function()
      assert.equal("66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0", hex(crypto.digest("sm3", "abc")))
      assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", hex(crypto.digest("sha256", "abc")))
      assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", hex(crypto.digest("sha1", "abc")))
      assert.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        hex(crypto.hmac("sha256", "Jefe", "what do ya want for nothing?")))
      assert.equal("fa2028801e86d45f5638cadafb5db2e976c9046f49f9938abd2dedf4f60e08ae", hex(crypto.digest("sm3", APIV3)))
    end)

    it("streams large inputs to the same result as one shot", function()
      for _, alg in ipairs({ "sha1", "sha256", "sm3" }) do
        local chunk = crypto.random_bytes(4096)
        local d = crypto.digest_new(alg)
        local parts = {}
        for i = 1, 64 do
          assert.equal(d, d:update(chunk))
          parts[i] = chunk
        end
        assert.equal(crypto.digest(alg, table.concat(parts)), d:final())
        assert.has_error(function() d:final() end)
        assert.has_error(function() d:update("x") end)
        d:close()
      end
    end)
  end)

  describe("random, encodings, compare", function()
    it("makes alphanumeric nonces from the CSPRNG", function()
      local a, b = crypto.random_nonce(), crypto.random_nonce()
      assert.equal(32, #a)
      assert.not_equal(a, b)
      assert.matches("^[0-9A-Za-z]+$", a)
      assert.equal(7, #crypto.random_nonce(7))
      assert.has_error(function() crypto.random_nonce(0) end)
      local seen = {}
      for c in crypto.random_nonce(1024):gmatch(".") do seen[c] = true end
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      assert.is_true(n > 50)   -- uses the whole alphabet
    end)

    it("decodes base64 strictly", function()
      for _, bad in ipairs({ "abc", "ab=c", "Zm9v\n", " Zm9v", "Zm9v====", "Zg=", "Zh==", "Zm8=Zm8=", "Zm9-", "Z===", "====" }) do
        local v, err = crypto.base64_decode(bad)
        assert.is_nil(v, bad)
        assert.equal("bad_base64", err.kind)
      end
      assert.equal("", crypto.base64_decode(""))
      assert.equal("f", crypto.base64_decode("Zg=="))
      assert.equal("fo", crypto.base64_decode("Zm8="))
      assert.equal("foo", crypto.base64_decode("Zm9v"))
      for n = 0, 64 do
        local s = crypto.random_bytes(n)
        local b64 = crypto.base64_encode(s)
        assert.equal(s, crypto.base64_decode(b64))
        assert.equal(T.sh("printf '%s' '" .. b64 .. "' | base64 -d | od -An -tx1 | tr -d ' \\n'"), hex(s))
      end
    end)

    it("encodes and decodes hex strictly", function()
      assert.equal("00ff10", crypto.hex_encode("\0\255\16"))
      assert.equal("\0\255\16", crypto.hex_decode("00FF10"))
      assert.equal("bad_hex", select(2, crypto.hex_decode("abc")).kind)
      assert.equal("bad_hex", select(2, crypto.hex_decode("zz")).kind)
    end)

    it("compares in constant time", function()
      assert.is_true(crypto.constant_time_equal("abc", "abc"))
      assert.is_false(crypto.constant_time_equal("abc", "abd"))
      assert.is_false(crypto.constant_time_equal("abc", "abcd"))
      assert.is_true(crypto.constant_time_equal("", ""))
    end)
  end)
end)
