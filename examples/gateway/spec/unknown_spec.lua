-- examples/gateway: a prepay whose outcome is not known (it may have
-- reached WeChat: an answer that fails verification, no answer within the
-- client's timeout) moves the payment to `unknown` with a payment.unknown
-- event; reconciliation settles it by a query, and a resumed create of the
-- same order queries first (closing an order WeChat made but nobody was
-- given). A prepay WeChat certainly refused leaves the payment `created`,
-- resumed at once.
local testing = require "paygate.testing"
local audit = require "paygate.audit"
local core = dofile("examples/gateway/spec/core_support.lua")

local function events_of(gw, id)
  local rows = assert(gw.db:query("SELECT type FROM paygate_outbox WHERE"
    .. " subject = $1 ORDER BY id", { id }))
  local types = {}
  for i, r in ipairs(rows) do types[i] = r.type end
  return types
end

local function count(list, v)
  local n = 0
  for _, x in ipairs(list) do if x == v then n = n + 1 end end
  return n
end

local function row_of(gw, order_id)
  return assert(gw.db:query("SELECT * FROM gw_payments WHERE order_id = $1",
                            { order_id }))[1]
end

-- the simulator's requests after seq `from` about payment `id` (its
-- queries and closes name it; a prepay names none), oldest first
local function last_seq(sim)
  local n = 0
  for _, r in ipairs(sim:requests()) do
    if r.seq > n then n = r.seq end
  end
  return n
end

local function endpoints_since(sim, from, id)
  local list = sim:requests()
  table.sort(list, function(a, b) return a.seq < b.seq end)
  local seen = {}
  for _, r in ipairs(list) do
    if r.seq > from and (r.endpoint == "prepay"
                         or tostring(r.target):find(id, 1, true)) then
      seen[#seen + 1] = r.endpoint
    end
  end
  return seen
end

local function new_order()
  return "unk-" .. require("paygate.crypto").random_nonce(8)
end

-- The cases, on the store db_for(name) gives each of the two gateways
-- (nil: SQLite, a file of its own; or core.start's db function).
local function cases(db_for)
  local sim, gw, gw_rec

  setup(function()
    sim = testing.simulator{ time_scale = 100 }
    -- one attempt of at most 0.5 s per call: a slower answer is lost
    gw = core.start(sim, { db = db_for and db_for("gw"),
      gateway = { reconcile = { enabled = false } },
      merchant = { timeout = 0.5, timeout_floor = 0.2, max_attempts = 1 } })
    gw_rec = core.start(sim, { db = db_for and db_for("gw_rec"), gateway = {
      reconcile = { check_after = 1, first = 0.5, ceiling = 1,
                    interval = 0.1, bill = false } } })
  end)

  teardown(function()
    if gw then gw:stop() end
    if gw_rec then gw_rec:stop() end
    testing.stop_all()
  end)

  after_each(function() sim:clear_faults() end)

  it("an answer that fails verification: unknown, payment.unknown;"
     .. " reconciliation finds it paid", function()
    sim:fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
    local order_id = new_order()
    local res = gw_rec:call("POST", "/v1/payments", { order_id = order_id,
      channel = "native", amount = 41, description = "unverified" })
    assert.equal(502, res.status, res.body)
    assert.equal("unverified_response", res.json.wechat_kind)
    assert.equal("unknown", res.json.payment.state)
    local p = row_of(gw_rec, order_id)
    assert.equal("unknown", p.state)
    assert.equal(1, count(events_of(gw_rec, p.id), "payment.unknown"))
    local e = audit.entries(gw_rec.db, "payment:" .. p.id)
    assert.equal("payment.outcome_unknown", e[#e].what)
    -- the order exists at WeChat: the payer pays it, the notification is
    -- lost, and the query settles it
    assert.equal("NOTPAY", assert(sim:client():query_by_out_trade_no(
      p.out_trade_no)).trade_state)
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    sim:pay(p.out_trade_no)
    gw_rec:wait_state(p.id, "paid", 20)
    e = audit.entries(gw_rec.db, "payment:" .. p.id)
    assert.equal("payment.succeeded", e[#e].what)
    assert.equal("unknown", e[#e].from)
    assert.equal("reconcile", e[#e].actor)
  end)

  it("an unknown payment WeChat says is unpaid is open again by the query",
     function()
    sim:fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
    local order_id = new_order()
    local res = gw_rec:call("POST", "/v1/payments", { order_id = order_id,
      channel = "native", amount = 42, description = "unverified" })
    assert.equal(502, res.status, res.body)
    local p = row_of(gw_rec, order_id)
    assert.equal("unknown", p.state)
    gw_rec:wait_state(p.id, "paying", 20)
  end)

  -- A connection reset after the prepay was sent was answered "WeChat
  -- Pay did not answer in time": an operator read a slow WeChat into a
  -- connection that was cut at once
  it("a connection lost after sending: unknown, and said as lost, not as"
     .. " slow", function()
    sim:fault{ endpoint = "prepay", kind = "reset", after = true,
               count = 1 }
    local order_id = new_order()
    local res = gw:call("POST", "/v1/payments", { order_id = order_id,
      channel = "native", amount = 44, description = "reset" })
    assert.equal(504, res.status, res.body)
    assert.equal("timeout", res.json.error)
    assert.is_nil(res.json.message:find("in time", 1, true), res.body)
    assert.truthy(res.json.message:find("connection to WeChat Pay was lost",
                                        1, true), res.body)
    assert.equal("unknown", row_of(gw, order_id).state)
  end)

  -- The same for a refund: its 504 said "WeChat Pay did not answer in
  -- time" whatever was lost, with nothing of the failure (the payment's
  -- said which since the fix above; two wordings of one answer)
  it("a refund whose connection is lost after sending: said as lost, not"
     .. " as slow, with what failed", function()
    local p = gw:create{ amount = 45 }
    sim:pay_and_wait(p.out_trade_no)
    gw:wait_state(p.id, "paid")
    sim:fault{ endpoint = "refund", kind = "reset", after = true,
               count = 1 }
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                        { amount = 5 })
    assert.equal(504, res.status, res.body)
    assert.equal("timeout", res.json.error)
    assert.is_nil(res.json.message:find("in time", 1, true), res.body)
    assert.truthy(res.json.message:find("connection to WeChat Pay was lost",
                                        1, true), res.body)
    assert.truthy(res.json.message:find("1 attempt)", 1, true), res.body)
    assert.truthy(res.json.message:find("the refund is checked again later",
                                        1, true), res.body)
    assert.equal("unknown", res.json.refund.state)
  end)

  it("no answer within the timeout: unknown; a resumed create queries,"
     .. " closes the order WeChat made, and opens a new attempt", function()
    sim:fault{ endpoint = "prepay", kind = "latency", seconds = 1.5,
               count = 1 }
    local order_id = new_order()
    local body = { order_id = order_id, channel = "native", amount = 43,
                   description = "slow" }
    local res = gw:call("POST", "/v1/payments", body)
    assert.equal(504, res.status, res.body)
    assert.equal("timeout", res.json.error)
    -- the message says the timeout the attempt had and whose it was (the
    -- configured 0.5 s here), and how many attempts the call made
    assert.truthy(res.json.message:find("did not answer in time", 1, true),
                  res.body)
    assert.truthy(res.json.message:find("the attempt's timeout was 0.5 s:"
                  .. " the configured timeout", 1, true), res.body)
    assert.truthy(res.json.message:find("1 attempt)", 1, true), res.body)
    local p = row_of(gw, order_id)
    assert.equal("unknown", p.state)
    assert.equal(1, count(events_of(gw, p.id), "payment.unknown"))
    -- the simulator made the order once its delay was over
    local wx = sim:client()
    testing.wait_until(function()
      return wx:query_by_out_trade_no(p.out_trade_no) ~= nil
    end, 10, "the order made at the simulator")
    local before = last_seq(sim)
    res = gw:call("POST", "/v1/payments", body)
    assert.equal(201, res.status, res.body)
    assert.equal("paying", res.json.payment.state)
    assert.equal(2, res.json.payment.attempt)
    assert.is_string(res.json.pay.code_url)
    -- queried first, then closed, then the new prepay
    assert.same({ "query", "close", "prepay" },
                endpoints_since(sim, before, p.id))
    assert.equal("CLOSED", assert(wx:query_by_out_trade_no(
      p.out_trade_no)).trade_state)
    local e = audit.entries(gw.db, "payment:" .. p.id)
    assert.equal("payment.still_open", e[#e].what)
    assert.equal("unknown", e[#e].from)
    assert.is_true((audit.verify(gw.db, "payment:" .. p.id)))
  end)

  it("a resumed create of an unknown payment that was paid: applied, 409",
     function()
    sim:fault{ endpoint = "prepay", kind = "latency", seconds = 1.5,
               count = 1 }
    local order_id = new_order()
    local body = { order_id = order_id, channel = "native", amount = 44,
                   description = "slow, then paid" }
    assert.equal(504, gw:call("POST", "/v1/payments", body).status)
    local p = row_of(gw, order_id)
    assert.equal("unknown", p.state)
    local wx = sim:client()
    testing.wait_until(function()
      return wx:query_by_out_trade_no(p.out_trade_no) ~= nil
    end, 10, "the order made at the simulator")
    sim:fault{ endpoint = "notify", kind = "never_sent", count = 1 }
    sim:pay(p.out_trade_no)
    local res = gw:call("POST", "/v1/payments", body)
    assert.equal(409, res.status, res.body)
    assert.equal("payment_exists", res.json.error)
    assert.equal("paid", res.json.payment.state)
    assert.equal(1, res.json.payment.attempt)
  end)

  it("a prepay WeChat refused stays created and is resumed at once",
     function()
    sim:fault{ endpoint = "prepay", kind = "error", status = 403,
               code = "NO_AUTH", count = 1 }
    local order_id = new_order()
    local body = { order_id = order_id, channel = "native", amount = 45,
                   description = "refused" }
    local res = gw:call("POST", "/v1/payments", body)
    assert.equal(502, res.status, res.body)
    local p = row_of(gw, order_id)
    assert.equal("created", p.state)
    assert.equal(0, count(events_of(gw, p.id), "payment.unknown"))
    local before = last_seq(sim)
    res = gw:call("POST", "/v1/payments", body)
    assert.equal(201, res.status, res.body)
    assert.equal(2, res.json.payment.attempt)
    assert.same({ "prepay" }, endpoints_since(sim, before, p.id))
  end)

  it("a new attempt whose answer fails verification: unknown", function()
    local p = gw:create{ amount = 46 }
    sim:fault{ endpoint = "prepay", kind = "bad_signature", count = 1 }
    local res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                        { channel = "native" })
    assert.equal(502, res.status, res.body)
    assert.equal("unknown", res.json.payment.state)
    assert.equal("unknown", gw:get(p.id).state)
    assert.equal(1, count(events_of(gw, p.id), "payment.unknown"))
    -- a refund of it is refused, saying to ask WeChat first (before: only
    -- "only a paid payment is refunded", for a payment that may be paid)
    local rf = gw:call("POST", "/v1/payments/" .. p.id .. "/refunds",
                       { amount = 10 })
    assert.equal(409, rf.status, rf.body)
    assert.equal("invalid_state", rf.json.error)
    assert.matches("its outcome is not known yet: ask WeChat Pay first (GET"
      .. " /v1/payments/" .. p.id .. "?refresh=1, or the console's Query"
      .. " WeChat now)", rf.json.message, 1, true)
    -- another attempt closes the lost one first, and opens the payment
    res = gw:call("POST", "/v1/payments/" .. p.id .. "/attempts",
                  { channel = "native" })
    assert.equal(201, res.status, res.body)
    assert.equal("paying", res.json.payment.state)
    assert.equal(3, res.json.payment.attempt)
  end)
end

describe("gateway: prepay outcome unknown", function() cases(nil) end)

-- The 504's words name the cause the client gave. A call out of retries
-- whose last attempt could not connect, or was refused 429, after an
-- earlier one may have arrived is unknown_outcome too, with cause_kind
-- connect or frequency_limited: it was said "the connection to WeChat Pay
-- was lost before its answer" as a reset is, which it was not.
describe("gateway: an unknown outcome's words", function()
  package.path = "examples/gateway/?.lua;" .. package.path
  local payments = require "gw.payments"
  local errors = require "paygate.wechatpay.errors"
  local function unknown(cause)
    return errors.wrap("unknown_outcome", "POST /v3/refund/domestic/refunds: "
      .. cause .. " after the request may have been received",
      require("paygate.core").error(cause, "failed"), { retryable = true })
  end

  it("says a lost connection only for one that was lost", function()
    local w = payments.unknown_words(unknown("closed"))
    assert.truthy(w:find("connection to WeChat Pay was lost", 1, true), w)
    w = payments.unknown_words(unknown("timeout"))
    assert.truthy(w:find("did not answer in time", 1, true), w)
    w = payments.unknown_words(require("paygate.core").error("timeout",
                                                             "slow"))
    assert.truthy(w:find("did not answer in time", 1, true), w)
    for _, cause in ipairs({ "connect", "frequency_limited" }) do
      w = payments.unknown_words(unknown(cause))
      assert.is_nil(w:find("was lost", 1, true), w)
      assert.is_nil(w:find("in time", 1, true), w)
      assert.truthy(w:find("the outcome is unknown (unknown_outcome: ", 1,
                           true), w)
      assert.truthy(w:find(cause .. " after the request", 1, true), w)
    end
  end)
end)

local servers = require "spec.support.servers"
if servers.have_postgres() then
  -- each gateway a database of its own on one PostgreSQL server (as each
  -- has a file of its own on SQLite: gw_rec must not reconcile gw's)
  describe("gateway: prepay outcome unknown, on PostgreSQL", function()
    local sql = require "paygate.sql"
    local pg
    local function db_for(name)
      pg = pg or servers.postgres()
      local dbname = name .. "_" .. require("paygate.crypto").hex(
        require("paygate.crypto").random_bytes(4))
      local admin = assert(sql.open(pg.url))
      assert(admin:exec("CREATE DATABASE " .. dbname))
      admin:close()
      local url = pg.url:gsub("/postgres$", "/" .. dbname)
      return function() return url end
    end
    teardown(function() servers.stop_all() end)
    cases(db_for)
  end)
end
