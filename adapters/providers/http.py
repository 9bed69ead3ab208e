"""The one HTTP call every httpx-based adapter makes, sorted by what it says about the money.

A timeout, a dropped connection, a 5xx, a redirect, a 408 or a 429 may hide a refund the
provider made: `ProviderOutcomeUnknown`, so the workflow verifies before it submits again.
Every other answer (a 2xx, a refusing 4xx) is returned for the adapter to read.
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
UNKNOWN_4XX = frozenset({408, 409, 429})
"""4xx answers that refuse nothing: the request timed out on the way in, another request
with its key is in flight, or we were rate limited."""


def outcome_unknown(status: int) -> bool:
    """Whether an answer leaves the outcome unknown: anything but a 2xx or a refusing 4xx
    (only a 4xx says the provider did not act; a redirect or an unreadable 2xx does not)."""
    return not (200 <= status < 300 or 400 <= status < 500) or status in UNKNOWN_4XX


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
    if outcome_unknown(response.status_code):
        raise ProviderOutcomeUnknown(f"{method} {path}: HTTP {response.status_code}")
    return response


def refusal(status: int, what: str) -> ProviderError:
    """The error a refusing 4xx means (`outcome_unknown` sorted out the others): 401/403 a
    configuration to fix, else a refusal."""
    if status in CONFIGURATION_STATUSES:
        return ProviderConfigurationRefused(what)
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
