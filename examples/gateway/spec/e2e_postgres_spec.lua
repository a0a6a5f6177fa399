-- The gateway's core flow on PostgreSQL (spec/support/servers.lua):
-- create, pay, notification applied once, refund, idempotent replay,
-- events delivered.
local S = require "examples.gateway.spec.support"

describe("gateway on PostgreSQL", function()
  local env

  -- two workers: the notification path and the dispatcher share the store
  setup(function() env = S.start{ db = "postgres", workers = 2 } end)
  teardown(S.stop)

  it("create -> pay -> paid, exactly once", function()
    env.sim:fault{ endpoint = "notify", kind = "duplicate", times = 3,
                   count = 1 }
    local b = env:create{ amount = 120 }
    assert.matches("^weixin://", b.pay.code_url)
    local d = env.sim:pay_and_wait(b.payment.out_trade_no)
    d = env.sim:wait_notification({ id = d.id }, { attempts = 4 })
    for i = 1, 4 do
      local a = d.attempts[i]
      assert.is_true(a.status ~= nil and S.ok2xx(a.status),
                     "attempt " .. i .. ": " .. require("cjson").encode(a))
    end
    local p = env:wait_state(b.payment.id, "paid")
    assert.equal(1, env:count_events(p.id, "payment.paid"))
    assert.equal("paid", env:wait_event(p.id, "payment.paid").data.payment.state)
    -- the prepay call is kept for the console (gw.history) on PostgreSQL too
    local testing = require "paygate.testing"
    testing.wait_until(function()
      local rows = assert(env.db:query("SELECT outcome, status, ms FROM"
        .. " gw_wechat_calls WHERE out_trade_no = $1",
        { b.payment.out_trade_no }))
      return rows[1] ~= nil and rows[1].outcome == "ok"
        and tonumber(rows[1].status) == 200
    end, 10, "the prepay call recorded")
  end)

  it("refunds, partial then full, and the over-limit refusal", function()
    local p = env:paid_payment{ amount = 90 }
    local r1 = S.expect(env:refund(p.id, 40), 201, "refund 40")
    local over = env:refund(p.id, 51)
    assert.equal(422, over.status, over.body)
    assert.equal("refund_exceeds_paid", over.json.error)
    local r2 = S.expect(env:refund(p.id, 50), 201, "refund 50")
    env.sim:settle(r1.out_refund_no)
    env.sim:settle(r2.out_refund_no)
    local done = env:wait_state(p.id, "refunded")
    assert.equal(90, done.refunded)
    assert.equal(2, #S.expect(env:api("GET", "/v1/payments/" .. p.id
                                      .. "/refunds"), 200, "list").refunds)
  end)

  it("idempotent replay and conflict", function()
    local b = { order_id = S.order_id(), channel = "h5", amount = 5,
                description = "pg", client_ip = "203.0.113.7" }
    local first = env:api("POST", "/v1/payments", b, { key = "pg-1" })
    assert.equal(201, first.status, first.body)
    local again = env:api("POST", "/v1/payments", b, { key = "pg-1" })
    assert.equal(first.body, again.body)
    b.amount = 6
    assert.equal(422, env:api("POST", "/v1/payments", b,
                              { key = "pg-1" }).status)
  end)

  it("attempts and close", function()
    local b = env:create()
    local res = env:api("POST", "/v1/payments/" .. b.payment.id
                        .. "/attempts", { channel = "app" })
    assert.equal(201, res.status, res.body)
    assert.are_not.equal(b.payment.out_trade_no,
                         res.json.payment.out_trade_no)
    res = env:api("POST", "/v1/payments/" .. b.payment.id .. "/close")
    assert.equal(200, res.status, res.body)
    assert.equal("closed", res.json.state)
  end)
end)
