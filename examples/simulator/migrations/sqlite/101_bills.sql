-- Bills (sim/bills.lua). A bill is made from the orders and refunds of one
-- Beijing day, up to a cutoff: the day's end, or the moment the day was
-- closed early through POST /sim/bills/close. Made again on each download,
-- it comes out the same, so only what identifies it is stored.
CREATE TABLE sim_bill_days (
  bill_date   TEXT PRIMARY KEY,         -- YYYY-MM-DD (Beijing)
  cutoff      DOUBLE PRECISION NOT NULL -- epoch s: records up to it count
);

CREATE TABLE sim_bill_tokens (
  token       TEXT PRIMARY KEY,
  mchid       TEXT NOT NULL,            -- the merchant that asked
  sub_mchid   TEXT,                     -- partner mode: one sub-merchant
  kind        TEXT NOT NULL,            -- trade | fundflow
  bill_date   TEXT NOT NULL,
  bill_type   TEXT NOT NULL,            -- ALL.. (trade) / BASIC.. (fundflow)
  gzip        INTEGER NOT NULL,         -- 1: served gzip-compressed
  cutoff      DOUBLE PRECISION NOT NULL,
  sha1        TEXT NOT NULL,            -- of the uncompressed file
  expires_at  DOUBLE PRECISION NOT NULL
);
