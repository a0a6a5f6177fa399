-- The console's payment page finds the notifications recorded about each
-- of the payment's attempts and refunds by their business key's start
-- (gw.console.pages, NOTES_SQL): a range of this index. Before it a
-- LIKE '%|<out_trade_no>|%' read the whole table (a day of every
-- notification) once per attempt and once per refund. COLLATE "C": the
-- range is in byte order, as the query compares (the database's locale
-- order would not keep one prefix's keys together). IF NOT EXISTS: on a
-- big store an operator may build it first with CREATE INDEX
-- CONCURRENTLY (the migration, one transaction, would block the
-- notifications' inserts while it builds).
CREATE INDEX IF NOT EXISTS gw_notifications_business
  ON gw_notifications (business_key COLLATE "C");
