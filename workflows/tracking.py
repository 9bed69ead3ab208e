"""RefundTrackingWorkflow: follows a refund the provider made without us (a dashboard
refund, an auto-refund) so that it reaches the ledger and reconciliation like our own.

Deterministic: no I/O, no clocks but workflow time; activities are called by name.
"""

from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain import contracts, errors
    from domain.events import (
        CONTRADICTED,
        STATUS_NOTICES,
        Observation,
        TrackingCarry,
        TrackingInput,
        contradicts_booked,
        observe,
        refund_mismatch,
    )
    from domain.lifecycle import FINAL_PROVIDER_STATUSES
    from domain.models import (
        CaseEventInput,
        CaseState,
        CaseStatus,
        LedgerInput,
        NoticeInput,
        ProviderEvent,
        ProviderRefund,
        ProviderRefundStatus,
        RefundOutcome,
    )
    from workflows import history, retry
    from workflows.news import NewsGate

# The watch continues as new past `continue_as_new_after_events`, carrying the case; before,
# a refund with many events could reach Temporal's history limit.
BOUNDED_PATCH = "tracking-bounded-history-1"
# A tracking case tells ops what a refund case would: a failure (late or not), a cancel, a
# refund waiting on someone; the provider reporting other money for the refund than before
# (`provider_refund_changed`: the case stays in ops review) or a cancel of a refund it
# reported succeeded (`provider_status_contradicted`). Before, a dashboard refund that failed
# (the incident the product exists for) was booked and recorded and nobody was told. Asked
# only when a step has something to tell.
NEWS_PATCH = "tracking-news-to-ops-1"
# An event heard while the watch's end is recorded is applied and the watch goes on. Before,
# the run ended with it unread (the relay had signalled it: nothing else would apply it).
WATCH_END_PATCH = "tracking-watch-end-reads-inbox-1"
# A run whose watch is over reads the events signalled while it waited for its last writes (a
# refused forgery's record) before it ends; before, they were accepted and never read (a
# failure after success left the refund settled in our books). Asked only when one waits.
FINISH_NEWS_PATCH = "tracking-finish-reads-inbox-1"
# A watch that ends without a final status tells ops (the refund keeps its hold and may still
# pay; nothing else follows a tracking case). Before, only the audit row said so.
PENDING_END_PATCH = "tracking-pending-end-told-1"
ENDED_PENDING = "tracking_ended_without_final_status"
CHANGED = "provider_refund_changed"


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
        self._mismatched = False
        self._news = NewsGate()
        if inp.carried is not None:
            self._restore(inp.carried)

    @workflow.signal
    def provider_event(self, event: ProviderEvent) -> None:
        """A verified webhook about this refund (may be late, duplicated or out of order),
        taken only under the relay's or a worker's seal (`NewsGate`)."""
        self._events_seen += 1
        if (admitted := self._news.admit_refund(event, self._record_refused_news)) is None:
            return
        event = admitted
        if event.event_id not in self._event_ids:
            self._event_ids.add(event.event_id)
            self._inbox.append(event)

    @workflow.query
    def state(self) -> CaseState:
        refund = self._refund
        return CaseState(
            refund_request_id=workflow.info().workflow_id, status=self._status,
            amount=refund.amount if refund else 0,
            currency=refund.currency if refund else self._inp.currency if self._inp else "",
            provider_refund_id=refund.refund_id if refund else None,
            provider_status=refund.status if refund else None,
            failure_reason=refund.failure_reason if refund else None,
            ledger_postings=tuple(self._postings), events_seen=self._events_seen,
        )

    @workflow.run
    async def run(self, inp: TrackingInput) -> RefundOutcome:
        if refusal := history.forged_start(inp.case_id, inp.carried):
            raise ApplicationError(refusal, type=errors.FORGED_START, non_retryable=True)
        await self._watch(inp)
        await self._settled()
        while self._inbox and workflow.patched(FINISH_NEWS_PATCH):
            await self._watch(inp)  # news that came while the run waited for its last writes
            await self._settled()
        return RefundOutcome(state=self.state())

    async def _settled(self) -> None:
        """What a run waits for before it ends or continues as new: refused news recorded,
        handlers finished."""
        await self._news.settled()
        await workflow.wait_condition(workflow.all_handlers_finished)

    async def _watch(self, inp: TrackingInput) -> None:
        """Applies the refund's events until it is final, or its watch passes without one
        (the late-failure window from its success, or from its last event)."""
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
                    await self._ended_pending(status)
                if self._inbox and workflow.patched(WATCH_END_PATCH):
                    continue  # heard as the watch ended: applied, and watched from there
                break

    async def _ended_pending(self, status: ProviderRefundStatus | None) -> None:
        detail = {"last_status": status.value if status else None}
        notices: tuple[NoticeInput, ...] = ()
        if self._refund is not None and workflow.patched(PENDING_END_PATCH):
            notices = (self._notice(ENDED_PENDING, {**detail, "provider_refund_id": self._refund.refund_id},
                                    self._refund),)
        await self._record(ENDED_PENDING, None, detail, notices=notices)

    async def _bound_history(self) -> None:
        """Past the history threshold, continues as new with the case carried."""
        assert self._inp is not None
        long = history.at_bound(self._inp.timings.continue_as_new_after_events)
        if not long or not workflow.patched(BOUNDED_PATCH):
            return
        await self._settled()
        workflow.continue_as_new(self._inp.model_copy(update={"carried": TrackingCarry(
            status=self._status, refund=self._refund, mismatched=self._mismatched,
            postings=tuple(self._postings),
            events_seen=self._events_seen, event_ids=tuple(sorted(self._event_ids)),
            inbox=tuple(self._inbox), succeeded_at=self._succeeded_at)}))

    def _restore(self, carried: TrackingCarry) -> None:
        """The carried case, from `__init__`: before any handler of the new run, so an early
        event meets the case it belongs to. Only state: no command, so no patch is needed."""
        self._status, self._refund, self._mismatched = carried.status, carried.refund, carried.mismatched
        self._postings, self._succeeded_at = list(carried.postings), carried.succeeded_at
        self._events_seen = carried.events_seen
        self._inbox, self._event_ids = list(carried.inbox), set(carried.event_ids)

    async def _apply(self, step: Observation, reported: ProviderRefund, source: str) -> None:
        held = self._refund
        if step.status is None:
            detail = {"reported": reported.status.value, "source": source,
                      "held": held.status.value if held else None}
            if (held is not None and contradicts_booked(held.status, reported)
                    and workflow.patched(NEWS_PATCH)):
                self._status = CaseStatus.OPS_REVIEW
                await self._record(CONTRADICTED, None, detail, status=CaseStatus.OPS_REVIEW,
                                   notices=(self._notice(CONTRADICTED, detail, held),))
            else:
                await self._record(step.action, None, detail)
            return
        if held is not None and not self._mismatched and (found := refund_mismatch(held, reported)) \
                and workflow.patched(NEWS_PATCH):
            detail = {"before": found["requested"], "reported": found["reported"],
                      "provider_refund_id": reported.refund_id, "source": source}
            self._mismatched = True
            await self._record(CHANGED, None, detail, status=CaseStatus.OPS_REVIEW,
                               notices=(self._notice(CHANGED, detail, held),))
        self._refund = reported
        self._status = CaseStatus.OPS_REVIEW if self._mismatched else step.status
        if reported.status is ProviderRefundStatus.SUCCEEDED:
            self._succeeded_at = workflow.now()
        if step.ledger is not None:
            assert self._inp is not None
            posted = await contracts.POST_LEDGER(
                LedgerInput(refund_request_id=self._inp.case_id, kind=step.ledger, amount=reported.amount,
                            currency=reported.currency, provider_refund_id=reported.refund_id),
                **retry.LEDGER)
            self._postings.append(posted.posting_key)
        detail = {"source": source, "failure_reason": reported.failure_reason}
        notices = tuple(self._notice(kind, detail, reported) for kind, audience
                        in STATUS_NOTICES.get(reported.status, ()) if audience == "operator")
        await self._record(step.action, reported, detail, status=self._status, release=step.release,
                           notices=notices)

    async def _record_refused_news(self, action: str, detail: dict[str, Any]) -> None:
        await self._record(action, None, detail)

    def _notice(self, kind: str, detail: dict[str, Any], refund: ProviderRefund) -> NoticeInput:
        """An ops notice, once per case, kind and the refund's status (a customer's notice
        needs a contact a refund made without us does not give us)."""
        assert self._inp is not None
        case_id = self._inp.case_id
        return NoticeInput(refund_request_id=case_id, kind=kind, audience="operator",
                           dedup_key=f"{case_id}:{kind}:operator:{refund.status.value}", detail=detail,
                           dispatch_queue=workflow.info().task_queue)

    async def _record(self, action: str, refund: ProviderRefund | None, detail: dict[str, Any], *,
                      status: CaseStatus | None = None, release: bool = False,
                      notices: tuple[NoticeInput, ...] = ()) -> None:
        """The case event; the notices it announces queued first (for the worker pool's
        dispatcher), in executions since NEWS_PATCH."""
        assert self._inp is not None
        if notices and workflow.patched(NEWS_PATCH):
            for notice in notices:
                await contracts.QUEUE_NOTICE(notice, **retry.CASE_EVENT)
        await contracts.RECORD_CASE_EVENT(
            CaseEventInput(refund_request_id=self._inp.case_id, action=action,
                           actor=f"provider:{self._inp.provider}", status=status,
                           release_reservation=release, provider_refund=refund, detail=detail),
            **retry.CASE_EVENT)
