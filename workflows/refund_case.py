"""The refund case's shared state: the patches a refund execution branches on, the
attributes every part of `RefundWorkflow` reads, and the hooks one part calls in a later
one. The workflow is a chain of bases with one job each: `RefundCase` (this), the case's
writes and notices (`refund_writes`), the provider side (`refund_provider`), cancel and
continue-as-new (`refund_lifecycle`), and the run itself (`refund`).
"""

import asyncio
from datetime import datetime
from typing import Any

from temporalio import workflow
from temporalio.exceptions import is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from domain.events import Observation
    from domain.models import (
        CaseState,
        CaseStatus,
        CaseWrite,
        PolicyDecision,
        ProviderEvent,
        ProviderRefund,
        RefundOutcome,
        RefundRequest,
        RefundTimings,
        RefundWorkflowInput,
        Vetted,
    )
    from workflows.approvals import ApprovingWorkflow
    from workflows.news import NewsGate

PROVIDER_SCOPED_WAIT_PATCH = "provider-scoped-notification-1"
"""From this patch on, the wait for a notification takes only the case's provider's events."""
# Histories recorded before the advisor and notice delivery existed replay without them.
INTEGRATIONS_PATCH = "integrations-1"
# A second provider refund with our reference was a log line before it was an incident.
DUPLICATE_PATCH = "duplicate-refund-incident-1"
# An escalated notification wait left the case `executing`; it is in ops review since.
ADYEN_WAIT_PATCH = "adyen-wait-ops-review-1"
# A cancelled case releases its reservation, or follows a refund the provider holds to the
# ledger; before, cancellation simply ended the workflow and froze the case.
CANCEL_PATCH = "refund-cancel-1"
# A case cancelled after a submit waits out the attempt (its start-to-close) and then the
# provider horizon before its last lookup: a create can land that long after its call ended.
# Before, the lookup came after the submit timeout alone and a later create went unbooked.
CANCEL_HORIZON_PATCH = "cancel-provider-horizon-1"
# Validation that cannot be answered (a refused key, reads exhausted) waits in ops review and
# asks again; since, a cancel ends that wait (nothing is reserved between attempts) and the
# case is canceled_by_ops. Before, the cancel waited for a validation that never came.
CANCEL_VALIDATION_PATCH = "cancel-validation-wait-1"
# Statuses in which a submit may be at the provider while we do not know its refund yet.
SUBMITTING = frozenset({CaseStatus.EXECUTING, CaseStatus.VERIFYING, CaseStatus.OPS_REVIEW})
# Open-ended waits continue as new past `continue_as_new_after_events`, and resubmits stop
# after `max_submit_attempts` (the case goes to ops, still looking); before, a long outage
# ran into Temporal's history limit.
BOUNDED_PATCH = "refund-bounded-history-1"
# Histories recorded before the provider horizon resubmitted after the backoff alone.
HORIZON_PATCH = "resubmit-horizon-1"
# A verify-state lookup that finds several refunds with our reference raises the duplicate
# incident; before, the lookup followed one and logged the others.
VERIFY_DUPLICATES_PATCH = "verify-duplicate-refunds-1"
# A refund the provider reports for another amount or currency than the request was booked
# as reported and shown as the request done; since, the case goes to ops review and ops hear.
MISMATCH_PATCH = "provider-refund-mismatch-1"
# Fewer round trips per refund (issue 21): validation and the policy's decision in one
# activity; `execution_started` committed with the submit's intent; the ledger posting, its
# notices and the status in one transaction; the case's database writes as local
# activities; advice beside the money path. Every patch above holds for such an execution,
# so their markers are not written again (`since`).
TRIPS_PATCH = "fewer-round-trips-1"
# The case only queues its notices (named for its task queue's dispatcher, in its steps'
# transactions); the worker pool delivers them (`workers.outbox`). Before, a courier beside
# the case delivered them from `deliver_notices`: an activity and a workflow task a case.
# Implies TRIPS_PATCH, whose marker such an execution does not write.
DISPATCH_PATCH = "notices-dispatched-1"
# Validation (the charge read, the reservation, the policy's decision) runs as a local
# activity: it moves no money and a retry finds what an attempt took, and an activity task
# with its workflow task was an eighth of an auto-approved refund's cost. The submit stays an
# activity, always. Implies DISPATCH_PATCH, whose marker such an execution does not write.
LOCAL_VALIDATION_PATCH = "validation-local-1"
# The deciding approval and the requester's `refund_approved` notice are one local write (one
# transaction); before, the notice was a second local activity in the same workflow task.
# Implies LOCAL_VALIDATION_PATCH, whose marker such an execution does not write.
APPROVED_NOTICE_PATCH = "approved-notice-folded-1"
# The deciding approval's row and the requester's notice are committed with the submit's
# intent (its first transaction, before the provider is called): after an approval a case is
# the submit and the settlement's write. Where no submit wrote them (a cancel or a failed
# attempt first) they are written on their own, only while no submit began. Before, they were
# a local write of their own. Implies APPROVED_NOTICE_PATCH, whose marker such an execution
# does not write.
APPROVAL_WITH_SUBMIT_PATCH = "approval-with-submit-1"
# The late-failure watch takes only the case's provider's events too (as the notification
# wait does since PROVIDER_SCOPED_WAIT_PATCH); before, another provider's event naming the
# case was raised as a duplicate refund of it. Asked only when such an event arrives, so a
# refund without one writes no marker.
FOLLOW_SCOPE_PATCH = "provider-scoped-follow-1"
# In the follow loop, an event of the executor whose refund the case follows (a bank
# transfer's confirmation: `manual`, while the reissue keeps its parent's provider) is that
# refund's word, taken at once; before, it was ignored as another provider's and the case
# moved only at its next status poll. Asked only when such an event arrives.
EXECUTOR_EVENTS_PATCH = "executor-events-followed-1"
# A submit refused because the case moved on under it (its row closed or its hold released:
# a denial a worker kill left recorded while a retried task approved, a sweep) ends the
# execution without moving money or status; before, it was taken for an unknown outcome and
# resubmitted until ops review. Asked only when such a refusal comes back.
CASE_MOVED_ON_PATCH = "submit-case-moved-on-1"
# A verdict's step (an approval counted, a denial, a refusal) is written by an activity, not a
# local one: its write runs only once the workflow task that took the verdict has completed,
# so it always agrees with the history. A local write ran inside that task, and a task that
# never completed (a worker killed, a signal landing as it closed the case) left its denial
# written (status denied, hold released) while the task run again took the verdicts in
# another order and approved. Asked only when a verdict's step is written.
VERDICTS_COMMITTED_PATCH = "verdict-steps-committed-1"
# While a case waits for its refund by reference (a provider without a status lookup, or
# no more submits), an event about a refund of another charge carrying its reference is not
# its refund: it stays queued (the follow loop raises it as a refund carrying the case's
# reference). Before, the first such event (same amount and currency) was taken as the case's
# refund: booked as refunded while the customer's payment was not. Asked when a wait begins.
CHARGE_SCOPED_WAIT_PATCH = "charge-scoped-notification-1"
# A cancel reads what the case had heard and not yet acted on before the run ends: a
# duplicate refund whose report it interrupted (reported again: the break and the notice are
# idempotent), and, when the refund is succeeded or final, events in its inbox and refunds a
# lookup found beside its own. Before, a signal and a cancel in one task lost a second refund
# with the case's reference (money moved twice: no break, no notice, the case shown
# succeeded); a late failure heard then went unbooked. Asked only when such news waits.
CANCEL_NEWS_PATCH = "cancel-reads-pending-news-1"
# A cancel after a submit whose lookup misses the refund takes the refund a queued event
# reports (its webhook came while the cancel waited out the horizon; the provider's list lags
# its write). Before, the case was released as `canceled_by_ops` with the money gone, nothing
# booked and the event unread. Asked only when such an event waits.
CANCEL_NOTIFIED_PATCH = "cancel-takes-notified-refund-1"
# A provider that reports `canceled` for a refund it reported succeeded (and the ledger
# booked) contradicts itself: the case goes to ops review and ops hear of it once. Before, the
# report was only audited (`provider_status_impossible_ignored`) while the case watched for a
# late failure, though the relay makes a break of it once the workflow has closed. Asked only
# when such a report comes.
CONTRADICTION_PATCH = "provider-contradiction-to-ops-1"
# A run whose watch is over still waits for its last writes before it ends (a late verdict's,
# a refused forgery's record, advice); an event the relay signals meanwhile is accepted (the
# workflow runs, so the relay's after-close handling does not apply) and is now read as in
# the watch. Before, it was never read: a late failure then reversed nothing and told nobody.
# Asked only when such an event waits for a run with a refund.
FINISH_NEWS_PATCH = "finish-reads-queued-news-1"
# The same for a run that ends without a refund after a submit (a cancel or a decline whose
# lookup missed it): a queued event reporting the case's refund is taken and followed, as the
# cancel takes one it already holds. Before, the run ended with it unread: the case released,
# nothing booked, the money gone. Asked only when such an event waits.
FINISH_NOTIFIED_PATCH = "finish-takes-notified-refund-1"
# While a case following its refund waits for word of it by reference (a provider without a
# status lookup: Adyen), an event about another refund carrying its reference is not its
# refund's word: it is raised as a refund carrying the case's reference and the wait goes on.
# Before, it was taken as the followed refund's: another refund's failure failed the case and
# released its reservation while its own refund was pending. Asked when such a wait begins.
FOLLOWED_WAIT_PATCH = "follow-wait-takes-followed-refund-1"
# A cancel that interrupts the record of a notification the case took off its inbox puts the
# event back, so the cancel's look at the provider takes it again (Adyen has no lookup: the
# notification is its only answer, and its redelivery is the same event, dropped). Before,
# the cancel waited for a notification already taken: the refund never booked, the case left
# in ops review. Asked only when such a cancel comes.
TAKEN_NOTIFICATION_PATCH = "cancel-keeps-taken-notification-1"
# A cancel that interrupts a write the case cannot lose writes it again before the run ends:
# one closing the case (an expiry, a decline: its status and released hold), or a provider's
# contradiction (ops review and the ops notice). Before, the run took it as done (the status
# is set before the write) and ended: the row kept its status and reservation with no
# workflow left to move it, or the case stayed shown succeeded with nobody told. Asked only
# when such a cancel comes.
INTERRUPTED_STEP_PATCH = "cancel-rewrites-interrupted-step-1"
# An ops resolution of a notification wait that reaches the case after the provider's own
# word ended the wait (both passed the relay while the wait was open), about the refund the
# case follows or naming none, changes nothing: recorded as superseded, ops told. Before,
# "not refunded" after Adyen's success was applied as the refund's late failure (a reversal,
# the hold released, the case reissuable while the money had moved), or, naming no refund,
# raised as a duplicate. Asked only when such an event comes.
SUPERSEDED_RESOLUTION_PATCH = "ops-resolution-superseded-1"
# The refund the case holds, reported again in the same status for other money (the case
# booked ops' reading of a notification wait; the provider's own word names another amount),
# goes to the mismatch check: ops review, ops told. Before, it was taken as a repeat and the
# ledger kept the amount ops read. Asked only when such an event comes.
HELD_MONEY_PATCH = "held-refund-other-money-1"
# The provider's own success for the refund the case ended failed on ops' reading of a wait
# ("no refund"), heard before the run ended: reconciled as after the close (a break for
# approval). Before, it read as older news than that failure (audited only) and, Adyen having
# no listing, the case showed refund_failed for money that moved. Asked only when one comes.
OPS_READ_CONTRADICTED_PATCH = "ops-read-contradicted-1"
# The same, for the case whose create answer was lost: it holds ops' "no refund" (`none-<id>`)
# and the provider's success names the refund that create made, under our reference.
# Before, it was raised as a second refund (a duplicate for ops, which no approval books:
# the hold stayed released and the ledger never booked the money that moved). Asked only
# when one comes.
OPS_NONE_CONTRADICTED_PATCH = "ops-none-contradicted-1"
SUPERSEDED_RESOLUTION = "provider_wait_resolution_superseded"
# The case's action, the ops notice and the metric's reason when a provider refuses our key.
CONFIGURATION_INCIDENT = "provider_configuration_refused"


class ValidationAbandoned(Exception):
    """Ops cancelled the case while its validation waited to be asked again."""


class RefundCase(ApprovingWorkflow):
    """What every part of the refund workflow shares; `RefundWorkflow.__init__` sets it."""

    _request: RefundRequest | None
    _timings: RefundTimings
    _status: CaseStatus
    _decision: PolicyDecision | None
    _event_inbox: list[ProviderEvent]
    _event_ids: set[str]
    _refund: ProviderRefund | None
    _failure_reason: str | None
    _moved_on: str | None
    _postings: list[str]
    _events_seen: int
    _succeeded_at: datetime | None
    _outbox: list[str]
    _courier: asyncio.Task[None] | None
    _advising: asyncio.Task[None] | None
    _holding: bool
    _trips: bool
    _dispatched: bool
    _local_validation: bool
    _approved_folded: bool
    _news: NewsGate
    _approval_with_submit: bool
    _deferred: tuple[CaseWrite, ...]
    _unsubmitted: tuple[CaseWrite, ...]
    _closing: bool
    _rewritten_on_cancel: tuple[CaseWrite, ...] | None
    _provider_scoped: bool
    _charge_scoped: bool
    _follow_scoped: bool
    _lookup_escalated: bool
    _duplicates: set[str]
    _mismatched: bool
    _found_duplicates: list[ProviderRefund]
    _reporting: list[tuple[ProviderRefund, str]]
    _applying: tuple[Observation, ProviderRefund, dict[str, Any]] | None
    _validating: asyncio.Future[Vetted] | None
    _cancel_requested: bool
    _input: RefundWorkflowInput | None
    _context: str
    _escalated: str | None
    _escalations: int
    _status_before_escalation: CaseStatus
    _attempt: int
    _submit_ended: datetime | None

    def state(self) -> CaseState:
        """The case as the workflow knows it (its query, in `refund`)."""
        raise NotImplementedError

    async def _submitted(self, refund: ProviderRefund | None) -> RefundOutcome:
        """After the submit: the run goes on (in `refund`), also for a continued run."""
        raise NotImplementedError

    async def _bound_history(self, phase: str, *, reason: str = "") -> None:
        """Continues as new past the history threshold (in `refund_lifecycle`)."""
        raise NotImplementedError

    def since(self, patch: str) -> bool:
        """An older patch holds: without a marker for an execution of the newest shape,
        which only ever ran after it (each marker costs two history events)."""
        return self._trips or workflow.patched(patch)

    def _request_id(self) -> str:
        assert self._request is not None
        return self._request.refund_request_id

    def _cancelled(self, err: BaseException) -> bool:
        """Whether an error is the workflow's cancellation (an activity awaited when it came
        fails with it); such an error is never an outcome to act on."""
        return is_cancelled_exception(err) and self.since(CANCEL_PATCH)
