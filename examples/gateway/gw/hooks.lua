-- gw.hooks: logic that lives in the gateway itself, run by the outbox
-- dispatcher after each state change committed (at least once: make them
-- idempotent; one that raises or returns nil, err is retried with
-- backoff, unless err.retryable is false: then the event is dead-lettered
-- at once. paygate.error(kind, msg) is not retryable: for "try again
-- later" return nil, paygate.error(kind, msg, { retryable = true })).
-- Edit this file (or a copy of examples/gateway): each function gets the
-- event
--   { id, subject (the payment id), type, payload = { type, payment,
--     refund?, at }, attempt }
-- docs/gateway.md (Writing a hook, Testing your hooks) has an example.
-- Event types: payment.paying, payment.paid, payment.closed,
-- payment.failed, payment.unknown, payment.refunded,
-- payment.partially_refunded, payment.late_paid, refund.succeeded,
-- refund.abnormal, refund.closed, refund.failed, alarm.amount_mismatch,
-- alarm.merchant_mismatch, alarm.order_mismatch, alarm.refunded_elsewhere
-- (on_alarm: the four alarms). A function under any
-- other name (a misspelt on_payed), or a file that does not load, stops
-- the gateway at start with one line: keep helpers local.
local _M = {}

-- function _M.on_paid(event) end                 -- payment.paid
-- function _M.on_refunded(event) end             -- refund.succeeded
-- _M["payment.closed"] = function(event) end     -- any type by its name

return _M
