-- A refund's payer_refund, fixed when it is made (the payer's share of an
-- order paid with a discount depends on the refunds made before it);
-- NULL on rows made before this column: computed from the refund alone.
ALTER TABLE sim_refunds ADD COLUMN payer_refund INTEGER;
