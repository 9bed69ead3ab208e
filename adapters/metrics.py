"""Prometheus metrics of the product (served at the relay's and the worker's /metrics).

Counters move where things happen (relay: receipts; worker: provider calls); the case
gauges are read from PostgreSQL when scraped, so every relay reports the same numbers.
Labels stay low-cardinality: provider names we configured, verdicts, operations.
"""

import hmac
import logging
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from adapters.config import Settings, secret_list
from adapters.db import Store
from adapters.net import is_loopback
from domain.models import CaseStatus, LedgerKind

log = logging.getLogger("metrics")

RECEIPTS = Counter("refunds_webhook_receipts", "Webhook deliveries stored, by provider and verdict",
                   ["provider", "verdict"])
DUPLICATES = Counter("refunds_webhook_duplicates", "Deliveries of an event already received",
                     ["provider"])
DUPLICATE_REDRIVES = Counter(
    "refunds_webhook_duplicate_redrives",
    "Duplicates that re-drove their first delivery, still unprocessed after the wait (its relay"
    " crashed or failed between the receipt and the workflow)", ["provider"])
EVENTS_WITHOUT_NEWS = Counter("refunds_webhook_events_without_news",
                              "Provider events repeating the status a case's workflow applied, not signalled",
                              ["provider"])
UNKNOWN_EVENT_TYPES = Counter("refunds_webhook_unknown_event_types",
                              "Signed events of a type we have no handler for", ["provider", "event_type"])
APPROVAL_WAIT = Histogram("refunds_approval_wait_seconds",
                          "From approval requested to an approver's decision", ["decision"],
                          buckets=(60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400))
PROVIDER_CALL_SECONDS = Histogram("refunds_provider_call_seconds", "Provider API call latency",
                                  ["provider", "operation"])
PROVIDER_CALL_ERRORS = Counter("refunds_provider_call_errors", "Provider API calls that raised",
                               ["provider", "operation", "error"])
REDRIVE_PASSES = Counter("refunds_webhook_redrive_passes",
                         "The relay's periodic re-drive passes, by outcome (ok, failed)", ["outcome"])
REDRIVE_GAVE_UP = Counter("refunds_webhook_redrive_gave_up",
                          "Accepted receipts re-drive stopped trying after its bounded tries")
CHECKPOINT_ROUNDS = Counter("refunds_audit_checkpoint_rounds",
                            "The audit checkpointer's rounds, by outcome (ok, failed)", ["outcome"])
CHECKPOINT_LAST_OK = Gauge("refunds_audit_checkpoint_last_ok_timestamp_seconds",
                           "When the audit checkpointer last completed a round (alert on its age: "
                           "rows written since a stopped checkpointer can be cut undetectably)")
VERIFY_OUTCOMES = Counter("refunds_verify_state", "Verify-state lookups at the provider, by outcome",
                          ["provider", "outcome"])
OPS_REVIEW_ESCALATIONS = Counter(
    "refunds_ops_review_escalations", "Cases sent to ops review, by reason (a refused provider "
    "configuration, retries exhausted, a status we cannot map)", ["reason"])
# Read from the database by the relay only, so a worker never reports a stale 0.
CASE_REGISTRY = CollectorRegistry()
CASES = Gauge("refunds_cases", "Refund cases by state", ["state"], registry=CASE_REGISTRY)
LEDGER_PENDING = Gauge("refunds_ledger_pending",
                       "Refunds the provider reports succeeded that have no settled ledger entry yet",
                       registry=CASE_REGISTRY)
RUNS = Gauge("refunds_reconciliation_runs", "Reconciliation runs by provider and state (a failed "
             "run's reason is in its report)", ["provider", "state"], registry=CASE_REGISTRY)
BREAKS = Gauge("refunds_reconciliation_breaks", "Reconciliation breaks by class and state",
               ["break_class", "state"], registry=CASE_REGISTRY)
NOTICES_UNSENT = Gauge("refunds_notice_deliveries_unsent",
                       "Notice deliveries no one will try again, by channel: failed for good (abandoned) "
                       "or possibly sent and never resent (uncertain)", ["channel", "state"],
                       registry=CASE_REGISTRY)


async def refresh_case_gauges(store: Store) -> None:
    """Reads cases by state and the ledger backlog; states without cases report 0."""
    async with store.database.transaction() as conn:
        rows = await (await conn.execute(
            "SELECT status, count(*) AS n FROM refund_cases GROUP BY status")).fetchall()
        pending = await (await conn.execute(
            "SELECT count(*) AS n FROM refund_cases c WHERE c.provider_status = 'succeeded'"
            " AND NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.refund_request_id ="
            " c.refund_request_id AND e.template = %s)", (LedgerKind.REFUND_SETTLED.value,))).fetchone()
    counts = {str(r["status"]): int(r["n"]) for r in rows}
    for known in CaseStatus:
        CASES.labels(known.value).set(counts.pop(known.value, 0))
    for other, n in counts.items():  # a status this build does not know still shows up
        CASES.labels(other).set(n)
    LEDGER_PENDING.set(int(pending["n"]) if pending else 0)
    async with store.database.transaction() as conn:
        breaks = await (await conn.execute(
            "SELECT break_class, state, count(*) AS n FROM reconciliation_breaks"
            " GROUP BY break_class, state")).fetchall()
        runs = await (await conn.execute(
            "SELECT provider, state, count(*) AS n FROM reconciliation_runs"
            " GROUP BY provider, state")).fetchall()
    BREAKS.clear()  # a class and state with no break left reports nothing, not a stale count
    for row in breaks:
        BREAKS.labels(row["break_class"], row["state"]).set(int(row["n"]))
    RUNS.clear()
    for row in runs:
        RUNS.labels(row["provider"], row["state"]).set(int(row["n"]))
    NOTICES_UNSENT.clear()
    for channel, state, n in await store.outbox.unsent():
        NOTICES_UNSENT.labels(channel, state).set(n)


def exposition(*extra: CollectorRegistry) -> tuple[bytes, str]:
    """The process's metrics (and `extra` registries) in Prometheus text format."""
    return b"".join(generate_latest(r) for r in (REGISTRY, *extra)), CONTENT_TYPE_LATEST


def scrape_guard(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """The check in front of /metrics (relay and worker): with REFUNDS_METRICS_TOKEN set, a
    scrape presents one of its tokens as a bearer token (compared in constant time); without
    it, only a loopback bind (`refunds dev`, tests) answers, so a production bind never
    serves case counts and provider error rates to whoever reaches the port."""
    tokens = [t.encode() for t in secret_list(settings.metrics_token)] if settings.metrics_token else []
    open_locally = not tokens and is_loopback(settings.bind_host)
    if not tokens and not open_locally:
        log.warning("/metrics refuses every scrape: REFUNDS_BIND_HOST is %s and REFUNDS_METRICS_TOKEN "
                    "is unset", settings.bind_host)

    async def guard(request: Request) -> None:
        if open_locally:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        offered = presented.strip().encode()
        # every token is compared, so the time taken says nothing about which one was close
        matches = [hmac.compare_digest(offered, token) for token in tokens]
        if scheme.lower() == "bearer" and any(matches):
            return
        detail = ("metrics need the bearer token REFUNDS_METRICS_TOKEN" if tokens else
                  "metrics are off on a non-loopback bind until REFUNDS_METRICS_TOKEN is set")
        raise HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})

    return guard
