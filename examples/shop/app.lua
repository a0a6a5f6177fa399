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
--   GET  /orders/:id                                    -> the order
--   POST /wechatpay/notify/:mchid                       -> WeChat's callbacks
local paygate = require "paygate"
local sql = require "paygate.sql"
local migrate = require "paygate.migrate"
local wechatpay = require "paygate.wechatpay"
local orders = require "shop.orders"

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
  return 200, o
end)

paygate.route("POST", "/wechatpay/notify/:mchid", function(req)
  if req.params.mchid ~= MCHID then return 404, { error = "not_found" } end
  local event, err = wx:parse_notification(req)       -- never raises
  if not event then
    paygate.log.warn("notification refused", { kind = err.kind })
    return wechatpay.notify_fail(err.kind)            -- WeChat sends it again
  end
  if event.event_type ~= "TRANSACTION.SUCCESS" then
    return wechatpay.notify_ack()                     -- refunds: not sold here
  end
  local result
  result, err = orders.apply_payment(db, MCHID, event)
  if not result then
    paygate.log.warn("notification not applied", { id = event.id,
                                                   kind = err.kind })
    return wechatpay.notify_fail(err.kind)
  end
  paygate.log.info("notification " .. result, { id = event.id })
  return wechatpay.notify_ack()                       -- 204: durable now
end)
