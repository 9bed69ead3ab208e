"""A duplicate delivery of an event this relay already saw processed is certain to be one (an
event's claim and its processed mark are never undone): its receipt is a plain insert, without
the claim, the first receipt's lookup and the case-opening values the gated statement carries
(the relay's cost per duplicate in a retry storm). Every other delivery goes through the gate
as before: the first, a duplicate reaching another relay process, a replay."""

import time
import uuid

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.api.enums.v1 import EventType

from domain.payouts import payout_case_id
from starters.relay.processed import ProcessedEvents
from starters.relay.webhook_desk import IngestResult, WebhookDesk
from tests.fakes import eventually
from tests.harness import Stack
from tests.payouts_kit import paid_payout, wait_for_actions
from tests.test_bad_input import event_body, request_object, sandbox_secret, signed
from tests.test_receipt_with_case import statements_under


def desk_of(stack: Stack) -> WebhookDesk:
    """A relay process's webhook desk (its memory of processed events starts empty)."""
    return WebhookDesk(stack.store, stack.client, stack.providers, stack.settings)


async def deliver(desk: WebhookDesk, body: bytes, headers: dict[str, str], span: str,
                  replay_of: int | None = None) -> IngestResult:
    with trace.get_tracer("tests").start_as_current_span(span):
        return await desk.ingest("sandbox", {k.lower(): v for k, v in headers.items()}, body,
                                 now=time.time(), peer="127.0.0.1", replay_of=replay_of)


async def requested_event(stack: Stack) -> tuple[str, bytes, dict[str, str]]:
    """A signed sandbox `refund.requested` on a fresh charge: its tag (event `evt_<tag>`,
    request `rrq_<tag>`), body and headers."""
    charge = await stack.charge(10_000)
    tag = uuid.uuid4().hex[:12]
    body = event_body("refund.requested", request_object(charge, f"rrq_{tag}"), event_id=f"evt_{tag}")
    return tag, body, signed(sandbox_secret(stack), body)


async def signals_of(stack: Stack, workflow_id: str) -> int:
    """How many times the workflow was started-with-a-signal or signalled."""
    history = await stack.client.get_workflow_handle(workflow_id).fetch_history()
    return sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in history.events)


async def test_a_duplicate_of_an_event_this_relay_processed_is_one_plain_insert(
        stack: Stack, spans: InMemorySpanExporter) -> None:
    tag, body, headers = await requested_event(stack)
    desk = desk_of(stack)
    first = await deliver(desk, body, headers, f"first-{tag}")
    again = await deliver(desk, body, headers, f"again-{tag}")
    elsewhere = await deliver(desk_of(stack), body, headers, f"elsewhere-{tag}")  # another relay process
    replayed = await deliver(desk, body, headers, f"replay-{tag}", replay_of=first.receipt_id)

    assert (first.status_code, first.verdict) == (200, "accepted") and first.workflow_id is not None
    assert [(r.status_code, r.verdict) for r in (again, elsewhere, replayed)] == [(200, "duplicate")] * 3
    [plain] = statements_under(spans, f"again-{tag}")
    assert plain.startswith("INSERT INTO webhook_receipts") and "webhook_events" not in plain
    assert "refund_cases" not in plain
    for gated in (f"elsewhere-{tag}", f"replay-{tag}"):  # the gate, as before
        [statement] = statements_under(spans, gated)
        assert "webhook_events" in statement, gated
    stored = await stack.store.receipts.find("sandbox", f"evt_{tag}")
    assert [(r.verdict, r.processed_at is not None) for r in stored] == \
        [("accepted", True)] + [("duplicate", True)] * 3
    assert [r.id for r in stored][1:] == [again.receipt_id, elsewhere.receipt_id, replayed.receipt_id]
    assert await signals_of(stack, first.workflow_id) == 1


async def test_a_known_duplicate_of_a_payout_event_still_joins_the_case_timeline(stack: Stack) -> None:
    """Every delivery of a payout event, duplicates too, is on its case's timeline: also one
    the relay answers from its memory (the provider sends the event again once processed)."""
    payout = await paid_payout(stack, 90_000)
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    async with stack.sandbox() as sb:
        moved = await sb.post(f"/_sandbox/payouts/{payout.provider_payout_id}/status",
                              json={"status": "failed", "failure_code": "account_closed"})
        moved.raise_for_status()
        failed = moved.json()
        event_id = failed.pop("event_id")
        first = await processed_receipt(stack, event_id)
        again = await sb.post("/_sandbox/events",
                              json={"type": "payout.failed", "event_id": event_id, "object": failed})
        again.raise_for_status()
    trail = await wait_for_actions(stack, case_id, "payout_event_received", 2)
    received = [e["detail"] for e in trail if e["action"] == "payout_event_received"]
    assert [(d["verdict"], d["first_receipt_id"]) for d in received] == \
        [("accepted", first), ("duplicate", first)]
    receipts = await stack.store.receipts.find("sandbox", event_id)
    assert [(r.verdict, r.id) for r in receipts] == \
        [("accepted", first), ("duplicate", received[1]["receipt_id"])]


async def processed_receipt(stack: Stack, event_id: str) -> int:
    """The event's first receipt, once the relay marked it processed."""
    async def processed() -> int | None:
        receipts = await stack.store.receipts.find("sandbox", event_id)
        return receipts[0].id if receipts and receipts[0].processed_at is not None else None

    first: int = await eventually(processed)
    return first


def test_the_memory_of_processed_events_keeps_the_most_recently_used() -> None:
    memory = ProcessedEvents(capacity=2)
    memory.add("sandbox", "evt_1", 11)
    memory.add("sandbox", "evt_2", 12)
    assert memory.first_receipt("sandbox", "evt_1") == 11  # used: now the most recent
    memory.add("stripe", "evt_1", 13)
    assert [memory.first_receipt("sandbox", e) for e in ("evt_1", "evt_2")] == [11, None]
    assert memory.first_receipt("stripe", "evt_1") == 13
    with pytest.raises(ValueError):
        ProcessedEvents(capacity=0)
