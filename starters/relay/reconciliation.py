"""The relay's reconciliation routes: start or resume a backfill, read runs and their
reports (ops, auditors, admins), read a break, approve or deny its exception case
(approvers, by the refund tiers and segregation-of-duties rules), and reopen a dismissed
or expired one (ops)."""

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from adapters.db.reconciliation import break_view, run_view
from adapters.providers.base import RefundLister
from domain.permissions import Permission
from domain.reconciliation import ReconcileInput, RunKind
from starters.actions.front import Door
from starters.actions.reconciliation import (
    BreakDecisionBody,
    BreakReopenBody,
    decide_on_break,
    reopen_break,
)
from starters.relay.auth import Caller
from workflows.reconciliation import ReconciliationWorkflow

REPORT_BREAKS = 500
"""Breaks listed inline in a run's page; the CSV report has them all."""


class BackfillBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str = Field(min_length=1, max_length=64)
    since: AwareDatetime
    until: AwareDatetime | None = None


router = APIRouter()
EARLIEST_SINCE = datetime(1970, 1, 1, tzinfo=UTC)


@router.post("/v1/reconciliation/runs", status_code=202)
async def start_backfill(body: BackfillBody, caller: Caller, response: Response,
                         door: Door) -> dict[str, Any]:
    """Starts a backfill over [since, until) (default until: now), or resumes the
    provider's unfinished one from its stored cursor (200, `resumed`)."""
    action = "starting a reconciliation"
    await door.actions.require(caller, Permission.START_RECONCILIATION, action, via="api")
    if not isinstance(door.providers.get(body.provider), RefundLister):
        await door.actions.refuse(caller, None, 422, action, f"provider {body.provider!r} is not configured "
                                  "or cannot list refunds", via="api")
    now = datetime.now(UTC)
    until = body.until or now
    if until <= body.since:
        await door.actions.refuse(caller, None, 422, action, "until must be after since", via="api")
    if body.since < EARLIEST_SINCE:
        await door.actions.refuse(caller, None, 422, action, "since must be after 1970 (no provider "
                                  "lists refunds older)", via="api")
    if until > now + timedelta(days=1):
        await door.actions.refuse(caller, None, 422, action, "until is more than a day in the future",
                                  via="api")
    settings = door.settings
    run, resumed = await door.store.reconciliation.open_backfill(body.provider, body.since, until,
                                                                 caller.user, settings.task_queue)
    await door.client.start_workflow(
        ReconciliationWorkflow.run,
        ReconcileInput(provider=body.provider, kind=RunKind.BACKFILL, run_id=run["id"],
                       since=run["window_start"], until=run["window_end"],
                       requested_by=run["requested_by"], options=settings.reconcile_options()),
        id=run["id"], task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
    if resumed:
        response.status_code = 200
    return {**run_view(run), "resumed": resumed}


@router.get("/v1/reconciliation/runs")
async def list_runs(caller: Caller, door: Door, limit: int = 50) -> list[dict[str, Any]]:
    await door.actions.require(caller, Permission.READ_RECONCILIATION_RUNS, "reading reconciliation runs",
                               via="api")
    return [run_view(r) for r in await door.store.reconciliation.runs(min(max(limit, 1), 500))]


@router.get("/v1/reconciliation/runs/{run_id}")
async def get_run(run_id: str, caller: Caller, door: Door) -> dict[str, Any]:
    """The run's report: counts by class, amounts per currency, the oldest break, the
    breaks it saw with links to their cases and exception workflows."""
    await door.actions.require(caller, Permission.READ_RECONCILIATION_RUNS, "reading a reconciliation run",
                               via="api")
    report = await door.store.reconciliation.report(run_id)
    if report is None:
        await door.actions.refuse(caller, None, 404, "reading a reconciliation run",
                                  f"no reconciliation run {run_id!r}", via="api")
    breaks = door.store.reconciliation.breaks(run_id, REPORT_BREAKS)
    return {**report, "breaks": [break_view(b) async for b in breaks]}


@router.get("/v1/reconciliation/breaks/{break_id}")
async def get_break(break_id: int, caller: Caller, door: Door) -> dict[str, Any]:
    await door.actions.require(caller, Permission.READ_RECONCILIATION_BREAKS,
                               "reading a reconciliation break",
                               via="api")
    row = await door.store.reconciliation.get_break(break_id)
    if row is None:
        await door.actions.refuse(caller, None, 404, "reading a reconciliation break",
                                  f"no reconciliation break {break_id}", via="api")
    return break_view(row)


@router.post("/v1/reconciliation/breaks/{break_id}/approvals", status_code=202)
async def decide_break(break_id: int, body: BreakDecisionBody, caller: Caller,
                       door: Door) -> dict[str, Any]:
    """An approver's verdict on a break's compensation, answered at once (an update);
    refusals are audited on the break's chain."""
    return await decide_on_break(door.actions, caller, break_id, body, via="api")


@router.post("/v1/reconciliation/breaks/{break_id}/reopen", status_code=202)
async def reopen(break_id: int, body: BreakReopenBody, caller: Caller, door: Door) -> dict[str, Any]:
    """Sends a dismissed or expired break back to its exception case (ops)."""
    return await reopen_break(door.actions, caller, break_id, body, via="api")
