"""The ledger: balanced two-line entries, posted once per posting key, in the accounts
of their template (`domain.ledger`). Append-only in the database (migration 0740)."""


from adapters.db.audit import AuditLog
from adapters.db.database import Conn, Repository
from adapters.db.rows import LedgerLineRow
from domain.ledger import ledger_lines
from domain.models import LedgerInput, LedgerResult


class LedgerRepository(Repository):
    """Entries and their lines; an entry is never changed, only posted once more by key."""

    async def post(self, posting: LedgerInput) -> LedgerResult:
        """Posts a balanced two-line entry once per posting key."""
        async with self._db.transaction() as conn:
            await conn.execute("SET LOCAL lock_timeout = '5s'")  # fail fast, let Temporal retry
            return await self.post_in(conn, posting)

    @staticmethod
    async def post_in(conn: Conn, posting: LedgerInput) -> LedgerResult:
        """`post` inside the caller's transaction (a compensating entry commits with
        the decision that approved it)."""
        key = posting.posting_key()
        cur = await conn.execute(
            "INSERT INTO ledger_entries (posting_key, refund_request_id, template)"
            " VALUES (%s,%s,%s) ON CONFLICT (posting_key) DO NOTHING RETURNING id",
            (key, posting.refund_request_id, posting.kind.value))
        row = await cur.fetchone()
        if row is None:
            cur = await conn.execute("SELECT id FROM ledger_entries WHERE posting_key = %s", (key,))
            existing = await cur.fetchone()
            assert existing is not None
            return LedgerResult(posting_key=key, entry_id=existing["id"], newly_posted=False)
        entry_id = int(row["id"])
        await conn.cursor().executemany(
            "INSERT INTO ledger_lines (entry_id, account, debit, credit, currency)"
            " VALUES (%s,%s,%s,%s,%s)",
            [(entry_id, line.account, line.debit, line.credit, line.currency)
             for line in ledger_lines(posting)])
        await AuditLog.append(conn, posting.refund_request_id, "ledger", "ledger_posted",
                              {"posting_key": key, "entry_id": entry_id,
                               "template": posting.kind.value, "amount": posting.amount,
                               "currency": posting.currency,
                               "provider_refund_id": posting.provider_refund_id})
        return LedgerResult(posting_key=key, entry_id=entry_id, newly_posted=True)

    async def entries(self, case_id: str) -> list[LedgerLineRow]:
        """The case's journal, line by line, in posting order."""
        return [LedgerLineRow.from_row(row) for row in await self._db.fetch_all(
            "SELECT e.posting_key, e.template, l.account, l.debit, l.credit, l.currency"
            " FROM ledger_entries e JOIN ledger_lines l ON l.entry_id = e.id"
            " WHERE e.refund_request_id = %s ORDER BY e.id, l.id", (case_id,))]
