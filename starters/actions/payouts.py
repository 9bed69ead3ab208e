"""The rules for payout exception cases that both front ends apply: the public view of a
case (the API's answer, the console's page) and a verdict on its current approval round."""

from typing import Any

from adapters.db import Principal, Store
from domain.models import Decision
from domain.payouts import APPROVAL_STATUSES, PayoutCaseStatus
from domain.permissions import Permission
from starters.actions.approving import ApprovalBody, approvals_view
from starters.actions.cases import CaseActions


async def payout_case_view(store: Store, case_id: str) -> dict[str, Any] | None:
    """The public view of a payout exception case (the API's answer, the console's page)."""
    row = await store.payouts.case(case_id)
    if row is None:
        return None
    payout = await store.payouts.payout(row["payout_id"])
    assert payout is not None
    trail = await store.audit.trail(case_id)
    decision = row["decision"] or {}
    approvals, missing = approvals_view(await store.audit.approvals_of(case_id),
                                        (decision.get("decision") or {}).get("requirements", []),
                                        row["status"] in APPROVAL_STATUSES)
    reissue = await store.payouts.payout(payout.reissue_id())
    if reissue is not None and reissue.reissue_of != payout.id:  # booked under its id, not it
        reissue = None
    return {
        "case_id": case_id, "status": row["status"], "payout": payout.model_dump(mode="json"),
        "reported_status": row["reported_status"], "failure_code": row["failure_code"],
        "decision": row["decision"], "missing_roles": missing, "approvals": approvals,
        "recommendation": row["recommendation"], "ticket_ref": row["ticket_ref"],
        "reversal_entry_id": row["reversal_entry_id"],
        "beneficiary_holds": [{"case_id": h.case_id, "placed_at": h.placed_at.isoformat(),
                               "released_at": h.released_at.isoformat() if h.released_at else None}
                              for h in await store.payouts.beneficiary_holds(payout.beneficiary_id)],
        "reissue": reissue.model_dump(mode="json") if reissue else None,
        "timeline": [{"at": e["occurred_at"].isoformat(), "actor": e["actor"], "action": e["action"],
                      "detail": e["detail"]} for e in trail],
    }


class PayoutApprovalBody(ApprovalBody):
    """A verdict on a payout case. Its two rounds (the reversal, then a reissue) can need
    the same role, so a verdict names the round it was given for: `awaiting`, the status
    the approver was shown. Required: a verdict naming none counted in whatever round was
    open, so one read for the reversal could complete the reissue (a second payment)."""

    awaiting: PayoutCaseStatus


async def decide_on_payout_exception(actions: CaseActions, caller: Principal, case_id: str,
                                     body: PayoutApprovalBody, *, via: str) -> dict[str, Any]:
    """The one rule for a verdict on a payout case, whichever front end asks (API or
    console): approver roles, the case awaiting approval (in the round the verdict names),
    then the workflow's update validator (tier roles, segregation of duties). Refusals
    raise `Refused`; a verdict for another round is audited."""
    action = "approving a payout exception"
    await actions.require(caller, Permission.APPROVE_PAYOUT_EXCEPTION, action, case_id, via=via)
    row = await actions.store.payouts.case(case_id)
    if row is None:
        await actions.refuse(caller, None, 404, action, f"no payout exception {case_id!r}", via=via)
    if row["status"] not in APPROVAL_STATUSES:
        await actions.refuse(caller, case_id, 409, action, f"case is {row['status']}, not awaiting approval",
                             via=via)
    if body.awaiting != row["status"]:
        await actions.refuse(caller, case_id, 409, action,
                             f"this verdict was given for the case {body.awaiting.value}; it is now "
                             f"{row['status']}: reload it and decide again", via=via)
    if row["status"] == PayoutCaseStatus.AWAITING_REISSUE_APPROVAL and body.decision is Decision.APPROVE:
        # the reissue would decline for either before it pays: another approver fills the slot
        if released := await actions.store.payouts.acted_on_beneficiary(
                case_id, caller.user, "beneficiary_hold_released"):
            await actions.refuse(caller, case_id, 403, action,
                                 f"{caller.user} released this beneficiary's hold on {', '.join(released)}: "
                                 "another person approves a payout to them", via=via,
                                 audit_action="access_refused")
        payout = await actions.store.payouts.payout(row["payout_id"])
        if payout is not None and (registered := await actions.store.payouts.registered_in_lineage(
                payout, caller.user)):
            await actions.refuse(caller, case_id, 403, action,
                                 f"{caller.user} registered payout {registered} (and named its "
                                 "beneficiary): another person approves paying it again", via=via,
                                 audit_action="access_refused")
    progress = await actions.verdict(caller, case_id, body, row["status"], action, via=via)
    return {"case_id": case_id, "decision": body.decision.value, "status": progress.status,
            "missing_roles": list(progress.missing_roles),
            **({"detail": progress.reason} if progress.reason else {})}
