-- 002's index of gw_payments by transaction_id served one query, the
-- console's search, and every paid payment's transaction_id is also its
-- paid attempt's (gw.apply sets both in one transaction,
-- gw.notify_atomic in one write job), which gw_attempts_transaction
-- finds: the search reads that one now. WeChat's transaction ids come in no order, so each
-- notification applied wrote a leaf page of this index at a place of its
-- own (on SQLite, about a tenth of what a notification writes).
-- A payment marked paid whose paid attempt (its current one when none is
-- named) lacks the id gets it copied first, so the search still finds it.
UPDATE gw_attempts SET transaction_id = (SELECT p.transaction_id
  FROM gw_payments p WHERE p.id = gw_attempts.payment_id)
  WHERE transaction_id IS NULL AND EXISTS (SELECT 1 FROM gw_payments p
    WHERE p.id = gw_attempts.payment_id
      AND COALESCE(p.paid_out_trade_no, p.out_trade_no)
          = gw_attempts.out_trade_no
      AND p.transaction_id IS NOT NULL);
DROP INDEX IF EXISTS gw_payments_transaction;
