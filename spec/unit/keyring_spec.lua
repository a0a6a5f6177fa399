-- paygate.keyring: Wechatpay-Serial -> verifier, per worker, in C.
local crypto = require "paygate.crypto"
local keyring = require "paygate.keyring"
local T = dofile("spec/fixtures/cryptotest.lua")

local PUB_ID = "PUB_KEY_ID_0000000000000024101100397200000006"
local VERIFY_11_3 = '1722850421\nd824f2e086d3c1df967785d13fcd22ef\n{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}\n'
local SIG_11_3 = "mfI1CPqvBrgcXfgXMFjdNIhBf27ACE2YyeWsWV9ZI7T7RU0vHvbQpu9Z32ogzc+k8ZC5n3kz7h70eWKjgqNdKQF0eRp8mVKlmfzMLBVHbssB9jEZEDXThOX1XFqX7s7ymia1hoHQxQagPGzkdWxtlZPZ4ZPvr1RiqkgAu6Is8MZgXXrRoBKqjmSdrP1N7uxzJ/cjfSiis9FiLjuADoqmQ1P7p2N876YPAol7Rn0+GswwAwxldbdLrmVSjfytfSBJFqTMHn4itojgxSWWN1byuckQt8hSTEv/Lg97QoeGniYP17T80pJeQyL3b+295FPHSO2AtvCgyIbKMZ0BALilAA=="

local function fails_with(kind, v, err)
  assert.is_nil(v)
  assert.is_table(err)
  assert.equal(kind, err.kind, tostring(err))
  return err
end

describe("paygate.keyring", function()
  local wxpub, a6, a9, a5
  before_each(function()
    keyring.clear()
    wxpub = assert(crypto.public_key(T.fixture("a2_wechatpay_pubkey.pem")))
    a6 = assert(crypto.certificate(T.fixture("a6_platform_cert.pem")))   -- 2022-05-10 .. 2025-05-09
    a9 = assert(crypto.certificate(T.fixture("a9_go_platform_cert.pem"))) -- 2021-04-27 .. 2031-04-25
    a5 = assert(crypto.private_key(T.fixture("a5_platform_key.pem")))
  end)
  after_each(function() keyring.clear() end)

  describe("errors", function()
    it("unknown_serial names the fix", function()
      local err = fails_with("unknown_serial", keyring.get("5157F09EFDC096DE15EBE81A47057A7232F1B8E1"))
      assert.matches("refresh platform certificates", err.message)
      fails_with("unknown_serial", keyring.verify("nope", "data", "sig"))
    end)

    it("checks each entry's validity window", function()
      keyring.put(nil, a6)                                  -- id = serial
      local id = "440024045C4A427599D09BB4E3DE0279F2E813FD"
      fails_with("cert_expired", keyring.get(id, a6:not_after() + 1))
      fails_with("cert_not_yet_valid", keyring.get(id, a6:not_before() - 1))
      assert.is_not_nil(keyring.get(id, a6:not_before() + 1))
      if os.time() > a6:not_after() then
        fails_with("cert_expired", keyring.verify(id, "message", "sig"))
      end
      -- explicit window for a public key
      keyring.put("PUB_KEY_ID_1", wxpub, { not_before = 100, not_after = 200 })
      fails_with("cert_expired", keyring.get("PUB_KEY_ID_1", 201))
      local nyv = fails_with("cert_not_yet_valid",
                             keyring.get("PUB_KEY_ID_1", 99))
      -- (it said "is valid from 100: check the clock")
      assert.equal("verifier PUB_KEY_ID_1 is valid from"
        .. " 1970-01-01T00:01:40Z, 1 s after this host's clock: check the"
        .. " clock (NTP); a certificate is used from its start", nyv.message)
      local exp = fails_with("cert_expired", keyring.get("PUB_KEY_ID_1", 260))
      assert.equal("verifier PUB_KEY_ID_1 expired at 1970-01-01T00:03:20Z"
        .. " (60 s before this host's clock): download the current platform"
        .. " certificate", exp.message)
      assert.is_not_nil(keyring.get("PUB_KEY_ID_1", 150))
    end)

    it("a certificate that ended before 1970 is expired, not unbounded",
       function()
      -- its notAfter is a negative epoch: a check for "has an end"
      -- written as > 0 took it for a key without one, valid for ever
      local dir = T.tmpdir()
      local function sh(fmt, ...) return T.sh((fmt):format(...)) end
      sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/ca.key -out"
         .. " %s/ca.pem -subj /CN=oldca -days 1", dir, dir)
      sh("openssl req -newkey rsa:2048 -nodes -keyout %s/l.key -out %s/l.csr"
         .. " -subj /CN=old", dir, dir)
      local f = assert(io.open(dir .. "/ca.cnf", "w"))
      f:write(("[ca]\ndefault_ca=d\n[d]\ndatabase=%s/index.txt\n"
        .. "new_certs_dir=%s\nserial=%s/serial\ndefault_md=sha256\n"
        .. "policy=p\n[p]\ncommonName=supplied\n"):format(dir, dir, dir))
      f:close()
      sh("touch %s/index.txt && echo 01 > %s/serial", dir, dir)
      sh("openssl ca -batch -notext -config %s/ca.cnf -in %s/l.csr -cert"
         .. " %s/ca.pem -keyfile %s/ca.key -startdate 600101000000Z"
         .. " -enddate 650101000000Z -out %s/l.pem", dir, dir, dir, dir, dir)
      local c = assert(crypto.certificate(T.read(dir .. "/l.pem")))
      T.cleanup(dir)
      assert.is_true(c:not_after() < 0)
      keyring.put("OLD", c)
      local err = fails_with("cert_expired", keyring.get("OLD"))
      assert.is_nil(keyring.newest())
      -- listed and told with its real end, as cert:not_after() gives it
      -- (it showed 1: 1970-01-01T00:00:01Z)
      assert.equal(c:not_after(), keyring.list()[1].not_after)
      assert.equal(c:not_before(), keyring.list()[1].not_before)
      -- in words an operator reads: the date, and how long ago by this
      -- host's clock (it said "expired at -315619200")
      assert.truthy(err.message:find("expired at 1965-01-01T00:00:00Z (",
                                     1, true), err.message)
      assert.matches("%(%d+ s before this host's clock%)", err.message)
    end)

    it("classifies bad signatures and algorithm mismatches", function()
      keyring.put(PUB_ID, wxpub)
      local sig = crypto.base64_decode(SIG_11_3)
      fails_with("signature_mismatch", keyring.verify(PUB_ID, VERIFY_11_3 .. "x", sig))
      fails_with("key_type_mismatch", keyring.verify(PUB_ID, VERIFY_11_3, sig, "WECHATPAY2-SM2-WITH-SM3"))
      fails_with("unsupported_algorithm", keyring.verify(PUB_ID, VERIFY_11_3, sig, "rot13"))
    end)

    it("raises on misuse", function()
      assert.has_error(function() keyring.put("x", "not a key") end)
      assert.has_error(function() keyring.put("", wxpub) end)
      assert.has_error(function() keyring.put(nil, wxpub) end)   -- id needed without a cert
      assert.has_error(function() keyring.replace({ { id = "x", key = 42 } }) end)
    end)
  end)

  it("verifies through one lookup (public key mode)", function()
    assert.equal(PUB_ID, keyring.put(PUB_ID, wxpub))
    assert.is_true(keyring.verify(PUB_ID, VERIFY_11_3, crypto.base64_decode(SIG_11_3)))
    assert.is_true(keyring.verify(PUB_ID, VERIFY_11_3, crypto.base64_decode(SIG_11_3), "WECHATPAY2-SHA256-RSA2048"))
    -- the entry holds its own reference: closing the handle does not matter
    wxpub:close()
    collectgarbage()
    assert.is_true(keyring.verify(PUB_ID, VERIFY_11_3, crypto.base64_decode(SIG_11_3)))
  end)

  it("serves certificates by serial, case-insensitively, and signs/verifies with them", function()
    assert.equal("440024045C4A427599D09BB4E3DE0279F2E813FD", keyring.put(nil, a6))
    local at = a6:not_before() + 10
    local data = "1554208460\nnonce\nbody\n"
    local sig = crypto.sign(a5, data)
    assert.is_true(keyring.verify("440024045c4a427599d09bb4e3de0279f2e813fd", data, sig, nil, at))
    local got = assert(keyring.get("440024045C4A427599D09BB4E3DE0279F2E813FD", at))
    assert.equal(a6:fingerprint(), got:fingerprint())
  end)

  it("replaces an entry atomically and lists entries sorted", function()
    keyring.put("ID-B", wxpub)
    keyring.put("ID-A", a9)
    assert.equal(2, keyring.count())
    keyring.put("ID-B", a9)                -- rotation of one id
    assert.equal(2, keyring.count())
    local list = keyring.list()
    assert.equal(2, #list)
    assert.equal("ID-A", list[1].id)
    assert.equal("ID-B", list[2].id)
    assert.equal("certificate", list[2].source)
    assert.equal("RSA", list[2].key_type)
    assert.equal(2048, list[2].key_bits)
    assert.equal(a9:not_after(), list[2].not_after)
    assert.is_string(list[1].fingerprint)
    assert.is_true(keyring.remove("ID-A"))
    assert.is_false(keyring.remove("ID-A"))
    assert.equal(1, keyring.count())
    fails_with("unknown_serial", keyring.get("ID-A"))
  end)

  it("replace() swaps the whole set, or nothing on error", function()
    keyring.put("OLD", wxpub)
    local ok, err = keyring.replace({ { id = "NEW1", key = a9 }, { id = "NEW2", key = wxpub, not_after = 5 } })
    assert.is_true(ok, tostring(err))
    assert.equal(2, keyring.count())
    fails_with("unknown_serial", keyring.get("OLD"))
    fails_with("cert_expired", keyring.get("NEW2"))
    -- a certificate whose key we cannot use: nothing changes
    local dir = T.tmpdir()
    T.sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout %s/ec.key -out %s/ec.pem -subj /CN=ec -days 2"):format(dir, dir))
    local ec = assert(crypto.certificate(T.read(dir .. "/ec.pem")))
    T.cleanup(dir)
    fails_with("malformed", keyring.replace({ { id = "X", key = a9 }, { id = "EC", key = ec } }))
    assert.equal(2, keyring.count())
    assert.is_not_nil(keyring.get("NEW1"))
  end)

  it("removes hex serials case-insensitively, like put/get/verify", function()
    local serial = keyring.put(nil, a6)
    assert.is_true(keyring.remove(serial:lower()))
    assert.equal(0, keyring.count())
    fails_with("unknown_serial", keyring.get(serial, a6:not_before() + 10))
    -- PUB_KEY_ID_ ids stay opaque (exact match)
    keyring.put("PUB_KEY_ID_abc", wxpub)
    assert.is_false(keyring.remove("PUB_KEY_ID_ABC"))
    assert.is_true(keyring.remove("PUB_KEY_ID_abc"))
  end)

  it("finds a hex serial with or without its leading zeros", function()
    -- Go and OpenSSL write "0A1E...", Java's BigInteger "A1E..."
    local z40 = "0A1E989910B253E069A11568C91C57CA44568101"
    local z39 = z40:sub(2)
    assert.equal(z40, keyring.put(z40, wxpub))
    for _, id in ipairs({ z39, z40, z39:lower(), "00" .. z40 }) do
      assert.is_not_nil(keyring.get(id), id)
      assert.is_true(keyring.verify_base64(id, VERIFY_11_3, SIG_11_3), id)
    end
    -- one entry, listed as it was put; putting the other spelling
    -- replaces it
    assert.same({ z40 }, { keyring.list()[1].id })
    keyring.put(z39, wxpub)
    assert.equal(1, keyring.count())
    assert.is_true(keyring.remove("000" .. z39))
    assert.equal(0, keyring.count())
    -- "0" and "00" are one serial; ids that are not hex, and PUB_KEY_ID_
    -- ids, keep their zeros
    keyring.put("00", wxpub)
    assert.is_not_nil(keyring.get("0"))
    keyring.put("0XYZ", wxpub)
    fails_with("unknown_serial", keyring.get("XYZ"))
    keyring.put("PUB_KEY_ID_0001", wxpub)
    fails_with("unknown_serial", keyring.get("PUB_KEY_ID_001"))
    -- on a ring too
    local ring = keyring.new()
    ring:put(z40, wxpub)
    assert.is_true(ring:verify_lines_base64(z39, SIG_11_3, nil, nil,
      VERIFY_11_3:match("^(.-)\n(.-)\n(.*)\n$")))
    ring:close()
  end)

  it("replace() reads items raw: an __index cannot change or abort them", function()
    keyring.put("OLD", wxpub)
    -- an id that is a string when checked and a table when used
    local calls = 0
    local item = setmetatable({}, { __index = function(_, k)
      calls = calls + 1
      if k == "key" then return wxpub end
      return calls <= 2 and "ABC" or {}
    end })
    assert.has_error(function() keyring.replace({ item }) end)
    assert.equal(1, keyring.count())
    assert.is_not_nil(keyring.get("OLD"))
    -- an __index that raises while the new set is being built (C memory
    -- held): never consulted, the items' own fields are complete
    local raising = setmetatable({ id = "B", key = wxpub }, { __index = function()
      error("boom")
    end })
    assert.is_true(keyring.replace({ { id = "A", key = wxpub }, raising }))
    assert.equal(2, keyring.count())
    assert.is_not_nil(keyring.get("B"))
  end)

  it("picks the newest valid certificate for encryption", function()
    assert.is_nil(keyring.newest())
    keyring.put(PUB_ID, wxpub)
    assert.equal(PUB_ID, keyring.newest())
    keyring.put(nil, a9)
    keyring.put(nil, a6)
    local at = a6:not_before() + 10                 -- both valid; a6 is newer
    assert.equal("440024045C4A427599D09BB4E3DE0279F2E813FD", keyring.newest(at))
    assert.equal("D7CE59D1F522D701", keyring.newest(a6:not_after() + 10))
  end)

  it("holds many entries with O(1) lookups", function()
    for i = 1, 2000 do
      keyring.put(("SERIAL%05d"):format(i), wxpub)
    end
    for i = 1, 2000, 3 do
      assert.is_true(keyring.remove(("SERIAL%05d"):format(i)))
    end
    for i = 1, 2000 do
      local v = keyring.get(("SERIAL%05d"):format(i))
      if i % 3 == 1 then assert.is_nil(v) else assert.is_not_nil(v) end
    end
    assert.equal(2000 - 667, keyring.count())
  end)

  describe("verify_base64", function()
    it("decodes the header's base64 and verifies (module and ring)", function()
      keyring.put(PUB_ID, wxpub)
      assert.is_true(keyring.verify_base64(PUB_ID, VERIFY_11_3, SIG_11_3))
      fails_with("signature_mismatch", keyring.verify_base64(PUB_ID, VERIFY_11_3 .. "x", SIG_11_3))
      local ring = keyring.new()
      ring:put(PUB_ID, wxpub)
      assert.is_true(ring:verify_base64(PUB_ID, VERIFY_11_3, SIG_11_3, "WECHATPAY2-SHA256-RSA2048"))
      ring:close()
    end)

    it("invalid base64 is a classified failure, never a raise", function()
      keyring.put(PUB_ID, wxpub)
      local ring = keyring.new()
      ring:put(PUB_ID, wxpub)
      local bad = {
        "",                                   -- empty
        SIG_11_3:sub(1, -2),                  -- length not a multiple of 4
        "WECHATPAY/SIGNTEST/" .. SIG_11_3:sub(20),
        SIG_11_3:gsub("A", "-"),              -- url-safe alphabet
        SIG_11_3:sub(1, 100) .. "\n" .. SIG_11_3:sub(101),
        ("A"):rep(4000),                      -- longer than any signature
        "AB==AB==",                           -- padding inside
        "AB=A",
      }
      for _, sig in ipairs(bad) do
        local err = fails_with("signature_mismatch", keyring.verify_base64(PUB_ID, VERIFY_11_3, sig))
        assert.truthy(err.message:find("base64", 1, true) or err.message:find("does not match", 1, true), err.message)
        fails_with("signature_mismatch", ring:verify_base64(PUB_ID, VERIFY_11_3, sig))
      end
      local err = fails_with("signature_mismatch", keyring.verify_base64(PUB_ID, VERIFY_11_3, "!!!!"))
      assert.matches("not valid base64", err.message)
      -- the lookup comes first: an unknown id is named as such
      fails_with("unknown_serial", keyring.verify_base64("NOPE", VERIFY_11_3, "!!!!"))
      ring:close()
    end)
  end)

  describe("ring:verify_lines_base64", function()
    it("verifies the lines each followed by a newline, as one string", function()
      local ring = keyring.new()
      ring:put(PUB_ID, wxpub)
      local ts, nonce, body = VERIFY_11_3:match("^(.-)\n(.-)\n(.*)\n$")
      assert.is_true(ring:verify_lines_base64(PUB_ID, SIG_11_3, nil, nil, ts, nonce, body))
      assert.is_true(ring:verify_lines_base64(PUB_ID, SIG_11_3, "WECHATPAY2-SHA256-RSA2048", nil, ts, nonce, body))
      -- the same bytes split elsewhere still verify; other bytes do not
      assert.is_true(ring:verify_lines_base64(PUB_ID, SIG_11_3, nil, nil, ts .. "\n" .. nonce, body))
      fails_with("signature_mismatch", ring:verify_lines_base64(PUB_ID, SIG_11_3, nil, nil, ts, nonce, body .. " "))
      fails_with("signature_mismatch", ring:verify_lines_base64(PUB_ID, SIG_11_3, nil, nil, ts, nonce))
      fails_with("signature_mismatch", ring:verify_lines_base64(PUB_ID, "!!!!", nil, nil, ts, nonce, body))
      fails_with("unknown_serial", ring:verify_lines_base64("NOPE", SIG_11_3, nil, nil, ts, nonce, body))
      fails_with("unsupported_algorithm", ring:verify_lines_base64(PUB_ID, SIG_11_3, "rot13", nil, ts, nonce, body))
      -- a body longer than the 4 KiB stack buffer
      local big = ("x"):rep(10000)
      fails_with("signature_mismatch", ring:verify_lines_base64(PUB_ID, SIG_11_3, nil, nil, ts, nonce, big))
      assert.has_error(function() ring:verify_lines_base64(PUB_ID, SIG_11_3, nil, nil, ts, {}) end)
      ring:close()
    end)
  end)

  describe("keyring.new", function()
    it("keeps each ring's verifiers to itself", function()
      local a, b = keyring.new(), keyring.new()
      local data = "1554208460\nnonce\nbody\n"
      local sig = crypto.sign(a5, data)
      -- the same serial in ring a only; the default ring stays empty
      assert.equal("SERIAL1", a:put("SERIAL1", a6, { not_before = 0, not_after = 0 }))
      assert.is_true(a:verify("SERIAL1", data, sig))
      fails_with("unknown_serial", b:verify("SERIAL1", data, sig))
      fails_with("unknown_serial", keyring.verify("SERIAL1", data, sig))
      -- the same id in two rings, different keys: each verifies with its own
      b:put("SERIAL1", wxpub)
      fails_with("signature_mismatch", b:verify("SERIAL1", data, sig))
      assert.is_true(b:verify_base64("SERIAL1", VERIFY_11_3, SIG_11_3))
      fails_with("signature_mismatch", a:verify_base64("SERIAL1", VERIFY_11_3, SIG_11_3))
      assert.equal(1, a:count())
      assert.equal(1, b:count())
      assert.equal(0, keyring.count())
      -- the default ring does not leak into new rings either
      keyring.put(PUB_ID, wxpub)
      fails_with("unknown_serial", a:get(PUB_ID))
      assert.equal(0, keyring.new():count())
      a:close()
      b:close()
    end)

    it("has every module operation as a method", function()
      local r = keyring.new()
      assert.is_true(r:replace({ { id = "B", key = wxpub }, { id = "A", key = a9 } }))
      assert.equal(2, r:count())
      local list = r:list()
      assert.equal("A", list[1].id)
      assert.equal("B", list[2].id)
      assert.equal("A", r:newest(a9:not_before() + 10))
      assert.is_not_nil(r:get("B"))
      assert.is_true(r:remove("B"))
      assert.is_false(r:remove("B"))
      r:clear()
      assert.equal(0, r:count())
      assert.matches("0 entries", tostring(r))
      r:close()
    end)

    it("frees its entries when collected, and close() twice is safe", function()
      local r = keyring.new()
      r:put(PUB_ID, wxpub)
      r:close()
      r:close()
      assert.matches("closed", tostring(r))
      -- a ring dropped without close() is collected (its __gc frees the
      -- entries); a weak table sees it go
      local weak = setmetatable({}, { __mode = "k" })
      do
        local tmp = keyring.new()
        for i = 1, 50 do tmp:put(("ID%d"):format(i), wxpub) end
        weak[tmp] = true
      end
      collectgarbage()
      collectgarbage()
      assert.is_nil(next(weak))
      -- the handles the rings referenced are still fine
      keyring.put(PUB_ID, wxpub)
      assert.is_true(keyring.verify_base64(PUB_ID, VERIFY_11_3, SIG_11_3))
    end)

    it("raises on misuse", function()
      local r = keyring.new()
      assert.has_error(function() r.put(nil, "x", wxpub) end)          -- no self
      assert.has_error(function() r.verify({}, "x", "d", "s") end)      -- not a ring
      assert.has_error(function() r:put("", wxpub) end)
      assert.has_error(function() r:put("x", "not a key") end)
      assert.has_error(function() r:verify("x", nil, "s") end)
      local ok, err = pcall(function() local v = r:put("x", 42); return v end)
      assert.is_false(ok)
      assert.matches("bad argument #2 to 'put'", err)    -- arguments counted as the caller sees them
      r:close()
      for _, m in ipairs({ "put", "get", "verify", "verify_base64", "count", "list", "clear" }) do
        local ok2, err2 = pcall(r[m], r, "x", wxpub)
        assert.is_false(ok2, m)
        assert.matches("closed", err2)
      end
    end)
  end)
end)
