-- The simulator (examples/simulator) checks requests as WeChat Pay does and
-- signs its answers: driven over plain HTTP by spec/support/simclient.lua,
-- a client built from the protocol on paygate.crypto alone.
local crypto = require "paygate.crypto"
local server = require "support.server"
local proc = require "support.proc"
local sc = require "support.simclient"
local rawtcp = require "support.rawtcp"

describe("simulator: request authentication", function()
  local srv, c, keys

  setup(function()
    local dir = server.tmpdir()
    srv = server.start{ app = "examples/simulator",
                        config = sc.config(dir .. "/state", "workers = 1,") }
    c = sc.new{ base = "http://127.0.0.1:" .. srv.port }
    keys = c:platform_keys()
  end)

  teardown(function() if srv then srv:stop() end end)

  local function sign_error(res, field)
    assert.equal(401, res.status)
    assert.equal("SIGN_ERROR", res.json.code)
    assert.is_string(res.json.message)
    if field then assert.equal(field, res.json.detail.field) end
    -- errors carry no signature, but a Request-ID
    assert.is_nil(res.headers["wechatpay-signature"])
    assert.matches("^%x+%-%d+$", res.headers["request-id"])
  end

  it("refuses a request with no Authorization", function()
    local res = c:call("GET", "/v3/certificates", nil,
                       { headers = { Authorization = false } })
    sign_error(res)
  end)

  it("refuses a bad scheme", function()
    sign_error(c:call("GET", "/v3/certificates", nil,
                      { schema = "WECHATPAY2-SHA256-RSA4096" }), "schema")
  end)

  it("refuses an Authorization that does not parse", function()
    sign_error(c:call("GET", "/v3/certificates", nil,
      { headers = { Authorization = 'WECHATPAY2-SHA256-RSA2048 mchid=1' } }))
  end)

  it("refuses an unknown mchid", function()
    sign_error(c:call("GET", "/v3/certificates", nil, { mchid = "1111111" }),
               "mchid")
  end)

  it("refuses a timestamp more than 5 minutes off, either way", function()
    sign_error(c:call("GET", "/v3/certificates", nil,
                      { ts = tostring(os.time() - 310) }), "timestamp")
    sign_error(c:call("GET", "/v3/certificates", nil,
                      { ts = tostring(os.time() + 310) }), "timestamp")
  end)

  it("takes a timestamp exactly 5 minutes off (whole seconds), either way",
     function()
    -- WeChat's words: the timestamp may "not exceed" 5 minutes. Sent
    -- early in a second, so the server's clock reads the same second
    local core = require "paygate.core"
    for _, d in ipairs({ -300, 300 }) do
      while core.time() % 1 > 0.3 do core.sleep(0.05) end
      local res = c:call("GET", "/v3/certificates", nil,
                         { ts = tostring(math.floor(core.time()) + d) })
      assert.equal(200, res.status, res.body)
    end
  end)

  it("refuses a serial that is not one of the merchant's", function()
    sign_error(c:call("GET", "/v3/certificates", nil,
                      { serial = sc.SERIAL2 }), "serial_no")
  end)

  it("refuses a signature made with another key, echoing what it signed",
     function()
    local other = assert(crypto.private_key(sc.read(sc.FIX
                                                    .. "a1_merchant_key.pem")))
    local res = c:call("GET", "/v3/certificates?algorithm_type=RSA", nil,
                       { key = other })
    sign_error(res, "signature")
    local info = res.json.detail.sign_information
    assert.equal("GET", info.method)
    assert.equal("/v3/certificates?algorithm_type=RSA", info.url)
    assert.matches("^GET\n/v3/certificates%?algorithm_type=RSA\n%d+\n%w+\n\n$",
                   info.truncated_sign_message)
    assert.equal(#info.truncated_sign_message, info.sign_message_length)
  end)

  it("refuses a body changed after signing", function()
    local body = '{"mchid":"' .. sc.MCHID .. '"}'
    local res = c:call("POST",
      "/v3/pay/transactions/out-trade-no/auth-tamper-1/close", body,
      { tamper = '{"mchid":"' .. sc.MCHID .. '" }' })
    sign_error(res, "signature")
  end)

  it("refuses a query string changed after signing", function()
    local auth = c:authorization("GET", "/v3/certificates?algorithm_type=RSA")
    local res = c:call("GET", "/v3/certificates?algorithm_type=ALL", nil,
                       { headers = { Authorization = auth } })
    sign_error(res, "signature")
  end)

  it("takes a nonce_str of 1 to 64 bytes, refuses an empty or longer one",
     function()
    assert.equal(200, c:call("GET", "/v3/certificates", nil,
                             { nonce = ("n"):rep(64) }).status)
    sign_error(c:call("GET", "/v3/certificates", nil,
                      { nonce = ("m"):rep(65) }), "nonce_str")
    sign_error(c:call("GET", "/v3/certificates", nil, { nonce = "" }),
               "nonce_str")
  end)

  it("refuses a replayed request (the same nonce twice)", function()
    local auth = c:authorization("GET", "/v3/certificates")
    local res = c:call("GET", "/v3/certificates", nil,
                       { headers = { Authorization = auth } })
    assert.equal(200, res.status)
    res = c:call("GET", "/v3/certificates", nil,
                 { headers = { Authorization = auth } })
    sign_error(res, "nonce_str")
  end)

  it("wants Accept and User-Agent", function()
    -- raw bytes: an HTTP client library would add its own Accept
    for _, h in ipairs({ "Accept: */*\r\n", "User-Agent: raw/1\r\n" }) do
      local conn = rawtcp.connect(srv.port, 5)
      conn:send("GET /v3/certificates HTTP/1.1\r\nHost: x\r\n" .. h
        .. "Authorization: " .. c:authorization("GET", "/v3/certificates")
        .. "\r\nConnection: close\r\n\r\n")
      local resp = conn:recv_all()
      conn:close()
      assert.matches("^HTTP/1.1 400", resp)
      assert.matches('"code":"INVALID_REQUEST"', resp, 1, true)
      assert.matches("Http头缺少Accept或User-Agent", resp, 1, true)
    end
  end)

  it("accepts the parameters in any order and signs the answer", function()
    local res = c:call("GET", "/v3/certificates", nil, { reorder = true })
    assert.equal(200, res.status)
    assert.truthy(sc.verify(res, keys))
    assert.matches("^application/json", res.headers["content-type"])
    assert.matches("^%x+%-0$", res.headers["request-id"])
  end)

  it("checks the exact body bytes, a trailing newline included", function()
    -- the Go SDK sends (and signs) a newline after its JSON
    local body = '{"mchid":"' .. sc.MCHID .. '"}\n'
    local res = c:call("POST",
      "/v3/pay/transactions/out-trade-no/auth-newline-1/close", body)
    assert.equal(404, res.status)
    assert.equal("ORDER_NOT_EXIST", res.json.code)
  end)

  it("verifies a merchant configured by public key and serial", function()
    local c2 = sc.new{ base = c.base, mchid = sc.MCHID2, serial = sc.SERIAL2,
      key = assert(crypto.private_key(sc.read(sc.FIX
                                              .. "a1_merchant_key.pem"))) }
    local res = c2:call("GET", "/v3/certificates")
    assert.equal(200, res.status)
    assert.truthy(sc.verify(res, keys))
  end)

  it("keeps its platform keys across a restart", function()
    local dir = server.tmpdir()
    local conf = sc.config(dir .. "/state", "workers = 2,")
    local s1 = server.start{ app = "examples/simulator", config = conf }
    local c1 = sc.new{ base = "http://127.0.0.1:" .. s1.port }
    local k1, pub1 = c1:platform_keys()
    s1:stop()
    -- s1:stop removed its own folder, not the state dir given above
    local s2 = server.start{ app = "examples/simulator", config = conf }
    local c2 = sc.new{ base = "http://127.0.0.1:" .. s2.port }
    local k2, pub2 = c2:platform_keys()
    s2:stop()
    os.execute("rm -rf " .. dir)
    assert.equal(pub1, pub2)
    local n1, n2 = 0, 0
    for s in pairs(k1) do n1 = n1 + 1; assert.truthy(k2[s]) end
    for _ in pairs(k2) do n2 = n2 + 1 end
    assert.equal(n1, n2)
    assert.equal(2, n1)             -- one certificate, one public key
  end)
end)

describe("simulator: a merchant rotating its own certificate", function()
  it("accepts every certificate in merchant_certificates", function()
    local dir = server.tmpdir()
    -- a second certificate for the merchant, on another key
    local serial2 = "7A1B2C3D4E5F60718293A4B5C6D7E8F901234567"
    assert(os.execute(("openssl req -x509 -new -key %s -out %s/new.pem "
      .. "-days 2 -subj /CN=%s -set_serial 0x%s >/dev/null 2>&1"):format(
      sc.FIX .. "a1_merchant_key.pem", dir, sc.MCHID, serial2)))
    local conf = sc.config(dir .. "/state", "workers = 1,")
      :gsub('merchant_certificate = "([^"]+)"', function(p)
        return ('merchant_certificates = { %q, %q }'):format(p,
                                                            dir .. "/new.pem")
      end, 1)
    local s = server.start{ app = "examples/simulator", config = conf }
    local base = "http://127.0.0.1:" .. s.port
    local old = sc.new{ base = base }
    local new = sc.new{ base = base, serial = serial2,
      key = assert(crypto.private_key(sc.read(sc.FIX
                                              .. "a1_merchant_key.pem"))) }
    local r1 = old:call("GET", "/v3/certificates")
    local r2 = new:call("GET", "/v3/certificates")
    -- the new serial with the old key does not pass
    local r3 = new:call("GET", "/v3/certificates", nil, { key = old.key })
    s:stop()
    os.execute("rm -rf " .. dir)
    assert.equal(200, r1.status)
    assert.equal(200, r2.status)
    assert.equal(401, r3.status)
  end)
end)

describe("simulator: configuration", function()
  local function run(conf)
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write(conf)
    f:close()
    local p = proc.spawn({ PAYGATE_BIN, "run", "examples/simulator",
      "--listen", "127.0.0.1:" .. require("paygate.core").free_port(),
      "--admin", "off", "--workers", "1", "--config", dir .. "/c.lua" },
      { log = dir .. "/log" })
    local code = p:wait(30)
    local log = proc.read(dir .. "/log")
    os.execute("rm -rf " .. dir)
    return code, log
  end

  it("exits 2 naming an unknown key", function()
    local code, log = run(sc.config("/tmp/never-made", "colour = 'red',"))
    assert.equal(2, code)
    assert.matches("simulator: config%.colour: unknown key\n", log)
  end)

  it("exits 2 naming a bad value", function()
    local code, log = run(sc.config("/tmp/never-made",
                                    "verifier_mode = 'sometimes',"))
    assert.equal(2, code)
    assert.matches("config%.verifier_mode: must be", log)
    code, log = run((sc.config("/tmp/never-made"):gsub(sc.APIV3, "short")))
    assert.equal(2, code)
    assert.matches("config%.merchants%[1%]%.apiv3_key: must be the 32%-"
                   .. "character APIv3 key", log)
  end)

  it("exits 2 for a sub-merchant listed twice, or sub_merchants not an "
     .. "array", function()
    -- the second entry would silently replace the first's appids; keyed
    -- by mchid, ipairs saw none, and the provider had no sub-merchant
    local sub = ("{ mchid = %q, appids = { %q } }"):format(sc.SUB,
                                                         sc.SUB_APPID)
    local conf = sc.config("/tmp/never-made")
    local twice = conf:gsub("sub_merchants = { ", "sub_merchants = { "
                            .. sub:gsub("%%", "%%%%") .. ", ", 1)
    assert.is_not.equal(conf, twice)
    local code, log = run(twice)
    assert.equal(2, code, log)
    assert.matches("config.merchants[1].sub_merchants[2].mchid: "
                   .. sc.SUB .. " is listed twice", log, 1, true)
    local keyed = conf:gsub("sub_merchants = { {", "sub_merchants = { ['"
                            .. sc.SUB .. "'] = {", 1)
    assert.is_not.equal(conf, keyed)
    code, log = run(keyed)
    assert.equal(2, code, log)
    assert.matches("config.merchants[1].sub_merchants: must be an array",
                   log, 1, true)
  end)

  it("lets the runtime's own keys sit beside its own", function()
    local code, log = run(sc.config("/tmp/never-made",
      "workers = 1, log_level = 'info', shared = { x = '1m' }, " ..
      "time_scale = 0,"))
    assert.equal(2, code)       -- time_scale is wrong, the rest is fine
    assert.matches("config%.time_scale: must be a number > 0", log)
  end)
end)
