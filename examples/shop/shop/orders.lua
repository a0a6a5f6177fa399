-- shop.orders: the shop's orders in SQLite, and what a payment
-- notification does to them (refunds: shop.refunds).
local paygate = require "paygate"
local crypto = require "paygate.crypto"

local _M = {}

local COLUMNS = "id, amount, description, state, code_url, transaction_id, "
  .. "paid_amount, paid_at, refunded, created_at"

--- syntax: order, err = orders.create(db, amount, description)
-- Records a NEW order with a fresh out_trade_no before anything is asked
-- of WeChat, so a notification always finds its order.
function _M.create(db, amount, description)
  local id = "SHOP" .. os.date("!%Y%m%d") .. crypto.random_nonce(12)
  local res, err = db:exec("INSERT INTO orders (id, amount, description, "
    .. "created_at) VALUES ($1, $2, $3, $4)",
    { id, amount, description, math.floor(paygate.now()) })
  if not res then return nil, err end
  return { id = id, amount = amount, description = description,
           state = "NEW" }
end

--- syntax: ok, err = orders.set_code_url(db, id, code_url)
function _M.set_code_url(db, id, code_url)
  return db:exec("UPDATE orders SET code_url = $2, state = 'PAYING' "
                 .. "WHERE id = $1 AND state = 'NEW'", { id, code_url })
end

--- syntax: order, err = orders.get(db, id) -- nil, nil when unknown
function _M.get(db, id)
  local rows, err = db:query("SELECT " .. COLUMNS .. " FROM orders "
                             .. "WHERE id = $1", { id })
  if not rows then return nil, err end
  local o = rows[1]
  if not o then return nil end
  local n = assert(db:query("SELECT count(*) AS n FROM payments "
                            .. "WHERE order_id = $1", { id }))
  o.payments = n[1].n
  return o
end

--- syntax: result, err = orders.apply_payment(db, mchid, event)
-- Applies a TRANSACTION.SUCCESS notification exactly once, in one
-- transaction: the notification id is recorded, the payment inserted and
-- the order marked PAID together, or nothing is.
-- returns: "applied", "duplicate" (seen already: acknowledge again),
-- "ignored" (not a success: nothing to apply), or
-- nil, err (err.kind: unknown_order, mismatch, or a database kind): the
-- caller answers failure and WeChat sends it again later.
function _M.apply_payment(db, mchid, event)
  local r = event.resource or {}
  local amount = type(r.amount) == "table" and r.amount.total
  return db:transaction(function(tx)
    local seen = assert(tx:query("SELECT 1 FROM notifications WHERE id = $1",
                                 { event.id }))
    if seen[1] then return "duplicate" end
    local rows = assert(tx:query("SELECT id, amount, state FROM orders "
                                 .. "WHERE id = $1", { r.out_trade_no }))
    local o = rows[1]
    if not o then
      error(paygate.error("unknown_order", "no order "
                          .. tostring(r.out_trade_no)))
    end
    if r.mchid ~= mchid or amount ~= o.amount then
      error(paygate.error("mismatch", "order " .. o.id .. ": the "
        .. "notification's merchant or amount differs from the order's"))
    end
    local now = math.floor(paygate.now())
    assert(tx:exec("INSERT INTO notifications (id, event_type, order_id, "
      .. "received_at) VALUES ($1, $2, $3, $4)",
      { event.id, event.event_type, o.id, now }))
    if r.trade_state ~= "SUCCESS" then return "ignored" end
    -- a second notification id for a payment already applied (WeChat
    -- does not do that, but a replayed order must not be paid twice)
    local paid = assert(tx:query("SELECT 1 FROM payments WHERE order_id = $1",
                                 { o.id }))
    if paid[1] then return "duplicate" end
    assert(tx:exec("INSERT INTO payments (order_id, transaction_id, amount, "
      .. "applied_at) VALUES ($1, $2, $3, $4)",
      { o.id, r.transaction_id, amount, now }))
    assert(tx:exec("UPDATE orders SET state = 'PAID', transaction_id = $2, "
      .. "paid_amount = $3, paid_at = $4 WHERE id = $1",
      { o.id, r.transaction_id, amount, r.success_time }))
    return "applied"
  end)
end

return _M
