-- Findings of a review of the simulator and the client it serves, each
-- pinned here: the new-user flow (a typed client with an http:// loopback
-- notify_url), configured platform keys, one-line config errors with two
-- workers, the connection-reset fault, exact header spellings over a raw
-- socket, and the fault endpoint names.
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local json = require "cjson.safe"
local wechatpay = require "paygate.wechatpay"
local sn = require "support.simnotify"

local function order_no()
  return "REV" .. crypto.random_nonce(16)
end

local function client(sim, extra)
  local conf = { mchid = sn.MCHID, appid = sn.APPID,
    merchant_private_key = sn.KEY_PATH, merchant_serial = sn.SERIAL,
    apiv3_key = sn.APIV3, base_url = sim.base, timeout = 5, deadline = 10 }
  for k, v in pairs(extra or {}) do conf[k] = v end
  return assert(wechatpay.client(conf))
end

describe("the new-user flow", function()
  local sim, recv
  setup(function()
    sim = sn.start{ time_scale = 1000, answer_timeout = 1 }
    recv = sn.receiver()
  end)
  teardown(function()
    if sim then sim:stop() end
    if recv then recv:stop() end
  end)

  it("wx:native_prepay with an http:// loopback notify_url, paid via "
     .. "/sim/, notifies the receiver", function()
    local wx = client(sim)
    local no = order_no()
    local url = sn.notify_url(recv, "newuser")
    assert.truthy(url:match("^http://127%.0%.0%.1:%d+/"))
    local res, err = wx:native_prepay({ description = "new user",
      out_trade_no = no, notify_url = url, amount = { total = 5 } })
    assert.truthy(res, tostring(err))
    assert.truthy(res.code_url)
    sn.pay(sim, no)
    local list
    sn.wait_until(function()
      list = sn.received(recv, "newuser")
      return #list >= 1
    end, 20, "the payment notification")
    local _, plain = sn.decrypt(list[1])
    assert.equal(no, plain.out_trade_no)
    assert.equal("SUCCESS", plain.trade_state)
    wx:stop()
  end)

  it("the client still refuses http:// to a host that is not loopback",
     function()
    local wx = client(sim)
    for _, url in ipairs({ "http://example.com/notify",
                           "http://localhost:1@example.com/notify",
                           "http://127.0.0.1.example.com/notify",
                           "http://127.0.0.1/notify?x=1" }) do
      local res, err = wx:native_prepay({ description = "d",
        out_trade_no = order_no(), notify_url = url,
        amount = { total = 1 } })
      assert.is_nil(res, url)
      assert.equal("invalid_params", err.kind, url)
      assert.truthy(tostring(err):find("notify_url", 1, true), url)
    end
    -- [::1] and localhost are loopback
    for _, url in ipairs({ "http://[::1]:9/n", "http://localhost:9/n" }) do
      local _, body = wx:prepay_request("native", { description = "d",
        out_trade_no = order_no(), notify_url = url,
        amount = { total = 1 } })
      assert.truthy(type(body) == "string", url)
    end
    wx:stop()
  end)
end)

describe("platform keys given in the config", function()
  it("replace the generated ones on a restart of the same state_dir",
     function()
    local server = require "support.server"
    local state = server.tmpdir()
    local sim = sn.start{ state_dir = state }
    local first = sn.platform_certs(sim)
    sim:stop()
    local kf, cf = state .. "/given_key.pem", state .. "/given_cert.pem"
    assert(os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s "
      .. "-out %s -days 30 -subj '/CN=Tenpay.com sign' -set_serial "
      .. "0x3A1B2C3D4E5F60718293A4B5C6D7E8F901234567 2>/dev/null")
      :format(kf, cf)) == 0)
    local serial = "3A1B2C3D4E5F60718293A4B5C6D7E8F901234567"
    assert.is_nil(first[serial])
    sim = sn.start{ state_dir = state, extra = ("platform_private_key = %q, "
      .. "platform_certificate = %q"):format(kf, cf) }
    local ok, err = pcall(function()
      local now = sn.platform_certs(sim)
      local serials = {}
      for s in pairs(now) do serials[#serials + 1] = s end
      assert.same({ serial }, serials)
      local res = sn.signed(sim, "GET", "/v3/certificates")
      assert.equal(200, res.status)
      assert.equal(serial, res.headers["wechatpay-serial"])
    end)
    sim:stop()
    assert(ok, err)
  end)
end)

describe("a bad configuration with two workers", function()
  local server = require "support.server"
  local proc = require "support.proc"
  local sc = require "support.simclient"

  local function run(conf)
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/c.lua", "w"))
    f:write(conf)
    f:close()
    local p = proc.spawn({ os.getenv("PAYGATE_BIN") or "build/paygate", "run",
      "examples/simulator", "--listen", "127.0.0.1:"
      .. require("paygate.core").free_port(), "--admin", "off",
      "--workers", "2", "--config", dir .. "/c.lua" },
      { log = dir .. "/log" })
    local code = p:wait(30)
    local log = proc.read(dir .. "/log")
    return code, log, dir
  end

  it("is one line on stderr naming the key, and exit 2", function()
    for _ = 1, 3 do
      local code, log = run(sc.config("/tmp/never-made", "colour = 'red',"))
      assert.equal(2, code)
      assert.equal("simulator: config.colour: unknown key\n", log)
    end
  end)

  it("a state_dir that cannot be made: one line, no mkdir chatter",
     function()
    local dir = server.tmpdir()
    local f = assert(io.open(dir .. "/file", "w"))
    f:close()
    local code, log = run(sc.config(dir .. "/file/state"))
    assert.equal(2, code)
    assert.equal("simulator: config.state_dir: cannot create " .. dir
                 .. "/file/state (Not a directory)\n", log)
  end)
end)
