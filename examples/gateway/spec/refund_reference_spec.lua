-- POST /v1/payments/:id/refunds' `reference`: the merchant's own id of
-- what a refund is for (its return, RMA or ticket id).
--
-- Each request gets its own out_refund_no, and an Idempotency-Key guards
-- one request only: two operators refunding the same return, each under
-- a key of their own, made two refunds of it while the total stayed
-- within the paid amount. A reference is refunded once per payment: a
-- second request of it (any key, any amount) is answered 409
-- refund_reference_used with the first refund, and WeChat is not called;
-- requests of it at once make one refund (migration 013's unique index).
-- A refund that failed or closed moved no money and lets its reference
-- go. Without a reference, refunds are as they were.
local testing = require "paygate.testing"
local json = require "paygate.json"
local core = dofile("examples/gateway/spec/core_support.lua")

-- a paid payment of amount (fen), through the simulator
local function paid(sim, gw, amount)
  local p = gw:create{ amount = amount }
  sim:pay(p.out_trade_no)
  return gw:wait_state(p.id, "paid", 20)
end

-- a refund request of payment id; fields: amount, reference, reason
local function refund(gw, id, fields, key)
  return gw:call("POST", "/v1/payments/" .. id .. "/refunds", fields,
                 key and { ["Idempotency-Key"] = key } or nil)
end

-- the simulator's last request seq, and the refund calls it took since
local function last_seq(sim)
  local n = 0
  for _, r in ipairs(sim:requests()) do
    if r.seq > n then n = r.seq end
  end
  return n
end

local function refund_calls_since(sim, from)
  local n = 0
  for _, r in ipairs(sim:requests()) do
    if r.seq > from and r.endpoint == "refund" then n = n + 1 end
  end
  return n
end

describe("gateway refunds: the merchant's reference", function()
  local sim, gw

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    gw = core.start(sim, { workers = 2, gateway = {
      console = { access = "loopback" },
      reconcile = { enabled = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    testing.stop_all()
  end)

  before_each(function() sim:clear_faults() end)

  it("a bad reference is a 400 naming it, and nothing is made", function()
    local p = paid(sim, gw, 100)
    local from = last_seq(sim)
    for _, bad in ipairs({ "", ("R"):rep(65), "RMA 7", "RMA-7 ", "RMA\n7",
                           "RMA-\0007", "退货-7", 7, true, json.null,
                           { "RMA-7" } }) do
      local res = refund(gw, p.id, { amount = 10, reference = bad })
      local what = "reference " .. json.encode(bad)
      assert.equal(400, res.status, what .. ": " .. res.body)
      assert.equal("invalid_request", res.json.error, what)
      assert.matches("printable ASCII", res.json.fields.reference, 1, true)
      local n = 0
      for _ in pairs(res.json.fields) do n = n + 1 end
      assert.equal(1, n, what .. ": only the reference is at fault: "
                   .. res.body)
    end
    assert.equal(0, #gw:get(p.id).refunds)
    assert.equal(0, refund_calls_since(sim, from))
    -- 64 printable characters are one
    local ok = refund(gw, p.id, { amount = 10,
                                  reference = ("R"):rep(63) .. "~" })
    assert.equal(201, ok.status, ok.body)
    assert.equal(("R"):rep(63) .. "~", ok.json.reference)
  end)

  it("without a reference, two refunds of one amount are two refunds, as "
     .. "before", function()
    local p = paid(sim, gw, 100)
    local from = last_seq(sim)
    local a = refund(gw, p.id, { amount = 30 })
    local b = refund(gw, p.id, { amount = 30 })
    assert.equal(201, a.status, a.body)
    assert.equal(201, b.status, b.body)
    assert.is_nil(a.json.reference)
    assert.is_not.equal(a.json.id, b.json.id)
    assert.equal(2, refund_calls_since(sim, from))
    assert.equal(2, #gw:get(p.id).refunds)
  end)

  it("a reference refunded once is not refunded again: 409 with that "
     .. "refund, WeChat called once", function()
    local p = paid(sim, gw, 100)
    local from = last_seq(sim)
    local first = refund(gw, p.id, { amount = 30, reference = "RMA-1",
                                     reason = "one item returned" },
                         "agent-a-" .. p.id)
    assert.equal(201, first.status, first.body)
    assert.equal("RMA-1", first.json.reference)
    -- another agent, another key, another amount: the same return
    local again = refund(gw, p.id, { amount = 20, reference = "RMA-1" },
                         "agent-b-" .. p.id)
    assert.equal(409, again.status, again.body)
    assert.equal("refund_reference_used", again.json.error)
    assert.equal(first.json.id, again.json.refund.id)
    assert.equal(first.json.state, again.json.refund.state)
    assert.equal(30, again.json.refund.amount)
    assert.matches("/v1/refunds/" .. first.json.id, again.json.message, 1,
                   true)
    -- that answer is kept for its key, as every refund answer
    local replay = refund(gw, p.id, { amount = 20, reference = "RMA-1" },
                          "agent-b-" .. p.id)
    assert.equal(again.body, replay.body)
    -- what the payment's total or state would refuse is still this: the
    -- reference is the reason the caller needs
    local all = refund(gw, p.id, { amount = 100, reference = "RMA-1" })
    assert.equal(409, all.status, all.body)
    assert.equal("refund_reference_used", all.json.error)
    assert.equal(1, refund_calls_since(sim, from))
    assert.equal(1, #gw:get(p.id).refunds)
    -- another reference is another refund; a reference is the payment's
    -- own (another payment's refund of RMA-1 is made)
    assert.equal(201, refund(gw, p.id, { amount = 20,
                                         reference = "RMA-2" }).status)
    local q = paid(sim, gw, 100)
    assert.equal(201, refund(gw, q.id, { amount = 20,
                                         reference = "RMA-1" }).status)
    assert.equal(3, refund_calls_since(sim, from))
  end)

  it("requests of one reference at once make one refund", function()
    local p = paid(sim, gw, 100)
    local from = last_seq(sim)
    local n, answers = 6, {}
    for i = 1, n do
      require("paygate.core").spawn(function()
        answers[i] = refund(gw, p.id, { amount = 10 + i,
                                        reference = "RMA-race" })
      end)
    end
    testing.wait_until(function()
      for i = 1, n do
        if not answers[i] then return false end
      end
      return true
    end, 30, "the answers")
    local made, used = {}, {}
    for i = 1, n do
      local res = answers[i]
      if res.status == 201 then
        made[#made + 1] = res.json.id
      else
        assert.equal(409, res.status, res.body)
        assert.equal("refund_reference_used", res.json.error, res.body)
        used[#used + 1] = res.json.refund.id
      end
    end
    assert.equal(1, #made, json.encode(made))
    for _, id in ipairs(used) do assert.equal(made[1], id) end
    assert.equal(1, refund_calls_since(sim, from))
    assert.equal(1, #gw:get(p.id).refunds)
  end)

  it("a refund of a reference that WeChat refused lets the reference go",
     function()
    local p = paid(sim, gw, 100)
    sim:fault{ endpoint = "refund", kind = "error", status = 403,
               code = "NOT_ENOUGH", count = 1 }
    local first = refund(gw, p.id, { amount = 30, reference = "RMA-3" })
    assert.equal(502, first.status, first.body)
    assert.equal("failed", first.json.refund.state)
    assert.equal("RMA-3", first.json.refund.reference)
    local again = refund(gw, p.id, { amount = 30, reference = "RMA-3" })
    assert.equal(201, again.status, again.body)
    assert.is_not.equal(first.json.refund.id, again.json.id)
    -- and the one that counts now holds it
    local third = refund(gw, p.id, { amount = 30, reference = "RMA-3" })
    assert.equal(409, third.status, third.body)
    assert.equal(again.json.id, third.json.refund.id)
  end)

  it("a key used again after it expired, with another reference, is not "
     .. "answered with the first refund", function()
    local p = paid(sim, gw, 100)
    local key = "refund-ref-key-" .. p.id
    assert.equal(201, refund(gw, p.id, { amount = 30, reference = "RMA-4" },
                             key).status)
    assert(gw.db:exec("UPDATE paygate_idempotency SET expires_at = 0"
                      .. " WHERE idem_key = $1", { key }))
    local res = refund(gw, p.id, { amount = 30, reference = "RMA-5" }, key)
    assert.equal(422, res.status, res.body)
    assert.equal("idempotency_key_reused", res.json.error)
  end)

  it("the reference is in GET refund, the list, the refund events and the "
     .. "console's payment page", function()
    local p = paid(sim, gw, 100)
    local res = refund(gw, p.id, { amount = 30, reference = "TICKET-77" })
    assert.equal(201, res.status, res.body)
    local rf = res.json
    local got = gw:call("GET", "/v1/refunds/" .. rf.id)
    assert.equal("TICKET-77", got.json.reference)
    local list = gw:call("GET", "/v1/payments/" .. p.id .. "/refunds")
    assert.equal("TICKET-77", list.json.refunds[1].reference)
    assert.equal("TICKET-77", gw:get(p.id).refunds[1].reference)
    -- settled at WeChat: its refund.succeeded event names it
    sim:settle(rf.out_refund_no)
    local payload
    testing.wait_until(function()
      local rows = assert(gw.db:query("SELECT payload FROM paygate_outbox"
        .. " WHERE subject = $1 AND type = 'refund.succeeded'", { p.id }))
      payload = rows[1] and json.decode(rows[1].payload)
      return payload ~= nil
    end, 20, "the refund.succeeded event")
    assert.equal(rf.id, payload.refund.id)
    assert.equal("TICKET-77", payload.refund.reference)
    local page = gw.srv:request{ path = "/console/payments/" .. p.id }
    assert.equal(200, page.status)
    local sec = assert(page.body:match("<h2>Refunds</h2>(.-)</section>"))
    assert.matches("<th>reference</th>", sec, 1, true)
    assert.matches("<td>merchant</td><td>TICKET-77</td>", sec, 1, true)
  end)
end)

-- The unique index is what holds a reference, not the read before the
-- insert: a read that misses the refund of it (here made to miss: the
-- refunds of a payment take turns, so a real one does not) leaves the
-- insert to the index, which refuses it, and the answer is the 409 all
-- the same. On each engine.
describe("gateway refunds: a reference held by the store's unique index",
         function()
  local sql = require "paygate.sql"
  local servers = require "spec.support.servers"
  local engines = { { "sqlite", function(dir)
    return "sqlite:" .. dir .. "/gw.db"
  end } }
  if servers.have_postgres() then
    engines[2] = { "postgres", function()
      local srv = servers.postgres()
      local admin = assert(sql.open(srv.url))
      assert(admin:exec("DROP DATABASE IF EXISTS refund_reference"))
      assert(admin:exec("CREATE DATABASE refund_reference"))
      admin:close()
      return (srv.url:gsub("/postgres$", "/refund_reference"))
    end }
  end
  local dir = servers.mktemp()

  teardown(function()
    servers.stop_all()
    servers.sh("rm -rf " .. dir)
  end)

  for _, engine in ipairs(engines) do
    it(engine[1] .. ": a second refund of a reference the read missed is "
       .. "refused by the index: 409 with the first, one sent", function()
      local sent = {}
      local wx = { refund = function(_, r)
        sent[#sent + 1] = r.out_refund_no
        return { status = "PROCESSING", refund_id = "50300" .. #sent,
                 out_refund_no = r.out_refund_no }
      end }
      local db = core.inproc(engine[2](dir), { [core.MCHID] = wx })
      local model = require "gw.model"
      local refunds = require "gw.refunds"
      local id = core.payment(db, "paying", 100)
      assert(db:exec("UPDATE gw_payments SET state = 'paid',"
                     .. " paid_out_trade_no = out_trade_no WHERE id = $1",
                     { id }))
      local function req(amount)
        return { params = { id = id }, app_id = "a",
                 body = json.encode({ amount = amount,
                                      reference = "RMA-idx" }),
                 decode_json = function(self)
                   return json.decode(self.body)
                 end,
                 header = function() return nil end }
      end
      local ik = { respond = function(_, _, status, body)
        return status, body end }
      local st, first = refunds.create(req(30), ik)
      assert.equal(201, st, json.encode(first))
      -- the read inside the transaction misses it; the one after reads
      local read = model.refund_by_reference
      model.refund_by_reference = function(q, ...)
        if q ~= db then return false end
        return read(q, ...)
      end
      local ok, st2, body = pcall(refunds.create, req(20), ik)
      model.refund_by_reference = read
      assert(ok, st2)
      assert.equal(409, st2, json.encode(body))
      assert.equal("refund_reference_used", body.error)
      assert.equal(first.id, body.refund.id)
      assert.equal(1, #sent)
      local rows = assert(db:query("SELECT count(*) AS n FROM gw_refunds"
                                   .. " WHERE payment_id = $1", { id }))
      assert.equal(1, tonumber(rows[1].n))
      db:close()
    end)
  end
end)
