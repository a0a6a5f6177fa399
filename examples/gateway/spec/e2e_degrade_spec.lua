-- The degradation switch (POST /admin/degrade): while on, reads answer
-- from local state marked stale and writes fail fast with 503 degraded,
-- without calling WeChat; notifications are still applied. /admin/* with
-- an admin token configured needs it.
local S = require "examples.gateway.spec.support"
local core = require "paygate.core"

describe("gateway degradation switch", function()
  local env
  local TOKEN = "adm_" .. S.digits(24)
  local auth = { Authorization = "Bearer " .. TOKEN }
  -- the merchant client's deadline (the kit's is 15 s): a read with
  -- WeChat not answering waits it out
  local DEADLINE = 5

  setup(function()
    env = S.start{ admin_token = TOKEN, merchant = { deadline = DEADLINE } }
  end)
  teardown(S.stop)

  local function wx_calls(endpoint)
    local n = 0
    for _, r in ipairs(env.sim:requests()) do
      if r.endpoint == endpoint then n = n + 1 end
    end
    return n
  end

  local function degrade(on)
    local res = env:admin("POST", "/admin/degrade", { on = on }, auth)
    assert.equal(200, res.status, res.body)
    assert.equal(on, res.json.on)
  end

  it("/admin/* with a token set: refused without it", function()
    local res = env:admin("GET", "/admin/degrade")
    assert.is_true(res.status == 401 or res.status == 403, res.status)
    res = env:admin("POST", "/admin/degrade", { on = true },
                    { Authorization = "Bearer wrong" })
    assert.is_true(res.status == 401 or res.status == 403, res.status)
    res = env:admin("GET", "/admin/degrade", nil, auth)
    assert.equal(200, res.status, res.body)
    assert.is_false(res.json.on)
    res = env:admin("POST", "/admin/degrade", { on = "yes" }, auth)
    assert.equal(400, res.status, res.body)
  end)

  it("on: reads are stale, writes fail fast; off: back to normal",
     function()
    local open = env:create().payment
    local paid = env:paid_payment()
    local made = env:refund(paid.id, 1)
    assert.is_true(made.status == 200 or made.status == 201, made.body)
    local refund_id = made.json.id
    -- before: the plain reads are not marked
    assert.is_not_true(env:get(open.id).stale)
    local rl = env:api("GET", "/v1/payments/" .. paid.id .. "/refunds")
    assert.equal(200, rl.status, rl.body)
    assert.is_not_true(rl.json.stale)
    degrade(true)
    finally(function() degrade(false) end)
    local queries = wx_calls("query")
    local p = env:get(open.id, true)
    assert.equal("paying", p.state)
    assert.is_true(p.stale)
    -- every read is marked while degraded, not only ?refresh=1
    p = env:get(open.id)
    assert.equal("paying", p.state)
    assert.is_true(p.stale)
    rl = env:api("GET", "/v1/payments/" .. paid.id .. "/refunds")
    assert.equal(200, rl.status, rl.body)
    assert.is_true(rl.json.stale)
    assert.equal(refund_id, rl.json.refunds[1].id)
    local r1 = env:api("GET", "/v1/refunds/" .. refund_id)
    assert.equal(200, r1.status, r1.body)
    assert.is_true(r1.json.stale)
    assert.equal(queries, wx_calls("query"))

    local prepays, t0 = wx_calls("prepay"), core.mono()
    local res = env:api("POST", "/v1/payments", { order_id = S.order_id(),
      channel = "native", amount = 1, description = "degraded" })
    assert.equal(503, res.status, res.body)
    assert.equal("degraded", res.json.error)
    assert.truthy(core.mono() - t0 < 1, "fast")
    assert.equal(prepays, wx_calls("prepay"))
    res = env:api("POST", "/v1/payments/" .. open.id .. "/close")
    assert.equal(503, res.status, res.body)
    res = env:api("POST", "/v1/payments/" .. open.id .. "/attempts",
                  { channel = "native" })
    assert.equal(503, res.status, res.body)
    res = env:refund(paid.id, 1)
    assert.equal(503, res.status, res.body)
    assert.equal("degraded", res.json.error)
    -- WeChat's own notifications still land
    env.sim:pay_and_wait(open.out_trade_no)
    env:wait_state(open.id, "paid")

    degrade(false)
    local b = env:create()
    assert.equal("paying", b.payment.state)
    local fresh = env:get(b.payment.id, true)
    assert.is_not_true(fresh.stale)
    assert.is_not_true(env:get(open.id).stale)
    r1 = env:api("GET", "/v1/refunds/" .. refund_id)
    assert.equal(200, r1.status, r1.body)
    assert.is_not_true(r1.json.stale)
  end)

  it("reads with WeChat failing answer stale", function()
    local p = env:create().payment
    env.sim:fault{ endpoint = "query", kind = "error", status = 503 }
    finally(function() env.sim:clear_faults() end)
    local got = env:get(p.id, true)
    assert.is_true(got.stale)
    assert.equal("paying", got.state)
  end)

  it("reads with WeChat not answering answer stale, within the client's "
     .. "timeout", function()
    local p = env:create().payment
    -- the gateway's client gives up by its deadline (DEADLINE in all,
    -- timeout = 5 a try): every query held at WeChat until then, not a
    -- latency the simulator would still sleep out at the teardown
    env.sim:hold("query", { count = 20, seconds = 120 })
    finally(function() env.sim:clear_faults() end)
    local t0 = core.mono()
    local got = env:get(p.id, true)
    assert.truthy(core.mono() - t0 < DEADLINE + 2,
                  "answered within the deadline")
    assert.is_true(got.stale, "stale: " .. tostring(got.stale))
    assert.equal("paying", got.state)
  end)
end)

describe("gateway started degraded (config.gateway.degraded)", function()
  local env
  setup(function() env = S.start{ gateway = { degraded = true } } end)
  teardown(S.stop)

  it("refuses writes until switched off (loopback: no token needed)",
     function()
    local res = env:api("POST", "/v1/payments", { order_id = S.order_id(),
      channel = "native", amount = 1, description = "x" })
    assert.equal(503, res.status, res.body)
    res = env:admin("POST", "/admin/degrade", { on = false })
    assert.equal(200, res.status, res.body)
    env:create()
  end)
end)
