"""The AI advisor's output and its input: a typed recommendation, never a command.

Nothing that decides or executes reads an `Advice` (policy takes `PolicyInput`, which has
no place for it). The deterministic offline advisor gives the same shape from rules, so
the product works without a model endpoint.
"""

import hashlib
import json
import re
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from domain.models import Frozen, RefundReason
from domain.money import format_minor

Flag = Annotated[str, Field(min_length=1, max_length=100)]


class Advice(BaseModel):
    """What an approver sees as a suggestion. Unknown keys in a model's answer are dropped:
    there is no field through which an answer could ask for an action."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    summary: str = Field(min_length=1, max_length=2000)
    suggested_amount: int = Field(ge=0, strict=True, description="integer minor units")
    suggested_reason: RefundReason
    anomaly_flags: tuple[Flag, ...] = Field(default=(), max_length=20)
    confidence: float = Field(ge=0, le=1)


class PriorRefund(Frozen):
    refund_request_id: str
    amount: int
    status: str


class TimelineEntry(Frozen):
    at: datetime
    actor: str
    action: str


class AdviceContext(Frozen):
    """Facts the advisor may look at. `untrusted_text` (evidence, ticket text, webhook
    fields) is data from outside: quoted to a model as data, never as instructions."""

    refund_request_id: str
    provider: str
    charge_id: str
    amount: int
    currency: str
    reason: RefundReason
    method: str
    source: str
    amount_captured: int | None = None
    remaining_before: int | None = None
    dispute_count: int | None = 0
    prior_refunds_on_charge: tuple[PriorRefund, ...] = ()
    customer_history: tuple[PriorRefund, ...] = ()
    untrusted_text: dict[str, str] = Field(default_factory=dict)
    timeline: tuple[TimelineEntry, ...] = ()

    def fingerprint(self) -> str:
        """SHA-256 of what the advisor was shown, kept beside the advice."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


PERSONAL_FIELDS = frozenset({"customer_email", "email", "customer_phone", "phone", "customer_name", "name",
                             "address", "billing_address", "shipping_address"})
"""Evidence fields that hold a person's contact data: withheld from the model whole."""
WITHHELD = "[withheld]"
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+\d[\d ()-]{7,}\d")
_NATIONAL_PHONE = re.compile(  # written with a phone's grouping: (415) 555-0132, 020 7946 0958
    r"(?<![\w.-])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\w-])"
    r"|(?<![\w.-])0\d{2,4}[ -]\d{3,4}(?:[ -]?\d{3,4})?(?![\w-])")
_CARD = re.compile(r"\b[2-6](?:[ -]?\d){12,18}\b")  # card brands' first digits: 2 to 6
_IBAN = re.compile(r"\b([A-Z]{2})\d{2}(?: ?[A-Z0-9])+")
"""A run that may start an IBAN; how much of it is one, its country's length says."""
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
"""ISO 13616's IBAN length per country."""


def _luhn(digits: str) -> bool:
    total = sum(int(d) if i % 2 == 0 else (2 * int(d) - 9 if int(d) > 4 else 2 * int(d))
                for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


def _iban(run: re.Match[str]) -> str:
    """The run with the IBAN it starts with masked: as many characters as its country's IBAN
    has (a currency or reference after it is no part of it), ending where a group ends, and
    passing ISO 13616's check (the first four moved to the end, letters as 10-35, the number
    1 modulo 97); else the run as it was."""
    text, length = run.group(0), IBAN_LENGTHS.get(run.group(1))
    if length is None:
        return text
    taken = end = 0
    while end < len(text) and taken < length:
        taken += text[end] != " "
        end += 1
    compact = text[:end].replace(" ", "")
    if taken < length or (end < len(text) and text[end] != " "):
        return text
    if int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 != 1:
        return text
    return "[iban]" + text[end:]


def masked(text: str) -> str:
    """`text` with email addresses, bank accounts (IBANs that pass their check), phone numbers
    (international, or national written in a phone's grouping; a bare digit run may be an
    order id) and card numbers (digit runs that pass the Luhn check) replaced: what may go to
    the model, and what of its answer reaches notices and tickets (it may echo what a
    customer wrote)."""
    text = _EMAIL.sub("[email]", text)
    text = _IBAN.sub(_iban, text)
    # cards first: a card's groups after the first may read as a national phone number
    text = _CARD.sub(lambda m: "[card number]" if _luhn(re.sub(r"\D", "", m.group(0))) else m.group(0), text)
    return _NATIONAL_PHONE.sub("[phone]", _PHONE.sub("[phone]", text))


def untrusted_for_model(evidence: dict[str, str]) -> dict[str, str]:
    """The case's free-form evidence as the model may see it: contact fields withheld, personal
    data masked in the rest."""
    return {key: WITHHELD if key.lower() in PERSONAL_FIELDS else masked(str(value))
            for key, value in evidence.items()}


def told_without_personal_data(advice: Advice) -> Advice:
    """A model's answer with what it echoes of personal data masked (`masked`): the summary
    and flags reach notices, tickets and the console."""
    return advice.model_copy(update={"summary": masked(advice.summary),
                                     "anomaly_flags": tuple(masked(f) for f in advice.anomaly_flags)})


def guarded(advice: Advice, context: AdviceContext) -> Advice:
    """Adds our own flags where a suggestion goes beyond the request (whatever produced it),
    so an approver sees at a glance that the suggestion is not to be taken literally."""
    flags = list(advice.anomaly_flags)
    if advice.suggested_amount > context.amount:
        flags.append("suggestion_exceeds_requested_amount")
    if context.remaining_before is not None and advice.suggested_amount > context.remaining_before:
        flags.append("suggestion_exceeds_remaining_refundable")
    unique = tuple(dict.fromkeys(flags))[:20]
    return advice if unique == advice.anomaly_flags else advice.model_copy(update={"anomaly_flags": unique})


def offline_advice(context: AdviceContext) -> Advice:
    """Deterministic rules over the same context a model would see."""
    prior = context.prior_refunds_on_charge
    flags: list[str] = []
    if prior:
        flags.append("prior_refunds_on_charge")
    if context.dispute_count is None:
        flags.append("dispute_history_unknown")
    elif context.dispute_count:
        flags.append("disputed_charge")
    if context.customer_history:
        flags.append("customer_has_earlier_refund_requests")
    if context.amount_captured and context.amount == context.amount_captured and prior:
        flags.append("full_capture_requested_after_prior_refunds")
    suggested = context.amount
    if context.remaining_before is not None:
        suggested = min(suggested, context.remaining_before)
    summary = (
        f"{context.reason.value} refund of {format_minor(context.amount, context.currency)} on "
        f"{context.provider} charge {context.charge_id}: {len(prior)} prior refund(s) on the charge "
        f"({format_minor(sum(p.amount for p in prior), context.currency)}), "
        f"{'unknown' if context.dispute_count is None else context.dispute_count} dispute(s), "
        f"{len(context.customer_history)} earlier request(s) "
        "by this customer.")
    return Advice(summary=summary, suggested_amount=suggested, suggested_reason=context.reason,
                  anomaly_flags=tuple(flags), confidence=round(max(0.2, 0.9 - 0.2 * len(flags)), 2))
