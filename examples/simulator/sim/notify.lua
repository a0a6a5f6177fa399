-- sim.notify: notification delivery (owned by simB; this file is the
-- interface the rest of the simulator calls, with a placeholder body).
--
-- notify.enqueue(tx, n) -> true, or nil, err
--   Called INSIDE the transaction that changes an order or a refund (tx is
--   that paygate.sql transaction), so the notification is recorded exactly
--   when the change commits. n = {
--     mchid          the configured merchant whose APIv3 key encrypts and
--                    whose verifier mode picks the signature (the service
--                    provider's sp_mchid in partner mode)
--     sub_mchid      partner mode only: the sub-merchant
--     notify_url     the order's (or refund's) notify_url
--     event_type     "TRANSACTION.SUCCESS" | "REFUND.SUCCESS" |
--                    "REFUND.ABNORMAL" | "REFUND.CLOSED"
--     summary        "支付成功" | "退款成功" | "退款异常" | "退款关闭"
--     resource_type  "encrypt-resource"
--     original_type  "transaction" | "refund" (also the AAD)
--     resource       the plaintext resource (a Lua table: the Transaction
--                    or the refund object of a notification)
--     out_trade_no, out_refund_no   for the control API's listing
--   }
--   Returning nil, err rolls the caller's transaction back.
--
-- notify.start(ctx)
--   Called once per worker after the app has loaded (from a spawned task,
--   so it may yield). ctx = { db = paygate.sql handle, config = the checked
--   config (sim.config), identity = sim.identity (sign_headers,
--   encrypt_resource), faults = sim.faults }.
--
-- notify.routes(ctx) (optional)
--   Registers GET /sim/notifications and any other control route.
local _M = {}

function _M.enqueue(tx, n)
  if type(n) ~= "table" or type(n.event_type) ~= "string" then
    error("notify.enqueue: n must be a notification table", 2)
  end
  return true      -- placeholder until delivery is merged (simB)
end

function _M.start(ctx) return true end

function _M.routes(ctx) return true end

return _M
