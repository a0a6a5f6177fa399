-- examples/gateway: money refunded outside the gateway (in WeChat Pay's
-- merchant platform by hand, by another system on the merchant number, or
-- after the backup the store was restored from) is seen, not reported as
-- "paid" with nothing refunded. A query answer REFUND with no refund here
-- that explains it, a refund WeChat refuses as more than what is left of
-- the order, and a bill's refund line of an out_refund_no unknown here
-- each flag the payment once: a warning, a count, an audit entry, an
-- event; the payment's answer and its console page say so.
-- Was: ?refresh=1 read REFUND, applied it as a duplicate of the payment
-- and answered "paid", refunded 0, no word; a refund then asked through
-- the gateway was a bare 502 "WeChat Pay refused the refund".
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local json = require "paygate.json"
local days = require "support.days"
local core = dofile("examples/gateway/spec/core_support.lua")

local WARN = "gateway: money refunded outside this gateway"

describe("gateway: a refund made outside it", function()
  local sim, gw

  setup(function()
    sim, gw = core.start_loopback()
  end)

  teardown(function()
    if gw then gw.srv:stop() core.stop(gw) end
    testing.stop_all()
  end)

  local function paid()
    local p = gw:create{}
    sim:pay_and_wait(p.out_trade_no)
    return gw:wait_state(p.id, "paid")
  end

  local function alarms()
    local res = gw.srv:admin_get("/metrics")
    local body = res and res.status == 200 and res.body or ""
    return tonumber(body:match('\npaygate_gateway_alarms_total{kind='
      .. '"refunded_elsewhere"} (%d+)\n')) or 0
  end

  -- the payment's audit entries of the flag
  local function flags(id)
    local out = {}
    for _, e in ipairs(assert(audit.entries(gw.db, "payment:" .. id))) do
      if e.what == "payment.alarm" and e.cause == "refunded_elsewhere" then
        out[#out + 1] = json.decode(e.evidence)
      end
    end
    return out
  end

  local function warnings(id)
    local n = 0
    for line in (gw.srv:logs() or ""):gmatch("[^\n]+") do
      if line:find(WARN, 1, true) and line:find(id, 1, true) then
        n = n + 1
      end
    end
    return n
  end

  local function events(id, etype)
    local n = 0
    for _, r in ipairs(assert(gw.db:query("SELECT type FROM paygate_outbox"
        .. " WHERE subject = $1", { id }))) do
      if r.type == etype then n = n + 1 end
    end
    return n
  end

  it("a refund made through the gateway explains WeChat's REFUND: no flag",
     function()
    local p = paid()
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                        { amount = 30 })
    assert.equal(201, res.status, res.body)
    local got = gw:get(p.id, "?refresh=1")
    assert.is_nil(got.stale)
    assert.is_nil(got.refunded_elsewhere)
    assert.same({}, flags(p.id))
  end)

  it("?refresh=1 that reads REFUND with no refund here flags the payment,"
     .. " once: a warning, a count, an audit entry, an event; its answer"
     .. " and its console page say so", function()
    local p = paid()
    local before = alarms()
    local r = sim:refund_outside(p.out_trade_no, { amount = 30 })
    local got = gw:get(p.id, "?refresh=1")
    assert.is_nil(got.stale)
    -- the state machine stays honest: nothing refunded here, no invented
    -- refund row (WeChat's answer names no refund)
    assert.equal("paid", got.state)
    assert.equal(0, got.refunded)
    assert.same({}, got.refunds)
    assert.is_true(got.refunded_elsewhere)
    -- again: still flagged, said once
    got = gw:get(p.id, "?refresh=1")
    assert.is_true(got.refunded_elsewhere)
    assert.is_true(gw:get(p.id).refunded_elsewhere)
    local f = flags(p.id)
    assert.equal(1, #f)
    assert.equal("refresh", f[1].source)
    assert.equal("REFUND", f[1].trade_state)
    assert.equal(p.out_trade_no, f[1].out_trade_no)
    assert.equal(1, events(p.id, "alarm.refunded_elsewhere"))
    testing.wait_until(function() return alarms() == before + 1 end, 10,
                       "the alarm counted")
    testing.wait_until(function() return warnings(p.id) == 1 end, 10,
                       "the warning logged")
    assert.equal(1, warnings(p.id))
    -- the console's payment page: the flag and where the details are
    local page = gw.srv:request{ path = "/console/payments/" .. p.id }
    assert.equal(200, page.status, page.body)
    assert.matches("refunded outside this gateway", page.body, 1, true)
    assert.matches("trade bill", page.body, 1, true)
    -- the refund WeChat has is not one of the gateway's
    assert.is_nil(gw.db:query("SELECT id FROM gw_refunds WHERE"
      .. " out_refund_no = $1", { r.out_refund_no })[1])
  end)

  it("a refund notification of an out_refund_no unknown here, for one of"
     .. " its orders, flags the payment and is acknowledged; a CLOSED one"
     .. " flags nothing", function()
    -- was: FAIL (unknown refund) for a day of WeChat's retries, counted
    -- as a notification for a refund the gateway does not know, while it
    -- said outright that money of a known payment went back elsewhere
    -- (the merchant platform's refund notification URL set to this
    -- gateway's, as docs/gateway.md suggests)
    local function delivered(no)
      local st
      testing.wait_until(function()
        local n = sim:notifications{ out_refund_no = no }[1]
        for _, a in ipairs(n and n.attempts or {}) do
          if a.status ~= nil then st = a.status end
        end
        return st ~= nil
      end, 15, "the refund notification answered")
      return st
    end
    local url = gw.srv:url("/wechatpay/notify/" .. sim.merchant.mchid)
    local p = paid()
    local before = alarms()
    local r = sim:refund_outside(p.out_trade_no, { amount = 20,
                                                   notify_url = url })
    sim:settle(r.out_refund_no)
    local st = delivered(r.out_refund_no)
    assert.truthy(st >= 200 and st < 300, st)
    local got = gw:get(p.id)
    assert.is_true(got.refunded_elsewhere)
    assert.equal("paid", got.state)           -- no refund row invented
    assert.same({}, got.refunds)
    local f = flags(p.id)
    assert.equal(1, #f)
    assert.equal("notification", f[1].source)
    assert.equal(r.out_refund_no, f[1].out_refund_no)
    assert.equal(20, f[1].refund_amount)
    assert.equal("SUCCESS", f[1].refund_status)
    -- the notification that said so, and WeChat's id of the refund (the
    -- merchant platform finds it by that; was: neither in the evidence)
    local n = sim:notifications{ out_refund_no = r.out_refund_no }[1]
    assert.equal(n.id, f[1].notification_id)
    assert.is_string(r.refund_id)
    assert.equal(r.refund_id, f[1].refund_id)
    assert.is_string(f[1].success_time)
    assert.equal(1, events(p.id, "alarm.refunded_elsewhere"))
    testing.wait_until(function() return alarms() == before + 1 end, 10,
                       "the alarm counted")
    local rec = gw.db:query("SELECT outcome FROM gw_notifications WHERE"
      .. " business_key = $1", { "refund|" .. r.out_refund_no .. "|SUCCESS" })
    assert.equal("refunded_elsewhere", rec[1] and rec[1].outcome)
    -- not counted as a notification for an unknown refund
    local m = gw.srv:admin_get("/metrics").body
    assert.matches('paygate_gateway_unknown_notifications_total{kind="refund"}'
                   .. ' 0\n', m, 1, true)
    -- closed outside: no money moved, nothing flagged, acknowledged
    local p2 = paid()
    local r2 = sim:refund_outside(p2.out_trade_no, { amount = 5,
                                                     notify_url = url })
    sim:settle(r2.out_refund_no, "CLOSED")
    st = delivered(r2.out_refund_no)
    assert.truthy(st >= 200 and st < 300, st)
    assert.is_nil(gw:get(p2.id).refunded_elsewhere)
    assert.same({}, flags(p2.id))
  end)

  it("a query that finds the money paid and refunded (its notification"
     .. " lost) makes the payment paid, then flags it", function()
    local p = gw:create{}
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    sim:pay(p.out_trade_no)
    testing.wait_until(function()
      local n = sim:notifications{ out_trade_no = p.out_trade_no }
      return n[1] and n[1].state == "dropped"
    end, 10, "the payment's notification dropped")
    sim:refund_outside(p.out_trade_no, {})
    local got = gw:get(p.id, "?refresh=1")
    assert.equal("paid", got.state)
    assert.is_true(got.refunded_elsewhere)
    assert.equal(1, #flags(p.id))
    -- the events in the order of what happened: paid, then the alarm
    local types = {}
    for _, r in ipairs(assert(gw.db:query("SELECT type FROM paygate_outbox"
        .. " WHERE subject = $1 ORDER BY id", { p.id }))) do
      types[#types + 1] = r.type
    end
    assert.same({ "payment.paying", "payment.paid",
                  "alarm.refunded_elsewhere" }, types)
  end)

  it("a refund WeChat refuses as more than what is left: 409"
     .. " refunded_elsewhere naming the likely cause, the payment flagged",
     function()
    local p = paid()
    sim:refund_outside(p.out_trade_no, { amount = 80 })
    -- no refresh first: the refusal itself is the evidence
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                        { amount = 30 })
    assert.equal(409, res.status, res.body)
    assert.equal("refunded_elsewhere", res.json.error)
    assert.matches("refunded outside this gateway", res.json.message, 1,
                   true)
    assert.matches("refunds made here come to 0 fen of the 100 paid",
                   res.json.message, 1, true)
    assert.equal("invalid_request", res.json.wechat_kind)
    assert.equal("failed", res.json.refund.state)
    local got = gw:get(p.id)
    assert.is_true(got.refunded_elsewhere)
    assert.equal("paid", got.state)
    local f = flags(p.id)
    assert.equal(1, #f)
    assert.equal("refund_call", f[1].source)
    -- what is left at WeChat is still refunded through the gateway
    res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                  { amount = 20 })
    assert.equal(201, res.status, res.body)
    assert.equal(1, #flags(p.id))
  end)

  it("a bill's refund line of an out_refund_no unknown here flags its"
     .. " payment and says so", function()
    -- made within one Beijing day, the bill's (made again in the new
    -- day when a midnight passed meanwhile)
    local date, p, r = days.within(days.BEIJING, function()
      local p = paid()
      local r = sim:refund_outside(p.out_trade_no, {})
      sim:settle(r.out_refund_no, "SUCCESS")
      return p, r
    end)
    sim:close_bills(date)
    local page = gw.srv:request{ path = "/console/reconcile" }
    assert.equal(200, page.status, page.body)
    local csrf = assert(page.body:match('name="csrf" value="(%x+)"'))
    local res = gw.srv:request{ method = "POST", path = "/console/reconcile",
      body = "date=" .. date .. "&csrf=" .. csrf, headers = {
        ["Content-Type"] = "application/x-www-form-urlencoded" } }
    assert.equal(303, res.status, res.body)
    -- the report: the refund line is missing here
    local e = assert(audit.entries(gw.db, "reconcile:" .. date))
    local ev = json.decode(e[#e].evidence)
    local found
    for _, m in ipairs(ev.findings) do
      if m.out_refund_no == r.out_refund_no then found = m end
    end
    assert.equal("missing_local", found and found.kind)
    assert.equal(p.out_trade_no, found.out_trade_no)
    -- and the payment it names is flagged, pointing at the bill's line
    local got = gw:get(p.id)
    assert.is_true(got.refunded_elsewhere)
    local f = flags(p.id)
    assert.equal(1, #f)
    assert.equal("bill", f[1].source)
    assert.equal(r.out_refund_no, f[1].out_refund_no)
    assert.equal(date, f[1].date)
    assert.equal(100, f[1].refund_amount)
    testing.wait_until(function() return warnings(p.id) == 1 end, 10,
                       "the warning logged")
  end)
end)
