-- paygate decrypt: decrypts through paygate.wechatpay.resource (the
-- client's decryptor), so it accepts and refuses exactly what the client
-- does; the SM4 key derivation checked against SM3 computed here; a
-- notification without a resource, a notification given as --resource;
-- a key with a leading space, a PEM file given as the key file.
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local resource = require "paygate.wechatpay.resource"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir
local write = diagpki.write
local KEY = "0123456789abcdefghijABCDEFGHIJkl"

local function run(args) return diagpki.run(dir, args) end

local function file(name, content)
  write(dir .. "/" .. name, content)
  return dir .. "/" .. name
end

local function decrypt(res, key, opt)
  return run({ "decrypt", "--json", "--apiv3-key-file", file("k", key or KEY),
               opt or "--resource", file("r.json", json.encode(res)) })
end

local function aes(nonce, aad)
  -- (crypto takes nonces up to 128 bytes: a longer one gets another's
  -- ciphertext, to be refused as the client refuses it)
  local ct = crypto.aead_encrypt("AEAD_AES_256_GCM", KEY,
                                 #nonce > 128 and "abcdefghijkl" or nonce,
                                 type(aad) == "string" and aad or "",
                                 '{"out_trade_no":"T-1"}')
  return { algorithm = "AEAD_AES_256_GCM", nonce = nonce,
           associated_data = aad, ciphertext = crypto.base64_encode(ct) }
end

setup(function() dir = server.tmpdir() end)
teardown(function() os.execute("rm -rf " .. dir) end)

describe("paygate decrypt", function()
  it("accepts and refuses what the client's decryptor does", function()
    local cases = {
      aes("abcdefghijkl", "transaction"),
      aes("abcdefghijkl", 5),                   -- associated_data a number
      aes("abcdefghijkl", json.null),
      aes(("n"):rep(129), "transaction"),       -- a long nonce
      aes(("n"):rep(300), "transaction"),
      { algorithm = "AEAD_AES_256_GCM", nonce = "abcdefghijkl",
        ciphertext = "AAAA" },                  -- shorter than the tag
      { algorithm = "AEAD_AES_256_GCM", nonce = "abcdefghijkl",
        ciphertext = "not base64!" },
      { algorithm = "AEAD_AES_256_GCM", ciphertext = "AAAA" },
    }
    for i, res in ipairs(cases) do
      local plain, err = resource.decrypt(res, { KEY })
      local code, out, r = decrypt(res)
      if plain then
        assert.equal(0, code, "case " .. i .. ": " .. out)
      else
        assert.equal(1, code, "case " .. i .. ": " .. out)
        if err.kind == "malformed" then
          assert.equal("malformed", r[1].kind, "case " .. i .. ": " .. out)
        else
          assert.not_equal("malformed", r[1].kind, "case " .. i)
        end
      end
    end
  end)

  it("names a non-string associated_data as malformed, not a tag mismatch",
     function()
    local code, out, r = decrypt(aes("abcdefghijkl", 5))
    assert.equal(1, code, out)
    assert.equal("malformed", r[1].kind)
  end)

  it("derives the SM4 key as the first 16 bytes of SM3(APIv3 key)",
     function()
    local k = crypto.digest("sm3", KEY):sub(1, 16)
    local ct = crypto.aead_encrypt("AEAD_SM4_GCM", k, "abcdefghijkl",
                                   "certificate", "SM4 plaintext")
    local code, out = decrypt({ algorithm = "AEAD_SM4_GCM",
      nonce = "abcdefghijkl", associated_data = "certificate",
      ciphertext = crypto.base64_encode(ct) })
    assert.equal(0, code, out)
    assert.matches("SM4 plaintext", out, 1, true)
  end)

  it("says a notification without a resource has none", function()
    local code, out, r = decrypt({ id = "EV-1", event_type = "X" }, nil,
                                 "--notification")
    assert.equal(1, code, out)
    assert.equal("malformed", r[1].kind)
    assert.matches("no resource object", r[1].cause)
    assert.is_nil(out:find("unknown_algorithm", 1, true))
  end)

  it("says a JSON object without an algorithm is no resource (not an"
     .. " unknown algorithm \"nil\")", function()
    -- a /v3/certificates answer (its resources are data[i]
    -- .encrypt_certificate), or any other JSON object
    for _, doc in ipairs{ { data = { { encrypt_certificate =
                              aes("abcdefghijkl", "certificate") } } },
                          { out_trade_no = "T-1" } } do
      local code, out, r = decrypt(doc)
      assert.equal(1, code, out)
      assert.equal("malformed", r[1].kind, out)
      assert.matches("no algorithm", r[1].cause, 1, true)
      assert.is_nil(out:find("nil", 1, true), out)
      assert.matches("encrypt_certificate", r[1].fix, 1, true)
    end
    -- an algorithm that is there but not known is still named so
    local res = aes("abcdefghijkl", "transaction")
    res.algorithm = "AES-256-ECB"
    local code, out, r = decrypt(res)
    assert.equal(1, code, out)
    assert.equal("unknown_algorithm", r[1].kind, out)
    -- one that is no string is told by its JSON type, never by a Lua
    -- table's address; a nonce that is no string likewise
    res.algorithm = {}
    code, out, r = decrypt(res)
    assert.equal(1, code, out)
    assert.matches("algorithm (an object or array) is not", r[1].cause, 1,
                   true)
    assert.is_nil(out:find("table: 0x", 1, true), out)
    res = aes("abcdefghijkl", "transaction")
    res.nonce = 12
    code, out, r = decrypt(res)
    assert.equal(1, code, out)
    assert.matches("resource nonce is not a string (a number)", r[1].cause,
                   1, true)
  end)

  it("suggests --notification for a whole notification", function()
    local code, out, r = decrypt({ id = "EV-1",
      resource = aes("abcdefghijkl", "transaction") })
    assert.equal(1, code, out)
    assert.matches("%-%-notification", r[1].fix)
  end)

  it("reads a key file with spaces around the key as the gateway does,"
     .. " and names a PEM file given as the key", function()
    local res = aes("abcdefghijkl", "transaction")
    local code, out, r = decrypt(res, " " .. KEY)
    assert.equal(0, code, out)
    local pem = "-----BEGIN CERTIFICATE-----\n" .. ("QUJD"):rep(100)
                .. "\n-----END CERTIFICATE-----\n"
    code, out, r = decrypt(res, pem)
    assert.equal(1, code, out)
    assert.matches("PEM file", r[1].cause)
  end)

  it("--help describes --json, which its usage line offers", function()
    local code, out = run({ "decrypt", "--help" })
    assert.equal(0, code, out)
    assert.matches("[--json]", out, 1, true)
    local line = out:match("\n%s*%-%-json%s+([^\n]+)")
    assert.truthy(line, out)
    assert.matches("JSON object", line, 1, true)
    -- and it prints what the help says
    local r
    code, out, r = decrypt(aes("abcdefghijkl", "transaction"))
    assert.equal(0, code, out)
    assert.equal("plaintext", r[1].kind)
    assert.equal("string", type(r[1].plaintext))
  end)

  -- decrypt takes its key through its own option: a wrong key's fix names
  -- it, not the client's config keys (a client's key_names may call them
  -- otherwise; the gateway's are files). Before: "previous_apiv3_keys
  -- (paygate.wechatpay's config), previous_apiv3_key_files (the gateway's)".
  it("a wrong key's fix names its own option, --apiv3-key-file", function()
    local code, out, r = decrypt(aes("abcdefghijkl", "transaction"),
                                 ("x"):rep(32))
    assert.equal(1, code, out)
    assert.equal("tag_mismatch", r[1].kind, out)
    assert.matches("--apiv3-key-file", r[1].fix, 1, true)
    for _, name in ipairs({ "apiv3_key", "previous_apiv3_keys",
                            "previous_apiv3_key_files" }) do
      assert.is_nil(r[1].fix:find(name, 1, true), r[1].fix)
      assert.is_nil(r[1].detail:find(name, 1, true), r[1].detail)
      assert.is_nil(r[1].cause:find(name, 1, true), r[1].cause)
    end
  end)

  it("names an associated_data or an algorithm changed on the way, not "
     .. "the key", function()
    local res = assert(resource.encrypt(KEY, '{"out_refund_no":"R-1"}',
      "refund", { original_type = "refund" }))
    local changed = {}
    for k, v in pairs(res) do changed[k] = v end
    changed.associated_data = "transaction"
    local code, out, r = decrypt(changed)
    assert.equal(1, code, out)
    assert.equal("associated_data", r[1].kind, out)
    assert.matches('encrypted with "refund"', r[1].cause, 1, true)
    assert.matches("the APIv3 key is right", r[1].detail, 1, true)
    changed.associated_data = nil
    code, out, r = decrypt(changed)
    assert.equal("associated_data", r[1].kind, out)
    assert.matches("associated_data is missing", r[1].cause, 1, true)
    -- SM4 ciphertext labelled AES
    local sm = assert(resource.encrypt(KEY, "{}", "transaction",
                                       { algorithm = resource.SM4 }))
    sm.algorithm = resource.AES
    code, out, r = decrypt(sm)
    assert.equal(1, code, out)
    assert.equal("algorithm", r[1].kind, out)
    -- the wrong key is still the wrong key
    code, out, r = decrypt(res, ("x"):rep(32))
    assert.equal(1, code, out)
    assert.equal("tag_mismatch", r[1].kind, out)
  end)
end)
