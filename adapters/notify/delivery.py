"""What a channel is, and what its failures mean for a retry.

`DeliveryFailed`: the notice certainly did not arrive (no connection, an error status),
so the next attempt may send it. `DeliveryUncertain`: it may have arrived (the answer was
lost), so it is never sent again: at most one notice per event and channel.
"""

from typing import Any, Protocol

import httpx

from adapters.notify.message import Message
from adapters.tls import client_tls

RETRY_SOON = frozenset({408, 409, 423, 425, 429})
"""4xx answers that a retry within minutes may well see otherwise (timeout, conflict,
locked, too early, rate limited)."""


class DeliveryFailed(Exception):
    """Not delivered as far as the answer says; safe to send again. `status`: the HTTP
    status that said so, if any (a 5xx from a gateway may follow a backend that acted:
    where a retry can look first, as a ticket's search can, it looks). `refused`: the peer
    refused it in a way the next minutes will not change (a revoked webhook's 404 or 410,
    credentials 401/403, a payload it rejects; an SMTP 5xx): tried again only on the
    sweeper's slower schedule, so one broken channel holds up no later notice of a case."""

    def __init__(self, message: str, *, status: int | None = None, refused: bool | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.refused = (status is not None and 400 <= status < 500 and status not in RETRY_SOON
                        if refused is None else refused)


class DeliveryUncertain(Exception):
    """Possibly delivered; sending again could duplicate it."""


class Channel(Protocol):
    name: str

    def accepts(self, message: Message) -> bool:
        """Whether this channel carries this kind of message at all."""

    async def send(self, message: Message) -> str | None:
        """Delivers once; returns the channel's id for it (message id, ticket number)."""


NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError,
            httpx.UnsupportedProtocol)
"""Transport errors raised before any of the request reached the peer: no connection, an
egress proxy (`HTTPS_PROXY`) refusing the tunnel, a URL no transport serves."""


async def send_http(method: str, url: str, *, timeout: float, auth: httpx.Auth | None = None,
                    **kwargs: Any) -> httpx.Response:
    """One HTTP call whose failure is classified for the retry decision. The status is read
    before the body: a body that cannot be decoded (a broken gzip) leaves an error status a
    failure, and makes a success uncertain (it was done, its answer unread)."""
    try:
        async with httpx.AsyncClient(timeout=timeout, verify=client_tls(), auth=auth) as http:
            response = await http.send(http.build_request(method, url, **kwargs), stream=True)
            try:
                await response.aread()
            except httpx.DecodingError as exc:
                if response.is_success:
                    raise DeliveryUncertain(f"the answer could not be read: {exc!r}") from exc
                raise DeliveryFailed(f"HTTP {response.status_code} (its body unreadable)",
                                     status=response.status_code) from exc
            finally:
                await response.aclose()
    except NOT_SENT as exc:
        raise DeliveryFailed(f"could not connect: {exc!r}") from exc
    except httpx.TransportError as exc:
        raise DeliveryUncertain(f"the answer was lost: {exc!r}") from exc
    if not response.is_success:  # a 3xx too: redirects are not followed, so nothing was posted
        raise DeliveryFailed(f"HTTP {response.status_code}: {response.text[:300]}",
                             status=response.status_code)
    return response
