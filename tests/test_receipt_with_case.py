"""The first delivery of a provider's refund request stores its receipt and opens its case
in one commit (one disk flush less on the relay's hottest path); if the case cannot be
written there, the receipt still is, and routing opens the case as before."""

import hashlib
import uuid

import httpx
import psycopg

from domain.models import RefundReason, RefundRequest, RequestSource
from tests.harness import Stack
from tests.test_bad_input import event_body, request_object, signed


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
