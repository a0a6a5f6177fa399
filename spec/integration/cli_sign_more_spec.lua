-- paygate sign: its warnings (a lower-case method, a GET with a body, a
-- body file ending in a newline), each with what it then signs; a key
-- encrypted with a passphrase, in either PEM form, named as such; the
-- variant taken from the key (an SM2 key signs the SM variant).
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir, pki

-- (key: another key file than the test PKI's RSA one; more: further
-- arguments)
local function sign(method, body, ts, nonce, url, key, more)
  local log = dir .. "/out." .. crypto.random_nonce(8)
  local argv = { PAYGATE_BIN, "sign", "--json", "--method", method, "--url",
    url or "/v3/pay/transactions/jsapi", "--mchid", "1900000001", "--serial",
    "5F1C72E2A8931B72A2E13AF8DEE92471EB397115", "--key",
    key or pki.merchant_key,
    "--timestamp", ts or "1700000000", "--nonce", nonce or "ABC" }
  for _, a in ipairs(more or {}) do argv[#argv + 1] = a end
  if body then
    diagpki.write(dir .. "/b", body)
    argv[#argv + 1] = "--body"
    argv[#argv + 1] = dir .. "/b"
  end
  local p = proc.spawn(argv, { log = log })
  local code = p:wait(30)
  if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
  local out = proc.read(log)
  local warns, sig, fails = {}, nil, {}
  for line in out:gmatch("[^\n]+") do
    local r = json.decode(line)
    if r and r.status == "warn" then warns[#warns + 1] = r end
    if r and r.status == "fail" and r.kind ~= "signature" then
      fails[#fails + 1] = r
    end
    if r and r.kind == "signature" then sig = r end
  end
  return code, out, warns, sig, fails
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("paygate sign warns", function()
  it("of nothing for a clean request", function()
    local code, out, warns, sig = sign("POST", '{"a":1}')
    assert.equal(0, code, out)
    assert.equal(0, #warns, out)
    assert.equal('POST\n/v3/pay/transactions/jsapi\n1700000000\nABC\n'
                 .. '{"a":1}\n', sig.signing_string)
  end)

  it("of a lower-case method, and signs it upper case", function()
    local code, out, warns, sig = sign("post", '{"a":1}')
    assert.equal(0, code, out)
    assert.equal(1, #warns, out)
    assert.equal("method", warns[1].kind)
    assert.matches("not upper case", warns[1].cause)
    assert.equal("POST\n", sig.signing_string:sub(1, 5))
  end)

  it("of a GET with a body", function()
    local code, out, warns = sign("GET", '{"a":1}')
    assert.equal(0, code, out)
    assert.equal(1, #warns, out)
    assert.equal("body", warns[1].kind)
    assert.matches("a GET with a body", warns[1].cause)
  end)

  it("of a body file ending in a newline, which it signs", function()
    local code, out, warns, sig = sign("POST", '{"a":1}\n')
    assert.equal(0, code, out)
    assert.equal(1, #warns, out)
    assert.matches("ends with a newline", warns[1].cause)
    assert.equal('{"a":1}\n\n', sig.signing_string:sub(-9))
  end)

  it("of a URL sent percent-encoded, with the form to sign and send",
     function()
    -- a space in the path, a Chinese word in the query: what an HTTP
    -- client sends, and so what WeChat verifies, is the encoded form
    local code, out, warns = sign("GET", nil, nil, nil,
      "/v3/pay/transactions/out-trade-no/A 1?mchid=1900000001&q=茶")
    assert.equal(0, code, out)
    assert.equal("url", warns[1].kind, out)
    assert.matches("/v3/pay/transactions/out-trade-no/A%201?mchid="
                   .. "1900000001&q=%E8%8C%B6", warns[1].fix, 1, true)
    assert.is_nil(warns[1].fix:find("the query", 1, true), warns[1].fix)
  end)
end)

describe("paygate sign fails", function()
  it("a --timestamp in milliseconds (WeChat's is epoch seconds), and still"
     .. " shows what it signs", function()
    -- Date.now() / System.currentTimeMillis() where seconds belong: WeChat
    -- answers 401 SIGN_ERROR (timestamp) to every such request
    local code, out, _, sig, fails = sign("POST", '{"a":1}', "1700000000000")
    assert.equal(1, code, out)
    assert.equal(1, #fails, out)
    assert.equal("timestamp", fails[1].kind)
    assert.matches("milliseconds", fails[1].cause)
    assert.matches("1700000000", fails[1].fix, 1, true)
    assert.equal("1700000000000\n", sig.signing_string:match("\n(%d+\n)"))
  end)

  -- 17000 (an uptime, a counter) passed without a word, and a timestamp
  -- in microseconds was told to send 13 digits, its milliseconds: every
  -- timestamp that is not 10 digits is no current time in seconds
  it("a --timestamp that is not 10 digits of epoch seconds", function()
    for ts, want in pairs({
      ["17000"] = { "5 digits: not epoch seconds", "10 digits" },
      ["170000000"] = { "9 digits: not epoch seconds", "10 digits" },
      ["17000000000"] = { "11 digits: not epoch seconds", "10 digits" },
      ["0170000000"] = { "a leading 0: not epoch seconds", "10 digits" },
      ["1700000000000000"] = { "16 digits: microseconds",
                               "10 digits: 1700000000)" },
      ["1700000000000000000"] = { "19 digits: nanoseconds",
                                  "10 digits: 1700000000)" },
    }) do
      local code, out, _, sig, fails = sign("POST", '{"a":1}', ts)
      assert.equal(1, code, out)
      assert.equal(1, #fails, out)
      assert.equal("timestamp", fails[1].kind)
      assert.matches("--timestamp " .. ts .. " has " .. want[1],
                     fails[1].cause, 1, true)
      assert.matches(want[2], fails[1].fix, 1, true)
      assert.equal(ts .. "\n", sig.signing_string:match("\n(%d+\n)"))
    end
  end)

  it("refuses, exit 2, what would break the signing string's lines or the"
     .. " header's quoting, before printing anything", function()
    -- they were signed: a nonce "a\nb" made a six-line string, and a
    -- '"' ended the Authorization's nonce_str="..." early
    for _, c in ipairs({ { "GET\nX" }, { "POST", "a\nb" }, { "POST", 'a"b' },
                         { "POST", "a b" }, { "POST", "" },
                         { "POST", nil, "/v3/a\r\nX: y" } }) do
      local code, out, warns, sig = sign(c[1], nil, nil, c[2], c[3])
      assert.equal(2, code, out)
      assert.is_nil(sig, out)
      assert.equal(0, #warns, out)
      assert.matches("paygate sign: %-%-%a+ ", out)
    end
    -- a space in the URL is still the warning it was, and signed
    local code, out, warns, sig = sign("GET", nil, nil, nil, "/v3/a b")
    assert.equal(0, code, out)
    assert.equal("url", warns[1].kind, out)
    assert.truthy(sig, out)
  end)

  it("nothing for a timestamp in seconds", function()
    local code, out, _, _, fails = sign("POST", '{"a":1}', "1700000000")
    assert.equal(0, code, out)
    assert.equal(0, #fails, out)
  end)
end)

describe("paygate sign and doctor name an encrypted key", function()
  it("in the PKCS#8 and in the older OpenSSL PEM form", function()
    local forms = {
      { "p8", "openssl pkcs8 -topk8 -in %s -out %s -passout pass:secret" },
      { "trad", "openssl rsa -in %s -aes256 -traditional -passout "
                .. "pass:secret -out %s" },
    }
    for _, f in ipairs(forms) do
      local path = dir .. "/enc_" .. f[1] .. ".key"
      assert(os.execute(f[2]:format(pki.merchant_key, path)
                        .. " >/dev/null 2>&1") == 0)
      local code, out = diagpki.run(dir, { "sign", "--method", "GET",
        "--url", "/v3/certificates", "--mchid", "1900000001", "--serial",
        "5F1C72E2A8931B72A2E13AF8DEE92471EB397115", "--key", path })
      assert.equal(2, code, out)
      assert.matches("holds an ENCRYPTED private key: decrypt it first",
                     out, 1, true)
      local conf = dir .. "/enc_" .. f[1] .. ".lua"
      diagpki.write(conf, ("return { wechatpay = { mchid = \"1900000001\", "
        .. "merchant_private_key = %q, merchant_certificate = %q, "
        .. "apiv3_key = %q, platform_certificates = { %q }, base_url = "
        .. "\"http://127.0.0.1:9\" } }"):format(path, pki.merchant,
        ("k"):rep(32), pki.platform))
      local _, dout, r = diagpki.run(dir, { "doctor", "--json", "--config",
                                            conf })
      assert.equal("merchant_key", r[1].kind, dout)
      assert.equal("fail", r[1].status, dout)
      assert.matches("encrypted with a passphrase", r[1].fix, 1, true)
    end
  end)
end)

-- an SM2 key was refused without --sm2 ("the key is SM2; ... add --sm2")
-- while paygate certs --download takes the variant from the key: so does
-- sign now; --sm2 is still taken, and against an RSA key it is an error
-- naming both
describe("paygate sign takes the variant from the key", function()
  it("signs WECHATPAY2-SM2-WITH-SM3 with an SM2 key, --sm2 or not, and"
     .. " refuses --sm2 with an RSA key", function()
    local sm2 = dir .. "/sm2.key"
    assert(os.execute("openssl genpkey -algorithm SM2 -out " .. sm2
                      .. " 2>/dev/null"))
    local key = assert(crypto.private_key(diagpki.read(sm2)))
    local want = 'POST\n/v3/pay/transactions/jsapi\n1700000000\nABC\n'
                 .. '{"a":1}\n'
    for _, more in ipairs({ {}, { "--sm2" } }) do
      local code, out, warns, sig, fails = sign("POST", '{"a":1}', nil, nil,
                                                nil, sm2, more)
      assert.equal(0, code, out)
      assert.equal(0, #warns + #fails, out)
      assert.equal("signed with WECHATPAY2-SM2-WITH-SM3", sig.cause, out)
      assert.equal(want, sig.signing_string)
      assert.matches('^WECHATPAY2%-SM2%-WITH%-SM3 mchid="1900000001",',
                     sig.authorization)
      -- the signature is the key's, over that string (SM2 with SM3)
      local b64 = sig.authorization:match('signature="([^"]+)"')
      assert.is_true(crypto.verify(key, want,
                                   crypto.base64_decode(b64)), out)
    end
    -- an RSA key: RSA without the flag (as ever), refused with it
    local code, out, _, sig = sign("POST", '{"a":1}')
    assert.equal(0, code, out)
    assert.equal("signed with WECHATPAY2-SHA256-RSA2048", sig.cause, out)
    local fails
    code, out, _, sig, fails = sign("POST", '{"a":1}', nil, nil, nil, nil,
                                    { "--sm2" })
    assert.equal(1, code, out)
    assert.is_nil(sig, out)
    assert.equal(1, #fails, out)
    assert.equal("key", fails[1].kind, out)
    assert.matches("--sm2 asks for WECHATPAY2-SM2-WITH-SM3", fails[1].cause,
                   1, true)
    assert.matches("the key is RSA", fails[1].cause, 1, true)
    assert.matches("drop --sm2", fails[1].fix, 1, true)
  end)
end)
