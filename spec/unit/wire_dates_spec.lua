-- One reading of an RFC 3339 time (paygate.civil.epoch) and of a date
-- (paygate.civil.date) for the client's checks before sending, the
-- simulator's when it takes the request and the bill reconciliation's:
-- a value one accepts and the other refuses is a request the client
-- sends and WeChat's stand-in answers PARAM_ERROR.
package.path = "examples/simulator/?.lua;" .. package.path
local civil = require "paygate.civil"
local wechatpay = require "paygate.wechatpay"
local orders = require "sim.orders"
local sim_bills = require "sim.bills"
local bill = require "paygate.reconcile.bill"

local FIX = "spec/fixtures/wechatpay/"

describe("the client's checks and the simulator's agree", function()
  local wx
  setup(function()
    wx = assert(wechatpay.client{
      mchid = "1900000001", merchant_private_key = FIX
        .. "a1_merchant_key.pem",
      merchant_serial = "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C",
      apiv3_key = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb",
      public_key = FIX .. "a7_platform_pubkey.pem",
      public_key_id = "PUB_KEY_ID_0114232020260101000000000001",
      base_url = "https://127.0.0.1:1", backup_url = false })
  end)
  teardown(function() wx:close() end)

  local function client_takes(t)
    return (wx:prepay_request("native", {
      appid = "wx2421b1c4370ec43b", description = "d",
      out_trade_no = "1217752501201407033233368018",
      notify_url = "https://www.weixin.qq.com/wxpay/pay.php",
      amount = { total = 100 }, time_expire = t })) ~= nil
  end

  it("time_expire: one RFC 3339 reading (civil.epoch)", function()
    for _, t in ipairs({
      "2026-06-08T10:34:56+08:00", "2026-06-08T02:34:56Z",
      "2026-06-08T10:34:56.123-05:30", "2026-06-08T10:34:56z",
      "2026-06-08t10:34:56+08:00", "2026-06-08T25:00:00+08:00",
      "2026-06-08T10:34:69+08:00", "2026-06-08T10:34:56+29:00",
      "2026-02-30T10:34:56+08:00", "2026-04-31T10:34:56+08:00",
      "2028-02-29T10:34:56+08:00", "2026-06-08 10:34:56+08:00",
      "2026-06-08T10:34:56", "2026-06-08T10:34:56+0800" }) do
      local want = civil.epoch(t) ~= nil
      assert.equal(want, client_takes(t), "client: " .. t)
      assert.equal(want, orders.parse_time(t) ~= nil, "simulator: " .. t)
    end
  end)

  it("bill_date: the client, the simulator and the reconciliation agree",
     function()
    for _, d in ipairs({ "2026-11-30", "2028-02-29", "2026-02-29",
                         "2026-02-30", "2026-04-31", "2026-13-01",
                         "2026-19-39", "2026-00-10", "2026-01-00",
                         "2026-1-01", "20261130" }) do
      local want = civil.date(d) ~= nil
      -- (an unknown parameter, checked after the rules: no request made)
      local ok, err = wx:trade_bill({ bill_date = d, zz = 1 })
      assert.is_nil(ok)
      assert.equal("invalid_params", err.kind)
      assert.equal(want, err.field ~= "bill_date", "client: " .. d)
      assert.equal(want, sim_bills.day_start(d) ~= nil, "simulator: " .. d)
      assert.equal(want, (pcall(bill.day_start, d)), "reconcile: " .. d)
    end
  end)

  it("notify_url: the client refuses what the simulator refuses", function()
    local function client_takes(u)
      return (wx:prepay_request("native", {
        appid = "wx2421b1c4370ec43b", description = "d",
        out_trade_no = "1217752501201407033233368018", notify_url = u,
        amount = { total = 100 } })) ~= nil
    end
    local long = "https://pay.example/" .. ("通"):rep(79)   -- 257 bytes
    for _, c in ipairs({
      { "https://pay.example/wechatpay/notify/1900000001", true },
      { "http://127.0.0.2:8080/n", true }, { "http://[::1]/n", true },
      { "https://pay.example/" .. ("a"):rep(235), true },   -- 255 bytes
      { long, false }, { "https://u:pw@pay.example/n", false },
      { "https:///n", false }, { "https://pay.example/n?a=1", false },
      { "https://pay.example/n#f", false }, { "http://pay.example/n", false },
      { "https://pay.example/\1n", false }, { "ftp://pay.example/", false },
      { "https://pay.example/n@x", true }, { "http://[::1]:9000/n", true },
      { "https://[2001:db8::1]/n", true }, { "http://[2001:db8::1]/n", false },
      { "https://pay.example/n?\1", false }, { "https://@pay.example/", false },
    }) do
      local u = c[1]
      assert.equal(c[2], client_takes(u), "client: " .. u)
      assert.equal(c[2], orders.check_url(u) ~= nil, "simulator: " .. u)
    end
    -- why, for the simulator's messages: the first thing wrong
    local validate = require "paygate.wechatpay.validate"
    for u, why in pairs{ ["https://pay.example/n?\1"] = "length",
                         ["https://pay.example/ n?a"] = "length",
                         ["http://pay.example/n?a"] = "scheme",
                         ["https://pay.example/n#f"] = "query",
                         [long] = "length" } do
      assert.same({ nil, why }, { validate.notify_url(u) }, u)
    end
    assert.same({ "http", "::1", "9000" },
                { validate.notify_url("http://[::1]:9000/n") })
    assert.same({ "https", "pay.example", "" },
                { validate.notify_url("https://pay.example/n") })
    -- it remembers its last answer: the same URL again, then another, then
    -- the first, each gets its own
    for _, c in ipairs{ { "https://pay.example/n", "https" },
                        { "https://pay.example/n", "https" },
                        { "http://pay.example/n", nil, "scheme" },
                        { "http://pay.example/n", nil, "scheme" },
                        { "https://pay.example/n", "https" } } do
      local a, b = validate.notify_url(c[1])
      assert.equal(c[2], a, c[1])
      if c[3] then assert.equal(c[3], b, c[1]) end
    end
    assert.same({ nil, "length" }, { validate.notify_url(nil) })
  end)
end)
