"""Builds the provider adapters that the settings configure."""

from collections.abc import Callable, Mapping

from adapters.config import Settings, comma_list, secret_list
from adapters.db import Store
from adapters.db.payments import PaymentNotificationRepository
from adapters.providers.adyen import AdyenProvider
from adapters.providers.base import ProviderAdapter
from adapters.providers.cashfree import CashfreeApiProvider, CashfreeProvider
from adapters.providers.rainforest import RainforestApiProvider, RainforestProvider
from adapters.providers.sandbox import SandboxProvider
from adapters.providers.stripe import StripeProvider

REFUND_IDS_AS_WRITTEN: Mapping[str, Callable[[str], str]] = {"adyen": str.upper}
"""How a provider writes its refund ids, where a person's paste in another letter case names
the same refund: Adyen's pspReference is upper-case letters and digits."""


def refund_id_as_written(provider: str, typed: str) -> str:
    """A refund id a person typed, as `provider` writes it (so its notifications match it)."""
    written = REFUND_IDS_AS_WRITTEN.get(provider)
    return typed if written is None else written(typed)


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
    timeout = settings.provider_http_timeout_seconds
    if settings.rainforest_webhook_secret is not None:
        rainforest_secrets = secret_list(settings.rainforest_webhook_secret)
        merchant_ids = comma_list(settings.rainforest_merchant_ids)
        # Without API settings the adapter stays webhooks-only (API calls refused, not guessed).
        providers["rainforest"] = (
            RainforestApiProvider(api_base=settings.rainforest_api_base,
                                  api_key=settings.rainforest_api_key.get_secret_value(),
                                  webhook_secrets=rainforest_secrets, timeout_seconds=timeout,
                                  tolerance_seconds=tolerance, merchant_ids=merchant_ids)
            if settings.rainforest_api_base and settings.rainforest_api_key
            else RainforestProvider(webhook_secrets=rainforest_secrets, tolerance_seconds=tolerance,
                                    merchant_ids=merchant_ids))
    if settings.cashfree_webhook_secret is not None:
        cashfree_secrets = secret_list(settings.cashfree_webhook_secret)
        providers["cashfree"] = (
            CashfreeApiProvider(api_base=settings.cashfree_api_base, client_id=settings.cashfree_client_id,
                                client_secret=settings.cashfree_client_secret.get_secret_value(),
                                merchant_account=settings.cashfree_merchant_account,
                                webhook_secrets=cashfree_secrets, timeout_seconds=timeout,
                                tolerance_seconds=tolerance)
            if settings.cashfree_api_base and settings.cashfree_client_id and settings.cashfree_client_secret
            else CashfreeProvider(webhook_secrets=cashfree_secrets, tolerance_seconds=tolerance))
    if settings.adyen_hmac_keys is not None:
        book = (PaymentNotificationRepository(store.database, "adyen",
                                              auto_capture=settings.adyen_auto_capture)
                if store is not None else None)
        providers["adyen"] = AdyenProvider(
            hmac_keys=secret_list(settings.adyen_hmac_keys), api_base=settings.adyen_api_base,
            api_key=settings.adyen_api_key.get_secret_value() if settings.adyen_api_key else None,
            timeout_seconds=settings.provider_http_timeout_seconds,
            charges=book.charge if book else None, record=book.record if book else None,
            merchant_accounts=comma_list(settings.adyen_merchant_accounts),
            submit_deadline_seconds=settings.submit_timeout_seconds)
    return providers


async def close_providers(providers: dict[str, ProviderAdapter]) -> None:
    for provider in providers.values():
        closer = getattr(provider, "aclose", None)
        if closer is not None:
            await closer()
