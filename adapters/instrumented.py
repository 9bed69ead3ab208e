"""A provider adapter observed per call: a latency sample and an error count for every call,
and, for the calls about a refund case, a span naming the case and the outcome.

The HTTP requests themselves are traced by OpenTelemetry's httpx instrumentation (client
spans, and the `traceparent` the provider receives; adapters/providers/http.py); the spans
made here are their parents and say what the requests meant: which case, and what came back
(the refund's status, found or not, or the class of the error).
"""

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TypeVar, cast

from opentelemetry import trace

from adapters.metrics import PROVIDER_CALL_ERRORS, PROVIDER_CALL_SECONDS, VERIFY_OUTCOMES
from adapters.providers.base import PayoutExecutor, PayoutReader, ProviderAdapter
from domain.models import ChargeSnapshot, ProviderEvent, ProviderRefund, RefundRequest
from domain.payments import PaymentEvent
from domain.payouts import FoundPayout, PayoutEvent, PayoutOrder, ProviderPayout

T = TypeVar("T")
tracer = trace.get_tracer(__name__)


def refund_outcome(refund: ProviderRefund | None) -> str:
    return "not_found" if refund is None else str(refund.status)


class InstrumentedProvider:
    """Same interface as the adapter it wraps; every call observed, nothing changed."""

    def __init__(self, inner: ProviderAdapter) -> None:
        self._inner = inner
        self.name = inner.name
        self.event_types = inner.event_types
        self.max_amount = inner.max_amount
        self.units = inner.units

    async def _observe(self, operation: str, call: Awaitable[T]) -> T:
        with PROVIDER_CALL_SECONDS.labels(self.name, operation).time():
            try:
                return await call
            except Exception as exc:
                PROVIDER_CALL_ERRORS.labels(self.name, operation, type(exc).__name__).inc()
                raise

    @contextlib.contextmanager
    def _about_case(self, operation: str, case_id: str) -> Iterator[trace.Span]:
        """The span of a call about a case; its `outcome` is set by the caller or, when the
        call raises, is the error's class."""
        with tracer.start_as_current_span(
                f"provider.{operation}", attributes={"provider": self.name, "operation": operation,
                                                     "refund_request_id": case_id}) as span:
            try:
                yield span
            except Exception as exc:
                span.set_attribute("outcome", type(exc).__name__)
                raise

    async def _refund_call(self, operation: str, case_id: str, call: Awaitable[T],
                           outcome: Callable[[T], str]) -> T:
        with self._about_case(operation, case_id) as span:
            result = await self._observe(operation, call)
            span.set_attribute("outcome", outcome(result))
            return result

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        return await self._observe("get_charge", self._inner.get_charge(charge_id))

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        return await self._refund_call("create_refund", request.refund_request_id,
                                       self._inner.create_refund(request, idempotency_key), refund_outcome)

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        """The verify-state lookup; its outcome (found, not found, error) is counted too."""
        try:
            found = await self._refund_call("find_refund", request.refund_request_id,
                                            self._inner.find_refund(request), refund_outcome)
        except Exception:
            VERIFY_OUTCOMES.labels(self.name, "error").inc()
            raise
        VERIFY_OUTCOMES.labels(self.name, "found" if found is not None else "not_found").inc()
        return found

    def parse_webhook(self, headers: Mapping[str, str], body: bytes,
                      now: float) -> ProviderEvent | PayoutEvent | PaymentEvent:
        return self._inner.parse_webhook(headers, body, now)


class InstrumentedPayoutReads(InstrumentedProvider):
    """An instrumented provider whose payouts can be read (`PayoutReader`): the runbook's
    read before a reversal reaches a lister (Stripe) behind the wrapper too."""

    def __init__(self, inner: PayoutReader) -> None:
        super().__init__(cast(ProviderAdapter, inner))
        self._reads = inner

    async def get_payout(self, payout_id: str) -> ProviderPayout | None:
        return await self._observe("get_payout", self._reads.get_payout(payout_id))


class InstrumentedPayouts(InstrumentedPayoutReads):
    """An instrumented provider that makes payouts: only these pass as `PayoutExecutor`, so
    the reissue's "cannot make payouts" decline holds behind the wrapper too."""

    def __init__(self, inner: PayoutExecutor) -> None:
        super().__init__(inner)
        self._payouts = inner

    async def create_payout(self, order: PayoutOrder, idempotency_key: str) -> ProviderPayout:
        return await self._observe("create_payout", self._payouts.create_payout(order, idempotency_key))

    async def find_payout(self, reference: str) -> FoundPayout | None:
        return await self._observe("find_payout", self._payouts.find_payout(reference))


def instrument(providers: Mapping[str, ProviderAdapter]) -> dict[str, ProviderAdapter]:
    """Wraps every adapter for the worker (the relay only parses webhooks); the caller
    keeps closing the originals."""
    return {name: InstrumentedPayouts(p) if isinstance(p, PayoutExecutor)
            else InstrumentedPayoutReads(p) if isinstance(p, PayoutReader) else InstrumentedProvider(p)
            for name, p in providers.items()}
