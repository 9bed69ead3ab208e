"""Read side of the webhook receipts (coverage, replay and re-drive selections), and what
makes any delivery storable as one.

Kept apart from `store.py` (the write path) because ops tooling grows here.
"""

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from adapters.store import Store


def storable(text: str) -> str:
    """Text as PostgreSQL keeps it: `text` and `jsonb` refuse NUL and UTF-8 refuses lone
    surrogates, so a refused delivery's path, headers and error are stored with those
    characters replaced instead of being lost to a failed insert (a 500, no receipt)."""
    return text.encode("utf-8", "replace").decode().replace("\x00", "\ufffd")


def storable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {storable(k): storable(v) for k, v in headers.items()}


def unstorable(model: BaseModel) -> bool:
    """Whether a parsed delivery holds text PostgreSQL cannot keep (NUL, a lone surrogate).
    Such a delivery is refused as malformed rather than stored altered: its ids are dedup
    keys, and the cases and audit rows it would write could never be written."""
    try:
        return "\\u0000" in model.model_dump_json()
    except PydanticSerializationError:
        return True


@dataclass(frozen=True)
class StoredDelivery:
    """What a replay needs of a stored receipt: who sent what, with which headers, when."""

    receipt_id: int
    provider: str
    headers: dict[str, str]
    body: bytes | None
    received_at: datetime
    verdict: str


async def delivery(store: Store, receipt_id: int) -> StoredDelivery | None:
    async with store.transaction() as conn:
        cur = await conn.execute(
            "SELECT id, provider, headers, body, received_at, verdict FROM webhook_receipts"
            " WHERE id = %s", (receipt_id,))
        row = await cur.fetchone()
    if row is None:
        return None
    return StoredDelivery(receipt_id=int(row["id"]), provider=row["provider"], headers=row["headers"],
                          body=bytes(row["body"]) if row["body"] is not None else None,
                          received_at=row["received_at"], verdict=row["verdict"])


async def deliveries_since(store: Store, since: datetime, *, after_id: int, limit: int) -> list[int]:
    """Original deliveries (not earlier replays) received at or after `since`, oldest first,
    past receipt `after_id`: at most `limit` of them (a page; the caller goes on from the last)."""
    async with store.transaction() as conn:
        cur = await conn.execute(
            "SELECT id FROM webhook_receipts WHERE received_at >= %s AND replay_of IS NULL"
            " AND id > %s ORDER BY id LIMIT %s", (since, after_id, limit))
        return [int(r["id"]) for r in await cur.fetchall()]


async def unprocessed(store: Store, older_than_seconds: float, providers: Collection[str],
                      max_attempts: int) -> list[int]:
    """Accepted receipts of these providers whose workflow was never reached (a crash
    between receipt and signal), older than the given age so in-flight deliveries are left
    alone. Only providers the caller can verify: a replay of any other would be refused.
    Each selection counts as a try (`redrive_attempts`); a receipt tried `max_attempts`
    times is no longer selected (`given_up` names it once)."""
    async with store.transaction() as conn:
        cur = await conn.execute(
            "UPDATE webhook_receipts SET redrive_attempts = redrive_attempts + 1 WHERE id IN ("
            " SELECT id FROM webhook_receipts WHERE verdict = 'accepted' AND processed_at IS NULL"
            " AND provider = ANY(%s) AND received_at < now() - make_interval(secs => %s)"
            " AND redrive_attempts < %s ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING id",
            (list(providers), older_than_seconds, max_attempts))
        return sorted(int(r["id"]) for r in await cur.fetchall())


async def given_up(store: Store, receipt_ids: Collection[int], max_attempts: int) -> list[int]:
    """Those of `receipt_ids` that used their last try and are still unprocessed."""
    async with store.transaction() as conn:
        cur = await conn.execute(
            "SELECT id FROM webhook_receipts WHERE id = ANY(%s) AND processed_at IS NULL"
            " AND redrive_attempts >= %s ORDER BY id", (list(receipt_ids), max_attempts))
        return [int(r["id"]) for r in await cur.fetchall()]


async def type_counts(store: Store) -> list[dict[str, Any]]:
    """Receipts per provider, event type and verdict (the raw material of coverage)."""
    async with store.transaction() as conn:
        cur = await conn.execute(
            "SELECT provider, event_type, verdict, count(*) AS n, max(received_at) AS last_seen"
            " FROM webhook_receipts WHERE replay_of IS NULL"
            " GROUP BY provider, event_type, verdict ORDER BY provider, event_type, verdict")
        return list(await cur.fetchall())


async def recent_rejections(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The latest refused deliveries, newest first, for the coverage report."""
    async with store.transaction() as conn:
        cur = await conn.execute(
            "SELECT id, provider, event_type, verdict, error, received_at FROM webhook_receipts"
            " WHERE verdict NOT IN ('accepted', 'duplicate') ORDER BY id DESC LIMIT %s", (limit,))
        return list(await cur.fetchall())
