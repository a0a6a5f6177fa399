-- The shop against the WeChat Pay simulator, through paygate.testing:
--   paygate exec "$(command -v busted)" examples/shop/spec/shop_spec.lua
local testing = require "paygate.testing"
local http = require "paygate.http"

describe("the shop", function()
  local sim, app

  setup(function()
    -- time_scale divides WeChat's retry schedule (15 s, 15 s, 30 s, ...):
    -- a retried notification arrives 0.15 s later
    sim = testing.simulator{ time_scale = 100 }
    app = testing.start_app{ app = "examples/shop", config = function(srv)
      return {
        shop = { db = "sqlite:" .. srv.dir .. "/shop.db",
                 public_url = srv:url(""), appid = sim.merchant.appid },
        wechatpay = sim:client_config(),
      }
    end }
  end)

  teardown(testing.stop_all)

  local function new_order(amount)
    local res = assert(app:request{ path = "/orders",
                                    json = { amount = amount or 100 } })
    assert.equal(201, res.status, res.body)
    return res.json
  end

  local function order(id) return app:request("/orders/" .. id).json end

  it("refuses an order without a valid amount", function()
    local res = app:request{ path = "/orders", json = { amount = 0 } }
    assert.equal(400, res.status)
  end)

  it("creates an order with a QR code to pay", function()
    local o = new_order(100)
    assert.matches("^weixin://", o.code_url)
    assert.equal("PAYING", order(o.id).state)
  end)

  it("marks an order paid when its notification arrives", function()
    local o = new_order(250)
    local d = sim:pay_and_wait(o.id)
    assert.equal(204, d.last.status)
    local got = order(o.id)
    assert.equal("PAID", got.state)
    assert.equal(250, got.paid_amount)
    assert.equal(1, got.payments)
  end)

  it("leaves an order unpaid when the payment fails", function()
    local o = new_order(100)
    sim:fail(o.id)
    assert.same({}, sim:notifications{ out_trade_no = o.id })  -- none sent
    assert.equal("PAYING", order(o.id).state)
    assert.equal(0, order(o.id).payments)
  end)

  it("applies a payment once when WeChat sends it twice", function()
    local o = new_order(100)
    sim:fault{ endpoint = "notify", kind = "duplicate", count = 1 }
    sim:pay(o.id)
    local d = sim:wait_notification(o.id, { attempts = 2 })
    assert.equal(204, d.attempts[1].status)
    assert.equal(204, d.attempts[2].status)       -- acknowledged again
    assert.equal(1, order(o.id).payments)
    assert.equal("PAID", order(o.id).state)
  end)

  it("refuses a badly signed delivery and applies its retry", function()
    local o = new_order(100)
    sim:fault{ endpoint = "notify", kind = "bad_signature", count = 1 }
    local d = sim:pay_and_wait(o.id)
    assert.equal(500, d.attempts[1].status)       -- notify_fail: sent again
    assert.equal(204, d.last.status)
    assert.equal(d.attempts[1].n + 1, d.last.n)
    assert.equal(1, order(o.id).payments)
  end)

  it("refuses a notification that is not signed by WeChat Pay", function()
    local o = new_order(100)
    local res = assert(http.request{ method = "POST",
      url = app:url("/wechatpay/notify/" .. sim.merchant.mchid),
      headers = { ["Content-Type"] = "application/json",
                  ["Wechatpay-Timestamp"] = tostring(os.time()),
                  ["Wechatpay-Nonce"] = "n", ["Wechatpay-Serial"] = "1",
                  ["Wechatpay-Signature"] = "AAAA" },
      body = '{"id":"forged","resource":{"out_trade_no":"' .. o.id .. '"}}',
      timeout = 5 })
    assert.equal(500, res.status)
    assert.equal("PAYING", order(o.id).state)
  end)
end)
