"""Benchmark 4: many refunds waiting for approval at once on the embedded stack.

Starts N refunds that need a person, measures the worker's memory while they all wait,
approves them in bulk and times their completion, as a ratio of the rate of bare
workflows with the same activities measured in the same run. The worker keeps at most
`max_cached_workflows` (Temporal's default 1,000) in memory and replays the rest on
demand, so memory stays bounded while waiting; the embedded dev server (SQLite, one
process) is what limits start and approval rates here, and a real Temporal cluster with
PostgreSQL or Cassandra persistence and several workers is the production path.

    python -m bench.open_cases [--cases 10000] [--wave 500] [--quick]
"""

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import psutil

from adapters import event_loop
from adapters.approval_seal import approval_keys, sealing_client
from adapters.policy_file import load_policy
from bench.common import embedded_stack, gather_limited, report
from bench.refund_throughput import run_bare, scheduled_activities
from domain.models import (
    ApprovalSignal,
    Decision,
    RefundReason,
    RefundRequest,
    RefundWorkflowInput,
)
from tests.harness import Stack, open_stack
from workers.main import build_worker
from workflows.refund import RefundWorkflow

CASES_PER_CHARGE = 10


def rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


async def count(stack: Stack, tag: str, status: str) -> int:
    async with stack.store.transaction() as conn:
        row = await (await conn.execute(
            "SELECT count(*) AS n FROM refund_cases WHERE refund_request_id LIKE %s AND status = %s",
            (f"open-{tag}-%", status))).fetchone()
    return int(row["n"]) if row else 0


async def wait_count(stack: Stack, tag: str, status: str, target: int, timeout: float) -> float:
    started = last_said = time.perf_counter()
    while (reached := await count(stack, tag, status)) < target:
        now = time.perf_counter()
        if now - started > timeout:
            raise TimeoutError(f"only {reached} of {target} reached {status}")
        if now - last_said > 30:  # a long run says how far it is, on stderr
            print(f"{reached}/{target} {status} after {now - started:.0f}s, worker RSS {rss_mib():.0f} MiB",
                  file=sys.stderr, flush=True)
            last_said = now
        await asyncio.sleep(1.0)
    return time.perf_counter() - started


async def in_waves(stack: Stack, tag: str, job: Callable[[int], Callable[[], Awaitable[None]]],
                   cases: int, wave: int, concurrency: int, status: str) -> None:
    """Starts (or approves) `wave` cases, waits until they all reached `status`, then the
    next wave: firing all 10,000 at once drowns one worker on two cores (workflow tasks
    outlive their timeout and are retried, the cache thrashes) and measures only that."""
    for first in range(0, cases, wave):
        last = min(cases, first + wave)
        await gather_limited([job(i) for i in range(first, last)], concurrency)
        await wait_count(stack, tag, status, last, timeout=(last - first) * 3 + 120)


async def main(cases: int, concurrency: int, wave: int) -> dict[str, float]:
    async with embedded_stack() as env:
        stack = await open_stack(env.store, env.client, env.temporal.address, worker=False,
                                 late_failure_window_seconds=0, approval_timeout_seconds=24 * 3600,
                                 approval_reminder_seconds=None, approval_escalation_seconds=None)
        tag = uuid.uuid4().hex[:6]
        try:
            # Ten cases a charge: each case's validation and advice read the charge's other
            # refunds, so 10,000 on one charge would measure that history, not the open cases.
            charges = [await stack.charge(CASES_PER_CHARGE * 6_000)
                       for _ in range(-(-cases // CASES_PER_CHARGE))]
            rss_idle = rss_mib()
            worker = build_worker(stack.client, stack.settings.task_queue, stack.store, stack.providers,
                                  load_policy(None), settings=stack.settings)
            async with worker:
                def start(i: int) -> Callable[[], Awaitable[None]]:
                    async def go() -> None:
                        request = RefundRequest(
                            refund_request_id=f"open-{tag}-{i}", provider="sandbox",
                            charge_id=charges[i // CASES_PER_CHARGE],
                            amount=6_000, currency="USD", merchant_account="acct_1",
                            reason=RefundReason.DUPLICATE, evidence={"order_id": f"o-{i}"})
                        await stack.store.create_case(request, "bench")
                        await stack.client.start_workflow(
                            RefundWorkflow.run, RefundWorkflowInput(request=request, requester="bench",
                                                                    timings=stack.settings.timings()),
                            id=request.refund_request_id, task_queue=stack.settings.task_queue)
                    return go

                began = time.perf_counter()
                await in_waves(stack, tag, start, cases, wave, concurrency, "awaiting_approval")
                opened = time.perf_counter() - began
                rss_waiting = rss_mib()

                relay = sealing_client(stack.client, approval_keys(stack.settings))  # sealed, as the relay's

                def approve(i: int) -> Callable[[], Awaitable[None]]:
                    async def go() -> None:
                        await relay.get_workflow_handle(f"open-{tag}-{i}").signal(
                            RefundWorkflow.approve, ApprovalSignal(
                                approver="bench-approver", roles=("approver",), decision=Decision.APPROVE))
                    return go

                began = time.perf_counter()
                await in_waves(stack, tag, approve, cases, wave, concurrency, "succeeded")
                completed = time.perf_counter() - began
                rss_done = rss_mib()
            # The baseline: bare workflows with as many no-op activities as a case ran.
            steps = await scheduled_activities(stack.client, f"open-{tag}-0")
            baseline = max(20, min(cases, 200))
            bare = baseline / await run_bare(env.client, baseline, concurrency, steps)
        finally:
            await stack.close()
    completion_rate = cases / completed
    rows = [{"phase": f"bare workflows, {steps} no-op activities (baseline)", "per_second": bare},
            {"phase": f"open {cases} cases to awaiting_approval", "per_second": cases / opened},
            {"phase": "approve all and complete", "per_second": completion_rate}]
    result = {"completion_ratio": completion_rate / bare, "rss_idle_mib": rss_idle,
              "rss_waiting_mib": rss_waiting, "rss_done_mib": rss_done,
              "rss_per_waiting_case_kib": (rss_waiting - rss_idle) * 1024 / cases,
              "seconds_to_all_waiting": opened}
    report("open_cases", rows, {"cases": cases, "wave": wave, "concurrency": concurrency, **result})
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--wave", type=int, default=500, help="cases started or approved per wave")
    parser.add_argument("--quick", action="store_true", help="a smoke run (30 cases)")
    args = parser.parse_args()
    event_loop.run(main(30 if args.quick else args.cases, args.concurrency, args.wave))
