"""Benchmark 1: auto-approved refunds per second, end to end on the embedded stack, as a
ratio of a bare workflow running the same number of no-op activities (target >= 0.7);
and the workflow sandbox with our pure modules passed through vs the default sandbox.

    python -m bench.refund_throughput [--refunds 200] [--rounds 4] [--quick]

The activity count of the baseline is read from a real refund's history in the same run.
"""

import argparse
import time
import uuid
from functools import partial
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from adapters import event_loop
from adapters.policy_file import load_policy
from bench.baseline import BareWorkflow, noop
from bench.common import embedded_stack, gather_limited, report
from domain.models import RefundReason, RefundRequest, RefundWorkflowInput
from tests.harness import Stack, open_stack
from workers.main import build_worker
from workflows.refund import RefundWorkflow


async def scheduled_activities(client: Client, workflow_id: str) -> int:
    """How many activities a finished workflow ran: the bare baseline runs as many."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return sum(1 for e in history.events if e.HasField("activity_task_scheduled_event_attributes"))


async def run_bare(client: Client, count: int, concurrency: int, steps: int) -> float:
    """Seconds for `count` bare workflows of `steps` no-op activities."""
    queue = f"bench-bare-{uuid.uuid4().hex[:6]}"
    async with Worker(client, task_queue=queue, workflows=[BareWorkflow], activities=[noop]):
        return await timed(count, concurrency, lambda i: client.execute_workflow(
            BareWorkflow.run, steps, id=f"bare-{queue}-{i}", task_queue=queue))


async def run_refunds(stack: Stack, count: int, concurrency: int, *,
                      passthrough: bool) -> tuple[float, str]:
    """Seconds for `count` auto-approved refunds end to end, and one of their workflow ids."""
    charges = [await stack.charge(10_000) for _ in range(count)]
    queue = f"{stack.settings.task_queue}-{'pass' if passthrough else 'default'}"
    worker = build_worker(stack.client, queue, stack.store, stack.providers, load_policy(None),
                          settings=stack.settings,
                          runner=None if passthrough else SandboxedWorkflowRunner())
    tag = uuid.uuid4().hex[:6]

    def start(i: int) -> Any:
        request = RefundRequest(refund_request_id=f"bench-{tag}-{i}", provider="sandbox",
                                charge_id=charges[i], amount=1_000, currency="USD",
                                merchant_account="acct_1", reason=RefundReason.DUPLICATE,
                                evidence={"order_id": f"o-{i}"})
        return create_and_run(stack, request, queue)

    async with worker:
        return await timed(count, concurrency, start), f"bench-{tag}-0"


async def create_and_run(stack: Stack, request: RefundRequest, queue: str) -> Any:
    """What the relay does for a new request: the case row, then the workflow."""
    await stack.store.create_case(request, "bench")
    return await stack.client.execute_workflow(
        RefundWorkflow.run, RefundWorkflowInput(request=request, requester="bench",
                                                timings=stack.settings.timings()),
        id=request.refund_request_id, task_queue=queue)


async def timed(count: int, concurrency: int, make: Any) -> float:
    """Seconds for `count` runs, `concurrency` at a time."""
    started = time.perf_counter()
    await gather_limited([partial(make, i) for i in range(count)], concurrency)
    return time.perf_counter() - started


async def main(count: int, concurrency: int, rounds: int) -> dict[str, float]:
    """The variants take turns in `rounds` rounds, so a slow spell of this shared machine
    falls on all of them rather than on whichever ran then."""
    per_round = max(1, count // rounds)
    async with embedded_stack() as env:
        stack = await open_stack(env.store, env.client, env.temporal.address, worker=False,
                                 late_failure_window_seconds=0)
        try:
            _, sample = await run_refunds(stack, max(5, count // 10), concurrency, passthrough=True)
            steps = await scheduled_activities(env.client, sample)
            await run_bare(env.client, max(5, count // 10), concurrency, steps)  # warm-up
            seconds = {"bare": 0.0, "passthrough": 0.0, "default": 0.0}
            for _ in range(rounds):
                seconds["bare"] += await run_bare(env.client, per_round, concurrency, steps)
                for variant in ("passthrough", "default"):
                    took, _ = await run_refunds(stack, per_round, concurrency,
                                                passthrough=variant == "passthrough")
                    seconds[variant] += took
        finally:
            await stack.close()
    rate = {k: per_round * rounds / v for k, v in seconds.items()}
    bare, ours, default_sandbox = rate["bare"], rate["passthrough"], rate["default"]
    rows = [{"variant": f"bare workflow, {steps} no-op activities", "per_second": bare, "ratio": 1.0},
            {"variant": "refund workflow (passthrough sandbox)", "per_second": ours,
             "ratio": ours / bare},
            {"variant": "refund workflow (default sandbox)", "per_second": default_sandbox,
             "ratio": default_sandbox / bare}]
    result = {"ratio": ours / bare, "passthrough_vs_default": ours / default_sandbox,
              "activities_per_refund": float(steps)}
    report("refund_throughput", rows, {"refunds": per_round * rounds, "rounds": rounds,
                                       "concurrency": concurrency, "target_ratio": 0.7, **result})
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--refunds", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke run (20 refunds)")
    args = parser.parse_args()
    event_loop.run(main(20 if args.quick else args.refunds, args.concurrency,
                        2 if args.quick else args.rounds))
