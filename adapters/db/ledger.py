"""The ledger: balanced two-line entries, posted once per posting key, in the accounts
of their template (`domain.ledger`). Append-only in the database (migration 0740)."""


import logging
from datetime import datetime

from adapters.db.audit import AuditLog
from adapters.db.database import Conn, Repository
from adapters.db.outbox import OutboxRepository
from adapters.db.rows import LedgerLineRow
from domain.ledger import PROVIDER_ACCOUNT, ledger_lines
from domain.models import LedgerInput, LedgerKind, LedgerResult, NoticeInput, RefundMethod

log = logging.getLogger(__name__)


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
            await LedgerRepository._told_if_other(conn, posting, int(existing["id"]))
            return LedgerResult(posting_key=key, entry_id=existing["id"], newly_posted=False)
        entry_id = int(row["id"])
        by_bank = await LedgerRepository._by_bank(conn, posting)
        await conn.cursor().executemany(
            "INSERT INTO ledger_lines (entry_id, account, debit, credit, currency)"
            " VALUES (%s,%s,%s,%s,%s)",
            [(entry_id, line.account, line.debit, line.credit, line.currency)
             for line in ledger_lines(posting, by_bank=by_bank)])
        await AuditLog.append(conn, posting.refund_request_id, "ledger", "ledger_posted",
                              {"posting_key": key, "entry_id": entry_id,
                               "template": posting.kind.value, "amount": posting.amount,
                               "currency": posting.currency,
                               "provider_refund_id": posting.provider_refund_id})
        return LedgerResult(posting_key=key, entry_id=entry_id, newly_posted=True)

    @staticmethod
    async def posted_in(conn: Conn, posting_key: str) -> bool:
        """Whether an entry holds this key (in the caller's transaction)."""
        cur = await conn.execute("SELECT 1 FROM ledger_entries WHERE posting_key = %s", (posting_key,))
        return await cur.fetchone() is not None

    @staticmethod
    async def _by_bank(conn: Conn, posting: LedgerInput) -> bool:
        """Whether the posting's case is a refund paid by bank transfer (a payout case, or a
        provider refund, moves the provider's balance), unless its entries already moved
        the provider's (posted before `bank_clearing`): a reversal undoes the same account."""
        cur = await conn.execute(
            "SELECT method <> %s AND NOT EXISTS (SELECT 1 FROM ledger_entries e JOIN ledger_lines l"
            " ON l.entry_id = e.id WHERE e.refund_request_id = c.refund_request_id AND l.account = %s)"
            " AS by_bank FROM refund_cases c WHERE refund_request_id = %s",
            (RefundMethod.PROVIDER.value, PROVIDER_ACCOUNT, posting.refund_request_id))
        row = await cur.fetchone()
        return bool(row and row["by_bank"])

    @staticmethod
    async def _told_if_other(conn: Conn, posting: LedgerInput, entry_id: int) -> None:
        """A posting its key already holds is not posted again (money once), but one for
        other money (another amount or currency: another refund followed, another reading)
        leaves the books differing from what it said: an audit row and an ops notice, never
        silence. A retry of the same posting says nothing."""
        cur = await conn.execute(
            "SELECT account, debit, credit, currency FROM ledger_lines WHERE entry_id = %s", (entry_id,))
        posted = sorted((r["account"], r["debit"], r["credit"], r["currency"]) for r in await cur.fetchall())
        by_bank = await LedgerRepository._by_bank(conn, posting)
        wanted = sorted((line.account, line.debit, line.credit, line.currency)
                        for line in ledger_lines(posting, by_bank=by_bank))
        if posted == wanted:
            return
        key = posting.posting_key()
        log.error("LEDGER POSTING NOT MADE: %s holds other money than a later posting under its key (%s)",
                  key, posting.refund_request_id)
        amount = max(debit for _, debit, _, _ in posted)
        detail = {"posting_key": key, "entry_id": entry_id,
                  "posted": {"amount": amount, "currency": posted[0][3]},
                  "refused": {"amount": posting.amount, "currency": posting.currency,
                              "provider_refund_id": posting.provider_refund_id}}
        await AuditLog.append(conn, posting.refund_request_id, "ledger", "ledger_posting_conflict", detail)
        await OutboxRepository.queue_in(conn, NoticeInput(
            refund_request_id=posting.refund_request_id, kind="ledger_posting_conflict", audience="operator",
            dedup_key=f"{posting.refund_request_id}:ledger_posting_conflict:{key}:{posting.amount}"
                      f":{posting.currency}", detail=detail))

    async def first_posted(self, case_id: str, template: LedgerKind) -> datetime | None:
        """When the case's first entry of `template` was posted (None: it has none)."""
        row = await self._db.fetch_one(
            "SELECT min(posted_at) AS at FROM ledger_entries WHERE refund_request_id = %s AND template = %s",
            (case_id, template.value))
        return row["at"] if row else None

    async def entries(self, case_id: str) -> list[LedgerLineRow]:
        """The case's journal, line by line, in posting order."""
        return [LedgerLineRow.from_row(row) for row in await self._db.fetch_all(
            "SELECT e.posting_key, e.template, l.account, l.debit, l.credit, l.currency"
            " FROM ledger_entries e JOIN ledger_lines l ON l.entry_id = e.id"
            " WHERE e.refund_request_id = %s ORDER BY e.id, l.id", (case_id,))]
