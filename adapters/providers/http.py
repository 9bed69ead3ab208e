"""The one HTTP call every httpx-based adapter makes, sorted by what it says about the money.

A timeout, a dropped connection, a 5xx or a 429 may hide a refund the provider made:
`ProviderOutcomeUnknown`, so the workflow verifies before it submits again. Every other
answer is returned for the adapter to read.
"""

from typing import Any

import httpx

from adapters.providers.base import ProviderOutcomeUnknown


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
