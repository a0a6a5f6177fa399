-- paygate sign | verify | decrypt | certs: each failure of the catalogue
-- produced for real (keys and certificates made per run, signatures made
-- with paygate.crypto) and the command naming its cause.
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

local BODY = '{"id":"EV-1","create_time":"2026-01-01T12:00:06+08:00",'
  .. '"summary":"支付成功","resource":{"out_trade_no":"T-1","payer":'
  .. '{"openid":"o/1"}}}'

-- headers of an answer signed over TIMESTAMP\nNONCE\nBODY\n
local function signed(body, o)
  o = o or {}
  local ts = tostring(o.ts or os.time())
  local nonce = "n" .. crypto.random_nonce(16)
  local msg = ts .. "\n" .. nonce .. "\n" .. body
              .. (o.no_newline and "" or "\n")
  local sig = assert(crypto.sign_base64(o.key or pkey, msg))
  local serial = o.serial
    or assert(crypto.certificate(read(pki.platform))):serial()
  return ("HTTP/1.1 200 OK\r\nWechatpay-Timestamp: %s\r\nWechatpay-Nonce: %s"
    .. "\r\nWechatpay-Signature: %s\r\nWechatpay-Serial: %s\r\n%s\r\n")
    :format(ts, nonce, o.sig or sig, serial, o.extra or "")
end

local function verify(body, headers, keys)
  local args = { "verify", "--json", "--body", file("body", body),
                 "--headers", file("headers", headers) }
  for _, a in ipairs(keys or { "--certificate", pki.platform }) do
    args[#args + 1] = a
  end
  return run(args)
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
  pkey = assert(crypto.private_key(read(pki.platform_key)))
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("paygate verify", function()
  it("verifies a good answer (exit 0)", function()
    local code, out = verify(BODY, signed(BODY))
    assert.equal(0, code, out)
    assert.matches('"status":"ok"', out)
  end)

  it("takes curl -D output with a 100 Continue first, and JSON headers",
     function()
    local h = "HTTP/1.1 100 Continue\r\n\r\n" .. signed(BODY)
    assert.equal(0, (verify(BODY, h)))
    local t = {}
    for k, v in h:gmatch("\n([%w-]+): ([^\r]*)") do t[k] = v end
    assert.equal(0, (verify(BODY, json.encode(t))))
  end)

  local function cause_of(body_given, headers, keys)
    local code, out, r = verify(body_given, headers, keys)
    assert.equal(1, code, out)
    return r[#r], out
  end

  it("names a pretty-printed body (whitespace)", function()
    local pretty = BODY:gsub('","', '",\n  "'):gsub("{", "{\n  ", 1)
    local r = cause_of(pretty, signed(BODY))
    assert.equal("body_reencoded", r.kind)
    assert.equal("whitespace", r.what)
  end)

  it("names a pretty-printed body whose strings hold blanks, quotes and"
     .. " backslashes (kept as signed)", function()
    local body = '{"a":"x y\\" z","b":"\\\\","c":"\t  ","d":[1,"e f"]}'
    local pretty = body:gsub('","', '",\n  "'):gsub("{", "{\n  ", 1)
                       :gsub("%]}$", "]\n}")
    assert.equal(0, (verify(body, signed(body))))
    local r = cause_of(pretty, signed(body))
    assert.equal("body_reencoded", r.kind)
    assert.equal("whitespace", r.what)
  end)

  it("names escaped unicode", function()
    local escaped = BODY:gsub("支付成功", "\\u652f\\u4ed8\\u6210\\u529f")
    local r = cause_of(escaped, signed(BODY))
    assert.equal("escaped_unicode", r.what)
  end)

  it("names a BOM", function()
    local r = cause_of("\239\187\191" .. BODY, signed(BODY))
    assert.equal("bom", r.what)
  end)

  it("mentions sorted keys as a possibility only", function()
    local sorted = '{"create_time":"2026-01-01T12:00:06+08:00","id":"EV-1",'
      .. '"resource":{"out_trade_no":"T-1","payer":{"openid":"o/1"}},'
      .. '"summary":"支付成功"}'
    local r = cause_of(sorted, signed(BODY))
    assert.equal("signature_mismatch", r.kind)
    assert.equal("key_order", r.possible)
  end)

  it("names a body file with an extra final newline", function()
    local r = cause_of(BODY .. "\n", signed(BODY))
    assert.equal("trailing_newline", r.what)
  end)

  it("names a signature made without the final newline", function()
    local r = cause_of(BODY, signed(BODY, { no_newline = true }))
    assert.equal("trailing_newline", r.kind)
  end)

  it("names a timestamp outside the window, by how much and which way",
     function()
    local code, out, r = verify(BODY, signed(BODY, { ts = os.time() - 400 }))
    assert.equal(1, code)
    assert.equal("stale_timestamp", r[1].kind)
    -- (seconds pass between signing and the check, a few under ASan:
    -- 400 s behind reads 6 min 40 s or a little more, 3700 s ahead 61 min
    -- 40 s or a little less)
    local m, sec = r[1].cause:match("(%d+) min (%d+) s behind")
    assert.truthy(m, r[1].cause)
    assert.is_true(tonumber(m) * 60 + tonumber(sec) >= 400
                   and tonumber(m) * 60 + tonumber(sec) <= 420, r[1].cause)
    assert.matches("only the time is wrong", out)
    code, out, r = verify(BODY, signed(BODY, { ts = os.time() + 3700 }))
    m, sec = r[1].cause:match("(%d+) min (%d+) s ahead of")
    assert.truthy(m, r[1].cause)
    assert.is_true(tonumber(m) * 60 + tonumber(sec) <= 3700
                   and tonumber(m) * 60 + tonumber(sec) >= 3680, r[1].cause)
  end)

  it("names a PUB_KEY_ID_ serial when only certificates were given",
     function()
    local k = assert(crypto.private_key(read(pki.pub_key)))
    local r = cause_of(BODY, signed(BODY, { key = k,
      serial = "PUB_KEY_ID_0114232134912410000000000000000001" }))
    assert.equal("unknown_serial", r.kind)
    assert.matches("public key PUB_KEY_ID_011423", r.cause)
    assert.matches("only platform certificates", r.cause)
  end)

  it("names a certificate serial when only a public key was given",
     function()
    local r = cause_of(BODY, signed(BODY), { "--public-key", pki.pub,
      "--public-key-id", "PUB_KEY_ID_0114232134912410000000000000000001" })
    assert.equal("unknown_serial", r.kind)
    assert.matches("only a public key", r.cause)
  end)

  it("verifies with the public key under its id", function()
    local id = "PUB_KEY_ID_0114232134912410000000000000000001"
    local k = assert(crypto.private_key(read(pki.pub_key)))
    local code, out = verify(BODY, signed(BODY, { key = k, serial = id }),
      { "--public-key", pki.pub, "--public-key-id", id })
    assert.equal(0, code, out)
  end)

  it("names the merchant's own certificate given for WeChat's", function()
    local r = cause_of(BODY, signed(BODY), { "--certificate", pki.merchant })
    assert.equal("unknown_serial", r.kind)
    assert.matches("merchant's own API certificate", r.cause)
  end)

  it("names a signature type that does not fit the key", function()
    local r = cause_of(BODY, signed(BODY, {
      extra = "Wechatpay-Signature-Type: WECHATPAY2-SM2-WITH-SM3\r\n" }))
    assert.equal("algorithm", r.kind)
    assert.matches("RSA key", r.cause)
  end)

  it("names a WECHATPAY/SIGNTEST/ probe", function()
    local r = cause_of(BODY, signed(BODY,
                                    { sig = "WECHATPAY/SIGNTEST/abcdEFGH" }))
    assert.equal("signtest_probe", r.kind)
  end)

  it("exits 2 with a reason for unreadable input", function()
    local code, out = run({ "verify", "--body", "/nonexistent",
      "--headers", "/nonexistent", "--certificate", pki.platform })
    assert.equal(2, code)
    assert.matches("cannot read body file /nonexistent", out)
    -- a certificate path that is not there: the reason too
    code, out = run({ "certs", "/nonexistent.pem" })
    assert.equal(2, code)
    assert.matches("cannot read /nonexistent.pem: No such file", out, 1,
                   true)
  end)
end)

describe("paygate decrypt", function()
  local KEY = "0123456789abcdefghijABCDEFGHIJkl"
  local function resource(nonce, key, alg)
    local ct = crypto.aead_encrypt("AEAD_AES_256_GCM", key or KEY, nonce,
                                   "transaction", '{"out_trade_no":"T-1"}')
    return file("res.json", json.encode({ algorithm = alg or "AEAD_AES_256_GCM",
      nonce = nonce, associated_data = "transaction",
      ciphertext = crypto.base64_encode(ct) }))
  end

  it("prints the plaintext, for a nonce of any length", function()
    for _, n in ipairs({ "abcdefghijkl", "abcdefghijklm", "n" }) do
      local res = resource(n)
      local code, out = run({ "decrypt", "--apiv3-key-file",
                              file("k", KEY), "--resource", res })
      assert.equal(0, code, out)
      assert.matches('{"out_trade_no":"T-1"}', out, 1, true)
    end
  end)

  it("reads a key file as the gateway does: the newline around the key"
     .. " is not part of it", function()
    local res = resource("abcdefghijkl")
    for _, text in ipairs({ KEY .. "\n", KEY .. "\r\n", " " .. KEY .. " \n" }) do
      local code, out = run({ "decrypt", "--apiv3-key-file",
                              file("k", text), "--resource", res })
      assert.equal(0, code, out)
      assert.matches('{"out_trade_no":"T-1"}', out, 1, true)
    end
  end)

  it("names a key given hex or base64", function()
    local res = resource("abcdefghijkl")
    local cases = {
      { crypto.hex(KEY), "hex encoding of 32 bytes" },
      { crypto.base64_encode(KEY), "base64 of 32 bytes" },
    }
    for _, c in ipairs(cases) do
      local code, _, r = run({ "decrypt", "--json", "--apiv3-key-file",
                               file("k", c[1]), "--resource", res })
      assert.equal(1, code)
      assert.equal("apiv3_key_length", r[1].kind)
      assert.matches(c[2], r[1].cause, 1, true)
    end
  end)

  it("names a key in quotes, or a NAME=VALUE line of an env file",
     function()
    local res = resource("abcdefghijkl")
    local cases = {
      { '"' .. KEY .. '"\n', "32 characters in quotes" },
      { "'" .. KEY .. "'", "32 characters in quotes" },
      { "WECHATPAY_APIV3_KEY=" .. KEY .. "\n", "a NAME=VALUE line" },
      { 'export APIV3_KEY="' .. KEY .. '"\n', "a NAME=VALUE line" },
    }
    for _, c in ipairs(cases) do
      local code, out, r = run({ "decrypt", "--json", "--apiv3-key-file",
                                 file("k", c[1]), "--resource", res })
      assert.equal(1, code, out)
      assert.equal("apiv3_key_length", r[1].kind)
      assert.matches(c[2], r[1].cause, 1, true)
      assert.is_nil(out:find(KEY, 1, true), out)
    end
  end)

  it("names a tag mismatch: the APIv2 key is also 32 characters", function()
    local res = resource("abcdefghijkl")
    local code, _, r = run({ "decrypt", "--json", "--apiv3-key-file",
      file("k", "ThisIsTheAPIv2KeyNotTheAPIv3Key!"), "--resource", res })
    assert.equal(1, code)
    assert.equal("tag_mismatch", r[1].kind)
    assert.matches("APIv2 key is also 32 characters", r[1].detail, 1, true)
  end)

  it("names an unknown algorithm", function()
    local res = resource("abcdefghijkl", nil, "AEAD_AES_128_CBC")
    local code, _, r = run({ "decrypt", "--json", "--apiv3-key-file",
      file("k", KEY), "--resource", res })
    assert.equal(1, code)
    assert.equal("unknown_algorithm", r[1].kind)
  end)

  it("decrypts a whole notification", function()
    local res = read(resource("abcdefghijkl"))
    local n = file("note.json", '{"id":"EV-1","resource":' .. res .. "}")
    local code, out = run({ "decrypt", "--apiv3-key-file", file("k", KEY),
                            "--notification", n })
    assert.equal(0, code, out)
    assert.matches("T-1", out)
  end)
end)

describe("paygate sign", function()
  it("prints the signing string with every \\n visible", function()
    local code, out = run({ "sign", "--method", "POST", "--url",
      "/v3/pay/transactions/jsapi", "--body", file("b", '{"a":1}'),
      "--mchid", "1900000001",
      "--serial", "5F1C72E2A8931B72A2E13AF8DEE92471EB397115",
      "--key", pki.merchant_key, "--timestamp", "1700000000", "--nonce", "N1" })
    assert.equal(0, code, out)
    assert.matches("POST\\n\n/v3/pay/transactions/jsapi\\n\n"
                   .. "1700000000\\n\nN1\\n\n"
                   .. '{"a":1}\\n\n', out, 1, true)
    assert.matches('Authorization: WECHATPAY2-SHA256-RSA2048 '
                   .. 'mchid="1900000001",'
                   .. 'nonce_str="N1",timestamp="1700000000"', out, 1, true)
    -- the header verifies with the merchant certificate
    local sig = out:match('signature="([^"]+)"')
    assert.truthy(crypto.verify_base64(crypto.certificate(read(pki.merchant)),
      'POST\n/v3/pay/transactions/jsapi\n1700000000\nN1\n{"a":1}\n', sig))
  end)

  it("fails a URL with a scheme and host", function()
    local code, out = run({ "sign", "--method", "GET", "--url",
      "https://api.mch.weixin.qq.com/v3/certificates", "--mchid", "1",
      "--serial", "AB", "--key", pki.merchant_key })
    assert.equal(1, code)
    assert.matches("scheme and host", out)
  end)

  it("exits 2 without its required options", function()
    local code, out = run({ "sign", "--method", "GET" })
    assert.equal(2, code)
    assert.matches("--url is required", out, 1, true)
  end)
end)

describe("paygate certs", function()
  it("lists which is which and fails an expired one", function()
    local code, out, r = run({ "certs", "--json", pki.platform, pki.merchant,
                               pki.root, pki.pub, pki.expired })
    assert.equal(1, code, out)
    local roles = {}
    for _, x in ipairs(r) do roles[#roles + 1] = x.role end
    assert.same({ "platform", "merchant", "CA", "public key", "other" },
                roles)
    assert.equal("warn", r[1].status)         -- 3-day certificate: < 30 days
    assert.equal("fail", r[5].status)
    assert.equal(2048, r[1].key_bits)
  end)

  it("lists a directory's files, passing over a folder inside it",
     function()
    local d = dir .. "/keys-with-folder"
    os.execute("mkdir -p '" .. d .. "/old'")
    write(d .. "/platform.pem", read(pki.platform))
    write(d .. "/old/merchant.pem", read(pki.merchant))
    local code, out, r = run({ "certs", "--json", d })
    assert.equal(0, code, out)
    assert.equal(1, #r, out)
    assert.equal("platform", r[1].role)
    -- verify reads a --keyring / --certificate folder the same way
    code, out = verify(BODY, signed(BODY), { "--keyring", d })
    assert.equal(0, code, out)
    code, out = verify(BODY, signed(BODY), { "--certificate", d })
    assert.equal(0, code, out)
  end)
end)

describe("paygate certs --download", function()
  local wxtest = require "support.wxtest"
  local srv, k
  setup(function()
    k = wxtest.make(dir)
    srv = wxtest.start(k)
  end)
  teardown(function() srv:stop() end)

  local function download(apiv3)
    return run({ "certs", "--json", "--download", srv.base_url, "--mchid",
      wxtest.MCHID, "--key", k.merchant_key, "--serial",
      wxtest.MERCHANT_SERIAL, "--apiv3-key-file", file("apiv3", apiv3),
      "--out", dir .. "/dl" })
  end

  it("fetches, verifies and writes the platform certificates", function()
    local code, out, r = download(wxtest.APIV3)
    assert.equal(0, code, out)
    local serials = {}
    for _, x in ipairs(r) do serials[#serials + 1] = x.serial end
    table.sort(serials)
    assert.same({ wxtest.P1, wxtest.P2 }, serials)
    local c = assert(crypto.certificate(read(dir .. "/dl/" .. wxtest.P1
                                             .. ".pem")))
    assert.equal(wxtest.P1, c:serial())
  end)

  it("names a wrong APIv3 key", function()
    local code, out, r = download("ThisIsTheAPIv2KeyNotTheAPIv3Key!")
    assert.equal(1, code, out)
    assert.equal("download", r[#r].kind)
    assert.matches("decrypt_failed", r[#r].cause)
    -- one download, answered once: no log line of a background retry
    assert.is_nil(out:find("retrying", 1, true), out)
    assert.is_nil(out:find('"level"', 1, true), out)
  end)
end)

describe("the diagnostic commands", function()
  it("are listed by paygate --help and each has --help (exit 0)", function()
    local code, out = run({ "--help" })
    assert.equal(0, code)
    for _, c in ipairs({ "sign", "verify", "decrypt", "certs", "doctor" }) do
      assert.matches("\n  " .. c .. " ", out, 1, true)
      local hc, hout = run({ c, "--help" })
      assert.equal(0, hc)
      assert.matches("usage: paygate " .. c, hout, 1, true)
    end
  end)

  it("exit 2 with one line for an unknown option", function()
    for _, c in ipairs({ "sign", "verify", "decrypt", "certs", "doctor" }) do
      local code, out = run({ c, "--frobnicate" })
      assert.equal(2, code)
      assert.equal("paygate " .. c .. ": unknown option --frobnicate "
                   .. "(see --help)\n", out)
    end
  end)

  it("exit 2 for an argument that is not an option, without echoing it",
     function()
    -- a value given twice, or a key pasted where no option takes it
    local stray = "k3yPastedByMistake0123456789abcd"
    for _, c in ipairs({ "sign", "verify", "decrypt", "doctor" }) do
      local code, out = run({ c, "--json", stray })
      assert.equal(2, code, out)
      assert.equal("paygate " .. c .. ": argument 2 is not an option, nor "
                   .. "an option's value (this command takes options only;"
                   .. " see --help)\n", out)
      assert.is_nil(out:find(stray, 1, true))
    end
    -- the position of the stray one, even when it repeats an option's value
    local code, out = run({ "decrypt", "--apiv3-key-file", "k.txt", "k.txt" })
    assert.equal(2, code, out)
    assert.matches("argument 3 is not an option", out, 1, true)
  end)

  it("names an unknown option without the value glued to it, and never"
     .. " echoes a pasted key", function()
    local secret = "S3cretS3cretS3cretS3cretS3cret12"
    local code, out = run({ "decrypt", "--apiv3-key=" .. secret })
    assert.equal(2, code, out)
    assert.equal("paygate decrypt: unknown option --apiv3-key (see --help)\n",
                 out)
    local pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEF\n"
    code, out = run({ "sign", pem })
    assert.equal(2, code, out)
    assert.matches("argument 1 is not an option", out, 1, true)
    assert.is_nil(out:find("MIIE", 1, true))
  end)
end)

describe("paygate verify --keyring", function()
  it("reads certificates and PUB_KEY_ID_....pem public keys from a directory",
     function()
    local ring = dir .. "/ring"
    os.execute("mkdir -p " .. ring)
    local id = "PUB_KEY_ID_0114232134912410000000000000000001"
    write(ring .. "/platform.pem", read(pki.platform))
    write(ring .. "/" .. id .. ".pem", read(pki.pub))
    local k = assert(crypto.private_key(read(pki.pub_key)))
    local code, out = verify(BODY, signed(BODY, { key = k, serial = id }),
                             { "--keyring", ring })
    assert.equal(0, code, out)
    code, out = verify(BODY, signed(BODY), { "--keyring", ring })
    assert.equal(0, code, out)
  end)
end)
