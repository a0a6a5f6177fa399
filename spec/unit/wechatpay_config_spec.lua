-- wechatpay.client(conf): every configuration failure is invalid_config
-- and names its key; keys are taken as paths or PEM text.
local wechatpay = require "paygate.wechatpay"
local config = require "paygate.wechatpay.config"
local core = require "paygate.core"
local wxtest = require "support.wxtest"

local FIX = "spec/fixtures/wechatpay/"
local read = wxtest.fixture
local APIV3 = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb"
local PUB_ID = "PUB_KEY_ID_0114232134912410000000000000000001"

-- public-key mode: no network at all. In over, NIL removes a key.
local NIL = {}
local function base(over)
  local c = { mchid = "1234567891", merchant_private_key = FIX .. "a3_merchant_key.pem",
    merchant_serial = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115",
    apiv3_key = APIV3, public_key = FIX .. "a7_platform_pubkey.pem",
    public_key_id = PUB_ID, base_url = "http://127.0.0.1:1" }
  for k, v in pairs(over or {}) do
    if v == NIL then c[k] = nil else c[k] = v end
  end
  return c
end

local function refused(over, key, pattern)
  local wx, err = wechatpay.client(base(over))
  assert.is_nil(wx)
  assert.is_true(core.is_error(err))
  assert.equal("invalid_config", err.kind)
  assert.equal(key, err.key)
  if pattern then assert.matches(pattern, err.message) end
  -- never the key material
  assert.is_nil(err.message:find(APIV3, 1, true))
  assert.is_nil(err.message:find("PRIVATE KEY", 1, true))
  return err
end

describe("wechatpay.client configuration", function()
  it("refuses a non-table", function()
    local _, err = wechatpay.client("x")
    assert.equal("invalid_config", err.kind)
    -- nil: most likely the config file's wechatpay table is missing
    _, err = wechatpay.client(nil)
    assert.equal("invalid_config", err.kind)
    assert.matches("got nil: is the config file's wechatpay table missing?",
                   err.message, 1, true)
  end)
  it("refuses a key it does not know, naming the one meant", function()
    -- a typo would otherwise keep the default without a word
    refused({ timout = 5 }, "timout", "unknown key %(did you mean timeout%?%)")
    refused({ apiv3_key_file = "/k" }, "apiv3_key_file",
            "the client takes apiv3_key")
    refused({ frobnicate = true }, "frobnicate", "unknown key$")
    refused({ [1] = "x" }, "?", "not a plain name")
    -- every key the documentation lists is known
    local f = assert(io.open("docs/wechatpay.md", "rb"))
    local doc = f:read("*a")
    f:close()
    for k in pairs(config.KNOWN) do
      assert.truthy(doc:find("`" .. k .. "`", 1, true), k .. " in the docs")
    end
  end)
  it("mchid must be digits", function()
    refused({ mchid = "19000x" }, "mchid")
    refused({ mchid = NIL }, "mchid")
  end)
  it("sp_mchid is partner mode; not both", function()
    local wx = assert(wechatpay.client(base{ mchid = NIL, sp_mchid = "1900000100" }))
    assert.is_true(wx.conf.partner)
    assert.equal("1900000100", wx.conf.signer.mchid)
    refused({ sp_mchid = "1900000100" }, "mchid")
  end)
  it("the private key: path or PEM text; unreadable or wrong is refused",
     function()
    assert(wechatpay.client(base{ merchant_private_key = read("a3_merchant_key.pem") }))
    refused({ merchant_private_key = "/nonexistent/key.pem" },
            "merchant_private_key", "cannot read")
    -- a certificate where the key belongs is named as such (as paygate
    -- doctor names it), given as text or as a file
    for _, v in ipairs({ read("a4_merchant_cert.pem"),
                         FIX .. "a4_merchant_cert.pem" }) do
      local err = refused({ merchant_private_key = v },
                          "merchant_private_key")
      assert.equal("wechatpay.merchant_private_key: cannot load the private"
        .. " key (malformed): this is a certificate, not a private key:"
        .. " point merchant_private_key at apiclient_key.pem", err.message)
    end
    -- PEM text that is not a key: the fallback advice, nothing of the text
    local err = refused({ merchant_private_key = "-----BEGIN PRIVATE KEY-----"
      .. "\nQUJD\n-----END PRIVATE KEY-----\n" }, "merchant_private_key")
    local tail = "): use apiclient_key.pem as downloaded (PKCS#8 PEM)"
    assert.equal(tail, err.message:sub(-#tail))
    assert.is_nil(err.message:find("QUJD", 1, true))
    refused({ merchant_private_key = NIL }, "merchant_private_key",
            "is required %(a file path or PEM text%)")
  end)
  it("a key or certificate file that is a folder, a device, a FIFO, empty"
     .. " or past 1 MiB is refused unread, its path not shown", function()
    -- before: a 2 MiB file was read whole (then "cannot load the private
    -- key"), /dev/null read as an empty file and a FIFO's open waited for a
    -- writer (so it comes last)
    local dir = os.tmpname()
    os.remove(dir)
    assert(core.mkdir_p(dir .. "/folder"))
    local f = assert(io.open(dir .. "/big.pem", "wb"))
    f:write(("k"):rep(2 * 1048576))
    f:close()
    f = assert(io.open(dir .. "/empty.pem", "wb"))
    f:close()
    local function no_path(err)
      assert.is_nil(err.message:find(dir, 1, true), err.message)
    end
    no_path(refused({ merchant_private_key = dir .. "/big.pem" },
                    "merchant_private_key",
                    ": the file is over 1048576 bytes$"))
    local special = "not a regular file %(a FIFO, a socket or a device%)"
    no_path(refused({ public_key = "/dev/null" }, "public_key",
                    ": cannot read the file %(" .. special .. "%)$"))
    no_path(refused({ merchant_private_key = dir .. "/folder" },
                    "merchant_private_key",
                    ": cannot read the file %(Is a directory%)$"))
    no_path(refused({ merchant_private_key = dir .. "/empty.pem" },
                    "merchant_private_key", ": the file is empty$"))
    assert(os.execute("mkfifo " .. dir .. "/fifo") == 0)
    no_path(refused({ platform_certificates = { dir .. "/fifo" } },
                    "platform_certificates",
                    ": entry 1: cannot read the file %(" .. special .. "%)$"))
    os.execute("rm -rf " .. dir)
  end)

  it("the private key must match the merchant certificate", function()
    local wx = assert(wechatpay.client(base{ merchant_serial = NIL,
      merchant_certificate = FIX .. "a4_merchant_cert.pem" }))
    assert.equal("5F1C72E2A8931B72A2E13AF8DEE92471EB397115", wx.conf.merchant_serial)
    refused({ merchant_private_key = FIX .. "a1_merchant_key.pem",
              merchant_certificate = FIX .. "a4_merchant_cert.pem" },
            "merchant_private_key", "does not match")
    refused({ merchant_serial = "ABCDEF",
              merchant_certificate = FIX .. "a4_merchant_cert.pem" },
            "merchant_serial")
  end)
  it("the merchant serial is hex and not a platform serial", function()
    refused({ merchant_serial = "5F1C-72E2" }, "merchant_serial", "hex")
    refused({ merchant_serial = NIL }, "merchant_serial")
    local gcert = FIX .. "a9_go_platform_cert.pem"
    refused({ merchant_serial = "D7CE59D1F522D701",
              platform_certificates = { gcert },
              merchant_private_key = FIX .. "a8_go_key.pem" }, "merchant_serial",
            "platform")
    -- a platform serial is a number: the merchant serial written without
    -- its leading zero (as Java's BigInteger prints it), or with more, is
    -- that platform serial still
    local z = os.tmpname()
    assert(os.execute(("openssl req -x509 -new -key %s -out %s -days 365 "
      .. "-set_serial 0x0A1E989910B253E069A11568C91C57CA44568101 "
      .. "-subj '/CN=Tenpay.com sign' >/dev/null 2>&1")
      :format(FIX .. "a5_platform_key.pem", z)))
    for _, s in ipairs({ "0A1E989910B253E069A11568C91C57CA44568101",
                         "A1E989910B253E069A11568C91C57CA44568101",
                         "000a1e989910b253e069a11568c91c57ca44568101" }) do
      refused({ merchant_serial = s, platform_certificates = { z } },
              "merchant_serial", "platform")
    end
    os.remove(z)
    -- lower case is accepted and sent upper case
    local wx = assert(wechatpay.client(base{
      merchant_serial = "5f1c72e2a8931b72a2e13af8dee92471eb397115" }))
    assert.equal("5F1C72E2A8931B72A2E13AF8DEE92471EB397115", wx.conf.signer.serial)
  end)
  it("says the APIv3 key is required when there is none", function()
    -- (os.getenv of an unset variable gives nil; false, a key removed)
    -- the message said "must be exactly 32 bytes", as for a key too short
    for _, v in ipairs({ NIL, false }) do
      local err = refused({ apiv3_key = v }, "apiv3_key",
                          "^wechatpay%.apiv3_key: is required ")
      assert.matches("got " .. (v == false and "false" or "nil"),
                     err.message, 1, true)
      assert.matches("file or an environment variable", err.message, 1,
                     true)
      assert.not_matches("must be exactly", err.message, 1, true)
    end
    refused({ apiv3_key = "" }, "apiv3_key", "is empty")
    refused({ apiv3_key = 12345 }, "apiv3_key", "got a number")
  end)
  it("the APIv3 key is exactly 32 bytes", function()
    refused({ apiv3_key = "short" }, "apiv3_key", "32")
    refused({ apiv3_key = APIV3 .. "x" }, "apiv3_key")
    refused({ previous_apiv3_keys = { "short" } }, "previous_apiv3_keys")
  end)
  it("key_names: how the owner's config names the APIv3 keys", function()
    -- default: the client's own keys
    local wx = assert(wechatpay.client(base()))
    assert.same({ apiv3_key = "apiv3_key",
                  previous_apiv3_keys = "previous_apiv3_keys",
                  state_dir = "state_dir" },
                wx.conf.key_names)
    wx = assert(wechatpay.client(base{ key_names = {
      apiv3_key = "merchants[2].apiv3_key_file",
      state_dir = "merchants[2].state_dir" } }))
    assert.same({ apiv3_key = "merchants[2].apiv3_key_file",
                  previous_apiv3_keys = "previous_apiv3_keys",
                  state_dir = "merchants[2].state_dir" },
                wx.conf.key_names)
    refused({ key_names = "apiv3_key_file" }, "key_names", "must be a table")
    -- its own keys are checked as the client's are
    refused({ key_names = { apiv3_keys = "x" } }, "key_names",
            "unknown key apiv3_keys %(did you mean apiv3_key%?%)")
    refused({ key_names = { apiv3_key = "" } }, "key_names")
    refused({ key_names = { apiv3_key = "a\nb" } }, "key_names")
    refused({ key_names = { apiv3_key = 1 } }, "key_names")
    -- the key itself where its name belongs: refused, never repeated
    -- (refused checks that the message does not hold it)
    refused({ key_names = { apiv3_key = APIV3 } }, "key_names",
            "holds an APIv3 key")
    local old = "OLDKEY0123456789abcdef0123456789"
    local err = refused({ previous_apiv3_keys = { old },
      key_names = { previous_apiv3_keys = "file:" .. old } }, "key_names",
      "holds an APIv3 key")
    assert.is_nil(err.message:find(old, 1, true))
    -- previous_apiv3_keys false: no place for previous keys (a command's
    -- one key option); false for another name is no name
    wx = assert(wechatpay.client(base{ key_names = {
      apiv3_key = "--apiv3-key-file", previous_apiv3_keys = false } }))
    assert.is_false(wx.conf.key_names.previous_apiv3_keys)
    refused({ key_names = { apiv3_key = false } }, "key_names",
            "must be the name of a config key")
    refused({ key_names = { state_dir = false } }, "key_names")
  end)
  it("the base URL is https, or http only for loopback", function()
    refused({ base_url = "http://api.mch.weixin.qq.com" }, "base_url", "https")
    refused({ base_url = "ftp://x" }, "base_url")
    refused({ base_url = "https://x/v3" }, "base_url")
    -- each message names what is wrong: a path is a path (http:// to a
    -- loopback address is no fault), a scheme a scheme
    local function says(over, key, want)
      local err = refused(over, key)
      assert.equal("wechatpay." .. key .. ": " .. want, err.message)
    end
    local PATH = "): give scheme, host and port only (https://host[:port];"
                 .. " the client adds /v3/...)"
    local SCHEME = "must be https:// (http:// only for a loopback address"
                   .. " such as the simulator's)"
    says({ base_url = "http://127.0.0.1:18490/v3" }, "base_url",
         "has a path (/v3" .. PATH)
    says({ base_url = "https://api.mch.weixin.qq.com/v3/" }, "base_url",
         "has a path (/v3" .. PATH)
    says({ base_url = "http://[::1]/v3/pay" }, "base_url",
         "has a path (/v3/pay" .. PATH)
    says({ backup_url = "https://api2.mch.weixin.qq.com:443/v3" },
         "backup_url", "has a path (/v3" .. PATH)
    says({ base_url = "http://api.mch.weixin.qq.com" }, "base_url", SCHEME)
    says({ base_url = "ftp://x" }, "base_url", SCHEME .. ", then host[:port]")
    says({ base_url = "api.mch.weixin.qq.com" }, "base_url",
         SCHEME .. ", then host[:port]")
    says({ base_url = "https://api.mch.weixin.qq.com?x=1" }, "base_url",
         "must be https://host[:port]: a host name or address, then :port"
         .. " if any, and nothing after (no query, fragment or user info)")
    -- user info is never repeated, even before a path
    local err = refused({ base_url = "https://u:pw9@h.example/v3" },
                        "base_url")
    assert.is_nil(err.message:find("pw9", 1, true))
    -- a query, a fragment or a stray byte after the host would be glued
    -- to every path ("https://h?x=1/v3/pay/...": all requests to "/")
    refused({ base_url = "https://api.mch.weixin.qq.com?x=1" }, "base_url")
    refused({ base_url = "https://api.mch.weixin.qq.com#a" }, "base_url")
    refused({ base_url = "https://api.mch weixin.qq.com" }, "base_url")
    refused({ base_url = "https://api.mch.weixin.qq.com:" }, "base_url")
    refused({ base_url = "https://api.mch.weixin.qq.com:x" }, "base_url")
    refused({ base_url = "http://127.0.0.1:1?x" }, "base_url")
    refused({ backup_url = "https://api2.mch.weixin.qq.com?x=1" },
            "backup_url")
    assert(wechatpay.client(base{ base_url = "https://api.mch.weixin.qq.com/" }))
    assert(wechatpay.client(base{ base_url = "https://api.mch.weixin.qq.com:443" }))
    assert(wechatpay.client(base{ base_url = "http://localhost:8080" }))
    assert(wechatpay.client(base{ base_url = "http://[::1]:8080" }))
  end)
  it("ca_file names a readable file of CA certificates", function()
    -- (a path that was none was taken: every HTTPS call failed on TLS)
    refused({ ca_file = "/nonexistent/ca.pem" }, "ca_file", "cannot open")
    refused({ ca_file = "spec/fixtures" }, "ca_file", "PEM")
    refused({ ca_file = FIX .. "a11_cert_ciphertext.txt" }, "ca_file", "PEM")
    local wx = assert(wechatpay.client(base{ ca_file = FIX
                                             .. "a6_platform_cert.pem" }))
    assert.equal(FIX .. "a6_platform_cert.pem", wx.conf.ca_file)
  end)
  -- pem_file read ca_file with io.open + read(1 MiB): a FIFO's open
  -- waited for a writer (the client's check, and the gateway's start with
  -- a webhook's ca_file, held for good), /dev/null read as a file of no
  -- PEM, and a 2 MiB file was taken for the PEM in its first MiB. It now
  -- reads it as paygate.read_file does: refused unread, saying why.
  it("ca_file that is a FIFO, a device, a folder, empty or past 1 MiB is"
     .. " refused unread, saying why", function()
    local proc = require "support.proc"
    local dir = os.tmpname()
    os.remove(dir)
    assert(core.mkdir_p(dir .. "/folder"))
    local pem = read("a6_platform_cert.pem")
    local f = assert(io.open(dir .. "/big.pem", "wb"))
    f:write(pem, ("x"):rep(1048576 - #pem + 1))
    f:close()
    f = assert(io.open(dir .. "/empty.pem", "wb"))
    f:close()
    local MSG = "must name a readable file of CA certificates %(PEM%) %("
    local function no_path(err)
      assert.is_nil(err.message:find(dir, 1, true), err.message)
    end
    no_path(refused({ ca_file = dir .. "/big.pem" }, "ca_file",
                    MSG .. "the file is over 1048576 bytes%)$"))
    no_path(refused({ ca_file = "/dev/null" }, "ca_file", MSG .. "not a"
                    .. " regular file %(a FIFO, a socket or a device%)%)$"))
    no_path(refused({ ca_file = dir .. "/folder" }, "ca_file",
                    MSG .. "Is a directory%)$"))
    no_path(refused({ ca_file = dir .. "/empty.pem" }, "ca_file",
                    MSG .. "the file is empty%)$"))
    no_path(refused({ ca_file = dir .. "/none.pem" }, "ca_file",
                    MSG .. "cannot open it: No such file or directory%)$"))
    -- a FIFO in another process, waited on with a deadline (before, the
    -- check never returned)
    assert(os.execute("mkfifo " .. dir .. "/fifo") == 0)
    local script, log = dir .. "/fifo.lua", dir .. "/fifo.out"
    f = assert(io.open(script, "w"))
    f:write(("local ok, why = require('paygate.wechatpay.config')"
             .. ".pem_file(%q)\nio.write(tostring(ok), ' ', tostring(why))\n")
            :format(dir .. "/fifo"))
    f:close()
    local p = proc.spawn({ PAYGATE_BIN, "exec", script }, { log = log })
    local code = p:wait(20)
    if code == nil then p:kill(proc.SIGKILL); p:wait(2) end
    local out = proc.read(log)
    os.execute("rm -rf " .. dir)
    assert.equal(0, code, out)              -- (nil: it waited on the FIFO)
    assert.equal("false not a regular file (a FIFO, a socket or a device)",
                 out)
  end)
  it("the default base URL brings the backup domain", function()
    local wx = assert(wechatpay.client(base{ base_url = NIL }))
    assert.equal("https://api.mch.weixin.qq.com", wx.conf.base_url)
    assert.equal("https://api2.mch.weixin.qq.com", wx.conf.backup_url)
  end)
  it("public_key and public_key_id go together; the id has its prefix",
     function()
    refused({ public_key_id = NIL }, "public_key_id")
    refused({ public_key_id = "12345" }, "public_key_id", "PUB_KEY_ID_")
    refused({ public_key = FIX .. "a4_merchant_cert.pem" }, "public_key")
  end)
  it("certificate-only with download off needs certificates", function()
    refused({ public_key = NIL, public_key_id = NIL,
              download_certificates = false }, "platform_certificates")
  end)
  it("the SM variant needs an SM2 key", function()
    refused({ sign_type = "WECHATPAY2-SM2-WITH-SM3" }, "merchant_private_key",
            "SM2")
    refused({ sign_type = "HMAC" }, "sign_type")
    local wx = assert(wechatpay.client(base{ sign_type = "WECHATPAY2-SM2-WITH-SM3",
      merchant_private_key = FIX .. "a10a_sm2_key.pem",
      merchant_serial = NIL, merchant_certificate = FIX .. "a10b_sm2_cert.pem",
      public_key = NIL, public_key_id = NIL,
      platform_certificates = { FIX .. "a10c_sm2_platform_cert.pem" },
      download_certificates = false }))
    assert.is_true(wx.conf.sm)
    refused({ public_key = FIX .. "a7_platform_pubkey.pem",
              sign_type = "WECHATPAY2-SM2-WITH-SM3",
              merchant_private_key = FIX .. "a10a_sm2_key.pem" }, "public_key")
  end)
  it("appid / sp_appid are kept, checked, and fit the mode", function()
    local wx = assert(wechatpay.client(base{ appid = "wx2421b1c4370ec43b" }))
    assert.equal("wx2421b1c4370ec43b", wx.conf.appid)
    wx:stop()
    wx = assert(wechatpay.client(base{ mchid = NIL, sp_mchid = "1900000100",
                                       sp_appid = "wx8888888888888888" }))
    assert.equal("wx8888888888888888", wx.conf.sp_appid)
    wx:stop()
    refused({ appid = "wx 1" }, "appid")
    refused({ appid = 12 }, "appid")
    refused({ appid = ("w"):rep(33) }, "appid")
    refused({ sp_appid = "wx8888888888888888" }, "sp_appid")
    refused({ mchid = NIL, sp_mchid = "1900000100", appid = "wx1" }, "appid")
  end)
  -- An SM merchant's SM2 key under the default sign_type is a sign_type
  -- left out far more often than a wrong key: the message said only that
  -- RSA needs an RSA key, and doctor's fix pointed at the key.
  it("a key of the other variant names the sign_type that takes it",
     function()
    local err = refused({ merchant_private_key = FIX .. "a10a_sm2_key.pem" },
                        "merchant_private_key")
    assert.matches("is an SM2 key; sign_type WECHATPAY2-SHA256-RSA2048 (the "
      .. "default) needs an RSA key", err.message, 1, true)
    assert.matches('a merchant of the national-crypto variant sets sign_type'
      .. ' = "WECHATPAY2-SM2-WITH-SM3"', err.message, 1, true)
    err = refused({ sign_type = "WECHATPAY2-SM2-WITH-SM3" },
                  "merchant_private_key")
    assert.matches("is an RSA key; sign_type WECHATPAY2-SM2-WITH-SM3 needs "
      .. "an SM2 key", err.message, 1, true)
    assert.matches("an RSA merchant leaves sign_type out", err.message, 1,
                   true)
  end)
  -- the test kit's clients at "warn": their info lines showed on a
  -- spec's stderr as if the app under test had logged them
  it("log_level: the client's own lines below it are not logged",
     function()
    local paygate = require "paygate"
    local real, said = paygate.log, {}
    local fake = {}
    for _, l in ipairs({ "debug", "info", "warn", "error" }) do
      fake[l] = function(msg) said[#said + 1] = l .. " " .. msg end
    end
    paygate.log = fake
    finally(function() paygate.log = real end)
    local wx = assert(wechatpay.client(base{ log_level = "warn" }))
    wx:stop()
    local log = config.logger(wx.conf)
    log.debug("a") log.info("b") log.warn("c") log.error("d")
    assert.same({ "warn c", "error d" }, said)
    -- none given: paygate.log itself, the runtime's --log-level alone
    wx = assert(wechatpay.client(base()))
    wx:stop()
    assert.equal(fake, config.logger(wx.conf))
    paygate.log = real
    refused({ log_level = "quiet" }, "log_level",
            'must be "debug", "info", "warn" or "error"')
    refused({ log_level = 2 }, "log_level")
  end)
  it("appids / sp_appids list the other appids a client may name",
     function()
    -- an official account's appid (the default) and an App's
    local wx = assert(wechatpay.client(base{ appid = "wx2421b1c4370ec43b",
      appids = { "wxd678efh567hg6787" } }))
    assert.same({ wx2421b1c4370ec43b = true, wxd678efh567hg6787 = true },
                wx.conf.appids)
    wx:stop()
    -- without a default: every call names one of the list
    wx = assert(wechatpay.client(base{ appids = { "wxd678efh567hg6787" } }))
    assert.is_nil(wx.conf.appid)
    assert.same({ wxd678efh567hg6787 = true }, wx.conf.appids)
    wx:stop()
    wx = assert(wechatpay.client(base{ mchid = NIL, sp_mchid = "1900000100",
      sp_appid = "wx8888888888888888", sp_appids = { "wx9999999999999999" } }))
    assert.same({ wx8888888888888888 = true, wx9999999999999999 = true },
                wx.conf.appids)
    wx:stop()
    wx = assert(wechatpay.client(base{ appid = "wx2421b1c4370ec43b" }))
    assert.is_nil(wx.conf.appids)        -- none listed: the default alone
    wx:stop()
    local LIST = "^wechatpay%.appids: must be a non%-empty list of appids"
    refused({ appids = {} }, "appids", LIST)
    refused({ appids = "wxd678efh567hg6787" }, "appids", LIST)
    refused({ appids = { app = "wxd678efh567hg6787" } }, "appids", LIST)
    refused({ appids = { "wx1", nil, "wx3" } }, "appids", LIST)
    local err = refused({ appids = { "wx1", "" } }, "appids")
    assert.equal("wechatpay.appids: item 2 must be an appid (at most 32 "
                 .. "letters, digits, _ and -)", err.message)
    refused({ appids = { "wx1", 7 } }, "appids", "item 2 must be an appid")
    refused({ appids = { ("w"):rep(33) } }, "appids", "item 1 must be")
    refused({ appids = { "wx 1" } }, "appids", "item 1 must be")
    -- the other mode's list, as for the single key
    refused({ sp_appids = { "wx1" } }, "sp_appids",
            "a direct merchant gives appid, appids")
    refused({ mchid = NIL, sp_mchid = "1900000100", appids = { "wx1" } },
            "appids", "a service provider gives sp_appid, sp_appids")
  end)
  it("numbers must be positive", function()
    refused({ timeout = -1 }, "timeout")
    refused({ refresh_interval = "12h" }, "refresh_interval")
    -- not durations: inf kept an opened breaker open for good
    for _, k in ipairs({ "breaker_open_for", "refresh_interval", "timeout",
                         "deadline", "breaker_window", "timeout_ceiling" }) do
      refused({ [k] = math.huge }, k, "at most 1e8")
      refused({ [k] = 0 / 0 }, k)
      refused({ [k] = 2e8 }, k)
    end
    -- one attempt's timeout is the HTTP client's, at most a day: past it
    -- every call raised from paygate.http instead of answering
    for _, k in ipairs({ "timeout", "timeout_floor", "timeout_ceiling" }) do
      refused({ [k] = 86401 }, k, "at most 86400")
    end
    assert(wechatpay.client(base{ timeout = 86400, deadline = 1e5 }))
  end)
  it("the adaptive timeout's bounds default around the timeout", function()
    -- a timeout under a second: the floor follows it down
    local c = assert(wechatpay.client(base{ timeout = 0.5 })).conf
    assert.equal(0.5, c.timeout_floor)
    assert.equal(0.5, c.timeout_ceiling)
    c = assert(wechatpay.client(base{ timeout = 5 })).conf
    assert.equal(1, c.timeout_floor)
    assert.equal(5, c.timeout_ceiling)
    -- a floor given above the timeout: the ceiling is at least the floor
    c = assert(wechatpay.client(base{ timeout = 0.5, timeout_floor = 2 })).conf
    assert.equal(2, c.timeout_floor)
    assert.equal(2, c.timeout_ceiling)
    c = assert(wechatpay.client(base{ timeout = 0.5,
                                      timeout_ceiling = 0.8 })).conf
    assert.equal(0.5, c.timeout_floor)
    assert.equal(0.8, c.timeout_ceiling)
    -- a ceiling given under the timeout: the floor is at most the ceiling
    c = assert(wechatpay.client(base{ timeout = 0.5,
                                      timeout_ceiling = 0.3 })).conf
    assert.equal(0.3, c.timeout_floor)
    assert.equal(0.3, c.timeout_ceiling)
    -- both given and crossed: still refused
    refused({ timeout_floor = 3, timeout_ceiling = 2 }, "timeout_floor",
            "above timeout_ceiling")
  end)
  it("modes follow what is configured", function()
    assert.equal("public_key", assert(wechatpay.client(base())).conf.mode)
    local c = assert(config.check(base{ public_key = NIL, public_key_id = NIL }))
    assert.equal("certificate", c.mode)
    assert.is_true(c.download)
    -- the public key and certificates to download: either verifies
    for _, dl in ipairs{ true, "manual" } do
      c = assert(config.check(base{ download_certificates = dl }))
      assert.equal("migration", c.mode)
      assert.is_true(c.download)
    end
    c = assert(config.check(base{ download_certificates = false }))
    assert.equal("public_key", c.mode)
    assert.is_false(c.download)
  end)
  it("a platform_certificates entry with its CA uses the platform"
     .. " certificate only; a lone CA:TRUE certificate is used", function()
    -- a chain file (platform certificate + the CA that issued it): the CA
    -- outlives the leaf, and used as a platform certificate it would be
    -- the newest (sensitive fields encrypted to it, the expiry gauge on it)
    local dir = os.tmpname()
    os.remove(dir)
    assert(require("paygate").mkdir_p(dir))
    local function sh(cmd)
      local ok = os.execute(cmd .. " >/dev/null 2>&1")
      assert(ok == 0 or ok == true, cmd)
    end
    sh(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/ca.key -out"
        .. " %s/ca.pem -days 3650 -subj /CN=test-root -addext"
        .. " basicConstraints=critical,CA:TRUE"):format(dir, dir))
    sh(("openssl req -newkey rsa:2048 -nodes -keyout %s/p.key -out %s/p.csr"
        .. " -subj '/O=Tenpay.com/CN=Tenpay.com sign'"):format(dir, dir))
    local ext = io.open(dir .. "/p.ext", "w")
    ext:write("basicConstraints=critical,CA:FALSE\n")
    ext:close()
    sh(("openssl x509 -req -in %s/p.csr -CA %s/ca.pem -CAkey %s/ca.key"
        .. " -set_serial 4660 -days 400 -extfile %s/p.ext -out %s/p.pem")
       :format(dir, dir, dir, dir, dir))
    local function slurp(n)
      local f = assert(io.open(dir .. "/" .. n, "rb"))
      local t = f:read("*a")
      f:close()
      return t
    end
    local chain = slurp("p.pem") .. slurp("ca.pem")
    local ca_first = slurp("ca.pem") .. slurp("p.pem")
    local ca = slurp("ca.pem")
    os.execute("rm -rf " .. dir)
    local wx = assert(wechatpay.client(base{ public_key = NIL,
      public_key_id = NIL, download_certificates = false,
      platform_certificates = { chain } }))
    local st = wx:certificate_status()
    assert.same({ "1234" }, st.serials)
    assert.equal("1234", st.newest)
    assert.equal("1234", wx.ring:newest())
    -- the CA first in the file: the same
    wx = assert(wechatpay.client(base{ public_key = NIL,
      public_key_id = NIL, download_certificates = false,
      platform_certificates = { ca_first } }))
    assert.same({ "1234" }, wx:certificate_status().serials)
    -- alone, a self-signed CA:TRUE certificate is used (SDKs' test
    -- platform certificates are made so)
    wx = assert(wechatpay.client(base{ public_key = NIL,
      public_key_id = NIL, download_certificates = false,
      platform_certificates = { ca } }))
    local serials = wx:certificate_status().serials
    assert.equal(1, #serials)
    assert.not_equal("1234", serials[1])
  end)
  it("two clients never share keys", function()
    local a = assert(wechatpay.client(base()))
    local b = assert(wechatpay.client(base{ public_key_id = "PUB_KEY_ID_2" }))
    assert.is_nil(a.ring:get("PUB_KEY_ID_2"))
    assert.is_nil(b.ring:get(PUB_ID))
  end)
end)

describe("errors.KINDS", function()
  it("holds every kind the client's modules make", function()
    local kinds = {}
    for _, k in ipairs(require("paygate.wechatpay.errors").KINDS) do
      kinds[k] = true
    end
    local n = 0
    for _, name in ipairs(core.listdir("lua/paygate/wechatpay")) do
      if name:match("%.lua$") then
        local f = assert(io.open("lua/paygate/wechatpay/" .. name, "rb"))
        local src = f:read("*a")
        f:close()
        local pats = { "core%.error%(\"([%w_]+)\"", "errors%.new%(\"([%w_]+)\"",
                       "err_%(\"([%w_]+)\"", "errors%.wrap%(\"([%w_]+)\"" }
        if name == "notify.lua" or name == "verify.lua" then
          pats[#pats + 1] = "fail%(\"([%w_]+)\""
        end
        for _, pat in ipairs(pats) do
          for kind in src:gmatch(pat) do
            n = n + 1
            assert.is_true(kinds[kind], name .. " makes kind " .. kind
                           .. ", not in errors.KINDS")
          end
        end
      end
    end
    assert.is_true(n > 30)
  end)
end)

describe("docs/wechatpay.md", function()
  it("explains every error kind the client returns", function()
    local f = assert(io.open("docs/wechatpay.md"))
    local doc = f:read("*a")
    f:close()
    local section = doc:match("\n## Errors\n(.-)\n## ")
    assert.is_truthy(section)
    for _, kind in ipairs(require("paygate.wechatpay.errors").KINDS) do
      assert.is_truthy(section:find("`" .. kind .. "`", 1, true),
                       kind .. " is not in the Errors section")
    end
  end)
end)
