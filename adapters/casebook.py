"""Read-only queries behind the ops console: finding cases, approvals granted so far,
and the webhook coverage report.

Kept apart from `store.py` (the write path and its invariants): nothing here changes a row.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from adapters.store import Store

BANNER_STATUSES = ("refund_failed", "refund_canceled", "executed_ledger_pending", "ops_review")
"""Cases a person must look at: money did not go back as the case once said it would."""


@dataclass(frozen=True)
class CaseFilter:
    """What the cases list was asked for; amounts are minor units of `currency`."""

    statuses: tuple[str, ...] = ()
    provider: str | None = None
    currency: str | None = None
    min_amount: int | None = None
    max_amount: int | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    search: str | None = None
    requester: str | None = None
    limit: int = 200


async def find_cases(store: Store, wanted: CaseFilter) -> list[dict[str, Any]]:
    """Newest first. `search` matches a refund request id, charge id, provider refund id or
    a ticket's id or number exactly, or a refund request id by prefix."""
    clauses: list[str] = []
    params: list[Any] = []

    def where(clause: str, *values: Any) -> None:
        clauses.append(clause)
        params.extend(values)

    if wanted.statuses:
        where("status = ANY(%s)", list(wanted.statuses))
    if wanted.requester:
        where("requester = %s", wanted.requester)
    if wanted.provider:
        where("provider = %s", wanted.provider)
    if wanted.currency:
        where("currency = %s", wanted.currency)
    if wanted.min_amount is not None:
        where("amount >= %s", wanted.min_amount)
    if wanted.max_amount is not None:
        where("amount <= %s", wanted.max_amount)
    if wanted.older_than is not None:
        where("created_at <= now() - %s", wanted.older_than)
    if wanted.newer_than is not None:
        where("created_at >= now() - %s", wanted.newer_than)
    if wanted.search:
        prefix = wanted.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where("(%s IN (refund_request_id, charge_id, provider_refund_id)"
              " OR refund_request_id LIKE %s OR refund_request_id IN (SELECT t.refund_request_id"
              " FROM case_tickets t WHERE %s IN (t.external_id, t.number)))",
              wanted.search, prefix, wanted.search)
    sql = "SELECT * FROM refund_cases"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY created_at DESC, refund_request_id LIMIT %s"
    async with store.transaction() as conn:
        cur = await conn.execute(sql, [*params, wanted.limit])
        return list(await cur.fetchall())


async def providers_seen(store: Store) -> list[str]:
    async with store.transaction() as conn:
        cur = await conn.execute("SELECT DISTINCT provider FROM refund_cases ORDER BY provider")
        return [r["provider"] for r in await cur.fetchall()]


async def granted_approvals(store: Store,
                            case_ids: list[str]) -> dict[str, list[tuple[str, frozenset[str]]]]:
    """Approvals that counted, per case, as (approver, roles): what fills a tier's slots."""
    granted: dict[str, list[tuple[str, frozenset[str]]]] = {c: [] for c in case_ids}
    async with store.transaction() as conn:
        cur = await conn.execute(
            "SELECT chain, actor, detail FROM audit_events WHERE chain = ANY(%s)"
            " AND action = 'approval_granted' ORDER BY chain, seq", (case_ids,))
        for row in await cur.fetchall():
            granted[row["chain"]].append((row["actor"], frozenset(row["detail"].get("roles", []))))
    return granted


async def coverage(store: Store, handled: Mapping[str, frozenset[str]]) -> dict[str, dict[str, Any]]:
    """Per provider: each event type received with its count per verdict and when it was last
    seen, the types we have a handler for, those that arrived without one (`unknown`), and
    those handled but never received (`never_seen`)."""
    report: dict[str, dict[str, Any]] = {name: {"handled": sorted(types), "types": {}}
                                         for name, types in handled.items()}
    async with store.transaction() as conn:
        cur = await conn.execute(
            "SELECT provider, event_type, verdict, count(*) AS n, max(received_at) AS last_seen"
            " FROM webhook_receipts GROUP BY provider, event_type, verdict")
        rows = await cur.fetchall()
    for row in rows:
        entry = report.setdefault(row["provider"], {"handled": [], "types": {}})
        kind = entry["types"].setdefault(row["event_type"] or "(unreadable)",
                                         {"verdicts": {}, "last_seen": row["last_seen"]})
        kind["verdicts"][row["verdict"]] = row["n"]
        kind["last_seen"] = max(kind["last_seen"], row["last_seen"])
    for entry in report.values():
        entry["unknown"] = sorted(t for t, k in entry["types"].items() if "unknown_type" in k["verdicts"])
        entry["never_seen"] = sorted(set(entry["handled"]) - set(entry["types"]))
    return report


async def rejected_receipts(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    """The latest deliveries that were refused or not understood, newest first."""
    async with store.transaction() as conn:
        cur = await conn.execute(
            "SELECT id, provider, event_id, event_type, verdict, error, received_at"
            " FROM webhook_receipts WHERE verdict NOT IN ('accepted', 'duplicate')"
            " ORDER BY id DESC LIMIT %s", (limit,))
        return list(await cur.fetchall())
