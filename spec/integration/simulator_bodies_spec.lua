-- What the simulator takes in a request body and gives back in an answer:
-- a control-API body must be a JSON object with its known fields of
-- their types (refused before anything changes); a /v3 body's arrays of
-- objects (detail.goods_detail, amount.from) are arrays of objects; a
-- refused value is echoed by its type, never as a Lua table's address;
-- and an answer that echoes request bytes is valid UTF-8.
local paygate = require "paygate"
local utf8 = require "paygate.utf8"
local json = require "cjson.safe"
local sc = require "support.simclient"

local srv, c, base

local err = sc.assert_err

-- a control request with body sent exactly as given
local function control(method, path, body)
  local res = assert(paygate.http.request{ method = method,
    url = base .. path, body = body, timeout = 10,
    headers = body and { ["Content-Type"] = "application/json" } or nil })
  res.json = res.body ~= "" and json.decode(res.body) or nil
  return res
end

-- 400 in the control API's shape, with a reason
local function refused(res, pattern)
  assert.equal(400, res.status, res.body)
  assert.equal("PARAM_ERROR", res.json.code, res.body)
  assert.is_string(res.json.message)
  if pattern then assert.matches(pattern, res.json.message) end
end

local function state(no) return c:query(no).json.trade_state end

local function valid_utf8(res)
  assert.truthy(utf8.len(res.body), "not UTF-8: " .. res.body)
  assert.is_nil(res.body:find("table: 0x", 1, true), res.body)
end

local function refund(b)
  return c:refund(b)
end

setup(function()
  srv, base, c = sc.start(1)
end)

teardown(function() if srv then srv:stop() end end)

-- bodies that are not a JSON object, whatever the route
local NOT_OBJECTS = { "[1]", "[]", '"x"', "5", "null", "not json",
                      '{"payer_total": 0x10}', '{"a": 1} x', "{" }

describe("simulator control API: bodies", function()
  it("pay and fail refuse a body that is not a JSON object", function()
    assert.equal(200, c:prepay("cb-pay-0001").status)
    for _, body in ipairs(NOT_OBJECTS) do
      refused(control("POST", "/sim/transactions/cb-pay-0001/pay", body),
              "JSON object")
      refused(control("POST", "/sim/transactions/cb-pay-0001/fail", body),
              "JSON object")
    end
    assert.equal("NOTPAY", state("cb-pay-0001"))
    -- what it got, in words
    assert.equal("body must be a JSON object (got a JSON array)", control(
      "POST", "/sim/transactions/cb-pay-0001/pay", "[1]").json.message)
  end)

  it("pay and fail refuse known fields of the wrong type", function()
    assert.equal(200, c:prepay("cb-pay-0002").status)
    for _, b in ipairs({ '{"payer_total": "1"}', '{"payer_total": 1.5}',
                         '{"bank_type": 5}', '{"openid": {}}',
                         '{"bank_type": ""}', '{"openid": false}',
                         '{"openid": "o\255"}' }) do
      refused(control("POST", "/sim/transactions/cb-pay-0002/pay", b))
    end
    for _, b in ipairs({ '{"bank_type": 5}', '{"bank_type": ["CMB"]}',
                         '{"bank_type": null}' }) do
      refused(control("POST", "/sim/transactions/cb-pay-0002/fail", b),
              "bank_type")
    end
    assert.equal("NOTPAY", state("cb-pay-0002"))
    -- a proper body still pays; no body at all too
    local res = control("POST", "/sim/transactions/cb-pay-0002/fail",
                        '{"bank_type": "CMB_DEBIT"}')
    assert.equal(200, res.status, res.body)
    assert.equal(200, c:prepay("cb-pay-0003").status)
    res = control("POST", "/sim/transactions/cb-pay-0003/pay")
    assert.equal(200, res.status, res.body)
  end)

  it("settle refuses a non-object body and a status not a string",
     function()
    assert.equal(200, c:prepay("cb-set-0001").status)
    assert.equal(200, c:pay("cb-set-0001").status)
    local r = refund({ out_trade_no = "cb-set-0001", out_refund_no = "cb-r1",
      amount = { refund = 10, total = 100, currency = "CNY" } })
    assert.equal(200, r.status, r.body)
    for _, body in ipairs(NOT_OBJECTS) do
      refused(control("POST", "/sim/refunds/cb-r1/settle", body),
              "JSON object")
    end
    for _, b in ipairs({ '{"status": false}', '{"status": ["CLOSED"]}',
                         '{"status": null}' }) do
      refused(control("POST", "/sim/refunds/cb-r1/settle", b), "status")
    end
    local q = c:call("GET", "/v3/refund/domestic/refunds/cb-r1")
    assert.equal("PROCESSING", q.json.status, q.body)
  end)

  it("rotate, faults and bills/close refuse them too, changing nothing",
     function()
    local before = control("GET", "/sim/platform-certificates").body
    for _, body in ipairs(NOT_OBJECTS) do
      refused(control("POST", "/sim/certificates/rotate", body),
              "JSON object")
      refused(control("POST", "/sim/faults", body), "JSON object")
      refused(control("POST", "/sim/bills/close", body), "JSON object")
    end
    refused(control("POST", "/sim/certificates/rotate", '{"delay": "5"}'),
            "delay")
    -- past a year: the new certificate (valid for five) might never be
    -- used
    refused(control("POST", "/sim/certificates/rotate",
                    '{"delay": 40000000}'), "at most 31536000")
    refused(control("POST", "/sim/faults", '{"endpoint": "query", "kind": '
      .. '"error", "after": "yes"}'), "after")
    refused(control("POST", "/sim/faults", '{"endpoint": "query", "kind": '
      .. '"error", "count": "1"}'), "count")
    -- a key the kind does not take: a typo of count would fire forever
    refused(control("POST", "/sim/faults", '{"endpoint": "query", "kind": '
      .. '"error", "cout": 1}'), "unknown key cout")
    refused(control("POST", "/sim/faults", '{"endpoint": "query", "kind": '
      .. '"latency", "status": 500}'), "unknown key status")
    refused(control("POST", "/sim/bills/close", '{"bill_date": 20260101}'),
            "bill_date")
    assert.equal(before, control("GET", "/sim/platform-certificates").body)
    assert.equal("[]", control("GET", "/sim/faults").body)
  end)
end)

describe("simulator /v3: bodies", function()
  it("a POST body must be a JSON object", function()
    -- a prepay good but for its total written in hex, or as Infinity
    local good = json.encode(sc.prepay_body("cb-js-0001",
                                            { amount = { total = 100 } }))
    local bodies = { "[1]", "[]", '"x"', "{", '{"mchid":"1"} x',
                     (good:gsub('"total":100', '"total":0x64')),
                     (good:gsub('"total":100', '"total":Infinity')) }
    for _, body in ipairs(bodies) do
      for _, path in ipairs({ "/v3/pay/transactions/jsapi",
          "/v3/pay/transactions/out-trade-no/cb-js-0001/close" }) do
        local res = c:call("POST", path, body)
        err(res, 400, "PARAM_ERROR")
        assert.equal("body", res.json.detail.location, res.body)
        assert.matches("JSON", res.json.detail.issue, 1, true)
        assert.is_nil(res.json.detail.field, res.body)
      end
    end
    -- nothing was made
    assert.equal(404, c:query("cb-js-0001").status)
  end)

  it("detail.goods_detail is a non-empty array of objects", function()
    local good = { merchant_goods_id = "g1", quantity = 1, unit_price = 1 }
    local function gd(no, v, field)
      local res = c:prepay(no, { detail = { goods_detail = v } })
      err(res, 400, "PARAM_ERROR", field)
      valid_utf8(res)
      return res
    end
    local res = gd("cb-gd-0001", good, "/detail/goods_detail")
    assert.equal("an object", res.json.detail.value)
    gd("cb-gd-0001", {}, "/detail/goods_detail")
    gd("cb-gd-0001", "g1", "/detail/goods_detail")
    res = gd("cb-gd-0001", { good, "g2" }, "/detail/goods_detail/1")
    assert.equal("g2", res.json.detail.value)
    res = gd("cb-gd-0001", { { 1, 2 } }, "/detail/goods_detail/0")
    assert.equal("an array", res.json.detail.value)
    gd("cb-gd-0001", { { merchant_goods_id = 5, quantity = 1,
      unit_price = 1 } }, "/detail/goods_detail/0/merchant_goods_id")
    gd("cb-gd-0001", { { merchant_goods_id = "g1", unit_price = 1 } },
       "/detail/goods_detail/0/quantity")
    gd("cb-gd-0001", { { merchant_goods_id = "g1", quantity = 1,
      unit_price = "1" } }, "/detail/goods_detail/0/unit_price")
    -- nothing was made: the same out_trade_no with good items is new
    res = c:prepay("cb-gd-0001", { detail = { goods_detail = { good } } })
    assert.equal(200, res.status, res.body)
  end)

  it("a prepay's other nested fields have their types", function()
    for no, case in pairs({
        ["cb-nt-0001"] = { { detail = { cost_price = "1" } },
                           "/detail/cost_price" },
        ["cb-nt-0002"] = { { scene_info = { payer_client_ip = "1.2.3.4",
                             device_id = { 1 } } }, "/scene_info/device_id" },
        ["cb-nt-0003"] = { { settle_info = { profit_sharing = "yes" } },
                           "/settle_info/profit_sharing" },
        ["cb-nt-0004"] = { { payer = { openid = { "o" } } },
                           "/payer/openid" },
        ["cb-nt-0005"] = { { support_fapiao = 1 }, "/support_fapiao" },
        ["cb-nt-0006"] = { { limit_pay = "no_credit" }, "/limit_pay" },
        ["cb-nt-0007"] = { { amount = { 100 } }, "/amount" },
        ["cb-nt-0008"] = { { scene_info = "x" }, "/scene_info" } }) do
      local res = c:prepay(no, case[1])
      err(res, 400, "PARAM_ERROR", case[2])
      valid_utf8(res)
    end
    -- a native prepay has no payer at all: one is refused, whatever it
    -- holds (simulator_strict_spec)
    local res = c:prepay("cb-nt-0009", { payer = { openid = { 1 } } },
                         "native")
    err(res, 400, "PARAM_ERROR", "/payer")
  end)

  it("amount.from is an array of objects { account, amount }", function()
    assert.equal(200, c:prepay("cb-from-001").status)
    assert.equal(200, c:pay("cb-from-001").status)
    local function from(no, v, field)
      local res = refund({ out_trade_no = "cb-from-001", out_refund_no = no,
        amount = { refund = 10, total = 100, currency = "CNY", from = v } })
      err(res, 400, "PARAM_ERROR", field)
      valid_utf8(res)
      return res
    end
    local res = from("cb-f1", { account = "AVAILABLE", amount = 10 },
                     "/amount/from")
    assert.equal("an object", res.json.detail.value)
    from("cb-f1", { 5 }, "/amount/from/0")
    from("cb-f1", {}, "/amount/from")
    from("cb-f1", { { account = "ELSEWHERE", amount = 10 } },
         "/amount/from/0/account")
    from("cb-f1", { { account = "AVAILABLE" } }, "/amount/from/0/amount")
    from("cb-f1", { { account = "AVAILABLE", amount = 0 } },
         "/amount/from/0/amount")
    -- WeChat's refund API: the accounts' amounts add up to the refund,
    -- and no account is named twice; before, any were taken and echoed
    res = from("cb-f1", { { account = "AVAILABLE", amount = 6 },
                          { account = "UNAVAILABLE", amount = 5 } },
               "/amount/from")
    assert.equal("11", res.json.detail.value)
    from("cb-f1", { { account = "AVAILABLE", amount = 9 } }, "/amount/from")
    from("cb-f1", { { account = "AVAILABLE", amount = 5 },
                    { account = "AVAILABLE", amount = 5 } },
         "/amount/from/1/account")
    res = refund({ out_trade_no = "cb-from-001", out_refund_no = "cb-f1",
      goods_detail = { merchant_goods_id = "g1", unit_price = 10,
                       refund_amount = 10, refund_quantity = 1 },
      amount = { refund = 10, total = 100, currency = "CNY" } })
    err(res, 400, "PARAM_ERROR", "/goods_detail")
    -- nothing was refunded
    assert.equal("SUCCESS", state("cb-from-001"))
    res = refund({ out_trade_no = "cb-from-001", out_refund_no = "cb-f1",
      amount = { refund = 10, total = 100, currency = "CNY",
                 from = { { account = "AVAILABLE", amount = 10 } } } })
    assert.equal(200, res.status, res.body)
  end)
end)

describe("simulator: what answers echo", function()
  it("a refused table is named by its type, not its address", function()
    for no, case in pairs({
        ["cb-ty-0001"] = { { notify_url = { "https://a.example/n" } },
                           "/notify_url", "an array" },
        ["cb-ty-0002"] = { { attach = { a = 1 } }, "/attach", "an object" },
        ["cb-ty-0003"] = { { amount = { total = {} } }, "/amount/total",
                           "an empty object or array" },
        ["cb-ty-0004"] = { { time_expire = { 1 } }, "/time_expire",
                           "an array" } }) do
      local res = c:prepay(no, case[1])
      err(res, 400, "PARAM_ERROR", case[2])
      assert.equal(case[3], res.json.detail.value, res.body)
      valid_utf8(res)
    end
    local res = c:prepay({ a = 1 })
    err(res, 400, "PARAM_ERROR", "/out_trade_no")
    assert.equal("an object", res.json.detail.value)
    res = refund({ out_trade_no = "cb-ty-0001", out_refund_no = { "r" },
                   amount = { refund = 1, total = 1, currency = "CNY" } })
    err(res, 400, "PARAM_ERROR", "/out_refund_no")
    assert.equal("an array", res.json.detail.value)
  end)

  it("query values come back as valid UTF-8", function()
    local res = c:call("GET", "/v3/certificates?algorithm_type=%FF")
    err(res, 400, "PARAM_ERROR", "algorithm_type")
    valid_utf8(res)
    assert.is_nil(res.body:find("\255", 1, true))
    assert.equal("\239\191\189", res.json.detail.value)
    res = c:call("GET", "/v3/bill/tradebill?bill_date=%E4%B8")
    err(res, 400, "PARAM_ERROR", "bill_date")
    valid_utf8(res)
    res = c:call("GET", "/v3/bill/tradebill?bill_date=2026-01-01"
                 .. "&sub_mchid=%FE%FF")
    err(res, 400, "PARAM_ERROR", "sub_mchid")
    valid_utf8(res)
  end)

  it("body strings that are not UTF-8 come back as valid UTF-8", function()
    local res = c:prepay("cb\255\254-0001")
    err(res, 400, "PARAM_ERROR", "/out_trade_no")
    valid_utf8(res)
    assert.equal("cb\239\191\189\239\191\189-0001", res.json.detail.value)
    res = c:prepay("cb-u8-0001", { time_expire = "2026\255" })
    err(res, 400, "PARAM_ERROR", "/time_expire")
    valid_utf8(res)
    -- a signature that fails echoes the signed message, body and all
    res = c:call("POST", "/v3/pay/transactions/jsapi",
                 '{"description":"caf\233"}', { signature = "AAAA" })
    err(res, 401, "SIGN_ERROR", "signature")
    valid_utf8(res)
    assert.matches("caf\239\191\189",
      res.json.detail.sign_information.truncated_sign_message, 1, true)
    -- an Authorization parameter it echoes
    res = c:call("GET", "/v3/certificates", nil, { mchid = "12\255" })
    err(res, 401, "SIGN_ERROR", "mchid")
    valid_utf8(res)
    assert.equal("12\239\191\189", res.json.detail.value)
    -- a path the control API echoes
    res = control("POST", "/sim/transactions/x%FFy/pay", "{}")
    assert.equal(404, res.status, res.body)
    valid_utf8(res)
  end)
end)
