"""Reconciliation schedules: one Temporal Schedule per provider whose refunds can be listed,
starting ReconciliationWorkflow every `reconciliation_interval_seconds` over the trailing
`reconciliation_window_seconds`. Workers and the dev stack ensure them at start: create, or
update to the current settings, so any number of starts leaves one schedule per provider.
"""

from collections.abc import Mapping
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from adapters.config import Settings
from adapters.providers.base import ProviderAdapter, RefundLister
from domain.reconciliation import ReconcileInput

WORKFLOW = "ReconciliationWorkflow"


def schedule_id(settings: Settings, provider: str) -> str:
    return f"reconciliation-{settings.task_queue}-{provider}"


def reconciliation_schedule(settings: Settings, provider: str) -> Schedule:
    """Runs never overlap: a run still going when the next is due makes that one skip."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            WORKFLOW, ReconcileInput(provider=provider, options=settings.reconcile_options()),
            id=f"reconcile-{settings.task_queue}-{provider}", task_queue=settings.task_queue),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(
            every=timedelta(seconds=settings.reconciliation_interval_seconds))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP))


async def ensure_reconciliation_schedules(client: Client, settings: Settings,
                                          providers: Mapping[str, ProviderAdapter]) -> list[str]:
    """Creates or updates the schedule of every listable provider; returns their ids."""
    if settings.reconciliation_interval_seconds <= 0:
        return []
    ensured = []
    for name, provider in providers.items():
        if not isinstance(provider, RefundLister):
            continue
        schedule = reconciliation_schedule(settings, name)

        def replace(_: ScheduleUpdateInput, schedule: Schedule = schedule) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        try:
            await client.create_schedule(schedule_id(settings, name), schedule)
        except ScheduleAlreadyRunningError:
            await client.get_schedule_handle(schedule_id(settings, name)).update(replace)
        ensured.append(schedule_id(settings, name))
    return ensured
