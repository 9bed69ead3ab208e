"""The notice outbox: notices queued once per dedup key with the change that raised them,
and their delivery per channel (claimed before sending, so a crash mid-send is never sent
twice but marked uncertain)."""

from datetime import datetime
from typing import Any

from psycopg import sql

from adapters.db.audit import AuditLog
from adapters.db.database import Conn, Repository, jsonb
from adapters.db.rows import DeliveryRow, NoticeRow
from domain.models import NoticeInput


class SendingElsewhere(RuntimeError):
    """Another attempt claimed this channel's send within `SENDING_LEASE_SECONDS`: it may be
    sending right now, so its outcome is not known yet (neither a dead attempt nor a send)."""


class OutboxRepository(Repository):
    """The `notices` rows and their `notice_deliveries` per channel."""

    SENDING_LEASE_SECONDS = 300
    """How long a claim counts as a send under way: past any live send (a ticket's searches,
    create, lag recheck and lock wait, each call bounded per phase, not in total). Longer
    than a delivery activity's retries (about 190 s): a dead worker's claim is settled as
    uncertain by the sweeper, not a retry (the payout ticket records its delivery as
    incomplete meanwhile); shorter, a slow live send would be taken over and its notice
    marked delivered unsent. A send outliving it cannot undo the takeover (`finish_delivery`)."""

    async def queue(self, notice: NoticeInput) -> bool:
        """Puts a notice in the outbox once per dedup key; returns whether it is new."""
        async with self._db.transaction() as conn:
            return await OutboxRepository.queue_in(conn, notice)

    async def queue_recorded(self, notice: NoticeInput, actor: str, action: str,
                             detail: dict[str, Any]) -> bool:
        """A notice and the case's audit row saying why, together, once per dedup key;
        returns whether they are new. Apart, a failure between them left the key taken
        and the row never written: a delivery again found the notice and wrote nothing."""
        async with self._db.transaction() as conn:
            return await OutboxRepository.queue_recorded_in(conn, notice, actor, action, detail)

    @staticmethod
    async def queue_recorded_in(conn: Conn, notice: NoticeInput, actor: str, action: str,
                                detail: dict[str, Any]) -> bool:
        """`queue_recorded` inside the caller's transaction."""
        if not await OutboxRepository.queue_in(conn, notice):
            return False
        await AuditLog.append(conn, notice.refund_request_id, actor, action, detail)
        return True

    @staticmethod
    async def queue_in(conn: Conn, notice: NoticeInput) -> bool:
        """`queue` inside the caller's transaction."""
        cur = await conn.execute(
            "INSERT INTO notices (dedup_key, refund_request_id, kind, audience, detail, dispatch_queue)"
            " VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
            (notice.dedup_key, notice.refund_request_id, notice.kind, notice.audience,
             jsonb(notice.detail), notice.dispatch_queue))
        if await cur.fetchone() is None:
            return False
        await AuditLog.append(conn, notice.refund_request_id, "system", "notice_queued",
                              {"kind": notice.kind, "audience": notice.audience})
        return True

    async def notices(self, case_id: str) -> list[NoticeRow]:
        """A case's notices, oldest first."""
        rows = await self._db.fetch_all(
            "SELECT kind, audience, detail, delivered_at FROM notices"
            " WHERE refund_request_id = %s ORDER BY id", (case_id,))
        return [NoticeRow.from_row(row) for row in rows]

    async def notice(self, dedup_key: str) -> dict[str, Any] | None:
        return await self._db.fetch_one("SELECT * FROM notices WHERE dedup_key = %s", (dedup_key,))

    async def sent_notice(self, notice_id: int, channel: str) -> dict[str, Any] | None:
        """A notice with what `channel` answered for its delivery (`external_id`: its id there,
        or a digest of what it shows; None when not delivered there); None when no such notice."""
        return await self._db.fetch_one(
            "SELECT n.*, d.external_id FROM notices n LEFT JOIN notice_deliveries d ON d.notice_id = n.id"
            " AND d.channel = %s AND d.status = 'delivered' WHERE n.id = %s", (channel, notice_id))

    async def claim_delivery(self, notice_id: int, case_id: str | None, channel: str) -> bool:
        """Claims the right to send before sending. A claim still 'sending' past its lease
        means an earlier attempt stopped and may have sent: it becomes 'uncertain' and is
        never sent again. Within its lease it may still be sending: `SendingElsewhere`."""
        async with self._db.transaction() as conn:
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
                " WHERE notice_id = %s AND channel = %s AND status = 'sending'"
                " AND claimed_at < now() - make_interval(secs => %s) RETURNING notice_id",
                (notice_id, channel, self.SENDING_LEASE_SECONDS))
            if await cur.fetchone() is not None:
                await AuditLog.append(conn, case_id, "system", "notice_delivery_uncertain",
                                      {"notice_id": notice_id, "channel": channel})
                return False
            cur = await conn.execute("SELECT 1 FROM notice_deliveries WHERE notice_id = %s AND channel = %s"
                                     " AND status = 'sending'", (notice_id, channel))
            if await cur.fetchone() is not None:
                raise SendingElsewhere(f"{channel}: another attempt is sending notice {notice_id}")
            return False

    async def finish_delivery(self, notice_id: int, case_id: str | None, channel: str, status: str, *,
                              external_id: str | None = None, error: str | None = None) -> None:
        """The send's outcome on its claim. A claim another attempt took over past its lease
        (now uncertain, the notice maybe marked delivered) keeps that, unless the late outcome
        is a delivery: a late failure must not read 'failed' on a notice nobody sends again."""
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE notice_deliveries SET status = %s, external_id = %s, last_error = %s,"
                " delivered_at = CASE WHEN %s = 'delivered' THEN now() END"
                " WHERE notice_id = %s AND channel = %s"
                " AND (status = 'sending' OR (status = 'uncertain' AND %s = 'delivered'))",
                (status, external_id, error, status, notice_id, channel, status))
            action = {"delivered": "notice_delivered", "failed": "notice_delivery_failed"}.get(
                status, "notice_delivery_uncertain")
            if not cur.rowcount:  # the row keeps the takeover's word; the trail says what came late
                action = "notice_delivery_outcome_after_takeover"
            await AuditLog.append(conn, case_id, "system", action,
                                  {"notice_id": notice_id, "channel": channel, "external_id": external_id,
                                   "outcome": status, **({"error": error} if error else {})})

    async def mark_delivered(self, notice_id: int) -> None:
        await self._db.execute("UPDATE notices SET delivered_at = now() WHERE id = %s"
                               " AND delivered_at IS NULL", (notice_id,))

    async def deliveries(self, case_id: str) -> list[DeliveryRow]:
        rows = await self._db.fetch_all(
            "SELECT n.kind, n.audience, d.channel, d.status, d.attempts, d.external_id,"
            " d.last_error FROM notice_deliveries d JOIN notices n ON n.id = d.notice_id"
            " WHERE n.refund_request_id = %s ORDER BY n.id, d.channel", (case_id,))
        return [DeliveryRow.from_row(row) for row in rows]

    async def unsent(self) -> list[tuple[str, str, int]]:
        """Deliveries no one will try again, by channel: (channel, state, count). `abandoned`:
        failed, on a notice delivered nowhere that the dispatcher gave up on or the sweeper
        swept `SWEEP_ATTEMPTS` times; `uncertain`: an attempt that may have sent (never
        resent). A notice no channel carries has no delivery and is not counted."""
        rows = await self._db.fetch_all(sql.SQL(
            "SELECT d.channel, CASE WHEN d.status = 'failed' THEN 'abandoned' ELSE d.status END AS state,"
            " count(*) AS n FROM notice_deliveries d JOIN notices n ON n.id = d.notice_id"
            " WHERE d.status = 'uncertain' OR (d.status = 'failed' AND n.delivered_at IS NULL"
            " AND (CASE WHEN n.dispatch_queue IS NULL THEN n.attempts >= {}"
            " ELSE n.dispatched_at IS NOT NULL END)) GROUP BY 1, 2").format(
                sql.Literal(self.SWEEP_ATTEMPTS)))
        return [(r["channel"], r["state"], int(r["n"])) for r in rows]

    SWEEP_ATTEMPTS = 8
    """Sweeps of one notice before it is left undelivered (a channel down for good, or none
    carries it); migration 0810's index names the same bound."""

    async def claim_unswept(self, older_than_seconds: float, limit: int, *,
                            retry_after_seconds: float) -> list[str]:
        """Undelivered notices no dispatcher owns, oldest first, claimed for this sweep: never
        swept, or swept `retry_after_seconds` ago and not delivered everywhere then, up to
        `SWEEP_ATTEMPTS` sweeps (SKIP LOCKED lets several workers sweep side by side; the
        claim is the sweep's lease)."""
        rows = await self._db.fetch_all(sql.SQL(
            "UPDATE notices SET swept_at = now(), attempts = attempts + 1 WHERE id IN (SELECT id"
            " FROM notices WHERE delivered_at IS NULL AND dispatch_queue IS NULL AND attempts < {}"
            " AND created_at < now() - make_interval(secs => %s)"
            " AND (swept_at IS NULL OR swept_at < now() - make_interval(secs => %s))"
            " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING dedup_key").format(
                sql.Literal(self.SWEEP_ATTEMPTS)),  # a literal: the partial index's predicate
            (older_than_seconds, retry_after_seconds, limit))
        return [r["dedup_key"] for r in rows]

    async def claim_dispatch(self, queue: str, limit: int,
                             lease_seconds: float) -> list[tuple[int, str, int, datetime]]:
        """Notices for `queue`'s dispatcher that are due: only the first pending one of each
        case (a case's notices go out in order), each claimed for `lease_seconds` (a
        dispatcher that dies leaves it to another once the lease runs out; SKIP LOCKED lets
        several claim side by side). (id, dedup key, attempt number, lease end) in queue order."""
        rows = await self._db.fetch_all(
            "UPDATE notices SET claimed_until = now() + make_interval(secs => %s), attempts = attempts + 1"
            " WHERE id IN (SELECT n.id FROM notices n WHERE n.dispatch_queue = %s"
            " AND n.dispatched_at IS NULL AND n.next_attempt_at <= now()"
            " AND (n.claimed_until IS NULL OR n.claimed_until < now())"
            " AND NOT EXISTS (SELECT 1 FROM notices e WHERE e.refund_request_id = n.refund_request_id"
            " AND e.id < n.id AND e.dispatch_queue IS NOT NULL AND e.dispatched_at IS NULL)"
            " ORDER BY n.id LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, dedup_key, attempts, claimed_until",
            (lease_seconds, queue, limit))
        return sorted((r["id"], r["dedup_key"], r["attempts"], r["claimed_until"]) for r in rows)

    async def claim_again(self, notice_id: int, claimed_until: datetime,
                          lease_seconds: float) -> datetime | None:
        """A fresh lease on one notice of this dispatcher's batch, just before its delivery;
        None when the batch's lease ran out and another dispatcher took it since."""
        row = await self._db.fetch_one(
            "UPDATE notices SET claimed_until = now() + make_interval(secs => %s) WHERE id = %s"
            " AND claimed_until = %s AND dispatched_at IS NULL RETURNING claimed_until",
            (lease_seconds, notice_id, claimed_until))
        return row["claimed_until"] if row else None

    async def unclaim(self, notice_id: int, claimed_until: datetime) -> None:
        """A claimed notice handed back untried (its dispatcher is stopping): due to the next
        dispatcher at once, its attempt not counted."""
        await self._db.execute(
            "UPDATE notices SET claimed_until = NULL, attempts = attempts - 1 WHERE id = %s"
            " AND claimed_until = %s AND dispatched_at IS NULL", (notice_id, claimed_until))

    async def dispatched(self, notice_id: int) -> None:
        """The dispatcher is done with a notice (delivered, no channel for it, or given up)."""
        await self._db.execute("UPDATE notices SET dispatched_at = now(), claimed_until = NULL"
                               " WHERE id = %s", (notice_id,))

    async def hand_to_sweeper(self, notice_id: int) -> None:
        """The dispatcher spent its tries on a certain failure (a channel down for minutes):
        the sweeper takes the notice on its own, slower schedule, a sweep's delay from now,
        with its own count of tries."""
        await self._db.execute(
            "UPDATE notices SET dispatched_at = now(), claimed_until = NULL, dispatch_queue = NULL,"
            " attempts = 0, swept_at = now() WHERE id = %s", (notice_id,))

    async def dispatch_later(self, notice_id: int, delay_seconds: float) -> None:
        """A certain failure on some channel: the notice is due again after `delay_seconds`."""
        await self._db.execute(
            "UPDATE notices SET next_attempt_at = now() + make_interval(secs => %s), claimed_until = NULL"
            " WHERE id = %s", (delay_seconds, notice_id))
