-- The console's payment search takes a refund's reference (the merchant's
-- return, RMA or ticket id, migration 013): customer service has that
-- number, not the payment's. 013's index leads with the payment, so it
-- serves no search by the reference alone: this one does (partial: most
-- refunds have none).
CREATE INDEX IF NOT EXISTS gw_refunds_reference_search
  ON gw_refunds (reference) WHERE reference IS NOT NULL;
