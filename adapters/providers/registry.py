"""Builds the provider adapters that the settings configure."""

from adapters.config import Settings
from adapters.providers.base import ProviderAdapter
from adapters.providers.sandbox import SandboxProvider


def build_providers(settings: Settings) -> dict[str, ProviderAdapter]:
    """Every provider with credentials in the environment; the sandbox needs its secret."""
    providers: dict[str, ProviderAdapter] = {}
    if settings.sandbox_webhook_secret is not None:
        providers["sandbox"] = SandboxProvider(
            settings.sandbox_base_url(),
            webhook_secrets=settings.sandbox_webhook_secret.get_secret_value().split(","),
            api_key=settings.sandbox_api_key.get_secret_value() if settings.sandbox_api_key else None,
            timeout_seconds=settings.provider_http_timeout_seconds,
            tolerance_seconds=settings.webhook_tolerance_seconds,
        )
    return providers


async def close_providers(providers: dict[str, ProviderAdapter]) -> None:
    for provider in providers.values():
        closer = getattr(provider, "aclose", None)
        if closer is not None:
            await closer()
