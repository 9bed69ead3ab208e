"""A loopback HTTP proxy that loses answers on request: the armed request reaches the real
server, which acts, but its response never comes back (the client times out). That is the
ambiguous outcome verify-state exists for, injected at the HTTP boundary."""

from collections import Counter

import httpx
from starlette.types import Receive, Scope, Send


class LossyProxy:
    """ASGI app forwarding everything to `target`, dropping the answers it was told to."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.armed: Counter[tuple[str, str]] = Counter()
        self.lost: list[bytes] = []

    def lose_next(self, method: str, path: str) -> None:
        self.armed[(method, path)] += 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"]
        url = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        async with httpx.AsyncClient(base_url=self.target, timeout=30) as http:
            answer = await http.request(scope["method"], url, content=body, headers=headers)
        key = (scope["method"], scope["path"])
        if self.armed[key] > 0:
            self.armed[key] -= 1
            self.lost.append(answer.content)
            while (await receive())["type"] != "http.disconnect":  # hold until the client gives up
                pass
            return
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": [(b"content-type", answer.headers.get("content-type", "").encode())]})
        await send({"type": "http.response.body", "body": answer.content})
