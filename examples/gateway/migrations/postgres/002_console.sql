-- The console's reads: payments newest first with keyset paging
-- (created_at, id), also within a state, and the search by transaction_id.
CREATE INDEX gw_payments_created ON gw_payments (created_at, id);
CREATE INDEX gw_payments_state_created ON gw_payments (state, created_at, id);
CREATE INDEX gw_payments_transaction ON gw_payments (transaction_id)
  WHERE transaction_id IS NOT NULL;
CREATE INDEX gw_attempts_transaction ON gw_attempts (transaction_id)
  WHERE transaction_id IS NOT NULL;
