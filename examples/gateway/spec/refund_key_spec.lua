-- POST /v1/payments/:id/refunds and what its answer promises.
--
-- A refund is found again by its request (<app>|<Idempotency-Key>, column
-- request_key) when a retry of that request runs again: after a crash, a
-- 503, or once the key's record expired (24 h). What is found must be
-- that request's refund -- not another payment's, nor another amount --
-- and a refund that already ended (WeChat refused it: failed) is not
-- sent to WeChat again under its out_refund_no.
--
-- And an answer of 201 means WeChat accepted the refund: a call WeChat
-- failed (5xx) leaves the refund unknown, which is an error answer.
local testing = require "paygate.testing"
local core = dofile("examples/gateway/spec/core_support.lua")

describe("gateway refunds: the Idempotency-Key and the answer", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { gateway = { reconcile = { enabled = false } },
                           merchant = { deadline = 3 } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  before_each(function() sim:clear_faults() end)

  local function paid(amount)
    local p = gw:create{ amount = amount }
    sim:pay(p.out_trade_no)
    return gw:wait_state(p.id, "paid", 20)
  end

  local function refund(id, amount, key)
    return gw:call("POST", "/v1/payments/" .. id .. "/refunds",
                   { amount = amount }, { ["Idempotency-Key"] = key })
  end

  -- the key's record past its 24 h, as the retention pruner finds it
  local function expire(key)
    assert(gw.db:exec("UPDATE paygate_idempotency SET expires_at = 0"
                      .. " WHERE idem_key = $1", { key }))
  end

  it("a key used again after it expired, for another payment, is not "
     .. "answered with the first payment's refund", function()
    local p1, p2 = paid(100), paid(100)
    local key = "refund-key-" .. p1.id
    local first = refund(p1.id, 30, key)
    assert.equal(201, first.status, first.body)
    expire(key)
    local res = refund(p2.id, 20, key)
    -- not p1's refund of 30 as if it were p2's of 20
    assert.is_not.equal(p1.id, res.json and res.json.payment_id, res.body)
    assert.equal(422, res.status, res.body)
    assert.equal("idempotency_key_reused", res.json.error)
    assert.equal(0, #gw:get(p2.id).refunds)
    -- p1 still has its one refund
    assert.equal(1, #gw:get(p1.id).refunds)
  end)

  it("a key used again after it expired, for another amount, is not "
     .. "answered with the first refund", function()
    local p = paid(100)
    local key = "refund-amount-" .. p.id
    assert.equal(201, refund(p.id, 30, key).status)
    expire(key)
    local res = refund(p.id, 20, key)
    assert.equal(422, res.status, res.body)
    assert.equal("idempotency_key_reused", res.json.error)
    assert.equal(1, #gw:get(p.id).refunds)
  end)

  it("a refund WeChat refused is not sent again when its request comes "
     .. "back after the key expired", function()
    local p = paid(100)
    local key = "refund-refused-" .. p.id
    sim:fault{ endpoint = "refund", kind = "error", status = 403,
               code = "NOT_ENOUGH", count = 1 }
    local first = refund(p.id, 30, key)
    assert.equal(502, first.status, first.body)
    local rf = first.json.refund
    assert.equal("failed", rf.state)
    expire(key)
    -- the merchant's retry of that request, a day later
    local res = refund(p.id, 30, key)
    assert.equal(502, res.status, res.body)
    assert.equal(rf.id, res.json.refund.id)
    assert.equal("failed", res.json.refund.state)
    -- WeChat was not asked again: no refund under that out_refund_no
    -- (one made there would stay `failed` here, outside the refunded
    -- total, and its SUCCESS refused)
    local got, err = sim:client():query_refund(rf.out_refund_no)
    assert.is_nil(got)
    assert.equal("not_found", err.kind)
    assert.equal("failed", gw:call("GET", "/v1/refunds/" .. rf.id)
                             .json.state)
  end)

  it("a refund WeChat failed (5xx) is not answered 201", function()
    local p = paid(100)
    sim:fault{ endpoint = "refund", kind = "error", status = 500,
               code = "SYSTEM_ERROR", count = 1000 }
    local res = refund(p.id, 30, "refund-5xx-" .. p.id)
    sim:clear_faults()
    assert.is_not.equal(201, res.status, res.body)
    assert.equal(502, res.status, res.body)
    assert.equal("wechat_error", res.json.error)
    -- the refund exists, its outcome unknown: it counts, and is kept
    assert.equal("unknown", res.json.refund.state)
    local again = refund(p.id, 30, "refund-5xx-" .. p.id)
    assert.equal(res.body, again.body)
    assert.equal(422, refund(p.id, 71).status)
  end)
  it("a refund whose answer the store failed to record says to retry "
     .. "with the same key, and that retry makes no second refund",
     function()
    local pcore = require "paygate.core"
    local p = paid(100)
    local key = "refund-store-" .. p.id
    -- the call waits at WeChat; meanwhile the store loses gw_refunds, so
    -- the transaction that records WeChat's answer fails
    sim:fault{ endpoint = "refund", kind = "latency", seconds = 1.5,
               count = 1 }
    local res
    pcore.spawn(function() res = refund(p.id, 30, key) end)
    testing.wait_until(function()
      local rows = assert(gw.db:query("SELECT id FROM gw_refunds WHERE"
                                      .. " payment_id = $1", { p.id }))
      return rows[1] ~= nil
    end, 10, "the refund stored")
    assert(gw.db:exec("ALTER TABLE gw_refunds RENAME TO gw_refunds_away"))
    testing.wait_until(function() return res ~= nil end, 20,
                       "the answer")
    assert(gw.db:exec("ALTER TABLE gw_refunds_away RENAME TO gw_refunds"))
    assert.equal(503, res.status, res.body)
    -- WeChat has the refund: the answer must not read "failed, retry"
    -- (a retry under a new key is a second refund of 30)
    assert.matches("same Idempotency-Key", res.json.message, 1, true)
    local rf = assert(res.json.refund, res.body)
    assert.equal("PROCESSING", assert(sim:client():query_refund(
      rf.out_refund_no)).status)
    -- the retry with the same key: that refund, no second one
    local again = refund(p.id, 30, key)
    assert.equal(201, again.status, again.body)
    assert.equal(rf.id, again.json.id)
    assert.equal(1, #gw:get(p.id).refunds)
  end)
end)
