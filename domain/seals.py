"""What a workflow knows of an approval's seal: the worker's seal check
(`adapters.approval_seal`, outside the sandbox, where the keys are) hands each verdict over
as a `CheckedApproval`, each payout reissue request as a `CheckedReissueAsk`, each piece of
provider news as a `CheckedProviderEvent` or `CheckedPayoutEvent`; the workflow reads only
whether the seal held. Pure, so workflows may import it and the sandbox passes it through
(the check and the workflow see one class)."""

from datetime import datetime
from typing import overload

from domain.models import ApprovalSignal, Decision, ProviderEvent
from domain.payouts import PayoutEvent, ReissueAsk


class CheckedApproval(ApprovalSignal):
    """A verdict as the worker's seal check hands it to the workflow: `refusal` is empty
    when the relay's seal held. Only the interceptor builds one."""

    refusal: str = ""
    late: bool = False
    """The seal held but its window had passed when the workflow took the verdict (a
    worker away longer than the window): refused as an approval, still a denial."""
    sealed_at: datetime | None = None
    """When the relay sealed it (the seal held): its approver's access was read then, so a
    token revoked since voids it however late the workflow took it."""


def verdict_sealed_at(signal: ApprovalSignal) -> datetime | None:
    """When the relay sealed a verdict whose seal held (None otherwise)."""
    return signal.sealed_at if isinstance(signal, CheckedApproval) else None


def seal_refusal(signal: ApprovalSignal) -> str:
    """Why a verdict does not carry the relay's authority ("" when it does)."""
    if not isinstance(signal, CheckedApproval):
        return "approval not checked for the relay's seal (worker without the seal check)"
    return signal.refusal


UNSEALED_SENDER = "temporal"
"""Who the refusal of unsealed news, a verdict or a request is written as: whoever reached
Temporal without the relay's seal. A person a verdict or request names is only its sender's
word (kept as `named`)."""


def named_by_relay(signal: ApprovalSignal) -> bool:
    """Whether the verdict's approver is one the relay authenticated: its seal held, within
    its window or past it (`late`). Replayed, moved or missing seals name nobody."""
    return not seal_refusal(signal) or (isinstance(signal, CheckedApproval) and signal.late)


def late_denial(signal: ApprovalSignal) -> bool:
    """A denial the relay sealed that reached the workflow past its seal's window: the
    channel answered "signalled" (a ServiceNow rejection is sent once), and a denial moves no
    money, so it still denies; a late approval counts for nothing."""
    return isinstance(signal, CheckedApproval) and signal.late and signal.decision is Decision.DENY


class CheckedReissueAsk(ReissueAsk):
    """A payout reissue request as the seal check hands it over (`refusal` as above)."""

    refusal: str = ""


def reissue_refusal(ask: ReissueAsk) -> str:
    """Why a reissue request does not carry the relay's authority ("" when it does)."""
    if not isinstance(ask, CheckedReissueAsk):
        return "reissue request not checked for the relay's seal (worker without the seal check)"
    return ask.refusal


class CheckedProviderEvent(ProviderEvent):
    """A refund event as the seal check hands it over (`refusal` as above): only the relay
    and the workers, which hold the keys, report a provider's news to a case."""

    refusal: str = ""


class CheckedPayoutEvent(PayoutEvent):
    """A payout event as the seal check hands it over (`refusal` as above)."""

    refusal: str = ""


NOT_CHECKED = "news not checked for the seal (worker without the seal check)"


def news_refusal(event: ProviderEvent | PayoutEvent) -> str:
    """Why a provider event does not carry the relay's or a worker's authority ("" when it
    does)."""
    if not isinstance(event, CheckedProviderEvent | CheckedPayoutEvent):
        return NOT_CHECKED
    return event.refusal


@overload
def unchecked(event: ProviderEvent) -> ProviderEvent: ...
@overload
def unchecked(event: PayoutEvent) -> PayoutEvent: ...
@overload
def unchecked(event: ProviderEvent | PayoutEvent) -> ProviderEvent | PayoutEvent: ...


def unchecked(event: ProviderEvent | PayoutEvent) -> ProviderEvent | PayoutEvent:
    """The event as its own model (the check's answer dropped): what a workflow keeps,
    carries and passes to activities, which know no `refusal`."""
    if isinstance(event, CheckedProviderEvent):
        return ProviderEvent.model_validate(event.model_dump(exclude={"refusal"}))
    if isinstance(event, CheckedPayoutEvent):
        return PayoutEvent.model_validate(event.model_dump(exclude={"refusal"}))
    return event
