"""Benchmark: a reconciliation backfill over 100,000 provider refunds against one over 10,000
(the baseline, measured in the same run), end to end on the embedded stack: the sandbox
lists pages, the worker classifies batches in PostgreSQL, the relay reports. Time per object
should stay flat (linear total time) and so should peak memory (pages are streamed, joins
are set-based); by default 0.1 % of the objects are breaks, which open exception workflows.

    python -m bench.reconciliation [--objects 100000] [--break-every 1000] [--quick]

Peak memory is Python's (tracemalloc, reset before each run) across the whole process,
which hosts the worker, the relay and the sandbox provider. It grows with the number of
breaks (each open exception case is a workflow the worker keeps cached while it waits for
approval), not with the number of objects: `--break-every 0` shows the objects' share alone.
"""

import argparse
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from adapters import event_loop
from bench.common import embedded_stack, report
from starters.progress import follow_run
from tests.harness import Stack, open_stack

IMPORT_CHUNK = 5_000


def _refund(tag: str, i: int, created: datetime, break_every: int) -> dict[str, Any]:
    failed = break_every > 0 and i % break_every == 0  # the provider failed it; we show it refunded
    return {"id": f"re_{tag}_{i}", "charge": f"ch_{tag}_{i // 100}", "amount": 1_000 + i % 5_000,
            "currency": "usd", "status": "failed" if failed else "succeeded",
            "failure_reason": "expired_or_canceled_card" if failed else None,
            "created": int(created.timestamp()), "metadata": {"refund_request_id": f"bench-{tag}-{i}"}}


async def seed(stack: Stack, tag: str, count: int, since: datetime, until: datetime,
               break_every: int) -> None:
    """`count` refunds spread over [since, until) at the sandbox, and their cases (shown
    succeeded, settled in the ledger) in PostgreSQL, in bulk."""
    step = (until - since) / count
    async with stack.sandbox() as sb:
        for start in range(0, count, IMPORT_CHUNK):
            chunk = [_refund(tag, i, until - step * (i + 0.5), break_every)
                     for i in range(start, min(count, start + IMPORT_CHUNK))]
            (await sb.post("/_sandbox/import", json={"refunds": chunk})).raise_for_status()
    async with stack.store.transaction() as conn:
        async with conn.cursor().copy(
                "COPY refund_cases (refund_request_id, provider, charge_id, amount, currency,"
                " merchant_account, reason, source, requester, params_hash, status, provider_refund_id,"
                " provider_status)"
                " FROM STDIN") as copy:
            for i in range(count):
                refund = _refund(tag, i, until, break_every)
                await copy.write_row((f"bench-{tag}-{i}", "sandbox", refund["charge"], refund["amount"],
                                      "USD", "acct_1", "requested_by_customer", "api", "bench", "",
                                      "succeeded", refund["id"], "succeeded"))
        await conn.execute(
            "INSERT INTO ledger_entries (posting_key, refund_request_id, template)"
            " SELECT refund_request_id || ':refund_settled', refund_request_id, 'refund_settled'"
            " FROM refund_cases WHERE refund_request_id LIKE %s", (f"bench-{tag}-%",))
        await conn.execute(
            "INSERT INTO ledger_lines (entry_id, account, debit, credit, currency)"
            " SELECT e.id, a.account, CASE WHEN a.debit THEN c.amount ELSE 0 END,"
            " CASE WHEN a.debit THEN 0 ELSE c.amount END, c.currency"
            " FROM ledger_entries e JOIN refund_cases c ON c.refund_request_id = e.refund_request_id"
            " CROSS JOIN (VALUES ('refunds_contra_revenue', true), ('provider_clearing', false))"
            " AS a(account, debit)"
            " WHERE e.refund_request_id LIKE %s", (f"bench-{tag}-%",))
    async with stack.store.transaction() as conn:  # statistics, as a live database has them
        await conn.execute("ANALYZE refund_cases, ledger_entries, ledger_lines")


async def backfill(stack: Stack, since: datetime, until: datetime) -> dict[str, Any]:
    """One backfill through the relay, timed with Python's peak memory."""
    tracemalloc.reset_peak()
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=60,
                                 headers={"Authorization": f"Bearer {stack.tokens['olga']}"}) as api:
        run = await api.post("/v1/reconciliation/runs", json={
            "provider": "sandbox", "since": since.isoformat(), "until": until.isoformat()})
        run.raise_for_status()
        result = await follow_run(api, run.json()["run_id"], show_progress=False, poll_seconds=0.1)
    seconds = time.perf_counter() - started
    return {"objects": result["objects_seen"], "breaks": result["new_breaks"], "seconds": seconds,
            "per_second": result["objects_seen"] / seconds,
            "peak_mib": tracemalloc.get_traced_memory()[1] / 2**20}


async def main(objects: int, break_every: int) -> dict[str, float]:
    baseline_objects = max(objects // 10, 100)
    now = datetime.now(UTC)
    windows = {"baseline": (now - timedelta(days=200), now - timedelta(days=110), baseline_objects),
               "measured": (now - timedelta(days=100), now - timedelta(days=10), objects)}
    tracemalloc.start()
    async with embedded_stack() as env:
        stack = await open_stack(env.store, env.client, env.temporal.address)
        try:
            for name, (since, until, count) in windows.items():
                started = time.perf_counter()
                await seed(stack, f"{name}{uuid.uuid4().hex[:4]}", count, since, until, break_every)
                print(f"seeded {count} {name} objects in {time.perf_counter() - started:.1f}s", flush=True)
            base = await backfill(stack, *windows["baseline"][:2])
            measured = await backfill(stack, *windows["measured"][:2])
        finally:
            await stack.close()
    tracemalloc.stop()
    time_ratio = (measured["seconds"] / measured["objects"]) / (base["seconds"] / base["objects"])
    memory_ratio = measured["peak_mib"] / base["peak_mib"]
    rows = [{"run": "baseline", **base, "time_per_object_ratio": 1.0, "peak_ratio": 1.0},
            {"run": "measured", **measured, "time_per_object_ratio": time_ratio, "peak_ratio": memory_ratio}]
    report("reconciliation", rows, {"objects": objects, "baseline_objects": baseline_objects,
                                    "break_every": break_every,
                                    "time_per_object_ratio": time_ratio, "peak_memory_ratio": memory_ratio,
                                    "target": "both ratios near 1.0 (linear time, flat memory)"})
    return {"time_per_object_ratio": time_ratio, "peak_memory_ratio": memory_ratio}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--break-every", type=int, default=1_000, help="one break per N objects; 0: none")
    parser.add_argument("--quick", action="store_true", help="a smoke run (2,000 objects vs 200)")
    args = parser.parse_args()
    event_loop.run(main(2_000 if args.quick else args.objects, args.break_every))
