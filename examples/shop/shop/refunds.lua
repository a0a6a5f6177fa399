-- shop.refunds: refunds of paid orders in SQLite, and what a refund
-- notification does to them. A refund's id is its out_refund_no.
local paygate = require "paygate"
local sql = require "paygate.sql"
local crypto = require "paygate.crypto"
local reconcile = require "paygate.reconcile"

local _M = {}

local COLUMNS = "id, order_id, amount, reason, state, refund_id, error, "
  .. "success_time, created_at"

--- syntax: refund, err = refunds.create(db, order_id, amount, reason)
-- Records a PENDING refund before anything is asked of WeChat, in one
-- transaction that checks, on the rows it reads, that it is allowed: the
-- order is paid, and reconcile.refund_limit (the refunds not FAILED or
-- CLOSED stay within the paid amount, at most 50 refunds). Two requests at
-- once cannot both pass: SQLite runs one write transaction at a time, so
-- the second reads the first's row.
-- err.kind: not_found, not_paid, refund_exceeds_paid, refund_limit,
-- invalid_amount, or a database kind.
function _M.create(db, order_id, amount, reason)
  return db:transaction(function(tx)
    local rows = assert(tx:query("SELECT id, state, paid_amount FROM orders "
                                 .. "WHERE id = $1", { order_id }))
    local o = rows[1]
    if not o then
      return nil, paygate.error("not_found", "no order " .. order_id)
    end
    if o.state ~= "PAID" and o.state ~= "REFUNDED" then
      return nil, paygate.error("not_paid", "order " .. o.id .. " is "
                                .. o.state .. ": only a paid order is refunded")
    end
    local refunds = assert(tx:query("SELECT amount, state FROM refunds "
                                    .. "WHERE order_id = $1", { o.id }))
    local left, err = reconcile.refund_limit(o.paid_amount, refunds, amount)
    if not left then return nil, err end
    local r = { id = "RF" .. os.date("!%Y%m%d") .. crypto.random_nonce(12),
                order_id = o.id, amount = amount, reason = reason,
                state = "PENDING", created_at = math.floor(paygate.now()) }
    assert(tx:exec("INSERT INTO refunds (id, order_id, amount, reason, "
      .. "created_at) VALUES ($1, $2, $3, $4, $5)",
      { r.id, r.order_id, r.amount, r.reason or sql.null, r.created_at }))
    return r
  end)
end

--- syntax: refund, err = refunds.get(db, id) -- nil, nil when unknown
function _M.get(db, id)
  local rows, err = db:query("SELECT " .. COLUMNS .. " FROM refunds "
                             .. "WHERE id = $1", { id })
  if not rows then return nil, err end
  return rows[1]
end

--- syntax: list, err = refunds.of_order(db, order_id) -- oldest first
function _M.of_order(db, order_id)
  return db:query("SELECT " .. COLUMNS .. " FROM refunds WHERE order_id = $1"
                  .. " ORDER BY created_at, rowid", { order_id })
end

--- syntax: ok, err = refunds.accepted(db, id, refund_id)
-- WeChat took it: PENDING -> PROCESSING (a notification that came first
-- has moved it on already, and stays).
function _M.accepted(db, id, refund_id)
  return db:exec("UPDATE refunds SET state = 'PROCESSING', refund_id = $2 "
                 .. "WHERE id = $1 AND state = 'PENDING'", { id, refund_id })
end

--- syntax: ok, err = refunds.refused(db, id, kind)
-- WeChat refused it, so it refunded nothing: PENDING -> FAILED, and the
-- refund no longer counts against what may be refunded.
function _M.refused(db, id, kind)
  return db:exec("UPDATE refunds SET state = 'FAILED', error = $2 "
                 .. "WHERE id = $1 AND state = 'PENDING'", { id, kind })
end

local OUTCOMES = { SUCCESS = true, CLOSED = true, ABNORMAL = true }

--- syntax: result, err = refunds.apply_notification(db, mchid, event)
-- Applies a REFUND.* notification exactly once, in one transaction: the
-- notification id is recorded, the refund takes WeChat's refund_status, and
-- on SUCCESS the order's refunded amount (and REFUNDED once it is all of
-- the paid amount) together, or nothing is.
-- returns: "applied", "duplicate" (that id seen already, or the refund is in
-- that state or final already: acknowledge again), "ignored" (a status that
-- is no outcome), or nil, err (err.kind: unknown_refund, mismatch, or a
-- database kind): the caller answers failure and WeChat sends it again.
function _M.apply_notification(db, mchid, event)
  local r = event.resource or {}
  local amount = type(r.amount) == "table" and r.amount.refund
  return db:transaction(function(tx)
    local seen = assert(tx:query("SELECT 1 FROM notifications WHERE id = $1",
                                 { event.id }))
    if seen[1] then return "duplicate" end
    local rows = assert(tx:query("SELECT id, order_id, amount, state FROM "
                                 .. "refunds WHERE id = $1", { r.out_refund_no }))
    local rf = rows[1]
    if not rf then
      return nil, paygate.error("unknown_refund", "no refund "
                                .. tostring(r.out_refund_no))
    end
    if r.mchid ~= mchid or r.out_trade_no ~= rf.order_id
       or amount ~= rf.amount then
      return nil, paygate.error("mismatch", "refund " .. rf.id .. ": the "
        .. "notification's merchant, order or amount differs from the refund's")
    end
    assert(tx:exec("INSERT INTO notifications (id, event_type, order_id, "
      .. "received_at) VALUES ($1, $2, $3, $4)",
      { event.id, event.event_type, rf.order_id, math.floor(paygate.now()) }))
    local status = r.refund_status
    if not OUTCOMES[status] then return "ignored" end
    -- SUCCESS and CLOSED are final; ABNORMAL may still end either way
    if rf.state == status or rf.state == "SUCCESS" or rf.state == "CLOSED" then
      return "duplicate"
    end
    -- refund_id too: the answer that carried it may have been lost
    assert(tx:exec("UPDATE refunds SET state = $2, success_time = $3, "
      .. "refund_id = coalesce(refund_id, $4) WHERE id = $1",
      { rf.id, status, r.success_time or sql.null, r.refund_id or sql.null }))
    if status == "SUCCESS" then
      local o = assert(tx:query("SELECT paid_amount, (SELECT sum(amount) FROM "
        .. "refunds WHERE order_id = $1 AND state = 'SUCCESS') AS refunded "
        .. "FROM orders WHERE id = $1", { rf.order_id }))[1]
      assert(tx:exec("UPDATE orders SET refunded = $2, state = $3 "
        .. "WHERE id = $1", { rf.order_id, o.refunded,
        o.refunded >= o.paid_amount and "REFUNDED" or "PAID" }))
    end
    return "applied"
  end)
end

return _M
