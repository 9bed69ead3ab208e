"""Every provider refund state has a branch; late and out-of-order reports never move a
case backwards; a refund that succeeded and later failed is compensated and announced."""

import asyncio

from temporalio.client import Client

from adapters.db import Store
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack, write_held


async def pending_refund(stack: Stack, amount: int = 2_000) -> tuple[str, str, str]:
    """A case whose refund the provider accepted as pending; returns (case, charge, refund)."""
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, amount)
    row = await stack.wait_for_status(case_id, "pending")
    return case_id, charge, row["provider_refund_id"]


async def test_pending_then_succeeded_by_webhook_posts_once(stack: Stack) -> None:
    case_id, charge, refund_id = await pending_refund(stack)
    assert await stack.store.ledger.entries(case_id) == []  # nothing posted before confirmation
    await stack.set_provider_status(refund_id, "requires_action")
    await stack.wait_for_status(case_id, "requires_action")
    await stack.set_provider_status(refund_id, "in_review")
    await stack.wait_for_status(case_id, "in_review")
    await stack.set_provider_status(refund_id, "succeeded")
    await stack.wait_for_status(case_id, "succeeded")
    await stack.set_provider_status(refund_id, "pending")  # a stale report after success
    await stack.set_provider_status(refund_id, "succeeded")
    assert {e["posting_key"] for e in await stack.store.ledger.entries(case_id)} == {
        f"{case_id}:refund_settled"}
    assert len(await stack.provider_refunds(charge)) == 1


async def test_failed_and_canceled_release_the_reservation_and_notify(stack: Stack) -> None:
    for final, status, notices in (
            ("failed", "refund_failed", {("refund_failed", "operator"),
                                          ("refund_could_not_be_processed", "customer")}),
            ("canceled", "refund_canceled", {("refund_canceled", "operator")})):
        case_id, _, refund_id = await pending_refund(stack)
        await stack.set_provider_status(refund_id, final, failure_reason="lost_or_stolen_card"
                                        if final == "failed" else None)
        row = await stack.wait_for_status(case_id, status)
        assert row["reserved_amount"] == 0
        assert await stack.store.ledger.entries(case_id) == []
        assert {(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)} == notices


async def test_a_refund_waiting_for_someone_to_act_is_announced_to_ops(stack: Stack) -> None:
    """`requires_action` (Stripe: the customer's details; Cashfree ONHOLD: the merchant's
    balance) waits on a person, not on time: ops hear of it when the case reaches it, once."""
    case_id, _, refund_id = await pending_refund(stack)
    await stack.set_provider_status(refund_id, "requires_action")
    await stack.wait_for_status(case_id, "requires_action")
    await stack.set_provider_status(refund_id, "requires_action")  # the same news again
    await stack.set_provider_status(refund_id, "succeeded")
    await stack.wait_for_status(case_id, "succeeded")
    kinds = [(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)]
    assert kinds.count(("refund_requires_action", "operator")) == 1, kinds


async def test_no_terminal_event_makes_the_workflow_ask_the_provider(stack: Stack) -> None:
    case_id, _, refund_id = await pending_refund(stack)
    await stack.set_provider_status(refund_id, "succeeded", send_webhook=False)
    await stack.wait_for_status(case_id, "succeeded")
    assert "verify_state" in await stack.actions(case_id)


async def test_unknown_provider_status_goes_to_ops_never_to_success(stack: Stack) -> None:
    case_id, _, refund_id = await pending_refund(stack)
    await stack.set_provider_status(refund_id, "partially_reversed", send_webhook=False)
    row = await stack.wait_for_status(case_id, "ops_review")
    assert row["reserved_amount"] == 2_000
    assert ("unexpected_provider_status", "operator") in {
        (n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)}
    await stack.set_provider_status(refund_id, "succeeded", send_webhook=False)
    await stack.wait_for_status(case_id, "succeeded")


async def test_succeeded_then_failed_posts_a_compensating_entry_and_tells_everyone(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=120)
    try:
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund("alice", charge, 1_800)
        row = await stack.wait_for_status(case_id, "succeeded")
        await stack.set_provider_status(row["provider_refund_id"], "failed",
                                        failure_reason="expired_or_canceled_card")
        row = await stack.wait_for_status(case_id, "refund_failed")
        assert row["failure_reason"] == "expired_or_canceled_card" and row["reserved_amount"] == 0
        lines = await store.ledger.entries(case_id)
        balance: dict[str, int] = {}
        for line in lines:
            balance[line["account"]] = balance.get(line["account"], 0) + line["debit"] - line["credit"]
        assert balance == {"refunds_contra_revenue": 0, "provider_clearing": 0}
        assert {line["posting_key"] for line in lines} == {f"{case_id}:refund_settled",
                                                           f"{case_id}:refund_reversed"}
        assert {(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)} == {
            ("refund_succeeded", "requester"), ("refund_failed", "operator"),
            ("refund_could_not_be_processed", "customer")}
        await stack.set_provider_status(row["provider_refund_id"], "succeeded")  # never backwards
        await stack.set_provider_status(row["provider_refund_id"], "failed")
        assert (await store.cases.get(case_id))["status"] == "refund_failed"  # type: ignore[index]
        assert len(await store.ledger.entries(case_id)) == 4
    finally:
        await stack.close()


async def test_ledger_down_then_up_shows_pending_and_posts_exactly_once(
        store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str) -> None:
    import psycopg

    stack = await open_stack(store, client, temporal_server.address, ledger_pending_after_seconds=2)
    try:
        charge = await stack.charge(10_000)
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as blocker:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE")
                case_id = await stack.request_refund("alice", charge, 1_200)
                row = await stack.wait_for_status(case_id, "executed_ledger_pending", timeout=90)
                assert row["provider_refund_id"] is not None
                assert ("incident_ledger_pending", "finance_ops") in {
                    (n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)}
        await stack.wait_for_status(case_id, "succeeded", timeout=120)
        assert {line["posting_key"] for line in await store.ledger.entries(case_id)} == {
            f"{case_id}:refund_settled"}
        assert len(await stack.provider_refunds(charge)) == 1
        actions = await stack.actions(case_id)
        assert actions.count("provider_submit_started") == 1 and "ledger_recovered" in actions
    finally:
        await stack.close()


async def test_a_cancel_reported_for_a_refund_booked_succeeded_goes_to_ops(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A provider that says `canceled` about a refund it reported succeeded (and the ledger
    booked) contradicts itself: never applied backwards, never reversed on its word alone,
    and never left as an audit row nobody reads. The case goes to ops review and ops hear
    of it once, however often the word comes; a real failure after it is still compensated."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=120)
    try:
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund("alice", charge, 1_800)
        row = await stack.wait_for_status(case_id, "succeeded")
        await stack.set_provider_status(row["provider_refund_id"], "canceled")
        row = await stack.wait_for_status(case_id, "ops_review")
        assert row["provider_status"] == "succeeded"
        await stack.set_provider_status(row["provider_refund_id"], "canceled")  # the word again
        await stack.wait_for_audit(case_id, "provider_status_contradicted", count=2)
        await stack.set_provider_status(row["provider_refund_id"], "failed",
                                        failure_reason="expired_or_canceled_card")
        await stack.wait_for_status(case_id, "refund_failed")  # a failure is news: compensated
        assert [line["posting_key"] for line in await store.ledger.entries(case_id)
                if line["debit"]] == [f"{case_id}:refund_settled", f"{case_id}:refund_reversed"]
        kinds = [(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)]
        assert kinds.count(("provider_status_contradicted", "operator")) == 1, kinds
    finally:
        await stack.close()


async def contradiction_under_a_cancel(stack: Stack) -> str:
    """A refund booked succeeded that its provider then reports canceled, and ops cancel the
    case while its contradiction is being written; the run ends: the case."""
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_800)
    row = await stack.wait_for_status(case_id, "succeeded")
    with write_held(stack.store, "provider_status_contradicted") as held:
        await stack.set_provider_status(row["provider_refund_id"], "canceled")
        await asyncio.wait_for(held.wait(), 60)
        handle = stack.client.get_workflow_handle(case_id)
        await handle.cancel()
    await handle.result()
    return case_id


async def test_a_contradiction_a_cancel_interrupts_still_reaches_ops(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The provider said `canceled` about a refund booked succeeded, and ops cancelled the
    case while its contradiction (ops review, the ops notice) was being written: the run
    followed the refund it held, succeeded, and ended with the case shown succeeded and
    nobody told. The cancel writes the step it interrupted."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=120)
    try:
        case_id = await contradiction_under_a_cancel(stack)
        row = await stack.wait_for_status(case_id, "ops_review", timeout=10)
        assert row["provider_status"] == "succeeded"
        kinds = [(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)]
        assert kinds.count(("provider_status_contradicted", "operator")) == 1, kinds
    finally:
        await stack.close()
