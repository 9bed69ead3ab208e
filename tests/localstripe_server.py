"""Runs the third-party localstripe server for the tests: `python -m tests.localstripe_server PORT
[--stock]`. With `--stock` its API is as released (the two additions below left out): how an
outside tester's localstripe answers.

Its own `start()` binds every interface and pickles its state to a shared /tmp file; here
it binds 127.0.0.1 only and keeps its state in memory, so parallel runs cannot mix.
Its refund and payout lists lack Stripe's documented `created` filter (gte/gt/lt/lte),
which reconciliation pages by; it is added here, newest first by `created` as Stripe orders.
Its charges lack Stripe's `disputed` flag: added, true for a charge paid with Stripe's
documented dispute test card (`pm_card_createDispute`, 4000 0000 0000 0259), as in test mode.
"""

import sys
from typing import Any

from aiohttp import web
from localstripe import resources, server

DISPUTE_CARD = "4000000000000259"
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


def _with_dispute_card(original: Any) -> Any:
    def test_article(cls: Any, id: str) -> Any:
        if id == "pm_card_createDispute":
            return resources.PaymentMethod(type="card", card={"number": DISPUTE_CARD, "exp_month": "12",
                                                              "exp_year": "2030", "cvc": "123"})
        return original(id)
    return classmethod(test_article)


def _disputed(charge: Any) -> bool:
    """Stripe's `disputed` on a charge: here, whether it was paid with the dispute test card."""
    method = resources.PaymentMethod._api_retrieve(charge.payment_method)
    return getattr(method, "_card_number", None) == DISPUTE_CARD


def main() -> None:
    resources.Store.dump_to_disk = lambda self: None
    resources.Store.try_load_from_disk = lambda self: None
    if "--stock" not in sys.argv:
        _add_documented_fields()
    web.run_app(server.app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


def _add_documented_fields() -> None:
    for listed in (resources.Refund, resources.Payout):
        listed._api_list_all = _list_in_window(listed._api_list_all)
    resources.PaymentMethod._try_get_canonical_test_article = _with_dispute_card(
        resources.PaymentMethod._try_get_canonical_test_article)
    resources.Charge.disputed = property(_disputed)


if __name__ == "__main__":
    main()
