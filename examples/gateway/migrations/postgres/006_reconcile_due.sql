-- The reconciliation's search for what is due (gw.reconcile) as index
-- range scans: open rows with a next check, by its time, and open rows
-- never checked, by their age. Without them every pass read every open
-- row (and every paid one with an old next check) to sort them: with many
-- open payments, tens of milliseconds per batch of checks. The WHERE
-- clauses are the queries' own, word for word (what lets SQLite use a
-- partial index). IF NOT EXISTS: on a big PostgreSQL store an operator
-- may build them first with CREATE INDEX CONCURRENTLY (the migration,
-- one transaction, would block writes to the tables while it builds).
CREATE INDEX IF NOT EXISTS gw_payments_due ON gw_payments (next_check_at)
  WHERE next_check_at IS NOT NULL
  AND state IN ('created', 'paying', 'unknown');
CREATE INDEX IF NOT EXISTS gw_payments_unchecked ON gw_payments (created_at)
  WHERE next_check_at IS NULL AND checks = 0
  AND state IN ('created', 'paying', 'unknown');
CREATE INDEX IF NOT EXISTS gw_refunds_due ON gw_refunds (next_check_at)
  WHERE next_check_at IS NOT NULL
  AND state IN ('created', 'processing', 'unknown', 'abnormal');
CREATE INDEX IF NOT EXISTS gw_refunds_unchecked ON gw_refunds (created_at)
  WHERE next_check_at IS NULL AND checks = 0
  AND state IN ('created', 'processing', 'unknown', 'abnormal');
