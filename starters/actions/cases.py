"""What a person may do to a case, and the rules for it, shared by every front end.

The relay's HTTP API and the ops console call these same functions, so an approval, a
reissue or a manual confirmation passes the same role checks, the same segregation of
duties and the same state checks whichever door it came through. Every refusal is written
to the audit trail here, before the caller turns it into an HTTP answer or a page.
"""

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio.client import Client
from temporalio.service import RPCError

from adapters.config import Settings
from adapters.db import CaseCreation, Principal, Store, request_from_row
from adapters.db.cases import MoneyMovedElsewhere
from adapters.db.rows import ApprovalStep, CaseRow, ManualRefundRow
from adapters.providers.base import ProviderAdapter
from adapters.providers.manual import manual_refund
from adapters.temporal_client import workflow_closed
from domain.audit import SAID_WHAT_THE_MONEY_DID
from domain.lifecycle import check_approval, unfilled
from domain.models import (
    CLOSED_STATUSES,
    ApprovalProgress,
    ApprovalSignal,
    ApprovalVerdict,
    Decision,
    EventKind,
    ProviderEvent,
    RefundMethod,
    RefundRequest,
    RequestSource,
    RoleRequirement,
)
from domain.permissions import Permission, may, roles_for
from starters.actions.approving import (
    ApprovalBody,
    Refused,
    approvals_view,
    ask_for_verdict,
    ended_while,
    granted_in,
)
from starters.actions.starting import entry_refusal, start_refund
from workflows.refund import RefundWorkflow

REISSUABLE = frozenset({"refund_failed", "refund_canceled"})
ADVISORY_NOTE = ("AI suggestion for approvers only: it cannot approve, change the amount or "
                 "execute a refund, and the policy never reads it.")


class ReissueBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: RefundMethod = RefundMethod.PROVIDER
    reason: str = Field(default="", max_length=2000)


class ManualConfirmationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paid: bool
    reason: str = Field(default="", max_length=2000)


def requirements_of(row: Mapping[str, Any]) -> tuple[RoleRequirement, ...]:
    """The approval tier the policy decision named for a case (none before a decision)."""
    return tuple(RoleRequirement.model_validate(r)
                 for r in (row["decision"] or {}).get("requirements", []))


def missing_roles(row: Mapping[str, Any], granted: list[tuple[str, frozenset[str]]]) -> list[str]:
    if row["status"] != "awaiting_approval":
        return []
    return unfilled(requirements_of(row), granted)


def approval_verdict(caller: Principal, row: Mapping[str, Any],
                     granted: list[tuple[str, frozenset[str]]]) -> ApprovalVerdict:
    """Would this person's approval count now? The workflow's own rule, asked in advance
    of the case row (its requester and trigger identities, as the workflow was started)."""
    signal = ApprovalSignal(approver=caller.user, roles=tuple(sorted(caller.roles)),
                            decision=Decision.APPROVE)
    return check_approval(signal, requester=row["requester"],
                          conflicted=frozenset(row["trigger_identities"] or ()),
                          requirements=requirements_of(row), approved=granted)


def behind(row: Mapping[str, Any], steps: list[ApprovalStep]) -> set[str]:
    """Everyone who asked for, triggered or approved a refund: none of them may also say
    that its money was paid."""
    return {row["requester"], *(row["trigger_identities"] or ()), *(a for a, _ in granted_in(steps))}


def case_view(case: CaseRow, steps: list[ApprovalStep]) -> dict[str, Any]:
    """The public shape of a case: amounts, state, provider refund, decision, approvals."""
    approvals, missing = approvals_view(steps, (case.decision or {}).get("requirements", []),
                                        case.status == "awaiting_approval")
    return {
        "refund_request_id": case.refund_request_id, "status": case.status,
        "missing_roles": missing,
        "parent_refund_request_id": case.parent_refund_request_id, "method": case.method,
        "provider": case.provider, "charge_id": case.charge_id, "amount": case.amount,
        "currency": case.currency, "merchant_account": case.merchant_account,
        "reason": case.reason, "source": case.source, "requester": case.requester,
        "reserved_amount": case.reserved_amount, "provider_refund_id": case.provider_refund_id,
        "provider_status": case.provider_status, "failure_reason": case.failure_reason,
        "decision": case.decision, "approvals": approvals,
        "created_at": case.created_at.isoformat(), "updated_at": case.updated_at.isoformat(),
    }


def advice_view(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """The advisor's output as approvers see it, always labelled advisory."""
    view: dict[str, Any] = {"advisory_only": True, "note": ADVISORY_NOTE}
    if row is None or row["advice"] is None:
        return {**view, "available": False, "status": "no advice",
                "error": row["error"] if row else None, "source": row["source"] if row else None}
    return {**view, "available": True, "source": row["source"], **row["advice"],
            "created_at": row["created_at"].isoformat()}


def reissue_request(parent: CaseRow, body: ReissueBody, attempt: int,
                    behind: Iterable[str] = ()) -> RefundRequest:
    """The child request: same charge and amount, its own id, linked to its parent; the
    parent's requester and `behind` (who said what the request's money did, who asked for
    any refund of it) are behind it, so cannot approve it."""
    original = request_from_row(parent)
    # validated as any request is (ValidationError when the child breaks a rule its parent
    # kept: an id or evidence at the limit), so no worker is handed a request it cannot read
    return RefundRequest.model_validate({
        **original.model_dump(),
        "refund_request_id": f"{original.refund_request_id}-r{attempt}",
        "evidence": {**original.evidence, "reissue_reason": body.reason},
        "source": RequestSource.CONSOLE, "method": body.method,
        "parent_refund_request_id": original.refund_request_id,
        "trigger_identities": tuple(dict.fromkeys([*original.trigger_identities, parent.requester,
                                                   *sorted(behind)]))})


class CaseActions:
    """The rules behind every button and endpoint that changes a case. `via` names the
    front end ("api", "console") in each audit row, so the trail says where a click came from."""

    def __init__(self, store: Store, client: Client, settings: Settings) -> None:
        self.store = store
        self.client = client
        self.settings = settings

    async def refuse(self, caller: Principal, case_id: str | None, status: int, action: str,
                     refusal: str, *, via: str, audit_action: str = "action_refused") -> NoReturn:
        """Records the refusal in the case's trail (or the global one), then raises it."""
        await self.store.audit.record_refusal(case_id, caller.user, audit_action,
                                              {"action": action, "refusal": refusal, "via": via})
        raise Refused(status, refusal)

    async def require(self, caller: Principal, permission: Permission, action: str,
                      case_id: str | None = None, *, via: str) -> None:
        """Role check against the permission table; a refusal is audited as `access_refused`
        with the roles it needs and what the caller has."""
        if not may(caller.roles, permission):
            roles = roles_for(permission)
            await self.store.audit.record_refusal(case_id, caller.user, "access_refused",
                                                  {"action": action, "needs_one_of": sorted(roles),
                                                   "has": sorted(caller.roles), "via": via})
            raise Refused(403, f"{action} needs one of the roles {sorted(roles)}")

    async def _case(self, caller: Principal, case_id: str, action: str, via: str) -> CaseRow:
        row = await self.store.cases.get(case_id)
        if row is None:
            await self.refuse(caller, None, 404, action, f"no refund request {case_id!r}", via=via)
        return row

    async def readable(self, caller: Principal, case_id: str, action: str, *,
                       via: str) -> CaseRow:
        """The case row for a reader; someone else's case is, to a requester, no case at
        all (404, so ids are not confirmed either; the refusal is audited as what it is)."""
        await self.require(caller, Permission.READ_CASE, action, case_id, via=via)
        row = await self._case(caller, case_id, action, via)
        if not may(caller.roles, Permission.READ_EVERY_CASE) and row["requester"] != caller.user:
            await self.refuse(caller, case_id, 404, action, f"no refund request {case_id!r}", via=via,
                              audit_action="access_refused")
        return row

    async def view(self, case_id: str) -> dict[str, Any]:
        row = await self.store.cases.get(case_id)
        assert row is not None
        return case_view(row, await self.store.audit.approvals_of(case_id))

    async def decide(self, caller: Principal, case_id: str, body: ApprovalBody, *,
                     via: str) -> dict[str, Any]:
        """Asks the workflow (an update with a validator) so the approver gets the verdict
        at once; the approver is the authenticated user, never a form or body field."""
        action = "approving a refund"
        await self.require(caller, Permission.APPROVE_REFUND, action, case_id, via=via)
        row = await self._case(caller, case_id, action, via)
        if row["status"] != "awaiting_approval":
            await self.refuse(caller, case_id, 409, action,
                              f"case is {row['status']}, not awaiting approval", via=via)
        progress = await self.verdict(caller, case_id, body, row["status"], action, via=via)
        return {"refund_request_id": case_id, "decision": body.decision.value,
                "status": progress.status, "missing_roles": list(progress.missing_roles),
                **({"detail": progress.reason} if progress.reason else {})}

    async def verdict(self, caller: Principal, case_id: str, body: ApprovalBody, shown: str, action: str,
                      *, via: str) -> ApprovalProgress:
        """The case's workflow's answer to a verdict (refund or payout case); a workflow that
        ended while its row still shows `shown` is an audited 409 (it goes to ops review)."""
        try:
            return await ask_for_verdict(self.client, self.store, case_id, body, caller,
                                         answer_within=self.settings.approval_answer_seconds, via=via,
                                         awaiting=shown)
        except RPCError:
            if (ended := await ended_while(self.client, case_id, shown)) is None:
                raise
            await self.refuse(caller, case_id, 409, action, ended, via=via)

    async def reissue(self, caller: Principal, case_id: str, body: ReissueBody, *, via: str,
                      providers: Mapping[str, ProviderAdapter]) -> tuple[bool, dict[str, Any]]:
        """A failed or canceled refund becomes a new linked request (another method if need
        be) through the same gates. Returns (created, child view); while any member of its
        family (the original, every reissue below it) has not ended, that member instead:
        one request's money has one live reissue, however many times or where it is asked.
        A reissue through the provider enters as a request does (`entry_refusal`): its id
        is longer than its parent's, and a provider that takes our id as its refund's
        (Cashfree: 40 characters) would decline it only at the create, after approvals."""
        action = "reissuing a refund"
        await self.require(caller, Permission.REISSUE_REFUND, action, case_id, via=via)
        parent = await self._case(caller, case_id, action, via)
        if parent["status"] not in REISSUABLE:
            await self.refuse(caller, case_id, 409, action,
                              f"case is {parent['status']}; only {sorted(REISSUABLE)} refunds can "
                              "be reissued", via=via)
        # every refund of the request counts: the original, its reissues and theirs
        family = await self.store.cases.family(case_id)
        if running := await self._still_running(family):
            await self.refuse(caller, case_id, 409, action,
                              f"case {running}'s workflow is still running: it may yet take news of its "
                              "refund (and book it); ask again once it has ended", via=via)
        children = await self.store.cases.children(case_id)
        witnesses = {actor for member in family
                     for actor in await self.store.audit.actors_of(member, SAID_WHAT_THE_MONEY_DID)}
        if caller.user in witnesses:
            # a small reissue is auto-approved: nobody else would act
            await self.refuse(caller, case_id, 403, action,
                              f"{caller.user} said what this request's money did (a transfer, a provider "
                              "wait or a break's approval on one of its refunds): another person asks "
                              "for it to be paid again", via=via, audit_action="access_refused")
        # whoever asked for any refund of the request (an earlier reissue, denied or failed,
        # a sibling of this one) asked to pay this money: they do not approve it either
        asked = {row["requester"] for member in family if (row := await self.store.cases.get(member))}
        try:
            request = reissue_request(parent, body, attempt=len(children) + 1, behind=witnesses | asked)
        except ValidationError as exc:
            broken = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            await self.refuse(caller, case_id, 422, action,
                              f"the reissue would break a request's rules: {broken}", via=via)
        if body.method is RefundMethod.PROVIDER and (refused := entry_refusal(
                providers, request.provider, request.amount, request.currency, request.refund_request_id)):
            await self.refuse(caller, case_id, 422, action,
                              f"the reissue's {refused[0]} {request.refund_request_id!r}: {refused[1]}; "
                              "reissue it by bank transfer, or request a new refund", via=via)
        # a member that ended (failed, rejected, denied, expired) is not open: the next
        # reissue goes through the same gates
        try:
            outcome, row = await self.store.cases.create_reissue(request, caller.user)
        except MoneyMovedElsewhere as moved:
            await self.refuse(caller, case_id, 409, action,
                              f"another refund of this request moved or may move its money ({moved}; "
                              "raised to ops): a reissue would pay it again; ops settle that first",
                              via=via)
        if outcome is None:
            if row["parent_refund_request_id"] is not None:  # a reissue whose start may have failed
                await start_refund(self.client, self.settings, request_from_row(row), row["requester"],
                                   row["status"])
            return False, case_view(row, await self.store.audit.approvals_of(row["refund_request_id"]))
        if outcome is CaseCreation.CONFLICT:
            await self.refuse(caller, case_id, 409, action,
                              f"{request.refund_request_id} exists with other parameters", via=via)
        await self.store.audit.record(case_id, caller.user, "reissue_requested",
                                      {"child": request.refund_request_id,
                                       "method": body.method.value, "via": via})
        await start_refund(self.client, self.settings, request, row["requester"], row["status"])
        return True, await self.view(request.refund_request_id)

    async def _still_running(self, family: list[str]) -> str | None:
        """A family member whose workflow still runs after the answer time (waited for),
        else None: a case shows `refund_failed` as its run finishes, and the run still takes
        a notification about its refund that came meanwhile (and follows it), so a reissue
        before its end could pay beside it. (The family's open members are `create_reissue`'s.)"""
        deadline = asyncio.get_running_loop().time() + self.settings.approval_answer_seconds
        for member in family:
            row = await self.store.cases.get(member)
            if row is None or row["status"] not in CLOSED_STATUSES:
                continue
            while await workflow_closed(self.client, member) is None:
                if asyncio.get_running_loop().time() >= deadline:
                    return member
                await asyncio.sleep(0.2)
        return None

    async def _confirmed_again(self, caller: Principal, case_id: str, body: ManualConfirmationBody,
                               action: str, *, via: str) -> ManualRefundRow:
        """The same person's same confirmation sent again (the first's signal may have found
        Temporal away: the caller heard 503): the row it committed, to signal again (the case
        takes its event once). Anything else is a 409 naming what stands."""
        done = await self.store.manual_refunds.get(case_id)
        if done is None:
            await self.refuse(caller, case_id, 409, action, "no pending manual refund for this case", via=via)
        if (done["status"], done["confirmed_by"]) != ("succeeded" if body.paid else "failed", caller.user):
            await self.refuse(caller, case_id, 409, action,
                              f"the manual refund was already confirmed {done['status']} by "
                              f"{done['confirmed_by']}", via=via)
        return done

    async def confirm_manual(self, caller: Principal, case_id: str, body: ManualConfirmationBody,
                             *, via: str) -> dict[str, Any]:
        """Ops confirm a bank transfer they made (or could not make); the case follows.
        Whoever requested the refund (or its reissue), is behind its trigger or approved it
        cannot confirm it."""
        action = "confirming a manual refund"
        await self.require(caller, Permission.CONFIRM_MANUAL_REFUND, action, case_id, via=via)
        case = await self._case(caller, case_id, action, via)
        if caller.user in behind(case, await self.store.audit.approvals_of(case_id)):
            await self.refuse(caller, case_id, 403, action,
                              "the requester cannot confirm their own refund"
                              if case["requester"] == caller.user else
                              "a person behind the refund's trigger or an approver of it cannot "
                              "confirm it", via=via, audit_action="access_refused")
        if ended := await workflow_closed(self.client, case_id):
            # nobody would book it or release the hold: the instruction stays pending for ops
            await self.refuse(caller, case_id, 409, action,
                              f"the case's workflow has ended ({ended}): ops review the case", via=via)
        row = await self.store.manual_refunds.confirm(case_id, succeeded=body.paid, by=caller.user,
                                                      reason=body.reason) or await self._confirmed_again(
            caller, case_id, body, action, via=via)
        refund = manual_refund(row)
        event = ProviderEvent(
            provider=refund.provider, event_id=f"{row['id']}:{row['status']}",
            event_type=f"manual_refund.{row['status']}", kind=EventKind.REFUND_STATUS,
            body_sha256=hashlib.sha256(body.model_dump_json().encode()).hexdigest(),
            occurred_at=row["confirmed_at"], refund_id=refund.refund_id, charge_id=refund.charge_id,
            refund_request_id=case_id, amount=refund.amount, currency=refund.currency,
            status=refund.status, raw_status=refund.raw_status, failure_reason=refund.failure_reason)
        await self.client.get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, event)
        return {"refund_request_id": case_id, "manual_refund": row["id"], "status": row["status"]}
