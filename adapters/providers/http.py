"""The one HTTP call every httpx-based adapter makes, sorted by what it says about the money.

A timeout, a dropped connection, a 5xx or a 429 may hide a refund the provider made:
`ProviderOutcomeUnknown`, so the workflow verifies before it submits again. Every other
answer is returned for the adapter to read.
"""

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import httpx
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

from adapters.providers.base import (
    ProviderConfigurationRefused,
    ProviderDeclined,
    ProviderError,
    ProviderOutcomeUnknown,
)

CONFIGURATION_STATUSES = frozenset({401, 403})


def provider_client(**options: Any) -> httpx.AsyncClient:
    """An httpx client for a provider's API, traced by OpenTelemetry's httpx instrumentation:
    a client span per request, and the `traceparent` header that lets the provider's side
    join the case's trace."""
    client = httpx.AsyncClient(**options)
    HTTPXClientInstrumentor.instrument_client(client)
    return client


async def send(http: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Sends one request; raises ProviderOutcomeUnknown when the outcome cannot be known."""
    try:
        response = await http.request(method, path, **kwargs)
    except httpx.TimeoutException as exc:
        raise ProviderOutcomeUnknown(f"{method} {path}: timed out") from exc
    except httpx.TransportError as exc:
        raise ProviderOutcomeUnknown(f"{method} {path}: {type(exc).__name__}") from exc
    if response.status_code >= 500 or response.status_code == 429:
        raise ProviderOutcomeUnknown(f"{method} {path}: HTTP {response.status_code}")
    return response


def refusal(status: int, what: str) -> ProviderError:
    """The error a 4xx answer means: 401/403 a configuration to fix, 409 (a conflicting
    request in flight, a reference already used) an outcome to verify, else a refusal."""
    if status in CONFIGURATION_STATUSES:
        return ProviderConfigurationRefused(what)
    if status == 409:
        return ProviderOutcomeUnknown(what)
    return ProviderDeclined(what)


def raise_for_refusal(response: httpx.Response) -> None:
    """Raises what a 4xx answer means (see `refusal`); any other answer passes."""
    if response.status_code >= 400:
        raise refusal(response.status_code, f"{response.request.method} {response.request.url.path}: "
                                             f"HTTP {response.status_code} {response.text[:300]}")


class JsonApi:
    """A provider's JSON API over httpx: each call is an answer, a refusal or an unknown
    outcome. Decimals are parsed as Decimal, so major-unit amounts convert exactly."""

    def __init__(self, base_url: str, *, headers: Mapping[str, str], timeout_seconds: float) -> None:
        self._http = provider_client(base_url=base_url, headers=dict(headers), timeout=timeout_seconds)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        """The JSON answer; None for a 404 where the caller asks what exists (`missing_ok`)."""
        response = await send(self._http, method, path, **kwargs)
        if missing_ok and response.status_code == 404:
            return None
        raise_for_refusal(response)
        return json.loads(response.content, parse_float=Decimal)


class JsonApiAdapter:
    """Base of the adapters that call a provider's JSON API through one `JsonApi`, closed
    with the adapter."""

    _api: JsonApi

    async def aclose(self) -> None:
        await self._api.aclose()
