"""Ops resolve a case stuck waiting for a notification from a provider with no status
lookup (Adyen): they read the refund in the provider's dashboard and say what it shows.

Shared by the relay's API and the console, like `actions.cases`. Only ops may do it, never
someone behind the request (its requester, trigger identities) or one of its approvers;
the resolution is audited before it reaches the case, as an event the waiting workflow
takes like the notification it stands in for: "refunded" follows the named refund to the
ledger, "not refunded" fails the case and releases its reservation.
"""

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

from psycopg.errors import UniqueViolation
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters.db import Principal
from adapters.db.cases import SUBMIT_STARTED, CaseRepository, RefundHeldElsewhere
from adapters.providers.registry import refund_id_as_written
from adapters.temporal_client import workflow_closed
from domain.events import OPS_READ_PREFIX, OPS_RESOLUTION, no_refund_id
from domain.models import EventKind, ProviderEvent, ProviderRefundStatus
from domain.permissions import Permission
from starters.actions.cases import CaseActions, behind
from workflows.refund import RefundWorkflow

WAIT_OPENED, WAIT_CLOSED = "awaiting_provider_notification", "provider_notification_received"
WAIT_RESOLVED = "provider_wait_resolved"


class ProviderWaitBody(BaseModel):
    """What the provider's dashboard shows for the case's refund, and why ops say so."""

    model_config = ConfigDict(extra="forbid")
    provider_shows: Literal["refunded", "not_refunded"]
    provider_refund_id: str | None = Field(default=None, min_length=1, max_length=64,
                                           pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    """The refund's id there (Adyen's pspReference): required when it shows refunded. As the
    provider writes it: a pasted space or newline would name no refund we know, and the check
    that no other case holds it would pass."""
    reason: str = Field(min_length=1, max_length=2000)

    @field_validator("provider_refund_id", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if value == "" else value  # a form's empty field

    @model_validator(mode="after")
    def _refund_named(self) -> "ProviderWaitBody":
        if self.provider_shows == "refunded" and not self.provider_refund_id:
            raise ValueError("provider_refund_id is required when the provider shows the refund")
        return self


def waiting(trail: list[dict[str, Any]]) -> bool:
    """Whether the case still waits for its notification: the last word on the wait opened
    it, or recorded a resolution the case has not taken (its signal lost: whoever resolved
    it sends it again from the same form)."""
    marks = [e["action"] for e in trail if e["action"] in (WAIT_OPENED, WAIT_CLOSED, WAIT_RESOLVED)]
    return bool(marks) and marks[-1] != WAIT_CLOSED


async def resolve_provider_wait(actions: CaseActions, caller: Principal, case_id: str,
                                body: ProviderWaitBody, *, via: str) -> dict[str, Any]:
    """Ends the case's notification wait with what ops read at the provider."""
    action = "resolving a provider notification wait"
    await actions.require(caller, Permission.RESOLVE_PROVIDER_WAIT, action, case_id, via=via)
    row = await actions._case(caller, case_id, action, via)
    body = as_written(body, str(row["provider"]))
    if caller.user in behind(row, await actions.store.audit.approvals_of(case_id)):
        await actions.refuse(caller, case_id, 403, action, "whoever requested or approved a refund "
                             "cannot resolve its wait", via=via, audit_action="access_refused")
    if refused := await _refund_refusal(actions, row, body):
        await actions.refuse(caller, case_id, 409, action, refused, via=via)
    if body.provider_shows == "not_refunded" and (until := await _create_may_land_until(actions, row)):
        await actions.refuse(caller, case_id, 409, action,
                             "a create the case sent may still land at the provider until "
                             f"{until.isoformat(timespec='seconds')}: read the dashboard again after then",
                             via=via)
    if ended := await workflow_closed(actions.client, case_id):
        # nobody would take the resolution: recorded, it would read as followed
        await actions.refuse(caller, case_id, 409, action,
                             f"the case's workflow has ended ({ended}): ops review the case", via=via)
    # the check and the record under the case chain's lock: one resolution per wait; the
    # refund it names claimed for the case with it, so no other case's resolution names it
    named = body.provider_refund_id if body.provider_shows == "refunded" else None
    try:
        latest = await actions.store.audit.record_once_opened(
            case_id, caller.user, WAIT_RESOLVED, {**body.model_dump(), "via": via},
            opened_by=WAIT_OPENED, closed_by=WAIT_CLOSED,
            also=None if named is None else partial(CaseRepository.claim_refund_in, case_id=case_id,
                                                     refund_id=named))
    except (UniqueViolation, RefundHeldElsewhere):  # another case came to hold it since the check
        await actions.refuse(caller, case_id, 409, action, await _refund_refusal(actions, row, body)
                             or f"refund {named} is another case's", via=via)
    if latest is not None and latest.get("action") == WAIT_RESOLVED:
        # sent again (the case takes one resolution per id): a signal lost after the record
        # would otherwise leave the case waiting on a resolution it never got. Temporal
        # still away is a 503 to send again, never "the case follows that"
        recorded = as_written(ProviderWaitBody.model_validate(
            {k: latest["detail"].get(k) for k in ("provider_shows", "provider_refund_id", "reason")}),
            str(row["provider"]))
        await _deliver(actions, row, recorded, str(latest["actor"]))
        if (latest["actor"], recorded) == (caller.user, body):  # the same request: its answer
            return _resolved(case_id, body, caller.user)
        await actions.refuse(caller, case_id, 409, action,
                             f"{latest['actor']} already resolved this wait (the provider shows "
                             f"{recorded.provider_shows}); the case follows that", via=via)
    if latest is not None:
        await actions.refuse(caller, case_id, 409, action,
                             f"case is {row['status']} and not waiting for a provider notification",
                             via=via)
    await _deliver(actions, row, body, caller.user)
    return _resolved(case_id, body, caller.user)


def as_written(body: ProviderWaitBody, provider: str) -> ProviderWaitBody:
    """The resolution with the refund it names as the provider writes it: typed in another
    letter case, it named no refund Adyen then notifies (a resolution recorded before this
    was kept as typed)."""
    if body.provider_refund_id is None:
        return body
    written = refund_id_as_written(provider, body.provider_refund_id)
    return body.model_copy(update={"provider_refund_id": written})


def _resolved(case_id: str, body: ProviderWaitBody, resolver: str) -> dict[str, Any]:
    """The answer to a resolution the case was sent: the first time, or sent again alike."""
    return {"refund_request_id": case_id, "provider_shows": body.provider_shows, "resolved_by": resolver}


async def _create_may_land_until(actions: CaseActions, row: Mapping[str, Any]) -> datetime | None:
    """Until when a create the case's last submit sent may still land at the provider, while
    that is still to come (None otherwise): its submit's timeout and the provider horizon
    after it started, as a cancel waits. Ops' "not refunded" read before then says nothing of
    a create landing after it: the hold would be released and a reissue pay beside it. A case
    holding its refund (the provider answered the create) sends none any more."""
    if row["provider_refund_id"] is not None:
        return None
    started = await actions.store.audit.last_at(str(row["refund_request_id"]), SUBMIT_STARTED)
    if started is None:
        return None
    until = started + actions.settings.timings().create_lands_within()
    return until if until > datetime.now(UTC) else None


async def _refund_refusal(actions: CaseActions, row: Mapping[str, Any], body: ProviderWaitBody) -> str | None:
    """Why the refund ops name cannot be this case's: another case holds it, in any letter case
    (its own write, or another resolution's claim), or the case already holds another one (its
    create's answer named it)."""
    named = body.provider_refund_id
    if body.provider_shows != "refunded" or named is None:
        return None
    holder = await actions.store.cases.refund_held_elsewhere(str(row["provider"]), named,
                                                             str(row["refund_request_id"]))
    if holder is not None:
        return f"refund {named} is case {holder['refund_request_id']}'s: name this case's refund"
    if broken := await actions.store.reconciliation.refund_broken_elsewhere(
            str(row["provider"]), named, str(row["refund_request_id"])):
        # claimed here, its money would count on that break and in this case's ledger
        return (f"refund {named} is named by a break of case {broken} (a duplicate, or a refund no "
                "case made): ops settle it there; name this case's refund")
    held = row["provider_refund_id"]
    if held is not None and refund_id_as_written(str(row["provider"]), str(held)) != named:
        return f"this case's refund is {held}, not {named}"
    return None


async def _deliver(actions: CaseActions, row: Mapping[str, Any], body: ProviderWaitBody,
                   resolver: str) -> None:
    """The resolution as the event the waiting case takes (one per case: its id)."""
    case_id = str(row["refund_request_id"])
    refunded = body.provider_shows == "refunded"
    refund_id = body.provider_refund_id if refunded else row["provider_refund_id"]
    event = ProviderEvent(
        provider=row["provider"], event_id=f"ops-resolution:{case_id}",
        event_type=f"{OPS_RESOLUTION}.{body.provider_shows}", kind=EventKind.REFUND_STATUS,
        body_sha256=hashlib.sha256(body.model_dump_json().encode()).hexdigest(),
        occurred_at=datetime.now(UTC), refund_id=refund_id or no_refund_id(case_id),
        charge_id=row["charge_id"],
        refund_request_id=case_id, amount=row["amount"], currency=row["currency"],
        status=ProviderRefundStatus.SUCCEEDED if refunded else ProviderRefundStatus.FAILED,
        raw_status=f"{OPS_READ_PREFIX}{body.provider_shows}",
        failure_reason=None if refunded else f"ops {resolver}: the provider shows no refund "
                                             f"({body.reason})")
    await actions.client.get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, event)
