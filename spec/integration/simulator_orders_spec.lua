-- The simulator's orders and refunds over plain HTTP: parameter checks,
-- every state transition, re-entry, partner mode, the error shapes.
local core = require "paygate.core"
local crypto = require "paygate.crypto"
local server = require "support.server"
local proc = require "support.proc"
local sc = require "support.simclient"

local srv, c, keys, base

local function prepay(no, over, kind) return c:prepay(no, over, kind) end
local function query(no) return c:query(no) end
local function pay(no, body) return c:pay(no, body) end

local function refund(no, out_refund_no, amount, over)
  local b = { out_trade_no = no, out_refund_no = out_refund_no,
              amount = { refund = amount, total = 100, currency = "CNY" },
              notify_url = "https://merchant.example/refund" }
  for k, v in pairs(over or {}) do b[k] = v end
  return c:refund(b)
end

local function signed(res, status) sc.assert_signed(res, keys, status) end

local err = sc.assert_err

setup(function()
  srv, base, c = sc.start(2)
  keys = c:platform_keys()
end)

teardown(function() if srv then srv:stop() end end)

describe("simulator: prepay", function()
  it("answers each trade type, signed", function()
    local res = prepay("pp-jsapi-01")
    signed(res)
    assert.matches("^wx%d+%x+$", res.json.prepay_id)
    res = prepay("pp-app-0001", { payer = false }, "app")
    signed(res)
    assert.is_string(res.json.prepay_id)
    res = prepay("pp-native-01", { payer = false }, "native")
    signed(res)
    assert.matches("^weixin://wxpay/bizpayurl%?pr=", res.json.code_url)
    -- the body is WeChat's: slashes are not escaped
    assert.matches('"weixin://', res.body, 1, true)
    res = prepay("pp-h5-00001", { payer = false, scene_info = {
      payer_client_ip = "14.23.150.211", h5_info = { type = "Wap" } } }, "h5")
    signed(res)
    assert.matches("^https://wx%.tenpay%.com/.*prepay_id=wx", res.json.h5_url)
  end)

  it("checks parameters, naming the field", function()
    err(prepay("pp-bad-0001", { amount = { total = 0 } }), 400,
        "PARAM_ERROR", "/amount/total")
    err(prepay("pp-bad-0002", { amount = { total = 1.5 } }), 400,
        "PARAM_ERROR", "/amount/total")
    err(prepay("pp-bad-0003", { amount = { total = 1, currency = "USD" } }),
        400, "PARAM_ERROR", "/amount/currency")
    err(prepay("short"), 400, "PARAM_ERROR", "/out_trade_no")
    err(prepay("has space 01"), 400, "PARAM_ERROR", "/out_trade_no")
    err(prepay("pp-bad-0004", { notify_url = "http://merchant.example/n" }),
        400, "PARAM_ERROR", "/notify_url")
    err(prepay("pp-bad-0005", { notify_url = "https://m.example/n?a=1" }),
        400, "PARAM_ERROR", "/notify_url")
    err(prepay("pp-bad-0006", { time_expire = "2030-01-01 10:00:00" }), 400,
        "PARAM_ERROR", "/time_expire")
    err(prepay("pp-bad-0007", { time_expire = "2001-01-01T10:00:00+08:00" }),
        400, "PARAM_ERROR", "/time_expire")
    err(prepay("pp-bad-0008", { payer = false }), 400, "PARAM_ERROR",
        "/payer/openid")
    err(prepay("pp-bad-0009", { description = false }), 400, "PARAM_ERROR",
        "/description")
    err(prepay("pp-bad-0010", { description = ("字"):rep(128) }), 400,
        "PARAM_ERROR", "/description")
    err(prepay("pp-bad-0011", { colour = "red" }), 400, "PARAM_ERROR",
        "/colour")
    err(prepay("pp-bad-0012", { payer = false }, "h5"), 400, "PARAM_ERROR",
        "/scene_info/h5_info")
    err(prepay("pp-bad-0015", { payer = false, scene_info = {
      payer_client_ip = ":::", h5_info = { type = "Wap" } } }, "h5"), 400,
      "PARAM_ERROR", "/scene_info/payer_client_ip")
    err(prepay("pp-bad-0013", { appid = "wx0000000000000000" }), 400,
        "APPID_MCHID_NOT_MATCH")
    err(prepay("pp-bad-0014", { mchid = sc.MCHID2 }), 400, "INVALID_REQUEST",
        "/mchid")
    -- a loopback notify_url may be http (the specs' and demos')
    signed(prepay("pp-ok-loopback", { notify_url = "http://127.0.0.1:1/n" }))
    local res = c:call("POST", "/v3/pay/transactions/jsapi", "not json")
    err(res, 400, "PARAM_ERROR")
  end)

  it("re-enters with the same parameters, refuses different ones", function()
    local a = prepay("pp-reentry-1")
    signed(a)
    local b = prepay("pp-reentry-1")
    signed(b)
    assert.is_string(b.json.prepay_id)
    local res = prepay("pp-reentry-1", { amount = { total = 101 } })
    err(res, 400, "INVALID_REQUEST")
    assert.equal("请求重入时，参数与首次请求时不一致", res.json.message)
    assert.matches("%-268498688$", res.headers["request-id"])
    -- another trade type under the same out_trade_no
    err(prepay("pp-reentry-1", { payer = false }, "native"), 403,
        "OUT_TRADE_NO_USED")
  end)

  it("ends an error's Request-ID with WeChat's code for it, where known",
     function()
    -- the part after the last "-" (WeChat's troubleshooting handbook's
    -- table); before, these had the catch-all of their code (268435456
    -- for INVALID_REQUEST, 268435461 for any PARAM_ERROR, 268449538 for
    -- both ORDER_PAID answers)
    local function suffix(res, want)
      assert.matches("^%x+%-" .. want .. "$", res.headers["request-id"],
                     nil, false, res.body)
    end
    suffix(prepay("pp-rid-0001", { colour = "red" }), "270924358")
    suffix(prepay("pp-rid-0002", { amount = { total = 1, totl = 1 } }),
           "270924358")
    suffix(prepay("pp-rid-0003", { payer = false }), "268501013")
    suffix(prepay("pp-rid-0004", { description = false }), "268435461")
    local b = sc.prepay_body("pp-rid-0005")
    b.appid, b.mchid = nil, nil
    b.sp_appid, b.sp_mchid, b.sub_mchid = sc.APPID, sc.MCHID, "1999999999"
    b.payer = { sp_openid = "o1" }
    suffix(c:call("POST", "/v3/pay/partner/transactions/jsapi", b),
           "268443701")
    suffix(c:refund({ sub_mchid = "1999999999", out_trade_no = "pp-rid-0006",
      out_refund_no = "pp-rid-r1",
      amount = { refund = 1, total = 100, currency = "CNY" } }), "268443701")
    -- paid: prepay again is 该订单已支付, close is 订单已支付
    signed(prepay("pp-rid-0007"))
    assert.equal(200, pay("pp-rid-0007").status)
    local res = prepay("pp-rid-0007")
    err(res, 400, "ORDER_PAID")
    assert.equal("该订单已支付", res.json.message)
    suffix(res, "268498689")
    res = c:call("POST", "/v3/pay/transactions/out-trade-no/pp-rid-0007/close",
                 { mchid = sc.MCHID })
    err(res, 400, "ORDER_PAID")
    assert.equal("订单已支付", res.json.message)
    suffix(res, "268449538")
  end)
end)

describe("simulator: order states", function()
  it("NOTPAY -> SUCCESS, then queries by both ids", function()
    signed(prepay("st-pay-0001", { attach = "a1" }))
    local res = query("st-pay-0001")
    signed(res)
    assert.equal("NOTPAY", res.json.trade_state)
    assert.equal("订单未支付", res.json.trade_state_desc)
    assert.equal(100, res.json.amount.total)
    assert.is_nil(res.json.transaction_id)
    local p = pay("st-pay-0001", { payer_total = 90 })
    assert.equal(200, p.status, p.body)
    assert.equal("SUCCESS", p.json.trade_state)
    res = query("st-pay-0001")
    signed(res)
    local t = res.json
    assert.equal("SUCCESS", t.trade_state)
    assert.equal("支付成功", t.trade_state_desc)
    assert.equal("JSAPI", t.trade_type)
    assert.equal(90, t.amount.payer_total)
    assert.equal("a1", t.attach)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%+08:00$",
                   t.success_time)
    assert.matches("^4200%d+$", t.transaction_id)
    res = c:call("GET", "/v3/pay/transactions/id/" .. t.transaction_id
                 .. "?mchid=" .. sc.MCHID)
    signed(res)
    assert.equal("st-pay-0001", res.json.out_trade_no)
    -- paid: no second payment, no close, no re-entry
    assert.equal(409, pay("st-pay-0001").status)
    err(c:call("POST", "/v3/pay/transactions/out-trade-no/st-pay-0001/close",
               { mchid = sc.MCHID }), 400, "ORDER_PAID")
    err(prepay("st-pay-0001", { attach = "a1" }), 400, "ORDER_PAID")
  end)

  it("pay refuses a payer_total WeChat could not report: above the "
     .. "order's total, negative, fractional, not a number", function()
    signed(prepay("st-pay-total1"))
    for _, v in ipairs({ 101, 1e300, -1, 2.5, "90" }) do
      local p = pay("st-pay-total1", { payer_total = v })
      assert.equal(400, p.status, tostring(v) .. ": " .. p.body)
      assert.equal("PARAM_ERROR", p.json.code)
      assert.matches("payer_total", p.json.message)
    end
    local res = query("st-pay-total1")
    signed(res)
    assert.equal("NOTPAY", res.json.trade_state)
    -- the whole total (and none of it: a full discount) are fine
    local p = pay("st-pay-total1", { payer_total = 100 })
    assert.equal(200, p.status, p.body)
    assert.equal(100, p.json.amount.payer_total)
    signed(prepay("st-pay-total2"))
    p = pay("st-pay-total2", { payer_total = 0 })
    assert.equal(200, p.status, p.body)
    assert.equal(0, p.json.amount.payer_total)
  end)

  it("NOTPAY -> PAYERROR", function()
    signed(prepay("st-fail-001"))
    local f = sc.control(base, "POST", "/sim/transactions/st-fail-001/fail")
    assert.equal(200, f.status, f.body)
    local res = query("st-fail-001")
    signed(res)
    assert.equal("PAYERROR", res.json.trade_state)
    assert.equal(409, sc.control(base, "POST",
                                 "/sim/transactions/st-fail-001/fail").status)
  end)

  it("NOTPAY -> CLOSED by close: 204 signed over an empty body", function()
    signed(prepay("st-close-01"))
    local path = "/v3/pay/transactions/out-trade-no/st-close-01/close"
    local res = c:call("POST", path, { mchid = sc.MCHID })
    signed(res, 204)
    assert.equal("", res.body)
    signed(c:call("POST", path, { mchid = sc.MCHID }), 204)   -- again
    assert.equal("CLOSED", query("st-close-01").json.trade_state)
    err(prepay("st-close-01"), 400, "ORDER_CLOSED")
    assert.equal(409, pay("st-close-01").status)
    err(c:call("POST", "/v3/pay/transactions/out-trade-no/nope-000/close",
               { mchid = sc.MCHID }), 404, "ORDER_NOT_EXIST")
    err(c:call("POST", path, { mchid = sc.MCHID, extra = 1 }), 400,
        "PARAM_ERROR", "/extra")
  end)

  it("answers ORDER_NOT_EXIST and wants mchid", function()
    err(query("st-none-0001"), 404, "ORDER_NOT_EXIST")
    err(c:call("GET", "/v3/pay/transactions/id/4200000000000000000000000000"
               .. "?mchid=" .. sc.MCHID), 404, "ORDER_NOT_EXIST")
    local res = c:call("GET", "/v3/pay/transactions/out-trade-no/st-none-0001")
    err(res, 400, "PARAM_ERROR", "mchid")
    err(c:call("GET", "/v3/pay/transactions/out-trade-no/st-none-0001?mchid="
               .. sc.MCHID2), 400, "INVALID_REQUEST")
  end)
end)

-- a time_expire of epoch second t, as WeChat writes it (Beijing time)
local function beijing(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", t + 8 * 3600) .. "+08:00"
end

describe("simulator: time_expire_min", function()
  it("refuses a time_expire less than a minute ahead (default 60), as one"
     .. " in the past", function()
    -- before: only the past was refused, so a gateway sending one a little
    -- under a minute ahead passed here and failed at WeChat
    local now = math.ceil(core.time())
    local past = prepay("te-min-past1", { time_expire = beijing(now - 10) })
    err(past, 400, "PARAM_ERROR", "/time_expire")
    local exp = beijing(now + 30)
    local res = prepay("te-min-0030", { time_expire = exp })
    err(res, 400, "PARAM_ERROR", "/time_expire")
    -- the shape of the past case: the same detail keys, location body,
    -- the value echoed, the path in the message
    local d, pd = res.json.detail, past.json.detail
    assert.equal("body", d.location)
    assert.equal(exp, d.value)
    assert.matches("60", d.issue, 1, true)
    assert.matches("/time_expire", res.json.message, 1, true)
    assert.matches(d.issue, res.json.message, 1, true)
    local keys, pkeys = {}, {}
    for k in pairs(d) do keys[#keys + 1] = k end
    for k in pairs(pd) do pkeys[#pkeys + 1] = k end
    table.sort(keys)
    table.sort(pkeys)
    assert.same(pkeys, keys)
    assert.equal(past.headers["content-type"], res.headers["content-type"])
    assert.equal(404, query("te-min-0030").status)      -- nothing stored
    -- 61 s ahead (from the next whole second): taken
    signed(prepay("te-min-0061", { time_expire = beijing(now + 61) }))
    assert.equal("NOTPAY", query("te-min-0061").json.trade_state)
  end)
end)

describe("simulator: time_expire_min = 0", function()
  local srv0, c0, keys0

  setup(function()
    local s0, _, cl0 = sc.start(1, "time_expire_min = 0,")
    srv0, c0 = s0, cl0
    keys0 = c0:platform_keys()
  end)

  teardown(function() if srv0 then srv0:stop() end end)

  it("takes a time_expire 30 s ahead; one in the past is still refused",
     function()
    local now = math.ceil(core.time())
    sc.assert_signed(c0:prepay("te-zero-0030",
      { time_expire = beijing(now + 30) }), keys0)
    err(c0:prepay("te-zero-past", { time_expire = beijing(now - 10) }), 400,
        "PARAM_ERROR", "/time_expire")
  end)

  it("NOTPAY -> CLOSED when time_expire passes", function()
    local exp = beijing(os.time() + 2)
    sc.assert_signed(c0:prepay("st-expire-1", { time_expire = exp }), keys0)
    assert.equal("NOTPAY", c0:query("st-expire-1").json.trade_state)
    assert(proc.wait_until(function()
      return c0:query("st-expire-1").json.trade_state == "CLOSED"
    end, 10, "the order to expire"))
    assert.equal(409, c0:pay("st-expire-1").status)
  end)
end)

describe("simulator: refunds", function()
  local function get_refund(no)
    return c:call("GET", "/v3/refund/domestic/refunds/" .. no)
  end
  local function settle(no, status)
    return sc.control(base, "POST", "/sim/refunds/" .. no .. "/settle",
                      { status = status })
  end

  it("refuses a refund of an unpaid or unknown order", function()
    signed(prepay("rf-unpaid-1"))
    err(refund("rf-unpaid-1", "rf-unpaid-r1", 10), 400, "INVALID_REQUEST")
    err(refund("rf-none-0001", "rf-none-r1", 10), 404, "RESOURCE_NOT_EXISTS")
    err(get_refund("rf-none-r1"), 404, "RESOURCE_NOT_EXISTS")
  end)

  it("partial refunds up to what is left; idempotent out_refund_no",
     function()
    signed(prepay("rf-order-01"))
    assert.equal(200, pay("rf-order-01").status)
    local r1 = refund("rf-order-01", "rf-r-0001", 30)
    signed(r1)
    assert.equal("PROCESSING", r1.json.status)
    assert.equal(30, r1.json.amount.refund)
    assert.equal(100, r1.json.amount.total)
    assert.matches("^50%d+$", r1.json.refund_id)
    assert.equal("REFUND", query("rf-order-01").json.trade_state)
    -- the same request again: the same refund
    local again = refund("rf-order-01", "rf-r-0001", 30)
    signed(again)
    assert.equal(r1.json.refund_id, again.json.refund_id)
    -- the same out_refund_no with another amount
    err(refund("rf-order-01", "rf-r-0001", 31), 400, "INVALID_REQUEST")
    signed(refund("rf-order-01", "rf-r-0002", 50))
    -- 20 left
    local over = refund("rf-order-01", "rf-r-0003", 21)
    err(over, 400, "INVALID_REQUEST", "/amount/refund")
    err(refund("rf-order-01", "rf-r-0003", 20,
               { amount = { refund = 20, total = 99, currency = "CNY" } }),
        400, "INVALID_REQUEST", "/amount/total")
    -- a closed refund gives its amount back
    local s = settle("rf-r-0002", "CLOSED")
    assert.equal(200, s.status, s.body)
    assert.equal("CLOSED", s.json.status)
    signed(refund("rf-order-01", "rf-r-0003", 21))
    -- SUCCESS, seen by the query, with its time
    s = settle("rf-r-0001", "SUCCESS")
    assert.equal(200, s.status, s.body)
    local q = get_refund("rf-r-0001")
    signed(q)
    assert.equal("SUCCESS", q.json.status)
    assert.is_string(q.json.success_time)
    assert.equal("rf-order-01", q.json.out_trade_no)
    -- settled once only
    assert.equal(409, settle("rf-r-0001", "CLOSED").status)
    -- by transaction_id too
    local tid = query("rf-order-01").json.transaction_id
    local r4 = c:call("POST", "/v3/refund/domestic/refunds", {
      transaction_id = tid, out_refund_no = "rf-r-0004",
      amount = { refund = 1, total = 100, currency = "CNY" } })
    signed(r4)
    assert.equal("rf-order-01", r4.json.out_trade_no)
  end)

  it("makes a refund in the merchant platform (control API): the order"
     .. " REFUND, the refund queried and settled as any", function()
    local function outside(no, body)
      return sc.control(base, "POST", "/sim/transactions/" .. no
                        .. "/refund", body)
    end
    signed(prepay("rf-mp-order1"))
    -- not paid: nothing to refund
    assert.equal(409, outside("rf-mp-order1", {}).status)
    assert.equal(404, outside("rf-mp-none01", {}).status)
    assert.equal(200, pay("rf-mp-order1").status)
    assert.equal(400, outside("rf-mp-order1", { amount = 0 }).status)
    assert.equal(400, outside("rf-mp-order1",
                              { out_refund_no = "bad no" }).status)
    local r = outside("rf-mp-order1", { amount = 40 })
    assert.equal(200, r.status, r.body)
    assert.matches("^MP%d+$", r.json.out_refund_no)
    assert.equal("PROCESSING", r.json.status)
    assert.equal(40, r.json.amount.refund)
    assert.equal("REFUND", query("rf-mp-order1").json.trade_state)
    -- the merchant's API sees what is left: 60, not 100
    err(refund("rf-mp-order1", "rf-mp-api-01", 61), 400, "INVALID_REQUEST",
        "/amount/refund")
    assert.equal(409, outside("rf-mp-order1", { amount = 61 }).status)
    -- a number of the caller's, queried and settled as any refund
    r = outside("rf-mp-order1", { amount = 60, out_refund_no = "mp-own-1" })
    assert.equal(200, r.status, r.body)
    assert.equal(409, outside("rf-mp-order1", { amount = 1,
                              out_refund_no = "mp-own-1" }).status)
    assert.equal(200, settle("mp-own-1", "SUCCESS").status)
    local q = get_refund("mp-own-1")
    signed(q)
    assert.equal("SUCCESS", q.json.status)
  end)

  it("refuses a refund more than a year after the payment; pays at a"
     .. " success_time given to the control API", function()
    local function ago(days)      -- in Beijing time, as WeChat writes it
      return os.date("!%Y-%m-%dT%H:%M:%S+08:00",
                     os.time() - days * 86400 + 8 * 3600)
    end
    -- paid 367 days ago (and made then: an order is never paid before it
    -- is made): a year ago by any count, so not refundable
    -- (the time taken once: a midnight may pass during the case)
    local paid = ago(367)
    signed(prepay("rf-old-0001"))
    local p = pay("rf-old-0001", { create_time = ago(368),
                                   success_time = paid })
    assert.equal(200, p.status, p.body)
    assert.equal(paid:sub(1, 10), p.json.success_time:sub(1, 10))
    local q = query("rf-old-0001")
    signed(q)
    assert.equal(p.json.success_time, q.json.success_time)
    err(refund("rf-old-0001", "rf-old-r1", 10), 400, "INVALID_REQUEST",
        "/out_trade_no")
    err(get_refund("rf-old-r1"), 404, "RESOURCE_NOT_EXISTS")
    assert.equal("SUCCESS", query("rf-old-0001").json.trade_state)
    -- paid 200 days ago: refunded
    signed(prepay("rf-old-0002"))
    assert.equal(200, pay("rf-old-0002", { create_time = ago(201),
                                           success_time = ago(200) }).status)
    signed(refund("rf-old-0002", "rf-old-r2", 10))
    -- the time of a payment is in the past, before the days whose bills
    -- can still be downloaded (92): no bill already made changes
    for i, bad in ipairs({ ago(-1), ago(10), "2020-01-01", 1700000000 }) do
      local no = "rf-old-bad" .. i
      signed(prepay(no))
      local b = pay(no, { success_time = bad })
      assert.equal(400, b.status, tostring(bad) .. ": " .. b.body)
      assert.equal("PARAM_ERROR", b.json.code)
      assert.matches("success_time", b.json.message)
      assert.equal("NOTPAY", query(no).json.trade_state)
    end
  end)

  it("refuses a success_time before the order was made, naming its create"
     .. " time", function()
    local function ago(days)      -- in Beijing time, as WeChat writes it
      return os.date("!%Y-%m-%dT%H:%M:%S+08:00",
                     os.time() - days * 86400 + 8 * 3600)
    end
    -- made now (its prepay), paid 200 days ago: WeChat never does that
    -- (the times taken once: a second may pass during the case)
    local paid, later, earlier = ago(200), ago(199), ago(201)
    local t0 = os.time()
    signed(prepay("st-early-01"))
    local b = pay("st-early-01", { success_time = paid })
    assert.equal(400, b.status, b.body)
    assert.equal("PARAM_ERROR", b.json.code)
    assert.matches("success_time " .. paid .. " is before the order's"
                   .. " create time", b.json.message, 1, true)
    local made = b.json.message:match("create time (%S+):")
    local at = require("paygate.civil").epoch(made)
    assert.is_true(at >= t0 - 1 and at <= os.time(), made)
    assert.equal("NOTPAY", query("st-early-01").json.trade_state)
    -- create_time moved back, but still after the success_time: refused,
    -- naming that create time
    b = pay("st-early-01", { create_time = later, success_time = paid })
    assert.equal(400, b.status, b.body)
    assert.matches("create time " .. later, b.json.message, 1, true)
    -- create_time alone, or not a time: refused
    for _, body in ipairs({ { create_time = earlier },
                            { create_time = "yesterday",
                              success_time = paid } }) do
      b = pay("st-early-01", body)
      assert.equal(400, b.status, b.body)
      assert.matches("create_time", b.json.message)
    end
    assert.equal("NOTPAY", query("st-early-01").json.trade_state)
    -- made the same second it is paid, or before: taken
    local p = pay("st-early-01", { create_time = paid, success_time = paid })
    assert.equal(200, p.status, p.body)
    assert.equal(paid, p.json.success_time)
  end)

  it("ABNORMAL -> PROCESSING by apply-abnormal-refund", function()
    signed(prepay("rf-abn-0001"))
    assert.equal(200, pay("rf-abn-0001").status)
    local r = refund("rf-abn-0001", "rf-abn-r1", 100)
    signed(r)
    local id = r.json.refund_id
    local path = "/v3/refund/domestic/refunds/" .. id
                 .. "/apply-abnormal-refund"
    -- not abnormal yet
    err(c:call("POST", path, { out_refund_no = "rf-abn-r1",
                               type = "MERCHANT_BANK_CARD" }),
        400, "INVALID_REQUEST")
    assert.equal(200, settle("rf-abn-r1", "ABNORMAL").status)
    assert.equal("ABNORMAL", get_refund("rf-abn-r1").json.status)
    -- a user's bank card: its fields encrypted for the platform key
    local serial, cert = next(keys)
    while serial:sub(1, 11) == "PUB_KEY_ID_" do serial, cert = next(keys, serial) end
    local function enc(s)
      return crypto.base64_encode(assert(crypto.oaep_encrypt(cert, s)))
    end
    local body = { out_refund_no = "rf-abn-r1", type = "USER_BANK_CARD",
                   bank_type = "ICBC_DEBIT",
                   bank_account = enc("6212260000000000000"),
                   real_name = enc("张三") }
    err(c:call("POST", path, body), 400, "PARAM_ERROR", "Wechatpay-Serial")
    err(c:call("POST", path, body, { headers = {
      ["Wechatpay-Serial"] = "0123456789ABCDEF0123456789ABCDEF01234567" } }),
      400, "PARAM_ERROR", "Wechatpay-Serial")
    local bad = { out_refund_no = "rf-abn-r1", type = "USER_BANK_CARD",
                  bank_type = "ICBC_DEBIT", bank_account = "bm90IGVuY3J5cHRlZA==",
                  real_name = body.real_name }
    err(c:call("POST", path, bad, { headers = { ["Wechatpay-Serial"] = serial } }),
        400, "PARAM_ERROR", "/bank_account")
    local res = c:call("POST", path, body,
                       { headers = { ["Wechatpay-Serial"] = serial } })
    signed(res)
    assert.equal("PROCESSING", res.json.status)
    assert.equal(200, settle("rf-abn-r1", "SUCCESS").status)
    err(c:call("POST", "/v3/refund/domestic/refunds/5000000/apply-abnormal"
               .. "-refund", { out_refund_no = "rf-abn-r1",
               type = "MERCHANT_BANK_CARD" }), 404, "RESOURCE_NOT_EXISTS")
  end)
end)

describe("simulator: partner (service provider) mode", function()
  local function partner_body(no, over)
    local b = { sp_appid = sc.APPID, sp_mchid = sc.MCHID, sub_mchid = sc.SUB,
                sub_appid = sc.SUB_APPID, description = "子商户商品",
                out_trade_no = no, notify_url = "https://sp.example/notify",
                amount = { total = 100 }, payer = { sub_openid = "oSub1" } }
    for k, v in pairs(over or {}) do b[k] = v end
    return b
  end

  it("prepay, query, pay, refund and close for a sub-merchant", function()
    local res = c:call("POST", "/v3/pay/partner/transactions/jsapi",
                       partner_body("pt-order-01"))
    signed(res)
    local q = "/v3/pay/partner/transactions/out-trade-no/pt-order-01?sp_mchid="
              .. sc.MCHID .. "&sub_mchid=" .. sc.SUB
    res = c:call("GET", q)
    signed(res)
    assert.equal(sc.SUB, res.json.sub_mchid)
    assert.equal(sc.MCHID, res.json.sp_mchid)
    assert.equal("NOTPAY", res.json.trade_state)
    -- the direct path does not see the sub-merchant's orders
    err(query("pt-order-01"), 404, "ORDER_NOT_EXIST")
    local p = sc.control(base, "POST", "/sim/transactions/pt-order-01/pay"
                         .. "?mchid=" .. sc.SUB, {})
    assert.equal(200, p.status, p.body)
    res = c:call("GET", q)
    assert.equal("SUCCESS", res.json.trade_state)
    assert.equal("oSub1", res.json.payer.sub_openid)
    res = c:call("POST", "/v3/refund/domestic/refunds", {
      sub_mchid = sc.SUB, out_trade_no = "pt-order-01", out_refund_no = "pt-r1",
      amount = { refund = 10, total = 100, currency = "CNY" } })
    signed(res)
    signed(c:call("GET", "/v3/refund/domestic/refunds/pt-r1?sub_mchid="
                  .. sc.SUB))
    err(c:call("GET", "/v3/refund/domestic/refunds/pt-r1"), 404,
        "RESOURCE_NOT_EXISTS")
    -- another order, closed (a native one: no payer; { payer = nil }
    -- as over removed nothing)
    local native = partner_body("pt-order-02")
    native.payer = nil
    signed(c:call("POST", "/v3/pay/partner/transactions/native", native))
    res = c:call("POST",
      "/v3/pay/partner/transactions/out-trade-no/pt-order-02/close",
      { sp_mchid = sc.MCHID, sub_mchid = sc.SUB })
    signed(res, 204)
  end)

  it("refuses a sub-merchant that is not the provider's", function()
    err(c:call("POST", "/v3/pay/partner/transactions/jsapi",
               partner_body("pt-bad-0001", { sub_mchid = "1999999999" })),
        400, "INVALID_REQUEST", "/sub_mchid")
    err(c:call("POST", "/v3/pay/partner/transactions/jsapi",
               partner_body("pt-bad-0002", { sub_appid = "wx0000" })),
        400, "APPID_MCHID_NOT_MATCH")
    err(c:call("POST", "/v3/pay/partner/transactions/jsapi",
               partner_body("pt-bad-0003", { payer = {} })),
        400, "PARAM_ERROR", "/payer/sp_openid")
  end)

  it("names a refused query parameter with location query", function()
    -- a merchant that reads detail.location to tell its own query from
    -- its body must be told "query" when the query is at fault
    local function at_query(res, field)
      err(res, 400, "INVALID_REQUEST", field)
      assert.equal("query", res.json.detail.location, res.body)
    end
    at_query(c:call("GET", "/v3/pay/transactions/out-trade-no/st-none-0001"
                    .. "?mchid=" .. sc.MCHID2), "mchid")
    local q = "/v3/pay/partner/transactions/out-trade-no/pt-none-01"
    at_query(c:call("GET", q .. "?sp_mchid=" .. sc.MCHID2 .. "&sub_mchid="
                    .. sc.SUB), "sp_mchid")
    at_query(c:call("GET", q .. "?sp_mchid=" .. sc.MCHID
                    .. "&sub_mchid=1999999999"), "sub_mchid")
    at_query(c:call("GET", "/v3/refund/domestic/refunds/pt-r1?sub_mchid="
                    .. "1999999999"), "sub_mchid")
    -- in a body, as before: a JSON pointer, location body
    local res = c:call("POST", "/v3/pay/partner/transactions/jsapi",
                       partner_body("pt-bad-0004", { sub_mchid = "1999999999" }))
    err(res, 400, "INVALID_REQUEST", "/sub_mchid")
    assert.equal("body", res.json.detail.location)
  end)
end)

describe("simulator: partner orders belong to their service provider",
         function()
  -- A sub-merchant moves from MCHID to MCHID2 across a restart on the same
  -- state: MCHID2 may now act for it, but MCHID's orders and refunds for
  -- it stay MCHID's, as WeChat keeps them: to MCHID2 they do not exist.
  it("another provider of the same sub-merchant finds none of them",
     function()
    local dir = server.tmpdir()
    local conf = sc.config(dir .. "/state", "workers = 1,")
    local s = server.start{ app = "examples/simulator", config = conf }
    local sbase = "http://127.0.0.1:" .. s.port
    local c1 = sc.new{ base = sbase }
    local sub = (", sub_merchants = { { mchid = %q, appids = { %q } } }")
                :format(sc.SUB, sc.SUB_APPID)
    local ok, e = pcall(function()
      local res = c1:call("POST", "/v3/pay/partner/transactions/jsapi", {
        sp_appid = sc.APPID, sp_mchid = sc.MCHID, sub_mchid = sc.SUB,
        sub_appid = sc.SUB_APPID, description = "子商户商品",
        out_trade_no = "mv-order-01", notify_url = "https://sp.example/n",
        amount = { total = 100 }, payer = { sub_openid = "oSub1" } })
      assert.equal(200, res.status, res.body)
      local p = sc.control(sbase, "POST", "/sim/transactions/mv-order-01/pay",
                           {})
      assert.equal(200, p.status, p.body)
      local tid = p.json.transaction_id
      res = c1:call("POST", "/v3/refund/domestic/refunds", {
        sub_mchid = sc.SUB, out_trade_no = "mv-order-01",
        out_refund_no = "mv-r1",
        amount = { refund = 10, total = 100, currency = "CNY" } })
      assert.equal(200, res.status, res.body)
      local refund_id = res.json.refund_id
      s:stop()
      s = nil
      -- the sub-merchant now belongs to MCHID2
      local i = assert(conf:find(sub, 1, true))
      local conf2 = conf:sub(1, i - 1) .. conf:sub(i + #sub)
      local j = assert(conf2:find("appids = { \"" .. sc.APPID .. "\" } },\n"
                                  .. "  },", 1, true))
      j = j + #("appids = { \"" .. sc.APPID .. "\" }")
      conf2 = conf2:sub(1, j - 1) .. sub .. conf2:sub(j)
      s = server.start{ app = "examples/simulator", config = conf2 }
      sbase = "http://127.0.0.1:" .. s.port
      local c2 = sc.new{ base = sbase, mchid = sc.MCHID2,
        serial = sc.SERIAL2, key = assert(crypto.private_key(sc.read(sc.FIX
                                                   .. "a1_merchant_key.pem"))) }
      local q = "?sp_mchid=" .. sc.MCHID2 .. "&sub_mchid=" .. sc.SUB
      err(c2:call("GET", "/v3/pay/partner/transactions/out-trade-no/"
                  .. "mv-order-01" .. q), 404, "ORDER_NOT_EXIST")
      err(c2:call("GET", "/v3/pay/partner/transactions/id/" .. tid .. q),
          404, "ORDER_NOT_EXIST")
      err(c2:call("POST", "/v3/pay/partner/transactions/out-trade-no/"
                  .. "mv-order-01/close",
                  { sp_mchid = sc.MCHID2, sub_mchid = sc.SUB }),
          404, "ORDER_NOT_EXIST")
      err(c2:call("POST", "/v3/refund/domestic/refunds", {
        sub_mchid = sc.SUB, out_trade_no = "mv-order-01",
        out_refund_no = "mv-r2",
        amount = { refund = 10, total = 100, currency = "CNY" } }),
        404, "RESOURCE_NOT_EXISTS")
      err(c2:call("GET", "/v3/refund/domestic/refunds/mv-r1?sub_mchid="
                  .. sc.SUB), 404, "RESOURCE_NOT_EXISTS")
      err(c2:call("POST", "/v3/refund/domestic/refunds/" .. refund_id
                  .. "/apply-abnormal-refund",
                  { sub_mchid = sc.SUB, out_refund_no = "mv-r1",
                    type = "MERCHANT_BANK_CARD" }),
          404, "RESOURCE_NOT_EXISTS")
      -- mv-r1 is the sub-merchant's out_refund_no, made by MCHID: taken
      err(c2:call("POST", "/v3/refund/domestic/refunds", {
        sub_mchid = sc.SUB, out_trade_no = "mv-order-01",
        out_refund_no = "mv-r1",
        amount = { refund = 10, total = 100, currency = "CNY" } }),
        400, "INVALID_REQUEST", "/out_refund_no")
      -- the order is untouched: still paid, 10 refunded
      local p2 = sc.control(sbase, "POST", "/sim/transactions/mv-order-01/pay",
                            {})
      assert.equal(409, p2.status, p2.body)
    end)
    if s then s:stop() end
    os.execute("rm -rf " .. dir)
    assert(ok, e)
  end)
end)

describe("simulator: refunds settle by themselves", function()
  it("with refund_settle_after", function()
    local dir = server.tmpdir()
    local s = server.start{ app = "examples/simulator", config =
      sc.config(dir .. "/state", "workers = 2, refund_settle_after = 0.3,") }
    local old_c, old_base, old_keys = c, base, keys
    base = "http://127.0.0.1:" .. s.port
    c = sc.new{ base = base }
    keys = c:platform_keys()
    local ok, e = pcall(function()
      signed(prepay("auto-0001"))
      assert.equal(200, pay("auto-0001").status)
      local r = refund("auto-0001", "auto-r1", 100)
      signed(r)
      assert.equal("PROCESSING", r.json.status)
      assert(proc.wait_until(function()
        return c:call("GET", "/v3/refund/domestic/refunds/auto-r1").json.status
               == "SUCCESS"
      end, 10, "the refund to settle"))
    end)
    c, base, keys = old_c, old_base, old_keys
    s:stop()
    os.execute("rm -rf " .. dir)
    assert(ok, e)
  end)
end)
