"""Benchmark 1: auto-approved refunds per second, end to end on the embedded stack, as a
ratio of a bare workflow running the same number of no-op activities (target >= 0.7);
and the workflow sandbox with our pure modules passed through vs the default sandbox.

    python -m bench.refund_throughput [--refunds 200] [--quick]
"""

import argparse
import asyncio
import time
import uuid
from functools import partial
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from adapters.policy_file import load_policy
from bench.baseline import BareWorkflow, noop
from bench.common import embedded_stack, gather_limited, report
from domain.models import RefundReason, RefundRequest, RefundWorkflowInput
from tests.harness import Stack, open_stack
from workers.main import build_worker
from workflows.refund import RefundWorkflow

REFUND_ACTIVITIES = 6  # validate, policy, execution_started, submit, ledger, refund_succeeded


async def run_bare(client: Client, count: int, concurrency: int) -> float:
    queue = f"bench-bare-{uuid.uuid4().hex[:6]}"
    async with Worker(client, task_queue=queue, workflows=[BareWorkflow], activities=[noop]):
        return await timed(count, concurrency, lambda i: client.execute_workflow(
            BareWorkflow.run, REFUND_ACTIVITIES, id=f"bare-{queue}-{i}", task_queue=queue))


async def run_refunds(stack: Stack, count: int, concurrency: int, *, passthrough: bool) -> float:
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
        return await timed(count, concurrency, start)


async def create_and_run(stack: Stack, request: RefundRequest, queue: str) -> Any:
    """What the relay does for a new request: the case row, then the workflow."""
    await stack.store.create_case(request, "bench")
    return await stack.client.execute_workflow(
        RefundWorkflow.run, RefundWorkflowInput(request=request, requester="bench",
                                                timings=stack.settings.timings()),
        id=request.refund_request_id, task_queue=queue)


async def timed(count: int, concurrency: int, make: Any) -> float:
    """Workflows per second for `count` runs, `concurrency` at a time."""
    started = time.perf_counter()
    await gather_limited([partial(make, i) for i in range(count)], concurrency)
    return count / (time.perf_counter() - started)


async def main(count: int, concurrency: int) -> dict[str, float]:
    async with embedded_stack() as env:
        stack = await open_stack(env.store, env.client, env.temporal.address, worker=False,
                                 late_failure_window_seconds=0)
        try:
            await run_bare(env.client, max(5, count // 10), concurrency)  # warm-up
            bare = await run_bare(env.client, count, concurrency)
            ours = await run_refunds(stack, count, concurrency, passthrough=True)
            default_sandbox = await run_refunds(stack, count, concurrency, passthrough=False)
        finally:
            await stack.close()
    rows = [{"variant": "bare workflow, 6 no-op activities", "per_second": bare, "ratio": 1.0},
            {"variant": "refund workflow (passthrough sandbox)", "per_second": ours,
             "ratio": ours / bare},
            {"variant": "refund workflow (default sandbox)", "per_second": default_sandbox,
             "ratio": default_sandbox / bare}]
    result = {"ratio": ours / bare, "passthrough_vs_default": ours / default_sandbox}
    report("refund_throughput", rows, {"refunds": count, "concurrency": concurrency,
                                       "target_ratio": 0.7, **result})
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--refunds", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run (20 refunds)")
    args = parser.parse_args()
    asyncio.run(main(20 if args.quick else args.refunds, args.concurrency))
