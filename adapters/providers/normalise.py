"""Turning provider payloads into canonical values: amounts, statuses, refunds.

An unexpected status is an error that names itself (`UnexpectedStatus`), never a default:
the incident this product exists to prevent was a refund state falling into a silent
default branch.
"""

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, Inexact, localcontext
from typing import Any, TypeVar

from pydantic import ValidationError

from adapters.providers.base import ProviderUnsupported, UnexpectedProviderStatus, WebhookRejected
from adapters.providers.units import MinorUnits, minor_units
from domain.models import EventKind, ProviderEvent, ProviderRefund, ProviderRefundStatus
from domain.money import MAX_MINOR_AMOUNT, currency_exponent, normalise_currency
from domain.payouts import FoundPayout, PayoutEvent, ProviderPayout, ProviderPayoutStatus
from domain.reconciliation import UnmappedListing

log = logging.getLogger(__name__)

REFERENCE_KEY = "refund_request_id"
"""The metadata key that carries our refund_request_id on a provider's refund."""
PAYOUT_REFERENCE_KEY = "payout_reference"
"""The metadata key that carries our payout id on a payout we made (a reissue)."""

IDENTITY_STATUSES = {s.value: s for s in ProviderRefundStatus}
S = TypeVar("S")
L = TypeVar("L")


class UnexpectedStatus(UnexpectedProviderStatus):
    """The provider reported a refund (or payout) status we have no branch for (on the API
    path the activities turn it into an ops-review case; on a webhook, a refused delivery)."""

    def __init__(self, provider: str, raw: str, what: str = "refund") -> None:
        super().__init__(f"{provider}: unexpected {what} status {raw!r}")
        self.raw = raw


class MalformedAnswer(UnexpectedProviderStatus):
    """A provider's API answer without a field we read (or with the wrong type): an error,
    never a zero or a "not found", since either would let money move on a guess."""


def required(provider: str, obj: object, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """`obj[key]`, which must be present, not null and a `kind`; raises MalformedAnswer."""
    value = obj.get(key) if isinstance(obj, Mapping) else None
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedAnswer(f"{provider}: {what} has no usable {key!r} (got {value!r})")
    return value


def map_status(provider: str, table: Mapping[str, S], raw: object, what: str = "refund") -> S:
    """The canonical status for a provider's raw one; raises UnexpectedStatus otherwise."""
    try:
        return table[str(raw)]
    except KeyError:
        raise UnexpectedStatus(provider, str(raw), what) from None


def major_to_minor(value: object, currency: str) -> int:
    """Amounts that arrive as major units (parsed with Decimal, never float), exactly: one
    the conversion would round (past Decimal's 28 digits) or past 64 bits is refused."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError(f"amount must be a JSON number, got {value!r}")
    with localcontext() as exact:
        exact.traps[Inexact] = True
        try:
            minor = Decimal(value).scaleb(currency_exponent(currency))
        except Inexact:
            raise ValueError(f"{value} has more digits than an amount can hold exactly") from None
    if minor != minor.to_integral_value():
        raise ValueError(f"{value} has more decimals than {currency} allows")
    if abs(minor) > MAX_MINOR_AMOUNT:
        raise ValueError(f"amount {value} is larger than any we can hold")
    return int(minor)


def minor_to_major(amount: int, currency: str) -> Decimal:
    """Minor units as the provider's major-unit decimal (INR 12345 → 123.45), exactly."""
    return Decimal(amount).scaleb(-currency_exponent(currency))


def exact_json(payload: Mapping[str, Any] | list[Any]) -> bytes:
    """JSON with Decimal values written as numbers digit for digit: `json` would need a
    float for them, and a float is how 0.1 + 0.2 becomes a different refund."""
    digits: dict[str, str] = {}

    def mark(value: object) -> str:
        if not isinstance(value, Decimal):
            raise TypeError(f"{type(value).__name__} is not JSON serialisable")
        token = f"\u0000decimal{len(digits)}\u0000"
        digits[json.dumps(token)] = format(value, "f")
        return token

    text = json.dumps(payload, default=mark)
    for token, number in digits.items():
        text = text.replace(token, number)
    return text.encode()


def outgoing_amount(provider: str, units: MinorUnits, amount: int, currency: str) -> int:
    """Our amount in the provider's units for a create. One with no exact equal there is
    refused before anything is sent (ProviderUnsupported: nothing moved); the relay already
    refuses such amounts where they enter."""
    try:
        return units.to_provider(amount, currency)
    except ValueError as exc:
        raise ProviderUnsupported(f"{provider}: {exc}") from None


def answered_amounts(provider: str, units: MinorUnits, what: str, currency: str,
                     amounts: Mapping[str, int]) -> dict[str, int]:
    """An API answer's amounts (in the provider's units) in ours; MalformedAnswer when one
    has no exact equal, since a rounded figure would let money move on a guess."""
    try:
        return {name: units.from_provider(value, currency) for name, value in amounts.items()}
    except ValueError as exc:
        raise MalformedAnswer(f"{provider}: {what}: {exc}") from None


def amount_and_currency(obj: Mapping[str, Any], units: MinorUnits) -> tuple[int, str]:
    """A Stripe-shaped object's `amount` (in the provider's units) in our minor units, with
    its currency; MalformedAnswer (a webhook's `malformed`) when no amount of ours equals it."""
    currency = normalise_currency(str(obj["currency"]))
    try:
        return units.from_provider(obj["amount"], currency), currency
    except ValueError as exc:
        raise MalformedAnswer(f"{obj.get('id')}: {exc}") from None


def stripe_shaped_refund(provider: str, obj: Mapping[str, Any],
                         statuses: Mapping[str, ProviderRefundStatus],
                         units: MinorUnits) -> ProviderRefund:
    """Maps a Stripe-shaped refund object (Stripe's own and the sandbox's)."""
    metadata = obj.get("metadata") or {}
    amount, currency = amount_and_currency(obj, units)
    return ProviderRefund(
        provider=provider, refund_id=str(obj["id"]),
        # nullable at Stripe (a refund of no charge is about nothing we hold): never "None"
        charge_id=required(provider, obj, "charge", str, "refund"),
        amount=amount, currency=currency,
        status=map_status(provider, statuses, obj["status"]), raw_status=str(obj["status"]),
        failure_reason=obj.get("failure_reason"), reference=metadata.get(REFERENCE_KEY),
    )


def stripe_shaped_payout(provider: str, obj: Mapping[str, Any],
                         statuses: Mapping[str, ProviderPayoutStatus],
                         units: MinorUnits) -> ProviderPayout:
    """Maps a Stripe-shaped payout object (Stripe's own and the sandbox's)."""
    metadata = obj.get("metadata") or {}
    amount, currency = amount_and_currency(obj, units)
    return ProviderPayout(
        provider=provider, payout_id=str(obj["id"]), amount=amount, currency=currency,
        status=map_status(provider, statuses, obj["status"], "payout"), raw_status=str(obj["status"]),
        failure_code=obj.get("failure_code"), failure_message=obj.get("failure_message"),
        reference=metadata.get(PAYOUT_REFERENCE_KEY),
    )


def stripe_shaped_found_payout(provider: str, obj: Mapping[str, Any],
                               statuses: Mapping[str, ProviderPayoutStatus],
                               units: MinorUnits) -> FoundPayout:
    """A Stripe-shaped payout a lookup returned, with its `destination` (an id, or the
    expanded object holding it)."""
    destination = obj.get("destination")
    if isinstance(destination, dict):
        destination = destination.get("id")
    return FoundPayout(**dict(stripe_shaped_payout(provider, obj, statuses, units)),
                       destination=str(destination) if destination else None)


UNREADABLE = (UnexpectedStatus, MalformedAnswer, ValueError, KeyError, TypeError)
"""What building a listed object raises when no rule can read it."""


def listed(provider: str, obj: Mapping[str, Any], units: MinorUnits,
           build: Callable[[Mapping[str, Any], datetime], L]) -> L | UnmappedListing:
    """One object of a Stripe-shaped list call (`created` in unix seconds), built by
    `build`; an object no rule can read is returned as an UnmappedListing (`unreadable`), so
    a reconciliation run records it as a break and reads on instead of stopping."""
    try:
        created, object_id = datetime.fromtimestamp(int(obj["created"]), UTC), str(obj["id"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        # nowhere to place it in the window, or nothing to name it by: the run fails for
        # good, saying so
        raise MalformedAnswer(f"{provider}: listed object {obj.get('id')!r} has no usable 'created' "
                              f"or 'id' ({type(exc).__name__}: {exc})") from None
    try:
        return build(obj, created)
    except UNREADABLE as exc:
        return unreadable(provider, exc, created, units, object_id=object_id, status=obj.get("status"),
                          amount=obj.get("amount"), currency=obj.get("currency"))


def unreadable(provider: str, exc: Exception, created: datetime, units: MinorUnits, *, object_id: str,
               status: object, amount: object, currency: object) -> UnmappedListing:
    """A listed object no rule can read: an unmapped status, an amount no amount of ours
    equals (a fractional krona from before 2023), a currency ISO 4217 no longer has, a field
    missing or of another type. A break for ops, never a batch retried for ever; its
    currency and amount ours where they convert (an amount rounded down to one of ours),
    else as sent (0 for an amount that is no integer, or none a BIGINT column holds: the
    break's error carries it)."""
    log.error("UNMAPPED while listing %s: %s (%s)", provider, exc, object_id)
    raw_status = exc.raw if isinstance(exc, UnexpectedStatus) else str(status)
    code = str(currency or "").strip().upper()[:16]
    whole = amount if isinstance(amount, int) and not isinstance(amount, bool) else 0
    try:
        code, whole = normalise_currency(code), units.largest_ours(minor_units(whole), code)
    except ValueError:
        pass  # kept as sent
    return UnmappedListing(object_id=object_id, raw_status=raw_status,
                           amount=whole if 0 <= whole <= MAX_MINOR_AMOUNT else 0, created=created,
                           error=f"{type(exc).__name__}: {exc}", currency=code)


def payout_event(payout: ProviderPayout, env: "StripeEnvelope") -> PayoutEvent:
    """The canonical event for a payout a Stripe-shaped webhook reported."""
    return PayoutEvent(provider=payout.provider, event_id=env.event_id, event_type=env.event_type,
                       body_sha256=env.body_sha256, occurred_at=env.occurred_at, payout=payout)


def unix_bound(moment: datetime) -> int:
    """A window bound as the whole second that filters integer `created` times exactly:
    created >= t and created < t both hold iff they hold against ceil(t)."""
    return math.ceil(moment.timestamp())


def load_json(body: bytes, *, exact_decimals: bool = False) -> Any:
    """The body as JSON; decimals as Decimal when the provider sends major units."""
    try:
        return json.loads(body, parse_float=Decimal) if exact_decimals else json.loads(body)
    except ValueError as exc:
        raise WebhookRejected("malformed", f"body is not JSON: {exc}") from None
    except RecursionError:
        raise WebhookRejected("malformed", "body is JSON nested too deeply to read") from None


def require_known(event_type: str, known: frozenset[str], event_id: str | None) -> None:
    """An event type without a handler is stored and reported, never silently acknowledged."""
    if event_type not in known:
        raise WebhookRejected("unknown_type", f"no handler for event type {event_type!r}",
                              event_id=event_id, event_type=event_type)


@dataclass(frozen=True)
class StripeEnvelope:
    """A Stripe-shaped event (`{id, type, created, data: {object}}`; Stripe's and the sandbox's)."""

    event_id: str
    event_type: str
    occurred_at: datetime
    obj: dict[str, Any]
    payload: dict[str, Any]
    body_sha256: str


def stripe_envelope(body: bytes, known: frozenset[str]) -> StripeEnvelope:
    """Reads the envelope of a verified body; malformed or unknown types are refused."""
    payload = load_json(body)
    with normalising(None, None):
        envelope = StripeEnvelope(
            event_id=str(payload["id"]), event_type=str(payload["type"]),
            occurred_at=datetime.fromtimestamp(int(payload["created"]), UTC),
            obj=dict(payload["data"]["object"]), payload=payload,
            body_sha256=hashlib.sha256(body).hexdigest())
    require_known(envelope.event_type, known, envelope.event_id)
    return envelope


@contextmanager
def normalising(event_id: str | None, event_type: str | None, *, signed: bool = True) -> Iterator[None]:
    """Turns a payload that does not fit into a refused delivery that names the problem:
    `unreadable` once its signature held (the provider's word: kept and loud), else
    `malformed` (anyone's bytes: pruned after the refused retention)."""
    try:
        yield
    except UnexpectedStatus as exc:
        raise WebhookRejected("unexpected_status", str(exc), event_id=event_id,
                              event_type=event_type) from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, ArithmeticError, OSError,
            RecursionError, ValidationError) as exc:
        # AttributeError: a list or string where an object belongs; ArithmeticError: a time
        # or number out of range; OSError: a time past what the platform's time_t holds
        # (EOVERFLOW from fromtimestamp); RecursionError: nesting too deep to turn into text.
        raise WebhookRejected("unreadable" if signed else "malformed",
                              f"{event_type}: {type(exc).__name__}: {exc!s}"[:500],
                              event_id=event_id, event_type=event_type) from None


def refund_event(refund: ProviderRefund, *, event_id: str, event_type: str, body_sha256: str,
                 occurred_at: datetime, merchant_account: str | None = None) -> ProviderEvent:
    """The canonical status event for a refund a webhook reported."""
    return ProviderEvent(
        provider=refund.provider, event_id=event_id, event_type=event_type,
        kind=EventKind.REFUND_STATUS, body_sha256=body_sha256, occurred_at=occurred_at,
        refund_id=refund.refund_id, charge_id=refund.charge_id, amount=refund.amount,
        currency=refund.currency, status=refund.status, raw_status=refund.raw_status,
        failure_reason=refund.failure_reason, refund_request_id=refund.reference,
        merchant_account=merchant_account,
    )
