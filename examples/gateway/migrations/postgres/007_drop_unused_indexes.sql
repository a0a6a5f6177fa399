-- Three indexes of 001 that no query reads any more: the reconciliation
-- finds what is due through 006's partial indexes (gw_payments_due,
-- gw_refunds_due), and nothing looks payments up by (state, expires_at)
-- (the console lists a state through gw_payments_state_created). Each
-- still cost every write that moves its columns: gw_payments_state an
-- entry moved on every change of state, so on every notification applied.
DROP INDEX IF EXISTS gw_payments_next_check;
DROP INDEX IF EXISTS gw_payments_state;
DROP INDEX IF EXISTS gw_refunds_next_check;
