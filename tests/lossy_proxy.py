"""A loopback HTTP proxy that loses answers on request: the armed request reaches the real
server, which acts, but its response never comes back (the client times out). That is the
ambiguous outcome verify-state exists for, injected at the HTTP boundary. It can also
answer a request itself with a refusal (a revoked key, a lookup the provider refuses) and
hand a request on only after the client gave up (a provider still processing a create)."""

import asyncio
import json
from collections import Counter, defaultdict

import httpx
from starlette.types import Receive, Scope, Send


class LossyProxy:
    """ASGI app forwarding everything to `target`, dropping the answers it was told to."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.armed: Counter[tuple[str, str]] = Counter()
        self.lost: list[bytes] = []
        self.refusals: defaultdict[tuple[str, str], list[tuple[int, str, str | None]]] = defaultdict(list)
        self.refused: list[tuple[str, str, int]] = []
        self.late: dict[tuple[str, str], float] = {}

    def lose_next(self, method: str, path: str) -> None:
        self.armed[(method, path)] += 1

    def refuse_next(self, method: str, path: str, *statuses: int,
                    error_type: str = "invalid_request_error", code: str | None = None) -> None:
        """The next requests to `path` are answered with these statuses, one each, unforwarded,
        with a Stripe-shaped error of `error_type` (and `code`, when given)."""
        self.refusals[(method, path)].extend((status, error_type, code) for status in statuses)

    def act_late(self, method: str, path: str, after_seconds: float) -> None:
        """The next request to `path` reaches the server only `after_seconds` after the
        client gave up on it: the provider acts on a create whose answer nobody awaits."""
        self.late[(method, path)] = after_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        key = (scope["method"], scope["path"])
        if self.refusals[key]:
            status, error_type, code = self.refusals[key].pop(0)
            self.refused.append((*key, status))
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            error = {"type": error_type, "message": f"refused with {status}"}
            if code:
                error["code"] = code
            await send({"type": "http.response.body", "body": json.dumps({"error": error}).encode()})
            return
        late = self.late.pop(key, None)
        if late is not None:
            await self._disconnected(receive)
            await asyncio.sleep(late)
        answer = await self._forward(scope, body)
        if late is not None:
            self.lost.append(answer.content)
            return
        if self.armed[key] > 0:
            self.armed[key] -= 1
            self.lost.append(answer.content)
            await self._disconnected(receive)  # hold until the client gives up
            return
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": [(b"content-type", answer.headers.get("content-type", "").encode())]})
        await send({"type": "http.response.body", "body": answer.content})

    async def _forward(self, scope: Scope, body: bytes) -> httpx.Response:
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"]
        url = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        async with httpx.AsyncClient(base_url=self.target, timeout=30) as http:
            return await http.request(scope["method"], url, content=body, headers=headers)

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
