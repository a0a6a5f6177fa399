-- paygate.x509: certificate fields and verify_chain's classified errors.
-- The PKI under test is generated at test time with the openssl CLI:
--   root R -> intermediate I (pathlen 0) -> leaf L (serverAuth, SAN api host)
--   I -> client-only leaf C; I -> sub-CA S -> leaf P (path too long)
--   other root R2 -> leaf W (direct), R2 -> I2 -> leaf W2; self-signed X
-- and a CRL from I revoking leaf V.
local crypto = require "paygate.crypto"
local x509 = require "paygate.x509"
local T = dofile("spec/fixtures/cryptotest.lua")

local HOST = "api.mch.weixin.qq.com"

local function fails_with(kind, v, err)
  assert.is_nil(v)
  assert.is_table(err)
  assert.equal(kind, err.kind, tostring(err))
  return err
end

local function make_pki(dir)
  local function sh(fmt, ...) return T.sh((fmt):format(...)) end
  T.write(dir .. "/ext.cnf", table.concat({
    "[ca]", "basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign",
    "[ca0]", "basicConstraints=critical,CA:TRUE,pathlen:0", "keyUsage=critical,keyCertSign,cRLSign",
    "[server]", "basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
    "extendedKeyUsage=serverAuth", "subjectAltName=DNS:" .. HOST,
    "[client]", "basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
    "extendedKeyUsage=clientAuth", "subjectAltName=DNS:" .. HOST, "" }, "\n"))
  local function root(name, cn)
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/%s.key -out %s/%s.pem -subj '/CN=%s' -days 3650"
      .. " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
      dir, name, dir, name, cn)
  end
  local function issue(name, cn, ca, ext, serial, days)
    sh("openssl req -new -newkey rsa:2048 -nodes -keyout %s/%s.key -out %s/%s.csr -subj '/CN=%s'",
      dir, name, dir, name, cn)
    sh("openssl x509 -req -in %s/%s.csr -CA %s/%s.pem -CAkey %s/%s.key -set_serial %s -days %d"
      .. " -extfile %s/ext.cnf -extensions %s -out %s/%s.pem",
      dir, name, dir, ca, dir, ca, serial, days or 825, dir, ext, dir, name)
  end
  root("R", "Paygate Test Root")
  issue("I", "Paygate Test Intermediate", "R", "ca0", "0x1001", 3000)
  issue("L", "Tenpay.com sign", "I", "server", "0x0A5DEA10EF55877E3CF6C33255C2E7DEFFF7E427", 365)
  issue("V", "Revoked leaf", "I", "server", "0x2002", 365)
  issue("C", "Client only", "I", "client", "0x2003", 365)
  issue("S", "Sub CA", "I", "ca", "0x2004", 1000)
  issue("P", "Too deep", "S", "server", "0x2005", 365)
  root("R2", "Other Root")
  issue("W", "Wrong CA leaf", "R2", "server", "0x3001", 365)
  issue("I2", "Other Intermediate", "R2", "ca0", "0x3002", 1000)
  issue("W2", "Wrong CA leaf 2", "I2", "server", "0x3003", 365)
  sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/X.key -out %s/X.pem -subj '/CN=Self Signed' -days 30", dir, dir)
  -- a CRL from I revoking V (openssl ca needs a tiny database)
  T.write(dir .. "/index.txt", "")
  T.write(dir .. "/crlnumber", "01\n")
  T.write(dir .. "/ca.cnf", table.concat({
    "[ca]", "default_ca=CA_default", "[CA_default]", "database=" .. dir .. "/index.txt",
    "crlnumber=" .. dir .. "/crlnumber", "default_md=sha256", "default_crl_days=30", "" }, "\n"))
  sh("openssl ca -batch -config %s/ca.cnf -keyfile %s/I.key -cert %s/I.pem -revoke %s/V.pem", dir, dir, dir, dir)
  sh("openssl ca -batch -config %s/ca.cnf -keyfile %s/I.key -cert %s/I.pem -gencrl -out %s/I.crl", dir, dir, dir, dir)
  sh("openssl ca -batch -config %s/ca.cnf -keyfile %s/R2.key -cert %s/R2.pem -gencrl -out %s/R2.crl", dir, dir, dir, dir)
  local pki = {}
  for _, n in ipairs({ "R", "I", "L", "V", "C", "S", "P", "R2", "W", "I2", "W2", "X" }) do
    pki[n .. "_pem"] = T.read(dir .. "/" .. n .. ".pem")
    pki[n] = assert(crypto.certificate(pki[n .. "_pem"]))
  end
  pki.I_crl = T.read(dir .. "/I.crl")
  pki.R2_crl = T.read(dir .. "/R2.crl")
  return pki
end

describe("paygate.x509", function()
  local dir, pki, now
  setup(function()
    dir = T.tmpdir()
    pki = make_pki(dir)
    now = os.time()
  end)
  teardown(function() T.cleanup(dir) end)

  describe("verify_chain errors", function()
    it("unknown_authority: the chain ends at a root we do not trust", function()
      -- full foreign chain presented (like TLS): self-signed root in chain
      local err = fails_with("unknown_authority", x509.verify_chain(pki.W, { roots = { pki.R }, intermediates = { pki.R2 } }))
      assert.matches("add that root CA to roots", err.message)
      -- foreign intermediate given, its root missing
      fails_with("unknown_authority", x509.verify_chain(pki.W2, { roots = { pki.R }, intermediates = { pki.I2 } }))
      -- no roots at all
      fails_with("unknown_authority", x509.verify_chain(pki.L, { intermediates = { pki.I } }))
    end)

    it("missing_intermediate: the leaf's issuer is not supplied", function()
      local err = fails_with("missing_intermediate", x509.verify_chain(pki.L, { roots = { pki.R } }))
      assert.matches("add the intermediate certificate", err.message)
      assert.matches("Paygate Test Intermediate", err.message)
      -- a leaf issued directly by an untrusted root looks the same from
      -- here; the message names both fixes
      err = fails_with("missing_intermediate", x509.verify_chain(pki.W, { roots = { pki.R } }))
      assert.matches("root CA to roots", err.message)
    end)

    it("self_signed_untrusted: a self-signed leaf that is not pinned", function()
      local err = fails_with("self_signed_untrusted", x509.verify_chain(pki.X, { roots = { pki.R } }))
      assert.matches("add it to roots", err.message)
      assert.is_true(x509.verify_chain(pki.X, { roots = { pki.X } }))
    end)

    it("expired and not_yet_valid (at option, and a really expired cert)", function()
      local opts = { roots = { pki.R }, intermediates = { pki.I } }
      opts.at = pki.L:not_after() + 86400
      local err = fails_with("expired", x509.verify_chain(pki.L, opts))
      assert.matches("expired", err.message)
      opts.at = pki.L:not_before() - 86400
      err = fails_with("not_yet_valid", x509.verify_chain(pki.L, opts))
      assert.matches("clock", err.message)
      -- the a6 fixture expired on 2025-05-09
      local a6 = assert(crypto.certificate(T.fixture("a6_platform_cert.pem")))
      if now > a6:not_after() then
        fails_with("expired", x509.verify_chain(a6, { roots = { a6 } }))
      end
      assert.is_true(x509.verify_chain(a6, { roots = { a6 }, at = 1700000000 }))
    end)

    it("bad_signature: an altered certificate", function()
      local der = pki.L:der()
      local bad = der:sub(1, -2) .. string.char((der:byte(-1) + 1) % 256)
      local altered = assert(crypto.certificate(bad))
      local err = fails_with("bad_signature", x509.verify_chain(altered, { roots = { pki.R }, intermediates = { pki.I } }))
      assert.matches("does not verify", err.message)
    end)

    it("hostname_mismatch", function()
      local err = fails_with("hostname_mismatch", x509.verify_chain(pki.L,
        { roots = { pki.R }, intermediates = { pki.I }, hostname = "api.example.com" }))
      assert.matches("host name", err.message)
    end)

    it("an empty hostname, or one with a NUL, is refused, not skipped", function()
      -- OpenSSL takes an empty name as "no host check" and reads a name up
      -- to its NUL: either verified any host name as matching
      for _, h in ipairs({ "", "api.example.com\0" .. HOST, HOST .. "\0" }) do
        assert.has_error(function()
          x509.verify_chain(pki.L, { roots = { pki.R }, intermediates = { pki.I },
                                     hostname = h })
        end, "x509.verify_chain: opts.hostname must be a host name (not empty,"
             .. " no NUL byte)")
      end
      assert.is_true(x509.verify_chain(pki.L, { roots = { pki.R },
                                                intermediates = { pki.I },
                                                hostname = HOST }))
    end)

    it("wrong_usage: a client-only certificate used as a server", function()
      local err = fails_with("wrong_usage", x509.verify_chain(pki.C,
        { roots = { pki.R }, intermediates = { pki.I }, purpose = "server" }))
      assert.matches("usage", err.message)
      assert.is_true(x509.verify_chain(pki.C, { roots = { pki.R }, intermediates = { pki.I }, purpose = "client" }))
      assert.has_error(function() x509.verify_chain(pki.C, { roots = { pki.R }, purpose = "teleport" }) end)
    end)

    it("path_too_long: pathLenConstraint and max_depth", function()
      local err = fails_with("path_too_long", x509.verify_chain(pki.P, { roots = { pki.R }, intermediates = { pki.I, pki.S } }))
      assert.matches("intermediate", err.message)
      fails_with("path_too_long", x509.verify_chain(pki.L, { roots = { pki.R }, intermediates = { pki.I }, max_depth = 0 }))
    end)

    it("revoked (with a CRL), revocation_unknown (CRL of another CA)", function()
      local opts = { roots = { pki.R }, intermediates = { pki.I }, crls = { pki.I_crl } }
      local err = fails_with("revoked", x509.verify_chain(pki.V, opts))
      assert.matches("revoked", err.message)
      assert.is_true(x509.verify_chain(pki.L, opts))
      fails_with("revocation_unknown", x509.verify_chain(pki.L,
        { roots = { pki.R }, intermediates = { pki.I }, crls = pki.R2_crl }))
    end)

    it("malformed inputs", function()
      fails_with("malformed", x509.verify_chain(pki.L, { roots = { pki.R }, crls = { "junk" } }))
      fails_with("not_pem", x509.verify_chain(pki.L, { roots = { "\1\2\3" } }))
      fails_with("malformed", x509.verify_chain(pki.L, { roots = { 42 } }))
      assert.has_error(function() x509.verify_chain("not a cert", {}) end)
    end)

    it("accepts a good chain given as handles, PEM strings or a bundle", function()
      assert.is_true(x509.verify_chain(pki.L, { roots = { pki.R }, intermediates = { pki.I },
        hostname = HOST, purpose = "server", at = now }))
      assert.is_true(pki.L:verify_chain({ roots = pki.R_pem, intermediates = pki.I_pem }))
      local bundle = assert(x509.chain(pki.L_pem .. pki.I_pem))
      assert.equal(2, #bundle)
      assert.is_true(x509.verify_chain(bundle[1], { roots = { pki.R_pem }, intermediates = { bundle[2] } }))
    end)

    it("verifies an SM2 chain signed with the GM/T ID 1234567812345678", function()
      local function sh(fmt, ...) return T.sh((fmt):format(...)) end
      local id = "-sigopt distid:1234567812345678"
      sh("openssl genpkey -algorithm SM2 -out %s/smca.key", dir)
      sh("openssl genpkey -algorithm SM2 -out %s/smleaf.key", dir)
      sh("openssl req -new -x509 -key %s/smca.key -sm3 %s -subj '/CN=SM2 Test Root' -days 30"
        .. " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign -out %s/smca.pem",
        dir, id, dir)
      sh("openssl req -new -key %s/smleaf.key -sm3 %s -subj '/CN=SM2 leaf' -out %s/smleaf.csr", dir, id, dir)
      sh("openssl x509 -req -in %s/smleaf.csr -vfyopt distid:1234567812345678 -CA %s/smca.pem"
        .. " -CAkey %s/smca.key -sm3 %s -set_serial 0x5001 -days 10 -out %s/smleaf.pem", dir, dir, dir, id, dir)
      local leaf = assert(x509.load(T.read(dir .. "/smleaf.pem")))
      local ca = assert(x509.load(T.read(dir .. "/smca.pem")))
      assert.is_true(x509.verify_chain(leaf, { roots = { ca } }))
      -- fresh handles, root given as a PEM string
      local leaf2 = assert(x509.load(T.read(dir .. "/smleaf.pem")))
      assert.is_true(leaf2:verify_chain({ roots = T.read(dir .. "/smca.pem") }))
      -- RSA chains are unaffected after SM2 ones
      assert.is_true(x509.verify_chain(pki.L, { roots = { pki.R }, intermediates = { pki.I } }))
    end)
  end)

  describe("fields", function()
    it("match the openssl CLI for a generated certificate", function()
      local L = pki.L
      -- serial: uppercase hex, two digits per byte (leading zero kept)
      assert.equal("0A5DEA10EF55877E3CF6C33255C2E7DEFFF7E427", L:serial())
      local cli = T.sh(("openssl x509 -in %s/L.pem -noout -serial -fingerprint -sha256 -startdate -enddate"):format(dir))
      assert.equal(cli:match("serial=(%x+)"), L:serial())
      assert.equal(cli:match("Fingerprint=([%x:]+)"):gsub(":", ""), L:fingerprint())
      assert.equal("CN=Tenpay.com sign", L:subject())
      assert.equal("CN=Paygate Test Intermediate", L:issuer())
      assert.equal("RSA", L:key_type())
      assert.equal(2048, L:key_bits())
      assert.is_false(L:is_ca())
      assert.is_true(pki.I:is_ca())
      local nb = tonumber(T.sh(("date -u -d \"$(openssl x509 -in %s/L.pem -noout -startdate | cut -d= -f2)\" +%%s"):format(dir)))
      local na = tonumber(T.sh(("date -u -d \"$(openssl x509 -in %s/L.pem -noout -enddate | cut -d= -f2)\" +%%s"):format(dir)))
      assert.equal(nb, L:not_before())
      assert.equal(na, L:not_after())
      local info = x509.info(L)
      assert.equal(L:serial(), info.serial)
      assert.equal(na, info.not_after)
      assert.equal(L:fingerprint(), info.fingerprint)
    end)

    it("read the a11 platform certificate (certificate download)", function()
      local pem = assert(crypto.aead_decrypt("AEAD_AES_256_GCM", "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb", "14b16c03dc1b",
        "certificate", assert(crypto.base64_decode(T.fixture("a11_cert_ciphertext.txt")))))
      local c = assert(x509.load(pem))
      assert.equal("5DEA10EF55877E3CF6C33255C2E7DEFFF7E427EC", c:serial())
      assert.matches("CN=Tenpay.com sign", c:subject())
      assert.matches("O=Tenpay.com", c:subject())
      assert.matches("CN=Tenpay.com Root CA", c:issuer())
      assert.equal(1695136558, c:not_before())  -- 2023-09-19T23:15:58+08:00
      assert.equal(1852816558, c:not_after())   -- 2028-09-17T23:15:58+08:00
      assert.matches("^paygate.x509.cert: serial 5DEA10EF", tostring(c))
      local pub = assert(c:public_key())
      assert.equal("RSA", pub:type())
      assert.equal(c:pem(), pem:gsub("\n*$", "\n"))
    end)

    it("read SM2 certificates and their keys (A.10b)", function()
      local c = assert(x509.load(T.fixture("a10b_sm2_cert.pem")))
      assert.equal("54E7F59ED8DF4570CFB14780EA8152D45A675EE6", c:serial())
      assert.equal("SM2", c:key_type())
      assert.equal(256, c:key_bits())
      c:close()
      c:close()
      assert.matches("closed", tostring(c))
      assert.has_error(function() c:serial() end)
    end)
  end)
end)
