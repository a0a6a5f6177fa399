-- Two refunds of one payment made at once on PostgreSQL (two instances,
-- or two requests on two connections), whose sum is above the paid
-- amount: one of them must be refused (422 refund_exceeds_paid).
--
-- The refunds of a payment take turns on its row. Locked with SELECT ...
-- FOR UPDATE, that held under READ COMMITTED only: with the database's
-- default at REPEATABLE READ (default_transaction_isolation, which the
-- gateway does not set), the waiting transaction's snapshot is taken
-- when its lock statement starts, before the other commits, and the row
-- it waited for is unchanged; so it summed the refunds without the
-- other's and both were made: 60 + 60 fen of a 100 fen payment. And two
-- refunds of one merchant reference: one is made.
local core = require "paygate.core"
local json = require "paygate.json"
local sql = require "paygate.sql"
local testing = require "paygate.testing"
local servers = require "spec.support.servers"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

if not servers.have_postgres() then
  describe("gateway refunds of one payment at once",
           function() pending("PostgreSQL is not installed") end)
  return
end

describe("gateway refunds of one payment at once (PostgreSQL, REPEATABLE"
         .. " READ by default)", function()
  local db, ctx, admin, model
  local sent = {}

  -- WeChat Pay's refund call, accepting every refund
  local wx = { refund = function(_, r)
    sent[#sent + 1] = r.out_refund_no
    return { status = "PROCESSING", refund_id = "50300" .. #sent,
             out_refund_no = r.out_refund_no }
  end }

  setup(function()
    local srv = servers.postgres()
    admin = assert(sql.open(srv.url))
    assert(admin:exec("CREATE DATABASE refund_rr"))
    assert(admin:exec("ALTER DATABASE refund_rr SET"
                      .. " default_transaction_isolation = 'repeatable read'"))
    db, ctx = gwcore.inproc(srv.url:gsub("/postgres$", "/refund_rr")
                            .. "?pool=6", { [gwcore.MCHID] = wx })
    assert.equal("repeatable read", db:query("SHOW"
      .. " default_transaction_isolation")[1].default_transaction_isolation)
    model = require "gw.model"
  end)

  teardown(function()
    if db then db:close() end
    if admin then admin:close() end
    servers.stop_all()
  end)

  -- the merchant API's request for a refund of amount (fen)[, of the
  -- merchant's reference]
  local function req(id, amount, reference)
    return { params = { id = id }, app_id = "a",
             body = json.encode({ amount = amount, reference = reference }),
             decode_json = function(self) return json.decode(self.body) end,
             header = function() return nil end }
  end
  local ik = { respond = function(_, _, status, body) return status, body end }

  it("the second of two refunds above the paid amount is refused",
     function()
    local refunds = require "gw.refunds"
    local id = gwcore.payment(db, "paying", 100)
    assert(db:exec("UPDATE gw_payments SET state = 'paid',"
                   .. " paid_out_trade_no = out_trade_no WHERE id = $1",
                   { id }))
    -- the first request is held inside its transaction, once it checked
    -- the total and holds the payment's row, until the second waits on it
    local new_id = model.new_refund_id
    local held, go = false, false
    model.new_refund_id = function()
      if not held then
        held = true
        testing.wait_until(function() return go end, 20,
                           "the second request to wait on the first")
      end
      return new_id()
    end
    local a, b = {}, {}
    core.spawn(function()
      a.status, a.body = refunds.create(req(id, 60), ik)
    end)
    testing.wait_until(function() return held end, 10,
                       "the first request in its transaction")
    core.spawn(function()
      b.status, b.body = refunds.create(req(id, 60), ik)
    end)
    local ok, err = pcall(testing.wait_until, function()
      local rows = assert(admin:query("SELECT count(*) AS n FROM"
        .. " pg_stat_activity WHERE datname = 'refund_rr' AND"
        .. " wait_event_type = 'Lock'"))
      return tonumber(rows[1].n) > 0
    end, 10, "the second request waiting for the payment's row")
    go = true
    testing.wait_until(function() return a.status and b.status end, 20,
                       "both answers")
    model.new_refund_id = new_id
    assert(ok, err)
    local statuses = { a.status, b.status }
    table.sort(statuses)
    assert.same({ 201, 422 }, statuses, json.encode({ a.body, b.body }))
    local rows = assert(db:query("SELECT CAST(SUM(amount) AS BIGINT) AS s"
      .. " FROM gw_refunds WHERE payment_id = $1 AND state NOT IN"
      .. " ('failed', 'closed')", { id }))
    assert.equal(60, tonumber(rows[1].s))
    assert.equal(1, #sent)
  end)
  -- Two refunds of one merchant reference at once (two agents, each with
  -- an Idempotency-Key of their own), well within the paid amount: the
  -- one that waited is the 409 refund_reference_used with the other's
  -- refund, and one refund is sent (was: both made and sent)
  it("of two refunds of one reference at once, one is made", function()
    local refunds = require "gw.refunds"
    local id = gwcore.payment(db, "paying", 100)
    assert(db:exec("UPDATE gw_payments SET state = 'paid',"
                   .. " paid_out_trade_no = out_trade_no WHERE id = $1",
                   { id }))
    local before = #sent
    local new_id = model.new_refund_id
    local held, go = false, false
    model.new_refund_id = function()
      if not held then
        held = true
        testing.wait_until(function() return go end, 20,
                           "the second request to wait on the first")
      end
      return new_id()
    end
    local a, b = {}, {}
    core.spawn(function()
      a.status, a.body = refunds.create(req(id, 30, "RMA-9"), ik)
    end)
    testing.wait_until(function() return held end, 10,
                       "the first request in its transaction")
    core.spawn(function()
      b.status, b.body = refunds.create(req(id, 20, "RMA-9"), ik)
    end)
    local ok, err = pcall(testing.wait_until, function()
      local rows = assert(admin:query("SELECT count(*) AS n FROM"
        .. " pg_stat_activity WHERE datname = 'refund_rr' AND"
        .. " wait_event_type = 'Lock'"))
      return tonumber(rows[1].n) > 0
    end, 10, "the second request waiting for the payment's row")
    go = true
    testing.wait_until(function() return a.status and b.status end, 20,
                       "both answers")
    model.new_refund_id = new_id
    assert(ok, err)
    assert.equal(201, a.status, json.encode(a.body))
    assert.equal(409, b.status, json.encode(b.body))
    assert.equal("refund_reference_used", b.body.error)
    assert.equal(a.body.id, b.body.refund.id)
    local rows = assert(db:query("SELECT count(*) AS n FROM gw_refunds"
      .. " WHERE payment_id = $1", { id }))
    assert.equal(1, tonumber(rows[1].n))
    assert.equal(1, #sent - before)
  end)
  -- Thirty refunds of one payment at once: each waits for the one before
  -- it on the payment's row and fails its snapshot (serialization) when
  -- that one commits, again and again while others go first. Contention,
  -- not a store failure: every one of them is made, none is answered 503.
  it("thirty refunds at once are all made (no 503 serialization)",
     function()
    local refunds = require "gw.refunds"
    local id = gwcore.payment(db, "paying", 100)
    assert(db:exec("UPDATE gw_payments SET state = 'paid',"
                   .. " paid_out_trade_no = out_trade_no WHERE id = $1",
                   { id }))
    local before = #sent
    local answers = {}
    for i = 1, 30 do
      core.spawn(function()
        local st, body = refunds.create(req(id, 1), ik)
        answers[i] = { status = st, body = body }
      end)
    end
    testing.wait_until(function()
      for i = 1, 30 do
        if not answers[i] then return false end
      end
      return true
    end, 60, "thirty answers")
    local bad = {}
    for i = 1, 30 do
      if answers[i].status ~= 201 then bad[#bad + 1] = answers[i] end
    end
    assert.same({}, bad)
    local rows = assert(db:query("SELECT count(*) AS n FROM gw_refunds"
      .. " WHERE payment_id = $1", { id }))
    assert.equal(30, tonumber(rows[1].n))
    testing.wait_until(function() return #sent - before == 30 end, 30,
                       "thirty refunds sent")
  end)
end)
