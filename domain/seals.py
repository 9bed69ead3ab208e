"""What a workflow knows of an approval's seal: the worker's seal check
(`adapters.approval_seal`, outside the sandbox, where the keys are) hands each verdict over
as a `CheckedApproval`; the workflow reads only whether the seal held. Pure, so workflows may
import it and the sandbox passes it through (the check and the workflow see one class)."""

from domain.models import ApprovalSignal


class CheckedApproval(ApprovalSignal):
    """A verdict as the worker's seal check hands it to the workflow: `refusal` is empty
    when the relay's seal held. Only the interceptor builds one."""

    refusal: str = ""


def seal_refusal(signal: ApprovalSignal) -> str:
    """Why a verdict does not carry the relay's authority ("" when it does)."""
    if not isinstance(signal, CheckedApproval):
        return "approval not checked for the relay's seal (worker without the seal check)"
    return signal.refusal
