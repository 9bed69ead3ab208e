"""A provider adapter wrapped with a span, a latency sample and an error count per call.

opentelemetry-instrumentation-httpx is not installable here, so provider calls are traced
at the adapter boundary (one span per get_charge / create_refund / find_refund) rather
than per HTTP request; that boundary is also where the outcome means something.
"""

from collections.abc import Awaitable, Mapping
from typing import TypeVar

from opentelemetry import trace

from adapters.metrics import PROVIDER_CALL_ERRORS, PROVIDER_CALL_SECONDS, VERIFY_OUTCOMES
from adapters.providers.base import PayoutExecutor, ProviderAdapter, ProviderUnsupported
from domain.models import ChargeSnapshot, ProviderEvent, ProviderRefund, RefundRequest
from domain.payments import PaymentEvent
from domain.payouts import PayoutEvent, PayoutOrder, ProviderPayout

T = TypeVar("T")
tracer = trace.get_tracer(__name__)


class InstrumentedProvider:
    """Same interface as the adapter it wraps; every call observed, nothing changed."""

    def __init__(self, inner: ProviderAdapter) -> None:
        self._inner = inner
        self.name = inner.name
        self.event_types = inner.event_types
        self.max_amount = inner.max_amount

    async def _observe(self, operation: str, call: Awaitable[T], case_id: str | None = None) -> T:
        attributes = {"provider": self.name, "operation": operation}
        if case_id:
            attributes["refund_request_id"] = case_id
        with tracer.start_as_current_span(f"provider.{operation}", kind=trace.SpanKind.CLIENT,
                                          attributes=attributes), \
                PROVIDER_CALL_SECONDS.labels(self.name, operation).time():
            try:
                return await call
            except Exception as exc:
                PROVIDER_CALL_ERRORS.labels(self.name, operation, type(exc).__name__).inc()
                raise

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        return await self._observe("get_charge", self._inner.get_charge(charge_id))

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        return await self._observe("create_refund", self._inner.create_refund(request, idempotency_key),
                                   request.refund_request_id)

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        """The verify-state lookup; its outcome (found, not found, error) is counted too."""
        try:
            found = await self._observe("find_refund", self._inner.find_refund(request),
                                        request.refund_request_id)
        except Exception:
            VERIFY_OUTCOMES.labels(self.name, "error").inc()
            raise
        VERIFY_OUTCOMES.labels(self.name, "found" if found is not None else "not_found").inc()
        return found

    def _payouts(self) -> PayoutExecutor:
        if not isinstance(self._inner, PayoutExecutor):
            raise ProviderUnsupported(f"{self.name}: making payouts is not supported")
        return self._inner

    async def create_payout(self, order: PayoutOrder, idempotency_key: str) -> ProviderPayout:
        return await self._observe("create_payout", self._payouts().create_payout(order, idempotency_key))

    async def find_payout(self, reference: str) -> ProviderPayout | None:
        return await self._observe("find_payout", self._payouts().find_payout(reference))

    def parse_webhook(self, headers: Mapping[str, str], body: bytes,
                      now: float) -> ProviderEvent | PayoutEvent | PaymentEvent:
        return self._inner.parse_webhook(headers, body, now)


def instrument(providers: Mapping[str, ProviderAdapter]) -> dict[str, ProviderAdapter]:
    """Wraps every adapter for the worker (the relay only parses webhooks); the caller
    keeps closing the originals."""
    return {name: InstrumentedProvider(p) for name, p in providers.items()}
