"""Starting case workflows: shared by the refund-request API and the webhook path."""

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from adapters.config import Settings
from adapters.db.cases import CaseRepository
from adapters.providers.base import ProviderAdapter, ReferenceRules, amount_refusal
from domain.events import TrackingInput
from domain.models import (
    CaseStatus,
    ProviderEvent,
    RefundReason,
    RefundRequest,
    RefundWorkflowInput,
    RequestSource,
)
from domain.payouts import PayoutCaseInput, PayoutEvent, payout_case_id
from workflows.payout import PayoutReversalWorkflow
from workflows.refund import RefundWorkflow
from workflows.tracking import RefundTrackingWorkflow


async def start_refund(client: Client, settings: Settings, request: RefundRequest, requester: str,
                       status: str, trigger: ProviderEvent | None = None) -> WorkflowHandle[Any, Any]:
    """Starts the case's workflow, or attaches to the one already running or finished. Only
    a case no workflow has moved yet (`status` requested) is started: one in any other
    status had its workflow, and when that is gone (handed to ops by the closed-workflow
    sweep, or past retention) a repeat of the request must not run it again."""
    if status != CaseStatus.REQUESTED:
        return client.get_workflow_handle(request.refund_request_id)
    inp = RefundWorkflowInput(request=request, requester=requester, timings=settings.timings())
    options: dict[str, Any] = {
        "id": request.refund_request_id, "task_queue": settings.task_queue,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
    }
    if trigger is not None:
        options["start_signal"] = "provider_event"
        options["start_signal_args"] = [trigger]
    try:
        return await client.start_workflow(RefundWorkflow.run, inp, **options)
    except WorkflowAlreadyStartedError:
        return client.get_workflow_handle(request.refund_request_id)


async def _signal_with_start(client: Client, settings: Settings, run: Any, inp: Any, case_id: str,
                             signal: str, event: Any) -> WorkflowHandle[Any, Any] | None:
    """Starts the case's workflow with the event, or signals the one running; None when the
    case already finished (its id is never reused)."""
    try:
        return await client.start_workflow(
            run, inp, id=case_id, task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            start_signal=signal, start_signal_args=[event])
    except WorkflowAlreadyStartedError:
        return None


async def track_refund(client: Client, settings: Settings, case_id: str,
                       event: ProviderEvent) -> WorkflowHandle[Any, Any] | None:
    """Signal-with-start of the tracking workflow; None when it already finished."""
    refund = event.as_refund()
    assert refund is not None
    inp = TrackingInput(case_id=case_id, provider=refund.provider, refund_id=refund.refund_id,
                        currency=refund.currency, timings=settings.timings())
    return await _signal_with_start(client, settings, RefundTrackingWorkflow.run, inp, case_id,
                                    "provider_event", event)


async def open_payout_case(client: Client, settings: Settings,
                           event: PayoutEvent) -> WorkflowHandle[Any, Any] | None:
    """Signal-with-start of the payout's exception case; None when it already finished."""
    case_id = payout_case_id(event.provider, event.payout.payout_id)
    inp = PayoutCaseInput(case_id=case_id, provider=event.provider, payout_id=event.payout.payout_id,
                          timings=settings.timings(),
                          reissue_window=timedelta(seconds=settings.payout_reissue_window_seconds))
    return await _signal_with_start(client, settings, PayoutReversalWorkflow.run, inp, case_id,
                                    "payout_event", event)


def request_from_event(event: ProviderEvent) -> RefundRequest:
    """A provider-originated refund request becomes an ordinary request with a derived id."""
    return RefundRequest(
        refund_request_id=f"{event.provider}-{event.request_object_id}", provider=event.provider,
        charge_id=event.charge_id or "", amount=event.amount or 0, currency=event.currency or "",
        merchant_account=event.merchant_account or "", reason=event.reason or RefundReason.OTHER,
        evidence=event.evidence, source=RequestSource.WEBHOOK,
    )


def entry_refusal(providers: Mapping[str, ProviderAdapter], provider: str, amount: int,
                  currency: str, reference: str | None = None) -> tuple[str, str] | None:
    """Why a refund or payout cannot enter for this provider, and the field at fault: no
    such provider is configured, it cannot take the amount at once (more than its limit,
    or no exact equal in the units its API counts), or it cannot take the request id as its
    refund's id (`reference`). Checked where requests and payouts enter, before a case or
    workflow exists."""
    adapter = providers.get(provider)
    if adapter is None:
        return "provider", f"provider {provider!r} is not configured"
    if why := amount_refusal(adapter, amount, currency):
        return "amount", why
    if reference is not None and isinstance(adapter, ReferenceRules) and (
            why := adapter.reference_refusal(reference)):
        return "refund_request_id", why
    return None


async def new_request_refusal(cases: CaseRepository, providers: Mapping[str, ProviderAdapter],
                              request: RefundRequest) -> tuple[str, str] | None:
    """`entry_refusal` for a request that would open a case. A repeat of one that did gets
    its case (or its conflict) whatever a later deploy made of the provider or its limits:
    a client re-sending "to be safe" must not read "refused" while its case can refund."""
    refused = entry_refusal(providers, request.provider, request.amount, request.currency,
                            request.refund_request_id)
    if refused is None or await cases.get(request.refund_request_id) is not None:
        return None  # the case is read only for a refusal: an accepted request costs no read
    return refused
