-- The simulator answers as WeChat Pay does where a client could come to
-- depend on a difference: the shape of an unpaid order's query answer;
-- unknown keys inside a request's nested objects, refused as at the top;
-- a refund whose transaction_id and out_trade_no name different orders.
local sc = require "support.simclient"

local srv, c, keys, base

local function prepay(no, over, kind) return c:prepay(no, over, kind) end
local function query(no) return c:query(no) end
local function pay(no, body) return c:pay(no, body) end

local function refund(b)
  return c:refund(b)
end

local err = sc.assert_err

local function signed(res, status) sc.assert_signed(res, keys, status) end

setup(function()
  srv, base, c = sc.start(1)
  keys = c:platform_keys()
end)

teardown(function() if srv then srv:stop() end end)

describe("simulator: the query answer of an unpaid order", function()
  it("has amount.total and payer_currency, no amount.currency, no attach",
     function()
    signed(prepay("np-shape-01", { attach = "a1" }))
    signed(prepay("np-shape-02"))
    for _, no in ipairs({ "np-shape-01", "np-shape-02" }) do
      local res = query(no)
      signed(res)
      local t = res.json
      assert.equal("NOTPAY", t.trade_state)
      assert.equal(100, t.amount.total)
      assert.equal("CNY", t.amount.payer_currency)
      assert.is_nil(t.amount.currency, res.body)
      assert.is_nil(t.attach, res.body)
      assert.is_nil(res.body:find('"attach"', 1, true), res.body)
      assert.is_nil(t.amount.payer_total)
      assert.is_nil(t.transaction_id)
    end
    -- once paid, both are there (attach as ordered, "" when none was)
    assert.equal(200, pay("np-shape-01").status)
    assert.equal(200, pay("np-shape-02").status)
    local t = query("np-shape-01").json
    assert.equal("CNY", t.amount.currency)
    assert.equal("a1", t.attach)
    assert.equal("", query("np-shape-02").json.attach)
  end)
end)

describe("simulator: unknown keys in nested objects", function()
  local EXTRA = "参数中含有非法的额外参数"

  local function unknown(res, field)
    err(res, 400, "PARAM_ERROR", field)
    assert.equal(EXTRA, res.json.detail.issue or res.json.message, res.body)
  end

  it("takes every key WeChat defines in a prepay's objects", function()
    signed(prepay("nk-all-0001", {
      amount = { total = 100, currency = "CNY" },
      payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" },
      detail = { cost_price = 100, invoice_id = "inv-1", goods_detail = {
        { merchant_goods_id = "g1", wechatpay_goods_id = "1001",
          goods_name = "商品", quantity = 1, unit_price = 100 } } },
      scene_info = { payer_client_ip = "14.23.150.211", device_id = "013467",
        store_info = { id = "0001", name = "店", area_code = "440305",
                       address = "深圳" } },
      settle_info = { profit_sharing = false } }))
    signed(prepay("nk-all-0002", { payer = false, scene_info = {
      payer_client_ip = "14.23.150.211", h5_info = { type = "iOS",
        app_name = "a", app_url = "https://a.example", bundle_id = "b",
        package_name = "p" } } }, "h5"))
  end)

  it("refuses an unknown key in a prepay's objects, naming its path",
     function()
    unknown(prepay("nk-bad-0001", { amount = { total = 1, currency = "CNY",
      totl = 1 } }), "/amount/totl")
    unknown(prepay("nk-bad-0002", { payer = { openid = "o1",
      sub_openid = "o2" } }), "/payer/sub_openid")
    unknown(prepay("nk-bad-0003", { detail = { goods = 1 } }),
            "/detail/goods")
    unknown(prepay("nk-bad-0004", { detail = { goods_detail = {
      { merchant_goods_id = "g1", quantity = 1, unit_price = 1 },
      { merchant_goods_id = "g2", quantity = 1, unit_price = 1,
        price = 1 } } } }), "/detail/goods_detail/1/price")
    unknown(prepay("nk-bad-0005", { scene_info = {
      payer_client_ip = "14.23.150.211", ip = "x" } }), "/scene_info/ip")
    unknown(prepay("nk-bad-0006", { scene_info = {
      payer_client_ip = "14.23.150.211", store_info = { id = "1",
        city = "x" } } }), "/scene_info/store_info/city")
    unknown(prepay("nk-bad-0007", { payer = false, scene_info = {
      payer_client_ip = "14.23.150.211", h5_info = { type = "Wap",
        wap_url = "https://a.example" } } }, "h5"),
      "/scene_info/h5_info/wap_url")
    unknown(prepay("nk-bad-0008", { settle_info = { profit_sharing = true,
      ratio = 1 } }), "/settle_info/ratio")
    -- nothing was created: the same out_trade_no with a clean body is new
    signed(prepay("nk-bad-0001"))
  end)

  it("refuses a direct payer's key in partner mode and the reverse",
     function()
    local b = sc.prepay_body("nk-pt-00001")
    b.appid, b.mchid = nil, nil
    b.sp_appid, b.sp_mchid, b.sub_mchid = sc.APPID, sc.MCHID, sc.SUB
    b.payer = { openid = "o1" }
    unknown(c:call("POST", "/v3/pay/partner/transactions/jsapi", b),
            "/payer/openid")
    b.payer = { sp_openid = "o1" }
    signed(c:call("POST", "/v3/pay/partner/transactions/jsapi", b))
  end)

  it("refuses a payer on a native, H5 or App prepay: it is JSAPI's",
     function()
    -- payer (the openid of who pays inside WeChat) is in the JSAPI body
    -- alone; before, the other three took it and kept its openid
    local h5 = { payer_client_ip = "14.23.150.211",
                 h5_info = { type = "Wap" } }
    for i, kind in ipairs({ "native", "h5", "app" }) do
      local no = "nk-py-000" .. i
      unknown(prepay(no, { scene_info = h5 }, kind), "/payer")
      -- nothing was made: the same body without payer is a new order
      signed(prepay(no, { payer = false, scene_info = h5 }, kind))
    end
    local b = sc.prepay_body("nk-py-pt-01")
    b.appid, b.mchid = nil, nil
    b.sp_appid, b.sp_mchid, b.sub_mchid = sc.APPID, sc.MCHID, sc.SUB
    b.payer = { sp_openid = "o1" }
    unknown(c:call("POST", "/v3/pay/partner/transactions/native", b),
            "/payer")
    b.payer = nil
    signed(c:call("POST", "/v3/pay/partner/transactions/native", b))
  end)

  it("checks a refund's amount, amount.from and goods_detail", function()
    signed(prepay("nk-rf-00001"))
    assert.equal(200, pay("nk-rf-00001").status)
    local function body(no, over)
      local b = { out_trade_no = "nk-rf-00001", out_refund_no = no,
                  amount = { refund = 10, total = 100, currency = "CNY" } }
      for k, v in pairs(over or {}) do b[k] = v end
      return b
    end
    unknown(refund(body("nk-r-bad1", { amount = { refund = 10, total = 100,
      currency = "CNY", fee = 0 } })), "/amount/fee")
    unknown(refund(body("nk-r-bad2", { amount = { refund = 10, total = 100,
      currency = "CNY", from = { { account = "AVAILABLE", amount = 10,
        bank = "x" } } } })), "/amount/from/0/bank")
    unknown(refund(body("nk-r-bad3", { goods_detail = {
      { merchant_goods_id = "g1", unit_price = 10, refund_amount = 10,
        refund_quantity = 1, sku = "s" } } })), "/goods_detail/0/sku")
    signed(refund(body("nk-r-ok1", {
      reason = "r", funds_account = "AVAILABLE",
      amount = { refund = 10, total = 100, currency = "CNY", from = {
        { account = "AVAILABLE", amount = 10 } } },
      goods_detail = { { merchant_goods_id = "g1", wechatpay_goods_id = "1",
        goods_name = "n", unit_price = 10, refund_amount = 10,
        refund_quantity = 1 } } })))
  end)
end)

describe("simulator: a refund naming its order twice", function()
  local function paid(no)
    signed(prepay(no))
    local p = pay(no)
    assert.equal(200, p.status, p.body)
    return p.json.transaction_id
  end

  it("refuses transaction_id and out_trade_no of different orders",
     function()
    local ta = paid("two-ids-a01")
    paid("two-ids-b01")
    local body = { transaction_id = ta, out_trade_no = "two-ids-b01",
                   out_refund_no = "two-ids-r1",
                   amount = { refund = 10, total = 100, currency = "CNY" } }
    local res = refund(body)
    err(res, 400, "INVALID_REQUEST", "/out_trade_no")
    assert.matches("transaction_id", res.json.message)
    -- an out_trade_no of no order at all is a mismatch as well
    body.out_trade_no, body.out_refund_no = "two-ids-none", "two-ids-r2"
    err(refund(body), 400, "INVALID_REQUEST", "/out_trade_no")
    -- neither order was refunded
    for _, no in ipairs({ "two-ids-a01", "two-ids-b01" }) do
      assert.equal("SUCCESS", query(no).json.trade_state)
    end
    -- both naming the same order is fine
    body.out_trade_no, body.out_refund_no = "two-ids-a01", "two-ids-r3"
    res = refund(body)
    signed(res)
    assert.equal("two-ids-a01", res.json.out_trade_no)
    assert.equal("REFUND", query("two-ids-a01").json.trade_state)
    assert.equal("SUCCESS", query("two-ids-b01").json.trade_state)
  end)
end)

describe("simulator: a refund's notify_url", function()
  it("is checked as a prepay's is: a UTF-8 string of 1- to 3-byte "
     .. "characters", function()
    signed(prepay("rf-url-0001"))
    assert.equal(200, pay("rf-url-0001").status)
    local n = 0
    local function ask(url)
      n = n + 1
      return refund({ out_trade_no = "rf-url-0001",
        out_refund_no = "rf-url-r" .. n, notify_url = url,
        amount = { refund = 1, total = 100, currency = "CNY" } })
    end
    -- not a string: said so, not "at most 255 bytes"
    for _, v in ipairs({ 123, { a = 1 }, true }) do
      local res = ask(v)
      err(res, 400, "PARAM_ERROR", "/notify_url")
      assert.equal("应为字符串", res.json.detail.issue, res.body)
    end
    -- invalid UTF-8 and a 4-byte character are refused, nothing refunded
    for _, v in ipairs({ "https://merchant.example/n\255",
                         "https://merchant.example/😀" }) do
      local res = ask(v)
      err(res, 400, "PARAM_ERROR", "/notify_url")
      assert.matches("UTF%-8", res.json.detail.issue)
    end
    assert.equal("SUCCESS", query("rf-url-0001").json.trade_state)
    signed(ask("https://merchant.example/refund-notify"))
  end)
end)

describe("simulator: a notify_url with a space or a control character", function()
  it("is refused saying so, not as longer than 255 bytes", function()
    for i, u in ipairs({ "https://merchant.example/notify ",
                         " https://merchant.example/notify",
                         "https://merchant.example/no\ttify",
                         "https://merchant.example/notify\r\n" }) do
      local res = prepay("sp-url-000" .. i, { notify_url = u })
      err(res, 400, "PARAM_ERROR", "/notify_url")
      assert.equal("不能含有空格或控制字符", res.json.detail.issue, res.body)
    end
    -- one too long is still told its length
    local res = prepay("sp-url-0009", { notify_url = "https://merchant.example/"
                                        .. ("n"):rep(240) })
    err(res, 400, "PARAM_ERROR", "/notify_url")
    assert.matches("255", res.json.detail.issue)
  end)
end)

describe("simulator: a refund with an empty order id", function()
  it("is a PARAM_ERROR naming it, not an unknown order", function()
    signed(prepay("rf-empty-01"))
    assert.equal(200, pay("rf-empty-01").status)
    local amount = { refund = 1, total = 100, currency = "CNY" }
    -- an SDK that sends the id it was not given as "": the order exists
    local res = refund({ transaction_id = "", out_trade_no = "rf-empty-01",
                         out_refund_no = "rf-empty-r1", amount = amount })
    err(res, 400, "PARAM_ERROR", "/transaction_id")
    res = refund({ out_trade_no = "", out_refund_no = "rf-empty-r2",
                   amount = amount })
    err(res, 400, "PARAM_ERROR", "/out_trade_no")
    assert.equal("SUCCESS", query("rf-empty-01").json.trade_state)
    signed(refund({ out_trade_no = "rf-empty-01", out_refund_no = "rf-empty-r3",
                    amount = amount }))
  end)
end)
