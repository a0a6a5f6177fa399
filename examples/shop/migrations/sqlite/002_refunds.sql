-- Refunds, one row per out_refund_no; amounts in fen. A refund is recorded
-- (PENDING) before WeChat hears of it, so its notification always finds it.
CREATE TABLE refunds (
  id           TEXT PRIMARY KEY,           -- our out_refund_no
  order_id     TEXT NOT NULL REFERENCES orders (id),
  amount       INTEGER NOT NULL CHECK (amount > 0),
  reason       TEXT,
  -- PENDING (sent or not: the outcome is not known), PROCESSING (WeChat took
  -- it), then WeChat's SUCCESS, CLOSED or ABNORMAL; FAILED: WeChat refused it
  state        TEXT NOT NULL DEFAULT 'PENDING',
  refund_id    TEXT,                       -- WeChat's, once it took it
  error        TEXT,                       -- why WeChat refused it (FAILED)
  success_time TEXT,                       -- WeChat's, once SUCCESS
  created_at   INTEGER NOT NULL            -- unix seconds
);
CREATE INDEX refunds_order_id ON refunds (order_id);

-- fen refunded (refunds SUCCESS); the order is REFUNDED once it is all of
-- paid_amount
ALTER TABLE orders ADD COLUMN refunded INTEGER NOT NULL DEFAULT 0;
