-- The console's list of a service provider's payments by sub-merchant
-- (/console/payments?sub_mchid=), newest first with keyset paging
-- (created_at, id), as 002's index serves the whole list. Partial: a
-- direct merchant's payments have no sub_mchid.
CREATE INDEX IF NOT EXISTS gw_payments_sub_mchid_created
  ON gw_payments (sub_mchid, created_at, id) WHERE sub_mchid IS NOT NULL;
