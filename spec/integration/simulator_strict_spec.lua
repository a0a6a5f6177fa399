-- The simulator answers as WeChat Pay does where a client could come to
-- depend on a difference: the shape of an unpaid order's query answer.
local server = require "support.server"
local sc = require "support.simclient"

local srv, c, keys, base

local function prepay_body(no, over)
  local b = { appid = sc.APPID, mchid = sc.MCHID, description = "测试商品",
              out_trade_no = no,
              notify_url = "https://merchant.example/notify",
              amount = { total = 100, currency = "CNY" },
              payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } }
  for k, v in pairs(over or {}) do
    if v == false then b[k] = nil else b[k] = v end
  end
  return b
end

local function prepay(no, over, kind)
  return c:call("POST", "/v3/pay/transactions/" .. (kind or "jsapi"),
                prepay_body(no, over))
end

local function query(no)
  return c:call("GET", "/v3/pay/transactions/out-trade-no/" .. no
                .. "?mchid=" .. sc.MCHID)
end

local function pay(no, body)
  return sc.control(base, "POST", "/sim/transactions/" .. no .. "/pay",
                    body or {})
end

local function signed(res, status)
  assert.equal(status or 200, res.status, res.body)
  local ok, why = sc.verify(res, keys)
  assert(ok, why)
end

setup(function()
  local dir = server.tmpdir()
  srv = server.start{ app = "examples/simulator",
                      config = sc.config(dir .. "/state", "workers = 1,") }
  base = "http://127.0.0.1:" .. srv.port
  c = sc.new{ base = base }
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
