"""The provider adapter interface every provider implements, and its error vocabulary.

Errors say what we know about the money: `ProviderOutcomeUnknown` means the refund may or
may not exist (verify before retrying); `ProviderDeclined` means it certainly does not;
`ProviderConfigurationRefused` means our credentials were refused, so nothing was done and
nothing will be until ops fix the configuration. Only an answer to a create can decline:
a refused lookup says nothing about the money.
"""

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from adapters.providers.units import ISO_UNITS, MinorUnits
from domain.models import ChargeSnapshot, ProviderEvent, ProviderRefund, RefundRequest
from domain.money import format_minor
from domain.payments import PaymentEvent
from domain.payouts import FoundPayout, PayoutEvent, PayoutOrder, ProviderPayout
from domain.reconciliation import ListedPayout, ListedRefund, UnmappedListing


class ProviderError(Exception):
    """Base of the errors adapters raise."""


class ProviderOutcomeUnknown(ProviderError):
    """Timeout, 5xx or dropped connection: the provider may have acted."""


class ProviderDeclined(ProviderError):
    """A definitive refusal (4xx): nothing was created."""


class ProviderConfigurationRefused(ProviderError):
    """401/403: the provider refused our key or its permissions. Not a decline (an earlier
    attempt may still have moved money) and not worth retrying: a case for ops."""


class ProviderUnsupported(ProviderDeclined):
    """The adapter cannot do this call honestly (e.g. webhooks-only providers): nothing moved."""


class ProviderLookupUnsupported(ProviderError):
    """The provider has no refund-status lookup (Adyen): the outcome arrives only as a
    notification. Not a decline, so it never fails a case; the workflow waits instead."""


class WebhookRejected(ProviderError):
    """A delivery that must not act; `verdict` is the receipt verdict to store."""

    def __init__(self, verdict: str, message: str, *, event_id: str | None = None,
                 event_type: str | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict
        self.message = message
        self.event_id = event_id
        self.event_type = event_type


class RefundsDuplicated(ProviderError):
    """More than one provider refund carries one of our references: money moved twice. Not
    an unknown outcome: the lookup answered, and the caller raises the incident."""

    def __init__(self, provider: str, reference: str, refunds: list[ProviderRefund]) -> None:
        super().__init__(f"{provider}: {len(refunds)} refunds carry reference {reference}: "
                         f"{[r.refund_id for r in refunds]}")
        self.refunds = refunds


def not_served(served: frozenset[str], account: object, what: str, setting: str) -> str | None:
    """Why `account` is not one this deployment serves (None when it is, or when `served` is
    empty: unset, every account): one provider key or webhook secret covers several accounts
    (Adyen's company-level webhook, a Rainforest platform). Anything but a listed string,
    a list or an object included, is not served."""
    if not served or (isinstance(account, str) and account in served):
        return None
    return f"{what} {account!r} is not one this deployment serves ({setting})"


def only_refund(provider: str, reference: str, found: list[ProviderRefund]) -> ProviderRefund | None:
    """A lookup's answer: the one refund with our reference, None, or `RefundsDuplicated`
    (`found` in the order the adapter prefers, the one a case follows first)."""
    if len(found) > 1:
        raise RefundsDuplicated(provider, reference, found)
    return found[0] if found else None


class UnexpectedProviderStatus(ProviderError, ValueError):
    """A status we have no branch for: a loud error and a case for ops, never a default."""


@dataclass(frozen=True)
class AmountLimit:
    """The largest amount, in the provider's minor units, it takes in one refund or payout. An
    amount above it is refused where it enters (422), before a case or workflow exists:
    the provider would only refuse it later, after approvals were spent on it."""

    default: int
    source: str
    """Where the figure comes from (the provider's documentation, or why it is a default)."""
    per_currency: Mapping[str, int] = field(default_factory=dict)

    def of(self, currency: str) -> int:
        return self.per_currency.get(currency.upper(), self.default)

    def refusal(self, provider: str, amount: int, currency: str,
                units: MinorUnits = ISO_UNITS) -> str | None:
        """Why `amount` (our minor units) is too large for `provider` (naming the limit, which
        is stated in the provider's units), or None."""
        limit = units.largest_ours(self.of(currency), currency)
        if amount <= limit:
            return None
        return (f"amount {amount} is above {provider}'s maximum of {limit} minor units of "
                f"{currency.upper()} ({format_minor(limit, currency.upper())}) per refund or payout")


UNDOCUMENTED_MAXIMUM = AmountLimit(
    999_999_999_999, "no documented maximum: a conservative twelve digits (far inside the "
                     "64 bits we store and the 2**53 a JSON number holds exactly)")
"""For providers that document no per-transaction maximum."""


class RefundExecutor(Protocol):
    """Whatever moves the money back: a provider's refund API or a manual instruction."""

    name: str

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        """Asks for the refund, carrying our idempotency key and our request id as reference."""

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        """Looks the request's refund up by our reference (the verify-state step)."""


class ProviderAdapter(RefundExecutor, Protocol):
    """What the activities and the relay need from a payment provider."""

    event_types: frozenset[str]
    """The webhook event types this adapter has a handler for (coverage reports the rest)."""

    max_amount: AmountLimit
    """The largest refund or payout, per currency, the provider takes."""

    units: MinorUnits
    """How its API counts amounts where that is not ISO 4217 (the adapter converts)."""

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        """The charge as the provider sees it, or None when it does not exist."""

    def parse_webhook(self, headers: Mapping[str, str], body: bytes,
                      now: float) -> ProviderEvent | PayoutEvent | PaymentEvent:
        """Verifies the signature and normalises the event; raises WebhookRejected. Only
        providers with no payment lookup (Adyen) return payment events."""


def amount_refusal(adapter: ProviderAdapter, amount: int, currency: str) -> str | None:
    """Why `adapter` cannot take `amount` (our minor units) in one refund or payout: no exact
    equal in its units, or above its maximum; None when it can."""
    return (adapter.units.refusal(adapter.name, amount, currency)
            or adapter.max_amount.refusal(adapter.name, amount, currency, adapter.units))


@runtime_checkable
class PayoutReader(Protocol):
    """A provider whose payouts can be read by id (every payout maker and lister)."""

    name: str

    async def get_payout(self, payout_id: str) -> ProviderPayout | None:
        """A payout by the provider's id, as it stands now (None: the provider has none)."""


@runtime_checkable
class PayoutExecutor(PayoutReader, Protocol):
    """A provider that can make a payout (a reissue) and find one by our reference; it reads
    the original's status (`get_payout`) before a reissue pays the beneficiary again."""

    async def create_payout(self, order: PayoutOrder, idempotency_key: str) -> ProviderPayout:
        """Asks for the payout, carrying our idempotency key and our payout id as reference."""

    async def find_payout(self, reference: str) -> FoundPayout | None:
        """Looks a payout up by our reference (the check before any create)."""


@runtime_checkable
class ReferenceRules(Protocol):
    """A provider that takes our refund_request_id as its own refund's id, under rules of
    its own: a request id it cannot take is refused where requests enter, not declined at
    the create after approvals."""

    def reference_refusal(self, reference: str) -> str | None:
        """Why the provider cannot take `reference` as a refund's id, or None."""


@runtime_checkable
class NotificationRecorder(Protocol):
    """A provider with no payment lookup, whose payment and refund notifications the relay
    records (before routing) as the source of its charges."""

    async def record_notification(self, event: PaymentEvent | ProviderEvent) -> None:
        """Keeps what the notification said about its payment; idempotent per event."""


@runtime_checkable
class BatchedNotifications(Protocol):
    """A provider whose one request may carry several events, each signed on its own (Adyen):
    the relay takes each as a delivery of its own."""

    def split_batch(self, body: bytes) -> list[bytes] | None:
        """One body per event when `body` carries several; None otherwise (read whole)."""


@runtime_checkable
class RefundLister(Protocol):
    """Providers whose refunds can be listed, for reconciliation (webhooks-only ones cannot)."""

    name: str

    def list_refunds(self, since: datetime, until: datetime,
                     starting_after: str | None = None) -> AsyncGenerator[ListedRefund | UnmappedListing]:
        """Every refund created in [since, until), newest first, page by page as the caller
        reads; `starting_after` (an object id) resumes after that object. A refund whose
        status the adapter cannot map may come as an UnmappedListing (a break, not a stop)."""

    async def get_refund(self, refund_id: str, charge_id: str) -> ProviderRefund | None:
        """One refund by the provider's id as it stands now (`charge_id`: its charge, for
        providers that read refunds through it); None when the provider has none: what an
        approved break re-reads before it moves money on a word found days before."""


@runtime_checkable
class PayoutLister(PayoutReader, Protocol):
    """Providers whose payouts can be listed, for reconciliation's payout breaks; an approved
    payout break reads the payout (`get_payout`) before it reverses anything."""

    def list_payouts(self, since: datetime, until: datetime,
                     starting_after: str | None = None) -> AsyncGenerator[ListedPayout | UnmappedListing]:
        """Every payout created in [since, until), newest first, page by page as the caller
        reads; `starting_after` (an object id) resumes after that object. As for refunds,
        an unmappable status may come as an UnmappedListing."""


class WebhooksOnly:
    """Base of adapters whose provider API is not reachable here: every API call is refused
    as unsupported (the case is rejected, nothing moves) instead of being guessed."""

    name: str

    def _unsupported(self, call: str) -> ProviderUnsupported:
        return ProviderUnsupported(f"{self.name}: {call} is not supported (webhooks only)")

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        raise self._unsupported("reading a charge")

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        raise self._unsupported("creating a refund")

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        raise self._unsupported("looking a refund up")
