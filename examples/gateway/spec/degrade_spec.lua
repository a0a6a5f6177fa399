-- examples/gateway: the degradation switch and the WeChat Pay client's
-- upstream protection. /admin/degrade flips the clients' own switch too;
-- while it is on, a late payment's automatic refund and the reconciliation
-- send nothing (the refund stays created and is sent once the switch is
-- off); a call refused by an open circuit breaker is a 503 `degraded` for
-- writes (nothing was sent: a payment stays created, a merchant's refund
-- ends failed, never sent) and a stale local answer for reads.
local testing = require "paygate.testing"
local http = require "paygate.http"
local json = require "paygate.json"
local core = dofile("examples/gateway/spec/core_support.lua")

local function admin(gw, method, body)
  return gw.srv:request{ method = method, path = "/admin/degrade",
    body = body and json.encode(body) or nil,
    headers = { ["Content-Type"] = "application/json" } }
end

local function refund_requests(sim)
  local n = 0
  for _, r in ipairs(sim:requests()) do
    if r.endpoint == "refund" then n = n + 1 end
  end
  return n
end

describe("gateway degradation", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { workers = 2, gateway = {
      reconcile = { check_after = 1, first = 0.5, ceiling = 1,
                    interval = 0.1, bill = false } } })
  end)

  teardown(function()
    if gw then
      admin(gw, "POST", { on = false })
      gw:stop()
    end
    testing.stop_all()
  end)

  before_each(function()
    assert.equal(200, admin(gw, "POST", { on = false }).status)
  end)

  it("/admin/degrade flips the WeChat Pay clients' switch too", function()
    local res = admin(gw, "POST", { on = true })
    assert.equal(200, res.status, res.body)
    assert.is_true(res.json.on)
    assert.is_true(res.json.clients[sim.merchant.mchid])
    -- every worker sees both
    for _ = 1, 4 do
      local g = admin(gw, "GET")
      assert.is_true(g.json.on)
      assert.is_true(g.json.clients[sim.merchant.mchid])
    end
    res = admin(gw, "POST", { on = false })
    assert.is_false(res.json.on)
    assert.is_false(res.json.clients[sim.merchant.mchid])
  end)

  it("a late payment's refund waits while degraded, then is sent",
     function()
    local p = gw:create{ amount = 80 }
    sim:fault{ endpoint = "close", kind = "error", status = 404,
               code = "ORDER_NOT_EXIST", count = 1 }
    assert.equal(200, gw:call("POST", "/v1/payments/" .. p.id
                              .. "/close").status)
    local before = refund_requests(sim)
    assert.equal(200, admin(gw, "POST", { on = true }).status)
    sim:pay(p.out_trade_no)
    local got = gw:wait_state(p.id, "paid", 20)
    assert.is_true(got.late)
    testing.wait_until(function()
      return gw.srv:logs():find("degraded: work after a commit left for"
                                .. " later", 1, true) ~= nil
    end, 10, "the refund left for later")
    local rf = gw:get(p.id).refunds[1]
    assert.equal("late_payment", rf.kind)
    -- the refund checks would have sent it by now (check_after 1 s,
    -- rounds every 0.1 s): they do not while degraded
    local created = rf.created_at
    testing.wait_until(function()
      return os.time() > created + 3
    end, 10, "past the refund checks' first look")
    assert.equal("created", gw:call("GET", "/v1/refunds/" .. rf.id)
                              .json.state)
    assert.equal(before, refund_requests(sim))
    -- switched off: the refund checks send it
    assert.equal(200, admin(gw, "POST", { on = false }).status)
    testing.wait_until(function()
      return gw:call("GET", "/v1/refunds/" .. rf.id).json.state
             == "processing"
    end, 20, "the refund sent")
    assert.equal(before + 1, refund_requests(sim))
  end)
end)

describe("gateway behind an open circuit breaker", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { workers = 2,
      gateway = { reconcile = { enabled = false } },
      merchant = { max_attempts = 1, breaker_min_calls = 2,
                   breaker_failure_ratio = 0.5, breaker_open_for = 60 } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("writes answer 503 degraded and send nothing; reads are stale",
     function()
    local paid = gw:create{ amount = 100 }
    sim:pay_and_wait(paid.out_trade_no)
    gw:wait_state(paid.id, "paid")
    -- WeChat fails every refund, every query, every prepay: the breakers
    -- open after two failed calls each -- or three: the window's count
    -- weighs the previous 30 s bucket by its overlap, so two calls that
    -- straddle a bucket's edge count a little under two
    for _, ep in ipairs({ "refund", "query", "prepay" }) do
      sim:fault{ endpoint = ep, kind = "error", status = 500 }
    end
    local ENDPOINTS = { "POST /v3/refund/domestic/refunds",
      "GET /v3/pay/transactions/out-trade-no/{}",
      "POST /v3/pay/transactions/native" }
    local function all_open()
      local open = {}
      for line in gw.srv:logs():gmatch("[^\n]+") do
        if line:find('"wechatpay: circuit opened"', 1, true) then
          open[line:match('"endpoint":"([^"]*)"') or ""] = true
        end
      end
      for _, ep in ipairs(ENDPOINTS) do
        if not open[ep] then return false end
      end
      return true
    end
    for round = 1, 4 do
      if round > 2 and all_open() then break end
      local r = gw:call("POST", "/v1/payments/" .. paid.id .. "/refunds",
                        { amount = 1 })
      assert.is_true(r.status ~= 503 or round > 2, r.body)
      gw:call("GET", "/v1/payments/" .. paid.id .. "?refresh=1")
      gw:call("POST", "/v1/payments", { order_id = "cb-"
        .. require("paygate.crypto").random_nonce(6), channel = "native",
        amount = 5, description = "breaker" })
    end
    assert.is_true(all_open(), gw.srv:logs())
    local seq = 0
    for _, r in ipairs(sim:requests()) do
      if r.seq > seq then seq = r.seq end
    end
    -- a refund: 503 degraded, the refund failed (not unknown: never sent,
    -- and never sent later either)
    local r = gw:call("POST", "/v1/payments/" .. paid.id .. "/refunds",
                      { amount = 2 })
    assert.equal(503, r.status, r.body)
    assert.equal("degraded", r.json.error)
    assert.equal("failed", r.json.refund.state)
    -- a payment: 503 degraded, the payment created (resumed later)
    local order_id = "cb-" .. require("paygate.crypto").random_nonce(6)
    local c = gw:call("POST", "/v1/payments", { order_id = order_id,
      channel = "native", amount = 6, description = "breaker" })
    assert.equal(503, c.status, c.body)
    assert.equal("degraded", c.json.error)
    -- the answers name the breaker, not the switch (which is off: its
    -- "switched off" sent the operator to /admin/degrade), and say when
    -- a call may go again (Retry-After: the breaker's cool-down left)
    for _, a in ipairs({ c, r }) do
      assert.truthy(a.json.message:find("circuit", 1, true),
                    a.json.message)
      assert.is_nil(a.json.message:find("switched off", 1, true),
                    a.json.message)
      local wait = tonumber(a.headers["retry-after"])
      assert.is_true(wait ~= nil and wait >= 1 and wait <= 60,
                     tostring(a.headers["retry-after"]))
    end
    -- /admin/upstream shows where each breaker is, whichever worker
    -- answers (the breakers are shared; each worker lists them all)
    for _ = 1, 4 do
      local u = gw.srv:request{ method = "GET", path = "/admin/upstream" }
      assert.equal(200, u.status, u.body)
      assert.is_false(u.json.degraded)
      local eps = u.json.merchants[sim.merchant.mchid]
      for _, ep in ipairs(ENDPOINTS) do
        local e = eps and eps[ep]
        assert.truthy(e, ep .. ": " .. u.body)
        assert.equal("open", e.breaker)
        assert.is_true(e.retry_after > 0 and e.retry_after <= 60, u.body)
        assert.is_true(e.failures >= 1, u.body)
        assert.is_number(e.timeout)
      end
    end
    local row = assert(gw.db:query("SELECT state FROM gw_payments WHERE"
                                   .. " order_id = $1", { order_id }))[1]
    assert.equal("created", row.state)
    -- a read: local state, stale
    local g = gw:call("GET", "/v1/payments/" .. paid.id .. "?refresh=1")
    assert.equal(200, g.status)
    assert.is_true(g.json.stale)
    assert.equal("paid", g.json.state)
    -- nothing of it reached WeChat
    for _, q in ipairs(sim:requests()) do
      assert.is_true(q.seq <= seq or q.endpoint == "certificates",
                     json.encode(q))
    end
    local m = assert(http.request{ url = "http://127.0.0.1:" .. gw.srv.admin
                                   .. "/metrics" }).body
    assert.truthy(m:find('outcome="circuit_open"', 1, true))
  end)
end)

-- gateway.degraded set in the config and reloaded (an outage: the
-- operator edits the config, `paygate reload`): the switch took the
-- config's value only at the server's start, so the reload said "done"
-- and nothing was switched. A reload that changes the value sets the
-- switch; one that leaves it as it was keeps what /admin/degrade set.
describe("gateway.degraded on reload", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { workers = 2, gateway = {
      reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  -- the config file as it was, with gateway.degraded = on; then HUP, and
  -- the reload's outcome
  local original
  local function reload_with(on)
    local srv = gw.srv
    original = original or testing.proc.read(srv.config_file)
    testing.write(srv.config_file, "local c = (function() " .. original
      .. " end)()\nc.gateway.degraded = " .. tostring(on) .. "\nreturn c\n")
    local before = testing.proc.read(srv.dir .. "/paygate.pid.reload")
    local n0 = tonumber(before:match("^(%d+)")) or 0
    srv:signal(testing.proc.SIGHUP)
    local text
    testing.wait_until(function()
      text = testing.proc.read(srv.dir .. "/paygate.pid.reload")
      return (tonumber(text:match("^(%d+) ")) or 0) > n0
        and not text:match("^%d+ started")
    end, 60, "the reload")
    assert.matches("^%d+ ok", text)
  end

  it("a reload that changes it sets the switch; one that keeps it leaves"
     .. " the switch where /admin/degrade put it", function()
    assert.is_false(admin(gw, "GET").json.on)
    reload_with(true)
    for _ = 1, 4 do           -- every worker of the new generation
      local g = admin(gw, "GET").json
      assert.is_true(g.on)
      assert.is_true(g.clients[sim.merchant.mchid])
    end
    local _, said = gw.srv:logs():gsub("gateway.degraded changed in the"
                                       .. " config: the degradation switch"
                                       .. " is now on", "")
    assert.equal(1, said)               -- once, not once per worker
    -- the lever turns it off; a reload of the same config leaves it off
    assert.equal(200, admin(gw, "POST", { on = false }).status)
    reload_with(true)
    assert.is_false(admin(gw, "GET").json.on)
    -- and the config back to false: off (as it is)
    reload_with(false)
    assert.is_false(admin(gw, "GET").json.on)
  end)
end)
