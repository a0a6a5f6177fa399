-- The payment checks finishing the closes at WeChat the gateway started
-- (gw_attempts.close_check_at), on the paths close_race and refresh_race
-- do not take: the close of the current attempt after a late payment on
-- an older one (payments.after) failing, or skipped while degraded; and a
-- channel switch's mark on the current attempt left by a request that
-- died.
local testing = require "paygate.testing"
local json = require "paygate.json"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway payment checks and closes left open", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, {
      -- a short deadline: close_check_at is deadline + 5 s away
      merchant = { deadline = 3 },
      gateway = { reconcile = { check_after = 1, first = 0.5, ceiling = 1,
                                interval = 0.1, bill = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  -- (a case that fails leaves its faults set: the first one's every close
  -- failing would fail the next cases' switches too)
  after_each(function() sim:clear_faults() end)

  local function degrade(on)
    local res = gw.srv:request{ method = "POST", path = "/admin/degrade",
                                json = { on = on } }
    assert.equal(200, res.status, res.body)
    assert.equal(on, res.json.on)
  end

  local function attempt_row(no)
    local r = assert(gw.db:query("SELECT state, close_check_at FROM"
                                 .. " gw_attempts WHERE out_trade_no = $1",
                                 { no }))[1]
    if r.close_check_at == json.null then r.close_check_at = nil end
    return r
  end

  local function fired(fault)
    for _, f in ipairs(sim:control("GET", "/sim/faults")) do
      if f.id == fault.id then return f.fired or 0 end
    end
    return 0
  end

  local function trade_state(no)
    local t = sim:client():query_by_out_trade_no(no)
    return t and t.trade_state
  end

  -- a payment on attempt 2 whose attempt 1 stayed payable at WeChat (the
  -- switch's close of it told "no such order")
  local function switched(amount)
    local p = gw:create{ amount = amount }
    sim:fault{ endpoint = "close", kind = "error", status = 404,
               code = "ORDER_NOT_EXIST", count = 1 }
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    assert.equal(201, res.status, res.body)
    assert.equal(p.id .. "_2", res.json.payment.out_trade_no)
    assert.equal("NOTPAY", trade_state(p.id .. "_1"))
    return p
  end

  it("payments.after's close of the current attempt fails, the payer pays"
     .. " it, its notification lost: applied and refunded by the checks",
     function()
    local p = switched(231)
    -- every close fails from now on: the one after the late payment too
    local failing = sim:fault{ endpoint = "close", kind = "error",
                               status = 500 }
    -- attempt 1 paid: the payment becomes paid (late), attempt 2 is
    -- superseded and closed at WeChat after the commit -- which fails
    sim:pay_and_wait(p.id .. "_1")
    assert.equal("paid", gw:get(p.id).state)
    testing.wait_until(function() return fired(failing) >= 1 end, 10,
                       "the after-commit close of attempt 2 tried")
    local a2 = attempt_row(p.id .. "_2")
    assert.equal("superseded", a2.state)
    assert.is_not_nil(a2.close_check_at)
    assert.equal("NOTPAY", trade_state(p.id .. "_2"))
    -- the payer pays attempt 2 as well; its notification is lost
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    sim:pay(p.id .. "_2")
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = p.id .. "_2" }[1]
      return n and n.state == "dropped"
    end, 10, "the notification of attempt 2 dropped")
    sim:clear_faults()
    -- the checks find the money (close_check_at: deadline + 5 s) and apply
    -- it: a second payment of a paid one, refunded (on_late_payment)
    local rf
    testing.wait_until(function()
      for _, r in ipairs(gw:get(p.id).refunds) do
        if r.out_trade_no == p.id .. "_2" then rf = r return true end
      end
    end, 30, "the money on attempt 2 applied by the payment checks")
    assert.same({ "duplicate", 231 }, { rf.kind, rf.amount })
    testing.wait_until(function()
      for _, r in ipairs(gw:get(p.id).refunds) do
        if r.out_trade_no == p.id .. "_2" and r.state == "processing" then
          return true
        end
      end
    end, 20, "the refund of attempt 2 sent")
    local rows = assert(gw.db:query("SELECT state, paid_out_trade_no FROM"
                                    .. " gw_payments WHERE id = $1",
                                    { p.id }))
    assert.equal(p.id .. "_1", rows[1].paid_out_trade_no)
    a2 = attempt_row(p.id .. "_2")
    assert.equal("paid", a2.state)
    assert.is_nil(a2.close_check_at)
  end)

  it("payments.after's close skipped while degraded: the checks close the"
     .. " attempt at WeChat once the switch is off", function()
    local p = switched(232)
    degrade(true)
    local on = true
    finally(function() if on then degrade(false) end end)
    -- notifications are still applied while degraded: attempt 1 paid, the
    -- payment paid, the close of attempt 2 after the commit skipped
    sim:pay_and_wait(p.id .. "_1")
    assert.equal("paid", gw:get(p.id).state)
    local a2 = attempt_row(p.id .. "_2")
    assert.equal("superseded", a2.state)
    assert.is_not_nil(a2.close_check_at)
    assert.equal("NOTPAY", trade_state(p.id .. "_2"))
    degrade(false)
    on = false
    testing.wait_until(function()
      return trade_state(p.id .. "_2") == "CLOSED"
    end, 30, "attempt 2 closed at WeChat by the payment checks")
    testing.wait_until(function()
      return attempt_row(p.id .. "_2").close_check_at == nil
    end, 10, "attempt 2's close recorded as confirmed")
    assert.equal("paid", gw:get(p.id).state)
  end)

  it("a switch's mark left on the current attempt by a request that died"
     .. " is dropped; the payment goes on", function()
    local p = gw:create{ amount = 233 }
    local no = p.id .. "_1"
    -- what POST attempts leaves when it dies between its mark and its
    -- close: close_check_at = now + the client's deadline + 5 s
    local res = assert(gw.db:exec("UPDATE gw_attempts SET close_check_at ="
      .. " $2 WHERE out_trade_no = $1 AND state = 'open'",
      { no, os.time() + 3 + 5 }))
    assert.equal(1, res.changes)
    testing.wait_until(function()
      return attempt_row(no).close_check_at == nil
    end, 30, "the mark dropped by the payment checks")
    local a = attempt_row(no)
    assert.equal("open", a.state)
    local got = gw:get(p.id)
    assert.equal("paying", got.state)
    assert.equal(no, got.out_trade_no)
    assert.equal("NOTPAY", trade_state(no))
    -- and it is paid normally
    sim:pay(no)
    got = gw:wait_state(p.id, "paid", 20)
    local rows = assert(gw.db:query("SELECT late FROM gw_payments WHERE"
                                    .. " id = $1", { p.id }))
    assert.equal(0, rows[1].late)
    assert.same({}, got.refunds)
    assert.equal("paid", attempt_row(no).state)
  end)
end)
