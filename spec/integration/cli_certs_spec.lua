-- paygate certs --download against the simulator: a SIGN_ERROR's fix
-- follows what WeChat blamed (an unknown mchid is not a serial to check),
-- and a --key that is not a private key (a certificate given for it) is
-- unusable input, exit 2, naming the option, the file and what it holds;
-- the time left, in the text and in --json (expired, days_left); a private
-- key under a passphrase, listed as such with how to decrypt it.
local testing = require "paygate.testing"
local crypto = require "paygate.crypto"
local server = require "support.server"
local diagpki = require "support.diagpki"

local dir, sim, wc, serial

local function download(o)
  return diagpki.run(dir, { "certs", "--json", "--download", wc.base_url,
    "--mchid", o.mchid or wc.mchid, "--key", o.key or wc.merchant_private_key,
    "--serial", o.serial or serial, "--apiv3-key-file",
    o.apiv3_file or dir .. "/apiv3",
    "--out", dir .. "/dl" }, 60)
end

setup(function()
  dir = server.tmpdir()
  sim = testing.simulator()
  wc = sim:client_config()
  diagpki.write(dir .. "/apiv3", wc.apiv3_key)
  serial = assert(crypto.certificate(diagpki.read(wc.merchant_certificate)))
           :serial()
end)

teardown(function()
  testing.stop_all()
  os.execute("rm -rf " .. dir)
end)

describe("paygate certs --download", function()
  it("downloads with the right credentials", function()
    local code, out = download{}
    assert.equal(0, code, out)
  end)

  it("an mchid WeChat does not know: check --mchid", function()
    local code, out, r = download{ mchid = "1234567" }
    assert.equal(1, code, out)
    local x = r[#r]
    assert.equal("download", x.kind)
    assert.matches("SIGN_ERROR", x.cause, 1, true)
    assert.matches("check --mchid", x.fix, 1, true)
    assert.is_nil(x.fix:find("check --serial", 1, true))
  end)

  it("a serial WeChat does not hold: check --serial", function()
    local code, out, r = download{ serial = ("AB"):rep(20) }
    assert.equal(1, code, out)
    assert.matches("check --serial", r[#r].fix, 1, true)
  end)

  it("a key of the other variant (SM2 against RSA): the signature type",
     function()
    -- WeChat refuses the Authorization's scheme before it looks at the
    -- mchid or the serial: the fix names the variant, not those
    local sm = testing.merchant_keys{ sm2 = true, mchid = wc.mchid }
    local sm_serial = assert(crypto.certificate(diagpki.read(sm.certificate)))
                      :serial()
    local code, out, r = download{ key = sm.private_key, serial = sm_serial }
    assert.equal(1, code, out)
    local x = r[#r]
    assert.matches("SIGN_ERROR", x.cause, 1, true)
    assert.matches("WECHATPAY2-SM2-WITH-SM3", x.fix, 1, true)
    assert.matches("WeChat expects WECHATPAY2-SHA256-RSA2048", x.fix, 1,
                   true)
    assert.is_nil(x.fix:find("check --mchid", 1, true), x.fix)
    assert.is_nil(x.fix:find("check --serial", 1, true), x.fix)
  end)

  it("a certificate given as --key: exit 2, the file and why", function()
    local code, out = download{ key = wc.merchant_certificate }
    assert.equal(2, code, out)
    assert.matches("--key " .. wc.merchant_certificate, out, 1, true)
    assert.matches("holds a CERTIFICATE, not a private key", out, 1, true)
    assert.is_nil(out:find("BEGIN", 1, true))
    -- paygate sign says the same
    code, out = diagpki.run(dir, { "sign", "--method", "GET", "--url",
      "/v3/certificates", "--mchid", wc.mchid, "--serial", serial, "--key",
      wc.merchant_certificate })
    assert.equal(2, code, out)
    assert.matches("holds a CERTIFICATE, not a private key", out, 1, true)
    -- a file without PEM: said too, its content not shown
    diagpki.write(dir .. "/notpem", wc.apiv3_key)
    code, out = download{ key = dir .. "/notpem" }
    assert.equal(2, code, out)
    assert.matches("no PEM block", out, 1, true)
    assert.is_nil(out:find(wc.apiv3_key, 1, true))
  end)
end)

describe("paygate certs --download with an APIv3 key of the wrong length", function()
  -- named as paygate decrypt names it, by the option given (the client's
  -- config key wechatpay.apiv3_key was named, with no cause)
  it("names the option and what the key is", function()
    diagpki.write(dir .. "/apiv3_hex", crypto.hex(wc.apiv3_key))
    local code, out, r = download{ apiv3_file = dir .. "/apiv3_hex" }
    assert.equal(1, code, out)
    local x = r[#r]
    assert.equal("apiv3_key_length", x.kind)
    assert.matches("--apiv3-key-file", x.cause, 1, true)
    assert.matches("64 hex digits", x.cause, 1, true)
    assert.matches("never decoded", x.fix, 1, true)
    assert.is_nil(out:find("wechatpay.apiv3_key", 1, true))
    assert.is_nil(out:find(crypto.hex(wc.apiv3_key), 1, true))
    diagpki.write(dir .. "/apiv3_short", "abc")
    code, out, r = download{ apiv3_file = dir .. "/apiv3_short" }
    assert.equal(1, code, out)
    assert.equal("apiv3_key_length", r[#r].kind)
    assert.matches("3 bytes; it is exactly 32", r[#r].cause, 1, true)
  end)
end)

describe("paygate certs --download with a wrong APIv3 key", function()
  -- the certificates did not decrypt: the message named the client's
  -- options, "wrong APIv3 key (apiv3_key, previous_apiv3_keys)", where
  -- the user gave --apiv3-key-file (and no previous key at all)
  it("names the option the key came through", function()
    diagpki.write(dir .. "/apiv3_wrong", "0123456789abcdef0123456789abcdef")
    local code, out, r = download{ apiv3_file = dir .. "/apiv3_wrong" }
    assert.equal(1, code, out)
    local x = r[#r]
    assert.equal("download", x.kind, out)
    assert.matches("wrong APIv3 key (--apiv3-key-file) or altered",
                   x.cause, 1, true)
    assert.matches("the APIv3 key is wrong", x.fix, 1, true)
    assert.is_nil(out:find("apiv3_key", 1, true), out)
    assert.is_nil(out:find("0123456789abcdef", 1, true), out)
  end)
end)

describe("paygate certs --download for an SM merchant", function()
  it("downloads the SM2 platform certificates with an SM2 key", function()
    local sm = testing.simulator{ sign_type = testing.SM2 }
    local c = sm:client_config()
    local d = server.tmpdir()
    diagpki.write(d .. "/apiv3", c.apiv3_key)
    local sm_serial = assert(crypto.certificate(
      diagpki.read(c.merchant_certificate))):serial()
    local code, out = diagpki.run(d, { "certs", "--json", "--download",
      c.base_url, "--mchid", c.mchid, "--key", c.merchant_private_key,
      "--serial", sm_serial, "--apiv3-key-file", d .. "/apiv3",
      "--out", d .. "/dl" }, 60)
    assert.equal(0, code, out)
    local want = sm:platform_certificates()
    assert.is_true(#want >= 1)
    for _, pc in ipairs(want) do
      local got = assert(crypto.certificate(diagpki.read(d .. "/dl/"
                                                         .. pc.serial_no .. ".pem")))
      assert.equal("SM2", got:key_type())
    end
    sm:stop()
    os.execute("rm -rf " .. d)
  end)
end)

describe("paygate certs: the time left", function()
  it("a certificate valid 2 days from now: 1 day 23 h, not \"1 days\"",
     function()
    -- testing.merchant_keys{ days = 2 }: valid from now for 2 days, so a
    -- moment later a little under 2 days are left
    local k = testing.merchant_keys{ days = 2, dir = dir }
    local code, out = diagpki.run(dir, { "certs", k.certificate })
    assert.equal(0, code, out)
    assert.matches("(1 day 23 h left)", out, 1, true)
    assert.matches("expires in 1 day 23 h", out, 1, true)
    assert.is_nil(out:find("1 days", 1, true), out)
  end)

  -- a self-signed certificate valid from `from` to `to` seconds from now
  local function cert_between(name, from, to)
    local f = function(x) return dir .. "/" .. name .. x end
    local function stamp(t) return os.date("!%Y%m%d%H%M%SZ", os.time() + t) end
    diagpki.write(f(".cnf"), ("[ca]\ndefault_ca=d\n[d]\ndatabase=%s\n"
      .. "new_certs_dir=%s\nserial=%s\ndefault_md=sha256\npolicy=p\n[p]\n"
      .. "commonName=supplied\n"):format(f(".idx"), dir, f(".srl")))
    diagpki.write(f(".idx"), "")
    diagpki.write(f(".srl"), "0400\n")
    local ok = os.execute(("openssl req -newkey rsa:2048 -nodes -keyout %s -out "
      .. "%s -subj /CN=%s >/dev/null 2>&1 && openssl ca -batch -notext "
      .. "-selfsign -config %s -in %s -keyfile %s -startdate %s -enddate %s "
      .. "-out %s >/dev/null 2>&1"):format(f(".key"), f(".csr"), name,
      f(".cnf"), f(".csr"), f(".key"), stamp(from), stamp(to), f(".pem")))
    assert(ok == 0 or ok == true, "openssl failed")
    return f(".pem")
  end

  it("--json: expired is explicit; days_left is never negative",
     function()
    local H, D = 3600, 86400
    -- expired 6 hours ago: days_left was -1, as if a day had passed
    local code, out, r = diagpki.run(dir, { "certs", "--json",
      cert_between("gone6h", -10 * D, -6 * H) })
    assert.equal(1, code, out)
    assert.equal("fail", r[1].status, out)
    assert.is_true(r[1].expired, out)
    assert.equal(0, r[1].days_left, out)
    assert.equal(0, r[1].expired_days_ago, out)
    -- expired 3.5 days ago: "expired 3 days ago", as the text says
    code, out, r = diagpki.run(dir, { "certs", "--json",
      cert_between("gone3d", -10 * D, -3.5 * D) })
    assert.is_true(r[1].expired, out)
    assert.equal(0, r[1].days_left, out)
    assert.equal(3, r[1].expired_days_ago, out)
    assert.matches("expired 3 days ago", r[1].detail, 1, true)
    -- 12 hours left: not expired, 0 whole days left, a warning
    code, out, r = diagpki.run(dir, { "certs", "--json",
      cert_between("soon12h", -D, 12 * H) })
    assert.equal(0, code, out)
    assert.equal("warn", r[1].status, out)
    assert.is_false(r[1].expired, out)
    assert.equal(0, r[1].days_left, out)
    assert.is_nil(r[1].expired_days_ago, out)
    -- the WeChat Pay public key does not expire: no days_left
    code, out, r = diagpki.run(dir, { "certs", "--json",
      "spec/fixtures/wechatpay/a2_wechatpay_pubkey.pem" })
    assert.equal(0, code, out)
    assert.equal("public_key", r[1].kind, out)
    assert.is_false(r[1].expired, out)
    assert.is_nil(r[1].days_left, out)
  end)

  it("is said in whole days, rounded down, and hours under 2 days",
     function()
    local days = require("paygate.cli.common").days
    local D, H = 86400, 3600
    assert.equal("29 days", days(30 * D - 60))
    assert.equal("2 days", days(2 * D))
    assert.equal("1 day 23 h", days(2 * D - 60))
    assert.equal("1 day", days(D + 60))
    assert.equal("5 h", days(5 * H + 60))
    assert.equal("40 min", days(40 * 60 + 5))
    assert.equal("3 days", days(-3.5 * D))         -- expired 3 days ago
  end)
end)

describe("paygate certs: a private key under a passphrase", function()
  -- both PEM forms: PKCS#8 (ENCRYPTED PRIVATE KEY) and the older OpenSSL
  -- one (RSA PRIVATE KEY with Proc-Type: 4,ENCRYPTED)
  local FORMS = {
    { "p8", "PKCS#8", "openssl pkcs8 -topk8 -in %s -out %s -passout "
      .. "pass:secret" },
    { "trad", "traditional", "openssl rsa -in %s -aes256 -traditional "
      .. "-passout pass:secret -out %s" },
  }

  local function encrypted(form)
    local k = testing.merchant_keys{ dir = dir, days = 365 }
    local path = dir .. "/enc_" .. form[1] .. ".key"
    local ok = os.execute(form[3]:format(k.private_key, path)
                          .. " >/dev/null 2>&1")
    assert(ok == 0 or ok == true, "openssl failed")
    return path, diagpki.read(path), k
  end

  it("says it is encrypted, that paygate needs it unencrypted, and how",
     function()
    for _, form in ipairs(FORMS) do
      local path, pem = encrypted(form)
      assert.truthy(pem:find(form[1] == "p8" and "ENCRYPTED PRIVATE KEY"
                             or "Proc-Type: 4,ENCRYPTED", 1, true), pem)
      local code, out = diagpki.run(dir, { "certs", path })
      assert.equal(1, code, out)
      assert.is_nil(out:find("no certificate or key found", 1, true), out)
      assert.matches("private key " .. path .. " is encrypted", out, 1, true)
      assert.matches("reads private keys unencrypted only", out, 1, true)
      assert.matches("openssl pkey -in " .. path .. " -out key.pem", out, 1,
                     true)
      -- nothing of the key: no PEM line, no base64 run of its body
      assert.is_nil(out:find("-----BEGIN", 1, true), out)
      for line in pem:gmatch("[^\n]+") do
        if not line:find("^%-%-%-%-%-") and not line:find(":") and #line > 16
        then
          assert.is_nil(out:find(line:sub(1, 16), 1, true), out)
        end
      end
      local _, jout, r = diagpki.run(dir, { "certs", "--json", path })
      assert.equal(1, #r, jout)
      assert.equal("fail", r[1].status, jout)
      assert.equal("private_key", r[1].kind, jout)
      assert.is_true(r[1].encrypted, jout)
      assert.equal(form[2], r[1].form, jout)
      assert.matches("openssl pkey", r[1].fix, 1, true)
    end
  end)

  it("lists the rest of a directory beside it, as a warning there (exit"
     .. " 0: an encrypted backup must not fail an expiry check)", function()
    local sub = dir .. "/mixed"
    os.execute("mkdir -p " .. sub)
    local path, _, k = encrypted(FORMS[1])
    os.execute(("cp %s %s/a.key && cp %s %s/b_cert.pem"):format(path, sub,
               k.certificate, sub))
    local code, out, r = diagpki.run(dir, { "certs", "--json", sub })
    assert.equal(0, code, out)
    assert.equal(2, #r, out)
    local kinds = {}
    for _, x in ipairs(r) do kinds[x.kind] = x.status end
    assert.equal("warn", kinds.private_key, out)
    assert.equal("ok", kinds.merchant_certificate or kinds.certificate, out)
  end)
end)

describe("paygate certs: a certificate or key cut short", function()
  it("fails naming the file and why, named itself or in a directory, and"
     .. " passes over a block of another kind (a CSR)", function()
    local k = testing.merchant_keys{ dir = dir, days = 365 }
    local sub = dir .. "/cut"
    os.execute("mkdir -p " .. sub)
    local cert = diagpki.read(k.certificate)
    diagpki.write(sub .. "/a_cert.pem", cert)
    diagpki.write(sub .. "/b_cut.pem", cert:sub(1, 400))
    diagpki.write(sub .. "/c_key.pem",
                  diagpki.read(k.private_key):sub(1, 300))
    diagpki.write(sub .. "/d.csr", "-----BEGIN CERTIFICATE REQUEST-----\n"
                  .. "MIIB\n-----END CERTIFICATE REQUEST-----\n")
    -- named alone: it said "no certificate or key found" (exit 2)
    local code, out, r = diagpki.run(dir, { "certs", "--json",
                                            sub .. "/b_cut.pem" })
    assert.equal(1, code, out)
    assert.equal(1, #r, out)
    assert.equal("fail", r[1].status, out)
    assert.equal("unreadable", r[1].kind, out)
    assert.matches("b_cut.pem: ", r[1].cause, 1, true)
    assert.matches("no -----END line", r[1].cause, 1, true)
    -- beside a good one, or in a directory: it was passed over (exit 0)
    code, out, r = diagpki.run(dir, { "certs", "--json", sub })
    assert.equal(1, code, out)
    local seen = {}
    for _, x in ipairs(r) do seen[x.file:match("[^/]+$")] = x end
    assert.equal("unreadable", seen["b_cut.pem"].kind, out)
    assert.equal("unreadable", seen["c_key.pem"].kind, out)
    assert.equal("ok", seen["a_cert.pem"].status, out)
    assert.is_nil(seen["d.csr"], out)
    -- nothing of the key is shown
    local line = diagpki.read(k.private_key):match("\n([^\n-][^\n]+)\n")
    assert.is_nil(out:find(line:sub(1, 16), 1, true), out)
  end)
end)

describe("paygate certs and verify: a key of a type WeChat Pay does not use",
         function()
  it("names an EC key whole, not as a file to copy again, and an EC "
     .. "certificate given to verify by its key type", function()
    local sub = dir .. "/ec"
    os.execute("mkdir -p " .. sub)
    assert(os.execute(("openssl req -x509 -newkey ec -pkeyopt "
      .. "ec_paramgen_curve:prime256v1 -nodes -keyout %s/ec.key -out "
      .. "%s/ec.pem -subj /CN=ec -days 2 2>/dev/null && openssl pkey -in "
      .. "%s/ec.key -pubout -out %s/ec_pub.pem"):format(sub, sub, sub, sub))
      == 0)
    for _, f in ipairs({ "ec.key", "ec_pub.pem" }) do
      local code, out, r = diagpki.run(dir, { "certs", "--json",
                                              sub .. "/" .. f })
      assert.equal(1, code, out)
      assert.matches("unsupported key type EC", r[1].cause, 1, true)
      assert.is_nil(r[1].fix:find("copy the file whole", 1, true), out)
      assert.matches("WeChat Pay issued", r[1].fix, 1, true)
    end
    diagpki.write(sub .. "/body", "{}")
    local code, out = diagpki.run(dir, { "verify", "--body", sub .. "/body",
      "-H", "Wechatpay-Serial: 01", "--certificate", sub .. "/ec.pem" })
    assert.equal(2, code, out)
    assert.matches("its key is EC, not RSA or SM2", out, 1, true)
  end)
end)
