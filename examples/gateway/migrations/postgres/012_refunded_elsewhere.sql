-- Money of the payment refunded outside this gateway (in WeChat Pay's
-- merchant platform, by another system on the merchant number, or after
-- the backup the store was restored from): when it was first seen (epoch
-- seconds; NULL: never). Set once, by a query answer REFUND that no
-- refund here explains, a refund WeChat refused as more than what is left
-- of the order, or a bill's refund line of a number unknown here; the
-- payment's audit trail has the entry saying which. No state: the
-- payment's refunds and refunded total are what this gateway made.
ALTER TABLE gw_payments ADD COLUMN refunded_elsewhere_at DOUBLE PRECISION;
