-- Orders, one row per out_trade_no; amounts in fen.
CREATE TABLE orders (
  id             TEXT PRIMARY KEY,          -- our out_trade_no
  amount         INTEGER NOT NULL CHECK (amount > 0),
  description    TEXT NOT NULL,
  state          TEXT NOT NULL DEFAULT 'NEW',  -- NEW, PAYING, PAID
  code_url       TEXT,                      -- the QR code's content
  transaction_id TEXT,                      -- WeChat's, once paid
  paid_amount    INTEGER,                   -- fen WeChat says the payer paid
  paid_at        TEXT,                      -- WeChat's success_time
  created_at     INTEGER NOT NULL           -- unix seconds
);

-- Every notification applied, by WeChat's notification id: a retry of one
-- carries the same id and finds it here.
CREATE TABLE notifications (
  id          TEXT PRIMARY KEY,
  event_type  TEXT NOT NULL,
  order_id    TEXT NOT NULL,
  received_at INTEGER NOT NULL
);

-- The payments applied to orders: at most one per order, however many
-- times WeChat tells us.
CREATE TABLE payments (
  order_id       TEXT PRIMARY KEY REFERENCES orders (id),
  transaction_id TEXT NOT NULL,
  amount         INTEGER NOT NULL,
  applied_at     INTEGER NOT NULL
);
