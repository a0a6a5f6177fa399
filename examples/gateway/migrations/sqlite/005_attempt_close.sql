-- An attempt closed or superseded here stays payable at WeChat until its
-- close there succeeds. close_check_at: while WeChat has not confirmed
-- that close, when the payment checks next ask about the attempt (closed
-- there, or money taken on it applied as a late payment); NULL once it is
-- confirmed. close_checks: how often they asked (their backoff).
ALTER TABLE gw_attempts ADD COLUMN close_check_at INTEGER;
ALTER TABLE gw_attempts ADD COLUMN close_checks INTEGER NOT NULL DEFAULT 0;
CREATE INDEX gw_attempts_close_check ON gw_attempts (close_check_at)
  WHERE close_check_at IS NOT NULL;
-- Attempts closed or superseded before this: whether WeChat closed them
-- is not known. Those of payments not yet expired (so possibly still
-- payable, or paid with the notification lost) are asked about now.
UPDATE gw_attempts SET close_check_at = 0
  WHERE state IN ('closed', 'superseded') AND payment_id IN (
    SELECT id FROM gw_payments
    WHERE expires_at > CAST(strftime('%s', 'now') AS INTEGER) - 86400);
