"""The refund worker: workflows plus activities on one task queue, with its probes and
metrics endpoint, the Temporal SDK's metrics, tracing and encrypted payloads (both
inherited from the client built by `adapters.temporal_client.connect`).

Pure modules (`domain`, pydantic, iso4217) and the workflow modules themselves are passed
through Temporal's sandbox, so a new execution's sandbox (every new case, and every case
replayed after the worker's cache evicted it) does not re-import them: slow enough, on a
loaded 2-core machine, to trip the 2 s deadlock detector, and 6 to 8 ms of CPU per instance
for the workflow modules alone. The workflow modules already imported each other passed
through, so the sandbox's run-time checks covered only each workflow's own module;
tests/test_workflow_code.py checks every module workflows run, from the source.
"""

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker, WorkerTuner, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.incidents import IncidentActivities
from activities.integrations import IntegrationActivities
from activities.payout import PayoutActivities
from activities.reconciliation import ReconciliationActivities
from activities.refund import RefundActivities
from adapters.approval_seal import ApprovalSealCheck, approval_keys
from adapters.audit_checkpoints import checkpoint_book
from adapters.config import Settings
from adapters.db import Store
from adapters.health import require_migrated
from adapters.heap import settle_startup_heap
from adapters.http_server import AppServer
from adapters.instrumented import instrument
from adapters.policy_file import load_policy
from adapters.providers.base import ProviderAdapter
from adapters.providers.registry import build_providers, close_providers
from adapters.schedules import ensure_reconciliation_schedules
from adapters.telemetry import sdk_runtime
from adapters.temporal_client import connect
from domain.policy import Policy
from workers.case_sweep import sweep_closed_cases
from workers.checkpoints import checkpoint_audit_heads
from workers.health import health_app
from workers.outbox import pool_dispatcher, sweep_outbox
from workers.retention import prune_expired
from workflows.payout import PayoutReversalWorkflow
from workflows.reconciliation import ReconciliationBreakWorkflow, ReconciliationWorkflow
from workflows.refund import RefundWorkflow
from workflows.tracking import RefundTrackingWorkflow

log = logging.getLogger(__name__)

PASSTHROUGH_MODULES = ("domain", "workflows", "pydantic", "pydantic_core", "annotated_types", "iso4217")
WORKFLOWS: Sequence[type] = (RefundWorkflow, RefundTrackingWorkflow, PayoutReversalWorkflow,
                              ReconciliationWorkflow, ReconciliationBreakWorkflow)


def workflow_runner() -> SandboxedWorkflowRunner:
    """The sandbox every worker and the replay test run workflows in."""
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES))


def build_worker(client: Client, task_queue: str, store: Store,
                 providers: dict[str, ProviderAdapter], policy: Policy, *,
                 settings: Settings | None = None,
                 graceful_shutdown: timedelta = timedelta(seconds=10),
                 runner: WorkflowRunner | None = None) -> Worker:
    """A worker with every workflow and activity of the product; provider calls observed;
    `settings` configure the notice channels, the advisor and reconciliation reports (none
    given: the environment's). `runner` is for the benchmark of the sandbox variants."""
    settings = settings or Settings()
    keys = approval_keys(settings)
    if keys is None:
        log.warning("REFUNDS_APPROVAL_KEYS is not set: this worker counts no approval and takes no "
                    "provider news")
    observed = instrument(providers)
    integrations = IntegrationActivities(store, settings)
    activities = [*RefundActivities(store, observed, policy, advise=integrations.advise_in_process).all(),
                  *PayoutActivities(store, observed, policy).all(),
                  *integrations.all(),
                  *IncidentActivities(store).all(),
                  *ReconciliationActivities(
                      store, providers, client, policy, timings=settings.timings(),
                      reports_dir=settings.reports_folder(),
                      reissue_window=timedelta(seconds=settings.payout_reissue_window_seconds)).all()]
    return Worker(
        client, task_queue=task_queue, workflows=list(WORKFLOWS), activities=activities,
        workflow_runner=runner or workflow_runner(), graceful_shutdown_timeout=graceful_shutdown,
        interceptors=[ApprovalSealCheck(keys)], **worker_tuning(settings))


def worker_tuning(settings: Settings) -> dict[str, Any]:
    """The worker's cache, task slots and sticky timeout, as `Worker` arguments: the
    product's, and the benchmarks' bare baseline's (the two differ only in what their
    workflows do)."""
    return {
        "max_cached_workflows": settings.worker_max_cached_workflows,
        # the slots as a tuner (not max_concurrent_*), so a caller may swap in its own tuner
        "tuner": WorkerTuner.create_fixed(
            workflow_slots=settings.worker_max_concurrent_workflow_tasks,
            activity_slots=settings.worker_max_concurrent_activities,
            local_activity_slots=settings.worker_max_concurrent_local_activities),
        "sticky_queue_schedule_to_start_timeout":
            timedelta(seconds=settings.worker_sticky_queue_timeout_seconds)}


def refuse_bad_settings(settings: Settings) -> None:
    """Exits before polling when the settings could let money move twice."""
    problem = settings.timeout_problem()
    if problem is not None:
        raise SystemExit(f"refusing to start: {problem}")


async def run_worker(settings: Settings, dsn: str, stop: asyncio.Event) -> None:
    """Runs until `stop` is set, then shuts down gracefully: polling stops at once, running
    activities get `graceful_shutdown_seconds` to finish before they are cancelled (and
    retried elsewhere by Temporal). Refuses settings that could let money move twice."""
    refuse_bad_settings(settings)
    book = checkpoint_book(settings.audit_checkpoint_dir, settings.audit_checkpoint_keys)
    store = await Store.open(dsn)
    await require_migrated(store)
    client = await connect(settings, runtime=sdk_runtime(settings))
    providers = build_providers(settings, store)
    worker = build_worker(client, settings.task_queue, store, providers,
                          load_policy(settings.policy_file),
                          graceful_shutdown=timedelta(seconds=settings.graceful_shutdown_seconds),
                          settings=settings)
    for schedule in await ensure_reconciliation_schedules(client, settings, providers):
        log.info("reconciliation schedule %s is in place", schedule)
    health = (AppServer(health_app(worker, client, store, settings), settings.bind_host,
                        settings.worker_health_port) if settings.worker_health_port else None)
    delivery = IntegrationActivities(store, settings)
    sweeper = (asyncio.create_task(sweep_outbox(
        store.outbox, delivery, stop,
        every_seconds=settings.outbox_sweep_seconds,
        older_than_seconds=settings.outbox_sweep_after_seconds))
        if settings.outbox_sweep_seconds > 0 else None)
    pruner = (asyncio.create_task(prune_expired(
        store, stop, every_seconds=settings.webhook_prune_interval_seconds,
        retention=timedelta(days=settings.webhook_refused_retention_days),
        step_result_retention=timedelta(days=settings.case_step_result_retention_days)))
        if settings.webhook_prune_interval_seconds > 0 else None)
    checkpointer = (asyncio.create_task(checkpoint_audit_heads(
        store, book, stop, every_seconds=settings.audit_checkpoint_seconds)) if book is not None else None)
    case_sweeper = (asyncio.create_task(sweep_closed_cases(
        store, client, providers, stop, every_seconds=settings.case_sweep_seconds,
        idle_seconds=settings.case_sweep_after_seconds))
        if settings.case_sweep_seconds > 0 else None)
    loops = [loop for loop in (sweeper, case_sweeper, pruner, checkpointer) if loop is not None]
    try:
        async with worker, pool_dispatcher(store, settings, delivery=delivery, stopping=stop):
            if health is not None:
                await health.start()
                log.info("worker health and metrics on %s", health.url)
            log.info("worker polling task queue %s", settings.task_queue)
            settle_startup_heap("worker")
            await stop.wait()
            log.info("stopping: waiting up to %ss for running activities",
                     settings.graceful_shutdown_seconds)
            # Polling stops first: a background pass may take long, and a task taken
            # meanwhile would be cut off by the deployment's grace period.
            await asyncio.gather(worker.shutdown(), *loops)
    finally:
        # however the worker ended (a fatal error too): the loops stop before the database
        # closes under them (a send cut off there would be `uncertain`, never sent again)
        stop.set()
        await asyncio.gather(*loops, return_exceptions=True)
        if health is not None:
            await health.stop()
        await close_providers(providers)
        await store.close()
