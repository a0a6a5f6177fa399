-- The diagnosing CLI against the simulator, as a merchant would use it:
-- an answer captured from the simulator verifies with the platform
-- certificate the simulator serves, and a changed byte is named.
local json = require "paygate.json"
local testing = require "paygate.testing"
local proc = require "paygate.testing.proc"

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local function run(args)
  local dir = os.tmpname()
  local argv = { PAYGATE_BIN }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local p = proc.spawn(argv, { log = dir })
  local code = p:wait(20)
  local out = testing.read(dir)
  os.remove(dir)
  return code, out
end

describe("paygate verify on a simulator answer", function()
  local sim, wx, dir
  setup(function()
    sim = testing.simulator{}
    wx = sim:client()
    dir = os.tmpname()
    os.remove(dir)
    os.execute("mkdir -p " .. dir)
  end)
  teardown(function()
    testing.stop_all()
    os.execute("rm -rf " .. dir)
  end)

  it("verifies with the served platform certificate and names a change",
     function()
    -- the client's default appid comes from sim:client_config()
    local no = testing.out_trade_no()
    assert(wx:native_prepay{ description = "cli", out_trade_no = no,
                             notify_url = "http://127.0.0.1:9/notify",
                             amount = { total = 1 } })
    local res = assert(wx:request("GET", "/v3/pay/transactions/out-trade-no/"
                                  .. no .. "?mchid=" .. sim.merchant.mchid))
    assert.equal(200, res.status)
    local certs = sim:platform_certificates()
    write(dir .. "/platform.pem", certs[#certs].certificate)
    write(dir .. "/headers.json", json.encode(res.headers))
    write(dir .. "/body.json", res.body)
    local code, out = run{ "verify", "--body", dir .. "/body.json",
                           "--headers", dir .. "/headers.json",
                           "--certificate", dir .. "/platform.pem" }
    assert.equal(0, code, out)
    assert.matches("verified", out)
    write(dir .. "/body.json", res.body:gsub("NOTPAY", "NOTPAZ"))
    code, out = run{ "verify", "--body", dir .. "/body.json",
                     "--headers", dir .. "/headers.json",
                     "--certificate", dir .. "/platform.pem" }
    assert.equal(1, code, out)
    assert.matches("signature_mismatch", out)
    -- paygate certs calls the simulator's certificate a platform one
    code, out = run{ "certs", dir .. "/platform.pem" }
    assert.equal(0, code, out)
    assert.matches("platform", out)
  end)
end)
