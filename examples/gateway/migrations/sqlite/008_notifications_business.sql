-- The console's payment page finds the notifications recorded about each
-- of the payment's attempts and refunds by their business key's start
-- (gw.console.pages, NOTES_SQL): a range of this index. Before it a
-- LIKE '%|<out_trade_no>|%' read the whole table (a day of every
-- notification) once per attempt and once per refund. BINARY, SQLite's
-- default: the range's byte order.
CREATE INDEX IF NOT EXISTS gw_notifications_business
  ON gw_notifications (business_key);
