"""The sandbox payment provider: a Stripe-shaped HTTP service with scripted faults.

It deliberately does NOT deduplicate by idempotency key (unless configured to), so the
orchestrator must prove its own exactly-once. Faults cover what real providers do to
us: timeouts after success, 5xx before or after success, duplicate, delayed and
out-of-order signed webhooks, and late failure of a refund that had succeeded. Payouts
are made paid and can be failed, settlement-failed or reversed later (signed
`payout.<status>` webhooks with a failure code), as many copies as a retry storm needs.
State lives in SQLite so a restarted dev stack still knows its refunds and payouts.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Header, HTTPException, Query, Request

from adapters.providers.sandbox import sign
from adapters.tls import client_tls
from starters.dev.sandbox_bank import MAX_PAGE, SandboxBank, new_id
from starters.dev.sandbox_models import (
    LOOKUP_FAULTS,
    WEBHOOK_FAULTS,
    CaptureIn,
    ChargeIn,
    ConfigIn,
    EventIn,
    FaultIn,
    ImportIn,
    PayoutIn,
    PayoutStatusIn,
    RefundIn,
    StatusIn,
)

log = logging.getLogger("sandbox")

@dataclass
class SandboxState:
    """Runtime knobs and the queue of scripted faults."""

    webhook_url: str | None
    webhook_secret: str
    dedup_idempotency_keys: bool = False
    refund_initial_status: str = "succeeded"
    hold_webhooks: bool = False
    enforce_captured: bool = True
    faults: list[FaultIn] = field(default_factory=list)
    held: list[bytes] = field(default_factory=list)
    stalled: Counter[str] = field(default_factory=Counter)
    """Calls a fault holds right now, as `<point>:<charge>`: the suite kills a worker there."""
    fired: Counter[str] = field(default_factory=Counter)
    """How many calls each fault kind struck (a lookup refusal as `lookup_<status>`): what a
    suite injected, not what it queued."""
    slow_creates: dict[str, tuple[asyncio.Event, asyncio.Event]] = field(default_factory=dict)
    """Per charge with a slow create: (the next create arrived, the slow one has acted)."""


def found(stored: dict[str, Any] | None, what: str, object_id: str) -> dict[str, Any]:
    """The stored object, or the 404 Stripe answers for an id it does not know."""
    if stored is None:
        raise HTTPException(404, f"no such {what} {object_id}")
    return stored


def create_app(*, db_path: str = ":memory:", webhook_url: str | None = None,
               webhook_secret: str, api_key: str | None = None) -> FastAPI:
    """Builds the sandbox provider app; tests and `refunds dev` both use this."""
    bank = SandboxBank(db_path)
    state = SandboxState(webhook_url=webhook_url, webhook_secret=webhook_secret)
    app = FastAPI(title="Sandbox payment provider", version="1")
    app.state.sandbox = state
    app.state.bank = bank
    tasks: set[asyncio.Task[None]] = set()

    def authorise(authorization: str | None) -> None:
        if api_key and authorization != f"Bearer {api_key}":
            raise HTTPException(401, "invalid API key")

    def spawn(coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def deliver(body: bytes) -> None:
        """Delivers like a provider: retries with backoff until a 2xx or give-up."""
        if state.webhook_url is None:
            return
        async with httpx.AsyncClient(timeout=10, verify=client_tls()) as client:
            for attempt in range(8):
                headers = {"Content-Type": "application/json",
                           "Sandbox-Signature": sign(state.webhook_secret, body, int(time.time()))}
                try:
                    response = await client.post(state.webhook_url, content=body, headers=headers)
                    if response.status_code < 300:
                        return
                    log.warning("webhook got HTTP %s", response.status_code)
                except httpx.HTTPError as exc:
                    log.warning("webhook delivery failed: %s", exc)
                await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))

    def emit(event_type: str, obj: dict[str, Any], *, copies: int = 1,
             event_id: str | None = None) -> str:
        event = {"id": event_id or new_id("evt"), "object": "event", "type": event_type,
                 "created": int(time.time()), "data": {"object": obj}}
        body = json.dumps(event).encode()
        fault = (take_fault(WEBHOOK_FAULTS.__contains__, obj.get("charge"))
                 if obj.get("object") == "refund" else None)
        if fault is not None and fault.mode == "webhook_lost":
            return str(event["id"])
        copies += 3 if fault is not None and fault.mode == "webhook_duplicated" else 0
        for _ in range(copies):
            if state.hold_webhooks:
                state.held.append(body)
            elif fault is not None and fault.mode == "webhook_late":
                spawn(later(fault.seconds, lambda: spawn(deliver(body))))
            else:
                spawn(deliver(body))
        return str(event["id"])

    def take_fault(kinds: Callable[[str], bool], charge: str | None) -> FaultIn | None:
        """The first queued fault of the call's kind for its charge (or for any charge)."""
        fault = next((f for f in state.faults
                      if kinds(f.mode) and f.charge in (None, charge)), None)
        if fault is None:
            return None
        state.fired[f"lookup_{fault.status}" if fault.mode == "lookup_status" else fault.mode] += 1
        fault.times -= 1
        if fault.times <= 0:
            state.faults.remove(fault)
        return fault

    async def stall(point: str, charge: str | None, seconds: float) -> None:
        """Holds the call for `seconds`, listed in /_sandbox/stalled meanwhile."""
        key = f"{point}:{charge}"
        state.stalled[key] += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            state.stalled[key] -= 1
            if state.stalled[key] <= 0:
                del state.stalled[key]

    def is_create_fault(mode: str) -> bool:
        return mode not in LOOKUP_FAULTS and mode not in WEBHOOK_FAULTS

    async def later(seconds: float, action: Callable[[], None]) -> None:
        await asyncio.sleep(seconds)
        action()

    def fail_later(refund_id: str) -> None:
        """A late failure: the refund that showed succeeded fails, and says so."""
        refund = bank.refund(refund_id)
        if refund is not None:
            refund.update(status="failed", failure_reason="lost_or_stolen_card")
            bank.put("refunds", refund)
            emit("refund.updated", refund)

    def new_charge(body: ChargeIn) -> dict[str, Any]:
        charge = {"id": body.id or new_id("ch"), "object": "charge", "amount": body.amount,
                  "currency": body.currency.lower(), "merchant_account": body.merchant_account,
                  "captured": body.capture, "amount_captured": body.amount if body.capture else 0,
                  "disputes": body.disputes}
        bank.put("charges", charge)
        return charge

    @app.post("/v1/charges")
    async def create_charge(body: ChargeIn, authorization: str | None = Header(None)) -> dict[str, Any]:
        authorise(authorization)
        return new_charge(body)

    @app.post("/v1/charges/{charge_id}/capture")
    async def capture(charge_id: str, body: CaptureIn,
                      authorization: str | None = Header(None)) -> dict[str, Any]:
        authorise(authorization)
        charge = found(bank.charge(charge_id), "charge", charge_id)
        amount = body.amount or charge["amount"] - charge["amount_captured"]
        if charge["amount_captured"] + amount > charge["amount"]:
            raise HTTPException(400, "capture exceeds the authorised amount")
        charge["amount_captured"] += amount
        charge["captured"] = True
        bank.put("charges", charge)
        return charge

    @app.get("/v1/charges/{charge_id}")
    async def get_charge(charge_id: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        authorise(authorization)
        charge = found(bank.charge(charge_id), "charge", charge_id)
        return charge

    @app.post("/v1/refunds")
    async def create_refund(body: RefundIn, authorization: str | None = Header(None),
                            idempotency_key: str | None = Header(None)) -> dict[str, Any]:
        authorise(authorization)
        if (slow := state.slow_creates.pop(body.charge, None)) is not None:
            arrived, acted = slow
            arrived.set()
            with contextlib.suppress(TimeoutError):  # the slow create acts first, as it came first
                await asyncio.wait_for(acted.wait(), 5)
        fault = take_fault(is_create_fault, body.charge)
        if fault and fault.mode == "error_before":
            raise HTTPException(503, "scripted outage before the refund was made")
        if fault and fault.mode == "timeout_before":  # the client gives up; nothing is made
            await stall("create_before_acting", body.charge, fault.seconds)
            raise HTTPException(503, "scripted timeout before the refund was made")
        if fault and fault.mode == "acts_after_give_up":
            # Still working when the client gives up; acts after `seconds`, or at once when
            # the client's next create on the charge arrives (the race a resubmit runs).
            arrived, acted = state.slow_creates[body.charge] = asyncio.Event(), asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), fault.seconds)
            state.slow_creates.pop(body.charge, None)
        if state.dedup_idempotency_keys and idempotency_key:
            earlier = bank.refunds(idempotency_key=idempotency_key)
            if earlier:
                return earlier[0]
        charge = found(bank.charge(body.charge), "charge", body.charge)
        if body.currency and body.currency.lower() != charge["currency"]:
            raise HTTPException(400, "currency does not match the charge")
        held = sum(r["amount"] for r in bank.refunds(charge=body.charge)
                   if r["status"] not in ("failed", "canceled"))
        if state.enforce_captured and held + body.amount > charge["amount_captured"]:
            raise HTTPException(400, "refund exceeds the captured amount")
        refund = {"id": new_id("re"), "object": "refund", "charge": body.charge,
                  "amount": body.amount, "currency": charge["currency"],
                  "status": state.refund_initial_status, "failure_reason": None,
                  "reason": body.reason, "metadata": body.metadata, "created": int(time.time())}
        bank.put("refunds", refund, idempotency_key=idempotency_key)
        emit("refund.created", refund)
        if fault and fault.mode == "acts_after_give_up":
            acted.set()
        if fault and fault.mode == "late_failure":
            spawn(later(fault.seconds, lambda: fail_later(refund["id"])))
        if fault and fault.mode == "timeout_after_success":
            await stall("create_after_acting", body.charge, fault.seconds)
        if fault and fault.mode == "error_after":
            raise HTTPException(502, "scripted failure after the refund was made")
        return refund

    @app.get("/v1/refunds")
    async def list_refunds(
            charge: str | None = None, reference: str | None = None,
            created_gte: Annotated[int | None, Query(alias="created[gte]")] = None,
            created_lt: Annotated[int | None, Query(alias="created[lt]")] = None,
            starting_after: str | None = None,
            limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
            authorization: str | None = Header(None)) -> dict[str, Any]:
        """Stripe's list shape: newest first, `created` filters, `starting_after` cursor;
        `reference` (verify-state, with the charge): every refund with our request id in
        metadata, on one page (filtering a page of the newest missed an older one)."""
        authorise(authorization)
        if reference is not None and (fault := take_fault(LOOKUP_FAULTS.__contains__, charge)):
            if fault.mode == "lookup_status":
                raise HTTPException(fault.status, f"scripted refusal of the lookup (HTTP {fault.status})")
            if fault.mode == "lookup_empty":
                return {"object": "list", "data": [], "has_more": False}
            await stall("lookup", charge, fault.seconds)
        if reference is not None:  # every refund (of the charge) carrying it, not a page
            found = [r for r in reversed(bank.refunds(charge))
                     if r["metadata"].get("refund_request_id") == reference]
            return {"object": "list", "data": found, "has_more": False}
        try:
            page, more = bank.page("refunds", since=created_gte, until=created_lt,
                                   starting_after=starting_after, limit=limit, charge=charge)
        except KeyError:
            raise HTTPException(400, f"no such refund {starting_after}") from None
        return {"object": "list", "data": page, "has_more": more}

    @app.post("/v1/payouts")
    async def create_payout(body: PayoutIn, authorization: str | None = Header(None)) -> dict[str, Any]:
        """A payout, paid at once (like a provider that shows paid before the bank settles)."""
        authorise(authorization)
        payout = {"id": body.id or new_id("po"), "object": "payout", "amount": body.amount,
                  "currency": body.currency.lower(), "destination": body.destination, "status": "paid",
                  "failure_code": None, "failure_message": None, "metadata": body.metadata,
                  "created": int(time.time())}
        bank.put_payout(payout)
        return payout

    @app.get("/v1/payouts")
    async def list_payouts(
            reference: str | None = None,
            created_gte: Annotated[int | None, Query(alias="created[gte]")] = None,
            created_lt: Annotated[int | None, Query(alias="created[lt]")] = None,
            starting_after: str | None = None,
            limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
            authorization: str | None = Header(None)) -> dict[str, Any]:
        """Stripe's list shape, as for refunds; `reference` (our payout id in metadata)
        narrows the page for the check before a reissue."""
        authorise(authorization)
        if reference is not None:
            found = [p for p in bank.payouts() if p["metadata"].get("payout_reference") == reference]
            return {"object": "list", "data": found, "has_more": False}
        try:
            page, more = bank.page("payouts", since=created_gte, until=created_lt,
                                   starting_after=starting_after, limit=limit)
        except KeyError:
            raise HTTPException(400, f"no such payout {starting_after}") from None
        return {"object": "list", "data": page, "has_more": more}

    @app.get("/v1/payouts/{payout_id}")
    async def get_payout(payout_id: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        authorise(authorization)
        return found(next((p for p in bank.payouts() if p["id"] == payout_id), None), "payout", payout_id)

    @app.get("/v1/refunds/{refund_id}")
    async def get_refund(refund_id: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        authorise(authorization)
        refund = found(bank.refund(refund_id), "refund", refund_id)
        return refund

    # -- scripting endpoints for tests and the demo ---------------------------------

    @app.post("/_sandbox/faults")
    async def add_fault(body: FaultIn) -> dict[str, int]:
        state.faults.append(body)
        return {"queued": len(state.faults)}

    @app.get("/_sandbox/faults/fired")
    async def fired() -> dict[str, int]:
        """How many calls each fault kind struck so far."""
        return dict(state.fired)

    @app.get("/_sandbox/stalled")
    async def stalled() -> dict[str, list[str]]:
        """The calls faults hold right now (`<point>:<charge>`), so a suite can act at that point."""
        return {"stalled": sorted(state.stalled)}

    @app.post("/_sandbox/config")
    async def configure(body: ConfigIn) -> dict[str, Any]:
        for key, value in body.model_dump(exclude_none=True).items():
            setattr(state, key, value)
        if body.hold_webhooks is False:
            for held in state.held:
                spawn(deliver(held))
            state.held.clear()
        return {"dedup_idempotency_keys": state.dedup_idempotency_keys,
                "refund_initial_status": state.refund_initial_status,
                "hold_webhooks": state.hold_webhooks}

    @app.post("/_sandbox/refunds/{refund_id}/status")
    async def set_status(refund_id: str, body: StatusIn) -> dict[str, Any]:
        refund = found(bank.refund(refund_id), "refund", refund_id)
        refund["status"] = body.status
        refund["failure_reason"] = body.failure_reason
        bank.put("refunds", refund)
        if body.send_webhook:
            emit("refund.updated", refund)
        return refund

    @app.post("/_sandbox/payouts/{payout_id}/status")
    async def set_payout_status(payout_id: str, body: PayoutStatusIn) -> dict[str, Any]:
        """Moves a payout as the provider would on its own, days after it showed paid, and
        sends `payout.<status>` (once, or `copies` times with the same event id)."""
        payout = found(next((p for p in bank.payouts() if p["id"] == payout_id), None), "payout", payout_id)
        payout.update(status=body.status, failure_code=body.failure_code,
                      failure_message=body.failure_message)
        bank.put_payout(payout)
        return {**payout, "event_id": emit(f"payout.{body.status}", payout, copies=body.copies)}

    @app.post("/_sandbox/import")
    async def import_history(body: ImportIn) -> dict[str, int]:
        """Seeds charges, refunds and payouts as if they had happened (no webhooks are sent)."""
        for charge in body.charges:
            new_charge(charge)
        bank.put_refunds([{"id": r.id or new_id("re"), "object": "refund", **r.model_dump(exclude={"id"})}
                          for r in body.refunds])
        for payout in body.payouts:
            bank.put_payout({"id": payout.id or new_id("po"), "object": "payout",
                             **payout.model_dump(exclude={"id"})})
        return {"charges": len(body.charges), "refunds": len(body.refunds), "payouts": len(body.payouts)}

    @app.post("/_sandbox/events")
    async def send_event(body: EventIn) -> dict[str, str]:
        return {"id": emit(body.type, body.object, copies=body.copies, event_id=body.event_id)}

    @app.get("/_sandbox/held-webhooks")
    async def held_webhooks() -> dict[str, Any]:
        """The held deliveries, oldest first, so a test can send them in any order itself."""
        return {"held": len(state.held), "bodies": [b.decode() for b in state.held]}

    @app.post("/_sandbox/discard-held")
    async def discard_held() -> dict[str, int]:
        discarded = len(state.held)
        state.held.clear()
        return {"discarded": discarded}

    @app.post("/_sandbox/release-webhooks")
    async def release(request: Request) -> dict[str, int]:
        """Releases held webhooks, optionally reversed (out-of-order delivery)."""
        order: Callable[[list[bytes]], list[bytes]] = (
            (lambda xs: list(reversed(xs))) if request.query_params.get("reverse") else list)
        bodies = order(state.held)
        state.held.clear()
        for body in bodies:
            await deliver(body)
        return {"released": len(bodies)}

    return app
