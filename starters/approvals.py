"""Sending an approver's verdict to a workflow's `submit_approval` update (refund cases and
reconciliation exception cases alike) and sorting its refusals for the HTTP answer."""

from typing import Any

from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from domain.models import ApprovalSignal


class ApprovalRefused(Exception):
    """The workflow refused the verdict: 409 when it is not awaiting approval, else 403."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason


async def send_approval(handle: WorkflowHandle[Any, Any], update: Any, signal: ApprovalSignal) -> Any:
    """The update's answer; its validator's refusal raises ApprovalRefused."""
    try:
        return await handle.execute_update(update, signal)
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        reason = cause.message if isinstance(cause, ApplicationError) else str(cause)
        not_waiting = isinstance(cause, ApplicationError) and cause.type == "NotAwaitingApproval"
        raise ApprovalRefused(409 if not_waiting else 403, reason) from None
