-- An entry is two balanced lines written with it (domain.ledger's templates). The balance
-- check allowed more lines later, balanced between themselves: an old entry's money changed
-- under its posting key and time, an UPDATE by another name. And it read `ledger_lines` by
-- the session's search path, where a temporary table of that name (the runtime role may
-- create them, for reconciliation's staging) comes first and hid an unbalanced entry.
CREATE OR REPLACE FUNCTION ledger_entry_balances() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(*) FROM ledger_lines WHERE entry_id = NEW.entry_id) <> 2 OR EXISTS (
        SELECT 1 FROM ledger_lines WHERE entry_id = NEW.entry_id
        GROUP BY currency HAVING sum(debit) <> sum(credit)
    ) THEN
        RAISE EXCEPTION 'ledger entry % is not two balanced lines', NEW.entry_id;
    END IF;
    RETURN NULL;
END $$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION ledger_entry_balances() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END $$;
