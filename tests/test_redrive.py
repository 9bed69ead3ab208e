"""The relay's periodic re-drive: a receipt a crash left between "stored" and "workflow
signalled" is healed by the relay's own loop, with no one asking, exactly once; a failing
pass is counted and the loop goes on; two relays re-driving at once still act once; the
loop ends with the relay."""

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from temporalio.client import Client

from adapters.db import CaseCreation, Store, StoredReceipt
from adapters.db.receipts import ReceiptRepository
from adapters.http_server import AppServer
from domain.events import tracking_case_id
from domain.models import ProviderEvent, RefundRequest
from domain.payments import PaymentEvent
from domain.payouts import PayoutEvent
from starters import relay
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from starters.relay.webhook_desk import WebhookDesk
from tests.harness import Stack, open_stack
from tests.test_bad_input import signed
from tests.test_known_duplicates import desk_of, requested_event
from tests.test_provider_webhooks import CASHFREE_SECRET, recorded, sign_cashfree


def passes(outcome: str) -> float:
    return REGISTRY.get_sample_value("refunds_webhook_redrive_passes_total", {"outcome": outcome}) or 0.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    """Polls until `check` holds (the loop runs on its own clock, not the test's)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


async def crash_after_receipt(stack: Stack) -> tuple[StoredReceipt, str, str]:
    """What the relay wrote before a crash: an accepted receipt, no workflow reached.
    Returns the receipt, its event id and the tracking case it should open."""
    body, refund_id = recorded("cashfree")
    event_id = f"AUTO_REFUND_STATUS_WEBHOOK:{refund_id}:SUCCESS"
    crashed = await stack.store.receipts.store(
        provider="cashfree", event_id=event_id, event_type="AUTO_REFUND_STATUS_WEBHOOK", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers=sign_cashfree(body), verdict="accepted",
        error=None)
    return crashed, event_id, tracking_case_id("cashfree", refund_id)


@pytest.fixture
async def looping(store: Store, client: Client, temporal_server: TemporalDevServer,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Stack, float]]:
    """A stack whose relay re-drives every 0.2 s, and the failed-pass count before it
    started: its first pass fails (the database away)."""
    original = ReceiptRepository.unprocessed
    failed_once = False

    async def flaky(repository: ReceiptRepository, *args: Any) -> list[int]:
        nonlocal failed_once
        if not failed_once:
            failed_once = True
            raise ConnectionError("database went away")
        return await original(repository, *args)

    monkeypatch.setattr(ReceiptRepository, "unprocessed", flaky)
    failed_before = passes("failed")
    stack = await open_stack(store, client, temporal_server.address, cashfree_webhook_secret=CASHFREE_SECRET,
                             webhook_redrive_after_seconds=0, webhook_redrive_interval_seconds=0.2)
    yield stack, failed_before
    await stack.close()


async def test_the_loop_heals_an_unprocessed_receipt_once_after_a_failed_pass(
        looping: tuple[Stack, float]) -> None:
    stack, failed_before = looping
    crashed, event_id, case_id = await crash_after_receipt(stack)

    async def processed() -> bool:
        [row] = [r for r in await stack.store.receipts.find("cashfree", event_id)
                 if r["id"] == crashed.receipt_id]
        return row["processed_at"] is not None

    await eventually(processed, f"receipt {crashed.receipt_id} processed by the loop")
    assert passes("failed") == failed_before + 1  # the failing pass was counted, the loop went on
    row = await stack.wait_for_status(case_id, "succeeded")
    assert (row["amount"], row["currency"]) == (3900, "INR")

    seen = passes("ok")

    async def two_more_passes() -> bool:
        return passes("ok") >= seen + 2

    await eventually(two_more_passes, "two more passes")
    deliveries = await stack.store.receipts.find("cashfree", event_id)
    assert [(r["id"] == crashed.receipt_id, r["verdict"]) for r in deliveries] == [
        (True, "accepted"), (False, "duplicate")]  # re-driven once, never again
    assert deliveries[0]["workflow_id"] == case_id
    await stack.client.get_workflow_handle(case_id).result()
    assert len(await stack.store.ledger.entries(case_id)) == 2


class RacingDesk(WebhookDesk):
    """A relay that routes only once the other one also got past the dedup gate, so both
    surely start or signal the same event's workflow at the same time."""

    def __init__(self, *args: Any, barrier: asyncio.Barrier) -> None:
        super().__init__(*args)
        self._barrier = barrier

    async def route(self, event: ProviderEvent | PayoutEvent | PaymentEvent,
                    case_creation: CaseCreation | None = None, *,
                    request: RefundRequest | None = None) -> str | None:
        await self._barrier.wait()
        return await super().route(event, case_creation, request=request)


async def test_two_relays_re_driving_at_once_act_once(store: Store, client: Client,
                                                      temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, cashfree_webhook_secret=CASHFREE_SECRET,
                             webhook_redrive_after_seconds=0)
    try:
        crashed, event_id, case_id = await crash_after_receipt(stack)
        barrier = asyncio.Barrier(2)
        relays = [RacingDesk(store, client, stack.providers, stack.settings, barrier=barrier)
                  for _ in range(2)]
        both = await asyncio.gather(*(desk.replay(crashed.receipt_id) for desk in relays))
        assert [(r.verdict, r.workflow_id) for r in both if r is not None] == [("duplicate", case_id)] * 2
        await stack.client.get_workflow_handle(case_id).result()
        lines = await store.ledger.entries(case_id)
        assert [(x["template"], x["debit"], x["credit"]) for x in lines] == [
            ("refund_settled", 3900, 0), ("refund_settled", 0, 3900)]
        case = await stack.store.cases.get(case_id)
        assert case is not None and case.status == "succeeded"
        [original, *replays] = await store.receipts.find("cashfree", event_id)
        assert original["id"] == crashed.receipt_id and original["processed_at"] is not None
        assert [r["verdict"] for r in replays] == ["duplicate", "duplicate"]
    finally:
        await stack.close()


async def test_the_loop_ends_with_the_relay(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"webhook_redrive_interval_seconds": 30})
    app = relay.create_app(stack.store, stack.client, stack.providers, settings)
    server = AppServer(app, "127.0.0.1", free_port())
    await server.start()
    loop: asyncio.Task[None] = app.state.redrive
    assert not loop.done()
    await server.stop()
    assert loop.cancelled()
    off = relay.create_app(stack.store, stack.client, stack.providers, stack.settings)
    server = AppServer(off, "127.0.0.1", free_port())
    await server.start()
    assert off.state.redrive is None  # interval 0: only at start and on demand
    await server.stop()


async def test_a_replay_of_a_replay_is_read_as_of_the_original_delivery(stack: Stack) -> None:
    """A replay reads a delivery as of its reception (a signature's age counts from then).
    Re-drive replays every accepted receipt that never reached its workflow, replays among
    them, and a replay receipt was read as of the replay: past the tolerance after the
    original, always `stale`, and the event was never acted on (re-drive gave up)."""
    _, body, _ = await requested_event(stack)
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None
    then = time.time() - 3_600
    headers = {k.lower(): v for k, v in signed(secret.get_secret_value(), body, int(then)).items()}
    desk = desk_of(stack)
    original = await desk.ingest("sandbox", headers, body, now=then, peer="127.0.0.1")
    assert original.verdict == "accepted", original
    await stack.store.database.execute("UPDATE webhook_receipts SET received_at = to_timestamp(%s)"
                                       " WHERE id = %s", (then, original.receipt_id))
    first = await desk.replay(original.receipt_id)
    assert first is not None and first.verdict != "stale", first
    again = await desk.replay(first.receipt_id)
    assert again is not None and again.verdict not in ("stale", "bad_signature"), again
