"""The baseline workflow: as many activities as the refund work it is compared with, doing
nothing. Imports only what the workflow sandbox allows (it re-imports this module); the worker
that runs it is bench.common.bare_worker."""

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="bench_noop")
async def noop(step: int) -> int:
    """Costs only what Temporal costs: schedule, dispatch, complete."""
    return step


@workflow.defn
class BareWorkflow:
    """Runs `steps` no-op activities in sequence, then `local_steps` no-op local activities,
    like a refund's happy path (its provider calls and deliveries, then its database writes
    as local activities)."""

    @workflow.run
    async def run(self, steps: int, local_steps: int = 0) -> int:
        done = 0
        for step in range(steps):
            done += await workflow.execute_activity(
                noop, step, start_to_close_timeout=timedelta(seconds=30))
        for step in range(local_steps):
            done += await workflow.execute_local_activity(
                noop, step, start_to_close_timeout=timedelta(seconds=30))
        return done
