"""Benchmark 1: auto-approved refunds per second, end to end on the embedded stack, as a
ratio of a bare workflow running the same number of no-op activities (target >= 0.7);
and the workflow sandbox with our pure modules passed through vs the default sandbox.

    python -m bench.refund_throughput [--refunds 200] [--rounds 4] [--quick]

The activity count of the baseline is read from a real refund's history in the same run.
Each variant has one worker for the whole run (the bare one with the product's sandbox
runner), warmed by a run of its own before the rounds; the rounds rotate which variant goes
first, so a slow spell of this shared machine falls on all of them.
"""

import argparse
import uuid
from contextlib import AsyncExitStack
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from adapters import event_loop
from adapters.policy_file import load_policy
from bench.common import Begin, announce, bare_starter, bare_worker, embedded_stack, report, timed_wave
from domain.models import RefundReason, RefundRequest, RefundWorkflowInput
from tests.harness import Stack, open_stack
from workers.main import build_worker
from workflows.refund import RefundWorkflow

VARIANTS = ("bare", "passthrough", "default")


ACTIVITIES = EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
WORKFLOW_TASKS = EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED


async def history_count(client: Client, workflow_id: str, event: "EventType.ValueType", *,
                        after_first_signal: bool = False) -> int:
    """How many `event`s a finished workflow's history holds (or holds after the first signal
    it got, e.g. an approval): the bare baseline runs as many activities (ACTIVITIES), and
    WORKFLOW_TASKS tells how many round trips to the worker that took."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    counting = not after_first_signal
    found = 0
    for entry in history.events:
        if entry.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            counting = True
        elif counting and entry.event_type == event:
            found += 1
    return found


async def refund_starter(stack: Stack, queue: str, count: int) -> tuple[Begin, str]:
    """Starts the i-th of `count` auto-approved refunds on `queue` as the relay does (the case
    row, then the workflow); charges made beforehand. Also one of the workflow ids."""
    charges = [await stack.charge(10_000) for _ in range(count)]
    tag = uuid.uuid4().hex[:6]

    async def start(i: int) -> WorkflowHandle[Any, Any]:
        request = RefundRequest(refund_request_id=f"bench-{tag}-{i}", provider="sandbox",
                                charge_id=charges[i], amount=1_000, currency="USD",
                                merchant_account="acct_1", reason=RefundReason.DUPLICATE,
                                evidence={"order_id": f"o-{i}"})
        await stack.store.cases.create(request, "bench")
        return await stack.client.start_workflow(
            RefundWorkflow.run, RefundWorkflowInput(request=request, requester="bench",
                                                    timings=stack.settings.timings()),
            id=request.refund_request_id, task_queue=queue)
    return start, f"bench-{tag}-0"


async def main(count: int, concurrency: int, rounds: int) -> dict[str, Any]:
    per_round = max(1, count // rounds)
    warm = max(5, per_round // 2)
    announce("refund_throughput", refunds=per_round * rounds, rounds=rounds, per_round=per_round,
             concurrency=concurrency, warm_up_per_variant=warm)
    async with embedded_stack() as env, AsyncExitStack() as workers:
        stack = await open_stack(env.store, env.client, env.temporal.address, worker=False,
                                 late_failure_window_seconds=0)
        workers.push_async_callback(stack.close)
        queues = {variant: f"{stack.settings.task_queue}-{variant}" for variant in VARIANTS[1:]}
        for variant, queue in queues.items():
            await workers.enter_async_context(build_worker(
                stack.client, queue, stack.store, stack.providers, load_policy(None), settings=stack.settings,
                runner=None if variant == "passthrough" else SandboxedWorkflowRunner()))
        bare_queue = await workers.enter_async_context(bare_worker(env.client))

        async def starter(variant: str, n: int) -> tuple[Begin, str]:
            if variant == "bare":
                return bare_starter(env.client, bare_queue, steps), ""
            return await refund_starter(stack, queues[variant], n)

        steps = 0
        warm_up: dict[str, float] = {}
        for variant in ("passthrough", "default", "bare"):  # the refund first: it tells `steps`
            start, sample = await starter(variant, warm)
            warm_up[variant] = await timed_wave(start, range(warm), concurrency, hold=False)
            if variant == "passthrough":
                steps = await history_count(env.client, sample, ACTIVITIES)
        per_round_seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        orders = []
        for round_number in range(rounds):
            order = VARIANTS[round_number % 3:] + VARIANTS[:round_number % 3]
            orders.append(list(order))
            for variant in order:
                start, _ = await starter(variant, per_round)
                per_round_seconds[variant].append(
                    await timed_wave(start, range(per_round), concurrency, hold=False))
    rate = {v: per_round * rounds / sum(s) for v, s in per_round_seconds.items()}
    bare, ours, default_sandbox = rate["bare"], rate["passthrough"], rate["default"]
    rows = [{"variant": f"bare workflow, {steps} no-op activities (product's sandbox runner)",
             "per_second": bare, "ratio": 1.0},
            {"variant": "refund workflow (passthrough sandbox)", "per_second": ours, "ratio": ours / bare},
            {"variant": "refund workflow (default sandbox)", "per_second": default_sandbox,
             "ratio": default_sandbox / bare}]
    result = {"ratio": ours / bare, "passthrough_vs_default": ours / default_sandbox,
              "activities_per_refund": steps}
    report("refund_throughput", rows, {
        "refunds": per_round * rounds, "rounds": rounds, "per_round": per_round, "concurrency": concurrency,
        "warm_up_runs": {v: warm for v in warm_up}, "warm_up_seconds": warm_up, "round_orders": orders,
        "round_seconds": per_round_seconds,
        "round_ratios": [round(b / p, 3) for b, p in zip(per_round_seconds["bare"],
                                                         per_round_seconds["passthrough"], strict=True)],
        "bare_runner": "workers.main.workflow_runner() (the product's)", "target_ratio": 0.7, **result})
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--refunds", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke run (20 refunds in 2 rounds)")
    args = parser.parse_args()
    event_loop.run(main(20 if args.quick else args.refunds, args.concurrency,
                        2 if args.quick else args.rounds))
