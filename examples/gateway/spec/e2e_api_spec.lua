-- The gateway's merchant API end to end, against the WeChat Pay simulator:
-- create for every channel, attempts, get and refresh, close, refunds,
-- and every transition the API can ask for, legal or not.
--   build/paygate exec "$(command -v busted)" --helper=spec/helpers.lua \
--     examples/gateway/spec/e2e_api_spec.lua
local S = require "examples.gateway.spec.support"
local crypto = require "paygate.crypto"
local apikey = require "paygate.apikey"

local read = S.read

describe("gateway merchant API", function()
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)
  after_each(function() env.sim:clear_faults() end)

  local function check_payment(p)
    for _, k in ipairs({ "id", "order_id", "state", "channel",
                         "currency", "out_trade_no" }) do
      assert.is_string(p[k], k)
    end
    for _, k in ipairs({ "version", "amount", "refunded", "created_at",
                         "updated_at", "expires_at" }) do
      assert.is_number(p[k], k)
    end
    assert.matches("^pay_", p.id)
  end

  describe("create", function()
    it("native: 201, a code_url, the payment paying", function()
      local b = env:create{ amount = 150 }
      check_payment(b.payment)
      assert.matches("^weixin://", b.pay.code_url)
      assert.equal("paying", b.payment.state)
      assert.equal(150, b.payment.amount)
      assert.equal("CNY", b.payment.currency)
      assert.equal(0, b.payment.refunded)
      assert.equal("native", b.payment.channel)
      -- the order is at WeChat under the payment's out_trade_no
      local q = env.sim:notifications{ out_trade_no = b.payment.out_trade_no }
      assert.equal(0, #q)
      assert.truthy(b.payment.expires_at > b.payment.created_at)
      -- its id begins with the millisecond it was made (gw.model): ids
      -- sort by creation, so the store's indexes grow at their right edge
      local ms = 0
      for c in b.payment.id:sub(5, 13):gmatch(".") do
        ms = ms * 36 + tonumber(c, 36)
      end
      assert.is_true(math.abs(ms - b.payment.created_at * 1000) < 2000,
                     b.payment.id .. " at " .. b.payment.created_at)
      local later = env:create{ amount = 150 }
      assert.is_true(later.payment.id > b.payment.id)
    end)

    it("h5: an h5_url", function()
      local b = env:create{ channel = "h5", client_ip = "203.0.113.7" }
      assert.matches("^https?://", b.pay.h5_url)
      assert.equal("h5", b.payment.channel)
    end)

    it("jsapi: the pay-sign parameters, signed with the merchant key",
       function()
      local b = env:create{ channel = "jsapi",
                            payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } }
      local p = b.pay
      assert.equal(env.m.appid, p.appId)
      assert.matches("^prepay_id=", p.package)
      assert.equal("RSA", p.signType)
      local pub = assert(crypto.public_key(read(env.m.public_key)))
      assert.is_true(crypto.verify_base64(pub, p.appId .. "\n" .. p.timeStamp
        .. "\n" .. p.nonceStr .. "\n" .. p.package .. "\n", p.paySign,
        "sha256-rsa"))
    end)

    it("app: the app pay parameters", function()
      local b = env:create{ channel = "app" }
      local p = b.pay
      assert.equal(env.m.appid, p.appid)
      assert.equal(env.m.mchid, p.partnerid)
      assert.is_string(p.prepayid)
      assert.equal("Sign=WXPay", p.package)
      assert.is_string(p.sign)
      -- the App SDK's signing string: the bare prepay id, no prefix
      local pub = assert(crypto.public_key(read(env.m.public_key)))
      assert.is_true(crypto.verify_base64(pub, p.appid .. "\n" .. p.timestamp
        .. "\n" .. p.noncestr .. "\n" .. p.prepayid .. "\n", p.sign,
        "sha256-rsa"))
    end)

    -- was: nothing said when what was handed out stops working. WeChat
    -- honours a prepay_id and a code_url for 2 hours, an h5_url for 5
    -- minutes, whatever the order's time_expire: a payment made with an
    -- expires_in past 2 h stayed paying with a pay no payer could use,
    -- and its front end could not tell
    it("pay_expires_at: when the pay handed out stops working; a new"
       .. " attempt on the same channel hands out a fresh one", function()
      local now = os.time()
      local cases = {
        { { channel = "jsapi", payer = { openid = "o-exp" },
            expires_in = 86400 }, 7200 },
        { { channel = "app", expires_in = 86400 }, 7200 },
        { { channel = "native", expires_in = 86400 }, 7200 },
        { { channel = "h5", client_ip = "203.0.113.7", expires_in = 86400 },
          300 },
        -- the payment's own expiry comes first
        { { channel = "jsapi", payer = { openid = "o-exp" },
            expires_in = 600 }, 600 },
      }
      for i, c in ipairs(cases) do
        local b = env:create(c[1])
        local p = b.payment
        assert.is_number(b.pay_expires_at, "case " .. i)
        assert.equal(0, b.pay_expires_at % 1, "case " .. i)
        assert.truthy(b.pay_expires_at <= p.expires_at, "case " .. i)
        assert.truthy(b.pay_expires_at >= now + c[2] - 5
                      and b.pay_expires_at <= p.created_at + c[2],
                      "case " .. i .. ": " .. b.pay_expires_at)
        -- the payment's attempts say the same of their pay
        local got = env:get(p.id)
        assert.equal(b.pay_expires_at, got.attempts[1].pay_expires_at)
      end
      -- the fresh pay: the same channel again
      local b = env:create(cases[1][1])
      local res = env:api("POST", "/v1/payments/" .. b.payment.id
        .. "/attempts", { channel = "jsapi", payer = { openid = "o-exp" } })
      assert.equal(201, res.status, res.body)
      assert.are_not.equal(b.pay.package, res.json.pay.package)
      assert.is_number(res.json.pay_expires_at)
      local got = env:get(b.payment.id)
      assert.equal("superseded", got.attempts[1].state)
      assert.equal("open", got.attempts[2].state)
      assert.equal(res.json.pay_expires_at, got.attempts[2].pay_expires_at)
    end)

    it("400 for bad input, naming the field", function()
      local bad = {
        { order_id = S.order_id(), channel = "cash", amount = 1,
          description = "x" },
        { order_id = S.order_id(), channel = "native", amount = 0,
          description = "x" },
        { order_id = S.order_id(), channel = "native", amount = 1.5,
          description = "x" },
        { channel = "native", amount = 1, description = "x" },
        { order_id = S.order_id(), channel = "jsapi", amount = 1,
          description = "x" },                         -- no payer.openid
        { order_id = S.order_id(), channel = "native", amount = 1,
          description = "x", currency = "USD" },
        -- an appid other than the merchant's: refused here (it was a 502
        -- wechat_error, the client's own check, never sent to WeChat)
        { order_id = S.order_id(), channel = "native", amount = 1,
          description = "x", appid = "wx0000000000000000" },
      }
      for i, b in ipairs(bad) do
        local res = env:api("POST", "/v1/payments", b)
        assert.equal(400, res.status, "case " .. i .. ": " .. res.body)
        assert.is_string(res.json.error, "case " .. i)
        assert.is_string(res.json.message, "case " .. i)
      end
      local res = env:api("POST", "/v1/payments", "{not json")
      assert.equal(400, res.status, res.body)
    end)

    it("a direct merchant's sub_appid: 400 naming it, nothing stored",
       function()
      -- (a sub-merchant's own appid is a service provider's: a direct
      -- merchant names its other appids with appid)
      local oid = S.order_id()
      local res = env:api("POST", "/v1/payments", { order_id = oid,
        channel = "native", amount = 1, description = "x",
        sub_appid = env.m.appid })
      assert.equal(400, res.status, res.body)
      assert.matches("service provider", res.json.fields.sub_appid, 1, true)
      assert.is_nil(next(res.json.fields, next(res.json.fields)), res.body)
      assert.equal(0, #assert(env.db:query("SELECT id FROM gw_payments"
        .. " WHERE order_id = $1", { oid })))
    end)

    it("the same order_id again (another Idempotency-Key): 409 payment_exists",
       function()
      local oid = S.order_id()
      env:create{ order_id = oid }
      local res = env:api("POST", "/v1/payments", { order_id = oid,
        channel = "native", amount = 100, description = "e2e order" })
      assert.equal(409, res.status, res.body)
      assert.equal("payment_exists", res.json.error)
    end)

    it("WeChat refusing the prepay: 502, nothing handed out", function()
      env.sim:fault{ endpoint = "prepay", kind = "error", status = 400,
                     code = "INVALID_REQUEST" }
      local res = env:api("POST", "/v1/payments", { order_id = S.order_id(),
        channel = "native", amount = 100, description = "e2e order" })
      assert.equal(502, res.status, res.body)
      assert.is_nil(res.json.pay)
    end)
  end)

  describe("get", function()
    it("answers the payment with its attempts and refunds", function()
      local b = env:create()
      local p = env:get(b.payment.id)
      check_payment(p)
      assert.equal(b.payment.id, p.id)
      assert.equal(1, #p.attempts)
      assert.equal(b.payment.out_trade_no, p.attempts[1].out_trade_no)
      assert.equal("open", p.attempts[1].state)
      assert.same({}, p.refunds)
    end)

    it("reads paid right after the simulator's pay?wait= answered (the"
       .. " README's demo)", function()
      local b = env:create()
      local t, res = env.sim:control("POST", "/sim/transactions/"
                                     .. b.payment.out_trade_no .. "/pay?wait=5")
      assert.equal("SUCCESS", t.trade_state)
      assert.equal("204", res.headers["x-sim-notified"])
      assert.equal("paid", env:get(b.payment.id).state)   -- no wait here
      -- a bad wait is refused before anything is paid
      local c = env:create()
      env.sim:control("POST", "/sim/transactions/" .. c.payment.out_trade_no
                      .. "/pay?wait=99", nil, 400)
      assert.equal("paying", env:get(c.payment.id).state)
    end)

    it("404 for an unknown payment and for another app's", function()
      local res = env:api("GET", "/v1/payments/pay_doesnotexist")
      assert.equal(404, res.status)
      local b = env:create()
      local other = assert(apikey.create(env.db, "other_app"))
      res = env:api("GET", "/v1/payments/" .. b.payment.id, nil,
        { app_id = other.app_id, key_id = other.key_id,
          secret = other.secret })
      assert.equal(404, res.status, res.body)
    end)

    it("?refresh=1 finds a payment whose notification was lost", function()
      env.sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      local b = env:create()
      env.sim:pay(b.payment.out_trade_no)
      assert.equal("paying", env:get(b.payment.id).state)
      local p = env:get(b.payment.id, true)
      assert.equal("paid", p.state)
      assert.is_string(p.transaction_id)
      assert.is_not_true(p.stale)
      assert.equal("paid", env:get(b.payment.id).state)
    end)

    it("?refresh=1 applies a failed payment (PAYERROR)", function()
      local b = env:create()
      env.sim:fail(b.payment.out_trade_no)
      assert.equal("failed", env:get(b.payment.id, true).state)
    end)

    it("?refresh=1 with WeChat failing: the local state, stale", function()
      local b = env:create()
      env.sim:fault{ endpoint = "query", kind = "error", status = 500 }
      local p = env:get(b.payment.id, true)
      assert.equal("paying", p.state)
      assert.is_true(p.stale)
    end)
  end)

  describe("attempts", function()
    it("native then h5: a new out_trade_no, the first closed at WeChat",
       function()
      local b = env:create()
      local first = b.payment.out_trade_no
      local res = env:api("POST", "/v1/payments/" .. b.payment.id
                          .. "/attempts", { channel = "h5",
                                            client_ip = "203.0.113.7" })
      assert.equal(201, res.status, res.body)
      local second = res.json.payment.out_trade_no
      assert.matches("^https?://", res.json.pay.h5_url)
      assert.are_not.equal(first, second)
      assert.equal("h5", res.json.payment.channel)
      local p = env:get(b.payment.id)
      assert.equal(2, #p.attempts)
      local states = {}
      for _, a in ipairs(p.attempts) do states[a.out_trade_no] = a.state end
      assert.truthy(states[first] == "closed" or states[first] == "superseded",
                    states[first])
      assert.equal("open", states[second])
      -- WeChat has the first closed: the payer can no longer pay it
      env.sim:control("POST", "/sim/transactions/" .. first .. "/pay", nil,
                      409)
      env.sim:pay_and_wait(second)
      local paid = env:wait_state(b.payment.id, "paid")
      assert.equal(second, paid.out_trade_no)
    end)

    it("three attempts never reuse an out_trade_no", function()
      local b = env:create()
      local seen = { [b.payment.out_trade_no] = true }
      for _, ch in ipairs({ "app", "native" }) do
        local res = env:api("POST", "/v1/payments/" .. b.payment.id
                            .. "/attempts", { channel = ch })
        assert.equal(201, res.status, res.body)
        local no = res.json.payment.out_trade_no
        assert.is_nil(seen[no])
        seen[no] = true
      end
      assert.equal(3, #env:get(b.payment.id).attempts)
    end)

    it("a close that fails at WeChat: 502 and no new attempt", function()
      local b = env:create()
      env.sim:fault{ endpoint = "close", kind = "error", status = 500 }
      local res = env:api("POST", "/v1/payments/" .. b.payment.id
                          .. "/attempts", { channel = "native" })
      assert.equal(502, res.status, res.body)
      env.sim:clear_faults()
      local p = env:get(b.payment.id)
      assert.equal(1, #p.attempts)
      assert.equal(b.payment.out_trade_no, p.out_trade_no)
    end)

    it("refused on a paid payment (409)", function()
      local p = env:paid_payment()
      local res = env:api("POST", "/v1/payments/" .. p.id .. "/attempts",
                          { channel = "native" })
      assert.equal(409, res.status, res.body)
    end)
  end)

  describe("close", function()
    it("closes at WeChat and locally", function()
      local b = env:create()
      local res = env:api("POST", "/v1/payments/" .. b.payment.id .. "/close")
      assert.equal(200, res.status, res.body)
      assert.equal("closed", res.json.state)
      assert.truthy(res.json.version > b.payment.version)
      env.sim:control("POST", "/sim/transactions/" .. b.payment.out_trade_no
                      .. "/pay", nil, 409)
      assert.equal("closed", env:get(b.payment.id).state)
    end)

    it("refused on a paid payment (409), which stays paid", function()
      local p = env:paid_payment()
      local res = env:api("POST", "/v1/payments/" .. p.id .. "/close")
      assert.equal(409, res.status, res.body)
      assert.equal("paid", env:get(p.id).state)
    end)

    it("404 for an unknown payment", function()
      local res = env:api("POST", "/v1/payments/pay_nope/close")
      assert.equal(404, res.status)
    end)

    it("a close racing a new attempt never marks the new one closed"
       .. " without closing it at WeChat", function()
      local core = require "paygate.core"
      local p = env:create().payment
      -- the close's call to WeChat is held until a new attempt has closed
      -- attempt 1 (not held: the hold takes one call) and opened attempt 2
      local h = env.sim:hold("close")
      local closing
      core.spawn(function()
        closing = env:api("POST", "/v1/payments/" .. p.id .. "/close")
      end)
      h:wait_held()                     -- the close at WeChat
      local res = env:api("POST", "/v1/payments/" .. p.id .. "/attempts",
                          { channel = "native" })
      h:release()
      local a = S.expect(res, 201, "attempt")
      S.wait_until(function() return closing ~= nil end, 20,
                   "the close to answer")
      -- attempt 2 was opened after the close began: the close must not
      -- claim it (before: 200 closed, attempt 2 'closed' here but open
      -- at WeChat, so paying it was a late payment, refunded)
      assert.equal(409, closing.status, closing.body)
      assert.equal("conflict", closing.json.error)
      local now = env:get(p.id)
      assert.equal("paying", now.state)
      assert.equal(a.payment.out_trade_no, now.out_trade_no)
      env.sim:pay(a.payment.out_trade_no)
      local paid = env:wait_state(p.id, "paid")
      assert.falsy(paid.late)
    end)
  end)

  describe("refunds", function()
    it("full: paid -> refunded once WeChat settles", function()
      local p = env:paid_payment{ amount = 80 }
      local res = env:refund(p.id, 80, "customer asked")
      assert.equal(201, res.status, res.body)
      local r = res.json
      assert.matches("^ref_", r.id)
      assert.equal(80, r.amount)
      assert.is_string(r.out_refund_no)
      env.sim:settle(r.out_refund_no)
      assert.equal("succeeded", env:wait_refund(r.id, "succeeded").state)
      local after = env:wait_state(p.id, "refunded")
      assert.equal(80, after.refunded)
    end)

    it("reads succeeded right after the simulator's settle?wait= answered"
       .. " (docs/gateway.md's walk-through)", function()
      local p = env:paid_payment{ amount = 60 }
      local r = S.expect(env:refund(p.id, 60), 201, "refund 60")
      local doc, res = env.sim:control("POST", "/sim/refunds/"
                                       .. r.out_refund_no .. "/settle?wait=5")
      assert.equal("SUCCESS", doc.status)
      assert.equal("204", res.headers["x-sim-notified"])
      -- no wait here: the gateway answered the notification after commit
      local got = env:api("GET", "/v1/refunds/" .. r.id)
      assert.equal(200, got.status, got.body)
      assert.equal("succeeded", got.json.state)
      -- a bad wait is refused before anything is settled
      local p2 = env:paid_payment{ amount = 60 }
      local r2 = S.expect(env:refund(p2.id, 60), 201, "refund 60")
      env.sim:control("POST", "/sim/refunds/" .. r2.out_refund_no
                      .. "/settle?wait=0", nil, 400)
      assert.equal("processing", env:api("GET", "/v1/refunds/" .. r2.id)
                                   .json.state)
    end)

    it("partial, several, then over the limit (422 refund_exceeds_paid)",
       function()
      local p = env:paid_payment{ amount = 100 }
      local r1 = S.expect(env:refund(p.id, 30), 201, "refund 30")
      local r2 = S.expect(env:refund(p.id, 50), 201, "refund 50")
      assert.are_not.equal(r1.out_refund_no, r2.out_refund_no)
      local over = env:refund(p.id, 21)
      assert.equal(422, over.status, over.body)
      assert.equal("refund_exceeds_paid", over.json.error)
      local list = S.expect(env:api("GET", "/v1/payments/" .. p.id
                                    .. "/refunds"), 200, "list")
      assert.equal(2, #list.refunds)
      local got = S.expect(env:api("GET", "/v1/refunds/" .. r2.id), 200,
                           "get refund")
      assert.equal(50, got.amount)
      env.sim:settle(r1.out_refund_no)
      env:wait_refund(r1.id, "succeeded")
      assert.equal(30, env:wait_state(p.id, "partially_refunded").refunded)
      -- the last 20 fen: allowed; then nothing is left
      local r3 = S.expect(env:refund(p.id, 20), 201, "refund 20")
      env.sim:settle(r2.out_refund_no)
      env.sim:settle(r3.out_refund_no)
      env:wait_refund(r3.id, "succeeded")
      local done = env:wait_state(p.id, "refunded")
      assert.equal(100, done.refunded)
      assert.equal(3, #done.refunds)
      -- refunded: no refund from that state at all (409, not 422)
      assert.equal(409, env:refund(p.id, 1).status)
    end)

    it("?refresh=1 on a refund asks WeChat about it, as the payment's"
       .. " does; another value is 400", function()
      -- was: taken and ignored, the refund answered from local state
      -- (processing, after WeChat had settled it and its notification
      -- was lost) with no word that nothing was asked
      local p = env:paid_payment{ amount = 70 }
      local r1 = S.expect(env:refund(p.id, 30), 201, "refund 30")
      local r2 = S.expect(env:refund(p.id, 20), 201, "refund 20")
      env.sim:fault{ endpoint = "notify", kind = "never_sent", count = 2 }
      env.sim:settle(r1.out_refund_no)
      env.sim:settle(r2.out_refund_no)
      local r = env:api("GET", "/v1/refunds/" .. r1.id)
      assert.equal("processing", r.json.state, r.body)
      r = env:api("GET", "/v1/refunds/" .. r1.id .. "?refresh=1")
      assert.equal(200, r.status, r.body)
      assert.equal("succeeded", r.json.state, r.body)
      assert.is_nil(r.json.stale)
      -- the other is left to its own ask: the payment's list asks
      assert.equal("processing",
                   env:api("GET", "/v1/refunds/" .. r2.id).json.state)
      r = env:api("GET", "/v1/payments/" .. p.id .. "/refunds?refresh=1")
      assert.equal(200, r.status, r.body)
      assert.equal(2, #r.json.refunds)
      for _, x in ipairs(r.json.refunds) do
        assert.equal("succeeded", x.state, r.body)
      end
      assert.equal(50, env:get(p.id).refunded)
      for _, q in ipairs{ "?refresh=yes", "?refresh=0",
                          "?refresh=1&refresh=1" } do
        for _, path in ipairs{ "/v1/refunds/" .. r1.id,
                               "/v1/payments/" .. p.id .. "/refunds" } do
          r = env:api("GET", path .. q)
          assert.equal(400, r.status, path .. q .. " " .. r.body)
          assert.truthy(r.json.fields.refresh, r.body)
        end
      end
    end)

    it("?refresh=1 on a refund with WeChat failing: the local state,"
       .. " stale", function()
      local p = env:paid_payment{ amount = 10 }
      local r1 = S.expect(env:refund(p.id, 10), 201, "refund 10")
      env.sim:fault{ endpoint = "refund_query", kind = "error",
                     status = 500 }
      local mark = #env.gw:logs()
      local r = env:api("GET", "/v1/refunds/" .. r1.id .. "?refresh=1")
      assert.equal(200, r.status, r.body)
      assert.equal("processing", r.json.state)
      assert.is_true(r.json.stale, r.body)
      env.sim:clear_faults()
      -- the log says why, not only the kind (as the payment's refresh)
      local line
      for l in env.gw:logs():sub(mark + 1):gmatch("[^\n]+") do
        if l:find("refund refresh failed", 1, true)
           and l:find(r1.id, 1, true) then
          line = l
        end
      end
      assert.truthy(line, "no refund refresh failed line")
      assert.matches('"reason":"[^"]+', line)
    end)

    it("the payment says what is left to refund (refundable): refunds"
       .. " under way and abnormal ones count, a closed one does not",
       function()
      -- was: only `refunded` (the fen of refunds that succeeded), so a
      -- payment with a refund processing and one abnormal read "30
      -- refunded" of 100 while 40 were left, and the 422 was the first
      -- place an agent learnt it
      local p = env:paid_payment{ amount = 100 }
      assert.equal(100, env:get(p.id).refundable)
      local r1 = S.expect(env:refund(p.id, 30), 201, "refund 30")
      local r2 = S.expect(env:refund(p.id, 30), 201, "refund 30")
      local r3 = S.expect(env:refund(p.id, 40), 201, "refund 40")
      assert.equal(0, env:get(p.id).refundable)
      env.sim:settle(r1.out_refund_no)
      env.sim:settle(r2.out_refund_no, "ABNORMAL")
      env.sim:settle(r3.out_refund_no, "CLOSED")
      env:wait_refund(r3.id, "closed")
      env:wait_refund(r2.id, "abnormal")
      local now = env:wait_state(p.id, "partially_refunded")
      assert.equal(30, now.refunded)
      assert.equal(40, now.refundable)
      local over = env:refund(p.id, 41)
      assert.equal(422, over.status, over.body)
      assert.equal(now.refundable, over.json.refundable)
      -- nothing to refund before the payment is paid
      assert.equal(0, env:get(env:create().payment.id).refundable)
    end)

    it("a closed refund gives its amount back", function()
      local p = env:paid_payment{ amount = 60 }
      local r1 = S.expect(env:refund(p.id, 60), 201, "refund 60")
      assert.equal(422, env:refund(p.id, 1).status)
      env.sim:settle(r1.out_refund_no, "CLOSED")
      env:wait_refund(r1.id, "closed")
      S.expect(env:refund(p.id, 60), 201, "refund again")
    end)

    it("refused before payment and after close (409); bad amounts 400",
       function()
      local b = env:create()
      local res = env:refund(b.payment.id, 10)
      assert.equal(409, res.status, res.body)
      env:api("POST", "/v1/payments/" .. b.payment.id .. "/close")
      assert.equal(409, env:refund(b.payment.id, 10).status)
      local p = env:paid_payment()
      assert.equal(400, env:refund(p.id, 0).status)
      assert.equal(400, env:refund(p.id, -5).status)
      assert.equal(400, env:refund(p.id, "ten").status)
      assert.equal(404, env:refund("pay_nope", 1).status)
      assert.equal(404, env:api("GET", "/v1/refunds/ref_nope").status)
    end)
  end)

  describe("transitions as the API sees them", function()
    it("a payment walks paying -> paid -> partially_refunded -> refunded, "
       .. "versions rising", function()
      local b = env:create{ amount = 10 }
      local v = b.payment.version
      env.sim:pay_and_wait(b.payment.out_trade_no)
      local p = env:wait_state(b.payment.id, "paid")
      assert.truthy(p.version > v)
      v = p.version
      local r = S.expect(env:refund(p.id, 4), 201, "refund")
      env.sim:settle(r.out_refund_no)
      p = env:wait_state(p.id, "partially_refunded")
      assert.truthy(p.version > v)
      v = p.version
      r = S.expect(env:refund(p.id, 6), 201, "refund")
      env.sim:settle(r.out_refund_no)
      p = env:wait_state(p.id, "refunded")
      assert.truthy(p.version > v)
      -- refunded -> anything: refused
      assert.equal(409, env:api("POST", "/v1/payments/" .. p.id
                                .. "/close").status)
      assert.equal(409, env:api("POST", "/v1/payments/" .. p.id
                                .. "/attempts", { channel = "h5",
                                  client_ip = "203.0.113.7" }).status)
      assert.equal("refunded", env:get(p.id, true).state)
    end)

    it("closed refuses attempts and refunds; failed refuses refunds",
       function()
      local b = env:create()
      env:api("POST", "/v1/payments/" .. b.payment.id .. "/close")
      assert.equal(409, env:api("POST", "/v1/payments/" .. b.payment.id
                                .. "/attempts", { channel = "native" }).status)
      local f = env:create()
      env.sim:fail(f.payment.out_trade_no)
      assert.equal("failed", env:get(f.payment.id, true).state)
      assert.equal(409, env:refund(f.payment.id, 1).status)
    end)
  end)

  it("serves /openapi.json without a key", function()
    local res = env:api("GET", "/openapi.json", nil, { sign = false })
    assert.equal(200, res.status)
    assert.matches("^3%.0", res.json.openapi)
    assert.matches("^application/json", res.headers["content-type"])
    assert.equal(read("examples/gateway/openapi.json"), res.body)
  end)
end)

-- WeChat not answering at all: the gateway answers 504 once its WeChat Pay
-- client's deadline is over. The kit's merchant config says 15 s
-- (sim:client_config), which these two cases waited out in full (30 s
-- of the file's 60); this env's merchant has 5 s, still many times a
-- loopback call's time under ASan on a loaded machine.
describe("gateway merchant API, WeChat not answering", function()
  local env

  setup(function() env = S.start{ merchant = { deadline = 5 } } end)
  teardown(S.stop)
  after_each(function() env.sim:clear_faults() end)

  it("WeChat not answering the prepay: 504, the payment unknown; the "
     .. "retry with the same key opens it", function()
    -- every attempt held at WeChat until the spec lets them go, not a
    -- latency the simulator would still sleep out at the teardown
    env.sim:hold("prepay", { count = 20, seconds = 120 })
    local b = { order_id = S.order_id(), channel = "native", amount = 100,
                description = "e2e order" }
    local res = env:api("POST", "/v1/payments", b, { key = "slow-create",
                                                     timeout = 40 })
    assert.equal(504, res.status, res.body)
    assert.equal("timeout", res.json.error)
    env.sim:clear_faults()
    -- the payment is stored, its outcome unknown (gw_payments)
    local rows = assert(env.db:query("SELECT id, state FROM gw_payments"
      .. " WHERE order_id = $1", { b.order_id }))
    assert.equal(1, #rows)
    local state_after_timeout = rows[1].state
    local id = rows[1].id
    -- the caller's retry (same key: the 504 was not kept) opens it
    res = env:api("POST", "/v1/payments", b, { key = "slow-create" })
    assert.equal(201, res.status, res.body)
    assert.equal(id, res.json.payment.id)
    assert.matches("^weixin://", res.json.pay.code_url)
    local p = env:get(id)
    local open = 0
    for _, a in ipairs(p.attempts) do
      if a.state == "open" then open = open + 1 end
    end
    assert.equal(1, open)
    env.sim:pay_and_wait(p.out_trade_no)
    env:wait_state(id, "paid")
    -- checked last, so the retry above runs whatever this says: the
    -- state for a timeout after sending is unknown
    -- (docs/gateway.md: a prepay that may have reached WeChat)
    assert.equal("unknown", state_after_timeout)
  end)

  it("WeChat not answering a refund: 504, the refund unknown, kept for "
     .. "the key; a refresh finds it", function()
    local p = env:paid_payment{ amount = 90 }
    -- every attempt (the gateway tries again until its deadline) held
    -- at WeChat until released below, not a fixed latency waited out
    -- in full: was latency 30 s, this case then took 30 s (then the
    -- default deadline's 15 s)
    local hold = env.sim:hold("refund", { count = 20, seconds = 120 })
    local res = env:api("POST", "/v1/payments/" .. p.id .. "/refunds",
                        { amount = 40 }, { key = "slow-refund",
                                           timeout = 40 })
    assert.equal(504, res.status, res.body)
    assert.equal("timeout", res.json.error)
    -- the refund exists: the same key replays, never a second refund
    local again = env:api("POST", "/v1/payments/" .. p.id .. "/refunds",
                          { amount = 40 }, { key = "slow-refund" })
    assert.equal(504, again.status)
    assert.equal(res.body, again.body)
    local now = env:get(p.id)
    assert.equal(1, #now.refunds)
    assert.equal("unknown", now.refunds[1].state)
    -- it counts against what is left
    assert.equal(422, env:refund(p.id, 51).status)
    -- WeChat makes it anyway (the hold, released, lets the requests go
    -- on and does the work): a refresh learns so once it exists
    hold:release()
    local rid = now.refunds[1].id
    S.wait_until(function()
      env:get(p.id, true)
      local r = env:api("GET", "/v1/refunds/" .. rid).json
      return r.state == "processing"
    end, 40, "the refund found processing")
    env.sim:settle(now.refunds[1].out_refund_no)
    env:wait_refund(rid, "succeeded")
    assert.equal(40, env:wait_state(p.id, "partially_refunded").refunded)
  end)
end)

describe("gateway merchant API, a merchant paying under two appids",
         function()
  -- an official account's appid (JSAPI) and an App's, under one mchid:
  -- config.merchants[1] gives the first as appid, the second in appids
  -- (sim:client_config). Was: any appid but the default was refused
  -- (400 "must be the merchant's appid (...) or omitted"), so such a
  -- merchant needed one gateway merchant per appid, which one mchid
  -- cannot be.
  local A, B = "wx1111111111111111", "wx2222222222222222"
  local env

  setup(function() env = S.start{ appids = { A, B } } end)
  teardown(S.stop)

  -- the appid the order was placed under at WeChat
  local function wechat_appid(no)
    local wx = env.sim:client()
    local t = assert(wx:query_by_out_trade_no(no))
    wx:stop()
    return t.appid
  end

  it("creates, and pays, a JSAPI payment under the second appid: its"
     .. " pay-sign parameters carry it", function()
    local b = env:create{ channel = "jsapi", appid = B,
                          payer = { openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" } }
    local p = b.pay
    assert.equal(B, p.appId)
    local pub = assert(crypto.public_key(read(env.m.public_key)))
    assert.is_true(crypto.verify_base64(pub, p.appId .. "\n" .. p.timeStamp
      .. "\n" .. p.nonceStr .. "\n" .. p.package .. "\n", p.paySign,
      "sha256-rsa"))
    assert.equal(B, wechat_appid(b.payment.out_trade_no))
    local rows = assert(env.db:query("SELECT appid FROM gw_payments WHERE"
      .. " id = $1", { b.payment.id }))
    assert.equal(B, rows[1].appid)
    -- the payment shows it: in the create's answer and in GET (a
    -- merchant of several appids sees which one a payment is under)
    assert.equal(B, b.payment.appid)
    assert.equal(B, env:get(b.payment.id).appid)
    -- the notification applied
    env.sim:pay_and_wait(b.payment.out_trade_no)
    assert.equal("paid", env:wait_state(b.payment.id, "paid").state)
  end)

  it("an App payment under the second appid, and a new attempt of it,"
     .. " carry it; one naming none takes the default", function()
    local b = env:create{ channel = "app", appid = B }
    assert.equal(B, b.pay.appid)
    assert.equal(env.m.mchid, b.pay.partnerid)
    -- a new attempt (another channel) stays under the payment's appid
    local res = env:api("POST", "/v1/payments/" .. b.payment.id
                        .. "/attempts", { channel = "native" })
    assert.equal(201, res.status, res.body)
    local no = res.json.payment.out_trade_no
    assert.not_equal(b.payment.out_trade_no, no)
    assert.equal(B, wechat_appid(no))
    res = env:api("POST", "/v1/payments/" .. b.payment.id .. "/attempts",
                  { channel = "app" })
    assert.equal(201, res.status, res.body)
    assert.equal(B, res.json.pay.appid)
    -- none named: the merchant's appid
    local d = env:create{ channel = "app" }
    assert.equal(A, d.pay.appid)
    assert.equal(A, d.payment.appid)
    assert.equal(A, wechat_appid(d.payment.out_trade_no))
  end)

  it("refuses an appid the merchant does not list, saying how to allow"
     .. " it, and stores nothing", function()
    local oid = S.order_id()
    local res = env:api("POST", "/v1/payments", { order_id = oid,
      channel = "native", amount = 1, description = "x",
      appid = "wx3333333333333333" })
    assert.equal(400, res.status, res.body)
    assert.equal("invalid_request", res.json.error)
    assert.equal("must be one of the merchant's appids (" .. A .. ", " .. B
      .. ") or omitted; to pay under another, add it to"
      .. " config.merchants[1].appids", res.json.fields.appid)
    assert.equal(0, #assert(env.db:query("SELECT id FROM gw_payments WHERE"
      .. " order_id = $1", { oid })))
  end)
end)

describe("gateway merchant API, an appid taken out of the config",
         function()
  -- A payment made under the merchant's second appid, then that appid
  -- removed from config.merchants[1].appids and the gateway reloaded: a
  -- new attempt of the payment (made under its own appid) cannot be
  -- placed. Was: the current attempt closed at WeChat, the switch
  -- recorded, then the prepay refused by the merchant's WeChat Pay client
  -- ("invalid_params appid: must be the client's appid ... or omitted"),
  -- answered 502 wechat_error: the payer's code closed for nothing, and
  -- no word on what to do.
  local A, B = "wx1111111111111111", "wx2222222222222222"
  local env

  setup(function() env = S.start{ appids = { A, B } } end)
  teardown(S.stop)

  local function reload_with(edit) S.reload_with(env, edit) end

  local function trade_state(no)
    local wx = env.sim:client()
    local t = assert(wx:query_by_out_trade_no(no))
    wx:stop()
    return t.trade_state
  end

  it("refuses a new attempt with 409 appid_not_configured, touching"
     .. " nothing; the payments under the appid still listed go on",
     function()
    local b = env:create{ appid = B }
    local other = env:create{}                 -- under A, the default
    reload_with("c.merchants[1].appids = nil")
    local path = "/v1/payments/" .. b.payment.id .. "/attempts"
    local key = "k-" .. S.order_id()
    local res = env:api("POST", path, { channel = "native" }, { key = key })
    assert.equal(409, res.status, res.body)
    assert.equal("appid_not_configured", res.json.error)
    assert.equal(B, res.json.appid)
    assert.equal("payment " .. b.payment.id .. " is under appid " .. B
      .. ", which merchant " .. env.m.mchid .. " no longer lists: every"
      .. " attempt of a payment is made under its appid. List " .. B
      .. " in config.merchants[1].appids (and reload), or create a new"
      .. " payment under a new order_id; the current attempt stays as it"
      .. " is", res.json.message)
    assert.equal(b.payment.id, res.json.payment.id)
    -- nothing changed: the attempt is the payment's, open here and at
    -- WeChat (the payer's code still pays it)
    local p = env:get(b.payment.id)
    assert.equal(1, p.attempt)
    assert.equal("paying", p.state)
    assert.equal(1, #p.attempts)
    assert.equal("open", p.attempts[1].state)
    assert.equal("NOTPAY", trade_state(b.payment.out_trade_no))
    -- a payment under the appid still configured switches as before
    res = env:api("POST", "/v1/payments/" .. other.payment.id
                  .. "/attempts", { channel = "native" })
    assert.equal(201, res.status, res.body)
    assert.equal(A, res.json.payment.appid)
    -- not kept for the Idempotency-Key: the appid listed again, the same
    -- request with the same key runs
    reload_with("")
    res = env:api("POST", path, { channel = "native" }, { key = key })
    assert.equal(201, res.status, res.body)
    assert.is_nil(res.headers["idempotent-replayed"])
    assert.equal(B, res.json.payment.appid)
    assert.equal("CLOSED", trade_state(b.payment.out_trade_no))
  end)
end)

describe("gateway merchant API, a merchant taken out of the config",
         function()
  -- Payments of a second merchant, then that merchant removed from
  -- config.merchants and the gateway reloaded. Was: a switch or a close
  -- raised on the missing WeChat Pay client (500, the switch's mark left
  -- on the attempt), a refund likewise, ?refresh=1 too; and each payment
  -- check failed, logged and counted as an error every time it was due.
  local env

  setup(function()
    env = S.start{ merchants = 2, workers = 1, gateway = { reconcile = {
      check_after = 1, first = 1, interval = 0.2, bill = false } } }
  end)
  teardown(S.stop)

  it("reads its payments from local state, refuses what needs WeChat with"
     .. " 409 merchant_not_configured touching nothing, and the checks skip"
     .. " them with one warning", function()
    local m2 = env.m2.mchid
    local open = env:create{ mchid = m2 }.payment
    local paid = env:paid_payment{ mchid = m2 }
    -- the mark before the reload: the checks run every 0.2 s and may skip
    -- (and warn) before the reload's wait returns
    local mark = #env.gw:logs()
    S.reload_with(env, "table.remove(c.merchants, 2)")
    local restored = false
    finally(function() if not restored then S.reload_with(env, "") end end)
    -- the reload says what was left open under it (was: not a word)
    S.wait_until(function()
      return env.gw:logs():sub(mark + 1):find("merchant " .. m2 .. " is no"
        .. " longer in config.merchants but has 1 open payments and 0"
        .. " refunds under way", 1, true)
    end, 10, "the warning naming the merchant's open payments")
    -- its refusals' series at 0 before the first (was: it appeared at 1,
    -- and rate() saw nothing of it)
    local refused_series = 'paygate_gateway_notifications_refused_total{'
      .. 'merchant="' .. m2 .. '",kind="merchant_not_configured"} '
    assert.truthy(env.gw:admin_get("/metrics").body:find("\n"
      .. refused_series .. "0\n", 1, true), refused_series .. "0")
    -- reads: local state, a refresh marked stale
    assert.equal("paying", env:get(open.id).state)
    local r = env:get(open.id, true)
    assert.equal("paying", r.state)
    assert.is_true(r.stale)
    assert.equal("paid", env:get(paid.id).state)
    local res = env:api("GET", "/v1/payments/" .. paid.id .. "/refunds")
    assert.equal(200, res.status, res.body)
    -- calls that need WeChat: 409 naming the merchant and the config key
    local function refused(path, body, key)
      local rr = env:api("POST", path, body, { key = key })
      assert.equal(409, rr.status, rr.body)
      assert.equal("merchant_not_configured", rr.json.error)
      assert.equal(m2, rr.json.mchid)
      assert.matches("merchant " .. m2 .. ", which is no longer in"
        .. " config.merchants", rr.json.message, 1, true)
      return rr
    end
    local key = "k-" .. S.order_id()
    local apath = "/v1/payments/" .. open.id .. "/attempts"
    refused(apath, { channel = "native" }, key)
    refused("/v1/payments/" .. open.id .. "/close", {})
    refused("/v1/payments/" .. paid.id .. "/refunds", { amount = 10 })
    -- nothing touched: the attempt open and unmarked, here and at WeChat
    local rows = assert(env.db:query("SELECT state FROM gw_attempts WHERE"
      .. " payment_id = $1 AND close_check_at IS NULL", { open.id }))
    assert.equal(1, #rows)
    assert.equal("open", rows[1].state)
    assert.equal("paying", env:get(open.id).state)
    assert.equal(0, #assert(env.db:query("SELECT id FROM gw_refunds WHERE"
      .. " payment_id = $1", { paid.id })))
    local wx = env.sim:client(env.m2)
    assert.equal("NOTPAY", assert(wx:query_by_out_trade_no(
      open.out_trade_no)).trade_state)
    wx:stop()
    -- WeChat's notification for it: 404 FAIL (docs/gateway.md)
    res = env:post_paid(open, m2)
    assert.equal(404, res.status, res.body)
    assert.equal("FAIL", res.json.code)
    -- said and counted: money may have been taken (was: only the access
    -- line)
    local nlogs = env.gw:logs():sub(mark + 1)
    assert.truthy(nlogs:find('"kind":"merchant_not_configured"', 1, true)
                  and nlogs:find("gateway: notification refused", 1, true),
                  nlogs)
    local mm = assert(env.gw:admin_get("/metrics"))
    assert.truthy(mm.body:find("\n" .. refused_series .. "1\n", 1, true),
                  mm.body)
    -- the checks: skipped, on their backoff, one warning for the merchant
    S.wait_until(function()
      local c = assert(env.db:query("SELECT checks FROM gw_payments WHERE"
                                    .. " id = $1", { open.id }))
      return tonumber(c[1].checks) >= 3
    end, 30, "the open payment's checks skipped three times")
    local logs = env.gw:logs():sub(mark + 1)
    local _, warned = logs:gsub("reconcile skips the payments and refunds"
                                .. " of a merchant no longer configured", "")
    assert.equal(1, warned, logs)
    assert.is_nil(logs:find("check failed", 1, true), logs)
    local m = assert(env.gw:admin_get("/metrics"))
    assert.matches('paygate_gateway_merchant_not_configured_total{merchant="'
      .. m2 .. '"} %d+', m.body)
    -- not kept for the Idempotency-Key: the merchant configured again, the
    -- same request under the same key runs
    S.reload_with(env, "")
    restored = true
    res = env:api("POST", apath, { channel = "native" }, { key = key })
    assert.equal(201, res.status, res.body)
    assert.is_nil(res.headers["idempotent-replayed"])
  end)

  it("drops a switch's mark left by a request that died, the merchant not"
     .. " configured", function()
    -- was: skipped like the merchant's other rows, the mark pushed on its
    -- backoff for as long as the merchant was out of the config
    local m2 = env.m2.mchid
    local p = env:create{ mchid = m2 }.payment
    S.reload_with(env, "table.remove(c.merchants, 2)")
    finally(function() S.reload_with(env, "") end)
    -- the mark a switch sets before its close at WeChat, its request gone
    -- (due: its time is past; set once the merchant is out, or the checks
    -- of the merchant configured drop it first)
    assert(env.db:exec("UPDATE gw_attempts SET close_check_at = $2 WHERE"
      .. " out_trade_no = $1", { p.out_trade_no, os.time() - 1 }))
    S.wait_until(function()
      return #assert(env.db:query("SELECT n FROM gw_attempts WHERE"
        .. " out_trade_no = $1 AND state = 'open' AND close_check_at IS"
        .. " NULL", { p.out_trade_no })) == 1
    end, 30, "the mark dropped, the attempt still open")
    -- the payment still on it; its own checks wait for the merchant
    local got = env:get(p.id)
    assert.equal("paying", got.state)
    assert.equal(p.out_trade_no, got.out_trade_no)
  end)
end)
