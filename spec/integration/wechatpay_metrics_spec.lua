-- paygate_wechatpay_certificate_days_left on /metrics of a running app:
-- the newest valid platform certificate's days left, one series per
-- merchant, and a warning logged from 30 days before it expires.
local server = require "support.server"
local proc = require "support.proc"
local wxtest = require "support.wxtest"

local FIX = "spec/fixtures/wechatpay/"

local function sh(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  assert(ok == 0 or ok == true, "command failed: " .. cmd)
end

describe("the certificate metric", function()
  local s, dir

  setup(function()
    dir = server.tmpdir()
    -- P1 (key A.5) expires in 20 days, P2 (key A.8) in 200
    local certs = { { "a5_platform_key.pem", wxtest.P1, 20, "p1" },
                    { "a8_go_key.pem", wxtest.P2, 200, "p2" },
                    -- a merchant certificate (key A.3) ending in 10 days
                    { "a3_merchant_key.pem", "0ABC", 10, "m10" } }
    for _, c in ipairs(certs) do
      sh(("openssl req -x509 -new -key %s -out %s/%s.pem -days %d "
          .. "-set_serial 0x%s -subj '/CN=Tenpay.com sign'")
         :format(FIX .. c[1], dir, c[4], c[3], c[2]))
    end
    local app = ([[
local paygate = require "paygate"
local wechatpay = require "paygate.wechatpay"
local function conf(mchid, certs)
  return { mchid = mchid, merchant_private_key = %q,
    merchant_serial = %q, apiv3_key = %q, platform_certificates = certs,
    download_certificates = false, base_url = "http://127.0.0.1:1" }
end
-- two certificates (a rotation): the newest counts
local a = assert(wechatpay.client(conf("1900000001", { %q, %q })))
-- one that expires soon: a warning
local b = assert(wechatpay.client(conf("1900000002", { %q })))
-- merchant certificates: one expired (fixture A.4, 2025-05-09), one that
-- ends in 10 days: each a warning, and the client still loads
local function mconf(mchid, cert)
  local c = conf(mchid, { %q })
  c.merchant_serial, c.merchant_certificate = nil, cert
  return c
end
local c = assert(wechatpay.client(mconf("1900000003", %q)))
local d = assert(wechatpay.client(mconf("1900000004", %q)))
paygate.route("GET", "/", function() return 200, "ok" end)
]]):format(FIX .. "a3_merchant_key.pem", wxtest.MERCHANT_SERIAL,
           wxtest.APIV3, dir .. "/p1.pem", dir .. "/p2.pem",
           dir .. "/p1.pem", dir .. "/p2.pem", FIX .. "a4_merchant_cert.pem",
           dir .. "/m10.pem")
    s = server.start{ source = app, workers = 2 }
  end)
  teardown(function()
    if s then s:stop() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  it("shows the newest certificate's days left per merchant", function()
    local body = assert(s:admin_get("/metrics")).body
    assert.is_truthy(body:find("# TYPE paygate_wechatpay_certificate_days_left"
                               .. " gauge\n", 1, true), body)
    local a = body:match('paygate_wechatpay_certificate_days_left{mchid='
      .. '"1900000001",serial="' .. wxtest.P2 .. '"} ([%d.e+-]+)\n')
    assert.is_truthy(a, body)
    assert.is_true(tonumber(a) > 199 and tonumber(a) <= 200)
    local b = body:match('paygate_wechatpay_certificate_days_left{mchid='
      .. '"1900000002",serial="' .. wxtest.P1 .. '"} ([%d.e+-]+)\n')
    assert.is_truthy(b, body)
    assert.is_true(tonumber(b) > 19 and tonumber(b) <= 20)
    -- one series per merchant (four here), whatever the number of workers
    local _, n = body:gsub("paygate_wechatpay_certificate_days_left{", "")
    assert.equal(4, n)
  end)

  it("shows the merchant certificate's days left, where it was given as a"
     .. " certificate", function()
    -- (before: only the console and a start warning said it; nothing to
    -- alert on)
    local body = assert(s:admin_get("/metrics")).body
    assert.is_truthy(body:find("# TYPE paygate_wechatpay_merchant_certificate"
                               .. "_days_left gauge\n", 1, true), body)
    local d = body:match('paygate_wechatpay_merchant_certificate_days_left{'
      .. 'mchid="1900000004",serial="0ABC"} ([%d.e+-]+)\n')
    assert.is_truthy(d, body)
    assert.is_true(tonumber(d) > 9 and tonumber(d) <= 10)
    -- the expired one: negative days, still shown (an alert fires on it)
    local e = body:match('paygate_wechatpay_merchant_certificate_days_left{'
      .. 'mchid="1900000003",serial="' .. wxtest.MERCHANT_SERIAL
      .. '"} ([%d.e+-]+)\n')
    assert.is_truthy(e, body)
    assert.is_true(tonumber(e) < 0)
    -- a merchant given by serial alone (no certificate, no end): none
    assert.is_nil(body:find('merchant_certificate_days_left{mchid="1900000001"',
                            1, true))
  end)

  it("warns from 30 days before the newest expires", function()
    assert.is_truthy(proc.wait_until(function()
      local log = s:logs()
      return log:find("newest platform certificate expires soon", 1, true)
             and log:find("1900000002", 1, true)
    end, 10, "the warning"))
    assert.is_nil(s:logs():match("expires soon[^\n]*1900000001"))
  end)

  it("warns at start of a merchant_certificate expired or ending within"
     .. " 30 days", function()
    local function line(pattern)
      local found
      proc.wait_until(function()
        found = s:logs():match("[^\n]*" .. pattern .. "[^\n]*")
        return found
      end, 10, pattern)
      return found
    end
    local expired = line("merchant_certificate has expired[^\n]*1900000003")
    assert.is_truthy(expired, s:logs())
    assert.matches(wxtest.MERCHANT_SERIAL, expired, 1, true)
    assert.matches("2025-05-09", expired, 1, true)
    assert.matches("401 SIGN_ERROR", expired, 1, true)
    local soon = line("merchant_certificate expires soon[^\n]*1900000004")
    assert.is_truthy(soon, s:logs())
    assert.matches("0ABC", soon, 1, true)
    -- the merchants whose certificate is fine (or given by serial): none
    assert.is_nil(s:logs():match("merchant_certificate[^\n]*190000000[12]"))
  end)
end)
