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

-- The merchant of the breaker cases: one attempt per call, the breaker
-- open for OPEN_FOR s after two failed calls. (An hour's window: two
-- failed calls count as two unless they straddle an hour's edge, not a
-- 30 s one's -- the window's count weighs its previous bucket by overlap.)
local OPEN_FOR = 3
local BREAKER = { max_attempts = 1, breaker_min_calls = 2,
                  breaker_failure_ratio = 0.5, breaker_window = 3600,
                  breaker_open_for = OPEN_FOR }

-- a paid payment of amount (fen), through the simulator
local function paid(sim, gw, amount)
  local p = gw:create{ amount = amount }
  sim:pay(p.out_trade_no)
  return gw:wait_state(p.id, "paid", 20)
end

local function refund(gw, id, amount, key)
  return gw:call("POST", "/v1/payments/" .. id .. "/refunds",
                 { amount = amount }, { ["Idempotency-Key"] = key })
end

-- A refund of 30 fen of payment p under key whose answer the store failed
-- to record: the call is held at WeChat (which makes the refund once it
-- is let go) while the store loses gw_refunds, so the transaction that
-- records WeChat's answer fails. returns: the merchant API's answer
local function refund_answer_lost(sim, gw, p, key)
  local h = sim:hold("refund")
  local res
  require("paygate.core").spawn(function()
    res = refund(gw, p.id, 30, key)
  end)
  h:wait_held()                    -- its call at WeChat
  local rows = gw.db:query("SELECT id FROM gw_refunds WHERE"
                           .. " payment_id = $1", { p.id })
  local stored, ok, err = rows and rows[1], nil, nil
  if stored then
    ok, err = gw.db:exec("ALTER TABLE gw_refunds RENAME TO"
                         .. " gw_refunds_away")
  end
  h:release()
  assert(stored, "the refund not stored before its call")
  assert(ok, err)
  testing.wait_until(function() return res ~= nil end, 20, "the answer")
  assert(gw.db:exec("ALTER TABLE gw_refunds_away RENAME TO gw_refunds"))
  return res
end

-- Opens the refund endpoint's breaker: refund calls of another payment
-- fail at WeChat (500) until one is refused on its way out (503)
local function open_breaker(sim, gw)
  local other = paid(sim, gw, 100)
  sim:fault{ endpoint = "refund", kind = "error", status = 500,
             code = "SYSTEM_ERROR" }
  testing.wait_until(function()
    return refund(gw, other.id, 1).status == 503
  end, 20, "the refund endpoint's breaker to open")
  sim:clear_faults()
end

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

  -- the key's record past its 24 h, as the retention pruner finds it
  local function expire(key)
    assert(gw.db:exec("UPDATE paygate_idempotency SET expires_at = 0"
                      .. " WHERE idem_key = $1", { key }))
  end

  it("a key used again after it expired, for another payment, is not "
     .. "answered with the first payment's refund", function()
    local p1, p2 = paid(sim, gw, 100), paid(sim, gw, 100)
    local key = "refund-key-" .. p1.id
    local first = refund(gw, p1.id, 30, key)
    assert.equal(201, first.status, first.body)
    expire(key)
    local res = refund(gw, p2.id, 20, key)
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
    local p = paid(sim, gw, 100)
    local key = "refund-amount-" .. p.id
    assert.equal(201, refund(gw, p.id, 30, key).status)
    expire(key)
    local res = refund(gw, p.id, 20, key)
    assert.equal(422, res.status, res.body)
    assert.equal("idempotency_key_reused", res.json.error)
    assert.equal(1, #gw:get(p.id).refunds)
  end)

  it("a refund WeChat refused is not sent again when its request comes "
     .. "back after the key expired", function()
    local p = paid(sim, gw, 100)
    local key = "refund-refused-" .. p.id
    sim:fault{ endpoint = "refund", kind = "error", status = 403,
               code = "NOT_ENOUGH", count = 1 }
    local first = refund(gw, p.id, 30, key)
    assert.equal(502, first.status, first.body)
    -- the key keeps this answer: said, with how to try again (before: the
    -- same request replayed the 502, and nothing said why)
    assert.matches("send a new request with a new Idempotency-Key",
                   first.json.message, 1, true)
    local rf = first.json.refund
    assert.equal("failed", rf.state)
    expire(key)
    -- the merchant's retry of that request, a day later
    local res = refund(gw, p.id, 30, key)
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
    local p = paid(sim, gw, 100)
    sim:fault{ endpoint = "refund", kind = "error", status = 500,
               code = "SYSTEM_ERROR", count = 1000 }
    local res = refund(gw, p.id, 30, "refund-5xx-" .. p.id)
    sim:clear_faults()
    assert.is_not.equal(201, res.status, res.body)
    assert.equal(502, res.status, res.body)
    assert.equal("wechat_error", res.json.error)
    -- the refund exists, its outcome unknown: it counts, and is kept
    assert.equal("unknown", res.json.refund.state)
    local again = refund(gw, p.id, 30, "refund-5xx-" .. p.id)
    assert.equal(res.body, again.body)
    assert.equal(422, refund(gw, p.id, 71).status)
  end)
  it("a refund whose answer the store failed to record says to retry "
     .. "with the same key, and that retry makes no second refund",
     function()
    local p = paid(sim, gw, 100)
    local key = "refund-store-" .. p.id
    local res = refund_answer_lost(sim, gw, p, key)
    assert.equal(503, res.status, res.body)
    -- WeChat has the refund: the answer must not read "failed, retry"
    -- (a retry under a new key is a second refund of 30)
    assert.matches("same Idempotency-Key", res.json.message, 1, true)
    local rf = assert(res.json.refund, res.body)
    assert.equal("PROCESSING", assert(sim:client():query_refund(
      rf.out_refund_no)).status)
    -- the retry with the same key: that refund, no second one
    local again = refund(gw, p.id, 30, key)
    assert.equal(201, again.status, again.body)
    assert.equal(rf.id, again.json.id)
    assert.equal(1, #gw:get(p.id).refunds)
  end)

  -- WeChat answers a repeated out_refund_no with the refund as it stands:
  -- sent again (its request back after the key expired), a refund WeChat
  -- closed or found abnormal meanwhile is that, not `processing`
  for _, status in ipairs({ "CLOSED", "ABNORMAL" }) do
    it("a refund sent again takes the status WeChat answers: " .. status,
       function()
      local p = paid(sim, gw, 100)
      local key = "refund-again-" .. status .. "-" .. p.id
      -- made at WeChat, but the answer is a 500: unknown here
      sim:fault{ endpoint = "refund", kind = "error", status = 500,
                 code = "SYSTEM_ERROR", after = true }
      local first = refund(gw, p.id, 30, key)
      sim:clear_faults()
      assert.equal(502, first.status, first.body)
      local rf = first.json.refund
      assert.equal("unknown", rf.state)
      -- WeChat settles it; its notification is lost
      sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      sim:settle(rf.out_refund_no, status)
      assert.equal(status, assert(sim:client():query_refund(
        rf.out_refund_no)).status)
      -- the merchant's retry of that request, a day later: sent again
      expire(key)
      local res = refund(gw, p.id, 30, key)
      assert.equal(rf.id, res.json.id, res.body)
      local want = status:lower()
      assert.equal(want, res.json.state, res.body)
      assert.equal(want, gw:call("GET", "/v1/refunds/" .. rf.id)
                           .json.state)
      if status == "CLOSED" then
        -- a closed refund gives its amount back: all 100 are refundable
        assert.equal(201, refund(gw, p.id, 100).status)
      end
    end)
  end
end)

-- A refund whose call was never made (the refund endpoint's circuit
-- breaker open, or the degradation switch turned on after the create's
-- check): the answer is a 503, which a merchant reads as "nothing done"
-- and may retry under a new Idempotency-Key. So the refund must end
-- there, never sent: were it left `created`, the refund checks would send
-- it too, and the payer would get the money twice.
describe("gateway refunds: a refund call that was never made", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, {
      gateway = { reconcile = { check_after = 1, first = 0.5, ceiling = 1,
                                interval = 0.1, bill = false } },
      merchant = BREAKER })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  -- the refund endpoint's breaker opened: refund calls of another
  -- payment fail at WeChat until a refund is refused on its way out
  local opened = 0
  local function open_breaker_again()
    testing.wait_until(function() return os.time() > opened + OPEN_FOR end,
                       OPEN_FOR + 5, "the breaker's open time to pass")
    open_breaker(sim, gw)
    opened = os.time()
  end

  local function breaker_passed()
    testing.wait_until(function() return os.time() > opened + OPEN_FOR end,
                       OPEN_FOR + 5, "the breaker's open time to pass")
  end

  -- the merchant's retry once the breaker let calls through again: its
  -- half-open probe may be a refund check's call (the refund checks send
  -- again the other payment's refunds WeChat failed), so a retry can
  -- still meet circuit_open (503, its refund failed, the key free again)
  -- and is made again until one goes out
  local function retry_until_sent(id, amount, key)
    local res
    testing.wait_until(function()
      res = refund(gw, id, amount, key)
      return res.status ~= 503
    end, OPEN_FOR + 10, "the breaker to let the retry through")
    return res
  end

  it("ends the refund unsent, so a retry under a new key is the only "
     .. "refund", function()
    local b = paid(sim, gw, 100)
    open_breaker_again()
    local res = refund(gw, b.id, 30, "not-sent-" .. b.id)
    assert.equal(503, res.status, res.body)
    assert.equal("degraded", res.json.error)
    local rf = assert(res.json.refund, res.body)
    -- the merchant retries under a new key once the breaker lets calls
    -- through again
    breaker_passed()
    local again = retry_until_sent(b.id, 30, "not-sent-retry-" .. b.id)
    assert.equal(201, again.status, again.body)
    assert.is_not.equal(rf.id, again.json.id)
    -- the refund checks have looked at everything due before the retry's
    -- refund (they go by created_at)
    testing.wait_until(function()
      local rows = assert(gw.db:query("SELECT checks FROM gw_refunds"
                                      .. " WHERE id = $1", { again.json.id }))
      return rows[1].checks > 0
    end, 20, "the refund checks to look at the retry's refund")
    -- the first was never sent: WeChat has one refund of 30 for b
    local got, err = sim:client():query_refund(rf.out_refund_no)
    assert.is_nil(got, "the refund the 503 answered was sent")
    assert.equal("not_found", err and err.kind)
    -- ended here (failed), not left `created` for the refund checks, and
    -- the answer says so
    assert.equal("failed", rf.state, res.body)
    assert.matches("any Idempotency-Key", res.json.message, 1, true)
    assert.equal("failed", gw:call("GET", "/v1/refunds/" .. rf.id)
                             .json.state)
    -- and it does not count against the payment: 70 fen are left
    local rest = refund(gw, b.id, 70)
    assert.equal(201, rest.status, rest.body)
    assert.equal(422, refund(gw, b.id, 1).status)
  end)

  it("a retry with the same key makes the refund then", function()
    local b = paid(sim, gw, 100)
    open_breaker_again()
    local key = "not-sent-same-" .. b.id
    local res = refund(gw, b.id, 30, key)
    assert.equal(503, res.status, res.body)
    breaker_passed()
    local again = retry_until_sent(b.id, 30, key)
    assert.equal(201, again.status, again.body)
    assert.equal("processing", again.json.state)
    assert.equal(30, assert(sim:client():query_refund(
      again.json.out_refund_no)).amount.refund)
  end)
end)

-- A refund a retry finds by its key, still `created`, was made by an
-- earlier run of the request, which may have sent it: the store failed to
-- record WeChat's answer (the 503 that says to retry with the same key),
-- or the run died during the call. A call refused on its way out now (the
-- breaker open) says nothing about that one: were it ended `failed`, its
-- amount would no longer count and the answer would invite a new key, a
-- second refund while WeChat pays back the first.
describe("gateway refunds: a retry whose call is not made, of a refund an "
         .. "earlier run may have sent", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, {
      gateway = { reconcile = { enabled = false } },
      merchant = BREAKER })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  it("leaves it counted and says to retry with the same key", function()
    local p = paid(sim, gw, 100)
    local key = "refund-earlier-" .. p.id
    -- the first run: WeChat takes the refund, the store fails to record
    -- its answer
    local res = refund_answer_lost(sim, gw, p, key)
    assert.equal(503, res.status, res.body)
    local rf = assert(res.json.refund, res.body)
    assert.equal("PROCESSING", assert(sim:client():query_refund(
      rf.out_refund_no)).status)
    -- the refund endpoint's breaker opens (another payment's refunds fail)
    open_breaker(sim, gw)
    -- the retry with the same key, its call refused by the breaker
    local again = refund(gw, p.id, 30, key)
    assert.equal(503, again.status, again.body)
    assert.equal(rf.id, again.json.refund.id)
    assert.equal("created", again.json.refund.state, again.body)
    assert.matches("same Idempotency-Key", again.json.message, 1, true)
    assert.equal("created", gw:call("GET", "/v1/refunds/" .. rf.id)
                              .json.state)
    -- its 30 fen still count: 70 are left
    local over = refund(gw, p.id, 71)
    assert.equal(422, over.status, over.body)
    -- once calls go out again, the same key finds it: one refund of 30
    testing.wait_until(function()
      again = refund(gw, p.id, 30, key)
      return again.status ~= 503
    end, OPEN_FOR + 10, "the breaker to let the retry through")
    assert.equal(201, again.status, again.body)
    assert.equal(rf.id, again.json.id)
    assert.equal("processing", again.json.state)
    assert.equal(1, #gw:get(p.id).refunds)
  end)
end)
