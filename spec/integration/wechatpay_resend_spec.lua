-- paygate.wechatpay when the simulator resets the connection after it
-- acted on a POST (fault reset, after = true) on a reused keep-alive
-- connection. The HTTP client must not send the same signed bytes again
-- by itself: WeChat would refuse the repeated nonce (401 SIGN_ERROR) and
-- the call would read "refused" though the order was created. Instead the
-- lost answer is the transport's to settle: unknown_outcome, or a retry
-- signed anew for an idempotent call.
local testing = require "paygate.testing"

describe("paygate.wechatpay: a connection reset after WeChat acted", function()
  local sim, wx, m

  setup(function()
    sim = testing.simulator()
    m = sim.merchant
    wx = sim:client()
  end)

  teardown(function()
    if wx then wx:stop() end
    testing.stop_all()
  end)

  after_each(function() sim:clear_faults() end)

  local n = 0
  local function order_no()
    n = n + 1
    return "RS" .. os.time() .. n
  end

  local function params(no)
    return { appid = m.appid, description = "reset", out_trade_no = no,
             notify_url = "https://merchant.example/notify",
             amount = { total = 1, currency = "CNY" } }
  end

  -- a call answered on the connection the next one reuses
  local function warm()
    local _, err = wx:query_by_out_trade_no("NONE" .. order_no())
    assert.equal("not_found", err and err.kind, tostring(err))
  end

  -- the prepays the simulator logged after seq (the body, which names the
  -- out_trade_no, is not in its log)
  local function prepays_since(seq)
    local list = {}
    for _, r in ipairs(sim:requests()) do
      if r.seq > seq and r.endpoint == "prepay" then list[#list + 1] = r end
    end
    return list
  end

  local function last_seq()
    local s = 0
    for _, r in ipairs(sim:requests()) do
      if r.seq > s then s = r.seq end
    end
    return s
  end

  it("a prepay out of attempts is unknown_outcome, not sign_error",
     function()
    warm()
    local seq = last_seq()
    sim:fault{ endpoint = "prepay", kind = "reset", count = 1, after = true }
    local no = order_no()
    local data, err = wx:native_prepay(params(no), { max_attempts = 1 })
    assert.is_nil(data)
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.equal("closed", err.cause_kind)
    assert.is_true(err.retryable)          -- the same out_trade_no is safe
    -- WeChat saw it once, and acted: the order is there
    local seen = prepays_since(seq)
    assert.equal(1, #seen)
    assert.equal("CONNECTION_RESET", seen[1].code)
    assert(wx:query_by_out_trade_no(no))
  end)

  it("a non-idempotent POST is unknown_outcome, not retryable", function()
    warm()
    local seq = last_seq()
    sim:fault{ endpoint = "prepay", kind = "reset", count = 1, after = true }
    local no = order_no()
    local p = params(no)
    p.mchid = m.mchid
    local res, err = wx:request("POST", "/v3/pay/transactions/native", p,
                                { idempotent = false })
    assert.is_nil(res)
    assert.equal("unknown_outcome", err.kind, tostring(err))
    assert.is_false(err.retryable)
    assert.equal(1, #prepays_since(seq))
    assert(wx:query_by_out_trade_no(no))
  end)

  it("an idempotent prepay is retried signed anew and answered", function()
    warm()
    local seq = last_seq()
    sim:fault{ endpoint = "prepay", kind = "reset", count = 1, after = true }
    local data = assert(wx:native_prepay(params(order_no())))
    assert.matches("^weixin://", data.code_url)
    local seen = prepays_since(seq)
    assert.equal(2, #seen)
    assert.equal("CONNECTION_RESET", seen[1].code)
    assert.equal(200, seen[2].status)
  end)

  -- the HTTP client would send a GET again by itself; signed, it must not
  -- be (WeChat refuses the same nonce): the transport retries it signed
  -- anew
  it("a query whose answer was lost is retried signed anew", function()
    local no = order_no()
    assert(wx:native_prepay(params(no)))
    local seq = last_seq()
    sim:fault{ endpoint = "query", kind = "reset", count = 1, after = true }
    local data = assert(wx:query_by_out_trade_no(no))
    assert.equal("NOTPAY", data.trade_state)
    local seen = {}
    for _, r in ipairs(sim:requests()) do
      if r.seq > seq and r.endpoint == "query" then seen[#seen + 1] = r end
    end
    assert.equal(2, #seen)
    assert.equal("CONNECTION_RESET", seen[1].code)
    assert.equal(200, seen[2].status)
  end)
end)
