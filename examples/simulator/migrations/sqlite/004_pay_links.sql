-- What each prepay handed out, for the payer's client to pay through
-- (POST /sim/pay): the prepay_id (JSAPI, APP), the code_url (NATIVE) or
-- the h5_url (MWEB), with when it was made (a prepay_id and a code_url
-- work for prepay_ttl seconds, an h5_url for h5_url_ttl). Every prepay
-- of an order, re-entries too, adds one. Orders made before this table
-- have none: only the control API's pay by out_trade_no pays them.
CREATE TABLE sim_pay_links (
  id          INTEGER PRIMARY KEY,
  order_id    INTEGER NOT NULL REFERENCES sim_orders (id),
  prepay_id   TEXT NOT NULL UNIQUE,
  url         TEXT,                   -- the code_url or h5_url handed out
  created_at  REAL NOT NULL           -- epoch s
);
CREATE INDEX sim_pay_links_url ON sim_pay_links (url);
