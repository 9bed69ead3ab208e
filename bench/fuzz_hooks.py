"""schemathesis hooks of the reliability suite's schema fuzz, loaded by `st run` through
SCHEMATHESIS_HOOKS=bench.fuzz_hooks. A fuzzed refund request names no charge the provider
holds, so alone the fuzz never gets past validation; these hooks steer a share of its calls
onto real things (what bench.chaos seeded, passed in FUZZ_STEERING): a refund request then
names a captured charge with a currency and an amount drawn from valid and refused ones, and a
call on a case (approve, deny, reissue, provider wait, confirmation, reads) names a real case.
The other calls keep the fuzzer's values, so bad input is still tried."""

import json
import os
import random
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import schemathesis

from domain.models import RefundReason

FUZZ_STEERING = "FUZZ_STEERING"
CASE_PARAMETER = "refund_request_id"
REQUESTS_PATH = "/v1/refund-requests"


@dataclass
class Steering:
    """What the suite seeded and how often a call is steered onto it."""

    charges: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    amounts: list[int] = field(default_factory=list)
    currencies: list[str] = field(default_factory=list)
    merchant_account: str = "acct_1"
    share: float = 0.0
    seed: int = 0

    def as_env(self) -> dict[str, str]:
        return {FUZZ_STEERING: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> "Steering":
        """Unset: nothing is steered (the hooks are then a no-op)."""
        return cls(**json.loads(os.environ.get(FUZZ_STEERING, "{}")))


STEERING = Steering.from_env()
rng = random.Random(STEERING.seed)
created: list[str] = []
"""Cases this run's own requests created: later calls may act on them too."""


def steered_request(body: object) -> dict[str, Any]:
    """A request on a real charge, the amount and currency drawn from valid and refused ones.
    A quarter keep the rest of the fuzzer's body (its id, reason and evidence: a repeat, a
    refused reason or evidence is still tried); the others are whole, with a fresh id."""
    real = {"provider": "sandbox", "charge_id": rng.choice(STEERING.charges),
            "amount": rng.choice(STEERING.amounts), "currency": rng.choice(STEERING.currencies),
            "merchant_account": STEERING.merchant_account}
    if rng.random() < 0.25 and isinstance(body, dict):
        return {**body, **real}
    return {**real, CASE_PARAMETER: f"fuzz-{uuid.uuid4().hex[:16]}",  # fresh in every run
            "reason": rng.choice(list(RefundReason)).value, "evidence": {"order_id": "fuzz"}}


# A valid body for each action on a case, by the path's last part: three steered calls in
# four send one, so the decision itself is reached, not only the body's validation.
ACTION_BODIES: dict[str, Callable[[], dict[str, Any]]] = {
    "approvals": lambda: {"decision": rng.choice(["approve", "deny"]), "reason": "fuzz"},
    "reissue": lambda: {"method": rng.choice(["provider", "bank_transfer"]), "reason": "fuzz"},
    "provider-wait": lambda: {"provider_shows": rng.choice(["refunded", "not_refunded"]),
                              "provider_refund_id": "re_fuzz", "reason": "fuzz"},
    "confirmation": lambda: {"paid": rng.choice([True, False]), "reason": "fuzz"},
}


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case[Any],
                kwargs: dict[str, Any]) -> None:
    """Steers `STEERING.share` of the calls onto a seeded charge or case."""
    if rng.random() >= STEERING.share:
        return
    path = case.operation.path
    if case.method.upper() == "POST" and path == REQUESTS_PATH and STEERING.charges:
        case.body = steered_request(case.body)
    elif f"{{{CASE_PARAMETER}}}" in path and (known := STEERING.cases + created):
        case.path_parameters = {**(case.path_parameters or {}), CASE_PARAMETER: rng.choice(known)}
        action = ACTION_BODIES.get(path.rsplit("/", 1)[-1])
        if action is not None and case.method.upper() == "POST" and rng.random() < 0.75:
            case.body = action()


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case[Any],
               response: schemathesis.Response) -> None:
    """Remembers each case a request of this run created."""
    if (case.method.upper() == "POST" and case.operation.path == REQUESTS_PATH
            and response.status_code == 202 and isinstance(case.body, dict)):
        created.append(str(case.body.get(CASE_PARAMETER)))
