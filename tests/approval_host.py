"""A minimal case workflow around the shared approval round, for races too many to run on
full refund cases: after its round it takes one more step (a short timer, standing in for
the activities a real case runs next) while it still reads `awaiting_approval`."""

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from domain.models import RefundTimings, RoleRequirement
    from workflows.approvals import ApprovalOutcome, ApprovalRound, ApprovingWorkflow


@workflow.defn
class ApprovalHostWorkflow(ApprovingWorkflow):
    """One approver round; returns the audit steps it recorded."""

    def __init__(self) -> None:
        self._round = ApprovalRound()
        self._status = "opening"
        self._steps: list[tuple[str, str]] = []

    @workflow.run
    async def run(self, approvers: int = 1) -> list[tuple[str, str]]:
        self._round.requirements = (RoleRequirement(role="approver", count=approvers),)
        self._round.requester = "alice"
        decided = await self._round.collect(self, RefundTimings(approval_reminder=None,
                                                                approval_escalation=None))
        await workflow.sleep(timedelta(milliseconds=300))  # the next step, still awaiting_approval
        self._status = "approved" if decided else "denied"
        await self.approvals_settled()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._steps

    @workflow.query
    def status(self) -> str:
        return self._status

    @workflow.query
    def steps(self) -> list[tuple[str, str]]:
        """The (action, actor) steps recorded so far."""
        return self._steps

    def approval_status(self) -> tuple[bool, str]:
        return self._status == "awaiting_approval", self._status

    async def approval_step(self, action: str, outcome: ApprovalOutcome | None = None, *,
                            actor: str = "workflow", detail: dict[str, Any] | None = None) -> None:
        if outcome is ApprovalOutcome.REQUESTED:
            self._status = "awaiting_approval"
        self._steps.append((action, actor))

    async def approval_notice(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        """No notices here."""
