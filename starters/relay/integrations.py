"""Inbound integrations on the relay: Slack approval buttons, ServiceNow refund requests
and ServiceNow approvals.

Each call is verified by its signature (Slack's `v0=` scheme; HMAC-SHA256 over
`{timestamp}.{body}` for ServiceNow), stored as a receipt with its verdict, and acts as
the linked user of ours (`refunds integrations link`), whose roles come from our tokens,
never from the callback. Approvals become the workflow's `approve` signal, sealed by the
relay's client (`adapters.approval_seal`), checked there under the same segregation-of-duties
rules as every other approval.
"""

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from temporalio.service import RPCError

from adapters import receipts, signing
from adapters.config import secret_list
from adapters.db import CaseCreation, StoredReceipt
from adapters.notify.chat import APPROVE_ACTION, DENY_ACTION, shown_digest
from adapters.providers.base import WebhookRejected
from adapters.tickets.servicenow import record_url
from domain.models import (
    ApprovalSignal,
    CaseStatus,
    Decision,
    RefundReason,
    RefundRequest,
    RequestSource,
)
from domain.permissions import Permission, may, roles_for
from starters.actions.approving import ended_while
from starters.actions.front import Door, FrontDoor
from starters.actions.starting import new_request_refusal, start_refund
from starters.relay.limits import read_limited
from starters.relay.webhook_desk import first_delivery_done
from workflows.refund import RefundWorkflow

log = logging.getLogger("relay.integrations")

SysId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
REJECTION_STATUS = {"too_large": 413, "unknown_provider": 404, "malformed": 400}
DENIED_BEFORE_ITS_ROUND = frozenset({CaseStatus.REQUESTED, CaseStatus.VALIDATING, CaseStatus.OPS_REVIEW})
"""Where a channel's denial still goes to a case with no policy decision yet (its round not
begun; ops review before it: validation's reads ran out): a channel that cannot wait (a
ServiceNow rejection is sent once) would lose one given before the case asked, and the case
would then be approved elsewhere. A denial moves no money: the round takes it when it starts
(a round that never runs, the case needing no approval, records it as refused)."""


class Inbound(Protocol):
    """A verified inbound call; `event_id` feeds the receipts' (provider, event_id) gate."""

    def event_id(self) -> str | None: ...

    def event_type(self) -> str: ...


class SlackUser(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=64)
    team_id: str | None = Field(default=None, max_length=64)


class SlackTeam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=64)


class SlackAction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    action_id: str
    block_id: str = Field(default="", max_length=255)
    value: str = ""


class SlackMessage(BaseModel):
    """The message the clicked button sits in, as Slack shows it (its blocks)."""

    model_config = ConfigDict(extra="ignore")
    blocks: list[dict[str, Any]] = Field(default_factory=list, max_length=50)
    attachments: list[dict[str, Any]] = Field(default_factory=list, max_length=20)


class SlackInteraction(BaseModel):
    """Slack's `block_actions` payload (form field `payload`, JSON)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["block_actions"]
    trigger_id: str | None = None
    team: SlackTeam | None = None
    user: SlackUser
    actions: list[SlackAction] = Field(min_length=1, max_length=5)
    message: SlackMessage | None = None

    @classmethod
    def from_body(cls, body: bytes) -> "SlackInteraction":
        payload = parse_qs(body.decode()).get("payload")
        if not payload:
            raise ValueError("no payload form field")
        return cls.model_validate_json(payload[0])  # pydantic's parser bounds the nesting

    def event_id(self) -> str | None:
        return self.trigger_id

    def event_type(self) -> str:
        return self.type


class ServiceNowUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_name: str = Field(min_length=1, max_length=100)
    sys_id: SysId | None = None


class ServiceNowRefundTicket(BaseModel):
    """What the "Refund Request" ticket's outbound REST message sends on insert/update."""

    model_config = ConfigDict(extra="forbid")
    CASE_PREFIX: ClassVar[str] = "servicenow-"
    """A ticket's case is this and its sys_id (an id the API refuses to anyone else)."""

    sys_id: SysId
    number: str = Field(min_length=1, max_length=40)
    sys_updated_on: str = Field(min_length=1, max_length=40)
    opened_by: ServiceNowUser
    sys_created_by: str = Field(min_length=1, max_length=100, description=(
        "the user_name of whoever created the record, kept by ServiceNow: `opened_by` is a "
        "field the creator may set to someone else, so both are behind the request"))
    short_description: str = Field(default="", max_length=160)
    description: str = Field(default="", max_length=1800)
    provider: str
    charge_id: str
    amount: int = Field(gt=0, strict=True, description="integer minor units")
    currency: str
    merchant_account: str
    reason: RefundReason = RefundReason.REQUESTED_BY_CUSTOMER
    evidence: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_body(cls, body: bytes) -> "ServiceNowRefundTicket":
        ticket = cls.model_validate_json(body)
        ticket.refund_request(ticket.behind())  # refuse now what could never be a request
        return ticket

    def behind(self) -> tuple[str, ...]:
        """The ServiceNow users behind the request: its opener, then who created the ticket
        if someone else did (they chose the opener)."""
        return tuple(dict.fromkeys((self.opened_by.user_name, self.sys_created_by)))

    def case_id(self) -> str:
        return f"{self.CASE_PREFIX}{self.sys_id}"

    def refund_request(self, behind: tuple[str, ...]) -> RefundRequest:
        """The ticket as a request; who is `behind` it (our users) cannot approve it. The
        ticket text is evidence the advisor reads as untrusted data."""
        text = "\n".join(t for t in (self.short_description, self.description) if t)
        return RefundRequest(
            refund_request_id=self.case_id(), provider=self.provider, charge_id=self.charge_id,
            amount=self.amount, currency=self.currency, merchant_account=self.merchant_account,
            reason=self.reason, source=RequestSource.TICKET, trigger_identities=behind,
            evidence={**self.evidence, "ticket_number": self.number,
                      **({"ticket_text": text} if text else {})})

    def event_id(self) -> str | None:
        """Each version of the ticket: `sys_updated_on` counts seconds, so an edit within the
        second of the delivery before it carries the same stamp (taken for its duplicate, it
        was never compared with the case); the content's digest tells them apart, and a
        resend as it was stays a duplicate."""
        digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]
        return f"{self.sys_id}:{self.sys_updated_on}:{digest}"

    def event_type(self) -> str:
        return "refund_request"


class ServiceNowApproval(BaseModel):
    """A `sysapproval_approver` record that changed to approved or rejected."""

    model_config = ConfigDict(extra="forbid")

    sys_id: SysId
    document_id: SysId
    state: Literal["approved", "rejected"]
    approver: ServiceNowUser
    comments: str = Field(default="", max_length=2000)
    sys_updated_on: str = Field(default="", max_length=40, description=(
        "when the record last changed: each change is its own event (an approval given again "
        "after a refused one is not its duplicate); without it, one event per state"))
    sys_updated_by: str = Field(default="", max_length=100, description=(
        "the user_name of whoever changed the record: the person who approved (a delegate "
        "acting for the assigned approver is who approves); an approval without it is refused, "
        "a denial without it is the assigned approver's"))

    def acting_user(self) -> str:
        """Who gave the verdict: who changed the record, else (a denial only, see
        `unattributed`) the assigned approver."""
        return self.sys_updated_by or self.approver.user_name

    def unattributed(self) -> str | None:
        """Why an approval cannot count for anyone (None when it can): ServiceNow keeps the
        assigned approver on the record whoever changed it."""
        if self.state == "approved" and not self.sys_updated_by:
            return ("a ServiceNow approval must name who changed the record (sys_updated_by): the "
                    "assigned approver is not always who approved (a delegate may have)")
        return None

    @classmethod
    def from_body(cls, body: bytes) -> "ServiceNowApproval":
        return cls.model_validate_json(body)

    def event_id(self) -> str | None:
        return (f"{self.sys_id}:{self.state}" + (f":{self.sys_updated_on}" if self.sys_updated_on else "")
                + (f":{self.sys_updated_by}" if self.sys_updated_by else ""))

    def event_type(self) -> str:
        return f"approval.{self.state}"


M = TypeVar("M", bound=Inbound)


def _explain(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'body'}: {first['msg']}"
    return str(exc)


router = APIRouter(prefix="/integrations", tags=["integrations"])
UNSIGNED_BODY_KEPT = 4_096
"""Bytes kept of a call that fails the signature (with the whole body's digest): anyone can
send one, nothing replays it, and a whole body per call would fill the disk at the sender's
pace for the 30 days refused receipts are kept."""


async def receive(door: FrontDoor, request: Request, provider: str, secret: SecretStr | None,
                  parse: Callable[[bytes], M], *,
                  unreadable: Callable[[bytes, str], Awaitable[None]] | None = None,
                  ) -> tuple[M, StoredReceipt] | JSONResponse:
    """Limit, verify, parse and store the receipt; a rejection is stored and answered.
    `unreadable`: told of a signed body refused (malformed, or signed too long ago), with the
    reason."""
    headers = receipts.storable_headers({k.lower(): v for k, v in request.headers.items()})
    body = await read_limited(request, door.settings.webhook_max_body_bytes)
    prefix = "x-slack" if provider == "slack" else "x-refunds"
    parsed: M | None = None
    rejection: WebhookRejected | None = None
    signed = False
    try:
        if body is None:
            raise WebhookRejected("too_large", f"body exceeds {door.settings.webhook_max_body_bytes} bytes")
        if secret is None:
            raise WebhookRejected("unknown_provider", f"the {provider} integration is not configured")
        signing.verify(provider, signature_header=headers.get(f"{prefix}-signature"),
                       timestamp_header=headers.get(f"{prefix}-request-timestamp"), body=body,
                       secrets=secret_list(secret), now=time.time(),
                       tolerance_seconds=door.settings.webhook_tolerance_seconds)
        signed = True
        candidate = parse(body)
        if isinstance(candidate, BaseModel) and receipts.unstorable(candidate):
            raise WebhookRejected("malformed", "the call holds text PostgreSQL cannot store "
                                  "(NUL or a lone surrogate)")
        parsed = candidate
    except WebhookRejected as exc:
        rejection = exc
        signed = signed or exc.verdict == "stale"  # the window is checked once the signature matched
    except ValueError as exc:
        rejection = WebhookRejected("malformed", _explain(exc))
    stored = await door.store.receipts.store(
        provider=provider, event_id=parsed.event_id() if parsed else None,
        event_type=parsed.event_type() if parsed else None,
        body=body if signed or body is None else body[:UNSIGNED_BODY_KEPT],
        body_sha256=hashlib.sha256(body or b"").hexdigest(), headers=headers,
        verdict="accepted" if rejection is None else rejection.verdict,
        error=receipts.storable(rejection.message) if rejection else None)
    if rejection is not None:
        log.warning("%s call rejected (%s): %s", provider, rejection.verdict, rejection.message)
        if signed and body is not None and unreadable is not None:
            await unreadable(body, rejection.message)
        return JSONResponse({"receipt_id": stored.receipt_id, "verdict": rejection.verdict,
                             "detail": rejection.message},
                            status_code=REJECTION_STATUS.get(rejection.verdict, 401))
    assert parsed is not None
    if stored.verdict == "duplicate" and (stored.first_processed or await first_delivery_done(
            door.store, door.settings, provider, parsed.event_id(), stored)):
        return JSONResponse({"receipt_id": stored.receipt_id, "verdict": "duplicate"})
    return parsed, stored


async def answer(door: FrontDoor, stored: StoredReceipt, case_id: str | None, status: int,
                 body: dict[str, Any]) -> JSONResponse:
    await door.store.receipts.mark_processed(stored.first_receipt_id or stored.receipt_id, case_id)
    return JSONResponse({"receipt_id": stored.receipt_id, **body}, status_code=status)


async def signal_approval(door: FrontDoor, stored: StoredReceipt, system: str, external_user: str,
                          case_id: str | None, decision: Decision, reason: str, *,
                          refused: str | None = None, ticket: str | None = None) -> JSONResponse:
    """An approval from a channel that cannot wait: the workflow checks it when it
    processes the signal, exactly like one from the API. `refused`: why the channel's own
    check refused the caller (recorded like every other refusal); `ticket`: the ServiceNow
    record an approval was given on (`ticket_unlike_the_case`)."""
    principal = await door.store.access.principal_for(system, external_user)
    row = await door.store.cases.get(case_id) if case_id else None
    refusal: tuple[int, str, str] | None = None
    if refused is not None:
        refusal = (403, "access_refused", refused)
    elif row is None or case_id is None:
        refusal = (404, "action_refused", f"no refund request for this {system} approval")
    elif principal is None:
        refusal = (403, "access_refused",
                   f"{system} user {external_user!r} is not linked to a user with a live token")
    elif not may(principal.roles, Permission.APPROVE_REFUND):
        refusal = (403, "access_refused",
                   f"approving needs one of the roles {sorted(roles_for(Permission.APPROVE_REFUND))}")
    elif row["status"] != "awaiting_approval" and not (
            decision is Decision.DENY and row["status"] in DENIED_BEFORE_ITS_ROUND
            and row["decision"] is None):
        refusal = (409, "approval_refused", f"case is {row['status']}, not awaiting approval")
    elif decision is Decision.APPROVE and ticket is not None and (
            unlike := await ticket_unlike_the_case(door, case_id, ticket)):
        refusal = (409, "approval_refused", unlike)
    if refusal is None:
        assert principal is not None and case_id is not None
        signal = ApprovalSignal(approver=principal.user, roles=tuple(sorted(principal.roles)),
                                decision=decision, reason=reason[:2000], verdict_id=uuid.uuid4().hex)
        try:
            await door.client.get_workflow_handle(case_id).signal(RefundWorkflow.approve, signal)
        except RPCError:
            assert row is not None
            if (ended := await ended_while(door.client, case_id, row["status"])) is None:
                raise  # Temporal away: a 5xx the channel retries
            refusal = (409, "approval_refused", ended)
    if refusal is not None:
        code, action, message = refusal
        # a channel's own refusal names no one of ours: the linked person did nothing
        actor = principal.user if principal and refused is None else f"{system}:{external_user}"
        await door.store.audit.record(case_id if row else None, actor, action,
                                      {"channel": system, "external_user": external_user,
                                       "decision": decision.value, "refusal": message})
        return await answer(door, stored, case_id if row else None, code, {"detail": message})
    assert principal is not None and case_id is not None
    await door.store.audit.record(case_id, principal.user, "approval_signalled",
                                  {"channel": system, "external_user": external_user,
                                   "decision": decision.value})
    return await answer(door, stored, case_id, 200, {
        "refund_request_id": case_id, "approver": principal.user, "decision": decision.value,
        "status": "signalled"})


TICKET_UPDATE_REFUSED = "ticket_update_refused"


async def ticket_unlike_the_case(door: FrontDoor, case_id: str, ticket: str) -> str | None:
    """Why an approval recorded on the case's ServiceNow `ticket` (its sys_id) cannot stand
    for what the case asks (None when it can): the ticket is one we wrote from a request
    made elsewhere (its approval notice: a reissue's of a ticket's case too), whose edits
    never reach the case, or a request's ticket that changed since (`ticket_diverged`).
    Approving on the case page shows the case's own values; a denial moves nothing and
    counts either way."""
    if case_id != f"{ServiceNowRefundTicket.CASE_PREFIX}{ticket}":
        return ("the ticket was written from a refund requested elsewhere: edits to it never reach "
                "the case, so it may not show what the case asks; approve on the case page")
    if await ticket_diverged(door, case_id):
        return ("the ticket changed after its refund was requested: it no longer shows what the "
                "case asks (for good, even if edited back); approve on the case page")
    return None


async def ticket_diverged(door: FrontDoor, case_id: str) -> bool:
    """Whether the case's ticket was changed after its refund was requested (its update was
    refused as a conflict, `request_conflict`, or refused before it could be compared,
    `ticket_update_refused`): an approval given on the ticket then approved values the case
    does not ask for (a denial moves nothing and still counts). For good: editing the ticket
    back does not undo what approvers may have seen meanwhile."""
    return (await door.store.audit.has_action(case_id, "request_conflict")
            or await door.store.audit.has_action(case_id, TICKET_UPDATE_REFUSED))


async def ticket_update_refused(door: FrontDoor, sys_id: object, refusal: str,
                                ticket: "ServiceNowRefundTicket | None" = None) -> None:
    """A signed update of a ticket that has a case, refused on its own (unreadable, its
    opener not allowed, values no provider takes) before it was compared with the case: the
    ticket may show other values than the case asks for now, as after a conflict. One read
    (`ticket`) that asks what the case asks (a work note, its opener's token expired since)
    changes nothing."""
    if not (isinstance(sys_id, str) and re.fullmatch(r"[0-9a-f]{32}", sys_id)):
        return
    case_id = f"{ServiceNowRefundTicket.CASE_PREFIX}{sys_id}"
    case = await door.store.cases.get(case_id)
    if case is None:
        return
    if ticket is not None:
        asked = ticket.refund_request(tuple(case.trigger_identities))
        if asked.params_hash() == case.params_hash:
            return
    await door.store.audit.record(case_id, "servicenow", TICKET_UPDATE_REFUSED, {"refusal": refusal})


async def unreadable_ticket(door: FrontDoor, body: bytes, refusal: str) -> None:
    """`ticket_update_refused` for a signed ticket body refused before it was compared with
    its case: its sys_id, if it names one, read from the body as it is. A body that reads as
    a ticket (one signed too long ago: a retry after an outage) is compared: as it was asked,
    it changes nothing."""
    try:
        sent = json.loads(body)
    except (ValueError, RecursionError):  # no JSON, or nested past what the parser takes
        return
    try:
        ticket: ServiceNowRefundTicket | None = ServiceNowRefundTicket.from_body(body)
    except ValueError:
        ticket = None
    await ticket_update_refused(door, sent.get("sys_id") if isinstance(sent, dict) else None, refusal,
                                ticket)


@router.post("/slack/actions")
async def slack_actions(request: Request, door: Door) -> JSONResponse:
    """A click on an Approve or Deny button of an approval notice."""
    received = await receive(door, request, "slack", door.settings.slack_signing_secret,
                             SlackInteraction.from_body)
    if isinstance(received, JSONResponse):
        return received
    interaction, stored = received
    action = interaction.actions[0]
    decision = {APPROVE_ACTION: Decision.APPROVE, DENY_ACTION: Decision.DENY}.get(action.action_id)
    if decision is None:  # "Open case" and other buttons only open links
        return await answer(door, stored, None, 200, {"ignored": action.action_id})
    ours = door.settings.slack_team_id
    # the user's own workspace first: it is what a user id belongs to (a shared channel's
    # click names the channel's workspace as `team`)
    team = interaction.user.team_id or (interaction.team.id if interaction.team else None)
    foreign = (f"the click came from Slack workspace {team!r}, not ours ({ours}): user ids are a "
               "workspace's own" if ours and team != ours else None)
    return await signal_approval(door, stored, "slack", interaction.user.id, action.value, decision,
                                 f"via Slack ({interaction.user.id})",
                                 refused=foreign or await unlike_the_notice(door, interaction, action))


async def unlike_the_notice(door: FrontDoor, interaction: SlackInteraction,
                            action: SlackAction) -> str | None:
    """Why a click does not stand for the case its button names: the button is not on that
    case's approval notice, or the message around it does not show what that notice's
    message showed when it went out (`shown_digest`, kept at delivery). Anyone holding the
    incoming webhook's URL can post a message showing one case, or other facts, with a
    case's genuine button in it, and Slack signs the click like any other."""
    kind, _, notice_id = action.block_id.partition(":")
    notice = await door.store.outbox.sent_notice(int(notice_id), "slack") if (
        kind == "refund" and re.fullmatch(r"[0-9]{1,18}", notice_id)) else None
    if notice is None or notice["kind"] != "approval_needed" or notice["refund_request_id"] != action.value:
        return f"the button is not on the approval notice of {action.value!r}"
    message = interaction.message
    if (notice["external_id"] is None or message is None or message.attachments
            or shown_digest(message.blocks) != notice["external_id"]):
        return (f"the message clicked does not show the approval notice of {action.value!r} as it "
                "was sent: approve on the case page")
    return None


@router.post("/servicenow/refund-requests", status_code=202)
async def servicenow_refund_request(request: Request, door: Door) -> JSONResponse:
    """A "Refund Request" ticket created or updated: starts (or attaches to) its case. The
    opener must be linked to a user who may request refunds."""
    received = await receive(door, request, "servicenow", door.settings.servicenow_inbound_secret,
                             ServiceNowRefundTicket.from_body,
                             unreadable=lambda body, refusal: unreadable_ticket(door, body, refusal))
    if isinstance(received, JSONResponse):
        return received
    ticket, stored = received
    case_id = ticket.case_id()
    behind: list[str] = []
    for sn_user in ticket.behind():  # the opener first: the case's requester
        principal = await door.store.access.principal_for("servicenow", sn_user)
        if principal is None or not may(principal.roles, Permission.REQUEST_REFUND):
            message = (f"ServiceNow user {sn_user!r} ({'opened' if not behind else 'created'} the "
                       "ticket) is not linked to a user who may request refunds "
                       f"(roles {sorted(roles_for(Permission.REQUEST_REFUND))})")
            await door.store.audit.record_refusal(case_id, f"servicenow:{sn_user}", "access_refused", {
                "channel": "servicenow", "ticket": ticket.number, "refusal": message})
            await ticket_update_refused(door, ticket.sys_id, message, ticket)
            return await answer(door, stored, None, 403, {"detail": message})
        behind.append(principal.user)
    requester = behind[0]
    refund = ticket.refund_request(tuple(dict.fromkeys(behind)))
    if refused := await new_request_refusal(door.store.cases, door.providers, refund):
        await door.store.audit.record(None, requester, "action_refused", {
            "channel": "servicenow", "ticket": ticket.number, "refusal": refused[1]})
        await ticket_update_refused(door, ticket.sys_id, refused[1], ticket)
        return await answer(door, stored, None, 422, {"detail": refused[1]})
    outcome, created = await door.store.cases.create(refund, requester)
    if outcome is CaseCreation.CONFLICT:
        return await answer(door, stored, case_id, 409, {
            "detail": f"ticket {ticket.number} changed after its refund was requested; the case "
                      "keeps the values it was requested with"})
    settings = door.settings
    url = record_url(settings.servicenow_url, settings.servicenow_request_table, ticket.sys_id) \
        if settings.servicenow_url else None
    await door.store.integrations.save_ticket(case_id, "servicenow", "request", external_id=ticket.sys_id,
                                              number=ticket.number, url=url, actor=requester)
    await start_refund(door.client, door.settings, refund, requester, created["status"])
    row = await door.store.cases.get(case_id)
    assert row is not None
    return await answer(door, stored, case_id, 202 if outcome is CaseCreation.CREATED else 200,
                        {"refund_request_id": case_id, "status": row["status"]})


@router.post("/servicenow/approvals")
async def servicenow_approval(request: Request, door: Door) -> JSONResponse:
    """An approval recorded in ServiceNow on a case's refund-request ticket."""
    received = await receive(door, request, "servicenow", door.settings.servicenow_inbound_secret,
                             ServiceNowApproval.from_body)
    if isinstance(received, JSONResponse):
        return received
    approval, stored = received
    case_id = await door.store.integrations.case_for_ticket("servicenow", approval.document_id)
    decision = Decision.APPROVE if approval.state == "approved" else Decision.DENY
    return await signal_approval(door, stored, "servicenow", approval.acting_user(), case_id,
                                 decision, approval.comments or f"{approval.state} in ServiceNow",
                                 refused=approval.unattributed(), ticket=approval.document_id)

