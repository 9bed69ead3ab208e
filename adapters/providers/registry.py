"""Builds the provider adapters that the settings configure."""

from adapters.config import Settings
from adapters.payment_book import PaymentBook
from adapters.providers.adyen import AdyenProvider
from adapters.providers.base import ProviderAdapter
from adapters.providers.cashfree import CashfreeProvider
from adapters.providers.rainforest import RainforestProvider
from adapters.providers.sandbox import SandboxProvider
from adapters.providers.signing import secret_list
from adapters.providers.stripe import StripeProvider
from adapters.store import Store


def build_providers(settings: Settings, store: Store | None = None) -> dict[str, ProviderAdapter]:
    """Every provider with credentials in the environment; each needs its webhook secret.
    With the store, Adyen's charges come from its recorded notifications (no lookup API)."""
    providers: dict[str, ProviderAdapter] = {}
    tolerance = settings.webhook_tolerance_seconds
    if settings.sandbox_webhook_secret is not None:
        providers["sandbox"] = SandboxProvider(
            settings.sandbox_base_url(),
            webhook_secrets=secret_list(settings.sandbox_webhook_secret),
            api_key=settings.sandbox_api_key.get_secret_value() if settings.sandbox_api_key else None,
            timeout_seconds=settings.provider_http_timeout_seconds, tolerance_seconds=tolerance,
        )
    if settings.stripe_api_key is not None and settings.stripe_webhook_secret is not None:
        providers["stripe"] = StripeProvider(
            settings.stripe_api_key.get_secret_value(),
            webhook_secrets=secret_list(settings.stripe_webhook_secret),
            api_base=settings.stripe_api_base, merchant_account=settings.stripe_merchant_account,
            timeout_seconds=settings.provider_http_timeout_seconds, tolerance_seconds=tolerance,
        )
    if settings.rainforest_webhook_secret is not None:
        providers["rainforest"] = RainforestProvider(
            webhook_secrets=secret_list(settings.rainforest_webhook_secret), tolerance_seconds=tolerance)
    if settings.cashfree_webhook_secret is not None:
        providers["cashfree"] = CashfreeProvider(
            webhook_secrets=secret_list(settings.cashfree_webhook_secret), tolerance_seconds=tolerance)
    if settings.adyen_hmac_keys is not None:
        book = (PaymentBook(store, "adyen", auto_capture=settings.adyen_auto_capture)
                if store is not None else None)
        providers["adyen"] = AdyenProvider(
            hmac_keys=secret_list(settings.adyen_hmac_keys), api_base=settings.adyen_api_base,
            api_key=settings.adyen_api_key.get_secret_value() if settings.adyen_api_key else None,
            timeout_seconds=settings.provider_http_timeout_seconds,
            charges=book.charge if book else None, record=book.record if book else None)
    return providers


async def close_providers(providers: dict[str, ProviderAdapter]) -> None:
    for provider in providers.values():
        closer = getattr(provider, "aclose", None)
        if closer is not None:
            await closer()
