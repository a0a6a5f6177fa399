-- 006's partial indexes again, their "open" test spelled as ORs (SQLite
-- only: PostgreSQL keeps 006's). SQLite checks a partial index's WHERE
-- for the old and the new row of every write that moves its columns, and
-- an IN of three or more constants is a temporary table it builds and
-- drops each time a statement runs: every state change of a payment or a
-- refund (the fsm's UPDATE ... SET state) built two of them, about a
-- tenth of a notification's work. An OR of equalities is checked in
-- place. The reconciliation's due queries (gw.reconcile) spell it the
-- same way, word for word: that is what lets SQLite use the index.
DROP INDEX IF EXISTS gw_payments_due;
CREATE INDEX gw_payments_due ON gw_payments (next_check_at)
  WHERE next_check_at IS NOT NULL
  AND (state = 'created' OR state = 'paying' OR state = 'unknown');
DROP INDEX IF EXISTS gw_payments_unchecked;
CREATE INDEX gw_payments_unchecked ON gw_payments (created_at)
  WHERE next_check_at IS NULL AND checks = 0
  AND (state = 'created' OR state = 'paying' OR state = 'unknown');
DROP INDEX IF EXISTS gw_refunds_due;
CREATE INDEX gw_refunds_due ON gw_refunds (next_check_at)
  WHERE next_check_at IS NOT NULL
  AND (state = 'created' OR state = 'processing' OR state = 'unknown'
       OR state = 'abnormal');
DROP INDEX IF EXISTS gw_refunds_unchecked;
CREATE INDEX gw_refunds_unchecked ON gw_refunds (created_at)
  WHERE next_check_at IS NULL AND checks = 0
  AND (state = 'created' OR state = 'processing' OR state = 'unknown'
       OR state = 'abnormal');
