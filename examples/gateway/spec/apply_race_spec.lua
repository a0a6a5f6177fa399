-- Two payments of one gateway payment applied at once on PostgreSQL (two
-- instances, or a notification and a payment check): the payer paid the
-- superseded attempt _1 and the current attempt _2. Whichever commits
-- first, the other is money taken twice and is refunded (the gateway's
-- on_late_payment = "refund").
--
-- The race: the transaction for _2 read its attempt as `open` (nothing
-- late about it) just before the one for _1 committed -- which paid the
-- payment and superseded _2 -- and then read the payment as paid. It saw
-- "paid already, on the current attempt": a duplicate_paid audit entry
-- and no refund, so the payer's second payment stayed with the merchant
-- while the payment ended refunded. The attempt is now read locked (FOR
-- UPDATE): the read waits for the other transaction and sees `superseded`.
local core = require "paygate.core"
local testing = require "paygate.testing"
local servers = require "spec.support.servers"
local gwcore = dofile("examples/gateway/spec/core_support.lua")

if not servers.have_postgres() then
  describe("gateway applying two payments of one payment at once",
           function() pending("PostgreSQL is not installed") end)
  return
end

package.path = "examples/gateway/?.lua;" .. package.path
local apply = require "gw.apply"

describe("gateway applying two payments of one payment at once"
         .. " (PostgreSQL)", function()
  local db, ctx

  setup(function()
    db, ctx = gwcore.inproc(servers.postgres().url .. "?pool=6")
  end)

  teardown(function()
    db:close()
    servers.stop_all()
  end)

  -- a paying payment whose first attempt was superseded by a second
  local function switched_payment(amount)
    local id = gwcore.payment(db, "paying", amount)
    local now = require("gw.model").now()
    assert(db:exec("UPDATE gw_attempts SET state = 'superseded', closed_at"
                   .. " = $2 WHERE out_trade_no = $1", { id .. "_1", now }))
    assert(db:exec("INSERT INTO gw_attempts (out_trade_no, payment_id, n,"
      .. " channel, state, created_at) VALUES ($1, $2, 2, 'native', 'open',"
      .. " $3)", { id .. "_2", id, now }))
    assert(db:exec("UPDATE gw_payments SET out_trade_no = $2, attempt = 2"
                   .. " WHERE id = $1", { id, id .. "_2" }))
    return id
  end

  local function resource(no, amount)
    return gwcore.paid_event(no, amount).resource
  end

  it("the current attempt's payment read while the superseded one's"
     .. " commits is refunded", function()
    local id = switched_payment(300)
    local late_applied, go_commit, committed = false, false, false
    local first_out, first_err
    core.spawn(function()
      first_out, first_err = db:transaction(function(tx)
        local out, err = apply.payment(ctx, tx, {
          resource = resource(id .. "_1", 300), mchid = gwcore.MCHID,
          notification_id = "EV-late", source = "notification",
          actor = "wechatpay" })
        if not out then return nil, err end
        late_applied = true
        testing.wait_until(function() return go_commit end, 10,
                           "the other transaction to read the attempt")
        return out
      end)
      committed = true
    end)
    testing.wait_until(function() return late_applied end, 10,
                       "the superseded attempt's payment applied")
    -- the other transaction: its read of the attempt lets the first
    -- commit, and it goes on only once that commit is done
    local out, err = db:transaction(function(tx)
      local query = tx.query
      tx.query = function(self, sql, params)
        local first = not go_commit and sql:find("FROM gw_attempts", 1,
                                                 true)
        if first then go_commit = true end
        local rows, qerr = query(self, sql, params)
        if first then
          testing.wait_until(function() return committed end, 10,
                             "the first transaction to commit")
        end
        return rows, qerr
      end
      return apply.payment(ctx, tx, {
        resource = resource(id .. "_2", 300), mchid = gwcore.MCHID,
        notification_id = "EV-current", source = "notification",
        actor = "wechatpay" })
    end)
    assert.equal("applied", first_out, first_err and first_err.message)
    assert.equal("applied", out, err and err.message)
    -- both attempts' money goes back: the late one's (paid on a
    -- superseded attempt) and the second (money taken twice)
    local rows = assert(db:query("SELECT out_trade_no, kind, amount FROM"
      .. " gw_refunds WHERE payment_id = $1 ORDER BY out_trade_no", { id }))
    assert.equal(2, #rows)
    assert.same({ out_trade_no = id .. "_1", kind = "late_payment",
                  amount = 300 }, rows[1])
    assert.same({ out_trade_no = id .. "_2", kind = "duplicate",
                  amount = 300 }, rows[2])
  end)
end)
