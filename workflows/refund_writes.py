"""The refund case's writes and notices: case events, the outbox and its courier, the
ledger posting (with its incident while the ledger is down). Every database write of a
case step goes through here."""

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, FailureError

with workflow.unsafe.imports_passed_through():
    from domain import contracts
    from domain.integrations import DeliverNoticeInput, DeliverNoticesInput
    from domain.models import (
        CLOSED_STATUSES,
        CaseEventInput,
        CaseStatus,
        CaseWrite,
        CaseWrites,
        CaseWritten,
        LedgerInput,
        LedgerKind,
        LedgerResult,
        NoticeInput,
        ProviderRefund,
    )
    from workflows import retry
    from workflows.refund_case import INTEGRATIONS_PATCH, INTERRUPTED_STEP_PATCH, RefundCase


class RefundWrites(RefundCase):
    """Records, notices and postings of a refund case."""

    def _case_event(self, action: str, status: CaseStatus | None = None, *,
                    actor: str = "workflow", release: bool = False,
                    refund: ProviderRefund | None = None,
                    detail: dict[str, Any] | None = None) -> CaseEventInput:
        return CaseEventInput(refund_request_id=self._request_id(), action=action, actor=actor,
                              status=status, release_reservation=release, provider_refund=refund,
                              detail=detail or {})

    async def _record(self, action: str, status: CaseStatus | None = None, *,
                      actor: str = "workflow", release: bool = False,
                      refund: ProviderRefund | None = None,
                      detail: dict[str, Any] | None = None,
                      notices: tuple[NoticeInput, ...] = (), local: bool = True,
                      kept: bool = False) -> None:
        """Records a case event; `notices` (queued for the dispatcher) in its transaction.
        `local=False`: by an activity, written only once this workflow task has completed.
        `kept` (implied by a closing status): a cancel that interrupts it writes it again."""
        if status is not None:
            self._status = status
        event = self._case_event(action, status, actor=actor, release=release, refund=refund, detail=detail)
        if notices or self._trips:
            writes = (CaseWrite(event=event), *(CaseWrite(notice=n) for n in notices))
            kept = kept or status in CLOSED_STATUSES
            if kept:
                self._rewritten_on_cancel = writes
            try:
                await self._write(*writes, local=local)
            except (asyncio.CancelledError, FailureError) as err:
                if kept and not self._cancelled(err):  # only a cancel's interruption is redone
                    self._rewritten_on_cancel = None
                raise
            if kept:
                self._rewritten_on_cancel = None
        else:
            await contracts.RECORD_CASE_EVENT(event, **retry.CASE_EVENT)

    def _notice(self, kind: str, audience: str, detail: dict[str, Any],
                occasion: str | None = None) -> NoticeInput:
        """A notice, once per case, kind, audience and occasion (its dedup key): the refund's
        status, else the case's, unless the caller names one (a duplicate refund: its id)."""
        case_id = self._request_id()
        occasion = occasion or (self._refund.status.value if self._refund else self._status.value)
        return NoticeInput(refund_request_id=case_id, kind=kind, audience=audience,
                           dedup_key=f"{case_id}:{kind}:{audience}:{occasion}", detail=detail,
                           dispatch_queue=workflow.info().task_queue if self._dispatched else None)

    async def _notify(self, kind: str, audience: str, detail: dict[str, Any],
                      occasion: str | None = None) -> None:
        """Queues a notice in the outbox: for the worker pool's dispatcher, or (executions
        before DISPATCH_PATCH) handed to the courier that delivers it beside the case."""
        notice = self._notice(kind, audience, detail, occasion)
        if self._trips:
            await self._write(CaseWrite(notice=notice))
        else:
            await contracts.QUEUE_NOTICE(notice, **retry.CASE_EVENT)
        if self.since(INTEGRATIONS_PATCH):
            self._deliver_later(notice.dedup_key)

    def _deliver_later(self, dedup_key: str) -> None:
        """Hands a queued notice to the courier (started with the first); the worker pool's
        dispatcher has it instead since DISPATCH_PATCH."""
        if self._dispatched:
            return
        self._outbox.append(dedup_key)
        if self._courier is None:
            self._courier = asyncio.create_task(self._deliver_outbox())

    async def _write(self, *writes: CaseWrite, posting: LedgerInput | None = None,
                     unless_submitted: bool = False, local: bool = True, **options: Any) -> CaseWritten:
        """A case step's database writes in one transaction, as a local activity: short,
        idempotent (posting and dedup keys) and with nothing outside PostgreSQL. `local=False`
        for a step whose content a retried workflow task may decide otherwise (a verdict's:
        `VERDICTS_COMMITTED_PATCH`). Writes deferred to the case's next write (the deciding
        approval's) go first."""
        writes, self._deferred = (*self._deferred, *writes), ()
        run = contracts.WRITE_CASE_STEPS.local if local else contracts.WRITE_CASE_STEPS
        written: CaseWritten = await run(
            CaseWrites(refund_request_id=self._request_id(), posting=posting, writes=writes,
                       unless_submitted=unless_submitted),
            **(options or retry.CASE_EVENT))
        return written

    async def _settle_interrupted(self) -> None:
        """Writes again a write the case cannot lose (`_record`'s `kept`) that a cancel
        interrupted, possibly after its commit (its audit row may then repeat)."""
        if self._rewritten_on_cancel is not None and workflow.patched(INTERRUPTED_STEP_PATCH):
            await self._write(*self._rewritten_on_cancel)

    async def _settle_unsubmitted(self) -> None:
        """Writes what a submit carried (the deciding approval's row and notice) when its
        attempt may not have committed it (it failed, or the case was cancelled, and no
        attempt runs any more): in PostgreSQL only if no submit began."""
        if self._unsubmitted:
            await self._write(*self._unsubmitted, unless_submitted=True)
            self._unsubmitted = ()

    async def _deliver_outbox(self) -> None:
        """Delivers queued notices one at a time and in order (a ticket sees its updates in
        order); a failing channel delays later notices, never the case. Advice being asked
        is waited for first, so an approver's notice carries it. In the newest shape the
        courier takes every queued notice in one activity, and waits while a submit and its
        settlement run (seconds), so the approval and the outcome go out together."""
        if self._advising is not None:
            await self._advising
        if self._trips:
            while True:
                await workflow.wait_condition(
                    lambda: (bool(self._outbox) and not self._holding) or self._closing)
                if not self._outbox:
                    return
                keys, self._outbox = tuple(self._outbox), []
                try:
                    await contracts.DELIVER_NOTICES(DeliverNoticesInput(dedup_keys=keys), **retry.DELIVER)
                except ActivityError as err:
                    workflow.logger.warning("notices %s not delivered everywhere: %s", keys, err.cause)
        while True:
            await workflow.wait_condition(lambda: bool(self._outbox) or self._closing)
            if not self._outbox:
                return
            key = self._outbox.pop(0)
            try:
                await contracts.DELIVER_NOTICE(DeliverNoticeInput(dedup_key=key), **retry.DELIVER)
            except ActivityError as err:
                workflow.logger.warning("notice %s not delivered everywhere: %s", key, err.cause)

    def _posting(self, kind: LedgerKind, refund: ProviderRefund) -> LedgerInput:
        assert self._request is not None
        return LedgerInput(refund_request_id=self._request.refund_request_id, kind=kind,
                           amount=refund.amount, currency=refund.currency,
                           provider_refund_id=refund.refund_id)

    async def _ledger_pending(self, kind: LedgerKind, refund: ProviderRefund, err: FailureError) -> None:
        """The ledger did not answer in time: the incident and 'executed, ledger pending'."""
        error = err.cause if isinstance(err, ActivityError) else err
        self._holding = False  # the incident goes out now
        await self._notify("incident_ledger_pending", "finance_ops", {"template": kind.value})
        await self._record("ledger_pending", CaseStatus.EXECUTED_LEDGER_PENDING, refund=refund,
                           detail={"template": kind.value, "error": str(error)})

    async def _post_with(self, kind: LedgerKind, refund: ProviderRefund, writes: list[CaseWrite]) -> None:
        """`_post` with the step's notices and status in the posting's transaction (a local
        activity); while the ledger stays down, the incident is recorded on its own and
        the whole step retried until it lands."""
        posting = self._posting(kind, refund)
        try:
            written = await self._write(*writes, posting=posting,
                                        **retry.ledger_within(self._timings.ledger_pending_after))
        except FailureError as err:  # a local activity's failure comes unwrapped (no ActivityError)
            if self._cancelled(err):
                raise
            await self._ledger_pending(kind, refund, err)
            recovered = CaseWrite(event=self._case_event("ledger_recovered",
                                                         detail={"posting_key": posting.posting_key()}))
            written = await self._write(recovered, *writes, posting=posting, **retry.LEDGER)
        assert written.posting is not None
        self._postings.append(written.posting.posting_key)

    async def _post(self, kind: LedgerKind, refund: ProviderRefund) -> None:
        """Posts once the provider confirmed. If the ledger stays down, the case shows
        'executed, ledger pending', an incident is raised, and posting goes on until it
        lands; the provider is never called again for it."""
        posting = self._posting(kind, refund)
        try:
            result: LedgerResult = await contracts.POST_LEDGER(
                posting, schedule_to_close_timeout=self._timings.ledger_pending_after, **retry.LEDGER)
        except ActivityError as err:
            if self._cancelled(err):
                raise
            await self._ledger_pending(kind, refund, err)
            result = await contracts.POST_LEDGER(posting, **retry.LEDGER)
            await self._record("ledger_recovered", detail={"posting_key": result.posting_key})
        self._postings.append(result.posting_key)
