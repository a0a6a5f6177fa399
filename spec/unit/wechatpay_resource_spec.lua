-- paygate.wechatpay.resource: the one AEAD resource encryptor/decryptor
-- (notifications and /v3/certificates), checked against the published
-- vectors and round trips.
local resource = require "paygate.wechatpay.resource"

local KEY = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"

describe("resource.encrypt", function()
  it("reproduces the AES-256-GCM vector", function()
    local r = assert(resource.encrypt(KEY, "message", "associatedData",
                                      { nonce = "uluk4a9R25RW" }))
    assert.equal("AEAD_AES_256_GCM", r.algorithm)
    assert.equal("ulwSiIajGClcvcOYvOQ7+l+0PAbzzwI=", r.ciphertext)
    assert.equal("associatedData", r.associated_data)
    assert.equal("uluk4a9R25RW", r.nonce)
  end)

  it("reproduces the SM4-GCM vector (key from SM3 of the APIv3 key)",
     function()
    local r = assert(resource.encrypt(KEY, "plaintext", "associatedData",
      { nonce = "uluk4a9R25RW", algorithm = "AEAD_SM4_GCM" }))
    assert.equal("+lcLNfkZQQx+iQm20Apa3x9Mb/5L7PgZ7w==", r.ciphertext)
  end)

  it("makes a fresh 12-character nonce each time", function()
    local a = assert(resource.encrypt(KEY, "x", "transaction",
                                      { original_type = "transaction" }))
    local b = assert(resource.encrypt(KEY, "x", "transaction"))
    assert.equal(12, #a.nonce)
    assert.not_equal(a.nonce, b.nonce)
    assert.not_equal(a.ciphertext, b.ciphertext)
    assert.equal("transaction", a.original_type)
  end)

  it("raises on misuse", function()
    assert.has_error(function() resource.encrypt(nil, "x") end)
    assert.has_error(function() resource.encrypt(KEY, 1) end)
    assert.has_error(function()
      resource.encrypt(KEY, "x", "", { algorithm = "AES" })
    end)
  end)

  it("returns an error for a key of the wrong size", function()
    local r, err = resource.encrypt("short", "x", "")
    assert.is_nil(r)
    assert.equal("bad_key", err.kind)
  end)
end)

describe("resource.decrypt", function()
  it("opens what encrypt made, both algorithms", function()
    for _, alg in ipairs({ "AEAD_AES_256_GCM", "AEAD_SM4_GCM" }) do
      local r = assert(resource.encrypt(KEY, '{"a":1}', "refund",
                                        { algorithm = alg }))
      assert.equal('{"a":1}', assert(resource.decrypt(r, { KEY })))
    end
  end)

  it("tries each key in turn (a rotated APIv3 key)", function()
    local r = assert(resource.encrypt(KEY, "x", "certificate"))
    assert.equal("x", assert(resource.decrypt(r,
      { "0123456789abcdef0123456789abcdef", KEY })))
  end)

  -- the position of the key that decrypted: more than 1, a previous key
  -- (WeChat not on the current one yet: paygate.wechatpay.rotation)
  it("says which key decrypted", function()
    local r = assert(resource.encrypt(KEY, "x", "certificate"))
    local other = "0123456789abcdef0123456789abcdef"
    assert.same({ "x", nil, 2 }, { resource.decrypt(r, { other, KEY }) })
    assert.same({ "x", nil, 1 }, { resource.decrypt(r, { KEY, other }) })
  end)

  it("refuses hostile input with a classified error", function()
    local good = assert(resource.encrypt(KEY, "x", "transaction"))
    local function with(k, v)
      local r = {}
      for kk, vv in pairs(good) do r[kk] = vv end
      r[k] = v
      return r
    end
    local cases = {
      { "not a table", "malformed" },
      { with("algorithm", "ROT13"), "malformed" },
      { with("nonce", ""), "malformed" },
      { with("nonce", ("n"):rep(300)), "malformed" },
      -- past the 128 bytes GCM takes here: malformed, as documented (not
      -- decrypt_failed, which means a wrong key or altered data)
      { with("nonce", ("n"):rep(129)), "malformed" },
      { with("associated_data", 5), "malformed" },
      { with("ciphertext", "%%%"), "malformed" },
      { with("ciphertext", "AAAA"), "decrypt_failed" },
      { with("associated_data", "refund"), "decrypt_failed" },
    }
    for _, c in ipairs(cases) do
      local plain, err = resource.decrypt(c[1], { KEY })
      assert.is_nil(plain)
      assert.equal(c[2], err.kind)
    end
    local plain, err = resource.decrypt(good, { "0123456789abcdef0123456789abcdef" })
    assert.is_nil(plain)
    assert.equal("decrypt_failed", err.kind)
    assert.not_matches(KEY, tostring(err), 1, true)
  end)
end)
