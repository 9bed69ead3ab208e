"""A provider's word about a refund whose case has closed (its late-failure watch over, its
workflow gone) is never left as an audit row alone: a terminal status the case does not
show is reconciled at once, as a run would find it, into a break that waits for its tier's
approvals before any entry is posted. The failure the product exists for (a refund shown
refunded that the provider failed days later) reaches ops however late it comes, for
providers a run cannot list (Adyen) too. A status that tells nothing new opens nothing."""

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client

from adapters.db import Store
from domain.models import CaseStatus, ProviderRefund, ProviderRefundStatus
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.harness import Stack
from tests.reconciliation_kit import history, seed_case, seed_provider, wait_for_breaks
from tests.test_adyen import adyen_rig, notification, refunded
from tests.test_reconciliation import decide


async def breaks_of(stack: Stack, object_id: str) -> list[dict[str, Any]]:
    return await stack.store.database.fetch_all(
        "SELECT * FROM reconciliation_breaks WHERE object_id = %s", (object_id,))


async def closed_case(stack: Stack, days_ago: float = 20) -> tuple[dict[str, Any], str]:
    """A refund the provider holds and a case that showed it refunded, its workflow long
    gone (older than a scheduled run's 14-day window)."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=days_ago)
    await seed_provider(stack, [refund])
    return refund, await seed_case(stack, refund)


async def test_a_failure_after_the_case_closed_opens_a_break_that_compensates_once_approved(
        stack: Stack) -> None:
    refund, case_id = await closed_case(stack)
    await stack.set_provider_status(refund["id"], "failed", failure_reason="expired_or_canceled_card")
    [found] = await wait_for_breaks(stack, [str(refund["id"])], "awaiting_approval")
    assert (found["break_class"], found["refund_request_id"]) == ("provider_failed_shown_refunded", case_id)
    trail = await stack.store.audit.trail(case_id)
    assert {"event_after_close", "reconciliation_break_found"} <= {e["action"] for e in trail}
    notices = await stack.store.database.fetch_all(
        "SELECT kind, audience FROM notices WHERE refund_request_id = %s", (case_id,))
    assert {"kind": "reconciliation_break", "audience": "ops"} in notices
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2

    assert (await decide(stack, "carol", int(found["id"]))).status_code == 202
    await wait_for_breaks(stack, [str(refund["id"])], "resolved")
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["provider_status"]) == ("refund_failed", "failed")
    templates = [e["template"] for e in await stack.store.ledger.entries(case_id)]
    assert sorted(templates) == ["refund_reversed"] * 2 + ["refund_settled"] * 2


async def test_whoever_approved_the_failure_s_compensation_does_not_reissue_it(stack: Stack) -> None:
    """Approving a late failure's break says the refund's money did not move (the case
    goes to refund_failed): as a wait's resolution or a transfer's confirmation does. That
    person then reissued it alone (auto-approved), or approved another's reissue (reproduced):
    one person said the money stayed and paid it again. They stand behind the reissue."""
    refund, case_id = await closed_case(stack)
    both = f"ana-{uuid.uuid4().hex[:6]}"
    stack.tokens[both] = await stack.store.access.create_token(both, ["approver", "ops"], by="test")
    await stack.set_provider_status(refund["id"], "failed", failure_reason="expired_or_canceled_card")
    [found] = await wait_for_breaks(stack, [str(refund["id"])], "awaiting_approval")
    assert (await decide(stack, both, int(found["id"]))).status_code == 202
    await wait_for_breaks(stack, [str(refund["id"])], "resolved")
    await stack.wait_for_status(case_id, "refund_failed")
    async with stack.api(both) as api:
        own = await api.post(f"/v1/refund-requests/{case_id}/reissue",
                             json={"method": "provider", "reason": "customer has a new card"})
    assert own.status_code == 403 and "said what this request's money did" in own.json()["detail"], own.text
    async with stack.api("olga") as api:
        asked = await api.post(f"/v1/refund-requests/{case_id}/reissue",
                               json={"method": "provider", "reason": "customer has a new card"})
    assert asked.status_code == 202, asked.text
    child = await stack.store.cases.get(asked.json()["refund_request_id"])
    assert child is not None and both in child["trigger_identities"]


async def settled_deliveries(stack: Stack, case_id: str, count: int) -> list[int]:
    """Waits until `count` deliveries routed to the case are processed (the relay has done
    all it does with them); returns their receipt ids."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        rows = await stack.store.database.fetch_all(
            "SELECT id FROM webhook_receipts WHERE workflow_id = %s AND processed_at IS NOT NULL"
            " ORDER BY id", (case_id,))
        if len(rows) >= count:
            return [int(r["id"]) for r in rows]
        assert asyncio.get_running_loop().time() < deadline, f"{len(rows)} of {count} processed"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("status", ["succeeded", "pending"])
async def test_a_late_status_that_may_be_an_old_delivery_opens_nothing(stack: Stack, status: str) -> None:
    """A success or a pending may be an old delivery arriving late (a failure may already
    have followed it): audited, never taken as the provider's word."""
    refund, case_id = await closed_case(stack)
    await stack.set_provider_status(refund["id"], status)
    await settled_deliveries(stack, case_id, 1)
    assert "event_after_close" in await stack.actions(case_id)
    assert await breaks_of(stack, str(refund["id"])) == []


@pytest.mark.parametrize("ops_read_refunded_first", [False, True], ids=["provider_only", "ops_before"])
async def test_a_late_success_of_a_refund_the_provider_failed_opens_nothing(
        stack: Stack, ops_read_refunded_first: bool) -> None:
    """The provider failed this very refund (the case shows it): a success for it is an
    older delivery than that failure (a failed refund never succeeds). Also when ops had
    resolved the wait "refunded" before the provider's late failure: ops' earlier reading
    does not make the success news."""
    refund, case_id = await closed_case(stack)
    if ops_read_refunded_first:
        await stack.store.audit.record(case_id, "olga", "provider_wait_resolved",
                                       {"provider_shows": "refunded"})
        await stack.store.audit.record(case_id, "provider:sandbox", "refund_failed_after_success",
                                       {"source": f"webhook:refund.failed:evt_{uuid.uuid4().hex[:8]}"})
    await stack.store.database.execute(
        "UPDATE refund_cases SET status = 'refund_failed', provider_status = 'failed'"
        " WHERE refund_request_id = %s", (case_id,))
    await stack.set_provider_status(refund["id"], "succeeded")
    await settled_deliveries(stack, case_id, 1)
    assert await breaks_of(stack, str(refund["id"])) == []


async def test_a_second_refund_with_the_case_s_reference_after_close_is_a_duplicate_for_ops(
        stack: Stack) -> None:
    """The case closed holding its refund; another refund carrying its reference succeeds
    (a dashboard retry, a second create): money moved twice, whenever the word comes. It is a
    `duplicate_refund` break in ops review, announced; nothing is compensated on its own."""
    refund, case_id = await closed_case(stack)
    second = history(str(refund["charge"]), 2_000, days_ago=0.01, status="pending", reference=case_id)
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/import", json={"charges": [], "refunds": [second]})).raise_for_status()
    await stack.set_provider_status(second["id"], "succeeded")
    [found] = await wait_for_breaks(stack, [str(second["id"])], "ops_review")
    assert (found["break_class"], found["refund_request_id"]) == ("duplicate_refund", case_id)
    notices = await stack.store.database.fetch_all(
        "SELECT kind, audience FROM notices WHERE refund_request_id = %s", (case_id,))
    assert {"kind": "reconciliation_break", "audience": "ops"} in notices
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2


@pytest.mark.parametrize(("final", "found_as", "after"), [
    ("failed", "stuck_non_terminal", ("refund_failed", [])),
    ("succeeded", "provider_succeeded_shown_pending", ("succeeded", ["refund_settled"] * 2))])
async def test_a_final_word_for_a_case_its_workflow_left_pending_opens_a_break(
        stack: Stack, final: str, found_as: str, after: tuple[str, list[str]]) -> None:
    """A tracking case ends without a final status after its watch (no event for the whole
    window): the case shows the refund pending, its amount reserved. Nothing moves it any
    more, so the provider's later failure or success is news however soon it comes: a break,
    and once approved the case, its reservation and the ledger follow the provider."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=0.5, status="pending")
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, status=CaseStatus.PENDING, held=ProviderRefundStatus.PENDING,
                              settled=0)
    await stack.set_provider_status(refund["id"], final)
    [found] = await wait_for_breaks(stack, [str(refund["id"])], "awaiting_approval")
    assert (found["break_class"], found["refund_request_id"]) == (found_as, case_id)
    assert (await decide(stack, "carol", int(found["id"]))).status_code == 202
    await wait_for_breaks(stack, [str(refund["id"])], "resolved")
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["provider_status"]) == (after[0], final)
    assert case["reserved_amount"] == (2_000 if final == "succeeded" else 0)
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == after[1]


async def test_a_late_success_for_a_case_ops_cancelled_opens_a_break(stack: Stack) -> None:
    """Cancelled by ops after a submit whose answer never came, its last lookup finding
    nothing (Adyen and Cashfree cannot be listed): the case shows no refund and its
    reservation is released, so the provider's later success is news, not an old delivery."""
    charge = f"ch_{uuid.uuid4().hex[:8]}"
    case_id = stack.new_id("cancelled")
    refund = history(charge, 2_000, days_ago=20, reference=case_id)
    await seed_provider(stack, [refund])
    await seed_case(stack, refund, status=CaseStatus.CANCELED_BY_OPS, settled=0)
    await stack.store.database.execute(  # it never learned the refund's id
        "UPDATE refund_cases SET provider_refund_id = NULL, provider_status = NULL, reserved_amount = 0"
        " WHERE refund_request_id = %s", (case_id,))
    await stack.set_provider_status(refund["id"], "succeeded")
    [found] = await wait_for_breaks(stack, [str(refund["id"])], "awaiting_approval")
    assert (found["break_class"], found["refund_request_id"]) == ("provider_succeeded_shown_pending", case_id)


async def test_the_same_late_failure_delivered_again_opens_one_break(stack: Stack) -> None:
    refund, case_id = await closed_case(stack)
    await stack.set_provider_status(refund["id"], "canceled")
    await wait_for_breaks(stack, [str(refund["id"])], "awaiting_approval")
    [first] = await settled_deliveries(stack, case_id, 1)
    desk = WebhookDesk(stack.store, stack.client, stack.providers, stack.settings)
    replayed = await desk.replay(first)  # the same event again (a replay)
    assert replayed is not None and replayed.status_code == 200
    await stack.set_provider_status(refund["id"], "canceled")  # another event, the same news
    await settled_deliveries(stack, case_id, 2)
    assert len(await breaks_of(stack, str(refund["id"]))) == 1
    assert (await stack.actions(case_id)).count("reconciliation_break_found") == 1


async def test_one_late_event_classified_twice_at_once_makes_one_run_and_one_break(stack: Stack) -> None:
    """Two relays re-driving the same delivery at once: the second finds the first's run
    (its batch refused as moved on) and neither fails."""
    refund, case_id = await closed_case(stack)
    truth = ProviderRefund(provider="sandbox", refund_id=str(refund["id"]), charge_id=str(refund["charge"]),
                           amount=2_000, currency="USD", status=ProviderRefundStatus.FAILED,
                           raw_status="failed", reference=case_id)
    event_id = f"evt_{uuid.uuid4().hex[:12]}"
    recon = stack.store.reconciliation
    runs = await asyncio.gather(*(recon.reconcile_event("sandbox", event_id, truth, datetime.now(UTC),
                                                        "provider:sandbox") for _ in range(2)))
    assert runs == [f"late-event-sandbox-{event_id}"] * 2
    [made] = await breaks_of(stack, str(refund["id"]))
    assert (made["break_class"], made["state"]) == ("provider_failed_shown_refunded", "new")
    assert (await stack.actions(case_id)).count("reconciliation_break_found") == 1


async def test_an_adyen_reversal_after_the_watch_ended_opens_a_break(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Adyen has no refund listing, so no run would ever find this: REFUNDED_REVERSED after
    the case's late-failure watch ended (1 s here, 10 days by default)."""
    async with adyen_rig(store, client, temporal_server, charges_from_fake=True,
                         late_failure_window_seconds=1) as rig:
        case_id, fields = await refunded(rig, 1200)
        await rig.stack.client.get_workflow_handle(case_id).result()  # the watch ended
        assert (await rig.post(notification("REFUNDED_REVERSED", **fields))).text == "[accepted]"
        [found] = await wait_for_breaks(rig.stack, [fields["pspReference"]], "awaiting_approval")
        assert found["break_class"] == "provider_failed_shown_refunded"
        assert found["refund_request_id"] == case_id
        assert found["failure_reason"] == "REFUNDED_REVERSED: Account closed"
        assert {e["template"] for e in await rig.stack.store.ledger.entries(case_id)} == {"refund_settled"}


@pytest.mark.parametrize("event_date", ["2026-11-30T10:00:00", "0001-01-01T00:00:00+14:00"])
async def test_an_event_time_without_an_offset_or_out_of_range_is_read_or_refused_never_a_500(
        store: Store, client: Client, temporal_server: TemporalDevServer, event_date: str) -> None:
    """eventDate is outside Adyen's HMAC and the adapters read times with `fromisoformat`: one
    without an offset (naive) met the run window's aware times after the case closed (500,
    the receipt stuck accepted, the reversal never a break), and one before year 1 in UTC
    was stored as a BC timestamp psycopg cannot read back. A naive time is UTC (as Rainforest
    documents its times; the others always send an offset): the reversal is a break. One
    out of range is a malformed delivery (400), recorded, changing nothing."""
    async with adyen_rig(store, client, temporal_server, charges_from_fake=True,
                         late_failure_window_seconds=1) as rig:
        case_id, fields = await refunded(rig, 1300)
        await rig.stack.client.get_workflow_handle(case_id).result()  # the watch ended
        answer = await rig.post(notification("REFUNDED_REVERSED", eventDate=event_date, **fields))
        psp = fields["pspReference"]

        async def receipt() -> dict[str, Any]:
            [row] = await rig.stack.store.database.fetch_all(
                "SELECT verdict, processed_at FROM webhook_receipts WHERE provider = 'adyen'"
                " AND event_id = %s", (f"REFUNDED_REVERSED:{psp}:true",))
            return row

        if event_date.endswith("+14:00"):
            assert answer.status_code == 400, answer.text
            assert (await receipt())["verdict"] == "unreadable" and await breaks_of(rig.stack, psp) == []
            return
        assert answer.text == "[accepted]"
        [found] = await wait_for_breaks(rig.stack, [psp], "awaiting_approval")
        assert (found["break_class"], found["refund_request_id"]) == ("provider_failed_shown_refunded",
                                                                      case_id)
        assert (await receipt())["processed_at"] is not None


async def settled(stack: Stack, break_id: int) -> str:
    """The state a break ends in once its exception case has settled it."""
    async with asyncio.timeout(60):  # guards against a hang, not a measured wait
        while True:
            row = await stack.store.reconciliation.get_break(break_id)
            if row is not None and row["resolution"] is not None:
                return str(row["state"])
            await asyncio.sleep(0.1)


async def test_an_approval_for_a_provider_word_overtaken_by_a_later_one_moves_no_money(stack: Stack) -> None:
    """A break waits days for its approvers; meanwhile the provider changes its word on the
    same refund (a later event or run finds it failed: another break). Approving the first
    must not post what the provider no longer says: it goes to ops review, nothing posted;
    the later break decides."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=0.5, status="pending")
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, status=CaseStatus.PENDING, held=ProviderRefundStatus.PENDING,
                              settled=0)
    await stack.set_provider_status(refund["id"], "succeeded")
    [succeeded] = await wait_for_breaks(stack, [str(refund["id"])], "awaiting_approval")
    await stack.set_provider_status(refund["id"], "failed", failure_reason="expired_or_canceled_card")
    both: list[dict[str, Any]] = []
    async with asyncio.timeout(60):  # guards against a hang, not a measured wait
        while len(both) < 2:  # the later word's break
            both = await wait_for_breaks(stack, [str(refund["id"])], "awaiting_approval")
            await asyncio.sleep(0.1)
    [failed] = [b for b in both if b["id"] != succeeded["id"]]
    assert succeeded["break_class"] == "provider_succeeded_shown_pending"
    assert failed["provider_status"] == "failed"

    assert (await decide(stack, "carol", int(succeeded["id"]))).status_code == 202
    assert await settled(stack, int(succeeded["id"])) == "ops_review"
    assert await stack.store.ledger.entries(case_id) == []
    case = await stack.store.cases.get(case_id)
    assert case is not None and case["status"] == "pending"
    assert (await decide(stack, "carol", int(failed["id"]))).status_code == 202
    assert await settled(stack, int(failed["id"])) == "resolved"
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["reserved_amount"]) == ("refund_failed", 0)
    assert await stack.store.ledger.entries(case_id) == []
