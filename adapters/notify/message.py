"""Renders an outbox notice into a channel-neutral message, from one template per kind.

Templates say who may see a notice: customer-facing ones go only to the customer's
email; internal ones to chat, the ops or approvers mailbox and, where they name one,
the case's ticket (the refund-request ticket, or an incident per kind).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from domain.money import format_minor, shown_minor

TicketPurpose = Literal["request", "incident"]


@dataclass(frozen=True)
class Template:
    title: str
    text: str
    ticket: TicketPurpose | None = None
    buttons: bool = False
    customer: bool = False
    payout: bool = False  # a payout exception case: its own facts label and case link


TEMPLATES: dict[str, Template] = {
    "approval_needed": Template(
        "Refund {case} needs approval",
        "A refund of {amount} waits for approval by: {missing_roles}. The requester and anyone "
        "behind the request cannot approve it.", ticket="request", buttons=True),
    "approval_reminder": Template("Reminder: refund {case} still needs approval",
                                  "Still waiting for: {missing_roles}."),
    "approval_escalated": Template("Escalated: refund {case} is waiting too long for approval",
                                   "No decision yet; still missing: {missing_roles}."),
    "refund_approved": Template("Refund {case} approved",
                                "Approved by {by}; the refund of {amount} is being executed.",
                                ticket="request"),
    "approval_denied": Template("Refund {case} denied",
                                "Denied by {by}. No money moves and the reservation was released.",
                                ticket="request"),
    "approval_expired": Template(
        "Refund {case} expired",
        "Nobody decided within the approval window (still missing: {missing_roles}). No money moves "
        "and the reservation was released; request it again if the customer should still be paid.",
        ticket="request"),
    "refund_succeeded": Template("Refund {case} succeeded",
                                 "The provider confirmed refund {provider_refund_id} of {amount}.",
                                 ticket="request"),
    "refund_failed": Template(
        "Refund {case} failed",
        "The refund of {amount} failed at the provider ({failure}). The reservation was released; "
        "reissue it from the case if the customer should still be paid.", ticket="request"),
    "refund_could_not_be_processed": Template(
        "Your refund could not be processed",
        "We could not process your refund of {amount} (reference {case}). We are looking into it "
        "and will contact you; you do not need to do anything now.", customer=True),
    "refund_canceled": Template("Refund {case} canceled",
                                "The provider canceled the refund of {amount}; the reservation was "
                                "released.", ticket="request"),
    "refund_requires_action": Template(
        "Refund {case} waits for someone to act at the provider",
        "The provider holds refund {provider_refund_id} of {amount} until someone acts (for example "
        "the customer's bank details, or the account's balance). The case keeps following it and "
        "moves when the provider does; check the refund in the provider's dashboard.",
        ticket="incident"),
    "ledger_posting_conflict": Template(
        "Refund {case}: a ledger posting was not made",
        "The ledger already holds an entry under this posting key ({posting_key}) for other money "
        "than a later posting asked; money is posted once, so the later one was not. Check which "
        "is right against the provider.", ticket="incident"),
    "unexpected_provider_status": Template(
        "Refund {case}: unexpected provider status",
        "The provider reported a status we have no branch for ({error}). The case waits in ops "
        "review and is never assumed to have succeeded.", ticket="incident"),
    "no_status_lookup_escalation": Template(
        "Refund {case}: no answer from the provider yet",
        "The provider has no refund-status lookup and its notification has not arrived ({reason}). "
        "The case waits for it and will not resubmit; check the refund in the provider's "
        "dashboard.", ticket="incident"),
    "duplicate_provider_refund": Template(
        "Incident: refund {case} was made twice at the provider",
        "The provider holds a second refund, {duplicate_refund_id} of {duplicate_amount}, carrying "
        "this case's reference beside {provider_refund_id}. The case is in ops review and a "
        "reconciliation break records it; nothing is reversed automatically.", ticket="incident"),
    "provider_refund_mismatch": Template(
        "Incident: refund {case} moved another amount than approved",
        "The provider holds refund {provider_refund_id} for {reported}; the request was for "
        "{requested}. The ledger books what the provider reports, the case is in ops review and "
        "nothing is corrected automatically.", ticket="incident"),
    "provider_status_contradicted": Template(
        "Incident: the provider contradicts refund {case}",
        "The provider now reports the refund as {reported}; it reported it succeeded before and "
        "the ledger booked it ({source}). Nothing is reversed on this word alone: the case is in "
        "ops review; check the refund in the provider's dashboard.", ticket="incident"),
    "provider_wait_resolution_superseded": Template(
        "Refund {case}: the provider's own word came before your resolution",
        "The provider reported refund {provider_refund_id} as {provider_status} before your "
        "resolution of the case's wait ({resolution}) reached the case, so the case follows the "
        "provider and your resolution changed nothing. Check the refund in the provider's "
        "dashboard; if it still shows otherwise, raise it with the provider.", ticket="incident"),
    "provider_refund_changed": Template(
        "Incident: the provider reports other money for refund {case}",
        "The provider now reports refund {provider_refund_id} for {reported}; it reported it for "
        "{before} before. The ledger books each entry as the provider reports it, the case is in "
        "ops review and nothing is corrected automatically.", ticket="incident"),
    "provider_configuration_refused": Template(
        "Refund {case}: the provider refused our credentials",
        "The provider refused our API key or its permissions ({error}). This is not a decline: "
        "the case waits in ops review with its amount reserved and the provider is asked again "
        "every poll interval. Fix the key; the case resumes by itself.", ticket="incident"),
    "validate_retries_exhausted": Template(
        "Refund {case}: the provider does not answer validation",
        "Reading the charge at the provider kept failing ({error}). The case waits in ops review "
        "and is asked again every poll interval; nothing was reserved or moved yet.",
        ticket="incident"),
    "verify_retries_exhausted": Template(
        "Refund {case}: the provider does not answer a refund lookup",
        "Looking our refund up kept failing ({error}). The case waits in ops review with its "
        "amount reserved, is asked again every poll interval and will not resubmit before the "
        "provider answers.", ticket="incident"),
    "incident_ledger_pending": Template(
        "Incident: refund {case} executed, ledger pending",
        "The provider confirmed the refund of {amount}, but the ledger did not take the "
        "{template} posting in time. Posting goes on until it lands; the provider is not called "
        "again.", ticket="incident"),
    "payout_exception": Template(
        "Payout exception {case}",
        "Payout {payout_id} of {amount} came back {payout_status} after it was marked paid. "
        "Beneficiary payouts are held until the case is decided.", ticket="incident", payout=True),
    # Payout exception cases: one ticket per case (opened by its first occasion, updated by
    # later ones), and a notice per outcome with the decision, the money and what comes next.
    "payout_exception_ticket": Template(
        "Payout exception {case}",
        "{summary} Priority: {priority}; occasion: {occasion}.", ticket="incident", payout=True),
    "payout_exception_remediated": Template(
        "Payout {payout_id} held and reversed",
        "Decision: {decision} by {approved_by} (tier {tier}). Payout {payout_id} of {amount} is on "
        "hold (it was {held_from}; beneficiary's further payouts held: {beneficiary_held}) and the "
        "compensating entry is posted. Ticket: {ticket_ref}. Next steps: {next_steps}.", payout=True),
    "payout_ledger_failed": Template(
        "High priority: payout {payout_id} could not be reversed in the ledger",
        "Decision: approved by {approved_by}, but the compensating entry for payout {payout_id} of "
        "{amount} was not posted ({error}). Hold: {outcome}. Next steps: a high-priority ticket is "
        "open; check the ledger, then post the entry by hand or restart the case. No money moved "
        "at the provider.", payout=True),
    "payout_amount_mismatch": Template(
        "Payout {payout_id}: reported failed for another amount than booked",
        "The provider reports payout {provider_payout_id} failed for {reported}; our books hold it "
        "as {booked}. Nothing was held, reversed or posted: the case waits in ops review with a "
        "reconciliation break. Next steps: find which side is wrong before any reversal.",
        payout=True),
    "payout_reissue_failed": Template(
        "Payout {payout_id}: the reissue failed",
        "Decision: reissue approved by {approved_by}, but the provider did not pay {amount} again "
        "({error}). The original payout stays on hold and nothing was paid twice. Next steps: "
        "verify the beneficiary's bank details and the provider's dashboard before a new attempt.",
        payout=True),
    "payout_reissue_attempts_exhausted": Template(
        "Payout {payout_id}: the reissue's outcome is unknown after {attempts} attempts",
        "Decision: reissue approved by {approved_by}; no attempt to pay {amount} again got a "
        "certain answer. Once no attempt could still land, the provider was asked again: it holds "
        "no reissue = {provider_holds_none} ({lookup}). The original payout stays on hold and "
        "nothing more is sent. Next steps: check the provider for a payout with this reissue's "
        "reference before paying by hand.", payout=True),
    "payout_reissue_canceled": Template(
        "Payout {payout_id}: the case was cancelled during its reissue",
        "Decision: reissue approved by {approved_by}; the case was cancelled while an attempt to "
        "pay {amount} again ran, so nothing more is sent. Once that attempt could no longer land, "
        "the provider was asked: it holds no reissue = {provider_holds_none} ({lookup}). The "
        "original payout stays on hold. Next steps: decide whether to pay the beneficiary by "
        "hand; check the provider for this reissue's reference first.", payout=True),
    "payout_reissue_configuration_refused": Template(
        "Payout {payout_id}: the provider refused our credentials for the reissue",
        "The provider refused our API key or its permissions ({error}). The reissue of {amount} "
        "is not failed (an earlier attempt may have paid): it is asked again every poll interval "
        "and nothing is paid twice. Fix the key; the reissue resumes by itself.", payout=True),
    "payout_reissue_waiting_for_hold": Template(
        "Payout {payout_id}: the approved reissue waits for another case's beneficiary hold",
        "Decision: reissue approved. Beneficiary {beneficiary_id} is held by {held_by} (another "
        "failed payout): nothing was paid. The reissue is asked again every poll interval and "
        "pays once that hold ends (that case's reissue, or ops release its beneficiary hold "
        "after verifying the beneficiary's details).", payout=True),
    "beneficiary_hold_released": Template(
        "Payout case {case}: beneficiary hold released by {released_by}",
        "Beneficiary {beneficiary_id} is no longer held by this case ({reason}). The payout's own "
        "hold and the ledger stay as they are; reissues waiting for this hold go ahead.",
        payout=True),
    "payout_paid_after_reversal": Template(
        "Payout {payout_id} was paid after all: our books reversed it",
        "The provider now reports payout {payout_id} of {amount} paid; our books took it back "
        "after its failure (and a reissue may have paid the beneficiary again). Nothing moved by "
        "this report. Next steps: confirm with the provider or bank, then undo the reversal, or "
        "recover the second payment.", ticket="incident", payout=True),
    "payout_paid_after_failure": Template(
        "Payout {payout_id} was paid after its failure: its reversal is not booked yet",
        "The provider now reports payout {payout_id} of {amount} paid, after the failure that "
        "opened this case. Nothing moved by this report; an approved reversal reads the payout "
        "at the provider first and books nothing back while it is not failed there. Next steps: "
        "confirm with the provider or bank, then deny the reversal.", ticket="incident",
        payout=True),
    "payout_not_failed_at_provider": Template(
        "High priority: payout {payout_id}, approved for reversal, is not failed at the provider",
        "Decision: reversal approved by {approved_by}, but the provider does not show payout "
        "{payout_id} of {amount} failed now ({provider_status}): the bank corrected it, it was sent "
        "again, or it could not be read. Nothing was held or booked back; the payout stays paid in "
        "our books. Next steps: confirm with the provider or bank; once it shows the payout failed, "
        "a reconciliation run raises it for approval.", payout=True),
    "payout_reissued": Template(
        "Payout {payout_id} reissued as {reissue_id}",
        "Decision: reissue approved by {approved_by}. The beneficiary was paid {amount} again as "
        "{reissue_id}; the reissue is posted in the ledger and this case's beneficiary holds are "
        "released. Next steps: none; the case is complete.", payout=True),
    "reconciliation_break_overtaken": Template(
        "Reconciliation break {break_id}: approved, but the provider has said otherwise since",
        "Approved by {approvers}, the break was found on one word of the provider's about the "
        "refund; break {later_break_id} ({later_break_class}) has since found it "
        "{provider_status}. Nothing was posted or changed: the approval was for a word the "
        "provider no longer says. Next steps: read the refund at the provider and decide break "
        "{later_break_id}; what still disagrees is raised by the next run.", ticket="incident"),
    "reconciliation_break_case_moved": Template(
        "Reconciliation break {break_id}: approved, but its case moved on",
        "Approved by {approvers}, the break was found while the case held the provider's status "
        "{found_provider_status}; the case has since applied {provider_status} itself. Nothing "
        "was posted or changed: the approval was for a case that is no longer there. Next "
        "steps: compare the case with the provider; the next reconciliation run raises what "
        "still disagrees.", ticket="incident"),
    "reconciliation_break_currency_differs": Template(
        "Reconciliation break {break_id}: approved, but the refund is in another currency",
        "Approved by {approvers}, the break is about a refund the provider holds in "
        "{provider_currency} for a case in {case_currency}. Nothing was posted or changed: the "
        "ledger books in the case's currency and cannot follow it. Next steps: find out with "
        "the provider how a refund in another currency was made, then correct the case and the "
        "ledger by hand.", ticket="incident"),
    "reconciliation_break_approval_unmet": Template(
        "Reconciliation break {break_id}: approved, but not by whom it needs",
        "The break's workflow settled it as approved by {approvers}, but as the break is stored "
        "those approvals do not count: behind the break (its requester, a trigger identity or "
        "whoever reopened it): {behind_the_break}; still missing: {missing_roles}. Nothing was "
        "posted or changed. Next steps: find out who started or changed the break's workflow "
        "in Temporal (its run was not the one the break opened), then reopen the break for "
        "approvers who may decide it.", ticket="incident"),
    "reconciliation_break_approval_revoked": Template(
        "Reconciliation break {break_id}: approved, but on a token revoked since",
        "Approved by {approvers}, the break's round counted an approval given with a token "
        "revoked since: {revoked}. Their approval counts no more (the token may have been "
        "stolen, or its person has left), so nothing was posted or changed. Next steps: ask "
        "the admin who revoked it why; the next reconciliation run raises the break again for "
        "approvers who may decide it.", ticket="incident"),
    "reconciliation_break_provider_moved": Template(
        "Reconciliation break {break_id}: approved, but the provider no longer shows the payout failed",
        "Approved by {approvers}, the break was found while the provider showed the payout "
        "{found_provider_status}; read again before its reversal, the provider shows "
        "{provider_status}. Nothing was posted or changed: reversing it would undo a payout the "
        "beneficiary may have. Next steps: confirm with the provider; the next reconciliation "
        "run raises what still disagrees.", ticket="incident"),
    "tracking_ended_without_final_status": Template(
        "Refund {case}: the provider gave its refund no final status",
        "Refund {provider_refund_id}, made at the provider without us (its dashboard or an "
        "automatic refund), was last reported {last_status} and no final word came within the "
        "watch. Its {amount} stays held against the charge and nothing is booked: it may still "
        "pay. Next steps: look the refund up at the provider; a final event that still comes is "
        "reconciled into a break for ops.", ticket="incident"),
    "workflow_closed": Template(
        "Refund {case}: its workflow ended while the case was open",
        "The case showed {case_status} when its workflow was found {workflow_status}; nothing moves "
        "it now. It is in ops review with break {break_id}. Whether the provider holds a refund "
        "for it (None: it could not be asked): {provider_holds_refund} ({provider_refund_id}). "
        "The reservation is released only when the provider holds none. Next steps: read the "
        "workflow's history and the provider, then settle the break.", ticket="incident"),
    "reconciliation_break": Template(
        "Reconciliation break {case}",
        "Ledger and provider disagree: {difference}. Nothing is corrected automatically.",
        ticket="incident"),
}

FALLBACK = Template("Refund {case}: {kind}", "Notice {kind} for {audience}.")


class _Lenient(dict[str, str]):
    """Fills placeholders a notice does not carry, instead of failing the delivery."""

    def __missing__(self, key: str) -> str:
        return "n/a"


@dataclass(frozen=True)
class Message:
    """What every channel renders in its own format."""

    notice_id: int
    kind: str
    audience: str
    case_id: str | None
    title: str
    text: str
    facts: tuple[tuple[str, str], ...]
    link: str | None
    buttons: bool
    ticket: TicketPurpose | None
    customer: bool
    email_to: str | None
    high_priority: bool = False  # tickets open at high priority (a payout the ledger could not reverse)

    def plain(self) -> str:
        """The message as plain text (email, ticket descriptions and notes)."""
        lines = [self.text, "", *(f"{label}: {value}" for label, value in self.facts)]
        if self.link:
            lines.append(f"Case: {self.link}")
        return "\n".join(lines)


def one_line(text: str) -> str:
    """Quoted text (a provider's failure reason, an approver's words, a model's summary of
    requester text) as one line: its line breaks would otherwise read, in email and ticket
    text, exactly like the notice's own facts (a second "Amount:", a "Case:" link above the
    real one). Every whitespace run, Unicode line separators included, is one space."""
    return " ".join(text.split())


def _amount(case: Mapping[str, Any] | None, detail: Mapping[str, Any]) -> str:
    source = case if case is not None else detail
    amount, currency = source.get("amount"), source.get("currency")
    if isinstance(amount, int) and isinstance(currency, str):
        return shown_minor(amount, currency)
    return "n/a"


def _policy_line(decision: Mapping[str, Any] | None) -> str | None:
    """The policy's decision as approvers read it: its tier and the rules that fired."""
    if not decision:
        return None
    rules = ", ".join(decision.get("rules_fired") or ()) or "none"
    tier, version = decision.get("tier") or "n/a", decision.get("policy_version")
    return f"tier {tier}; rules fired: {rules} (policy {version})"


def _advice_line(advice: Mapping[str, Any] | None, currency: str) -> str | None:
    if not advice or not advice.get("advice"):
        return None
    body = advice["advice"]
    flags = one_line(", ".join(map(str, body.get("anomaly_flags") or []))) or "none"
    suggested = format_minor(body["suggested_amount"], currency)
    return (f"{one_line(str(body['summary']))} Suggested amount {suggested}; "
            f"flags: {flags}; confidence {body['confidence']} ({advice['source']}).")


PAYOUT_APPROVAL_TEMPLATES: dict[str, Template] = {
    "workflow_closed": Template(
        "Payout {payout_id}: its case's workflow ended while the case was open",
        "The payout case showed {case_status} when its workflow was found {workflow_status}; "
        "nothing moves it now. It is in ops review with break {break_id}. The payout is "
        "{payout_status}; the beneficiary is held: {beneficiary_held}; the compensating entry is "
        "posted: {compensating_entry_posted}. Holds stay until ops decide. Next steps: read the "
        "workflow's history and the provider, then settle the break.", ticket="incident",
        payout=True),
    "approval_needed": Template(
        "Payout case {case} needs approval",
        "Payout {payout_id} of {amount} came back failed after it was marked paid; its reversal waits "
        "for approval by: {missing_roles}. Decide on the payout case page; whoever requested it "
        "cannot approve it.", payout=True),
    "approval_reminder": Template("Reminder: payout case {case} still needs approval",
                                  "Still waiting for: {missing_roles}.", payout=True),
    "approval_escalated": Template("Escalated: payout case {case} is waiting too long for approval",
                                   "No decision yet; still missing: {missing_roles}.", payout=True),
    "approval_denied": Template("Payout case {case} denied",
                                "Denied by {by}. Nothing is held or posted for payout {payout_id}.",
                                payout=True),
    "approval_expired": Template("Payout case {case} expired",
                                 "Nobody decided within the approval window (still missing: "
                                 "{missing_roles}). Nothing is held or posted for payout {payout_id}.",
                                 payout=True),
}
"""The approval round's notices for a payout exception: the same kinds as a refund's, but
not a refund's words, and no Slack approve buttons (those answer refund cases only)."""


def template_for(notice: Mapping[str, Any], case: Mapping[str, Any] | None) -> Template:
    """The notice's template; a payout case (no refund case, a payout in the detail) has its
    own words for the approval round's kinds and the closed-workflow sweep's."""
    kind = str(notice["kind"])
    if case is None and "payout_id" in (notice["detail"] or {}) and kind in PAYOUT_APPROVAL_TEMPLATES:
        return PAYOUT_APPROVAL_TEMPLATES[kind]
    return TEMPLATES.get(kind, FALLBACK)


def render(notice: Mapping[str, Any], case: Mapping[str, Any] | None,
           advice: Mapping[str, Any] | None, *, case_url: str | None,
           email_to: str | None) -> Message:
    """One message for every channel; facts carry refund id, amount, status and time."""
    kind = str(notice["kind"])
    detail: dict[str, Any] = dict(notice["detail"] or {})
    template = template_for(notice, case)
    case_id = notice["refund_request_id"]
    missing = detail.get("missing_roles")
    values = _Lenient({k: one_line(", ".join(map(str, v)) if isinstance(v, list) else str(v))
                       for k, v in detail.items()})
    failure = detail.get("failure_reason") or detail.get("reason") or (case or {}).get("failure_reason")
    values.update(case=case_id or one_line(str(detail.get("case", "n/a"))), kind=kind,
                  failure=one_line(str(failure or "n/a")),
                  audience=str(notice["audience"]), amount=_amount(case, detail),
                  missing_roles=", ".join(missing) if isinstance(missing, list) else "n/a")
    created: datetime = notice["created_at"]
    subject = "Payout case" if template.payout else "Refund request"
    facts: list[tuple[str, str]] = [(subject, values["case"]), ("Amount", values["amount"])]
    if not template.customer:
        if case is not None:
            facts += [("Status", str(case["status"])), ("Charge", f"{case['provider']} {case['charge_id']}"),
                      ("Reason", str(case["reason"])), ("Requester", str(case["requester"]))]
            if case.get("provider_refund_id"):
                facts.append(("Provider refund", str(case["provider_refund_id"])))
        if template.payout and "payout_id" in detail:
            facts.append(("Payout", values["payout_id"]))
        facts.append(("At", created.isoformat(timespec="seconds")))
        if kind == "approval_needed" and case is not None:
            if policy := _policy_line(case.get("decision")):
                facts.append(("Policy", policy))  # what decided, beside a model's reading of customer text
            line = _advice_line(advice, case["currency"])
            facts.append(("AI suggestion (advisory only)", line or "no advice"))
    # A request ticket is a refund request's: a notice of another kind of case (a payout
    # exception's approval round) files none; that case's ticket has its own notice kind.
    ticket = template.ticket if case is not None or template.ticket != "request" else None
    return Message(
        notice_id=int(notice["id"]), kind=kind, audience=str(notice["audience"]), case_id=case_id,
        title=template.title.format_map(values), text=template.text.format_map(values),
        facts=tuple(facts), link=None if template.customer else case_url, buttons=template.buttons,
        ticket=ticket, customer=template.customer, email_to=email_to,
        high_priority=detail.get("priority") == "high")
