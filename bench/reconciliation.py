"""Benchmark: a reconciliation backfill over 100,000 provider refunds against one over 10,000
(the baseline, measured in the same run), end to end on the embedded stack: the sandbox
lists pages, the worker classifies batches in PostgreSQL, the relay reports. Time per object
should stay flat (linear total time) and so should peak memory (pages are streamed, joins
are set-based); by default 0.1 % of the objects are breaks, which open exception workflows.

    python -m bench.reconciliation [--objects 100000] [--break-every 1000] [--quick]

Runs are warmed (a small backfill first) and interleaved (baseline and measured alternate
over `--rounds` rounds, each over a window of its own); each run's breaks found are held
to the breaks planted in its window, and a difference exits non-zero.

Peak memory is Python's (tracemalloc, reset before each run) across the whole process,
which hosts the worker, the relay and the sandbox provider. It grows with the number of
breaks (each open exception case is a workflow the worker keeps cached while it waits for
approval), not with the number of objects: `--break-every 0` shows the objects' share alone.
Since earlier runs' cached workflows stay in the process, the ratio uses each run's growth
(peak minus what was traced when it began).
"""

import argparse
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from bench.common import announce, embedded_stack, report, run
from starters.cli.progress import follow_run
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
    async with stack.store.database.transaction() as conn:
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
    async with stack.store.database.transaction() as conn:  # statistics, as a live database has them
        await conn.execute("ANALYZE refund_cases, ledger_entries, ledger_lines")


async def backfill(stack: Stack, since: datetime, until: datetime) -> dict[str, Any]:
    """One backfill through the relay, timed with Python's peak memory."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
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
            "peak_mib": tracemalloc.get_traced_memory()[1] / 2**20,
            "peak_growth_mib": (tracemalloc.get_traced_memory()[1] - before) / 2**20}


def planted(count: int, break_every: int) -> int:
    """How many breaks `_refund` plants among `count` objects."""
    return 0 if break_every <= 0 else -(-count // break_every)


async def main(objects: int, break_every: int, rounds: int) -> dict[str, Any]:
    """A warm-up backfill first (its own small window), then `rounds` rounds of a baseline
    and a measured backfill, each over a window of its own, the baseline first in even rounds
    and the measured one first in odd ones. Exits non-zero when a run found a different
    number of breaks than were planted in its window."""
    baseline_objects = max(objects // 10, 100)
    announce("reconciliation", objects=objects, baseline_objects=baseline_objects, break_every=break_every,
             rounds=rounds)
    now = datetime.now(UTC)
    slots = [("warm-up", min(baseline_objects, 500))]
    for number in range(rounds):
        pair = [("baseline", baseline_objects), ("measured", objects)]
        slots += pair if number % 2 == 0 else pair[::-1]
    # Each window its own 15 days.
    windows = [(now - timedelta(days=20 * n + 20), now - timedelta(days=20 * n + 5))
               for n in range(len(slots))]
    tracemalloc.start()
    runs: list[dict[str, Any]] = []
    async with embedded_stack() as env:
        stack = await open_stack(env.store, env.client, env.temporal.address)
        # A window's objects end a minute before the grace at its end: objects younger than
        # that are left to in-flight webhooks by design, not judged (the missed break of the
        # earlier figures was the newest object, planted inside it).
        objects_end = timedelta(seconds=stack.settings.reconciliation_grace_seconds + 60)
        try:
            for (name, count), (since, until) in zip(slots, windows, strict=True):
                started = time.perf_counter()
                await seed(stack, f"{name[0]}{uuid.uuid4().hex[:4]}", count, since, until - objects_end,
                           break_every)
                print(f"seeded {count} {name} objects in {time.perf_counter() - started:.1f}s", flush=True)
            for (name, count), (since, until) in zip(slots, windows, strict=True):
                run = {"run": name, **await backfill(stack, since, until),
                       "planted": planted(count, break_every)}
                print(run, flush=True)
                runs.append(run)
        finally:
            await stack.close()
    tracemalloc.stop()
    measured_runs = [r for r in runs if r["run"] != "warm-up"]

    def pooled(name: str, key: str) -> float:
        chosen = [float(r[key]) for r in measured_runs if r["run"] == name]
        return sum(chosen) / len(chosen)

    def per_object(name: str) -> float:
        return pooled(name, "seconds") / pooled(name, "objects")

    time_ratio = per_object("measured") / per_object("baseline")
    memory_ratio = pooled("measured", "peak_growth_mib") / pooled("baseline", "peak_growth_mib")
    missed = [r for r in runs if r["breaks"] != r["planted"]]
    report("reconciliation", runs, {
        "objects": objects, "baseline_objects": baseline_objects, "break_every": break_every,
        "rounds": rounds, "window_days": 15, "objects_end_before_window_end": str(objects_end),
        "breaks_planted": sum(r["planted"] for r in runs), "breaks_found": sum(r["breaks"] for r in runs),
        "time_per_object_ratio": time_ratio, "peak_growth_ratio": memory_ratio,
        "target": "both ratios near 1.0 (linear time, flat memory); found == planted in every run"})
    if missed:
        raise SystemExit(f"breaks found differ from breaks planted: {missed}")
    return {"time_per_object_ratio": time_ratio, "peak_growth_ratio": memory_ratio}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--break-every", type=int, default=1_000, help="one break per N objects; 0: none")
    parser.add_argument("--rounds", type=int, default=2, help="baseline and measured pairs, alternating")
    parser.add_argument("--quick", action="store_true", help="a smoke run (2,000 objects vs 200, 1 round)")
    args = parser.parse_args()
    run(main(2_000 if args.quick else args.objects, args.break_every,
             1 if args.quick else args.rounds))
