"""Runs the third-party localstripe server for the tests: `python -m tests.localstripe_server PORT`.

Its own `start()` binds every interface and pickles its state to a shared /tmp file; here
it binds 127.0.0.1 only and keeps its state in memory, so parallel runs cannot mix.
Its refund and payout lists lack Stripe's documented `created` filter (gte/gt/lt/lte),
which reconciliation pages by; it is added here, newest first by `created` as Stripe orders.
"""

import sys
from typing import Any

from aiohttp import web
from localstripe import resources, server

_BOUNDS = {"gte": int.__ge__, "gt": int.__gt__, "lt": int.__lt__, "lte": int.__le__}


def _list_in_window(original: Any) -> Any:
    def list_all(cls: Any, /, url: str, created: dict[str, str] | None = None, **kwargs: Any) -> Any:
        listed = original(url, **kwargs)
        bounds = {op: int(value) for op, value in (created or {}).items()}
        listed._list = sorted((r for r in listed._list
                               if all(_BOUNDS[op](int(r.created), v) for op, v in bounds.items())),
                              key=lambda r: int(r.created), reverse=True)
        return listed
    return classmethod(list_all)


def main() -> None:
    resources.Store.dump_to_disk = lambda self: None
    resources.Store.try_load_from_disk = lambda self: None
    for listed in (resources.Refund, resources.Payout):
        listed._api_list_all = _list_in_window(listed._api_list_all)
    web.run_app(server.app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
