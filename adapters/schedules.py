"""Reconciliation schedules: one Temporal Schedule per provider whose refunds can be listed,
starting ReconciliationWorkflow every `reconciliation_interval_seconds` over the trailing
`reconciliation_window_seconds`. Workers and the dev stack ensure them at start: create, or
update to the current settings (keeping a pause ops set), so any number of starts leaves one
schedule per provider; one the settings no longer ask for is deleted.
"""

import dataclasses
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
from temporalio.service import RPCError, RPCStatusCode

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
    """Creates or updates the schedule of every listable provider, keeping the state ops gave
    it (a pause and its note survive every worker start), and deletes this task queue's
    schedules the settings no longer ask for (the interval turned off, a provider removed);
    returns the ids ensured."""
    ensured = []
    for name, provider in providers.items():
        if settings.reconciliation_interval_seconds <= 0 or not isinstance(provider, RefundLister):
            continue
        schedule = reconciliation_schedule(settings, name)

        def replace(current: ScheduleUpdateInput, schedule: Schedule = schedule) -> ScheduleUpdate:
            kept = current.description.schedule.state
            return ScheduleUpdate(schedule=dataclasses.replace(schedule, state=kept))

        try:
            await client.create_schedule(schedule_id(settings, name), schedule)
        except ScheduleAlreadyRunningError:
            await client.get_schedule_handle(schedule_id(settings, name)).update(replace)
        ensured.append(schedule_id(settings, name))
    async for listed in await client.list_schedules():
        if not listed.id.startswith(schedule_id(settings, "")) or listed.id in ensured:
            continue
        handle = client.get_schedule_handle(listed.id)
        try:
            action = (await handle.describe()).schedule.action
            # the id's prefix alone would match another queue whose name extends this one's
            if isinstance(action, ScheduleActionStartWorkflow) and action.task_queue == settings.task_queue:
                await handle.delete()
        except RPCError as err:  # another worker starting beside this one deleted it first
            if err.status is not RPCStatusCode.NOT_FOUND:
                raise
    return ensured
