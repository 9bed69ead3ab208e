"""Benchmark 1: auto-approved refunds per second, end to end on the embedded stack, against
two bare workflows of no-op activities in the same run: today's shape before issue 21 (9
activities; target >= 1.5x) and the product's new shape (as many activities and local
activities as a real refund's history holds; target >= 0.85); and the workflow sandbox with
our pure modules passed through vs the default sandbox. Also the history events of a real
auto-approved refund and of one with an approval (targets <= 35 and <= 55), each counted
from a refund run with the product's timings and a late-failure watch (1 s: the waves run
without one, so that their workflows end with their refunds).

    python -m bench.refund_throughput [--refunds 200] [--rounds 4] [--quick]

Each variant has one worker for the whole run, in a process of its own as production runs
it (`bench.worker_process`; the bare ones share one, with the product's sandbox runner), so
the load client, the relay and the sandbox provider (the provider's cloud, in production)
take no turns on a worker's interpreter lock. The CPU each part spent per workflow (dev
server, PostgreSQL, each worker, this process) is printed per variant: where a ratio's
difference goes. Each is warmed by a run of its own before the
rounds; the rounds rotate which variant goes first, so a slow spell of this shared machine
falls on all of them.
"""

import argparse
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

from prometheus_client import REGISTRY
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from adapters.approval_seal import approval_keys, sealing_client
from bench.common import (
    PRODUCT_TIMINGS,
    Begin,
    CpuMeter,
    announce,
    bare_starter,
    embedded_stack,
    relay_stack,
    report,
    run,
    timed_wave,
)
from bench.worker_process import worker_process
from domain.models import (
    ApprovalSignal,
    Decision,
    RefundReason,
    RefundRequest,
    RefundTimings,
    RefundWorkflowInput,
)
from tests.harness import Stack
from workflows.refund import RefundWorkflow

VARIANTS = ("bare", "bare_new", "passthrough", "default")
BASELINE_ACTIVITIES = 9
"""The refund's activities before issue 21 (its baseline, measured then): the 1.5x target's."""


ACTIVITIES = EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
WORKFLOW_TASKS = EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
MARKERS = EventType.EVENT_TYPE_MARKER_RECORDED
TIMERS = EventType.EVENT_TYPE_TIMER_STARTED
LOCAL_ACTIVITY_MARKER = "core_local_activity"


async def history_shape(client: Client, workflow_id: str, *,
                        after_first_signal: bool = False) -> dict[str, int]:
    """A finished workflow's history (or its part after the first signal it got, e.g. an
    approval): its events, activities, local activities and workflow tasks (what the dev
    server pays for, per workflow; a bare baseline runs as many activities)."""
    events = list((await client.get_workflow_handle(workflow_id).fetch_history()).events)
    if after_first_signal:
        signalled = next(i for i, e in enumerate(events)
                         if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
        events = events[signalled:]
    return {"events": len(events),
            "activities": sum(e.event_type == ACTIVITIES for e in events),
            "local_activities": sum(e.event_type == MARKERS and e.marker_recorded_event_attributes.marker_name
                                    == LOCAL_ACTIVITY_MARKER for e in events),
            "workflow_tasks": sum(e.event_type == WORKFLOW_TASKS for e in events),
            "timers": sum(e.event_type == TIMERS for e in events)}


def provider_events() -> dict[str, float]:
    """The sandbox's webhooks the relay (in this process) accepted so far, and those of them
    it did not signal: they repeated the settled status the case's workflow had applied."""
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"provider": "sandbox", **labels}) or 0.0
    return {"accepted": sample("refunds_webhook_receipts_total", verdict="accepted"),
            "not_signalled": sample("refunds_webhook_events_without_news_total")}


async def refund_starter(stack: Stack, queue: str, count: int, amount: int = 1_000,
                         timings: RefundTimings | None = None) -> tuple[Begin, str]:
    """Starts the i-th of `count` refunds of `amount` (1,000: auto-approved) on `queue` as the
    relay does (the case row, then the workflow, with the stack's `timings` unless others are
    given); charges made beforehand. Also one of the workflow ids."""
    charges = [await stack.charge(10_000) for _ in range(count)]
    tag = uuid.uuid4().hex[:6]

    async def start(i: int) -> WorkflowHandle[Any, Any]:
        request = RefundRequest(refund_request_id=f"bench-{tag}-{i}", provider="sandbox",
                                charge_id=charges[i], amount=amount, currency="USD",
                                merchant_account="acct_1", reason=RefundReason.DUPLICATE,
                                evidence={"order_id": f"o-{i}"})
        await stack.store.cases.create(request, "bench")
        return await stack.client.start_workflow(
            RefundWorkflow.run, RefundWorkflowInput(request=request, requester="bench",
                                                    timings=timings or stack.settings.timings()),
            id=request.refund_request_id, task_queue=queue)
    return start, f"bench-{tag}-0"


SAMPLE_TIMINGS = {**PRODUCT_TIMINGS, "late_failure_window_seconds": 1}
"""The product's timings for the refunds whose histories are counted, with a late-failure
watch (a timer after the success, its window shortened to 1 s so the workflow ends): the
timed waves run without one (`late_failure_window_seconds=0`, so a wave's workflows end with
their refund), and their histories lack the watch and the webhooks it takes."""


async def refund_statuses(stack: Stack) -> dict[str, int]:
    """How many of the run's refunds (every case in the bench's own database) end in each
    status."""
    rows = await stack.store.database.fetch_all(
        "SELECT status, count(*) AS n FROM refund_cases GROUP BY status ORDER BY status")
    return {str(r["status"]): int(r["n"]) for r in rows}


async def history_of_one(stack: Stack, queue: str, *, approval: bool) -> dict[str, int]:
    """The whole history of one refund with the product's timings and a late-failure watch:
    auto-approved, or one that needs an approval (above the policy's threshold), approved by
    a sealed update as the relay sends it."""
    timings = stack.settings.model_copy(update=SAMPLE_TIMINGS).timings()
    start, case_id = await refund_starter(stack, queue, 1, amount=9_000 if approval else 1_000,
                                          timings=timings)
    handle = await start(0)
    if approval:
        relay = sealing_client(stack.client, approval_keys(stack.settings))
        await stack.wait_for_status(case_id, "awaiting_approval")
        await relay.get_workflow_handle(case_id).execute_update(
            RefundWorkflow.submit_approval,
            ApprovalSignal(approver="bench-approver", roles=("approver",), decision=Decision.APPROVE))
    await handle.result()
    return await history_shape(stack.client, case_id)


async def main(count: int, concurrency: int, rounds: int) -> dict[str, Any]:
    per_round = max(1, count // rounds)
    warm = max(5, per_round // 2)
    announce("refund_throughput", refunds=per_round * rounds, rounds=rounds, per_round=per_round,
             concurrency=concurrency, warm_up_per_variant=warm)
    async with embedded_stack() as env, AsyncExitStack() as workers:
        stack = await relay_stack(env, late_failure_window_seconds=0)
        workers.push_async_callback(stack.close)
        queues = {variant: f"{stack.settings.task_queue}-{variant}" for variant in VARIANTS[2:]}
        processes = {}
        for variant, queue in queues.items():
            processes[variant] = await workers.enter_async_context(worker_process(
                stack.settings.model_copy(update={"task_queue": queue}), env.dsn,
                default_sandbox=variant == "default"))
        bare_queue = f"bench-bare-{uuid.uuid4().hex[:6]}"
        processes["bare"] = await workers.enter_async_context(
            worker_process(stack.settings, env.dsn, bare_queue=bare_queue))
        meter = CpuMeter(env, processes)

        async def starter(variant: str, n: int) -> tuple[Begin, str]:
            if variant == "bare":
                return bare_starter(env.client, bare_queue, BASELINE_ACTIVITIES), ""
            if variant == "bare_new":
                return bare_starter(env.client, bare_queue, auto["activities"], auto["local_activities"]), ""
            return await refund_starter(stack, queues[variant], n)

        auto: dict[str, int] = {}
        warm_up: dict[str, float] = {}
        for variant in ("passthrough", "default", "bare", "bare_new"):  # the refund first: its shape
            start, sample = await starter(variant, warm)
            warm_up[variant] = await timed_wave(start, range(warm), concurrency, hold=False)
            if variant == "passthrough":
                auto = await history_shape(env.client, sample)
        counted = {"auto_approved": await history_of_one(stack, queues["passthrough"], approval=False),
                   "one_approval": await history_of_one(stack, queues["passthrough"], approval=True)}
        per_round_seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu_seconds: dict[str, Counter[str]] = {v: Counter() for v in VARIANTS}
        orders = []
        events_before = provider_events()
        for round_number in range(rounds):
            turn = round_number % len(VARIANTS)
            order = VARIANTS[turn:] + VARIANTS[:turn]
            orders.append(list(order))
            for variant in order:
                start, _ = await starter(variant, per_round)
                before = meter.read()
                per_round_seconds[variant].append(
                    await timed_wave(start, range(per_round), concurrency, hold=False))
                after = meter.read()
                cpu_seconds[variant].update({part: after[part] - before[part] for part in after})
        events_after = provider_events()
        statuses = await refund_statuses(stack)
    if set(statuses) != {"succeeded"}:  # a wave of refunds that failed fast is no rate of refunds
        raise SystemExit(f"refund_throughput: every timed refund must succeed: {statuses}")
    rate = {v: per_round * rounds / sum(s) for v, s in per_round_seconds.items()}
    bare, bare_new = rate["bare"], rate["bare_new"]
    ours, default_sandbox = rate["passthrough"], rate["default"]
    rows = [{"variant": f"bare workflow, {BASELINE_ACTIVITIES} no-op activities (the shape before issue 21)",
             "per_second": bare, "ratio": 1.0},
            {"variant": f"bare workflow, {auto['activities']} no-op activities + {auto['local_activities']} "
                        "local (the refund's new shape)", "per_second": bare_new, "ratio": bare_new / bare},
            {"variant": "refund workflow (passthrough sandbox)", "per_second": ours, "ratio": ours / bare},
            {"variant": "refund workflow (default sandbox)", "per_second": default_sandbox,
             "ratio": default_sandbox / bare}]
    cpu_ms = {v: {part: round(1000 * spent / (per_round * rounds), 1) for part, spent in parts.items()}
              for v, parts in cpu_seconds.items()}
    result = {"ratio_vs_9_activity_baseline": ours / bare, "ratio_vs_new_shape": ours / bare_new,
              "cpu_ms_per_workflow": cpu_ms,
              "cpu_per_refund_vs_new_shape": sum(cpu_seconds["passthrough"].values())
              / sum(cpu_seconds["bare_new"].values()),
              "passthrough_vs_default": ours / default_sandbox,
              "refund_statuses": statuses,
              "events_per_refund": {kind: shape["events"] for kind, shape in counted.items()},
              "events_per_refund_in_waves": {"auto_approved": auto["events"]},
              "provider_webhooks_in_rounds": {part: int(events_after[part] - events_before[part])
                                              for part in events_after},
              "auto_approved_history": counted["auto_approved"],
              "one_approval_history": counted["one_approval"],
              "counted_with": f"the product's timings and a late-failure watch of 1 s ({SAMPLE_TIMINGS})",
              "wave_history": auto}
    report("refund_throughput", rows, {
        "refunds": per_round * rounds, "rounds": rounds, "per_round": per_round, "concurrency": concurrency,
        "warm_up_runs": {v: warm for v in warm_up}, "warm_up_seconds": warm_up, "round_orders": orders,
        "round_seconds": per_round_seconds,
        "round_ratios_vs_9_activity_baseline": [
            round(b / p, 3) for b, p in zip(per_round_seconds["bare"], per_round_seconds["passthrough"],
                                            strict=True)],
        "round_ratios_vs_new_shape": [
            round(b / p, 3) for b, p in zip(per_round_seconds["bare_new"], per_round_seconds["passthrough"],
                                            strict=True)],
        "bare_runner": "workers.main.workflow_runner() and worker_tuning() (the product's sandbox, "
                       "cache, slots and sticky timeout)",
        "workers": "one process per variant (bench.worker_process); the bare variants share one",
        "targets": {"vs_9_activity_baseline": 1.5, "vs_new_shape": 0.85, "events_auto_approved": 35,
                    "events_one_approval": 55}, **result})
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--refunds", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke run (20 refunds in 2 rounds)")
    args = parser.parse_args()
    run(main(20 if args.quick else args.refunds, args.concurrency,
             2 if args.quick else args.rounds))
