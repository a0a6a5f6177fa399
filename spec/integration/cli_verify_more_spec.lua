-- paygate verify: the causes a first version got wrong or did not name —
-- sorted keys are no proof of re-encoding, combined re-encodings, the
-- re-encoding named in text output, an SM2 signature without its type
-- header, a serial that lost its leading zero, a captured error answer,
-- CA certificates or a private key given as --certificate, an expired
-- platform certificate, a rotation (serial not among the keys given).
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir, pki, pkey
local write, read = diagpki.write, diagpki.read

local function run(args) return diagpki.run(dir, args) end

local function file(name, content)
  write(dir .. "/" .. name, content)
  return dir .. "/" .. name
end

-- keys already in alphabetical order, as WeChat's answers often are
local SORTED = '{"amount":{"currency":"CNY","total":1},"appid":"wx1",'
  .. '"mchid":"1900000001","out_trade_no":"T-1","trade_state":"SUCCESS"}'

local function signed(body, o)
  o = o or {}
  local ts = tostring(o.ts or os.time())
  local nonce = o.nonce or ("n" .. crypto.random_nonce(16))
  local msg = ts .. "\n" .. nonce .. "\n" .. body .. "\n"
  local sig = assert(crypto.sign_base64(o.key or pkey, msg, o.alg))
  local serial = o.serial
    or assert(crypto.certificate(read(pki.platform))):serial()
  return ("HTTP/1.1 200 OK\r\nWechatpay-Timestamp: %s\r\nWechatpay-Nonce: %s"
    .. "\r\nWechatpay-Signature: %s\r\nWechatpay-Serial: %s\r\n%s\r\n")
    :format(ts, o.header_nonce or nonce, sig, serial, o.extra or "")
end

local function verify(body, headers, keys, text)
  local args = { "verify", "--body", file("body", body),
                 "--headers", file("headers", headers) }
  if not text then table.insert(args, 2, "--json") end
  for _, a in ipairs(keys or { "--certificate", pki.platform }) do
    args[#args + 1] = a
  end
  return run(args)
end

local function last(body, headers, keys)
  local code, out, r = verify(body, headers, keys)
  assert.equal(1, code, out)
  return r[#r], out
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
  pkey = assert(crypto.private_key(read(pki.platform_key)))
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("paygate verify (sorted keys)", function()
  it("does not blame key order on a sorted body signed by another key",
     function()
    local r = last(SORTED, signed(SORTED, {
      key = assert(crypto.private_key(read(pki.merchant_key))) }))
    assert.equal("signature_mismatch", r.kind)
    assert.is_nil(r.what)
    assert.equal("key_order", r.possible)
    assert.matches("often", r.detail)
  end)

  it("does not blame key order on a sorted body with an altered nonce",
     function()
    local r = last(SORTED, signed(SORTED, { header_nonce = "altered" }))
    assert.equal("signature_mismatch", r.kind)
    assert.is_nil(r.what)
  end)
end)

describe("paygate verify (combined re-encodings)", function()
  it("names a BOM and a final CRLF together", function()
    local r = last("\239\187\191" .. SORTED .. "\r\n", signed(SORTED))
    assert.equal("body_reencoded", r.kind)
    assert.equal("bom+trailing_newline", r.what)
    assert.same({ "bom", "trailing_newline" }, r.steps)
    assert.matches("BOM", r.cause)
    assert.matches("newline", r.cause)
  end)

  it("names pretty-printing with escaped unicode and a BOM", function()
    local body = '{"summary":"支付成功","id":"EV-1"}'
    local given = "\239\187\191{\n  \"summary\": \"\\u652f\\u4ed8\\u6210"
      .. "\\u529f\",\n  \"id\": \"EV-1\"\n}"
    local r = last(given, signed(body))
    assert.equal("bom+whitespace+escaped_unicode", r.what)
  end)

  it("names the re-encoding in text output too", function()
    local code, out = verify(SORTED .. "\n", signed(SORTED), nil, true)
    assert.equal(1, code, out)
    assert.matches("FAIL  body_reencoded %(trailing_newline%): ", out)
  end)
end)

describe("paygate verify (more causes)", function()
  it("warns of an SM2 signature without Wechatpay-Signature-Type", function()
    os.execute(("openssl genpkey -algorithm SM2 -out %s/sm2.pem 2>/dev/null"
      .. " && openssl pkey -in %s/sm2.pem -pubout -out %s/sm2pub.pem")
      :format(dir, dir, dir))
    local sm = assert(crypto.private_key(read(dir .. "/sm2.pem")))
    local keys = { "--public-key", dir .. "/sm2pub.pem", "--public-key-id",
                   "PUB_KEY_ID_0119" }
    local h = signed(SORTED, { key = sm, alg = "WECHATPAY2-SM2-WITH-SM3",
                               serial = "PUB_KEY_ID_0119" })
    local code, out, r = verify(SORTED, h, keys)
    assert.equal(0, code, out)
    assert.equal("warn", r[#r].status, out)
    assert.equal("signature_type", r[#r].kind)
    h = signed(SORTED, { key = sm, alg = "WECHATPAY2-SM2-WITH-SM3",
      serial = "PUB_KEY_ID_0119",
      extra = "Wechatpay-Signature-Type: WECHATPAY2-SM2-WITH-SM3\r\n" })
    code, out, r = verify(SORTED, h, keys)
    assert.equal(0, code, out)
    assert.equal("ok", r[#r].status, out)
  end)

  it("names a serial with its leading zero dropped", function()
    -- a certificate whose serial starts with 0
    os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/z.key"
      .. " -out %s/z.pem -days 3 -set_serial 0x0ABC1234 -subj "
      .. "'/CN=Tenpay.com sign/O=Tenpay.com' -addext basicConstraints="
      .. "CA:FALSE >/dev/null 2>&1"):format(dir, dir))
    local zkey = assert(crypto.private_key(read(dir .. "/z.key")))
    local full = assert(crypto.certificate(read(dir .. "/z.pem"))):serial()
    assert.equal("0", full:sub(1, 1))
    -- the certificate is found, as the client finds it (key ring), and
    -- the dropped zero named
    local code, out, rs = verify(SORTED, signed(SORTED, { key = zkey,
      serial = full:gsub("^0+", "") }), { "--certificate", dir .. "/z.pem" })
    assert.equal(0, code, out)
    local r = rs[#rs]
    assert.equal("warn", r.status, out)
    assert.equal("serial", r.kind)
    assert.matches("leading zero dropped", r.cause)
    assert.matches(full, r.fix)
  end)

  it("names an expired or not yet valid certificate its serial names "
     .. "without the leading zero", function()
    os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/z2.key"
      .. " -out %s/z2.pem -days 3 -set_serial 0x0ABC5678 -subj "
      .. "'/CN=Tenpay.com sign/O=Tenpay.com' -addext basicConstraints="
      .. "CA:FALSE >/dev/null 2>&1"):format(dir, dir))
    local zkey = assert(crypto.private_key(read(dir .. "/z2.key")))
    local cert = assert(crypto.certificate(read(dir .. "/z2.pem")))
    local bare = cert:serial():gsub("^0+", "")
    assert.are_not.equal(cert:serial(), bare)
    for _, c in ipairs({ { cert:not_after() + 7200, "cert_expired",
                           "expired 2 h 0 min ago" },
                         { cert:not_before() - 7200, "cert_not_yet_valid",
                           "is valid only in 2 h 0 min" } }) do
      local at = c[1]
      local code, out, r = run{ "verify", "--json", "--body", file("body",
        SORTED), "--headers", file("headers", signed(SORTED, { ts = at,
        key = zkey, serial = bare })), "--certificate", dir .. "/z2.pem",
        "--at", tostring(at) }
      assert.equal(1, code, out)
      assert.not_matches("internal error", out)
      assert.equal(c[2], r[#r].kind, out)
      assert.matches(c[3], r[#r].cause, 1, true)
    end
  end)

  it("says a captured 401 answer is unsigned", function()
    local r = last('{"code":"SIGN_ERROR","message":"bad"}',
                   "HTTP/1.1 401 Unauthorized\r\nRequest-ID: x\r\n\r\n")
    assert.equal("unsigned_answer", r.kind)
    assert.matches("^HTTP 401: error answers are unsigned", r.cause)
  end)

  it("says why a CA certificate or a private key is no usable key",
     function()
    -- a lone CA certificate is used, as the client would (SDKs' test
    -- platform certificates are CA:TRUE), and named when the serial is not
    -- its own
    local code, out = verify(SORTED, signed(SORTED),
                             { "--certificate", pki.root })
    assert.equal(1, code, out)
    assert.matches("unknown_serial", out)
    assert.matches("is a CA certificate (CA:TRUE)", out, 1, true)
    -- beside the platform certificate in one file it is the issuer, left
    -- out as the client leaves it out: the answer verifies
    local both = file("chain.pem", read(pki.root) .. read(pki.platform))
    code, out = verify(SORTED, signed(SORTED), { "--certificate", both })
    assert.equal(0, code, out)
    code, out = verify(SORTED, signed(SORTED),
                       { "--certificate", pki.platform_key })
    assert.equal(2, code, out)
    assert.matches("a private key, not a certificate", out)
  end)

  it("names a self-signed merchant certificate flagged CA:TRUE as the "
     .. "merchant's, not a CA", function()
    -- `openssl req -x509` flags its certificate CA:TRUE by default: a test
    -- merchant's apiclient_cert.pem made so is still the merchant's own
    os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/mca.key"
      .. " -out %s/mca.pem -days 3 -subj '/CN=1900000001/O=test merchant' "
      .. "-addext basicConstraints=critical,CA:TRUE >/dev/null 2>&1")
      :format(dir, dir))
    local mca = dir .. "/mca.pem"
    assert.is_true(assert(crypto.certificate(read(mca))):is_ca())
    local r, out = last(SORTED, signed(SORTED), { "--certificate", mca })
    assert.equal("unknown_serial", r.kind, out)
    assert.matches("is the merchant's own API certificate", r.cause, 1, true)
    assert.is_nil(out:find("is a CA certificate", 1, true), out)
    -- paygate certs lists it as the merchant's, saying the flag is unused
    local code, cout, c = run{ "certs", "--json", mca }
    assert.equal(0, code, cout)
    assert.equal("merchant", c[1].role, cout)
    assert.equal("merchant_certificate", c[1].kind, cout)
    assert.matches("self-signed and flagged CA:TRUE", c[1].detail, 1, true)
    -- a self-signed CA by any other name stays a CA
    code, cout, c = run{ "certs", "--json", pki.root }
    assert.equal("CA", c[1].role, cout)
  end)

  it("says a certificate given as --public-key goes to --certificate, and"
     .. " refuses a JSON header that is no string", function()
    local code, out = verify(SORTED, signed(SORTED),
      { "--public-key", pki.platform, "--public-key-id",
        "PUB_KEY_ID_0114232134912410000000000000000001" })
    assert.equal(2, code, out)
    assert.matches("holds a certificate, not a public key", out, 1, true)
    assert.matches("--certificate", out, 1, true)
    for _, v in ipairs({ "null", "[[1]]", "[]", "{}", "true" }) do
      code, out = verify(SORTED, '{"Wechatpay-Serial":' .. v .. ','
        .. '"Wechatpay-Timestamp":"1","Wechatpay-Nonce":"n",'
        .. '"Wechatpay-Signature":"AA=="}')
      assert.equal(2, code, out)
      assert.matches("header Wechatpay-Serial must be a string", out, 1,
                     true)
      assert.is_nil(out:find("userdata", 1, true), out)
      assert.is_nil(out:find("table: 0x", 1, true), out)
    end
  end)

  it("says why a certificate or public key cut short is no key", function()
    local cut = file("cut.pem", read(pki.platform):sub(1, 500))
    -- alone: it read "no usable certificate ... (no PEM found)"
    local code, out = verify(SORTED, signed(SORTED), { "--certificate", cut })
    assert.equal(2, code, out)
    assert.matches("cut.pem: PEM has a -----BEGIN line but no -----END",
                   out, 1, true)
    assert.is_nil(out:find("no PEM found", 1, true), out)
    code, out = verify(SORTED, signed(SORTED), { "--public-key",
      file("pubcut.pem", read(pki.pub):sub(1, 200)), "--public-key-id",
      "PUB_KEY_ID_0114232134912410000000000000000001" })
    assert.equal(2, code, out)
    assert.matches("--public-key " .. dir .. "/pubcut.pem: PEM has a "
                   .. "-----BEGIN line but no -----END", out, 1, true)
    -- beside a usable one: a warning, and the answer verifies
    local _, jout, r = verify(SORTED, signed(SORTED), { "--certificate", cut,
      "--certificate", pki.platform })
    assert.equal("warn", r[1].status, jout)
    assert.equal("unreadable", r[1].kind, jout)
    assert.equal("ok", r[#r].status, jout)
  end)

  it("names an expired platform certificate", function()
    local cert = assert(crypto.certificate(read(pki.platform)))
    local at = cert:not_after() + 7200
    local code, out, r = run{ "verify", "--json", "--body", file("body",
      SORTED), "--headers", file("headers", signed(SORTED, { ts = at })),
      "--certificate", pki.platform, "--at", tostring(at) }
    assert.equal(1, code, out)
    assert.equal("cert_expired", r[#r].kind, out)
    assert.matches("expired 2 h 0 min ago", r[#r].cause)
  end)

  it("names a rotation: the serial is not among the keys given", function()
    local r = last(SORTED, signed(SORTED, {
      key = assert(crypto.private_key(read(pki.platform_soon_key))),
      serial = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1" }))
    assert.equal("unknown_serial", r.kind)
    assert.matches("is not among the keys given", r.cause)
    assert.matches("keys given: ", r.detail)
    -- why it can be so (was the key list alone)
    assert.matches("WeChat rotated its certificates", r.detail, 1, true)
    assert.matches("the files given are another merchant's, or the message"
                   .. " is another merchant's", r.detail, 1, true)
  end)

  -- A message of the other variant than every key given (an SM merchant's
  -- notification checked with the RSA platform certificates of an RSA
  -- set-up, or the reverse): its serial is none of theirs, and it was told
  -- as a rotation, whose fix (download the certificates with this
  -- merchant's credentials) fetches the same variant's again.
  describe("a serial naming no key given, every key of the other variant",
           function()
    local sm_key, sm_cert, sm_other
    setup(function()
      sm_key, sm_cert = dir .. "/smp.key", dir .. "/smp.pem"
      sm_other = dir .. "/smo.key"   -- signs the rotated-to certificate
      assert(os.execute(("openssl genpkey -algorithm SM2 -out %s 2>/dev/null"
        .. " && openssl genpkey -algorithm SM2 -out %s 2>/dev/null"
        .. " && openssl req -x509 -new -key %s -sm3 -sigopt distid:"
        .. "1234567812345678 -days 3 -subj '/CN=Tenpay.com sign/O=Tenpay.com'"
        .. " -addext basicConstraints=CA:FALSE -out %s 2>/dev/null")
        :format(sm_key, sm_other, sm_key, sm_cert)))
    end)

    it("an SM2-signed message, RSA keys given", function()
      local sm = assert(crypto.private_key(read(sm_key)))
      local r = last(SORTED, signed(SORTED, { key = sm,
        alg = "WECHATPAY2-SM2-WITH-SM3",
        serial = "3F1E989910B253E069A11568C91C57CA44568158",
        extra = "Wechatpay-Signature-Type: WECHATPAY2-SM2-WITH-SM3\r\n" }))
      assert.equal("algorithm", r.kind)
      assert.matches("signed WECHATPAY2-SM2-WITH-SM3", r.cause, 1, true)
      assert.matches("every key given is RSA", r.cause, 1, true)
      assert.matches("algorithm_type=SM2", r.fix, 1, true)
      assert.matches("SM2 merchant key", r.fix, 1, true)
      assert.not_matches("rotated", r.detail, 1, true)
    end)

    it("an RSA-signed message without its type header, SM2 keys given",
       function()
      local r = last(SORTED, signed(SORTED, {
        serial = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1" }),
        { "--certificate", sm_cert })
      assert.equal("algorithm", r.kind)
      assert.matches("signed WECHATPAY2-SHA256-RSA2048", r.cause, 1, true)
      assert.matches("every key given is SM2", r.cause, 1, true)
      assert.matches("RSA merchant key", r.fix, 1, true)
    end)

    it("a key of the message's variant among them: a rotation still",
       function()
      local sm = assert(crypto.private_key(read(sm_other)))
      local r = last(SORTED, signed(SORTED, { key = sm,
        alg = "WECHATPAY2-SM2-WITH-SM3",
        serial = "3F1E989910B253E069A11568C91C57CA44568158",
        extra = "Wechatpay-Signature-Type: WECHATPAY2-SM2-WITH-SM3\r\n" }),
        { "--certificate", pki.platform, "--certificate", sm_cert })
      assert.equal("unknown_serial", r.kind)
      assert.matches("WeChat rotated its certificates", r.detail, 1, true)
    end)
  end)

  -- A serial naming no key given, and a signature that verifies with one
  -- given: the body and the signature are one message's. It was always
  -- "the headers and the body come from different captures", though a
  -- capture the gateway wrote (NAME.headers beside NAME.body, one
  -- notification) cannot be that.
  describe("a serial naming no key given, the signature verifying with one",
           function()
    local function capture(body, headers, keys)
      local args = { "verify", "--json",
        "--headers", file("refused-1.headers", headers),
        "--body", file("refused-1.body", body) }
      for _, a in ipairs(keys) do args[#args + 1] = a end
      local code, out, r = run(args)
      assert.equal(1, code, out)
      assert.equal("unknown_serial", r[#r].kind, out)
      assert.matches("names no key given, but the signature verifies with",
                     r[#r].cause, 1, true)
      assert.not_matches("different captures", r[#r].detail, 1, true)
      return r[#r]
    end

    it("the public key given under another id than WeChat's", function()
      local key = assert(crypto.private_key(read(pki.pub_key)))
      local right = "PUB_KEY_ID_0114232134912410000000000000000009"
      local r = capture(SORTED, signed(SORTED, { key = key, serial = right }),
        { "--public-key", pki.pub, "--public-key-id",
          "PUB_KEY_ID_0114232134912410000000000000000001" })
      assert.matches("the public key is right and the id given with it is "
                     .. "not: WeChat names it " .. right, r.detail, 1, true)
      assert.matches("--public-key-id " .. right, r.fix, 1, true)
      assert.matches("public_key_id", r.fix, 1, true)
    end)

    it("WeChat's certificate re-issued under the key of one given",
       function()
      local other = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
      local r = capture(SORTED, signed(SORTED, { serial = other }),
                        { "--certificate", pki.platform })
      assert.matches("WeChat's platform certificate " .. other .. " holds "
                     .. "the key of ", r.detail, 1, true)
      assert.matches("the Wechatpay-Serial header was altered", r.detail,
                     1, true)
      assert.matches("paygate certs --download", r.fix, 1, true)
    end)

    it("keeps different captures for headers given one by one (-H)",
       function()
      local h = signed(SORTED, { serial =
        "5157F09EFDC096DE15EBE81A47057A7232F1B8E1" })
      local args = { "verify", "--json", "--body", file("body", SORTED) }
      for line in h:gmatch("[^\r\n]+") do
        local k = line:match("^(Wechatpay%-%w+):")
        if k then
          args[#args + 1] = "-H"
          args[#args + 1] = line
        end
      end
      args[#args + 1] = "--certificate"
      args[#args + 1] = pki.platform
      local code, out, r = run(args)
      assert.equal(1, code, out)
      assert.equal("unknown_serial", r[#r].kind, out)
      assert.matches("the headers given with -H come from different "
                     .. "captures", r[#r].detail, 1, true)
      assert.equal("capture the headers and body of the same answer",
                   r[#r].fix)
    end)
  end)

  it("judges the time at --at", function()
    local old = os.time() + 86400    -- the certificates are days old
    local h = signed(SORTED, { ts = old })
    local code, out = verify(SORTED, h)
    assert.equal(1, code, out)
    code, out = run{ "verify", "--json", "--body", file("body", SORTED),
      "--headers", file("headers", h), "--certificate", pki.platform,
      "--at", tostring(old + 10) }
    assert.equal(0, code, out)
    -- not a time: refused as a usage error (nan passed every check; an
    -- old notification was verified)
    for _, at in ipairs({ "nan", "inf", "-inf", "0x10", " 5", "5 " }) do
      code, out = run{ "verify", "--json", "--body", file("body", SORTED),
        "--headers", file("headers", h), "--certificate", pki.platform,
        "--at", at }
      assert.equal(2, code, at .. ": " .. out)
      assert.matches("--at must be a number", out, 1, true)
    end
    assert.is_nil((require("paygate.wechatpay.verify").fresh(old, 0 / 0)))
    -- milliseconds (Date.now()) were read as seconds: the timestamp was
    -- "20 million days behind"; absurd values printed 'now -922...'
    code, out = run{ "verify", "--body", file("body", SORTED),
      "--headers", file("headers", h), "--certificate", pki.platform,
      "--at", tostring(old + 10) .. "000" }
    assert.equal(2, code, out)
    assert.matches("--at " .. (old + 10) .. "000 has 13 digits: "
      .. "milliseconds, where --at takes epoch seconds (" .. (old + 10)
      .. ")", out, 1, true)
    for _, at in ipairs({ "99999999999999999999", "-5", "0", "5",
                          "1e10", "12345678901" }) do
      code, out = run{ "verify", "--body", file("body", SORTED),
        "--headers", file("headers", h), "--certificate", pki.platform,
        "--at", at }
      assert.equal(2, code, at .. ": " .. out)
      assert.matches("--at " .. at .. " is not epoch seconds", out, 1, true)
      assert.no_match("-9223372036854775808", out, 1, true)
    end
  end)

  it("takes the headers a server logged: Go's http.Header, a request dump",
     function()
    -- json.Marshal(r.Header) in Go writes each header as an array of its
    -- values; httputil.DumpRequest (or nc -l) starts with the request
    -- line and ends with the body after a blank line
    local h = signed(SORTED)
    local t, lines = {}, {}
    for k, v in h:gmatch("\n([%w-]+): ([^\r]*)") do
      t[k] = { v }
      lines[#lines + 1] = k .. ": " .. v .. "\r\n"
    end
    local code, out = verify(SORTED, json.encode(t))
    assert.equal(0, code, out)
    local dump = "POST /wechatpay/notify HTTP/1.1\r\nHost: pay.example.com\r\n"
      .. table.concat(lines) .. "\r\n" .. SORTED
    code, out = verify(SORTED, dump)
    assert.equal(0, code, out)
    -- a header sent twice is no header to verify with: named
    t["Wechatpay-Nonce"] = { "a", "b" }
    code, out = verify(SORTED, json.encode(t))
    assert.equal(2, code, out)
    assert.matches("Wechatpay-Nonce has 2 values", out, 1, true)
  end)

  it("marks a signed string cut short, and never cuts a character",
     function()
    -- a long body whose signature does not match (signed over another)
    local body = '{"summary":"' .. ("支付成功"):rep(40) .. '"}'
    local headers = signed('{"other":1}')
    local r, out = last(body, headers)
    local tried = r.detail:match("signed string tried: ([^\n]*)")
    assert.truthy(tried, out)
    local shown, more = tried:match("^(.*)… %((%d+) more bytes%)$")
    assert.truthy(shown, tried)
    -- what is shown and what is left out make the whole signed string
    local ts = headers:match("Wechatpay%-Timestamp: (%d+)")
    local nonce = headers:match("Wechatpay%-Nonce: (%S+)")
    local msg = ts .. "\n" .. nonce .. "\n" .. body .. "\n"
    assert.equal(#msg, #shown:gsub("\\n", "\n") + tonumber(more))
    assert.truthy(require("paygate.utf8").len(shown),
                  "cut inside a character: " .. shown)
    assert.is_true(#shown <= 200)
  end)
end)

describe("paygate verify (a signature damaged on the way)", function()
  -- a signature with + and / and padding, so that each damage shows
  local function sample()
    for _ = 1, 50 do
      local h = signed(SORTED)
      local sig = h:match("Wechatpay%-Signature: ([^\r]+)")
      if sig:find("+", 1, true) and sig:find("/", 1, true)
         and sig:find("=", 1, true) then
        return h, sig
      end
    end
    error("no signature with + / and =")
  end
  local cases = {
    { "quoted", function(s) return '"' .. s .. '"' end },
    { "percent_encoded", function(s)
        return (s:gsub("[+/=]", function(c)
          return ("%%%02X"):format(c:byte()) end)) end },
    { "plus_as_space", function(s) return (s:gsub("%+", " ")) end },
    { "line_breaks", function(s) return s:sub(1, 76) .. " " .. s:sub(77) end },
    { "url_safe", function(s)
        return (s:gsub("[+/=]", { ["+"] = "-", ["/"] = "_", ["="] = "" }))
      end },
    { "padding", function(s) return (s:gsub("=", "")) end },
  }
  for _, c in ipairs(cases) do
    it("names a signature " .. c[1] .. " and that it verifies undone",
       function()
      local h, sig = sample()
      local damaged = c[2](sig)
      local r, out = last(SORTED, (h:gsub("(Wechatpay%-Signature: )[^\r]+",
        function(p) return p .. damaged end)))
      assert.equal("signature_encoding", r.kind, out)
      assert.equal(c[1], r.what, out)
      assert.matches("undone, the signature verifies", r.detail, 1, true)
    end)
  end

  it("names a signature base64-encoded twice, or hex, apart from one cut "
     .. "short", function()
    local h, sig = sample()
    local raw = crypto.base64_decode(sig)
    for _, c in ipairs({
      { crypto.base64_encode(sig), "base64-encoded twice" },
      { (raw:gsub(".", function(b) return ("%02x"):format(b:byte()) end)),
        "hex-encoded, not base64" },
      { sig:sub(1, 100), nil } }) do
      local r, out = last(SORTED, (h:gsub("(Wechatpay%-Signature: )[^\r]+",
        function(p) return p .. c[1] end)))
      assert.equal("signature_length", r.kind, out)
      if c[2] then
        assert.matches("it was " .. c[2], r.cause, 1, true)
        assert.is_nil(r.fix:find("whole", 1, true), out)
      else
        assert.is_nil(r.cause:find("it was", 1, true), out)
        assert.matches("whole", r.fix, 1, true)
      end
    end
  end)

  it("says when a signature undone still does not verify", function()
    local h, sig = sample()
    local other = sig:sub(1, 10) .. (sig:sub(11, 11) == "A" and "B" or "A")
                  .. sig:sub(12)
    local r, out = last(SORTED, (h:gsub("(Wechatpay%-Signature: )[^\r]+",
      function(p) return p .. (other:gsub("%+", " ")) end)))
    assert.equal("plus_as_space", r.what, out)
    assert.matches("still does not verify", r.detail, 1, true)
  end)
end)

-- A message whose Wechatpay-Signature-Type is not the variant its key
-- signs in: the gateway's SM client refuses it, and the verify command
-- its capture names (--sign-type) must fail it too (was: exit 0 with a
-- warning for an SM2 signature with no type header, while the gateway
-- answered 401); without --sign-type, a type header that does not fit
-- a key that did sign is named as the header's fault (was: "use the key
-- of the variant the merchant signed up for", the key being the right
-- one).
describe("paygate verify (the type header against the variant)", function()
  local sm, keys
  local SM, RSA = "WECHATPAY2-SM2-WITH-SM3", "WECHATPAY2-SHA256-RSA2048"
  setup(function()
    assert(os.execute(("openssl genpkey -algorithm SM2 -out %s/smt.pem "
      .. "2>/dev/null && openssl pkey -in %s/smt.pem -pubout -out "
      .. "%s/smtpub.pem"):format(dir, dir, dir)))
    sm = assert(crypto.private_key(read(dir .. "/smt.pem")))
    keys = { "--public-key", dir .. "/smtpub.pem", "--public-key-id",
             "PUB_KEY_ID_0120" }
  end)
  local function sm_signed(type_header)
    return signed(SORTED, { key = sm, alg = SM, serial = "PUB_KEY_ID_0120",
      extra = type_header and ("Wechatpay-Signature-Type: " .. type_header
                               .. "\r\n") })
  end
  local function with(...)
    local t = { unpack(keys) }
    for _, a in ipairs({ ... }) do t[#t + 1] = a end
    return t
  end

  it("--sign-type SM fails an SM2 signature with no type header", function()
    local code, out, r = verify(SORTED, sm_signed(nil),
                                with("--sign-type", SM))
    assert.equal(1, code, out)
    r = r[#r]
    assert.equal("fail", r.status, out)
    assert.equal("signature_type", r.kind, out)
    assert.matches("no Wechatpay-Signature-Type, which means " .. RSA,
                   r.cause, 1, true)
    assert.matches("configured for " .. SM, r.cause, 1, true)
    assert.matches("the signature itself verifies", r.detail, 1, true)
    assert.matches("type header is missing", r.detail, 1, true)
    -- typed, it verifies under --sign-type as without it
    code, out, r = verify(SORTED, sm_signed(SM), with("--sign-type", SM))
    assert.equal(0, code, out)
    assert.equal("ok", r[#r].status, out)
  end)

  it("--sign-type RSA fails an SM2-typed message", function()
    local code, out, r = verify(SORTED, sm_signed(SM), with("--sign-type",
                                                             RSA))
    assert.equal(1, code, out)
    assert.equal("signature_type", r[#r].kind, out)
    assert.matches("is " .. SM .. ", but the client is configured for "
                   .. RSA, r[#r].cause, 1, true)
  end)

  it("--sign-type SM fails an RSA message before looking for its key",
     function()
    -- the client refuses it before its key ring is asked: verify says
    -- the variant, not "give the RSA platform certificates"
    local code, out, r = verify(SORTED, signed(SORTED, {
      extra = "Wechatpay-Signature-Type: " .. RSA .. "\r\n" }),
      with("--sign-type", SM))
    assert.equal(1, code, out)
    r = r[#r]
    assert.equal("signature_type", r.kind, out)
    assert.matches("names none of the keys given", r.detail, 1, true)
    assert.matches("sign_type must be the variant", r.fix, 1, true)
  end)

  it("--sign-type takes the two types only (exit 2)", function()
    local code, out = verify(SORTED, sm_signed(SM), with("--sign-type",
                                                          "SM2"), true)
    assert.equal(2, code, out)
    assert.matches("--sign-type is " .. RSA .. " or " .. SM .. ", not SM2",
                   out, 1, true)
  end)

  it("names an RSA type header on an SM2 signature as the header's fault",
     function()
    local r, out = last(SORTED, sm_signed(RSA), keys)
    assert.equal("algorithm", r.kind, out)
    assert.matches("verifies as " .. SM .. " with it", r.cause, 1, true)
    assert.matches("the key is the signer's", r.detail, 1, true)
    assert.matches("Wechatpay-Signature-Type on the way", r.fix, 1, true)
    assert.is_nil(r.fix:find("variant the merchant signed up for", 1, true))
  end)
end)
