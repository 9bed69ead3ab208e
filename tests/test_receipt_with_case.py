"""The first delivery of a provider's refund request stores its receipt and opens its case
in one commit (one disk flush less on the relay's hottest path); if the case cannot be
written there, the receipt still is, and routing opens the case as before."""

import asyncio
import hashlib
import uuid

import httpx
import psycopg
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters.db import CaseCreation, StoredReceipt
from domain.models import RefundReason, RefundRequest, RequestSource
from tests.harness import Stack
from tests.test_bad_input import event_body, request_object, sandbox_secret, signed
from tests.test_observability import _flushed


async def one_value(dsn: str, sql: str, key: object) -> object:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(sql, (key,))).fetchone()
        assert row is not None
        return row[0]


async def test_first_delivery_writes_receipt_and_case_in_one_transaction(
        stack: Stack, postgres_dsn: str) -> None:
    charge = await stack.charge(10_000)
    rrq = f"rrq_{uuid.uuid4().hex[:12]}"
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None
    body = event_body("refund.requested", request_object(charge, rrq))
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        first, again = [await http.post("/webhooks/sandbox", content=body,
                                        headers=signed(secret.get_secret_value(), body)) for _ in range(2)]
    assert first.status_code == 200 and first.json()["verdict"] == "accepted", first.text
    assert again.json()["verdict"] == "duplicate"
    case_id = first.json()["workflow_id"]
    # now() is the transaction's start time: equal stamps mean one transaction wrote both.
    received = await one_value(postgres_dsn, "SELECT received_at FROM webhook_receipts WHERE id = %s",
                               first.json()["receipt_id"])
    created = await one_value(postgres_dsn,
                              "SELECT created_at FROM refund_cases WHERE refund_request_id = %s",
                              case_id)
    assert received == created
    actions = [a["action"] for a in await stack.store.audit.trail(case_id)]
    assert actions.count("request_received") == 1 and "request_repeated" not in actions
    await stack.wait_for_status(case_id, "succeeded")


def provider_request(rrq: str) -> RefundRequest:
    return RefundRequest(refund_request_id=rrq, provider="sandbox", charge_id="ch_one_statement",
                         amount=1_000, currency="USD", merchant_account="acct_1",
                         reason=RefundReason.DUPLICATE, source=RequestSource.WEBHOOK)


async def store_traced(stack: Stack, name: str, event_id: str, body: bytes,
                       request: RefundRequest | None) -> StoredReceipt:
    """`receipts.store` under a span of its own, so its statements are that span's children."""
    with trace.get_tracer("tests").start_as_current_span(name):
        return await stack.store.receipts.store(
            provider="sandbox", event_id=event_id, event_type="refund.requested", body=body,
            body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="accepted",
            error=None, opens=None if request is None else (request, "provider:sandbox"))


def statements_under(spans: InMemorySpanExporter, name: str) -> list[str]:
    """The SQL of each statement run under the span `name` (its database spans' children)."""
    finished = _flushed(spans)
    [parent] = [s for s in finished if s.name == name]
    assert parent.context is not None
    return [str((s.attributes or {}).get("db.statement", s.name)) for s in finished
            if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_a_first_delivery_and_a_duplicate_are_one_statement_each(
        stack: Stack, spans: InMemorySpanExporter) -> None:
    """The relay's cost per delivery is its statements (a round trip, a wake-up on each
    side): receipt, claim, case and the case's first audit entry are one; a duplicate's
    receipt, its verdict and what it needs of the first receipt are one."""
    tag = uuid.uuid4().hex[:12]
    rrq, event_id, body = f"sandbox-rrq_{tag}", f"evt_{tag}", b'{"id": "evt_one_statement"}'
    first = await store_traced(stack, f"first-{tag}", event_id, body, provider_request(rrq))
    again = await store_traced(stack, f"again-{tag}", event_id, body, provider_request(rrq))

    assert (first.verdict, first.first_receipt_id, first.case_creation) == \
        ("accepted", first.receipt_id, CaseCreation.CREATED)
    assert (again.verdict, again.first_receipt_id, again.first_processed) == \
        ("duplicate", first.receipt_id, False)
    assert [r["verdict"] for r in await stack.store.receipts.find("sandbox", event_id)] == \
        ["accepted", "duplicate"]
    [entry] = await stack.store.audit.trail(rrq)
    assert (entry["seq"], entry["action"]) == (1, "request_received")
    _, problems = await stack.store.audit.verify()
    assert not [p for p in problems if f"chain {rrq} " in p]
    assert [len(statements_under(spans, f"{step}-{tag}")) for step in ("first", "again")] == [1, 1]


async def test_a_delivery_racing_an_uncommitted_first_one_is_its_duplicate(
        stack: Stack, postgres_dsn: str) -> None:
    """The claim waits for a first delivery still in flight, then decides: the second is a
    duplicate naming the first, though its statement began before the first committed."""
    tag = uuid.uuid4().hex[:12]
    event_id, body = f"evt_{tag}", b'{"id": "evt_race"}'
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as first, first.transaction():
        row = await (await first.execute(
            "WITH r AS (INSERT INTO webhook_receipts (provider, event_id, body_sha256, verdict)"
            " VALUES ('sandbox', %s, '', 'accepted') RETURNING id)"
            " INSERT INTO webhook_events (provider, event_id, first_receipt_id)"
            " SELECT 'sandbox', %s, id FROM r RETURNING first_receipt_id", (event_id, event_id))).fetchone()
        assert row is not None
        second = asyncio.create_task(store_traced(stack, f"race-{tag}", event_id, body, None))
        await asyncio.sleep(0.5)
        assert not second.done()  # waiting on the first claim
    stored = await second
    assert (stored.verdict, stored.first_receipt_id, stored.first_processed) == ("duplicate", row[0], False)
    assert [r["verdict"] for r in await stack.store.receipts.find("sandbox", event_id)] == \
        ["accepted", "duplicate"]


async def test_a_case_whose_audit_chain_already_began_continues_it(stack: Stack) -> None:
    """A chain can exist before its case (an entry recorded under the id first): the case
    still opens from its first delivery, its first entry the chain's next one."""
    charge = await stack.charge(10_000)
    rrq = f"rrq_{uuid.uuid4().hex[:12]}"
    case_id = f"sandbox-{rrq}"
    await stack.store.audit.record(case_id, "provider:sandbox", "event_after_close", {"event_id": "evt_0"})
    body = event_body("refund.requested", request_object(charge, rrq))
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        response = await http.post("/webhooks/sandbox", content=body,
                                   headers=signed(sandbox_secret(stack), body))
    assert (response.status_code, response.json()["workflow_id"]) == (200, case_id), response.text
    assert [(e["seq"], e["action"]) for e in await stack.store.audit.trail(case_id)][:2] == \
        [(1, "event_after_close"), (2, "request_received")]
    _, problems = await stack.store.audit.verify()
    assert not [p for p in problems if f"chain {case_id} " in p]
    await stack.wait_for_status(case_id, "succeeded")


async def test_a_case_that_cannot_be_written_leaves_the_receipt_stored(stack: Stack) -> None:
    rrq = f"sandbox-rrq_{uuid.uuid4().hex[:12]}"
    # Past validation (as a corrupt request could only be) so the table's CHECK refuses it.
    broken = RefundRequest.model_construct(
        refund_request_id=rrq, provider="sandbox", charge_id="ch_x", amount=0, currency="USD",
        merchant_account="acct_1", reason=RefundReason.DUPLICATE, evidence={},
        source=RequestSource.WEBHOOK)
    body, event_id = b'{"id": "evt_broken"}', f"evt_{uuid.uuid4().hex}"
    stored = await stack.store.receipts.store(
        provider="sandbox", event_id=event_id, event_type="refund.requested", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="accepted", error=None,
        opens=(broken, "provider:sandbox"))
    assert stored.verdict == "accepted" and stored.case_creation is None
    assert [r["id"] for r in await stack.store.receipts.find("sandbox", event_id)] == [stored.receipt_id]
    assert await stack.store.cases.get(rrq) is None


async def test_the_processed_mark_commits_without_waiting_for_the_disk(
        stack: Stack, postgres_dsn: str) -> None:
    """The mark is one statement whose commit is asynchronous: right after it returns, the
    WAL holds more than was flushed (a durable commit never leaves that state behind)."""
    body, event_id = b'{"id": "evt_mark"}', f"evt_{uuid.uuid4().hex}"
    stored = await stack.store.receipts.store(
        provider="sandbox", event_id=event_id, event_type="refund.requested",
        body=body, body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="accepted",
        error=None)
    unflushed = 0
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as wal:
        for _ in range(20):
            await stack.store.receipts.mark_processed(stored.receipt_id, "wf-mark")
            row = await (await wal.execute(
                "SELECT pg_current_wal_insert_lsn() > pg_current_wal_flush_lsn()")).fetchone()
            assert row is not None
            unflushed += bool(row[0])
    assert unflushed > 0
    [receipt] = await stack.store.receipts.find("sandbox", event_id)
    assert receipt["workflow_id"] == "wf-mark" and receipt["processed_at"] is not None


async def test_a_request_delivered_again_under_a_new_event_id_meets_its_case(stack: Stack) -> None:
    """A new event id passes the gate, but its request's case exists: the statement leaves
    it, and routing records the repeat (same parameters) or the conflict (others); one case,
    one refund either way."""
    charge = await stack.charge(10_000)
    rrq = f"rrq_{uuid.uuid4().hex[:12]}"
    secret = sandbox_secret(stack)
    first, again, other = (event_body("refund.requested", request_object(charge, rrq, amount))
                           for amount in (1_000, 1_000, 2_500))
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        answers = [await http.post("/webhooks/sandbox", content=body, headers=signed(secret, body))
                   for body in (first, again, other)]
    assert [(a.status_code, a.json()["verdict"]) for a in answers] == [(200, "accepted")] * 3
    case_id = f"sandbox-{rrq}"
    assert [a.json()["workflow_id"] for a in answers] == [case_id, case_id, None]
    await stack.wait_for_status(case_id, "succeeded")
    actions = [e["action"] for e in await stack.store.audit.trail(case_id)]
    assert [a for a in actions if a.startswith("request_")] == \
        ["request_received", "request_repeated", "request_conflict"]
    refunds = await stack.provider_refunds(charge)
    assert [(r["amount"], r["status"]) for r in refunds] == [(1_000, "succeeded")]
