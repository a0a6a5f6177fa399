-- What the console shows of a payment beyond its state (gw.history):
-- the calls the gateway made to WeChat Pay, and the notifications it
-- refused (a signature that does not verify, a stale timestamp, ...) with
-- why. Times in epoch seconds; pruned by retention (gateway.retention).
CREATE TABLE gw_wechat_calls (
  id            INTEGER PRIMARY KEY AUTOINCREMENT,
  at            REAL NOT NULL,
  mchid         TEXT NOT NULL,
  method        TEXT NOT NULL,
  path          TEXT NOT NULL,              -- without the query
  outcome       TEXT NOT NULL,              -- ok, or the error's kind
  status        INTEGER,
  code          TEXT,                       -- WeChat's error code
  request_id    TEXT,
  attempts      INTEGER,
  ms            INTEGER NOT NULL,
  out_trade_no  TEXT,
  out_refund_no TEXT
);
CREATE INDEX gw_wechat_calls_at ON gw_wechat_calls (at);
CREATE INDEX gw_wechat_calls_trade ON gw_wechat_calls (out_trade_no)
  WHERE out_trade_no IS NOT NULL;
CREATE INDEX gw_wechat_calls_refund ON gw_wechat_calls (out_refund_no)
  WHERE out_refund_no IS NOT NULL;

CREATE TABLE gw_notifications_refused (
  id              INTEGER PRIMARY KEY AUTOINCREMENT,
  received_at     REAL NOT NULL,
  mchid           TEXT NOT NULL,
  kind            TEXT NOT NULL,            -- the refusal's error kind
  reason          TEXT NOT NULL,            -- its message
  serial          TEXT,                     -- Wechatpay-Serial header
  timestamp       TEXT,                     -- Wechatpay-Timestamp header
  notification_id TEXT,                     -- claimed (unverified)
  event_type      TEXT,                     -- claimed (unverified)
  authentic       INTEGER NOT NULL,         -- 1: resource decrypted
  out_trade_no    TEXT,                     -- only when authentic
  out_refund_no   TEXT
);
CREATE INDEX gw_notifications_refused_at
  ON gw_notifications_refused (received_at);
CREATE INDEX gw_notifications_refused_trade
  ON gw_notifications_refused (out_trade_no) WHERE out_trade_no IS NOT NULL;
CREATE INDEX gw_notifications_refused_refund
  ON gw_notifications_refused (out_refund_no) WHERE out_refund_no IS NOT NULL;
