"""Activities of reconciliation: read a provider's refunds batch by batch after the run's
stored cursor, classify them against cases and the ledger, start one exception workflow
per new break, write the run's report, and end exception cases.

Idempotent: a batch and the cursor past it commit together (a retry reads the next batch),
breaks are unique per provider, object and class, exception workflows are started by a
derived id, and a settled break returns its recorded outcome.
"""

import csv
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from adapters.providers.base import (
    ProviderAdapter,
    ProviderDeclined,
    ProviderOutcomeUnknown,
    RefundLister,
    UnexpectedProviderStatus,
)
from adapters.reconciliation import REPORT_COLUMNS, Reconciliations, RunConflict, break_case
from adapters.store import Store
from domain.models import RefundTimings
from domain.policy import Policy, tier_for
from domain.reconciliation import (
    BatchInput,
    BatchResult,
    BreakApproval,
    BreakCase,
    BreakOutcome,
    BreakSettlement,
    ListedRefund,
    RunSummary,
    RunWindow,
    approval_amount,
    break_workflow_id,
)

log = logging.getLogger(__name__)

BREAK_WORKFLOW = "ReconciliationBreakWorkflow"


def lister(providers: Mapping[str, ProviderAdapter], name: str) -> RefundLister:
    """The provider's list call; a provider without one cannot be reconciled (for good)."""
    provider = providers.get(name)
    if not isinstance(provider, RefundLister):
        raise ApplicationError(f"provider {name!r} cannot list its refunds", type="NotListable",
                               non_retryable=True)
    return provider


class ReconciliationActivities:
    """Holds the store, the provider clients, a Temporal client (to start exception
    workflows) and the policy whose tiers approve compensations."""

    def __init__(self, store: Store, providers: Mapping[str, ProviderAdapter], client: Client,
                 policy: Policy, *, timings: RefundTimings, reports_dir: Path) -> None:
        self._recon = Reconciliations(store)
        self._providers = providers
        self._client = client
        self._policy = policy
        self._timings = timings
        self._reports_dir = reports_dir

    @activity.defn(name="open_reconciliation_run")
    async def open_reconciliation_run(self, window: RunWindow) -> None:
        """Records the run (once: a continued or retried workflow finds its row)."""
        try:
            await self._recon.open_run(window, activity.info().task_queue)
        except RunConflict as exc:
            raise ApplicationError(str(exc), type="RunConflict", non_retryable=True) from exc

    @activity.defn(name="reconcile_batch")
    async def reconcile_batch(self, inp: BatchInput) -> BatchResult:
        """Reads up to `batch_size` refunds after the run's cursor (newest first), stores
        their breaks and the new cursor in one transaction, then starts the exception
        workflows of breaks not yet dispatched."""
        run = await self._recon.run(inp.run_id)
        assert run is not None, f"run {inp.run_id} was never opened"
        source = lister(self._providers, inp.provider)
        batch: list[ListedRefund] = []
        try:
            async with aclosing(source.list_refunds(run["window_start"], run["window_end"],
                                                    run["cursor"])) as listed:
                async for refund in listed:
                    batch.append(refund)
                    if len(batch) >= inp.options.batch_size:
                        break
            new = await self._recon.store_batch(inp.run_id, inp.provider, batch, inp.options,
                                                cursor=run["cursor"])
        except ProviderOutcomeUnknown as exc:
            raise ApplicationError(str(exc), type="ProviderOutcomeUnknown") from exc
        except (ProviderDeclined, UnexpectedProviderStatus, RunConflict) as exc:
            raise ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True) from exc
        await self._dispatch(inp.run_id)
        return BatchResult(objects=len(batch), new_breaks=len(new),
                           has_more=len(batch) >= inp.options.batch_size)

    async def _dispatch(self, run_id: str) -> None:
        """Starts one exception workflow per break (by derived id, so a repeat attaches)."""
        while pending := await self._recon.undispatched(run_id):
            for row in pending:
                try:
                    await self._client.start_workflow(
                        BREAK_WORKFLOW, break_case(row, self._timings), id=break_workflow_id(int(row["id"])),
                        task_queue=activity.info().task_queue,
                        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE)
                except WorkflowAlreadyStartedError:
                    pass  # started earlier and already finished
                await self._recon.mark_dispatched(int(row["id"]))

    @activity.defn(name="finish_reconciliation_run")
    async def finish_reconciliation_run(self, run_id: str) -> RunSummary:
        """Dispatches any break left undispatched, writes the report (JSON and CSV) and
        marks the run completed; a retry rewrites the same files."""
        await self._dispatch(run_id)
        report = await self._recon.report(run_id)
        assert report is not None
        self._reports_dir.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = (self._reports_dir / f"{run_id}.{ext}" for ext in ("json", "csv"))
        rows = 0
        with csv_path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(REPORT_COLUMNS)
            async for row in self._recon.run_breaks(run_id):
                writer.writerow([_cell(row, column) for column in REPORT_COLUMNS])
                rows += 1
        files = (str(json_path), str(csv_path))
        json_path.write_text(json.dumps({**report, "state": "completed", "report_files": files},
                                        indent=2, default=str))
        await self._recon.finish(run_id, files)
        log.info("reconciliation run %s: %d objects, %d new breaks, %d seen again", run_id,
                 report["objects_seen"], report["new_breaks"], report["known_breaks"])
        return RunSummary(run_id=run_id, provider=report["provider"], objects_seen=report["objects_seen"],
                          new_breaks=report["new_breaks"], known_breaks=report["known_breaks"],
                          report_files=files)

    @activity.defn(name="open_break_exception")
    async def open_break_exception(self, case: BreakCase) -> BreakApproval:
        """Decides who must approve (the refund tier for the amount at stake), records it
        and tells the approvers."""
        tier = tier_for(self._policy.refunds.tiers, approval_amount(case), case.truth.currency)
        approval = BreakApproval(tier=tier.name, requirements=tier.approvals)
        await self._recon.open_exception(case.break_id, approval)
        return approval

    @activity.defn(name="settle_break")
    async def settle_break(self, settlement: BreakSettlement) -> BreakOutcome:
        """Ends the exception case; an approved one posts its compensation (see the store)."""
        return await self._recon.settle(settlement)

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for worker registration."""
        return [self.open_reconciliation_run, self.reconcile_batch, self.finish_reconciliation_run,
                self.open_break_exception, self.settle_break]


def _cell(row: dict[str, Any], column: str) -> Any:
    value = row["id" if column == "break_id" else "refund_request_id" if column == "case_id" else column]
    return value.isoformat() if hasattr(value, "isoformat") else value
