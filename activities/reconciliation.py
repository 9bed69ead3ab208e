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
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from adapters.break_dispatch import dispatch_breaks, reconcile_at_once
from adapters.db import Store
from adapters.db.reconciliation import REPORT_COLUMNS, Listed, Phase, RunConflict, break_case, provider_moved
from adapters.db.rows import BreakRow
from adapters.providers.base import (
    PayoutLister,
    PayoutReader,
    ProviderAdapter,
    ProviderConfigurationRefused,
    ProviderDeclined,
    ProviderError,
    ProviderOutcomeUnknown,
    RefundLister,
    UnexpectedProviderStatus,
)
from domain import contracts, errors
from domain.incidents import ProviderWordInput
from domain.models import ProviderRefund, RefundTimings
from domain.payouts import PayoutCaseInput, ProviderPayout, ProviderPayoutStatus, paid_since, payout_case_id
from domain.policy import Policy
from domain.reconciliation import (
    BatchInput,
    BatchResult,
    BreakApproval,
    BreakCase,
    BreakClass,
    BreakOutcome,
    BreakSettlement,
    BreakState,
    RunFailure,
    RunSummary,
    RunWindow,
    break_approval,
    payout_truth_event,
)

log = logging.getLogger(__name__)

PAYOUT_WORKFLOW = "PayoutReversalWorkflow"


def lister(providers: Mapping[str, ProviderAdapter], name: str) -> RefundLister:
    """The provider's list call; a provider without one cannot be reconciled (for good)."""
    provider = providers.get(name)
    if not isinstance(provider, RefundLister):
        raise ApplicationError(f"provider {name!r} cannot list its refunds", type=errors.NOT_LISTABLE,
                               non_retryable=True)
    return provider


class ReconciliationActivities:
    """Holds the store, the provider clients, a Temporal client (to start exception
    workflows) and the policy whose tiers approve compensations."""

    def __init__(self, store: Store, providers: Mapping[str, ProviderAdapter], client: Client,
                 policy: Policy, *, timings: RefundTimings, reports_dir: Path,
                 reissue_window: timedelta = PayoutCaseInput.model_fields["reissue_window"].default) -> None:
        self._recon = store.reconciliation
        self._audit = store.audit
        self._providers = providers
        self._client = client
        self._policy = policy
        self._timings = timings
        self._reports_dir = reports_dir
        self._reissue_window = reissue_window

    @activity.defn(name=contracts.OPEN_RECONCILIATION_RUN.name)
    async def open_reconciliation_run(self, window: RunWindow) -> None:
        """Records the run (once: a continued or retried workflow finds its row)."""
        try:
            await self._recon.open_run(window, activity.info().task_queue)
        except RunConflict as exc:
            raise ApplicationError(str(exc), type=errors.RUN_CONFLICT, non_retryable=True) from exc

    @activity.defn(name=contracts.RECONCILE_BATCH.name)
    async def reconcile_batch(self, inp: BatchInput) -> BatchResult:
        """Reads up to `batch_size` objects after the run's cursor (newest first: the
        provider's refunds, then its payouts when it lists them), stores their breaks and
        the new cursor in one transaction, then starts the exception workflows of breaks
        not yet dispatched."""
        run = await self._recon.run(inp.run_id)
        assert run is not None, f"run {inp.run_id} was never opened"
        source = lister(self._providers, inp.provider)
        phase = Phase(run["phase"])
        listing = _listing(source, phase, run)
        batch: list[Listed] = []
        refused: str | None = None
        try:
            try:
                async with aclosing(listing) as listed:
                    async for item in listed:
                        batch.append(item)
                        if len(batch) >= inp.options.batch_size:
                            break
            except (ProviderDeclined, ProviderConfigurationRefused) as exc:
                if phase is not Phase.PAYOUTS:
                    raise
                # e.g. a key restricted to refunds: the refunds were reconciled; say what was not
                refused = f"payouts not reconciled: {inp.provider} refused the listing ({exc})"
            full = refused is None and len(batch) >= inp.options.batch_size
            next_phase = Phase.PAYOUTS if (phase is Phase.REFUNDS and not full
                                           and isinstance(source, PayoutLister)) else None
            new = await self._recon.store_batch(inp.run_id, inp.provider, batch, inp.options,
                                                cursor=run["cursor"], phase=phase, next_phase=next_phase,
                                                warning=refused)
        except ProviderOutcomeUnknown as exc:
            raise ApplicationError(str(exc), type=errors.OUTCOME_UNKNOWN) from exc
        except RunConflict as exc:
            # another attempt of this batch (its retry, while this one outlived its timeout)
            # stored the cursor's batch first: dropped here, the run goes on from its cursor
            log.warning("reconciliation run %s: %s", inp.run_id, exc)
            return BatchResult(objects=0, new_breaks=0, has_more=True)
        except (ProviderDeclined, ProviderConfigurationRefused, UnexpectedProviderStatus) as exc:
            raise ApplicationError(str(exc), type=type(exc).__name__, non_retryable=True) from exc
        if refused is not None:
            log.warning("reconciliation run %s: %s", inp.run_id, refused)
        for row in new:
            if row["break_class"] == BreakClass.UNMAPPED_STATUS:
                log.error("UNMAPPED STATUS: %s %s %s reports %r; break %s waits for ops (the run goes on)",
                          inp.provider, row["object_kind"], row["object_id"], row["raw_status"], row["id"])
        await self._dispatch(inp.run_id)
        return BatchResult(objects=len(batch), new_breaks=len(new), has_more=full or next_phase is not None)

    async def _dispatch(self, run_id: str) -> None:
        """Starts one exception workflow per break (by derived id, so a repeat attaches)."""
        await dispatch_breaks(self._client, self._recon, lambda: self._recon.undispatched(run_id),
                              self._timings, activity.info().task_queue)

    @activity.defn(name=contracts.FINISH_RECONCILIATION_RUN.name)
    async def finish_reconciliation_run(self, run_id: str) -> RunSummary:
        """Dispatches any break left undispatched (the run's, and any other of the provider's
        whose start failed or was handed back), writes the report (JSON and CSV) and marks
        the run completed; a retry rewrites the same files."""
        await self._dispatch(run_id)
        report = await self._recon.report(run_id)
        assert report is not None
        provider = str(report["provider"])
        await dispatch_breaks(self._client, self._recon,
                              lambda: self._recon.undispatched_of(provider),
                              self._timings, activity.info().task_queue)
        json_path, csv_path = (self._reports_dir / f"{run_id}.{ext}" for ext in ("json", "csv"))
        files = (str(json_path), str(csv_path))
        try:
            self._reports_dir.mkdir(parents=True, exist_ok=True)
            with csv_path.open("w", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(REPORT_COLUMNS)
                async for row in self._recon.run_breaks(run_id):  # streamed: a run may be large
                    writer.writerow([_cell(row, column) for column in REPORT_COLUMNS])
            json_path.write_text(json.dumps({**report, "state": "completed", "report_files": files},
                                            indent=2, default=str))
        except (TimeoutError, ConnectionError):  # the database's, while the rows stream: retried
            raise
        except OSError as exc:  # a folder the worker may not write: retried, the run never ended
            raise ApplicationError(f"the report could not be written to {self._reports_dir} "
                                   f"(REFUNDS_REPORTS_DIR): {exc}", type=errors.REPORT_NOT_WRITTEN,
                                   non_retryable=True) from exc
        await self._recon.finish(run_id, files)
        log.info("reconciliation run %s: %d objects, %d new breaks, %d seen again", run_id,
                 report["objects_seen"], report["new_breaks"], report["known_breaks"])
        return RunSummary(run_id=run_id, provider=report["provider"], objects_seen=report["objects_seen"],
                          new_breaks=report["new_breaks"], known_breaks=report["known_breaks"],
                          report_files=files)

    @activity.defn(name=contracts.FAIL_RECONCILIATION_RUN.name)
    async def fail_reconciliation_run(self, failure: RunFailure) -> None:
        """Marks a run the workflow gave up on `failed` with its reason (a finished run stays)."""
        await self._recon.fail(failure.run_id, failure.reason)
        log.error("reconciliation run %s failed: %s", failure.run_id, failure.reason)

    @activity.defn(name=contracts.LOAD_BREAK_CASE.name)
    async def load_break_case(self, case: BreakCase) -> BreakCase:
        """The break as stored (with the start's timings), which its workflow acts on rather
        than on its start input: a run started straight in Temporal with made-up facts would
        hand them to a case as provider news under this worker's seal. No such break: refused
        for good. Read once a reopen starting this run has committed: its round, its reopener."""
        row = await self._recon.get_break(case.break_id, settled_write=True)
        if row is None:
            raise ApplicationError(f"no break {case.break_id}: its workflow starts only for a stored break",
                                   type=errors.FORGED_START, non_retryable=True)
        return break_case(row, case.timings)

    @activity.defn(name=contracts.OPEN_BREAK_EXCEPTION.name)
    async def open_break_exception(self, case: BreakCase) -> BreakApproval:
        """Decides who must approve (the refund tier for the amount at stake), records it
        and tells the approvers."""
        approval = break_approval(self._policy, case)
        await self._recon.open_exception(case.break_id, approval)
        return approval

    @activity.defn(name=contracts.HAND_BREAK_TO_PAYOUT_CASE.name)
    async def hand_break_to_payout_case(self, case: BreakCase) -> bool:
        """Hands a payout break to the payout's exception case exactly as the relay hands it
        a webhook: signal-with-start by the derived case id, so a case the webhook already
        opened takes it as one more event on its timeline. False when that case has ended
        (its id is never reused): then people decide on the break."""
        assert isinstance(case.truth, ProviderPayout)
        case_id = payout_case_id(case.provider, case.truth.payout_id)
        try:
            await self._client.start_workflow(
                PAYOUT_WORKFLOW, PayoutCaseInput(case_id=case_id, provider=case.provider,
                                                 payout_id=case.truth.payout_id, timings=self._timings,
                                                 reissue_window=self._reissue_window),
                id=case_id, task_queue=activity.info().task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                start_signal="payout_event", start_signal_args=[payout_truth_event(case, datetime.now(UTC))])
        except WorkflowAlreadyStartedError:
            return False
        return True

    @activity.defn(name=contracts.SETTLE_BREAK.name)
    async def settle_break(self, settlement: BreakSettlement) -> BreakOutcome:
        """Ends the exception case; an approved one posts its compensation (see the store).
        An approved break reads its refund or payout at the provider first: approvals can
        take days, and what the provider says now may no longer be what was approved (a
        refund failed after all, a bank's correction to paid)."""
        found = await self._recon.get_break(settlement.break_id)
        assert found is not None
        approved = (settlement.state is BreakState.RESOLVED and found.resolution is None
                    and settlement.round in (None, found.reopened))
        at_provider = await self._at_provider(found) if approved else None
        # handed only on a fresh read: a stored word alone goes through the settlement's checks
        unmoved = approved and at_provider is not None and provider_moved(found, at_provider) is None
        if unmoved and await self._handed_to_running_case(found):
            settlement = settlement.model_copy(update={"state": BreakState.HANDED_TO_CASE})
        return await self._recon.settle(settlement, at_provider)

    async def _handed_to_running_case(self, found: BreakRow) -> bool:
        """An approved refund break whose case's workflow still runs and would take the
        provider's word itself is handed to it, never compensated: the case posts its own
        entry for that word (its mismatch check, its notices), so an entry beside it would
        book the refund twice. A closed workflow takes nothing: the approval compensates."""
        event = await self._recon.truth_for_its_case(found, datetime.now(UTC))
        if event is None:
            return False
        assert event.refund_request_id is not None
        try:
            await self._client.get_workflow_handle(event.refund_request_id).signal("provider_event", event)
        except RPCError as err:
            if err.status is RPCStatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def _at_provider(self, found: BreakRow) -> str | None:
        """The break's refund or payout status at the provider now (`not_found` when it
        holds none); None for a provider that cannot read one. A failed read is retried
        (the settlement waits for it), never taken as an answer; one the provider refuses
        for good (our key, a 4xx, a status we do not map) is `unreadable`, for ops. A
        payout its provider cannot read (Adyen) has one reading besides the failure: its
        signed report of the payout paid after it (the relay's record on the case), as the
        case's own runbook reads it; before, the settlement reversed such a payout."""
        provider = self._providers.get(found.provider)
        current: ProviderRefund | ProviderPayout | None
        try:
            if found.object_kind == "payout":
                if not isinstance(provider, PayoutReader):
                    # paid at or after the failure this break was raised for (`paid_since`)
                    paid = paid_since(await self._audit.trail(found.chain), found.object_created_at)
                    return ProviderPayoutStatus.PAID.value if paid else None
                current = await provider.get_payout(found.object_id)
            else:
                if not isinstance(provider, RefundLister):
                    return None
                current = await provider.get_refund(found.object_id, found.charge_id)
        except (ProviderConfigurationRefused, ProviderDeclined, UnexpectedProviderStatus) as exc:
            return f"unreadable ({type(exc).__name__}: {exc})"[:300]
        except ProviderError as exc:
            raise ApplicationError(f"{found.object_kind} lookup failed: {exc}",
                                   type=errors.OUTCOME_UNKNOWN) from exc
        return "not_found" if current is None else current.status.value

    @activity.defn(name=contracts.RECONCILE_PROVIDER_WORD.name)
    async def reconcile_provider_word(self, inp: ProviderWordInput) -> None:
        """A provider's word its running case cannot apply, reconciled as the relay
        reconciles an event after a case closed: an incident run of its own (a retry finds
        it), its breaks' exception workflows started."""
        await reconcile_at_once(self._client, self._recon, self._timings, activity.info().task_queue,
                                inp.event_id, inp.refund, inp.occurred_at, f"provider:{inp.refund.provider}")

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for worker registration."""
        return [self.open_reconciliation_run, self.reconcile_batch, self.finish_reconciliation_run,
                self.fail_reconciliation_run, self.load_break_case, self.open_break_exception,
                self.hand_break_to_payout_case, self.settle_break, self.reconcile_provider_word]


def _listing(source: RefundLister, phase: Phase, run: dict[str, Any]) -> AsyncGenerator[Any]:
    """The list call the run's phase reads, after its stored cursor."""
    window = (run["window_start"], run["window_end"], run["cursor"])
    if phase is Phase.PAYOUTS:
        assert isinstance(source, PayoutLister), "a payout phase is only entered for payout listers"
        return source.list_payouts(*window)
    return source.list_refunds(*window)


def _cell(row: dict[str, Any], column: str) -> Any:
    value = row["id" if column == "break_id" else "refund_request_id" if column == "case_id" else column]
    return value.isoformat() if hasattr(value, "isoformat") else value
