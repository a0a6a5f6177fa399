-- A refund's amount.from as the request gave it (JSON text; NULL when
-- the request had none): the refund answers echo it.
ALTER TABLE sim_refunds ADD COLUMN amount_from TEXT;
