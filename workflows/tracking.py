"""RefundTrackingWorkflow: follows a refund the provider made without us (a dashboard
refund, an auto-refund) so that it reaches the ledger and reconciliation like our own.

Deterministic: no I/O, no clocks but workflow time; activities are called by name.
"""

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain import contracts, errors
    from domain.events import Observation, TrackingCarry, TrackingInput, observe
    from domain.lifecycle import FINAL_PROVIDER_STATUSES
    from domain.models import (
        CaseEventInput,
        CaseState,
        CaseStatus,
        LedgerInput,
        ProviderEvent,
        ProviderRefund,
        ProviderRefundStatus,
        RefundOutcome,
    )
    from workflows import history, retry

# The watch continues as new past `continue_as_new_after_events`, carrying the case; before,
# a refund with many events could reach Temporal's history limit.
BOUNDED_PATCH = "tracking-bounded-history-1"


@workflow.defn
class RefundTrackingWorkflow:
    """Applies a provider-originated refund's events until final, then watches for a late
    failure. Idempotent: the id derives from provider + refund id, events act once by
    event id, and ledger postings are keyed per case and template."""

    @workflow.init
    def __init__(self, inp: TrackingInput) -> None:
        self._inp: TrackingInput | None = inp
        self._status = CaseStatus.TRACKING
        self._inbox: list[ProviderEvent] = []
        self._event_ids: set[str] = set()
        self._refund: ProviderRefund | None = None
        self._postings: list[str] = []
        self._events_seen = 0
        self._succeeded_at: datetime | None = None
        if inp.carried is not None:
            self._restore(inp.carried)

    @workflow.signal
    def provider_event(self, event: ProviderEvent) -> None:
        """A verified webhook about this refund (may be late, duplicated or out of order)."""
        self._events_seen += 1
        if event.event_id not in self._event_ids:
            self._event_ids.add(event.event_id)
            self._inbox.append(event)

    @workflow.query
    def state(self) -> CaseState:
        refund = self._refund
        return CaseState(
            refund_request_id=workflow.info().workflow_id, status=self._status,
            amount=refund.amount if refund else 0, currency=self._inp.currency if self._inp else "",
            provider_refund_id=refund.refund_id if refund else None,
            provider_status=refund.status if refund else None,
            failure_reason=refund.failure_reason if refund else None,
            ledger_postings=tuple(self._postings), events_seen=self._events_seen,
        )

    @workflow.run
    async def run(self, inp: TrackingInput) -> RefundOutcome:
        if refusal := history.forged_start(inp.case_id, inp.carried):
            raise ApplicationError(refusal, type=errors.FORGED_START, non_retryable=True)
        window = inp.timings.late_failure_window
        while True:
            await self._bound_history()
            while self._inbox:
                await self._bound_history()  # a burst of events is turns too
                event = self._inbox.pop(0)
                reported = event.as_refund()
                if reported is None or reported.refund_id != inp.refund_id:
                    workflow.logger.warning("ignoring event %s: not about %s", event.event_id,
                                            inp.refund_id)
                    continue
                await self._apply(observe(self._refund.status if self._refund else None, reported),
                                  reported, f"webhook:{event.event_type}:{event.event_id}")
            status = self._refund.status if self._refund else None
            if status in FINAL_PROVIDER_STATUSES:
                break
            wait = window  # without an event for this long, a pending refund is left to reconciliation
            if status is ProviderRefundStatus.SUCCEEDED:
                assert self._succeeded_at is not None
                wait = self._succeeded_at + window - workflow.now()
                if wait <= timedelta(0):
                    break
            try:
                await workflow.wait_condition(lambda: bool(self._inbox), timeout=wait)
            except TimeoutError:
                if status is not ProviderRefundStatus.SUCCEEDED:
                    await self._record("tracking_ended_without_final_status", None,
                                       {"last_status": status.value if status else None})
                break
        await workflow.wait_condition(workflow.all_handlers_finished)
        return RefundOutcome(state=self.state())

    async def _bound_history(self) -> None:
        """Past the history threshold, continues as new with the case carried."""
        assert self._inp is not None
        long = history.at_bound(self._inp.timings.continue_as_new_after_events)
        if not long or not workflow.patched(BOUNDED_PATCH):
            return
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(self._inp.model_copy(update={"carried": TrackingCarry(
            status=self._status, refund=self._refund, postings=tuple(self._postings),
            events_seen=self._events_seen, event_ids=tuple(sorted(self._event_ids)),
            inbox=tuple(self._inbox), succeeded_at=self._succeeded_at)}))

    def _restore(self, carried: TrackingCarry) -> None:
        """The carried case, from `__init__`: before any handler of the new run, so an early
        event meets the case it belongs to. Only state: no command, so no patch is needed."""
        self._status, self._refund = carried.status, carried.refund
        self._postings, self._succeeded_at = list(carried.postings), carried.succeeded_at
        self._events_seen = carried.events_seen
        self._inbox, self._event_ids = list(carried.inbox), set(carried.event_ids)

    async def _apply(self, step: Observation, reported: ProviderRefund, source: str) -> None:
        if step.status is None:
            await self._record(step.action, None, {"reported": reported.status.value, "source": source,
                                                   "held": self._refund.status.value if self._refund
                                                   else None})
            return
        self._refund = reported
        self._status = step.status
        if reported.status is ProviderRefundStatus.SUCCEEDED:
            self._succeeded_at = workflow.now()
        if step.ledger is not None:
            assert self._inp is not None
            posted = await contracts.POST_LEDGER(
                LedgerInput(refund_request_id=self._inp.case_id, kind=step.ledger, amount=reported.amount,
                            currency=self._inp.currency, provider_refund_id=reported.refund_id),
                **retry.LEDGER)
            self._postings.append(posted.posting_key)
        await self._record(step.action, reported, {"source": source,
                                                   "failure_reason": reported.failure_reason},
                           status=step.status, release=step.release)

    async def _record(self, action: str, refund: ProviderRefund | None, detail: dict[str, object], *,
                      status: CaseStatus | None = None, release: bool = False) -> None:
        assert self._inp is not None
        await contracts.RECORD_CASE_EVENT(
            CaseEventInput(refund_request_id=self._inp.case_id, action=action,
                           actor=f"provider:{self._inp.provider}", status=status,
                           release_reservation=release, provider_refund=refund, detail=detail),
            **retry.CASE_EVENT)
