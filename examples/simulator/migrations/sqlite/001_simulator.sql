-- The simulator's own state (simA owns versions 001-099; notifications and
-- bills, simB, use 100 and up).

-- Platform keys: certificates (kind 'certificate', id = serial) and the
-- WeChat Pay public key (kind 'public_key', id = PUB_KEY_ID_...). A test
-- tool's keys: the private key is kept here, under state_dir.
CREATE TABLE sim_platform_keys (
  id          TEXT PRIMARY KEY,
  kind        TEXT NOT NULL,          -- certificate | public_key
  algo        TEXT NOT NULL,          -- RSA | SM2
  key_pem     TEXT NOT NULL,
  cert_pem    TEXT,                   -- certificates only
  not_before  REAL,                   -- epoch s (certificates)
  not_after   REAL,
  use_from    REAL NOT NULL DEFAULT 0,-- responses are signed with it from then
  created_at  REAL NOT NULL
);

-- Orders. owner = the merchant that owns the out_trade_no: the direct
-- merchant, or the sub-merchant in partner mode (sp_mchid set).
CREATE TABLE sim_orders (
  id             INTEGER PRIMARY KEY,
  owner          TEXT NOT NULL,
  sp_mchid       TEXT,
  appid          TEXT NOT NULL,       -- appid, or sp_appid in partner mode
  sub_appid      TEXT,
  out_trade_no   TEXT NOT NULL,
  trade_type     TEXT NOT NULL,       -- JSAPI | APP | MWEB | NATIVE
  trade_state    TEXT NOT NULL,
  transaction_id TEXT UNIQUE,
  prepay_id      TEXT,
  description    TEXT NOT NULL,
  attach         TEXT,
  notify_url     TEXT NOT NULL,
  total          INTEGER NOT NULL,    -- fen
  currency       TEXT NOT NULL,
  payer_total    INTEGER,
  refunded       INTEGER NOT NULL DEFAULT 0, -- fen taken by refunds not closed
  openid         TEXT,                -- payer.openid / sp_openid
  sub_openid     TEXT,
  bank_type      TEXT,
  time_expire    REAL,                -- epoch s
  params_hash    TEXT NOT NULL,       -- re-entry check
  request        TEXT NOT NULL,       -- the first prepay body (JSON)
  created_at     REAL NOT NULL,
  success_at     REAL,
  closed_at      REAL,
  UNIQUE (owner, out_trade_no)
);

CREATE TABLE sim_refunds (
  id             INTEGER PRIMARY KEY,
  owner          TEXT NOT NULL,
  sp_mchid       TEXT,
  order_id       INTEGER NOT NULL REFERENCES sim_orders (id),
  refund_id      TEXT NOT NULL UNIQUE,
  out_refund_no  TEXT NOT NULL,
  status         TEXT NOT NULL,       -- PROCESSING | SUCCESS | ABNORMAL | CLOSED
  refund         INTEGER NOT NULL,    -- fen
  total          INTEGER NOT NULL,
  currency       TEXT NOT NULL,
  reason         TEXT,
  notify_url     TEXT,
  funds_account  TEXT,
  params_hash    TEXT NOT NULL,
  created_at     REAL NOT NULL,
  success_at     REAL,
  settle_after   REAL,                -- epoch s: settles by itself then
  abnormal_applied INTEGER NOT NULL DEFAULT 0,
  UNIQUE (owner, out_refund_no)
);
CREATE INDEX sim_refunds_order ON sim_refunds (order_id);
CREATE INDEX sim_refunds_settle ON sim_refunds (status, settle_after);
