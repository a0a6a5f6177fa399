-- The simulator's notifications, received by a recording app and checked
-- with paygate.crypto primitives only: signature and encryption per the
-- protocol, WeChat's retry schedule (time-scaled) to give-up, what counts
-- as delivered, one deliverer across workers, a restart mid-schedule, and
-- every notification fault.
local paygate = require "paygate"
local crypto = require "paygate.crypto"
local sn = require "support.simnotify"

local SCHEDULE = { 15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600,
                   10800, 10800, 10800, 21600, 21600 }

local recv, seq = nil, 0

local function box()
  seq = seq + 1
  return "b" .. seq .. "x" .. crypto.random_nonce(6)
end

local function order_no()
  return "SPEC" .. crypto.random_nonce(16)
end

-- waits until the receiver's box holds n POSTs; returns them
local function got(b, n, secs, what)
  local list
  sn.wait_until(function()
    list = sn.received(recv, b)
    return #list >= n
  end, secs or 20, what or (n .. " POSTs in " .. b))
  return list
end

local function one(sim, qs)
  local l = sn.notifications(sim, qs)
  assert.equal(1, #l)
  return l[1]
end

-- waits until the simulator lists the notification of out_trade_no in a
-- state that is not pending / held
local function settled(sim, no, secs)
  local n
  sn.wait_until(function()
    local l = sn.notifications(sim, "out_trade_no=" .. no)
    n = l[1]
    return n and n.state ~= "pending" and n.state ~= "held"
  end, secs or 20, "the notification of " .. no .. " to settle")
  return n
end

setup(function()
  recv = sn.receiver()
end)

teardown(function()
  if recv then recv:stop() end
end)

describe("simulator notifications (one worker, time_scale 21660)", function()
  local sim, certs
  setup(function()
    -- 24 h 4 min of schedule in about 4 s
    sim = sn.start{ time_scale = 21660, answer_timeout = 0.5 }
    certs = sn.platform_certs(sim)
  end)
  teardown(function() if sim then sim:stop() end end)

  it("a payment: signed, encrypted with the APIv3 key, delivered on 204",
     function()
    local b, no = box(), order_no()
    sn.prepay(sim, no, sn.notify_url(recv, b), 88)
    sn.pay(sim, no)
    local list = got(b, 1)
    local rec = list[1]
    assert.truthy(sn.verify(certs, rec))
    assert.equal("application/json", rec.headers["content-type"]:match(
                 "^[^;]+"))
    -- a Request-ID of the form every answer carries (sim.api's)
    assert.matches("^" .. ("[0-9A-F]"):rep(42) .. "%-0$",
                   rec.headers["request-id"] or "")
    local doc, res = sn.decrypt(rec)
    assert.equal("TRANSACTION.SUCCESS", doc.event_type)
    assert.equal("encrypt-resource", doc.resource_type)
    assert.equal("transaction", doc.resource.original_type)
    assert.equal("transaction", doc.resource.associated_data)
    assert.equal("AEAD_AES_256_GCM", doc.resource.algorithm)
    assert.equal(12, #doc.resource.nonce)
    assert.truthy(doc.create_time:match(
      "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%+08:00$"))
    assert.equal(no, res.out_trade_no)
    assert.equal("SUCCESS", res.trade_state)
    assert.equal(88, res.amount.total)
    assert.equal(sn.MCHID, res.mchid)
    local n = settled(sim, no)
    assert.equal("delivered", n.state)
    assert.equal(doc.id, n.id)
    assert.equal(1, #n.attempts)
    assert.equal(204, n.attempts[1].status)
    assert.truthy(n.attempts[1].latency >= 0)
  end)

  it("GET /sim/notifications shows the resource as it was sent: an empty "
     .. "promotion_detail is [], not {}", function()
    local b, no = box(), order_no()
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    local _, plain = sn.decrypt(got(b, 1)[1])
    assert.is_table(plain.promotion_detail)
    local res = assert(paygate.http.request{ url = sim.base
      .. "/sim/notifications?out_trade_no=" .. no, timeout = 10 })
    assert.equal(200, res.status)
    assert.truthy(res.body:find('"promotion_detail":[]', 1, true), res.body)
    assert.falsy(res.body:find('"promotion_detail":{}', 1, true), res.body)
  end)

  it("no notification for a failed payment", function()
    local b, no = box(), order_no()
    sn.prepay(sim, no, sn.notify_url(recv, b))
    local st = sn.ctl(sim, "POST", "/sim/transactions/" .. no .. "/fail", {})
    assert.equal(200, st)
    -- a paid order after it: its notification arrives, the failed one's
    -- never was made
    local no2 = order_no()
    sn.prepay(sim, no2, sn.notify_url(recv, b))
    sn.pay(sim, no2)
    local list = got(b, 1)
    local _, res = sn.decrypt(list[1])
    assert.equal(no2, res.out_trade_no)
    assert.equal(0, #sn.notifications(sim, "out_trade_no=" .. no))
  end)

  it("refunds: REFUND.SUCCESS, ABNORMAL and CLOSED, AAD refund", function()
    local b, no = box(), order_no()
    sn.prepay(sim, no, sn.notify_url(recv, b), 300)
    sn.pay(sim, no)
    got(b, 1)
    local want = {}
    for i, status in ipairs({ "SUCCESS", "ABNORMAL", "CLOSED" }) do
      local rno = "R" .. no:sub(1, 20) .. i
      sn.refund(sim, no, rno, 100, 300, sn.notify_url(recv, b))
      sn.settle(sim, rno, status)
      want[rno] = status
    end
    local list = got(b, 4)
    local seen = {}
    for i = 2, 4 do
      assert.truthy(sn.verify(certs, list[i]))
      local doc, res = sn.decrypt(list[i])
      assert.equal("refund", doc.resource.associated_data)
      assert.equal("refund", doc.resource.original_type)
      assert.equal("REFUND." .. want[res.out_refund_no], doc.event_type)
      assert.equal(want[res.out_refund_no], res.refund_status)
      assert.equal(100, res.amount.refund)
      seen[res.out_refund_no] = true
    end
    for rno in pairs(want) do assert.truthy(seen[rno]) end
  end)

  it("a refund asked without a notify_url goes to the merchant's"
     .. " refund_notify_url; one with its own, to that", function()
    local b, own = box(), box()
    local sim2 = sn.start{ time_scale = 21660, answer_timeout = 0.5,
      merchant_extra = ("refund_notify_url = %q"):format(
        sn.notify_url(recv, b)) }
    local ok, err = pcall(function()
      local no = order_no()
      sn.prepay(sim2, no, sn.notify_url(recv, own), 300)
      sn.pay(sim2, no)
      got(own, 1)                              -- the payment's
      sn.refund(sim2, no, "R1" .. no:sub(1, 20), 100, 300)
      sn.settle(sim2, "R1" .. no:sub(1, 20), "SUCCESS")
      sn.refund(sim2, no, "R2" .. no:sub(1, 20), 100, 300,
                sn.notify_url(recv, own))
      sn.settle(sim2, "R2" .. no:sub(1, 20), "SUCCESS")
      local _, res = sn.decrypt(got(b, 1)[1])
      assert.equal("R1" .. no:sub(1, 20), res.out_refund_no)
      local list = got(own, 2)
      _, res = sn.decrypt(list[2])
      assert.equal("R2" .. no:sub(1, 20), res.out_refund_no)
      assert.equal(1, #sn.received(recv, b))
    end)
    sim2:stop()
    assert(ok, err)
  end)

  it("a merchant's refund_notify_url must be a notification URL",
     function()
    local ok, err = pcall(sn.start, { merchant_extra =
      'refund_notify_url = "http://example.com/n"' })
    assert.is_false(ok)
    assert.matches("merchants%[1%]%.refund_notify_url: must be an https"
                   .. " URL", tostring(err))
  end)

  it("200 and 204 count as delivered; 201 and 500 are retried with the "
     .. "same id, a fresh nonce, timestamp and signature", function()
    local b, no = box(), order_no()
    sn.answer(recv, b, { statuses = { 201, 500 }, status = 200 })
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    local list = got(b, 3)
    local n = settled(sim, no)
    assert.equal("delivered", n.state)
    assert.equal(3, #n.attempts)
    assert.same({ 201, 500, 200 }, { n.attempts[1].status,
                 n.attempts[2].status, n.attempts[3].status })
    local ids, nonces, sigs = {}, {}, {}
    for _, rec in ipairs(list) do
      assert.truthy(sn.verify(certs, rec))
      ids[sn.decrypt(rec).id] = true
      nonces[rec.headers["wechatpay-nonce"]] = true
      sigs[rec.headers["wechatpay-signature"]] = true
      assert.equal(list[1].body, rec.body)
    end
    local function count(t)
      local c = 0
      for _ in pairs(t) do c = c + 1 end
      return c
    end
    assert.equal(1, count(ids))
    assert.equal(3, count(nonces))
    assert.equal(3, count(sigs))
  end)

  it("a 200 with a large body (a framework's HTML page) counts as "
     .. "delivered: the status decides, not the body", function()
    local b, no = box(), order_no()
    sn.answer(recv, b, { status = 200, body_bytes = 256 * 1024 })
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    got(b, 1)
    local n = settled(sim, no)
    assert.equal("delivered", n.state)
    assert.equal(1, #n.attempts)
    assert.equal(200, n.attempts[1].status)
    assert.is_nil(n.attempts[1].error)
  end)

  it("the schedule: 15 retries after the first delivery, spaced as WeChat "
     .. "spaces them (scaled), then gives up", function()
    local b, no = box(), order_no()
    sn.answer(recv, b, { status = 500 })
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    local n = settled(sim, no, 60)
    assert.equal("failed", n.state)
    assert.equal(16, #n.attempts)
    local list = got(b, 16)
    assert.equal(16, #list)
    for k = 1, 15 do
      local a, z = n.attempts[k], n.attempts[k + 1]
      assert.equal(500, a.status)
      -- the next attempt starts no earlier than the interval after the
      -- answer (latency) of this one
      local gap = z.at - a.at
      assert.truthy(gap >= SCHEDULE[k] / 21660 - 0.001,
                    "gap " .. k .. " " .. gap)
    end
    -- the long intervals dominate: hours scaled to a fraction of a second
    local last = n.attempts[16].at - n.attempts[11].at
    assert.truthy(last >= (10800 * 3 + 21600 * 2) / 21660 - 0.01)
  end)

  it("an answer slower than answer_timeout is a failed attempt, retried",
     function()
    local b, no = box(), order_no()
    sn.answer(recv, b, { delay = 1.5 })
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    got(b, 1)
    sn.answer(recv, b, { status = 204 })
    local n = settled(sim, no)
    assert.equal("delivered", n.state)
    assert.truthy(#n.attempts >= 2)
    assert.is_nil(n.attempts[1].status)
    assert.truthy(n.attempts[1].error:match("timeout"))
    -- the full answer_timeout (0.5 s): time_scale shrinks the retry
    -- schedule, not the time a receiver has to answer
    assert.truthy(n.attempts[1].latency >= 0.45,
                  "gave up after " .. n.attempts[1].latency .. " s")
    assert.truthy(n.attempts[1].latency < 1.4)
    assert.equal(204, n.attempts[#n.attempts].status)
  end)

  describe("faults", function()
    after_each(function() sn.ctl(sim, "DELETE", "/sim/faults") end)

    local function fault(t)
      local st, doc = sn.ctl(sim, "POST", "/sim/faults", t)
      assert.equal(200, st, require("cjson").encode(doc))
    end

    it("never_sent: kept as dropped, never POSTed", function()
      fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      local b, no, no2 = box(), order_no(), order_no()
      sn.prepay(sim, no, sn.notify_url(recv, b))
      sn.pay(sim, no)
      sn.prepay(sim, no2, sn.notify_url(recv, b))
      sn.pay(sim, no2)
      local list = got(b, 1)
      assert.equal(no2, select(2, sn.decrypt(list[1])).out_trade_no)
      settled(sim, no2)
      local n = one(sim, "out_trade_no=" .. no)
      assert.equal("dropped", n.state)
      assert.equal(0, #n.attempts)
      assert.same({ "never_sent" }, n.faults)
      assert.equal(1, #sn.received(recv, b))
    end)

    it("?wait=nan is refused like a wait out of range, nothing paid",
       function()
      -- was: "nan" passed the range check (every comparison with NaN is
      -- false), the order was paid and the wait for a notification the
      -- fault never sends had no end: a 504 at the request's deadline
      fault{ endpoint = "notify", kind = "never_sent", count = 1 }
      local b, no = box(), order_no()
      sn.prepay(sim, no, sn.notify_url(recv, b))
      for _, w in ipairs({ "nan", "-nan", "0", "31", "x", "0x10", "%205",
                           "1e1", "inf" }) do
        local st, doc = sn.ctl(sim, "POST", "/sim/transactions/" .. no
                               .. "/pay?wait=" .. w)
        assert.equal(400, st, w)
        assert.equal("PARAM_ERROR", doc.code, w)
      end
      sn.pay(sim, no)                 -- (a paid order would answer 409)
    end)

    it("duplicate: delivered twice, same id, fresh signature", function()
      fault{ endpoint = "notify", kind = "duplicate", count = 1 }
      local b, no = box(), order_no()
      sn.prepay(sim, no, sn.notify_url(recv, b))
      sn.pay(sim, no)
      local list = got(b, 2)
      local n = settled(sim, no)
      assert.equal("delivered", n.state)
      assert.equal(2, #n.attempts)
      assert.is_true(n.attempts[2].duplicate)
      assert.equal(list[1].body, list[2].body)
      assert.not_equal(list[1].headers["wechatpay-nonce"],
                       list[2].headers["wechatpay-nonce"])
      assert.truthy(sn.verify(certs, list[2]))
    end)

    it("out_of_order: held until a later one was delivered", function()
      fault{ endpoint = "notify", kind = "out_of_order", count = 1 }
      local b, first, second = box(), order_no(), order_no()
      sn.prepay(sim, first, sn.notify_url(recv, b))
      sn.pay(sim, first)
      assert.equal("held", one(sim, "out_trade_no=" .. first).state)
      sn.prepay(sim, second, sn.notify_url(recv, b))
      sn.pay(sim, second)
      local list = got(b, 2)
      assert.equal(second, select(2, sn.decrypt(list[1])).out_trade_no)
      assert.equal(first, select(2, sn.decrypt(list[2])).out_trade_no)
    end)

    local sig_faults = {
      { "WECHATPAY/SIGNTEST/ probe", { kind = "bad_signature",
        signtest = true }, function(rec)
          assert.truthy(rec.headers["wechatpay-signature"]:match(
                        "^WECHATPAY/SIGNTEST/"))
        end, "bad signature" },
      { "bad signature", { kind = "bad_signature" }, nil, "bad signature" },
      { "stale timestamp", { kind = "stale_timestamp" }, function(rec)
          assert.truthy(os.time() - tonumber(
            rec.headers["wechatpay-timestamp"]) >= 590)
        end, "stale" },
      { "unknown serial", { kind = "unknown_serial" }, nil,
        "unknown serial" },
    }
    for _, c in ipairs(sig_faults) do
      it(c[1] .. " on the first attempt; the retry is signed correctly",
         function()
        local spec = c[2]
        spec.endpoint, spec.count = "notify", 1
        fault(spec)
        local b, no = box(), order_no()
        sn.answer(recv, b, { statuses = { 401 }, status = 204 })
        sn.prepay(sim, no, sn.notify_url(recv, b))
        sn.pay(sim, no)
        local list = got(b, 2)
        local ok, why = sn.verify(certs, list[1])
        assert.is_nil(ok)
        assert.equal(c[4], why)
        if c[3] then c[3](list[1]) end
        assert.truthy(sn.verify(certs, list[2]))
        assert.equal(list[1].body, list[2].body)
        local n = settled(sim, no)
        assert.equal("delivered", n.state)
        assert.equal(401, n.attempts[1].status)
      end)
    end
  end)
end)

describe("paygate.wechatpay receiving the simulator's notifications",
         function()
  it("accepts them, refuses a SIGNTEST probe and a stale timestamp, and "
     .. "the retries get through", function()
    local server = require "support.server"
    local sim = sn.start{ time_scale = 21660 }
    local app = server.start{ app = "spec/support/wxnotify",
      config = ("return { wechatpay = { mchid = %q, merchant_private_key = "
        .. "%q, merchant_serial = %q, apiv3_key = %q, base_url = %q } }")
        :format(sn.MCHID, sn.KEY_PATH, sn.SERIAL, sn.APIV3, sim.base) }
    local url = "http://127.0.0.1:" .. app.port .. "/notify"
    local cases = {
      { kind = "bad_signature", signtest = true },
      { kind = "stale_timestamp" },
      { kind = "unknown_serial" },
      {},
    }
    for _, c in ipairs(cases) do
      if c.kind then
        local st = sn.ctl(sim, "POST", "/sim/faults", { endpoint = "notify",
          kind = c.kind, signtest = c.signtest, count = 1 })
        assert.equal(200, st)
      end
      local no = order_no()
      sn.prepay(sim, no, url)
      sn.pay(sim, no)
      local n = settled(sim, no)
      assert.equal("delivered", n.state)
      if c.kind then
        -- the client refused the spoiled first attempt (401), took the
        -- retry
        assert.equal(2, #n.attempts)
        assert.equal(401, n.attempts[1].status)
      else
        assert.equal(1, #n.attempts)
      end
      assert.equal(204, n.attempts[#n.attempts].status)
    end
    app:stop()
    sim:stop()
  end)
end)

describe("simulator notifications: other identities", function()
  it("public-key mode: signed with the WeChat Pay public key", function()
    local sim = sn.start{ extra = 'verifier_mode = "public_key"' }
    local st, pub = sn.ctl(sim, "GET", "/sim/public-key")
    assert.equal(200, st)
    local b, no = box(), order_no()
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    local rec = got(b, 1)[1]
    assert.equal(pub.id, rec.headers["wechatpay-serial"])
    assert.truthy(rec.headers["wechatpay-serial"]:match("^PUB_KEY_ID_"))
    assert.truthy(sn.verify({ [pub.id] = assert(crypto.public_key(pub.pem)) },
                            rec))
    assert.equal(no, select(2, sn.decrypt(rec)).out_trade_no)
    sim:stop()
  end)

  it("the SM variant: SM2 with SM3 signature, AEAD_SM4_GCM resource",
     function()
    local sim = sn.start{ sm = true }
    local b, no = box(), order_no()
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    local rec = got(b, 1)[1]
    assert.equal(sn.SM2, rec.headers["wechatpay-signature-type"])
    local certs = sn.platform_certs(sim)
    assert.equal("SM2", certs[rec.headers["wechatpay-serial"]]:key_type())
    assert.truthy(sn.verify(certs, rec, sn.SM2))
    local doc, res = sn.decrypt(rec)
    assert.equal("AEAD_SM4_GCM", doc.resource.algorithm)
    assert.equal(12, #doc.resource.nonce)
    assert.equal(no, res.out_trade_no)
    sim:stop()
  end)
end)

describe("simulator notifications across workers and restarts", function()
  it("two workers: one deliverer, no attempt sent twice", function()
    local sim = sn.start{ workers = 2, time_scale = 100 }
    local b = box()
    sn.answer(recv, b, { statuses = { 500, 500, 500, 500, 500, 500 },
                         status = 204 })
    local nos = {}
    for i = 1, 6 do
      nos[i] = order_no()
      sn.prepay(sim, nos[i], sn.notify_url(recv, b))
      sn.pay(sim, nos[i])
    end
    for _, no in ipairs(nos) do settled(sim, no, 30) end
    local list = sn.received(recv, b)
    local per_id, total, workers = {}, 0, {}
    for _, rec in ipairs(list) do
      local id = sn.decrypt(rec).id
      per_id[id] = (per_id[id] or 0) + 1
    end
    for _, no in ipairs(nos) do
      local n = one(sim, "out_trade_no=" .. no)
      assert.equal("delivered", n.state)
      -- what the receiver got is exactly what the simulator recorded
      assert.equal(#n.attempts, per_id[n.id])
      total = total + #n.attempts
      for k, a in ipairs(n.attempts) do
        assert.equal(k, a.n)
        workers[a.worker] = true
      end
    end
    assert.equal(#list, total)
    assert.equal(6 + 6, total)     -- six 500s in all, then one 204 each
    -- one deliverer: the lease's holder sent every attempt
    local senders = 0
    for _ in pairs(workers) do senders = senders + 1 end
    assert.equal(1, senders)
    sim:stop()
  end)

  it("a restart mid-schedule loses no pending delivery", function()
    -- time_scale 1.5: the first retry comes 10 s after the first attempt,
    -- long after the stop
    local sim = sn.start{ time_scale = 1.5 }
    local b, no = box(), order_no()
    sn.answer(recv, b, { status = 500 })
    sn.prepay(sim, no, sn.notify_url(recv, b))
    sn.pay(sim, no)
    got(b, 1)
    local n
    sn.wait_until(function()
      n = sn.notifications(sim, "out_trade_no=" .. no)[1]
      return n.attempts[1] and n.attempts[1].status == 500
    end, 10, "the first attempt's answer to be recorded")
    assert.equal("pending", n.state)
    local state_dir = sim.state_dir
    assert.equal(0, sim:stop())
    sn.answer(recv, b, { status = 204 })
    local restarted = paygate.update_time()
    sim = sn.start{ time_scale = 1.5, state_dir = state_dir }
    local list = got(b, 2, 30, "the retry after the restart")
    n = settled(sim, no)
    assert.equal("delivered", n.state)
    assert.equal(2, #n.attempts)
    assert.equal(2, #list)
    assert.truthy(n.attempts[2].at >= restarted)
    assert.equal(list[1].body, list[2].body)
    sim:stop()
    os.execute("rm -rf " .. state_dir)
  end)
end)
