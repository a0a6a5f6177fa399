-- The merchant's own reference of a refund (its return, RMA or ticket
-- id: POST /v1/payments/{id}/refunds' `reference`; NULL when none was
-- given, and for the gateway's automatic refunds). A reference names one
-- refund of a payment: a second request with it (any Idempotency-Key,
-- any amount) is answered 409 refund_reference_used with the first, not
-- refunded again. This index is what keeps it so when two such requests
-- run at once: the second insert fails. Only the refunds that count hold
-- their reference: one that failed (WeChat refused it, or it was never
-- sent) or closed moved no money, and the same reference may be refunded
-- again. (The states spelt with <> and AND, not a NOT IN list: SQLite
-- checks the WHERE for the old and the new row of every state change,
-- and a list is a temporary table it builds each time: 009.)
ALTER TABLE gw_refunds ADD COLUMN reference TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS gw_refunds_reference
  ON gw_refunds (payment_id, reference)
  WHERE reference IS NOT NULL AND state <> 'failed' AND state <> 'closed';
