-- A reissue request reads the breaks raised on every case of its request's family (a
-- duplicate refund, or a refund the provider shows succeeded for a case shown failed,
-- refuses it), of every class: an index on the case's chain replaces 0910's duplicates-only one.
DROP INDEX IF EXISTS reconciliation_breaks_duplicates;
CREATE INDEX reconciliation_breaks_chain ON reconciliation_breaks (chain);
