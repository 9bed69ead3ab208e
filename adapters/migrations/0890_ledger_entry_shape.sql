-- An entry is two balanced lines written with it (domain.ledger's templates). The balance
-- check allowed more lines later, balanced between themselves: an old entry's money changed
-- under its posting key and time, an UPDATE by another name. And it read `ledger_lines` by
-- the session's search path, where a temporary table of that name (the runtime role may
-- create them, for reconciliation's staging) comes first and hid an unbalanced entry. It now
-- reads the table its trigger fired on, by schema, under a search path of its own.
CREATE OR REPLACE FUNCTION ledger_entry_balances() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lines bigint;
    unbalanced boolean;
BEGIN
    EXECUTE format('SELECT (SELECT count(*) FROM %1$I.ledger_lines WHERE entry_id = $1),'
                   ' EXISTS (SELECT 1 FROM %1$I.ledger_lines WHERE entry_id = $1'
                   '         GROUP BY currency HAVING sum(debit) <> sum(credit))', TG_TABLE_SCHEMA)
        INTO lines, unbalanced USING NEW.entry_id;
    IF lines <> 2 OR unbalanced THEN
        RAISE EXCEPTION 'ledger entry % is not two balanced lines', NEW.entry_id;
    END IF;
    RETURN NULL;
END $$;
