"""Every activity's contract: its registered name, its input and its result type, once.

Workflows call an activity through its contract (`await contracts.POST_LEDGER(posting,
**retry.LEDGER)`) and the activities in `activities/` register under `contract.name`, so
a name or a result type is never written twice. The contracts carry names and domain
types only: importing this module does no I/O and pulls no adapter into Temporal's
sandbox (`domain` is passed through, so a workflow's activation does not re-import it).
Calling by name, not by function reference, is what keeps the activities (and their
database and HTTP clients) out of the workflow code.
"""

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from temporalio import workflow

from domain.incidents import DuplicateRefundInput, ProviderWordInput
from domain.integrations import AdviceReceipt, AdviseInput, DeliverNoticeInput, DeliverNoticesInput
from domain.models import (
    CaseEventInput,
    CaseWrites,
    CaseWritten,
    LedgerInput,
    LedgerResult,
    NoticeInput,
    PolicyDecision,
    PolicyInput,
    ProviderRefund,
    SubmitInput,
    ValidateInput,
    ValidationResult,
    VerifyInput,
    VerifyResult,
    Vetted,
)
from domain.payouts import (
    AdmitInput,
    AdmitResult,
    HoldInput,
    HoldResult,
    LinkedTicket,
    LinkTicketInput,
    PayoutAtProvider,
    PayoutCaseEventInput,
    PayoutDecision,
    PayoutPolicyInput,
    PayoutSnapshot,
    ReissueInput,
    ReleaseResult,
    ReversalInput,
    TicketInput,
    TicketResult,
    TriageInput,
    TriageReceipt,
)
from domain.reconciliation import (
    BatchInput,
    BatchResult,
    BreakApproval,
    BreakCase,
    BreakOutcome,
    BreakSettlement,
    RunFailure,
    RunSummary,
    RunWindow,
)

InputT = TypeVar("InputT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Activity(Generic[InputT, ResultT]):
    """One activity as a workflow sees it; calling it runs the activity (from workflow
    code only) with the timeouts and retry policy given, the options of
    `workflow.execute_activity` (the dicts of `workflows.retry`); `local` runs the same
    implementation as a local activity (`workflow.execute_local_activity`: inside the
    workflow task, one marker event instead of a task of its own, retried by the worker)."""

    name: str
    input: type[InputT]
    result: type[ResultT]

    async def __call__(self, inp: InputT, **options: Any) -> ResultT:
        result: ResultT = await workflow.execute_activity(self.name, inp, result_type=self.result, **options)
        return result

    async def local(self, inp: InputT, **options: Any) -> ResultT:
        """Runs it as a local activity: only for short, idempotent steps that move no money (a
        retry runs it again in the workflow task): the case's database writes, and validation's
        charge read. A call that can move money (a submit, a reissue) never goes here."""
        result: ResultT = await workflow.execute_local_activity(self.name, inp, result_type=self.result,
                                                                **options)
        return result


# The refund case (activities/refund.py)
VALIDATE_REFUND = Activity("validate_refund", ValidateInput, ValidationResult)
DECIDE_POLICY = Activity("decide_policy", PolicyInput, PolicyDecision)
RECORD_CASE_EVENT = Activity("record_case_event", CaseEventInput, type(None))
SUBMIT_PROVIDER_REFUND = Activity("submit_provider_refund", SubmitInput, ProviderRefund)
VERIFY_PROVIDER_REFUND = Activity("verify_provider_refund", VerifyInput, VerifyResult)
POST_LEDGER = Activity("post_ledger", LedgerInput, LedgerResult)
QUEUE_NOTICE = Activity("queue_notice", NoticeInput, type(None))
# Since `fewer-round-trips-1`: validation with the policy's decision, and a case step's
# writes (ledger posting, notices, events) in one transaction (run as a local activity).
VALIDATE_AND_DECIDE = Activity("validate_and_decide", ValidateInput, Vetted)
WRITE_CASE_STEPS = Activity("write_case_steps", CaseWrites, CaseWritten)

# Beside the case: notices and advice (activities/integrations.py), incidents (activities/incidents.py)
DELIVER_NOTICE = Activity("deliver_notice", DeliverNoticeInput, type(None))
DELIVER_NOTICES = Activity("deliver_notices", DeliverNoticesInput, type(None))
ADVISE_REFUND = Activity("advise_refund", AdviseInput, AdviceReceipt)
OPEN_DUPLICATE_REFUND_BREAK = Activity("open_duplicate_refund_break", DuplicateRefundInput, bool)

# The payout exception case (activities/payout.py)
ADMIT_PAYOUT_EVENT = Activity("admit_payout_event", AdmitInput, AdmitResult)
TRIAGE_PAYOUT_EXCEPTION = Activity("triage_payout_exception", TriageInput, TriageReceipt)
DECIDE_PAYOUT_REVERSAL = Activity("decide_payout_reversal", PayoutPolicyInput, PayoutDecision)
RECORD_PAYOUT_CASE_EVENT = Activity("record_payout_case_event", PayoutCaseEventInput, type(None))
READ_PAYOUT_AT_PROVIDER = Activity("read_payout_at_provider", ReversalInput, PayoutAtProvider)
HOLD_PAYOUT = Activity("hold_payout", HoldInput, HoldResult)
POST_PAYOUT_REVERSAL = Activity("post_payout_reversal", ReversalInput, LedgerResult)
RELEASE_PAYOUT_HOLD = Activity("release_payout_hold", ReversalInput, ReleaseResult)
GIVE_UP_PAYOUT_REVERSAL = Activity("give_up_payout_reversal", ReversalInput, ReleaseResult)
OPEN_PAYOUT_TICKET = Activity("open_payout_ticket", TicketInput, TicketResult)
LINK_PAYOUT_TICKET = Activity("link_payout_ticket", LinkTicketInput, LinkedTicket)
REISSUE_PAYOUT = Activity("reissue_payout", ReissueInput, PayoutSnapshot)

# Reconciliation runs and breaks (activities/reconciliation.py)
OPEN_RECONCILIATION_RUN = Activity("open_reconciliation_run", RunWindow, type(None))
RECONCILE_BATCH = Activity("reconcile_batch", BatchInput, BatchResult)
FINISH_RECONCILIATION_RUN = Activity("finish_reconciliation_run", str, RunSummary)
FAIL_RECONCILIATION_RUN = Activity("fail_reconciliation_run", RunFailure, type(None))
LOAD_BREAK_CASE = Activity("load_break_case", BreakCase, BreakCase)
OPEN_BREAK_EXCEPTION = Activity("open_break_exception", BreakCase, BreakApproval)
HAND_BREAK_TO_PAYOUT_CASE = Activity("hand_break_to_payout_case", BreakCase, bool)
SETTLE_BREAK = Activity("settle_break", BreakSettlement, BreakOutcome)
RECONCILE_PROVIDER_WORD = Activity("reconcile_provider_word", ProviderWordInput, type(None))

ALL: tuple[Activity[Any, Any], ...] = tuple(
    value for value in list(globals().values()) if isinstance(value, Activity))
"""Every contract, for the worker's registration check and the contract test."""
