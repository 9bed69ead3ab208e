"""Webhook receipts: every delivery stored (accepted ones gated once per provider event
id), marked processed, pruned when refused without proof of origin; and the reads behind
replay, re-drive and the coverage report."""

import asyncio
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from adapters.db.cases import CaseCreation, CaseRepository
from adapters.db.database import Repository, jsonb
from adapters.db.rows import ReceiptRow
from adapters.receipts import INTEGRATION_SENDERS
from domain.models import RefundRequest

log = logging.getLogger("store")


_INSERT_RECEIPT = (
    "INSERT INTO webhook_receipts (provider, event_id, event_type, body, body_sha256, headers, verdict,"
    " error, replay_of) VALUES (%(provider)s, %(event_id)s, %(event_type)s, %(body)s, %(body_sha256)s,"
    " %(headers)s, %(verdict)s, %(error)s, %(replay_of)s) RETURNING id")

_KNOWN_DUPLICATE = (
    "INSERT INTO webhook_receipts (provider, event_id, event_type, body, body_sha256, headers, verdict,"
    " processed_at) VALUES (%(provider)s, %(event_id)s, %(event_type)s, %(body)s, %(body_sha256)s,"
    " %(headers)s, 'duplicate', now()) RETURNING id")
"""A duplicate's receipt as the gated statement writes one (processed when stored)."""

_FIRST_RECEIPT = (
    "SELECT r.id AS first_id, r.processed_at AS first_processed_at, r.body_sha256 AS first_sha256,"
    " extract(epoch FROM now() - r.received_at)::float8 AS first_age FROM webhook_events e"
    " JOIN webhook_receipts r ON r.id = e.first_receipt_id"
    " WHERE e.provider = %(provider)s AND e.event_id = %(event_id)s")

_GATED_RECEIPT = sql.SQL(
    # The claim is decisive: it waits for a concurrent claim's commit, then inserts or not.
    "WITH receipt_id AS (SELECT nextval('webhook_receipts_id_seq') AS id),"
    " claim AS (INSERT INTO webhook_events (provider, event_id, first_receipt_id) SELECT %(provider)s,"
    " %(event_id)s, id FROM receipt_id ON CONFLICT DO NOTHING RETURNING first_receipt_id),"
    " earlier AS ({first_receipt}),"
    " receipt AS (INSERT INTO webhook_receipts (id, provider, event_id, event_type, body, body_sha256,"
    " headers, verdict, error, replay_of, processed_at)"
    " SELECT receipt_id.id, %(provider)s, %(event_id)s, %(event_type)s, %(body)s, %(body_sha256)s,"
    " %(headers)s, CASE WHEN claimed THEN 'accepted' ELSE 'duplicate' END, %(error)s, %(replay_of)s,"
    " CASE WHEN claimed THEN NULL ELSE now() END"
    " FROM receipt_id, (SELECT EXISTS (SELECT FROM claim) AS claimed) AS gate RETURNING id, verdict)"
    "{opening}"
    " SELECT receipt.id, receipt.verdict, earlier.first_id, earlier.first_processed_at, earlier.first_age,"
    " earlier.first_sha256,"
    " {opened} AS opened"
    " FROM receipt LEFT JOIN earlier ON true")
"""An accepted delivery's one statement: its claim, its receipt with the claim's verdict,
the first receipt's id and state when it is a duplicate, and (`opening`) the case it opens."""
_GATED = _GATED_RECEIPT.format(first_receipt=sql.SQL(_FIRST_RECEIPT), opening=sql.SQL(""),
                               opened=sql.SQL("false")).as_string()
_GATED_OPENING = _GATED_RECEIPT.format(
    first_receipt=sql.SQL(_FIRST_RECEIPT), opening=sql.SQL(", ") + CaseRepository.opening("claim"),
    opened=sql.SQL("EXISTS (SELECT FROM case_opened)")).as_string()
"""Composed once: composing per call cost the relay more than a statement's round trip."""


@dataclass(frozen=True)
class StoredReceipt:
    """Where a delivery landed; a duplicate of an unprocessed first receipt waits for it while
    it may be in flight, and re-drives it if it stays unprocessed."""

    receipt_id: int
    verdict: str
    first_receipt_id: int | None
    first_processed: bool = True
    first_age_seconds: float = 0.0
    """How long before this delivery the first receipt was stored (a duplicate's)."""
    first_sha256: str = ""
    """The first receipt's body digest (a duplicate's): a copy unlike it never acts."""
    case_creation: CaseCreation | None = None
    """CREATED when the first delivery of a refund request opened its case in the
    receipt's own statement; None leaves it to routing."""


@dataclass(frozen=True)
class StoredDelivery:
    """What a replay needs of a stored receipt: who sent what, with which headers, when."""

    receipt_id: int
    provider: str
    headers: dict[str, str]
    body: bytes | None
    received_at: datetime
    verdict: str


class ReceiptRepository(Repository):
    """The `webhook_receipts` rows and the (provider, event id) gate in front of them."""

    async def store(self, *, provider: str, event_id: str | None, event_type: str | None,
                    body: bytes | None, body_sha256: str, headers: dict[str, str],
                    verdict: str, error: str | None, replay_of: int | None = None,
                    opens: tuple[RefundRequest, str] | None = None) -> StoredReceipt:
        """Stores every delivery (and every replay of a stored one); an accepted one passes
        the (provider, event_id) gate once, later ones are recorded as duplicates of the first.

        One statement each, in autocommit: a round trip (a syscall or two and a wake-up on
        each side) is the relay's main cost per delivery. An accepted one claims the event id
        first and takes its verdict from the claim, so a receipt is never stored as accepted
        and corrected later. `opens` (request, requester) opens the case with its first entry
        in that statement; if that fails (a case row the table refuses, a chain already begun
        under the id) the receipt is stored alone and routing opens the case: the receipt
        never depends on its case."""
        receipt = {"provider": provider, "event_id": event_id, "event_type": event_type, "body": body,
                   "body_sha256": body_sha256, "headers": jsonb(headers), "error": error,
                   "replay_of": replay_of}
        if verdict != "accepted" or event_id is None:
            row = await self._db.fetch_one(_INSERT_RECEIPT, {**receipt, "verdict": verdict})
            assert row is not None
            return StoredReceipt(int(row["id"]), verdict, None)
        try:
            row = await self._db.fetch_one(
                _GATED if opens is None else _GATED_OPENING,
                receipt if opens is None else {**receipt, **CaseRepository.opening_values(*opens)})
        except psycopg.Error as exc:
            if opens is None:
                raise
            log.warning("case %s not opened with its receipt (%s); storing the receipt alone,"
                        " routing opens it", opens[0].refund_request_id, exc.diag.message_primary or exc)
            return await self.store(provider=provider, event_id=event_id, event_type=event_type,
                                    body=body, body_sha256=body_sha256, headers=headers,
                                    verdict=verdict, error=error, replay_of=replay_of)
        assert row is not None
        receipt_id = int(row["id"])
        if row["verdict"] == "accepted":
            return StoredReceipt(receipt_id, "accepted", receipt_id,
                                 case_creation=CaseCreation.CREATED if row["opened"] else None)
        if row["first_id"] is None:
            # The claim waited for a concurrent first receipt's commit, which the statement's
            # snapshot, taken before, does not show: read it now.
            row = await self._db.fetch_one(_FIRST_RECEIPT, {"provider": provider, "event_id": event_id})
            assert row is not None
        return StoredReceipt(receipt_id, "duplicate", int(row["first_id"]),
                             first_processed=row["first_processed_at"] is not None,
                             first_age_seconds=float(row["first_age"]), first_sha256=str(row["first_sha256"]))

    async def store_known_duplicate(self, *, provider: str, event_id: str, event_type: str,
                                    body: bytes | None, body_sha256: str, headers: dict[str, str],
                                    first_receipt_id: int) -> StoredReceipt:
        """Stores a delivery of an event whose first receipt the caller saw processed: a
        duplicate for certain, so a plain insert, without the claim and the first receipt's
        lookup `store` makes (nor a case's opening values)."""
        row = await self._db.fetch_one(_KNOWN_DUPLICATE, {
            "provider": provider, "event_id": event_id, "event_type": event_type, "body": body,
            "body_sha256": body_sha256, "headers": jsonb(headers)})
        assert row is not None
        return StoredReceipt(int(row["id"]), "duplicate", first_receipt_id)

    async def mark_processed(self, receipt_id: int, workflow_id: str | None) -> None:
        """Marks the receipt done without waiting for the disk: if a crash loses the mark,
        re-drive starts or signals again, which acts once anyway (workflow id, event id).
        One statement, its own transaction: set_config(..., true) makes that transaction's
        commit asynchronous without a BEGIN, a SET and a COMMIT around it."""
        await self._db.execute(
            "UPDATE webhook_receipts SET processed_at = now(), workflow_id = %s"
            " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS asynchronous_commit"
            " WHERE id = %s", (workflow_id, receipt_id))

    async def to_redrive(self, receipt_id: int) -> None:
        """An accepted receipt that must act again (a payout event that found no payout,
        now booked): unprocessed, with its re-drive tries counted afresh, until marked again."""
        await self._db.execute("UPDATE webhook_receipts SET processed_at = NULL, redrive_attempts = 0"
                               " WHERE id = %s", (receipt_id,))

    async def first_done(self, duplicate: StoredReceipt, wait_seconds: float,
                         in_flight_seconds: float) -> bool:
        """Waits up to `wait_seconds` for a duplicate's first delivery, unprocessed when the
        duplicate was stored, to be marked processed: a provider's retry after a timeout, or the
        same event sent twice at once, then does not reach Temporal too. False when it stays
        unprocessed (the caller re-drives it). A first receipt `in_flight_seconds` old (the
        re-drive age) is not waited for: whoever received it is gone. Polls the mark, 10 ms
        doubling to 200 ms, so a first delivery in another relay process counts too."""
        assert duplicate.first_receipt_id is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_seconds, in_flight_seconds - duplicate.first_age_seconds)
        pause = 0.01
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(pause, left))
            row = await self._db.fetch_one(
                "SELECT processed_at IS NOT NULL AS processed FROM webhook_receipts WHERE id = %s",
                (duplicate.first_receipt_id,))
            if row is not None and row["processed"]:
                return True
            pause = min(2 * pause, 0.2)
        return False

    async def prune_refused(self, older_than: timedelta, limit: int = 1000) -> int:
        """Deletes up to `limit` receipts older than `older_than` that were refused without
        proof of who sent them, or stale (a replay of a captured delivery); returns how many.
        Accepted, duplicate, unknown_type, unexpected_status, foreign_account, sample,
        unreadable and invalid_request receipts (signed deliveries) stay.
        The verdict list is the predicate of the partial index webhook_receipts_prunable
        (migration 0730)."""
        return await self._db.execute(
            "DELETE FROM webhook_receipts WHERE id IN (SELECT id FROM webhook_receipts"
            " WHERE verdict IN ('bad_signature', 'stale', 'malformed', 'too_large',"
            " 'unknown_provider', 'forbidden_source') AND received_at < now() - %s"
            " ORDER BY received_at LIMIT %s)", (older_than, limit))

    async def find(self, provider: str, event_id: str | None = None, *, after: int = 0,
                   limit: int | None = None) -> list[ReceiptRow]:
        """A provider's stored deliveries (of one event, when named), oldest first: after
        receipt `after`, up to `limit` of them (None: all)."""
        rows = await self._db.fetch_all(
            "SELECT id, provider, event_id, event_type, verdict, error, workflow_id, processed_at"
            " FROM webhook_receipts WHERE provider = %s AND (%s::text IS NULL OR event_id = %s)"
            " AND id > %s ORDER BY id LIMIT %s", (provider, event_id, event_id, after, limit))
        return [ReceiptRow.from_row(row) for row in rows]

    async def delivery(self, receipt_id: int) -> StoredDelivery | None:
        """The receipt as a replay reads it: its delivery, received when the original was (a
        replay of a replay, as re-drive makes, read as of its own replay found every
        signature past the tolerance: `stale`, the event never acted on)."""
        row = await self._db.fetch_one(
            "WITH RECURSIVE back AS (SELECT id, replay_of, received_at FROM webhook_receipts WHERE id = %s"
            " UNION ALL SELECT r.id, r.replay_of, r.received_at FROM webhook_receipts r"
            " JOIN back ON r.id = back.replay_of)"
            " SELECT w.id, w.provider, w.headers, w.body, w.verdict,"
            " coalesce((SELECT received_at FROM back WHERE replay_of IS NULL), w.received_at) AS received_at"
            " FROM webhook_receipts w WHERE w.id = %s", (receipt_id, receipt_id))
        if row is None:
            return None
        return StoredDelivery(receipt_id=int(row["id"]), provider=row["provider"], headers=row["headers"],
                              body=bytes(row["body"]) if row["body"] is not None else None,
                              received_at=row["received_at"], verdict=row["verdict"])

    async def deliveries_since(self, since: datetime, *, after_id: int, limit: int) -> list[int]:
        """Original webhook deliveries (not earlier replays, not integration calls) received at
        or after `since`, oldest first, past receipt `after_id`: at most `limit` of them (a
        page; the caller goes on from the last)."""
        rows = await self._db.fetch_all(
            "SELECT id FROM webhook_receipts WHERE received_at >= %s AND replay_of IS NULL"
            " AND provider <> ALL(%s) AND id > %s ORDER BY id LIMIT %s",
            (since, sorted(INTEGRATION_SENDERS), after_id, limit))
        return [int(r["id"]) for r in rows]

    async def unprocessed(self, older_than_seconds: float, providers: Collection[str],
                          max_attempts: int) -> list[int]:
        """Accepted receipts of these providers whose workflow was never reached (a crash
        between receipt and signal), older than the given age so in-flight deliveries are left
        alone. Only providers the caller can verify: a replay of any other would be refused.
        Each selection counts as a try (`redrive_attempts`); a receipt tried `max_attempts`
        times is no longer selected (`given_up` names it once)."""
        rows = await self._db.fetch_all(
            "UPDATE webhook_receipts SET redrive_attempts = redrive_attempts + 1 WHERE id IN ("
            " SELECT id FROM webhook_receipts WHERE verdict = 'accepted' AND processed_at IS NULL"
            " AND provider = ANY(%s) AND received_at < now() - make_interval(secs => %s)"
            " AND redrive_attempts < %s ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING id",
            (list(providers), older_than_seconds, max_attempts))
        return sorted(int(r["id"]) for r in rows)

    async def untried(self, receipt_ids: Collection[int]) -> None:
        """Takes back the try `unprocessed` counted for receipts a pass never got to try
        (Temporal did not answer)."""
        await self._db.execute(
            "UPDATE webhook_receipts SET redrive_attempts = greatest(redrive_attempts - 1, 0)"
            " WHERE id = ANY(%s)", (list(receipt_ids),))

    async def given_up(self, receipt_ids: Collection[int], max_attempts: int) -> list[int]:
        """Those of `receipt_ids` that used their last try and are still unprocessed."""
        rows = await self._db.fetch_all(
            "SELECT id FROM webhook_receipts WHERE id = ANY(%s) AND processed_at IS NULL"
            " AND redrive_attempts >= %s ORDER BY id", (list(receipt_ids), max_attempts))
        return [int(r["id"]) for r in rows]

    async def type_counts(self, *, replays: bool) -> list[dict[str, Any]]:
        """Receipts per provider, event type and verdict, with when each was last seen (the
        raw material of coverage); `replays` counts replays of stored deliveries too."""
        return await self._db.fetch_all(
            "SELECT provider, event_type, verdict, count(*) AS n, max(received_at) AS last_seen"
            " FROM webhook_receipts WHERE %s OR replay_of IS NULL"
            " GROUP BY provider, event_type, verdict ORDER BY provider, event_type, verdict",
            (replays,))

    async def coverage(self, handled: Mapping[str, frozenset[str]]) -> dict[str, dict[str, Any]]:
        """Per provider: each event type received with its count per verdict and when it was last
        seen, the types we have a handler for, those that arrived without one (`unknown`), and
        those handled but never received (`never_seen`)."""
        report: dict[str, dict[str, Any]] = {name: {"handled": sorted(types), "types": {}}
                                             for name, types in handled.items()}
        for row in await self.type_counts(replays=True):
            entry = report.setdefault(row["provider"], {"handled": [], "types": {}})
            kind = entry["types"].setdefault(row["event_type"] or "(unreadable)",
                                             {"verdicts": {}, "last_seen": row["last_seen"]})
            kind["verdicts"][row["verdict"]] = row["n"]
            kind["last_seen"] = max(kind["last_seen"], row["last_seen"])
        for entry in report.values():
            entry["unknown"] = sorted(t for t, k in entry["types"].items() if "unknown_type" in k["verdicts"])
            entry["never_seen"] = sorted(set(entry["handled"]) - set(entry["types"]))
        return report

    async def rejections(self, limit: int) -> list[dict[str, Any]]:
        """The latest deliveries that were refused or not understood, newest first."""
        return await self._db.fetch_all(
            "SELECT id, provider, event_id, event_type, verdict, error, received_at"
            " FROM webhook_receipts WHERE verdict NOT IN ('accepted', 'duplicate')"
            " ORDER BY id DESC LIMIT %s", (limit,))
