-- The gateway's tables (SQLite). Money in fen (integers), times in epoch
-- seconds (created_at, updated_at, closed_at, notified_at with their
-- fraction). state / version belong to paygate.fsm (fsm.payment,
-- fsm.refund): nothing else writes them.
CREATE TABLE gw_payments (
  id             TEXT PRIMARY KEY,          -- pay_ + random
  app_id         TEXT NOT NULL,             -- the merchant system (apikey)
  order_id       TEXT NOT NULL,             -- the caller's business id
  mchid          TEXT NOT NULL,             -- mchid, or sp_mchid (partner)
  sub_mchid      TEXT,
  appid          TEXT NOT NULL,
  channel        TEXT NOT NULL,             -- the current attempt's
  amount         INTEGER NOT NULL,
  currency       TEXT NOT NULL,
  description    TEXT NOT NULL,
  attach         TEXT,
  state          TEXT NOT NULL,
  version        INTEGER NOT NULL,
  out_trade_no   TEXT NOT NULL,             -- the current attempt's
  attempt        INTEGER NOT NULL,
  transaction_id TEXT,
  paid_out_trade_no TEXT,                   -- the attempt the money is on
  refunded       INTEGER NOT NULL DEFAULT 0,
  payer_total    INTEGER,
  -- late: 1 when paid on a closed or superseded attempt
  late           INTEGER NOT NULL DEFAULT 0,
  expires_at     INTEGER NOT NULL,
  created_at     REAL NOT NULL,
  updated_at     REAL NOT NULL,
  notified_at    REAL,
  next_check_at  INTEGER,
  checks         INTEGER NOT NULL DEFAULT 0,
  UNIQUE (app_id, order_id)
);
CREATE INDEX gw_payments_next_check ON gw_payments (next_check_at)
  WHERE next_check_at IS NOT NULL;
CREATE INDEX gw_payments_state ON gw_payments (state, expires_at);

CREATE TABLE gw_attempts (
  out_trade_no TEXT PRIMARY KEY,            -- <payment id>_<n>: never reused
  payment_id   TEXT NOT NULL REFERENCES gw_payments (id),
  n            INTEGER NOT NULL,
  channel      TEXT NOT NULL,
  state        TEXT NOT NULL,               -- open, closed, superseded, paid
  prepay       TEXT,                        -- JSON: what was handed out
  transaction_id TEXT,
  created_at   REAL NOT NULL,
  closed_at    REAL,
  UNIQUE (payment_id, n)
);

CREATE TABLE gw_refunds (
  id            TEXT PRIMARY KEY,           -- ref_ + random
  payment_id    TEXT NOT NULL REFERENCES gw_payments (id),
  out_refund_no TEXT NOT NULL UNIQUE,
  -- out_trade_no: the attempt whose money it returns
  out_trade_no  TEXT NOT NULL,
  kind          TEXT NOT NULL,              -- merchant, late_payment, duplicate
  refund_id     TEXT,
  amount        INTEGER NOT NULL,
  reason        TEXT,
  -- request_key: <app>|<Idempotency-Key> of the POST that made it
  request_key   TEXT UNIQUE,
  state         TEXT NOT NULL,
  version       INTEGER NOT NULL,
  created_at    REAL NOT NULL,
  updated_at    REAL NOT NULL,
  next_check_at INTEGER,
  checks        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX gw_refunds_payment ON gw_refunds (payment_id, created_at);
CREATE INDEX gw_refunds_next_check ON gw_refunds (next_check_at)
  WHERE next_check_at IS NOT NULL;

CREATE TABLE gw_notifications (
  id           TEXT PRIMARY KEY,            -- WeChat's notification id
  event_type   TEXT NOT NULL,
  business_key TEXT,
  received_at  INTEGER NOT NULL,
  outcome      TEXT NOT NULL                -- applied, duplicate, alarm, ...
);
CREATE INDEX gw_notifications_received ON gw_notifications (received_at);

CREATE TABLE gw_notification_effects (
  -- key: pay|<mchid or sp/sub>|<out_trade_no>|<trade_state>, or
  -- refund|<out_refund_no>|<refund_status>
  key             TEXT PRIMARY KEY,
  notification_id TEXT NOT NULL,     -- or query:<...> when a query applied it
  applied_at      INTEGER NOT NULL
);
CREATE INDEX gw_notification_effects_applied
  ON gw_notification_effects (applied_at);
