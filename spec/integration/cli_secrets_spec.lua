-- The diagnostic commands never print a secret, even when a merchant
-- passes the secret itself where a file path belongs (--key "$(cat
-- key.pem)", the APIv3 key as --apiv3-key-file, a base64 key without its
-- BEGIN/END lines in doctor's configuration, an APIv3 key pasted as
-- merchant_serial). Text and --json output are both checked.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local server = require "support.server"
local proc = require "support.proc"
local diagpki = require "support.diagpki"

local dir, pki
local write, read = diagpki.write, diagpki.read
local APIV3 = "a7cde1f3b9e2d4c6a8b0e2f4a6c8e0b2"

local function run(args)
  local code, out = diagpki.run(dir, args, 60)
  return code, out
end

-- the secret's base64 lines (what a partial echo would show)
local function pieces(secret)
  local l = { secret }
  for line in secret:gmatch("[^\n]+") do
    if not line:find("-----", 1, true) and #line >= 16 then
      l[#l + 1] = line:sub(1, 16)
    end
  end
  return l
end

local function assert_hidden(secret, out)
  for _, p in ipairs(pieces(secret)) do
    assert.is_nil(out:find(p, 1, true), "secret printed:\n" .. out)
  end
end

setup(function()
  dir = server.tmpdir()
  pki = diagpki.make(dir)
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("the diagnostic commands with a secret in place of a path", function()
  for _, json in ipairs({ false, true }) do
    local mode = json and " (--json)" or ""
    local function args(l)
      if json then table.insert(l, 2, "--json") end
      return l
    end

    it("sign --key PEM_TEXT exits 2 without printing the key" .. mode,
       function()
      local pem = read(pki.merchant_key)
      local code, out = run(args{ "sign", "--method", "GET", "--url",
        "/v3/certificates", "--mchid", "1900000001", "--serial",
        "ABCDEF", "--key", pem })
      assert.equal(2, code, out)
      assert.matches("%-%-key is not a readable file %(value not shown%)", out)
      assert_hidden(pem, out)
    end)

    it("decrypt --apiv3-key-file KEY exits 2 without printing it" .. mode,
       function()
      write(dir .. "/res.json", '{"algorithm":"AEAD_AES_256_GCM",'
            .. '"nonce":"abc","ciphertext":"AAAA"}')
      local code, out = run(args{ "decrypt", "--apiv3-key-file", APIV3,
                                  "--resource", dir .. "/res.json" })
      assert.equal(2, code, out)
      assert.matches("value not shown", out)
      assert_hidden(APIV3, out)
    end)

    it("certs --download with the keys as values prints neither" .. mode,
       function()
      local pem = read(pki.merchant_key)
      for _, a in ipairs({ { APIV3, pki.merchant_key }, { dir .. "/none",
                           pem } }) do
        local code, out = run(args{ "certs", "--download",
          "http://127.0.0.1:" .. core.free_port(), "--mchid", "1900000001",
          "--serial", "ABCDEF", "--apiv3-key-file", a[1], "--key", a[2],
          "--out", dir .. "/dl" })
        assert.equal(2, code, out)
        assert_hidden(APIV3, out)
        assert_hidden(pem, out)
      end
    end)

    it("verify --certificate PRIVATE_KEY_TEXT does not print it" .. mode,
       function()
      local pem = read(pki.merchant_key)
      write(dir .. "/b", "{}")
      local code, out = run(args{ "verify", "--body", dir .. "/b", "-H",
        "Wechatpay-Serial: 1", "--certificate", pem })
      assert.equal(2, code, out)
      assert_hidden(pem, out)
    end)

    it("verify --headers given a key file or an env file does not print "
       .. "the key, nor binary bytes" .. mode, function()
      write(dir .. "/b", "{}")
      for _, c in ipairs({ { APIV3 .. "\n", APIV3 },
                           { "WECHATPAY_APIV3_KEY=" .. APIV3 .. "\n", APIV3 },
                           { "\0\1\255\254 junk\27[2J", "\27" } }) do
        write(dir .. "/h", c[1])
        local code, out = run(args{ "verify", "--body", dir .. "/b",
          "--headers", dir .. "/h", "--certificate", pki.platform })
        assert.equal(2, code, out)
        assert.matches("line 1", out, 1, true)
        assert.is_nil(out:find(c[2], 1, true), "printed:\n" .. out)
      end
      -- a header line that lost its colon is still shown, to be fixed
      write(dir .. "/h", "Wechatpay-Nonce: n\nWechatpay-Serial 5F1C\n")
      local code, out = run(args{ "verify", "--body", dir .. "/b",
        "--headers", dir .. "/h", "--certificate", pki.platform })
      assert.equal(2, code, out)
      assert.matches("line 2: not a `Name: value` line: Wechatpay-Serial 5F1C",
                     out, 1, true)
    end)

    it("doctor prints no configured secret" .. mode, function()
      local pem = read(pki.merchant_key)
      local b64 = pem:gsub("%-%-%-%-%-[^\n]*%-%-%-%-%-\n?", ""):gsub("\n", "")
      local port = core.free_port()
      for _, wc in ipairs({
        -- the key as base64 without its BEGIN/END lines
        { merchant_private_key = b64, merchant_serial = "ABCDEF" },
        -- the APIv3 key pasted as the serial, and as the key path
        { merchant_private_key = APIV3, merchant_serial = APIV3 },
      }) do
        local path = dir .. "/doctor." .. crypto.random_nonce(6) .. ".lua"
        write(path, ("return { wechatpay = { mchid = '1900000001', "
          .. "merchant_private_key = %q, merchant_serial = %q, "
          .. "apiv3_key = %q, base_url = 'http://127.0.0.1:%d' }, "
          .. "notify_url = 'http://127.0.0.1:%d/notify' }"):format(
          wc.merchant_private_key, wc.merchant_serial, APIV3, port, port))
        local code, out = run(args{ "doctor", "--config", path })
        assert.equal(1, code, out)
        assert_hidden(pem, out)
        assert_hidden(b64, out)
        assert_hidden(APIV3, out)
        assert.matches("value not shown", out)
      end
    end)
  end
end)

describe("doctor's metrics_url", function()
  it("is shown without the password of its user info", function()
    local port = core.free_port()
    local path = dir .. "/metrics." .. crypto.random_nonce(6) .. ".lua"
    write(path, ("return { wechatpay = { mchid = '1900000001', "
      .. "merchant_private_key = %q, merchant_serial = 'ABCDEF', "
      .. "apiv3_key = %q, base_url = 'http://127.0.0.1:%d' }, "
      .. "notify_url = 'http://127.0.0.1:%d/notify', "
      .. "metrics_url = 'http://prom:Metr1csPw9@127.0.0.1:%d/metrics', "
      .. "leases = { n = { ttl = 10, route = 'POST /notify' } } }"):format(
      pki.merchant_key, APIV3, port, port, port))
    local code, out = run{ "doctor", "--config", path }
    assert.equal(1, code, out)
    assert.matches("no answer from http://prom@127.0.0.1:" .. port, out)
    assert.is_nil(out:find("Metr1csPw9", 1, true), out)
  end)
end)

describe("a config file that does not parse", function()
  -- Lua's syntax error quotes the token it stopped at: an unfinished
  -- string is the rest of its line, here the APIv3 key (or a store URL's
  -- password). The file and the line are named, never the token.
  it("is refused by doctor and by run without the token", function()
    for _, text in ipairs({
      "return { wechatpay = { mchid = '1900000001',\n apiv3_key = '"
        .. APIV3 .. ",\n merchant_serial = 'AB' } }\n",
      "return { wechatpay = { mchid = '1900000001', apiv3_key = 'x' '"
        .. APIV3 .. "' } }\n",
      "return { gateway = { db = \"postgres://gw:" .. APIV3
        .. "@127.0.0.1/gw } }\n",
    }) do
      local path = dir .. "/bad." .. crypto.random_nonce(6) .. ".lua"
      write(path, text)
      for _, argv in ipairs({ { "doctor", "--config", path },
          { "run", "examples/hello", "--config", path, "--listen",
            "127.0.0.1:" .. core.free_port(), "--admin", "off" } }) do
        local code, out = run(argv)
        assert.equal(2, code, out)
        assert.matches(path:gsub("%p", "%%%0") .. ":%d+:", out)
        assert_hidden(APIV3, out)
      end
    end
  end)
end)
