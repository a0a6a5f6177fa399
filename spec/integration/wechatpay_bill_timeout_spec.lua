-- wx:download_bill and time: a bill is a file, and a large one takes as
-- long as it flows. The client's timeout and deadline (sized for API
-- calls) cut a download that kept flowing, every day; a download that
-- stalls still ends, after opts.idle_timeout without a byte.
local wechatpay = require "paygate.wechatpay"
local core = require "paygate.core"
local servers = require "spec.support.servers"
local proc = require "paygate.testing.proc"
local slow_http = require "support.slow_http"

local FIX = "spec/fixtures/wechatpay/"
local tmp = servers.mktemp()
teardown(function()
  proc.stop_all()
  servers.sh("rm -rf " .. tmp)
end)

local function bill_server(mode)
  return (slow_http.start(tmp, mode))
end

-- public-key mode (no certificate download); API calls get 1 s each and
-- 2 s in all, shorter than the steady bill's 3 s
local function client(port)
  return assert(wechatpay.client{ mchid = "1234567891",
    merchant_private_key = FIX .. "a3_merchant_key.pem",
    merchant_serial = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115",
    apiv3_key = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb",
    public_key = FIX .. "a7_platform_pubkey.pem",
    public_key_id = "PUB_KEY_ID_0114232134912410000000000000000001",
    base_url = "http://127.0.0.1:" .. port, timeout = 1, deadline = 2 })
end

local BILL = { hash_type = "SHA1",
               hash_value = "35bea1aa7e3ffa6fadd637e84750da98e4f0c86d" }

describe("wx:download_bill and time", function()
  it("a bill that flows for longer than the client's timeout and deadline"
     .. " is downloaded", function()
    local port = bill_server("steady")
    local wx = client(port)
    local b = { download_url = "https://api.mch.weixin.qq.com/v3/"
                .. "billdownload/file?token=steady" }
    for k, v in pairs(BILL) do b[k] = v end
    local info, err = wx:download_bill(b, tmp .. "/steady.csv")
    assert.is_nil(err and err.message)
    assert.equal(2000, info.bytes)
    local f = assert(io.open(tmp .. "/steady.csv", "rb"))
    assert.equal(2000, #f:read("*a"))
    f:close()
  end)

  it("a download that stalls fails as a timeout after idle_timeout, and"
     .. " leaves no file", function()
    local port = bill_server("stall")
    local wx = client(port)
    local b = { download_url = "https://api.mch.weixin.qq.com/v3/"
                .. "billdownload/file?token=stall" }
    for k, v in pairs(BILL) do b[k] = v end
    local started = core.mono()
    local info, err = wx:download_bill(b, tmp .. "/stall.csv",
                                       { idle_timeout = 1, timeout = 20,
                                         max_attempts = 1 })
    assert.is_nil(info)
    assert.equal("timeout", err.kind)
    -- (ended by the stall, long before the attempt's own timeout)
    assert.is_true(core.mono() - started < 10, core.mono() - started)
    assert.is_nil(io.open(tmp .. "/stall.csv", "rb"))
  end)
end)
