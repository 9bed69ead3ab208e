"""The console's payout exception pages: the cases, and one case with its timeline (every
delivery, duplicates and late events included), the advisor's recommendation (advisory
only), approvals needed and given, the runbook steps done, the ticket and the hold.
Approve and deny call the API's own rule (`actions.payouts.decide_on_payout_exception`), so
the console can never do what the API would refuse."""

from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from adapters.db import ConsoleSession
from domain.payouts import APPROVAL_STATUSES, PayoutCaseStatus
from domain.permissions import Permission, may
from starters.actions.approving import PENDING_NOTICE, VERDICT_PENDING, Refused, verdict_notice
from starters.actions.front import front_door
from starters.actions.payouts import PayoutApprovalBody, decide_on_payout_exception, payout_case_view
from starters.console.pages import forbidden, page
from starters.console.sessions import PREFIX, current, posted

CASES_SHOWN = 200
NOTICES = {"approve": "Your approval was recorded; the case shows what it still needs.",
           "deny": "Your denial was recorded; the case acts on nothing further.",
           VERDICT_PENDING: PENDING_NOTICE}
# The runbook as the timeline records it: (step, the audit action that says it is done).
RUNBOOK = (("A hold", "payout_held"), ("B compensating entry", "ledger_posted"),
           ("B failed: hold rolled back", "payout_hold_rolled_back"), ("C ticket", "ticket_opened"),
           ("C ticket reference recorded", "ticket_ref_recorded"), ("D notice", "runbook_completed"),
           ("reissue", "payout_reissued"))
# Timeline rows that only join the case or are ignored, shown apart from the acting ones.
QUIET_ACTIONS = frozenset({"payout_status_stale_ignored", "payout_status_unchanged", "payout_already_handled",
                           "payout_event_joined"})


def runbook_view(trail: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each runbook step with when it was done (None: not done)."""
    first: dict[str, datetime] = {}
    for event in trail:
        first.setdefault(event["action"], event["occurred_at"])
    return [{"step": step, "action": action, "done_at": first.get(action)} for step, action in RUNBOOK]


router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/payouts")
async def payout_cases(request: Request, status: str = "") -> Response:
    session = await current(request)
    if denied := await forbidden(request, session, Permission.READ_PAYOUTS, "reading payout cases",
                                 "Payout cases"):
        return denied
    store = front_door(request).store
    known = [s.value for s in PayoutCaseStatus]
    if status and status not in known:
        await store.audit.record(None, session.principal.user, "action_refused", {
            "action": "filtering payout cases", "refusal": f"unknown status {status!r}",
            "via": "console"})
        return page(request, "message.html", session, status=422, title="Payout cases",
                    error=f"unknown status {status!r}")
    cases = await store.payouts.cases(CASES_SHOWN, status or None)
    return page(request, "payouts.html", session, cases=cases, wanted=status, statuses=known,
                limit=CASES_SHOWN)


async def case_page(request: Request, session: ConsoleSession, case_id: str, *, status: int = 200,
                    error: str = "", notice: str = "") -> Response:
    if denied := await forbidden(request, session, Permission.READ_PAYOUTS, "reading a payout case",
                                 "Payout case", case_id):
        return denied
    store = front_door(request).store
    view = await payout_case_view(store, case_id)
    if view is None:
        return page(request, "message.html", session, status=404, title="No such case",
                    error=f"There is no payout exception case {case_id!r}.")
    trail = await store.audit.trail(case_id)
    awaiting = view["status"] in APPROVAL_STATUSES
    return page(
        request, "payout.html", session, status=status, error=error, notice=notice, case=view,
        trail=trail, runbook=runbook_view(trail), quiet=QUIET_ACTIONS,
        ledger=await store.ledger.entries(case_id), notices=await store.outbox.notices(case_id),
        can_decide=awaiting and may(session.principal.roles, Permission.APPROVE_PAYOUT_EXCEPTION))


@router.get("/payouts/{case_id}")
async def payout_case(request: Request, case_id: str, notice: str = "") -> Response:
    return await case_page(request, await current(request), case_id,
                           notice=NOTICES.get(notice, ""))


@router.post("/payouts/{case_id}/approval")
async def decide(request: Request, case_id: str) -> Response:
    session = await current(request)
    actions = front_door(request).actions
    try:
        form = await posted(request, session)
        body = PayoutApprovalBody.model_validate(form)
        answer = await decide_on_payout_exception(actions, session.principal, case_id, body, via="console")
    except ValidationError as exc:
        first = exc.errors()[0]
        refusal = f"invalid {'.'.join(str(p) for p in first['loc']) or 'form'}: {first['msg']}"
        await actions.store.audit.record_refusal(case_id, session.principal.user, "action_refused", {
            "action": "approving a payout exception", "refusal": refusal, "via": "console"})
        return await case_page(request, session, case_id, status=422, error=refusal)
    except Refused as exc:
        return await case_page(request, session, case_id, status=exc.status, error=exc.detail)
    target = f"/console/payouts/{quote(case_id)}?{urlencode({'notice': verdict_notice(answer, body)})}"
    return RedirectResponse(target, status_code=303)
