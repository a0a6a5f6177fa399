-- The payer pays just as the payment expires (docs/reconcile.md, payment
-- checks): the check finds it NOTPAY past its expiry and closes it at
-- WeChat, but the payer's money arrived in between and the close is
-- refused ORDER_PAID; the notification is lost. The check asks again at
-- once and applies the payment (once), rather than leaving it to the
-- next check on the backoff -- here an hour away.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway payment checks: paid as it expired", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    -- nothing checked by age, and a failed check's next one up to an
    -- hour away: only the check this spec makes due runs within it
    gw = core.start(sim, { gateway = { reconcile = { check_after = 3600,
      first = 3600, ceiling = 3600, interval = 0.1, bill = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("the close refused ORDER_PAID: asked again and paid in the same"
     .. " check", function()
    local p = gw:create{ amount = 70 }
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    -- the checks' close waits at WeChat until the payer has paid
    local slow = sim:hold("close")
    -- expired, and due now
    assert(gw.db:exec("UPDATE gw_payments SET expires_at = $2,"
      .. " next_check_at = 0 WHERE id = $1", { p.id, os.time() - 1 }))
    -- (30 s: made by the checks' next run, a background loop)
    slow:wait_held(1, 30)
    sim:pay(p.out_trade_no)
    slow:release()
    local got = gw:wait_state(p.id, "paid", 30)
    assert.matches("^%d+$", got.transaction_id)
    -- the close was refused ORDER_PAID
    local refused = false
    for _, r in ipairs(sim:requests()) do
      if r.endpoint == "close" and r.code == "ORDER_PAID" then
        refused = true
      end
    end
    assert.is_true(refused, "a close answered ORDER_PAID")
    -- applied once, by the check, not as a late payment
    local succeeded = 0
    for _, e in ipairs(audit.entries(gw.db, "payment:" .. p.id)) do
      if e.what == "payment.succeeded" then
        succeeded = succeeded + 1
        assert.equal("reconcile", e.actor)
        assert.equal("paid", e.cause)
      end
    end
    assert.equal(1, succeeded)
    local ev = assert(gw.db:query("SELECT type FROM paygate_outbox WHERE"
      .. " subject = $1 AND type IN ('payment.paid', 'payment.late_paid')",
      { p.id }))
    assert.equal(1, #ev)
    assert.equal("payment.paid", ev[1].type)
    assert.equal("dropped",
                 sim:notifications{ out_trade_no = p.out_trade_no }[1].state)
  end)
  -- GET /v1/payments/:id?refresh=1 (the console's "Query WeChat now") on
  -- an open payment past its expiry that WeChat still has NOTPAY: closed
  -- at WeChat and here, as a payment check closes it, not left open
  -- until the next check.
  local function closes(no)
    local n, paid = 0, 0
    for _, r in ipairs(sim:requests()) do
      if r.endpoint == "close" and r.target:find(no, 1, true) then
        n = n + 1
        if r.code == "ORDER_PAID" then paid = paid + 1 end
      end
    end
    return n, paid
  end

  it("?refresh=1 past the expiry, NOTPAY: closed at WeChat and here",
     function()
    local p = gw:create{ amount = 71 }
    assert(gw.db:exec("UPDATE gw_payments SET expires_at = $2 WHERE"
      .. " id = $1", { p.id, os.time() - 1 }))
    local got = gw:get(p.id, "?refresh=1")
    assert.equal("closed", got.state)
    assert.equal(1, (closes(p.out_trade_no)))
    -- asked again: WeChat's CLOSED, and no second close
    local q = gw:get(p.id, "?refresh=1")
    assert.equal("closed", q.state)
    assert.equal(1, (closes(p.out_trade_no)))
  end)

  it("?refresh=1 past the expiry, the close refused ORDER_PAID: paid",
     function()
    local p = gw:create{ amount = 72 }
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    local slow = sim:hold("close")
    assert(gw.db:exec("UPDATE gw_payments SET expires_at = $2 WHERE"
      .. " id = $1", { p.id, os.time() - 1 }))
    local got
    require("paygate.core").spawn(function()
      got = gw:get(p.id, "?refresh=1")
    end)
    slow:wait_held()                        -- the refresh's close at WeChat
    sim:pay(p.out_trade_no)
    slow:release()
    testing.wait_until(function() return got ~= nil end, 15,
                       "the refresh's answer")
    assert.equal("paid", got.state)
    assert.matches("^%d+$", got.transaction_id)
    local _, refused = closes(p.out_trade_no)
    assert.equal(1, refused)
  end)
end)
