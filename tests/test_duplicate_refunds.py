"""A second provider refund carrying a case's reference is an incident: the case goes to
ops review, ops get a notice and a reconciliation break records it. And a tracking case's
hold is a reservation like any other, taken under the charge's lock."""

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client

from adapters.db import Store
from domain.events import tracking_case_id
from domain.models import EventKind, ProviderEvent, ProviderRefund, ProviderRefundStatus
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.harness import Stack, open_stack


async def test_a_second_provider_refund_with_our_reference_is_an_incident(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 2_000)
    row = await stack.wait_for_status(case_id, "succeeded")
    # Someone (a retry elsewhere, a script) refunds again at the provider with our reference.
    async with stack.sandbox() as sb:
        made = await sb.post("/v1/refunds", json={"charge": charge, "amount": 2_000,
                                                  "metadata": {"refund_request_id": case_id}})
    made.raise_for_status()
    duplicate = made.json()["id"]
    trail = await stack.wait_for_audit(case_id, "duplicate_provider_refund")
    row = await stack.wait_for_status(case_id, "ops_review")
    assert row["provider_refund_id"] != duplicate and row["reserved_amount"] == 2_000
    assert "reconciliation_break_found" in trail
    [incident] = await _breaks(stack.store, case_id)
    assert (incident["object_id"], incident["break_class"], incident["state"], incident["amount"]) == (
        duplicate, "duplicate_refund", "ops_review", 2_000)
    assert incident["evidence"]["case"]["followed_refund_id"] == row["provider_refund_id"]
    # ops hear of it once, one incident ticket per system: the case's notice, not the break's too
    kinds = [n["kind"] for n in await stack.store.outbox.notices(case_id)]
    assert kinds.count("duplicate_provider_refund") == 1 and "reconciliation_break" not in kinds, kinds
    # Only the case's own refund reaches the ledger; the duplicate waits for ops.
    assert [x["debit"] for x in await stack.store.ledger.entries(case_id)] == [2_000, 0]


async def test_a_refund_on_another_charge_naming_a_case_is_that_charge_s_not_the_case_s(
        stack: Stack) -> None:
    """A refund made at the provider on another charge whose metadata names our case (a
    dashboard refund, a script, a reference pasted where it does not belong) moved money off
    that other charge, not the case's. It is followed as that charge's own refund (a tracking
    case), and the case keeps its state. Before, the relay routed it to the case by its
    reference alone: a duplicate incident (ops review for good, a break that refused every
    reissue of the request), and after the case closed a break whose approval booked the
    other charge's refund as the case's."""
    charge, other = await stack.charge(10_000), await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 2_000)
    await stack.wait_for_status(case_id, "succeeded")
    async with stack.sandbox() as sb:
        made = await sb.post("/v1/refunds", json={"charge": other, "amount": 1_500,
                                                  "metadata": {"refund_request_id": case_id}})
    made.raise_for_status()
    tracking = tracking_case_id("sandbox", made.json()["id"])
    await stack.wait_for_status(tracking, "succeeded")
    row = await stack.store.cases.get(case_id)
    assert row is not None and row["status"] == "succeeded"
    assert await _breaks(stack.store, case_id) == []
    assert "duplicate_provider_refund" not in [e["action"] for e in await stack.store.audit.trail(case_id)]


async def test_a_refund_another_case_holds_reaches_that_case_whatever_reference_it_carries(
        stack: Stack) -> None:
    """Case `holder` holds refund R (succeeded, its late-failure watch open). R's metadata
    was then edited to name case `named` on the same charge, and R failed: the failure is the
    holder's (its money came back), not the named case's duplicate. Before, the relay routed
    by the reference first: the named case went to ops review with a duplicate incident, and
    the holder never heard its refund failed."""
    charge = await stack.charge(10_000)
    holder = await stack.request_refund("alice", charge, 2_000)
    named = await stack.request_refund("alice", charge, 3_000)
    held = await stack.wait_for_status(holder, "succeeded")
    await stack.wait_for_status(named, "awaiting_approval")  # another refund holds money on the charge
    desk = WebhookDesk(stack.store, stack.client, stack.providers, stack.settings)
    assert await desk.route(ProviderEvent(
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="refund.failed",
        kind=EventKind.REFUND_STATUS, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
        refund_id=held["provider_refund_id"], charge_id=charge, refund_request_id=named, amount=2_000,
        currency="USD", status=ProviderRefundStatus.FAILED, raw_status="failed",
        failure_reason="card_account_closed")) == holder
    await stack.wait_for_audit(holder, "refund_failed_after_success")
    assert "duplicate_provider_refund" not in [e["action"] for e in await stack.store.audit.trail(named)]
    row = await stack.store.cases.get(named)
    assert row is not None and row["status"] == "awaiting_approval"


async def duplicate_heard_with_a_cancel(stack: Stack) -> tuple[str, str]:
    """A succeeded case watching for a late failure hears of a second refund with its
    reference and is cancelled by ops, both before its worker takes either (the worker was
    down: they reach the workflow in one task): (case id, the duplicate's id)."""
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 2_000)
    await stack.wait_for_status(case_id, "succeeded")
    assert stack.worker is not None
    handle = stack.client.get_workflow_handle(case_id)
    await stack.worker.shutdown()
    async with stack.sandbox() as sb:
        made = await sb.post("/v1/refunds", json={"charge": charge, "amount": 2_000,
                                                  "metadata": {"refund_request_id": case_id}})
    made.raise_for_status()
    duplicate = str(made.json()["id"])

    async def signalled() -> set[str]:
        """The refunds the events signalled to the workflow name."""
        named = set()
        async for event in handle.fetch_history_events():
            if event.HasField("workflow_execution_signaled_event_attributes"):
                payloads = event.workflow_execution_signaled_event_attributes.input.payloads
                [sent] = await stack.client.data_converter.decode(payloads, [ProviderEvent])
                named.add(str(sent.refund_id))
        return named

    while duplicate not in await signalled():  # the relay signalled the duplicate's event
        await asyncio.sleep(0.1)
    await handle.cancel()
    await stack.start_worker()
    await handle.result()
    return case_id, duplicate


async def test_a_duplicate_heard_as_ops_cancel_is_still_an_incident(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The cancel found the case's refund succeeded and ended the run: the duplicate in its
    inbox was never read (money moved twice; no break, no notice, the case shown
    succeeded). A cancel takes the news it already holds before it ends."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=300)
    try:
        case_id, duplicate = await duplicate_heard_with_a_cancel(stack)
        actions = await stack.actions(case_id)
        assert {"cancel_after_provider_refund", "duplicate_provider_refund"} <= set(actions), actions[-4:]
        [incident] = await _breaks(store, case_id)
        assert (incident["object_id"], incident["break_class"]) == (duplicate, "duplicate_refund")
        row = await store.cases.get(case_id)
        assert row is not None and row["status"] == "ops_review"
    finally:
        await stack.close()


async def _breaks(store: Store, case_id: str) -> list[dict[str, Any]]:
    async with store.database.transaction() as conn:
        cur = await conn.execute("SELECT * FROM reconciliation_breaks WHERE refund_request_id = %s",
                                 (case_id,))
        return list(await cur.fetchall())


async def test_a_tracking_case_takes_the_charge_lock(store: Store) -> None:
    # ids of this run only: a database kept from an earlier run holds that run's case and charge
    suffix = uuid.uuid4().hex[:10]
    refund_id, charge_id = f"re_lock_{suffix}", f"ch_lock_{suffix}"
    refund = ProviderRefund(provider="sandbox", refund_id=refund_id, charge_id=charge_id, amount=700,
                            currency="USD", status=ProviderRefundStatus.SUCCEEDED, raw_status="succeeded")
    async with store.database.transaction() as holder:  # a reservation in progress on the same charge
        await holder.execute("INSERT INTO charges (provider, charge_id, currency, amount_captured)"
                             " VALUES ('sandbox', %s, 'USD', 1000) ON CONFLICT DO NOTHING", (charge_id,))
        await holder.execute("SELECT 1 FROM charges WHERE provider = 'sandbox' AND charge_id = %s"
                             " FOR UPDATE", (charge_id,))
        pid = (await (await holder.execute("SELECT pg_backend_pid() AS pid")).fetchone() or {})["pid"]
        opening = asyncio.create_task(store.cases.open_tracking(f"sandbox-refund-{refund_id}", refund, None,
                                                                "refund.updated"))
        for _ in range(3_000):  # until it either finished or queued behind our lock (30 s at most)
            cur = await holder.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,))
            if opening.done() or (await cur.fetchone() or {})["n"]:
                break
            await asyncio.sleep(0.01)
        else:
            cur = await holder.execute(
                "SELECT pid, state, wait_event, pg_blocking_pids(pid) AS blocked_by FROM pg_stat_activity"
                " WHERE pid <> %s AND datname = current_database()", (pid,))
            raise AssertionError("the tracking case neither took its hold nor waited for the charge's lock "
                                 f"in 30 s; other sessions: {await cur.fetchall()}")
        assert not opening.done(), "the tracking case took its hold without the charge's lock"
    assert await opening
    row = await store.cases.get(f"sandbox-refund-{refund_id}")
    assert row is not None and (row["status"], row["reserved_amount"]) == ("tracking", 700)


async def test_a_lookup_that_finds_two_refunds_with_our_reference_is_an_incident(stack: Stack) -> None:
    """The sandbox ignores idempotency keys: two refunds for the case's reference exist when
    the case's verify-state lookup runs (its create got no answer). Same incident as a
    second refund reported by webhook."""
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_500)
    case_id = body["refund_request_id"]
    made = await stack.made_elsewhere(charge, case_id, 1_500, 1_500)  # only the lookup can tell
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    trail = await stack.wait_for_audit(case_id, "duplicate_provider_refund")
    row = await stack.wait_for_status(case_id, "ops_review")
    followed = row["provider_refund_id"]
    assert followed in made and len(await stack.provider_refunds(charge)) == 2  # the lookup made none
    [duplicate] = [r for r in made if r != followed]
    assert "reconciliation_break_found" in trail
    [incident] = await _breaks(stack.store, case_id)
    assert (incident["object_id"], incident["break_class"], incident["state"]) == (
        duplicate, "duplicate_refund", "ops_review")
    assert incident["evidence"]["case"]["followed_refund_id"] == followed
    assert incident["evidence"]["source"] == "verify_state"
    kinds = {(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)}
    assert ("duplicate_provider_refund", "operator") in kinds


@pytest.mark.parametrize("failed", [0, 1])
async def test_of_two_refunds_with_our_reference_the_case_follows_the_one_that_moved_money(
        stack: Stack, failed: int) -> None:
    """The lookup finds two refunds under the case's reference, one failed: the case
    followed whichever the provider listed first, and when that was the failed one it
    booked a failure and released its hold while the other refund had paid (the duplicate
    then went to ops, the success never booked). The refund holding money is followed."""
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_500)
    case_id = body["refund_request_id"]
    made = await stack.made_elsewhere(charge, case_id, 1_500, 1_500)
    await stack.set_provider_status(made[failed], "failed", failure_reason="lost_or_stolen_card",
                                    send_webhook=False)
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    await stack.wait_for_audit(case_id, "duplicate_provider_refund")
    row = await stack.wait_for_status(case_id, "ops_review")
    assert row["provider_refund_id"] == made[1 - failed], (row, made)
    assert row["reserved_amount"] == 1_500
    assert "refund_failed" not in await stack.actions(case_id)


async def test_each_duplicate_refund_gets_its_own_ops_notice(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Two more refunds with the case's reference, one after the other, while the case's
    own refund stays succeeded: each moved money once more. The second's ops notice took
    the first's dedup key (case, kind, audience, the followed refund's status) and was
    never queued: ops heard of one duplicate of two."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=300)
    try:
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund("alice", charge, 2_000)
        await stack.wait_for_status(case_id, "succeeded")
        for amount in (2_000, 1_500):
            async with stack.sandbox() as sb:
                (await sb.post("/v1/refunds", json={"charge": charge, "amount": amount, "metadata": {
                    "refund_request_id": case_id}})).raise_for_status()
            await stack.wait_for_audit(case_id, "duplicate_provider_refund")
        while (await stack.actions(case_id)).count("duplicate_provider_refund") < 2:
            await asyncio.sleep(0.1)
        notices = [n for n in await store.outbox.notices(case_id) if n["kind"] == "duplicate_provider_refund"]
        assert len(notices) == 2, notices
        assert len(await _breaks(store, case_id)) == 2
    finally:
        await stack.close()
