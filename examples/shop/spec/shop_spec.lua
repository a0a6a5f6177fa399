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

  local function paid_order(amount)
    local o = new_order(amount)
    assert.equal(204, sim:pay_and_wait(o.id).last.status)
    return o
  end

  local function refund(id, amount, reason)
    return assert(app:request{ path = "/orders/" .. id .. "/refunds",
                               json = { amount = amount, reason = reason } })
  end

  -- WeChat settles the refund; its notification reached the shop
  local function settle(out_refund_no, status)
    sim:settle(out_refund_no, status)
    local d = sim:wait_notification{ out_refund_no = out_refund_no }
    assert.equal(204, d.last.status)
  end

  -- the refund requests the simulator received
  local function refunds_sent()
    local n = 0
    for _, r in ipairs(sim:requests()) do
      if r.endpoint == "refund" then n = n + 1 end
    end
    return n
  end

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

  describe("refunds", function()
    it("settles a partial refund, then the rest", function()
      local o = paid_order(300)
      local res = refund(o.id, 100, "one item out of stock")
      assert.equal(201, res.status, res.body)
      local r1 = res.json
      assert.equal("PROCESSING", r1.state)
      assert.equal(100, r1.amount)
      assert.truthy(r1.refund_id)                  -- WeChat's
      assert.equal("PROCESSING", order(o.id).refunds[1].state)
      assert.equal(0, order(o.id).refunded)        -- not before SUCCESS

      settle(r1.id)
      local got = order(o.id)
      assert.equal("PAID", got.state)              -- partly refunded
      assert.equal(100, got.refunded)
      assert.equal("SUCCESS", got.refunds[1].state)
      assert.truthy(got.refunds[1].success_time)

      res = refund(o.id, 200)
      assert.equal(201, res.status, res.body)
      settle(res.json.id)
      got = order(o.id)
      assert.equal("REFUNDED", got.state)
      assert.equal(300, got.refunded)
      assert.equal(2, #got.refunds)

      res = refund(o.id, 1)                        -- nothing left
      assert.equal(422, res.status)
      assert.equal(0, res.json.refundable)
    end)

    it("applies a refund notification once when WeChat sends it twice",
       function()
      local o = paid_order(300)
      local res = refund(o.id, 100)
      assert.equal(201, res.status, res.body)
      sim:fault{ endpoint = "notify", kind = "duplicate", count = 1 }
      sim:settle(res.json.id)
      local d = sim:wait_notification({ out_refund_no = res.json.id },
                                      { attempts = 2 })
      assert.equal(204, d.attempts[1].status)
      assert.equal(204, d.attempts[2].status)     -- acknowledged again
      local got = order(o.id)
      assert.equal(100, got.refunded)             -- not 200
      assert.equal("PAID", got.state)
      assert.equal("SUCCESS", got.refunds[1].state)
    end)

    it("refuses a refund above what is left, without asking WeChat",
       function()
      local o = paid_order(100)
      local sent = refunds_sent()
      local res = refund(o.id, 101)
      assert.equal(422, res.status)
      assert.equal("refund_exceeds_paid", res.json.error)
      assert.equal(100, res.json.refundable)

      assert.equal(201, refund(o.id, 60).status)  -- PROCESSING: it counts
      res = refund(o.id, 50)
      assert.equal(422, res.status)
      assert.equal(40, res.json.refundable)
      assert.equal(sent + 1, refunds_sent())      -- the 60 alone was sent
      assert.equal(1, #order(o.id).refunds)
    end)

    it("refuses to refund an order that is not paid", function()
      local o = new_order(100)
      local sent = refunds_sent()
      local res = refund(o.id, 100)
      assert.equal(409, res.status)
      assert.equal("not_paid", res.json.error)
      assert.equal(404, refund("SHOPNOSUCHORDER", 1).status)
      assert.equal(sent, refunds_sent())
      assert.equal(0, #order(o.id).refunds)
    end)

    it("marks failed a refund WeChat refuses, and does not count it",
       function()
      local o = paid_order(100)
      sim:fault{ endpoint = "refund", kind = "error", status = 403,
                 code = "NOT_ENOUGH", count = 1 }
      local res = refund(o.id, 100)
      assert.equal(502, res.status)
      assert.equal("FAILED", res.json.state)
      assert.equal("not_enough", res.json.error)
      local got = order(o.id)
      assert.equal("FAILED", got.refunds[1].state)
      assert.equal("not_enough", got.refunds[1].error)

      res = refund(o.id, 100)                     -- the whole amount is left
      assert.equal(201, res.status, res.body)
      settle(res.json.id)
      assert.equal("REFUNDED", order(o.id).state)
      assert.equal(100, order(o.id).refunded)
    end)

    it("gives a closed refund's amount back", function()
      local o = paid_order(100)
      local res = refund(o.id, 100)
      assert.equal(201, res.status, res.body)
      settle(res.json.id, "CLOSED")
      local got = order(o.id)
      assert.equal("CLOSED", got.refunds[1].state)
      assert.equal(0, got.refunded)
      assert.equal("PAID", got.state)
      res = refund(o.id, 100)                     -- refundable again
      assert.equal(201, res.status, res.body)
    end)

    it("keeps a refund of unknown outcome pending and sends it again",
       function()
      local o = paid_order(100)
      finally(function() sim:clear_faults() end)
      -- WeChat makes the refund, the answer is lost (every attempt)
      sim:fault{ endpoint = "refund", kind = "reset", after = true }
      local res = refund(o.id, 100)
      assert.equal(503, res.status)
      assert.equal("PENDING", res.json.state)
      assert.equal("unknown_outcome", res.json.error)
      local id = res.json.id
      assert.equal("PENDING", order(o.id).refunds[1].state)
      assert.equal(422, refund(o.id, 1).status)   -- a pending one counts

      sim:clear_faults()
      res = assert(app:request{ method = "POST",
        path = "/orders/" .. o.id .. "/refunds/" .. id .. "/retry" })
      assert.equal(201, res.status, res.body)
      assert.equal(id, res.json.id)
      assert.equal("PROCESSING", res.json.state)
      settle(id)                                  -- one refund at WeChat
      local got = order(o.id)
      assert.equal("REFUNDED", got.state)
      assert.equal(100, got.refunded)
      assert.equal(1, #got.refunds)
      res = assert(app:request{ method = "POST",
        path = "/orders/" .. o.id .. "/refunds/" .. id .. "/retry" })
      assert.equal(409, res.status)               -- nothing left to send
    end)

    it("applies the notification of a refund whose answer was lost",
       function()
      local o = paid_order(100)
      finally(function() sim:clear_faults() end)
      sim:fault{ endpoint = "refund", kind = "reset", after = true }
      local res = refund(o.id, 100)
      assert.equal(503, res.status)
      sim:clear_faults()
      settle(res.json.id)                         -- WeChat had taken it
      local got = order(o.id)
      assert.equal("REFUNDED", got.state)
      assert.equal("SUCCESS", got.refunds[1].state)
      assert.truthy(got.refunds[1].refund_id)     -- from the notification
    end)
  end)
end)
