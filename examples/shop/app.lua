-- examples/shop: a tiny merchant app selling by WeChat Pay native
-- payment (a QR code), written the way a paygate user would write one.
--
--   paygate run examples/shop --listen 127.0.0.1:8080 --config shop.conf
--
-- shop.conf (a Lua file):
--   return {
--     shop = { db = "sqlite:/var/lib/shop/shop.db",
--              public_url = "https://shop.example.com",   -- notify_url base
--              appid = "wx..." },
--     wechatpay = { mchid = "...", merchant_private_key = "...", ... },
--   }
--
--   POST /orders {"amount": 100, "description": "..."}  -> 201 {id, code_url}
--   GET  /orders/:id                          -> the order, with its refunds
--   POST /orders/:id/refunds {"amount": 50, "reason": "..."}
--                                             -> 201 the refund (PROCESSING)
--   POST /orders/:id/refunds/:refund_id/retry -> sends a PENDING one again
--   POST /wechatpay/notify/:mchid             -> WeChat's callbacks
local paygate = require "paygate"
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local wechatpay = require "paygate.wechatpay"
local json = require "paygate.json"
local utf8 = require "paygate.utf8"
local orders = require "shop.orders"
local refunds = require "shop.refunds"

local conf = paygate.config_copy()
local shop = assert(conf.shop, "shop.conf: the shop table is missing")

-- top level: runs once per worker, in a coroutine, so it may wait
local db = assert(sql.open(shop.db))
assert(migrate.run(db, paygate.app_dir .. "/migrations"))
local wx = assert(wechatpay.client(conf.wechatpay))
local MCHID = conf.wechatpay.mchid
local NOTIFY_URL = shop.public_url .. "/wechatpay/notify/" .. MCHID

paygate.route("POST", "/orders", function(req)
  local p = req:json()
  if type(p) ~= "table" or type(p.amount) ~= "number" or p.amount < 1
     or p.amount % 1 ~= 0 or p.amount > 1e10 then
    return 400, { error = "amount must be a positive integer (fen)" }
  end
  local desc = type(p.description) == "string" and p.description or "shop"
  local order, err = orders.create(db, p.amount, desc)
  if not order then return 503, { error = err.kind } end
  local data
  data, err = wx:native_prepay{
    appid = shop.appid, description = desc, out_trade_no = order.id,
    notify_url = NOTIFY_URL, amount = { total = order.amount },
  }
  if not data then
    -- unknown_outcome / unverified_response: WeChat may hold the order;
    -- the client asks again with the same id (a repeat is idempotent)
    paygate.log.warn("prepay failed", { order = order.id, kind = err.kind })
    return 502, { id = order.id, error = err.kind }
  end
  assert(orders.set_code_url(db, order.id, data.code_url))
  return 201, { id = order.id, code_url = data.code_url, state = "PAYING" }
end)

paygate.route("GET", "/orders/:id", function(req)
  local o, err = orders.get(db, req.params.id)
  if err then return 503, { error = err.kind } end
  if not o then return 404, { error = "not_found" } end
  local list
  list, err = refunds.of_order(db, o.id)
  if not list then return 503, { error = err.kind } end
  o.refunds = #list > 0 and list or json.empty_array
  return 200, o
end)

-- Asks WeChat for a refund recorded here, under its own id as out_refund_no:
-- the same out_refund_no with the same body is one refund at WeChat however
-- often it is sent, so a refund whose outcome is unknown is sent again as is.
local function send_refund(r, total)
  local data, err = wx:refund{
    out_trade_no = r.order_id, out_refund_no = r.id, reason = r.reason,
    notify_url = NOTIFY_URL,
    amount = { refund = r.amount, total = total, currency = "CNY" },
  }
  if data then
    assert(refunds.accepted(db, r.id, data.refund_id))
    return 201, assert(refunds.get(db, r.id))
  end
  paygate.log.warn("refund failed", { refund = r.id, kind = err.kind })
  if err.retryable or err.kind == "unknown_outcome"
     or err.kind == "unverified_response" then
    -- WeChat may have taken it: it stays PENDING and counts; the client
    -- sends it again (POST .../retry), WeChat refunds it once
    return 503, { id = r.id, state = "PENDING", error = err.kind }
  end
  -- WeChat refused it (not_enough, invalid_request...): nothing refunded
  assert(refunds.refused(db, r.id, err.kind))
  return 502, { id = r.id, state = "FAILED", error = err.kind }
end

local REFUSED = { not_found = 404, not_paid = 409, invalid_amount = 400,
                  refund_exceeds_paid = 422, refund_limit = 422 }

paygate.route("POST", "/orders/:id/refunds", function(req)
  local p = req:json()
  if type(p) ~= "table" or type(p.amount) ~= "number" or p.amount < 1
     or p.amount % 1 ~= 0 then
    return 400, { error = "amount must be a positive integer (fen)" }
  end
  if p.reason ~= nil and (type(p.reason) ~= "string"
                          or not utf8.len(p.reason) or #p.reason == 0
                          or utf8.len(p.reason) > 80) then
    return 400, { error = "reason must be text of 1 to 80 characters" }
  end
  local o, err = orders.get(db, req.params.id)
  if err then return 503, { error = err.kind } end
  if not o then return 404, { error = "not_found" } end
  local r
  r, err = refunds.create(db, o.id, p.amount, p.reason)
  if not r then
    local status = REFUSED[err.kind]
    if not status then return 503, { error = err.kind } end
    return status, { error = err.kind, message = err.message,
                     refundable = err.refundable }
  end
  return send_refund(r, o.amount)
end)

paygate.route("POST", "/orders/:id/refunds/:refund_id/retry", function(req)
  local r, err = refunds.get(db, req.params.refund_id)
  if err then return 503, { error = err.kind } end
  if not r or r.order_id ~= req.params.id then
    return 404, { error = "not_found" }
  end
  if r.state ~= "PENDING" then                -- sent and answered already
    return 409, { error = "not_pending", refund = r }
  end
  local o
  o, err = orders.get(db, r.order_id)
  if not o then return 503, { error = err and err.kind or "not_found" } end
  return send_refund(r, o.amount)
end)

paygate.route("POST", "/wechatpay/notify/:mchid", function(req)
  if req.params.mchid ~= MCHID then return 404, { error = "not_found" } end
  local event, err = wx:parse_notification(req)       -- never raises
  if not event then
    paygate.log.warn("notification refused", { kind = err.kind })
    return wechatpay.notify_fail(err.kind)            -- WeChat sends it again
  end
  local result
  if event.event_type == "TRANSACTION.SUCCESS" then
    result, err = orders.apply_payment(db, MCHID, event)
  elseif event.event_type:find("^REFUND%.") then
    result, err = refunds.apply_notification(db, MCHID, event)
  else
    return wechatpay.notify_ack()                     -- nothing of ours
  end
  if not result then
    paygate.log.warn("notification not applied", { id = event.id,
                                                   kind = err.kind })
    return wechatpay.notify_fail(err.kind)
  end
  paygate.log.info("notification " .. result, { id = event.id })
  return wechatpay.notify_ack()                       -- 204: durable now
end)
