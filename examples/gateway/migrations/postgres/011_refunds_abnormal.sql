-- The refunds WeChat could not pay back (abnormal), for the console's
-- overview, newest first: they wait for a person (an application through
-- the abnormal-refund API, or the merchant platform), and the overview
-- lists them without reading every refund ever made. Few rows: a refund
-- leaves it once the application ends (succeeded or closed).
CREATE INDEX IF NOT EXISTS gw_refunds_abnormal ON gw_refunds (updated_at)
  WHERE state = 'abnormal';
