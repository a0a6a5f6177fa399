-- The gateway's events through a signed webhook to a receiver on
-- loopback: delivered after the change, in order per payment, retried
-- when the receiver fails, dead-lettered when it refuses, and replayed
-- through POST /admin/outbox/replay; and into a Redis Stream.
local S = require "examples.gateway.spec.support"

describe("gateway events (webhooks)", function()
  local env

  setup(function() env = S.start() end)
  teardown(S.stop)
  after_each(function() env:hook_mode{} end)

  local function row(subject, etype)
    return assert(env.db:query("SELECT id, state, attempts FROM"
      .. " paygate_outbox WHERE subject = $1 AND type = $2 ORDER BY id",
      { subject, etype }))[1]
  end

  it("a paid payment's events arrive signed, in order, with the payment",
     function()
    local p = env:paid_payment{ amount = 25 }
    local e = env:wait_event(p.id, "payment.paid")
    assert.equal("payment.paid", e.data.type)
    assert.equal(p.id, e.data.payment.id)
    assert.equal("paid", e.data.payment.state)
    assert.equal(25, e.data.payment.amount)
    assert.is_number(e.data.at)
    -- the webhook's own headers (gateway.webhooks[1].headers) came along
    assert.equal("spec", e.tenant)
    local paying = env:wait_event(p.id, "payment.paying")
    assert.truthy(paying.id < e.id)
    -- in delivery order, too
    local seen = {}
    for _, x in ipairs(env:events(p.id)) do seen[#seen + 1] = x.type end
    assert.same({ "payment.paying", "payment.paid" }, seen)
    assert.same({}, env:hook_state().refused)
  end)

  it("refund events carry the refund", function()
    local p = env:paid_payment{ amount = 30 }
    local r = S.expect(env:refund(p.id, 10), 201, "refund")
    env.sim:settle(r.out_refund_no)
    local e = env:wait_event(p.id, "refund.succeeded")
    assert.equal(r.id, e.data.refund.id)
    local pr = env:wait_event(p.id, "payment.partially_refunded")
    assert.equal(10, pr.data.payment.refunded)
  end)

  it("a closed payment's event", function()
    local p = env:create().payment
    S.expect(env:api("POST", "/v1/payments/" .. p.id .. "/close"), 200,
             "close")
    local e = env:wait_event(p.id, "payment.closed")
    assert.equal("closed", e.data.payment.state)
  end)

  it("a failed payment's event (PAYERROR learnt by a refresh)", function()
    local p = env:create().payment
    env.sim:fail(p.out_trade_no)
    assert.equal("failed", env:get(p.id, true).state)
    local e = env:wait_event(p.id, "payment.failed")
    assert.equal("failed", e.data.payment.state)
  end)

  it("a receiver that fails gets the event again", function()
    env:hook_mode{ fail_first = true }
    local p = env:paid_payment()
    local e = env:wait_event(p.id, "payment.paid", 30)
    assert.truthy(e.attempt >= 2, "attempt " .. tostring(e.attempt))
    assert.truthy(env:hook_state().attempts[tostring(e.id)] >= 2)
  end)

  it("a receiver that refuses: dead letter; replayed once it is fixed",
     function()
    local p = env:create().payment
    env:wait_event(p.id, "payment.paying")
    env:hook_mode{ reject = { [p.id] = true } }
    env.sim:pay_and_wait(p.out_trade_no)
    env:wait_state(p.id, "paid")
    S.wait_until(function()
      local r = row(p.id, "payment.paid")
      return r and r.state == "dead"
    end, 30, "payment.paid dead-lettered")
    assert.equal(0, #env:events(p.id, "payment.paid"))
    -- /metrics counts it (summed over the workers), beside deliveries
    local res = assert(env.gw:admin_get("/metrics"))
    assert.equal(200, res.status)
    local dead = res.body:match('\npaygate_outbox_events_total{outbox="'
      .. '[^"]*",outcome="dead"} (%d+)\n')
    assert.truthy(tonumber(dead) and tonumber(dead) >= 1, res.body)
    assert.matches('\npaygate_outbox_events_total{outbox="[^"]*",outcome='
                   .. '"delivered"} %d+\n', res.body)
    env:hook_mode{}
    -- replay every dead letter
    res = env:admin("POST", "/admin/outbox/replay", { dead = true })
    assert.equal(200, res.status, res.body)
    local e = env:wait_event(p.id, "payment.paid", 30)
    assert.equal(row(p.id, "payment.paid").id, e.id)
    -- one event by id, delivered again (once its delivery is recorded:
    -- the receiver has it a moment before the row says delivered, and a
    -- replay leaves a pending row as it is)
    S.wait_until(function()
      return row(p.id, "payment.paid").state == "delivered"
    end, 30, "the replayed delivery recorded")
    res = env:admin("POST", "/admin/outbox/replay", { id = e.id })
    assert.equal(200, res.status, res.body)
    assert.equal(1, res.json.replayed, res.body)
    S.wait_until(function()
      return #env:events(p.id, "payment.paid") == 2
    end, 30, "the replayed delivery")
  end)

  it("replay refuses a bad request", function()
    local res = env:admin("POST", "/admin/outbox/replay", {})
    assert.equal(400, res.status, res.body)
    res = env:admin("POST", "/admin/outbox/replay", { id = "seventeen" })
    assert.equal(400, res.status, res.body)
    -- a filter that cannot be applied is refused, not dropped: before,
    -- a misspelt key or a subject sent as a number was ignored and the
    -- request replayed every dead letter of every payment
    for _, b in ipairs({ { dead = true, subjet = "pay_x" },
                         { dead = true, subject = 17 },
                         { dead = true, type = { "payment.paid" } },
                         { id = 17, subject = "pay_x" },
                         { dead = false, subject = "pay_x" } }) do
      res = env:admin("POST", "/admin/outbox/replay", b)
      assert.equal(400, res.status, res.body)
      assert.equal("invalid_request", res.json.error, res.body)
    end
  end)
end)

describe("gateway events (Redis Stream)", function()
  local env, rds, r, pwfile

  setup(function()
    -- a Redis with a password, given to the gateway from a file, out of
    -- the URL (gateway.redis_password_file): the stream sink and
    -- retention's lease both connect with it
    rds = require("support.servers").redis({ requirepass = "spec-stream-pw" })
    pwfile = os.tmpname()
    local f = assert(io.open(pwfile, "w"))
    f:write("spec-stream-pw\n")
    f:close()
    env = S.start{ gateway = { redis = "redis://127.0.0.1:" .. rds.port,
                               redis_password_file = pwfile,
                               redis_stream = { stream = "gw:events" } } }
    r = assert(require("paygate.redis").connect(rds.url))
  end)
  teardown(function()
    if r then r:close() end
    S.stop()
    require("support.servers").stop_all()
    if pwfile then os.remove(pwfile) end
  end)

  it("every event is XADDed with its id, type, subject and payload",
     function()
    local p = env:paid_payment{ amount = 12 }
    local entries
    S.wait_until(function()
      entries = assert(r:call("XRANGE", "gw:events", "-", "+"))
      for _, e in ipairs(entries) do
        local f = {}
        for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
        if f.subject == p.id and f.type == "payment.paid" then
          local payload = require("cjson").decode(f.payload)
          assert.equal("paid", payload.payment.state)
          assert.equal(12, payload.payment.amount)
          assert.matches("^%d+$", f.id)
          return true
        end
      end
    end, 15, "payment.paid in the stream")
    -- the webhook got it too: every sink has every event
    env:wait_event(p.id, "payment.paid")
  end)
end)

describe("gateway events no sink takes", function()
  local env

  setup(function()
    env = S.start{ webhook_types = { "payment.paid" } }
  end)
  teardown(S.stop)

  it("are recorded delivered at once, never sent; the others are sent",
     function()
    local p = env:paid_payment{ amount = 8 }
    local e = env:wait_event(p.id, "payment.paid")
    assert.equal(p.id, e.data.payment.id)
    -- the receiver has the event a moment before its row says delivered
    local rows
    S.wait_until(function()
      rows = assert(env.db:query("SELECT state FROM paygate_outbox"
        .. " WHERE subject = $1 AND type = 'payment.paid'", { p.id }))
      return rows[1] and rows[1].state == "delivered"
    end, 30, "the webhook's delivery recorded")
    rows = assert(env.db:query("SELECT type, state, attempts,"
      .. " delivered_at, created_at FROM paygate_outbox WHERE subject = $1"
      .. " ORDER BY id", { p.id }))
    assert.equal(2, #rows)
    -- payment.paying: the webhook takes payment.paid only, gw/hooks.lua
    -- has no hook: written delivered in its own transaction
    assert.equal("payment.paying", rows[1].type)
    assert.equal("delivered", rows[1].state)
    assert.equal(0, rows[1].attempts)
    assert.is_number(rows[1].delivered_at)
    assert.equal("payment.paid", rows[2].type)
    assert.equal("delivered", rows[2].state)
    assert.equal(1, rows[2].attempts)
    local seen = {}
    for _, x in ipairs(env:events(p.id)) do seen[#seen + 1] = x.type end
    assert.same({ "payment.paid" }, seen)
  end)
end)
