-- examples/gateway: money that arrives on a closed or superseded attempt
-- is applied (never dropped), then refunded (on_late_payment = "refund")
-- or raised as an alarm event ("alarm"); an amount that differs from the
-- order's is an alarm, not a state change; a replayed notification whose
-- effect is committed is acknowledged.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local core = dofile("examples/gateway/spec/core_support.lua")

-- WeChat's close answers ORDER_NOT_EXIST once: the gateway takes the
-- attempt as closed while the order can still be paid at the simulator
-- (the race in which money arrives after a close).
local function close_lies(sim)
  sim:fault{ endpoint = "close", kind = "error", status = 404,
             code = "ORDER_NOT_EXIST", count = 1 }
end

local function events_of(gw, id)
  local rows = assert(gw.db:query("SELECT type, payload FROM paygate_outbox"
    .. " WHERE subject = $1 ORDER BY id", { id }))
  local types = {}
  for i, r in ipairs(rows) do types[i] = r.type end
  return types, rows
end

local function has(list, v)
  for _, x in ipairs(list) do if x == v then return true end end
  return false
end

-- the value of paygate_gateway_alarms_total{kind=...} on gw's /metrics
local function alarms(gw, kind)
  local http = require "paygate.http"
  local m = assert(http.request{ url = "http://127.0.0.1:" .. gw.srv.admin
                                 .. "/metrics" })
  return tonumber(m.body:match('paygate_gateway_alarms_total{kind="'
                               .. kind .. '"} (%d+)')) or 0
end

-- the console's page of payment id, as text: what an operator reads
local function console_page(gw, id)
  local res = gw.srv:request{ path = "/console/payments/" .. id }
  assert.equal(200, res.status, res.body)
  return (res.body:gsub("<[^>]*>", " "):gsub("%s+", " ")), res.body
end

describe("gateway late payments", function()
  local sim, gw, gw_alarm

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { gateway = { console = { access = "loopback" } } })
    gw_alarm = core.start(sim, { gateway = { on_late_payment = "alarm",
                                 console = { access = "loopback" } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    if gw_alarm then gw_alarm:stop() end
    testing.stop_all()
  end)

  it("refunds money taken on a superseded attempt, and a second payment",
     function()
    local p = gw:create{ amount = 120 }
    close_lies(sim)
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    assert.equal(201, res.status, res.body)
    -- the payer pays the old code anyway; the follow-up close of the
    -- current attempt is told "no such order" too, so it stays payable
    close_lies(sim)
    sim:pay_and_wait(p.id .. "_1")
    local got = gw:wait_state(p.id, "paid")
    assert.is_true(got.late)
    assert.equal(p.id .. "_1", got.attempts[1].out_trade_no)
    assert.equal("paid", got.attempts[1].state)
    testing.wait_until(function()
      return #gw:get(p.id).refunds == 1
    end, 10, "the automatic refund")
    local rf = gw:get(p.id).refunds[1]
    assert.equal("late_payment", rf.kind)
    assert.equal(120, rf.amount)
    testing.wait_until(function()
      return gw:get(p.id).refunds[1].state == "processing"
    end, 10, "the refund sent")
    sim:settle(rf.out_refund_no)
    sim:wait_notification{ out_refund_no = rf.out_refund_no }
    got = gw:wait_state(p.id, "refunded")
    assert.equal(120, got.refunded)
    -- now the current attempt is paid too: money taken twice
    sim:pay_and_wait(p.id .. "_2")
    testing.wait_until(function()
      return #gw:get(p.id).refunds == 2
    end, 10, "the refund of the second payment")
    got = gw:get(p.id)
    assert.equal("refunded", got.state)       -- unchanged by the duplicate
    assert.equal("duplicate", got.refunds[2].kind)
    assert.equal(p.id .. "_2", got.refunds[2].out_trade_no)
    -- the console says where each fen went: both payments, each refunded
    -- (or on its way back), nothing kept
    local text, markup = console_page(gw, p.id)
    assert.matches("Money taken on a closed or superseded attempt", text,
                   1, true)
    assert.matches(p.id .. "_1 (paid late), 1.20 CNY", text, 1, true)
    assert.matches("refunded automatically (" .. rf.id .. ")", text, 1, true)
    assert.matches(p.id .. "_2 (paid twice), 1.20 CNY", text, 1, true)
    assert.matches("refunded automatically", text, 1, true)
    assert.is_nil(markup:find('<div class="bad">', 1, true))
    local types = events_of(gw, p.id)
    assert.is_true(has(types, "payment.late_paid"))
    assert.is_true(has(types, "payment.refunded"))
    assert.is_true((audit.verify(gw.db, "payment:" .. p.id)))
  end)

  it("applies money taken after a close, then refunds it", function()
    local p = gw:create{ amount = 90 }
    close_lies(sim)
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/close")
    assert.equal(200, res.status, res.body)
    assert.equal("closed", res.json.state)
    sim:pay_and_wait(p.out_trade_no)
    local got = gw:wait_state(p.id, "paid")
    assert.is_true(got.late)
    testing.wait_until(function()
      local r = gw:get(p.id).refunds[1]
      return r and r.state == "processing"
    end, 10, "the automatic refund")
  end)

  it("raises an alarm when WeChat refuses the automatic refund", function()
    local p = gw:create{ amount = 80 }
    close_lies(sim)
    assert.equal(200, gw:call("POST", "/v1/payments/" .. p.id
                              .. "/close").status)
    -- WeChat refuses the refund of the money taken after the close: it
    -- stays with the merchant, and only a person can give it back
    sim:fault{ endpoint = "refund", kind = "error", status = 403,
               code = "NOT_ENOUGH", count = 1 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    testing.wait_until(function()
      local r = gw:get(p.id).refunds[1]
      return r and r.state == "failed"
    end, 10, "the automatic refund refused")
    local rf = gw:get(p.id).refunds[1]
    assert.equal("late_payment", rf.kind)
    -- the merchant's systems are told (they were told action "refund"
    -- by payment.late_paid), and so is whoever watches the alarms
    local types, rows = events_of(gw, p.id)
    assert.is_true(has(types, "refund.failed"), table.concat(types, " "))
    for _, r in ipairs(rows) do
      if r.type == "refund.failed" then
        assert.matches('"kind":"late_payment"', r.payload, 1, true)
        assert.matches('"wechat_code":"NOT_ENOUGH"', r.payload, 1, true)
      end
    end
    local http = require "paygate.http"
    testing.wait_until(function()
      local m = assert(http.request{ url = "http://127.0.0.1:"
                                     .. gw.srv.admin .. "/metrics" })
      return m.body:find('paygate_gateway_alarms_total{kind="refund_failed"}'
                         .. ' 1', 1, true)
    end, 10, "the alarm counted")
  end)

  it("raises an alarm when WeChat closes the automatic refund", function()
    local p = gw:create{ amount = 60 }
    close_lies(sim)
    assert.equal(200, gw:call("POST", "/v1/payments/" .. p.id
                              .. "/close").status)
    local before = alarms(gw, "refund_failed")
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    testing.wait_until(function()
      local r = gw:get(p.id).refunds[1]
      return r and r.state == "processing"
    end, 10, "the automatic refund sent")
    local rf = gw:get(p.id).refunds[1]
    assert.equal("late_payment", rf.kind)
    -- WeChat closes it: nothing went back, the 60 fen stay with the
    -- merchant, so whoever watches the alarms must hear of it
    sim:settle(rf.out_refund_no, "CLOSED")
    sim:wait_notification{ out_refund_no = rf.out_refund_no }
    testing.wait_until(function()
      return gw:get(p.id).refunds[1].state == "closed"
    end, 10, "the refund closed")
    local got = gw:get(p.id)
    assert.equal("paid", got.state)
    assert.equal(60, got.refundable)          -- a person may refund it
    testing.wait_until(function()
      return alarms(gw, "refund_failed") == before + 1
    end, 10, "the alarm counted")
    local line
    testing.wait_until(function()
      for l in (gw.srv:logs() or ""):gmatch("[^\n]+") do
        if l:find("closed an automatic refund", 1, true)
           and l:find(rf.id, 1, true) then
          line = l
        end
      end
      return line
    end, 10, "the error line")
    assert.matches('"level":"error"', line, 1, true)
    assert.matches('"amount":60', line, 1, true)
    assert.matches('"kind":"late_payment"', line, 1, true)
    -- and the console's page of the payment says the money stayed
    local text, markup = console_page(gw, p.id)
    assert.matches("its automatic refund " .. rf.id .. " ended closed:"
                   .. " nothing went back", text, 1, true)
    assert.matches('<div class="bad">', markup, 1, true)
  end)

  it("raises an alarm event instead with on_late_payment = alarm",
     function()
    local p = gw_alarm:create{ amount = 70 }
    close_lies(sim)
    assert.equal(200, gw_alarm:call("POST", "/v1/payments/" .. p.id
                                    .. "/close").status)
    sim:pay_and_wait(p.out_trade_no)
    local got = gw_alarm:wait_state(p.id, "paid")
    assert.equal(0, #got.refunds)
    local types, rows = events_of(gw_alarm, p.id)
    assert.is_true(has(types, "payment.late_paid"))
    local late
    for _, r in ipairs(rows) do
      if r.type == "payment.late_paid" then late = r.payload end
    end
    assert.matches('"action":"alarm"', late, 1, true)
    -- kept for a person: counted where an operator alerts on alarms
    local http = require "paygate.http"
    local m = assert(http.request{ url = "http://127.0.0.1:"
                                   .. gw_alarm.srv.admin .. "/metrics" })
    assert.matches('paygate_gateway_alarms_total{kind="late_payment"} 1',
                   m.body, 1, true)
    -- and said once in the log, with what finance accounts for: how
    -- much, on which order and transaction, and that it is kept
    local lines = {}
    testing.wait_until(function()
      lines = {}
      for l in (gw_alarm.srv:logs() or ""):gmatch("[^\n]+") do
        if l:find("payment on a closed or superseded attempt", 1, true)
           and l:find(p.id, 1, true) then
          lines[#lines + 1] = l
        end
      end
      return #lines > 0
    end, 10, "the late payment's line")
    assert.equal(1, #lines, table.concat(lines, "\n"))
    local line = lines[1]
    assert.matches('"level":"error"', line, 1, true)
    assert.matches('"amount":70', line, 1, true)
    assert.matches('"duplicate":false', line, 1, true)
    assert.matches('"action":"alarm"', line, 1, true)
    assert.matches('"transaction_id":"' .. got.transaction_id .. '"', line,
                   1, true)
    -- the console's page of the payment: kept for a person
    local text, markup = console_page(gw_alarm, p.id)
    assert.matches(p.out_trade_no .. " (paid late), 0.70 CNY, transaction "
                   .. got.transaction_id .. ": kept for a person", text, 1,
                   true)
    assert.matches('<div class="bad">', markup, 1, true)
  end)

  it("raises an alarm for an amount that differs, changing nothing",
     function()
    local p = gw:create{ amount = 100 }
    -- the order as the gateway holds it no longer matches WeChat's
    assert(gw.db:exec("UPDATE gw_payments SET amount = 99 WHERE id = $1",
                      { p.id }))
    sim:pay_and_wait(p.out_trade_no)
    local got = gw:get(p.id)
    assert.equal("paying", got.state)
    local types = events_of(gw, p.id)
    assert.is_true(has(types, "alarm.amount_mismatch"))
    local entries = assert(audit.entries(gw.db, "payment:" .. p.id))
    assert.equal("payment.alarm", entries[#entries].what)
    local n = assert(gw.db:query("SELECT outcome FROM gw_notifications"
      .. " WHERE business_key LIKE $1", { "%|" .. p.out_trade_no .. "|%" }))
    assert.equal("alarm", n[1].outcome)
    local http = require "paygate.http"
    local m = assert(http.request{ url = "http://127.0.0.1:" .. gw.srv.admin
                                   .. "/metrics" })
    assert.matches('paygate_gateway_alarms_total{kind="amount_mismatch"} 1',
                   m.body, 1, true)
  end)
end)
