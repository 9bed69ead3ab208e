"""SQL of the integrations: per-channel deliveries, tickets per case, identity links and
advice. Audit rows go into the case's chain in the same transaction as the row they
describe, like the rest of the store."""

from typing import Any

from psycopg.types.json import Jsonb

from adapters.store import Principal, Store
from domain.advice import Advice

DELIVERY_DONE = frozenset({"delivered", "uncertain"})


class IntegrationStore:
    """Shares the product store's connection pool and audit chains."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- notices ------------------------------------------------------------------------

    async def notice(self, dedup_key: str) -> dict[str, Any] | None:
        async with self._store.transaction() as conn:
            cur = await conn.execute("SELECT * FROM notices WHERE dedup_key = %s", (dedup_key,))
            return await cur.fetchone()

    async def claim_delivery(self, notice_id: int, case_id: str | None, channel: str) -> bool:
        """Claims the right to send before sending. A claim still 'sending' means an earlier
        attempt may have sent: it becomes 'uncertain' and is never sent again."""
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO notice_deliveries (notice_id, channel, status) VALUES (%s,%s,'sending')"
                " ON CONFLICT (notice_id, channel) DO UPDATE SET status = 'sending',"
                " attempts = notice_deliveries.attempts + 1, claimed_at = now()"
                " WHERE notice_deliveries.status = 'failed' RETURNING attempts", (notice_id, channel))
            if await cur.fetchone() is not None:
                return True
            cur = await conn.execute(
                "UPDATE notice_deliveries SET status = 'uncertain',"
                " last_error = 'an earlier attempt stopped while sending'"
                " WHERE notice_id = %s AND channel = %s AND status = 'sending' RETURNING notice_id",
                (notice_id, channel))
            if await cur.fetchone() is not None:
                await Store._audit(conn, case_id, "system", "notice_delivery_uncertain",
                                   {"notice_id": notice_id, "channel": channel})
            return False

    async def finish_delivery(self, notice_id: int, case_id: str | None, channel: str, status: str, *,
                              external_id: str | None = None, error: str | None = None) -> None:
        async with self._store.transaction() as conn:
            await conn.execute(
                "UPDATE notice_deliveries SET status = %s, external_id = %s, last_error = %s,"
                " delivered_at = CASE WHEN %s = 'delivered' THEN now() END"
                " WHERE notice_id = %s AND channel = %s",
                (status, external_id, error, status, notice_id, channel))
            action = {"delivered": "notice_delivered", "failed": "notice_delivery_failed"}.get(
                status, "notice_delivery_uncertain")
            await Store._audit(conn, case_id, "system", action,
                               {"notice_id": notice_id, "channel": channel, "external_id": external_id,
                                **({"error": error} if error else {})})

    async def mark_notice_delivered(self, notice_id: int) -> None:
        async with self._store.transaction() as conn:
            await conn.execute("UPDATE notices SET delivered_at = now() WHERE id = %s"
                               " AND delivered_at IS NULL", (notice_id,))

    async def deliveries(self, case_id: str) -> list[dict[str, Any]]:
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "SELECT n.kind, n.audience, d.channel, d.status, d.attempts, d.external_id,"
                " d.last_error FROM notice_deliveries d JOIN notices n ON n.id = d.notice_id"
                " WHERE n.refund_request_id = %s ORDER BY n.id, d.channel", (case_id,))
            return list(await cur.fetchall())

    # -- tickets ------------------------------------------------------------------------

    async def ticket(self, case_id: str, system: str, purpose: str) -> dict[str, Any] | None:
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "SELECT * FROM case_tickets WHERE refund_request_id = %s AND system = %s"
                " AND purpose = %s", (case_id, system, purpose))
            return await cur.fetchone()

    async def save_ticket(self, case_id: str, system: str, purpose: str, *, external_id: str,
                          number: str | None, url: str | None, actor: str = "system") -> dict[str, Any]:
        """Stores the case's ticket once; a second save returns the first."""
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO case_tickets (refund_request_id, system, purpose, external_id, number, url)"
                " VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING *",
                (case_id, system, purpose, external_id, number, url))
            row = await cur.fetchone()
            if row is not None:
                await Store._audit(conn, case_id, actor, "ticket_linked",
                                   {"system": system, "purpose": purpose, "external_id": external_id,
                                    "number": number, "url": url})
                return row
        found = await self.ticket(case_id, system, purpose)
        assert found is not None
        return found

    async def case_for_ticket(self, system: str, external_id: str) -> str | None:
        """The case whose refund-request ticket this is (approvals recorded on it count)."""
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "SELECT refund_request_id FROM case_tickets WHERE system = %s AND external_id = %s"
                " AND purpose = 'request'", (system, external_id))
            row = await cur.fetchone()
        return str(row["refund_request_id"]) if row else None

    async def claim_unswept(self, older_than_seconds: float, limit: int) -> list[str]:
        """Undelivered notices nobody has swept, oldest first, claimed for this sweep (each
        is swept once; SKIP LOCKED lets several workers sweep side by side)."""
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "UPDATE notices SET swept_at = now() WHERE id IN (SELECT id FROM notices"
                " WHERE delivered_at IS NULL AND swept_at IS NULL"
                " AND created_at < now() - make_interval(secs => %s)"
                " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING dedup_key",
                (older_than_seconds, limit))
            return [r["dedup_key"] for r in await cur.fetchall()]

    async def tickets(self, case_id: str) -> list[dict[str, Any]]:
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "SELECT system, purpose, external_id, number, url FROM case_tickets"
                " WHERE refund_request_id = %s ORDER BY created_at", (case_id,))
            return list(await cur.fetchall())

    # -- identities ---------------------------------------------------------------------

    async def link_identity(self, system: str, external_id: str, user: str) -> None:
        async with self._store.transaction() as conn:
            await conn.execute(
                "INSERT INTO identity_links (system, external_id, user_name) VALUES (%s,%s,%s)"
                " ON CONFLICT (system, external_id) DO UPDATE SET user_name = EXCLUDED.user_name",
                (system, external_id, user))
            await Store._audit(conn, None, "admin", "identity_linked",
                               {"system": system, "external_id": external_id, "user": user})

    async def principal_for(self, system: str, external_id: str) -> Principal | None:
        """The linked user with the roles of their live tokens; None if unlinked or role-less."""
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "SELECT l.user_name, array_agg(DISTINCT r) AS roles FROM identity_links l"
                " JOIN api_tokens t ON t.user_name = l.user_name AND t.revoked_at IS NULL,"
                " unnest(t.roles) AS r WHERE l.system = %s AND l.external_id = %s"
                " GROUP BY l.user_name", (system, external_id))
            row = await cur.fetchone()
        return Principal(row["user_name"], frozenset(row["roles"])) if row else None

    # -- advice -------------------------------------------------------------------------

    async def charge_history(self, provider: str, charge_id: str, exclude: str) -> list[dict[str, Any]]:
        """The charge's latest 50 other refunds, oldest first: the advisor's context stays
        the same size however many refunds a charge (a platform's shared one) has seen."""
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "SELECT refund_request_id, amount, status FROM (SELECT refund_request_id, amount, status,"
                " created_at FROM refund_cases"
                " WHERE provider = %s AND charge_id = %s AND refund_request_id <> %s"
                " ORDER BY created_at DESC LIMIT 50) latest ORDER BY created_at",
                (provider, charge_id, exclude))
            return list(await cur.fetchall())

    async def customer_history(self, customer_id: str, exclude: str) -> list[dict[str, Any]]:
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "SELECT refund_request_id, amount, status FROM refund_cases"
                " WHERE evidence->>'customer_id' = %s AND refund_request_id <> %s"
                " ORDER BY created_at LIMIT 50", (customer_id, exclude))
            return list(await cur.fetchall())

    async def save_advice(self, case_id: str, *, source: str, advice: Advice | None, error: str | None,
                          context_sha256: str) -> dict[str, Any]:
        """Stores the case's first advice (or its absence); a retry keeps the first."""
        async with self._store.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO case_advice (refund_request_id, source, advice, error, context_sha256)"
                " VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING *",
                (case_id, source, Jsonb(advice.model_dump(mode="json")) if advice else None, error,
                 context_sha256))
            row = await cur.fetchone()
            if row is not None:
                detail: dict[str, Any] = {"source": source, "context_sha256": context_sha256}
                if advice is None:
                    await Store._audit(conn, case_id, "advisor", "advice_unavailable",
                                       {**detail, "error": error})
                else:
                    await Store._audit(conn, case_id, "advisor", "advice_recorded",
                                       {**detail, "suggested_amount": advice.suggested_amount,
                                        "anomaly_flags": list(advice.anomaly_flags)})
                return row
        found = await self.advice(case_id)
        assert found is not None
        return found

    async def advice(self, case_id: str) -> dict[str, Any] | None:
        async with self._store.transaction() as conn:
            cur = await conn.execute("SELECT * FROM case_advice WHERE refund_request_id = %s", (case_id,))
            return await cur.fetchone()
