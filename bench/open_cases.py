"""Benchmark 4: many refunds waiting for approval at once on the embedded stack.

Starts N refunds that need a person, measures the worker's memory while they all wait,
approves them in bulk and times their completion, as a ratio of the rate of bare
workflows with the same activities measured in the same run. The worker keeps at most
`max_cached_workflows` (Temporal's default 1,000) in memory and replays the rest on
demand, so memory stays bounded while waiting; the embedded dev server (SQLite, one
process) is what limits start and approval rates here, and a real Temporal cluster with
PostgreSQL or Cassandra persistence and several workers is the production path.

    python -m bench.open_cases [--cases 10000] [--wave 500] [--quick]

The baseline is like for like: bare workflows of as many no-op activities as a case runs
after its approval, a wave at a time at the same concurrency, alternating with the approval
waves, both sides warmed and on workers with the product's sandbox runner. Each worker runs
in a process of its own (`bench.worker_process`), as production runs it, so the memory
reported is the product worker's own; the load client and the sandbox provider share this
one. The worker's settings come from the REFUNDS_* variables and are reported.
"""

import argparse
import asyncio
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import psutil
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import Client, WorkflowHandle

from adapters.approval_seal import approval_keys, sealing_client
from bench.common import (
    PRODUCT_TIMINGS,
    Begin,
    announce,
    bare_starter,
    embedded_stack,
    gather_limited,
    relay_stack,
    report,
    run,
    timed_wave,
)
from bench.refund_throughput import history_shape
from bench.worker_process import peak_rss_mib, worker_process
from domain.models import (
    ApprovalSignal,
    Decision,
    RefundReason,
    RefundRequest,
    RefundWorkflowInput,
)
from tests.harness import Stack
from workflows.refund import RefundWorkflow

CASES_PER_CHARGE = 8
"""Eight 60.00 refunds a charge: 480.00 in all stays in the standard tier (one approver, as
the bench's one approver signal gives), the tier being chosen on what leaves the charge."""
WORKER_TUNING = ("worker_max_cached_workflows", "worker_max_concurrent_workflow_tasks",
                 "worker_max_concurrent_activities", "worker_max_concurrent_local_activities",
                 "worker_sticky_queue_timeout_seconds")
"""The worker's settings a run reports (set them as REFUNDS_* variables to compare)."""


def rss_mib(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


async def count(stack: Stack, tag: str, status: str) -> int:
    async with stack.store.database.transaction() as conn:
        row = await (await conn.execute(
            "SELECT count(*) AS n FROM refund_cases WHERE refund_request_id LIKE %s AND status = %s",
            (f"open-{tag}-%", status))).fetchone()
    return int(row["n"]) if row else 0


async def wait_count(stack: Stack, tag: str, status: str, target: int, timeout: float,
                     worker: psutil.Process) -> float:
    started = last_said = time.perf_counter()
    while (reached := await count(stack, tag, status)) < target:
        now = time.perf_counter()
        if now - started > timeout:
            raise TimeoutError(f"only {reached} of {target} reached {status}")
        if now - last_said > 30:  # a long run says how far it is, on stderr
            print(f"{reached}/{target} {status} after {now - started:.0f}s, "
                  f"worker RSS {rss_mib(worker):.0f} MiB", file=sys.stderr, flush=True)
            last_said = now
        await asyncio.sleep(1.0)
    return time.perf_counter() - started


async def in_waves(stack: Stack, tag: str, job: Callable[[int], Callable[[], Awaitable[None]]],
                   cases: int, wave: int, concurrency: int, status: str, worker: psutil.Process) -> None:
    """Starts `wave` cases, waits until they all reached `status`, then the next wave: firing
    all 10,000 at once drowns one worker on two cores (workflow tasks outlive their timeout
    and are retried, the cache thrashes) and measures only that."""
    for first in range(0, cases, wave):
        last = min(cases, first + wave)
        await gather_limited([job(i) for i in range(first, last)], concurrency)
        await wait_count(stack, tag, status, last, timeout=(last - first) * 3 + 120, worker=worker)


def case_opener(stack: Stack, tag: str, charges: list[str]) -> Callable[[int], Callable[[], Awaitable[None]]]:
    """The i-th case of `tag` as the relay opens it (the case row, then the workflow); it
    waits for an approver."""
    def start(i: int) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            request = RefundRequest(
                refund_request_id=f"open-{tag}-{i}", provider="sandbox",
                charge_id=charges[i // CASES_PER_CHARGE],
                amount=6_000, currency="USD", merchant_account="acct_1",
                reason=RefundReason.DUPLICATE, evidence={"order_id": f"o-{i}"})
            await stack.store.cases.create(request, "bench")
            await stack.client.start_workflow(
                RefundWorkflow.run, RefundWorkflowInput(request=request, requester="bench",
                                                        timings=stack.settings.timings()),
                id=request.refund_request_id, task_queue=stack.settings.task_queue)
        return go
    return start


async def workflow_task_trouble(client: Client, workflow_ids: list[str], concurrency: int) -> dict[str, int]:
    """Workflow tasks that timed out or failed, over every case's history (issue 21's target:
    none), how many of those waited on the sticky queue past its timeout (the others ran past
    the task timeout), how many cases had any, and activities that timed out (a submit among
    them is verified before anything is sent again)."""
    found = {"timed_out": 0, "failed": 0, "cases_with_any": 0, "activities_timed_out": 0,
             "timed_out_on_sticky_queue": 0}

    def check(workflow_id: str) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
            kinds = Counter(e.event_type for e in events)
            timed_out = kinds[EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT]
            failed = kinds[EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
            found["timed_out"] += timed_out
            found["failed"] += failed
            found["cases_with_any"] += bool(timed_out or failed)
            found["activities_timed_out"] += kinds[EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT]
            sticky = TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START  # waited for the caching worker
            found["timed_out_on_sticky_queue"] += sum(
                e.workflow_task_timed_out_event_attributes.timeout_type == sticky
                for e in events if timed_out and e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)
        return go
    await gather_limited([check(w) for w in workflow_ids], concurrency)
    return found


def approver(stack: Stack, tag: str) -> Begin:
    """Approves the i-th waiting case of `tag`; its handle, to await its end."""
    relay = sealing_client(stack.client, approval_keys(stack.settings))  # sealed, as the relay's

    async def approve(i: int) -> WorkflowHandle[Any, Any]:
        handle = relay.get_workflow_handle(f"open-{tag}-{i}")
        await handle.signal(RefundWorkflow.approve, ApprovalSignal(
            approver="bench-approver", roles=("approver",), decision=Decision.APPROVE))
        return handle
    return approve


async def open_cases(stack: Stack, tag: str, cases: int, wave: int, concurrency: int,
                     worker: psutil.Process) -> float:
    """Seconds to open `cases` cases (eight a charge: each case's validation and advice read
    the charge's other refunds, so 10,000 on one charge would measure that history) until
    all wait for approval."""
    charges = [await stack.charge(CASES_PER_CHARGE * 6_000) for _ in range(-(-cases // CASES_PER_CHARGE))]
    began = time.perf_counter()
    await in_waves(stack, tag, case_opener(stack, tag, charges), cases, wave, concurrency,
                   "awaiting_approval", worker)
    return time.perf_counter() - began


async def main(cases: int, concurrency: int, wave: int) -> dict[str, Any]:
    """Opens every case, then completes them in rounds of one wave each, alternating with a
    wave of bare workflows of as many no-op activities as a case runs after its approval,
    started at the same concurrency and awaited together as the approved wave is (up to
    `wave` in flight on both sides); bare first in even rounds, approvals first in odd ones.
    A warm-up wave of each (at most 20) runs first and tells the activity count."""
    warm = min(wave, 20)
    announce("open_cases", cases=cases, wave=wave, concurrency=concurrency, warm_up=warm)
    async with embedded_stack() as env, AsyncExitStack() as workers:
        stack = await relay_stack(env, late_failure_window_seconds=0, approval_timeout_seconds=24 * 3600,
                                  approval_reminder_seconds=None, approval_escalation_seconds=None,
                                  **PRODUCT_TIMINGS)
        workers.push_async_callback(stack.close)
        tag, warm_tag = uuid.uuid4().hex[:6], uuid.uuid4().hex[:6]
        worker_tuning = {name: getattr(stack.settings, name) for name in WORKER_TUNING}
        worker = await workers.enter_async_context(worker_process(stack.settings, env.dsn))
        rss_idle = rss_mib(worker)
        bare_queue = f"bench-bare-{uuid.uuid4().hex[:6]}"
        await workers.enter_async_context(worker_process(stack.settings, env.dsn, bare_queue=bare_queue))
        await open_cases(stack, warm_tag, warm, wave, concurrency, worker)
        warm_seconds = {"approve": await timed_wave(approver(stack, warm_tag), range(warm), concurrency,
                                                    hold=True)}
        after = await history_shape(env.client, f"open-{warm_tag}-0", after_first_signal=True)
        steps, local_steps = after["activities"], after["local_activities"]
        bare = bare_starter(env.client, bare_queue, steps, local_steps)
        warm_seconds["bare"] = await timed_wave(bare, range(warm), concurrency, hold=True)
        sample = await bare(warm)  # outside the timing: what the two histories hold
        await sample.result()
        workflow_tasks = {"case_after_approval": after["workflow_tasks"],
                          "bare": (await history_shape(env.client, sample.id))["workflow_tasks"]}
        events_per_case = {"whole": (await history_shape(env.client, f"open-{warm_tag}-0"))["events"],
                           "after_approval": after["events"]}

        opened = await open_cases(stack, tag, cases, wave, concurrency, worker)
        rss_waiting = rss_mib(worker)
        rounds: list[dict[str, Any]] = []
        approve = approver(stack, tag)
        for number, first in enumerate(range(0, cases, wave)):
            indices = range(first, min(cases, first + wave))
            order = ("bare", "approve") if number % 2 == 0 else ("approve", "bare")
            seconds = {kind: await timed_wave(bare if kind == "bare" else approve, indices, concurrency,
                                              hold=True) for kind in order}
            rounds.append({"round": number, "workflows": len(indices), "first": order[0],
                           "bare_seconds": seconds["bare"], "approve_seconds": seconds["approve"]})
        rss_done, rss_high_water = rss_mib(worker), peak_rss_mib(worker)
        # The kernel raises its high-water mark lazily, so it can trail a sample by a few pages.
        rss_peak = max(rss_high_water, rss_idle, rss_waiting, rss_done)
        task_trouble = await workflow_task_trouble(env.client, [f"open-{tag}-{i}" for i in range(cases)],
                                                   concurrency)
    bare_rate = cases / sum(r["bare_seconds"] for r in rounds)
    completion_rate = cases / sum(r["approve_seconds"] for r in rounds)
    shape = f"{steps} activities + {local_steps} local"
    rows = [{"phase": f"bare workflows, {shape} no-op (baseline)", "per_second": bare_rate},
            {"phase": f"open {cases} cases to awaiting_approval", "per_second": cases / opened},
            {"phase": f"approve and complete ({shape} each)", "per_second": completion_rate}]
    result = {"completion_ratio": completion_rate / bare_rate, "activities_after_approval": steps,
              "local_activities_after_approval": local_steps, "baseline_activities": steps,
              "baseline_local_activities": local_steps, "events_per_case": events_per_case,
              "seconds_to_approve_and_finish": sum(r["approve_seconds"] for r in rounds),
              "workflow_tasks": workflow_tasks, "workflow_task_trouble": task_trouble,
              "rss_idle_mib": rss_idle,
              "rss_waiting_mib": rss_waiting, "rss_done_mib": rss_done, "rss_peak_mib": rss_peak,
              "rss_high_water_mib": rss_high_water,
              "rss_per_waiting_case_kib": (rss_waiting - rss_idle) * 1024 / cases,
              "seconds_to_all_waiting": opened}
    report("open_cases", rows, {"cases": cases, "wave": wave, "concurrency": concurrency,
                                "worker_tuning": worker_tuning,
                                "in_flight_per_round": wave, "warm_up_workflows": warm,
                                "warm_up_seconds": warm_seconds, "rounds": rounds,
                                "round_ratios": [round(r["bare_seconds"] / r["approve_seconds"], 3)
                                                 for r in rounds], **result})
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--wave", type=int, default=500,
                        help="cases started or approved per wave; bare workflows per round")
    parser.add_argument("--quick", action="store_true", help="a smoke run (30 cases in waves of 10)")
    args = parser.parse_args()
    run(main(30 if args.quick else args.cases, args.concurrency, 10 if args.quick else args.wave))
