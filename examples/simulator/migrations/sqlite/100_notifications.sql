-- Notifications the simulator sends (sim/notify.lua): one row per
-- notification, one row per delivery attempt. Times are epoch seconds.
CREATE TABLE sim_notifications (
  seq           INTEGER PRIMARY KEY AUTOINCREMENT, -- enqueue order
  id            TEXT NOT NULL UNIQUE,   -- the notification id (same on retries)
  mchid         TEXT NOT NULL,
  notify_url    TEXT NOT NULL,
  event_type    TEXT NOT NULL,          -- TRANSACTION.SUCCESS, REFUND.*
  summary       TEXT NOT NULL,
  original_type TEXT NOT NULL,          -- transaction | refund (also the AAD)
  resource      TEXT NOT NULL,          -- the plaintext resource, JSON
  body          TEXT,                   -- the envelope sent (encrypted at the
                                        -- first attempt; every retry sends it)
  create_time   TEXT NOT NULL,          -- RFC 3339, +08:00
  created_at    DOUBLE PRECISION NOT NULL,
  -- pending: due at next_at; held: out-of-order fault, waits for a later
  -- one (or next_at); delivered; failed: gave up after the last retry;
  -- dropped: the never-sent fault
  state         TEXT NOT NULL,
  attempts      INTEGER NOT NULL DEFAULT 0,
  next_at       DOUBLE PRECISION NOT NULL,
  duplicates    INTEGER NOT NULL DEFAULT 0,  -- extra deliveries still owed
  sig_fault     TEXT,                   -- signature fault for the next attempt
  faults        TEXT,                   -- JSON list of the faults applied
  done_at       DOUBLE PRECISION
);
CREATE INDEX sim_notifications_due ON sim_notifications (state, next_at);

CREATE TABLE sim_notification_attempts (
  notification_id TEXT NOT NULL,
  n             INTEGER NOT NULL,       -- 1 = the first delivery
  at            DOUBLE PRECISION NOT NULL,
  status        INTEGER,                -- the receiver's status, if any
  error         TEXT,                   -- no answer: timeout, connect, ...
  latency       DOUBLE PRECISION,       -- seconds until the answer
  timestamp     TEXT,                   -- Wechatpay-Timestamp sent
  nonce         TEXT,                   -- Wechatpay-Nonce sent
  serial        TEXT,                   -- Wechatpay-Serial sent
  fault         TEXT,                   -- signature fault carried, if any
  duplicate     INTEGER NOT NULL DEFAULT 0,  -- 1: a duplicate delivery
  worker        INTEGER,                -- pid of the worker that sent it
  PRIMARY KEY (notification_id, n)
);
