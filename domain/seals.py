"""What a workflow knows of an approval's seal: the worker's seal check
(`adapters.approval_seal`, outside the sandbox, where the keys are) hands each verdict over
as a `CheckedApproval`, each payout reissue request as a `CheckedReissueAsk`; the workflow
reads only whether the seal held. Pure, so workflows may
import it and the sandbox passes it through (the check and the workflow see one class)."""

from domain.models import ApprovalSignal
from domain.payouts import ReissueAsk


class CheckedApproval(ApprovalSignal):
    """A verdict as the worker's seal check hands it to the workflow: `refusal` is empty
    when the relay's seal held. Only the interceptor builds one."""

    refusal: str = ""


def seal_refusal(signal: ApprovalSignal) -> str:
    """Why a verdict does not carry the relay's authority ("" when it does)."""
    if not isinstance(signal, CheckedApproval):
        return "approval not checked for the relay's seal (worker without the seal check)"
    return signal.refusal


class CheckedReissueAsk(ReissueAsk):
    """A payout reissue request as the seal check hands it over (`refusal` as above)."""

    refusal: str = ""


def reissue_refusal(ask: ReissueAsk) -> str:
    """Why a reissue request does not carry the relay's authority ("" when it does)."""
    if not isinstance(ask, CheckedReissueAsk):
        return "reissue request not checked for the relay's seal (worker without the seal check)"
    return ask.refusal
