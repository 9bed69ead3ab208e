-- A reissue request reads the duplicate refunds raised on its case and the cases it reissues
-- (a duplicate that moved the request's money refuses it): a small partial index keeps that
-- read off the table's other breaks.
CREATE INDEX reconciliation_breaks_duplicates ON reconciliation_breaks (chain)
    WHERE break_class = 'duplicate_refund';
