-- The simulator's answers against the protocol's list of what each one
-- carries: the refund object (create, query), the refund notification's
-- resource, ... Driven over HTTP by spec/support/simclient (a client made
-- from the protocol, not from the simulator's code).
local sc = require "support.simclient"

local srv, c, keys, base

local function signed(res, status) sc.assert_signed(res, keys, status) end

setup(function()
  srv, base, c = sc.start(1)
  keys = c:platform_keys()
end)

teardown(function() if srv then srv:stop() end end)

local function paid_order(no, payer_total)
  signed(c:prepay(no))
  local res = c:pay(no, payer_total and { payer_total = payer_total } or nil)
  assert.equal(200, res.status, res.body)
end

local function refund(no, out_refund_no, amount, over)
  local b = { out_trade_no = no, out_refund_no = out_refund_no,
              amount = { refund = amount, total = 100, currency = "CNY" },
              notify_url = "https://merchant.example/refund" }
  for k, v in pairs(over or {}) do b[k] = v end
  return c:refund(b)
end

local function get_refund(no)
  return c:call("GET", "/v3/refund/domestic/refunds/" .. no)
end

-- the JSON text holds key: [] (an empty array, not {} and not absent)
local function empty_array(res, key)
  assert.truthy(res.body:find('"' .. key .. '":[]', 1, true),
                key .. " is not [] in " .. res.body)
end

describe("simulator: the refund object", function()
  it("carries amount.from and promotion_detail ([] for an order paid in "
     .. "full), payer_refund = refund", function()
    paid_order("fid-rf-0001")
    for _, res in ipairs({ refund("fid-rf-0001", "fid-rf-r1", 30),
                           get_refund("fid-rf-r1") }) do
      signed(res)
      empty_array(res, "from")
      empty_array(res, "promotion_detail")
      local a = res.json.amount
      assert.equal(30, a.payer_refund)
      assert.equal(0, a.discount_refund)
      assert.equal(30, a.settlement_refund)
      assert.equal(100, a.settlement_total)
      assert.equal(100, a.payer_total)
      assert.equal("CNY", a.currency)
    end
  end)

  it("echoes the request's amount.from", function()
    paid_order("fid-rf-0002")
    local from = { { account = "AVAILABLE", amount = 20 },
                   { account = "UNAVAILABLE", amount = 10 } }
    local r = refund("fid-rf-0002", "fid-rf-r2", 30,
      { amount = { refund = 30, total = 100, currency = "CNY", from = from } })
    signed(r)
    assert.same(from, r.json.amount.from)
    assert.same(from, get_refund("fid-rf-r2").json.amount.from)
  end)

  it("gives the payer back its share of an order paid with a discount",
     function()
    paid_order("fid-rf-0003", 80)          -- 20 of 100 was a discount
    local r = refund("fid-rf-0003", "fid-rf-r3", 50)
    signed(r)
    local a = r.json.amount
    assert.equal(80, a.payer_total)
    assert.equal(40, a.payer_refund)
    assert.equal(10, a.discount_refund)
    assert.equal(1, #r.json.promotion_detail)
    local p = r.json.promotion_detail[1]
    assert.equal(20, p.amount)
    assert.equal(10, p.refund_amount)
    assert.equal("GLOBAL", p.scope)
    assert.is_string(p.promotion_id)
    -- the rest: the payer gets back exactly what it paid in all
    local r2 = refund("fid-rf-0003", "fid-rf-r4", 50)
    signed(r2)
    assert.equal(40, r2.json.amount.payer_refund)
    assert.equal(40, get_refund("fid-rf-r4").json.amount.payer_refund)
    -- the notification's resource says the same
    local s = sc.control(base, "POST", "/sim/refunds/fid-rf-r3/settle",
                         { status = "SUCCESS" })
    assert.equal(200, s.status, s.body)
    assert.equal(40, s.json.amount.payer_refund)
    local n = sc.control(base, "GET", "/sim/notifications?out_refund_no="
                         .. "fid-rf-r3")
    assert.equal(200, n.status, n.body)
    local res = n.json[1].resource
    assert.equal(80, res.amount.payer_total)
    assert.equal(40, res.amount.payer_refund)
    assert.equal(50, res.amount.refund)
  end)

  it("gives back exactly payer_total over partial refunds of the whole "
     .. "total", function()
    paid_order("fid-rf-0004", 80)
    local sum, dsum = 0, 0
    for i, amount in ipairs({ 33, 33, 34 }) do
      local r = refund("fid-rf-0004", "fid-rf-p" .. i, amount)
      signed(r)
      sum = sum + r.json.amount.payer_refund
      dsum = dsum + r.json.amount.discount_refund
      assert.equal(amount, r.json.amount.payer_refund
                           + r.json.amount.discount_refund)
    end
    assert.equal(80, sum)
    assert.equal(20, dsum)
    -- each keeps its own: the query says what the create said
    assert.equal(28, get_refund("fid-rf-p3").json.amount.payer_refund)
  end)

  it("never gives back more than payer_total when a refund was closed "
     .. "between others", function()
    paid_order("fid-rf-0005", 80)
    -- 1 fen gives the payer 0 (its share rounds down), the next 1
    local r1 = refund("fid-rf-0005", "fid-rf-c1", 1)
    signed(r1)
    assert.equal(0, r1.json.amount.payer_refund)
    local r2 = refund("fid-rf-0005", "fid-rf-c2", 1)
    signed(r2)
    assert.equal(1, r2.json.amount.payer_refund)
    -- the first closed: its fen can be refunded again
    local s = sc.control(base, "POST", "/sim/refunds/fid-rf-c1/settle",
                         { status = "CLOSED" })
    assert.equal(200, s.status, s.body)
    -- the rest of the total: with the second refund, the payer gets back
    -- what it paid (80), not 81
    local r3 = refund("fid-rf-0005", "fid-rf-c3", 99)
    signed(r3)
    local a = r3.json.amount
    assert.equal(99, a.payer_refund + a.discount_refund)
    assert.equal(80, r2.json.amount.payer_refund + a.payer_refund)
    assert.equal(20, r2.json.amount.discount_refund + a.discount_refund)
  end)
end)

describe("simulator: an expired merchant certificate", function()
  local server = require "support.server"
  -- the A.4 fixture: the merchant's certificate (SERIAL), expired 2025-05-09
  local function start_with_a4(extra)
    local dir = server.tmpdir()
    local conf = sc.config(dir .. "/state", "workers = 1," .. (extra or ""))
      :gsub('merchant_certificate = "[^"]+"', ('merchant_certificate = %q')
            :format(sc.abs(sc.FIX .. "a4_merchant_cert.pem")), 1)
    local s = server.start{ app = "examples/simulator", config = conf }
    return s, sc.new{ base = "http://127.0.0.1:" .. s.port }
  end

  it("refuses its requests: 401 SIGN_ERROR naming the serial; warns at "
     .. "the start", function()
    local s, a4 = start_with_a4()
    local res = a4:call("GET", "/v3/certificates")
    -- a request that does not prove the key (a bad signature) is told
    -- so, and nothing of the certificate's end
    local forged = a4:call("GET", "/v3/certificates", nil,
      { key = assert(require("paygate.crypto").private_key(
          sc.read(sc.FIX .. "a1_merchant_key.pem"))) })
    local logs = s:logs()
    s:stop()
    sc.assert_err(forged, 401, "SIGN_ERROR", "signature")
    assert.falsy(forged.body:find("2025", 1, true), forged.body)
    sc.assert_err(res, 401, "SIGN_ERROR", "serial_no")
    assert.truthy(res.json.message:find(sc.SERIAL, 1, true), res.body)
    assert.truthy(res.json.message:find("2025-05-09", 1, true), res.body)
    assert.equal("authorization", res.json.detail.location)
    assert.truthy(logs:find("expired at 2025-05-09", 1, true), logs)
  end)

  it("accepts them with accept_expired_merchant_certificates = true",
     function()
    local s, a4 = start_with_a4("accept_expired_merchant_certificates = true,")
    local res = a4:call("GET", "/v3/certificates")
    s:stop()
    assert.equal(200, res.status, res.body)
  end)

  it("a certificate valid now passes (the specs' own, made at test time)",
     function()
    signed(c:call("GET", "/v3/certificates"))
  end)
end)

describe("simulator: the Transaction object", function()
  it("carries promotion_detail: [] unpaid and paid in full", function()
    signed(c:prepay("fid-tx-0001"))
    local q = c:query("fid-tx-0001")
    signed(q)
    assert.equal("NOTPAY", q.json.trade_state)
    empty_array(q, "promotion_detail")
    assert.equal(200, c:pay("fid-tx-0001").status)
    q = c:query("fid-tx-0001")
    signed(q)
    empty_array(q, "promotion_detail")
    assert.equal(100, q.json.amount.payer_total)
  end)

  it("carries scene_info unpaid, as a real NOTPAY answer does: device_id "
     .. "\"\" when the prepay gave none", function()
    signed(c:prepay("fid-tx-0003"))
    local q = c:query("fid-tx-0003")
    signed(q)
    assert.equal("NOTPAY", q.json.trade_state)
    assert.same({ device_id = "" }, q.json.scene_info, q.body)
    -- the prepay's device_id when it gave one (a scene_info without it too)
    signed(c:prepay("fid-tx-0004", { scene_info = {
      payer_client_ip = "14.23.150.211", device_id = "013467" } }))
    assert.same({ device_id = "013467" }, c:query("fid-tx-0004").json
                                           .scene_info)
    signed(c:prepay("fid-tx-0005", { scene_info = {
      payer_client_ip = "14.23.150.211" } }))
    assert.same({ device_id = "" }, c:query("fid-tx-0005").json.scene_info)
    -- once paid, only a device_id the prepay gave, as before
    assert.equal(200, c:pay("fid-tx-0003").status)
    q = c:query("fid-tx-0003")
    assert.equal("SUCCESS", q.json.trade_state)
    assert.is_nil(q.json.scene_info, q.body)
    assert.equal(200, c:pay("fid-tx-0004").status)
    assert.same({ device_id = "013467" }, c:query("fid-tx-0004").json
                                           .scene_info)
  end)

  it("names the discount of an order paid for less than its total, in "
     .. "the query and the TRANSACTION.SUCCESS resource", function()
    paid_order("fid-tx-0002", 70)
    local q = c:query("fid-tx-0002")
    signed(q)
    local n = sc.control(base, "GET", "/sim/notifications?out_trade_no="
                         .. "fid-tx-0002")
    assert.equal(200, n.status, n.body)
    for _, t in ipairs({ q.json, n.json[1].resource }) do
      assert.equal(70, t.amount.payer_total)
      assert.equal(1, #t.promotion_detail)
      local p = t.promotion_detail[1]
      -- what the payer paid and the promotions make the total
      assert.equal(100, t.amount.payer_total + p.amount)
      assert.equal("GLOBAL", p.scope)
      assert.equal("CNY", p.currency)
      assert.is_string(p.coupon_id)
      assert.equal(p.amount, p.wechatpay_contribute + p.merchant_contribute
                             + p.other_contribute)
    end
  end)
end)

describe("simulator: a PAYERROR answer", function()
  it("leaves payer out when no payer is known (no empty payer {})",
     function()
    signed(c:prepay("fid-pe-0001", { payer = false }, "native"))
    local f = sc.control(base, "POST", "/sim/transactions/fid-pe-0001/fail",
                         {})
    assert.equal(200, f.status, f.body)
    local q = c:query("fid-pe-0001")
    signed(q)
    assert.equal("PAYERROR", q.json.trade_state)
    assert.is_nil(q.json.payer, q.body)
    -- a JSAPI order knows its payer from the prepay
    signed(c:prepay("fid-pe-0002"))
    assert.equal(200, sc.control(base, "POST",
      "/sim/transactions/fid-pe-0002/fail", {}).status)
    assert.equal("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
                 c:query("fid-pe-0002").json.payer.openid)
  end)
end)

describe("simulator: error faults without a code", function()
  it("take WeChat's code for the status: 503 SERVICE_UNAVAILABLE, 429 "
     .. "FREQUENCY_LIMITED with its words, 401 SIGN_ERROR, 403 NO_AUTH, "
     .. "404 ORDER_NOT_EXIST", function()
    signed(c:prepay("fid-ft-0001"))
    for _, t in ipairs({ { 503, "SERVICE_UNAVAILABLE" },
                         { 502, "SERVICE_UNAVAILABLE" },
                         { 500, "SYSTEM_ERROR", "系统繁忙,请稍后重试" },
                         { 429, "FREQUENCY_LIMITED", "请求频率超过限制" },
                         -- a 401 is only ever SIGN_ERROR; 403 and 404 as
                         -- WeChat's table of statuses names them
                         { 401, "SIGN_ERROR" }, { 403, "NO_AUTH" },
                         { 404, "ORDER_NOT_EXIST" },
                         { 400, "INVALID_REQUEST" } }) do
      local f = sc.control(base, "POST", "/sim/faults", { endpoint = "query",
                           kind = "error", status = t[1], count = 1 })
      assert.equal(200, f.status, f.body)
      local res = c:query("fid-ft-0001")
      sc.assert_err(res, t[1], t[2])
      if t[3] then assert.equal(t[3], res.json.message) end
    end
    signed(c:query("fid-ft-0001"))
  end)
end)
