-- Abnormal refunds are asked about again (the outcome of an application
-- through the abnormal-refund API must land without its notification).
-- Those made abnormal before this had their checks stopped: due now.
UPDATE gw_refunds SET next_check_at = 0
  WHERE state = 'abnormal' AND next_check_at IS NULL;
