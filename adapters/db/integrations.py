"""The integrations' own rows: tickets per case and purpose, the advisor's advice and the
refund histories it reads. Audit rows go into the case's chain in the same transaction as
the row they describe."""

from collections.abc import Awaitable, Callable
from typing import Any

from psycopg.types.json import Jsonb

from adapters.db.audit import AuditLog
from adapters.db.database import Conn, Repository
from adapters.db.rows import AdviceRow, TicketRow
from domain.advice import Advice


class IntegrationRepository(Repository):
    """Tickets per case and purpose, and the advice kept per case."""

    async def ticket(self, case_id: str, system: str, purpose: str) -> TicketRow | None:
        async with self._db.connection() as conn:
            return await self._ticket_in(conn, case_id, system, purpose)

    @staticmethod
    async def _ticket_in(conn: Conn, case_id: str, system: str, purpose: str) -> TicketRow | None:
        row = await (await conn.execute(
            "SELECT system, purpose, external_id, number, url FROM case_tickets"
            " WHERE refund_request_id = %s AND system = %s AND purpose = %s",
            (case_id, system, purpose))).fetchone()
        return None if row is None else TicketRow.from_row(row)

    async def save_ticket(self, case_id: str, system: str, purpose: str, *, external_id: str,
                          number: str | None, url: str | None, actor: str = "system") -> TicketRow:
        """Stores the case's ticket once; a second save returns the first."""
        async with self._db.transaction() as conn:
            return await self._save_in(conn, case_id, system, purpose, external_id, number, url, actor)

    @classmethod
    async def _save_in(cls, conn: Conn, case_id: str, system: str, purpose: str, external_id: str,
                       number: str | None, url: str | None, actor: str) -> TicketRow:
        cur = await conn.execute(
            "INSERT INTO case_tickets (refund_request_id, system, purpose, external_id, number, url)"
            " VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING"
            " RETURNING system, purpose, external_id, number, url",
            (case_id, system, purpose, external_id, number, url))
        row = await cur.fetchone()
        if row is None:
            found = await cls._ticket_in(conn, case_id, system, purpose)
            assert found is not None
            return found
        await AuditLog.append(conn, case_id, actor, "ticket_linked",
                              {"system": system, "purpose": purpose, "external_id": external_id,
                               "number": number, "url": url})
        return TicketRow.from_row(row)

    async def ticket_or_made(self, case_id: str, system: str, purpose: str,
                             make: Callable[[], Awaitable[tuple[str, str | None, str | None]]],
                             ) -> tuple[TicketRow, bool]:
        """The case's stored ticket, or the one `make` finds or creates in the ticket system,
        stored: one deliverer at a time per case, system and purpose (a transaction-scoped
        advisory lock, one connection held across `make`), so two notices of a case taken by
        two deliverers at once never make two tickets. True when `make` ran."""
        async with self._db.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                               (f"ticket\n{case_id}\n{system}\n{purpose}",))
            stored = await self._ticket_in(conn, case_id, system, purpose)
            if stored is not None:
                return stored, False
            external_id, number, url = await make()  # (id, number, url) in the ticket system
            return await self._save_in(conn, case_id, system, purpose, external_id, number, url,
                                       "system"), True

    async def case_for_ticket(self, system: str, external_id: str) -> str | None:
        """The case whose refund-request ticket this is (approvals recorded on it count)."""
        row = await self._db.fetch_one(
            "SELECT refund_request_id FROM case_tickets WHERE system = %s AND external_id = %s"
            " AND purpose = 'request'", (system, external_id))
        return str(row["refund_request_id"]) if row else None

    async def tickets(self, case_id: str) -> list[TicketRow]:
        rows = await self._db.fetch_all(
            "SELECT system, purpose, external_id, number, url FROM case_tickets"
            " WHERE refund_request_id = %s ORDER BY created_at", (case_id,))
        return [TicketRow.from_row(row) for row in rows]

    async def charge_history(self, provider: str, charge_id: str, exclude: str) -> list[dict[str, Any]]:
        """The charge's latest 50 other refunds, oldest first: the advisor's context stays
        the same size however many refunds a charge (a platform's shared one) has seen."""
        return await self._db.fetch_all(
            "SELECT refund_request_id, amount, status FROM (SELECT refund_request_id, amount, status,"
            " created_at FROM refund_cases"
            " WHERE provider = %s AND charge_id = %s AND refund_request_id <> %s"
            " ORDER BY created_at DESC LIMIT 50) latest ORDER BY created_at",
            (provider, charge_id, exclude))

    async def customer_history(self, customer_id: str, exclude: str) -> list[dict[str, Any]]:
        """The customer's latest 50 other requests, oldest first (as `charge_history`)."""
        return await self._db.fetch_all(
            "SELECT refund_request_id, amount, status FROM (SELECT refund_request_id, amount, status,"
            " created_at FROM refund_cases WHERE evidence->>'customer_id' = %s AND refund_request_id <> %s"
            " ORDER BY created_at DESC LIMIT 50) latest ORDER BY created_at", (customer_id, exclude))

    async def save_advice(self, case_id: str, *, source: str, advice: Advice | None, error: str | None,
                          context_sha256: str) -> AdviceRow:
        """Stores the case's first advice (or its absence); a retry keeps the first."""
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO case_advice (refund_request_id, source, advice, error, context_sha256)"
                " VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING *",
                (case_id, source, Jsonb(advice.model_dump(mode="json")) if advice else None, error,
                 context_sha256))
            row = await cur.fetchone()
            if row is not None:
                detail: dict[str, Any] = {"source": source, "context_sha256": context_sha256}
                if advice is None:
                    await AuditLog.append(conn, case_id, "advisor", "advice_unavailable",
                                          {**detail, "error": error})
                else:
                    await AuditLog.append(conn, case_id, "advisor", "advice_recorded",
                                          {**detail, "suggested_amount": advice.suggested_amount,
                                           "anomaly_flags": list(advice.anomaly_flags)})
                return AdviceRow.from_row(row)
        found = await self.advice(case_id)
        assert found is not None
        return found

    async def advice(self, case_id: str) -> AdviceRow | None:
        row = await self._db.fetch_one("SELECT * FROM case_advice WHERE refund_request_id = %s", (case_id,))
        return None if row is None else AdviceRow.from_row(row)
