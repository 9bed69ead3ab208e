"""A payout case whose workflow was terminated mid-way is found by the closed-workflow sweep
and handed to ops: `ops_review`, a reconciliation break, an audit row and an ops notice. The
beneficiary hold stays: the sweep never releases money state on its own (issue 18, item 4)."""

from typing import Any

import pytest
from temporalio.client import Client

from adapters.db import Store
from adapters.notify.message import render
from domain.payouts import payout_case_id
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.payouts_kit import add_payout_approvers, decide, move_payout, paid_payout, wait_for_case
from workers.case_sweep import sweep_cases_once


async def _break(stack: Stack, case_id: str) -> dict[str, Any] | None:
    async with stack.store.database.transaction() as conn:
        cur = await conn.execute("SELECT * FROM reconciliation_breaks WHERE refund_request_id = %s"
                                 " AND break_class = 'workflow_closed'", (case_id,))
        return await cur.fetchone()


@pytest.mark.parametrize("stage", ["awaiting_approval", "remediated"])
async def test_a_terminated_payout_case_goes_to_ops_with_its_hold_kept(stack: Stack, stage: str) -> None:
    await add_payout_approvers(stack)
    payout = await paid_payout(stack, 300_000)
    await move_payout(stack, payout.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    if stage == "remediated":  # held and reversed; its reissue window is open
        assert (await decide(stack, "lena", case_id)).status_code == 202
        await wait_for_case(stack, case_id, "remediated")
    await stack.client.get_workflow_handle(case_id).terminate("terminated in the Temporal UI")

    swept = await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=0)

    row = await stack.store.payouts.case(case_id)
    assert case_id in swept and row is not None and row["status"] == "ops_review"
    found = await _break(stack, case_id)
    assert found is not None and (found["state"], found["object_kind"]) == ("ops_review", "payout")
    assert (found["evidence"]["workflow_status"], found["evidence"]["case_status"]) == ("TERMINATED", stage)
    trail = await stack.store.audit.trail(case_id)
    assert "workflow_closed_case_swept" in [e["action"] for e in trail]
    notices = [(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)]
    assert ("workflow_closed", "payments_ops") in notices
    notice = await stack.store.outbox.notice(f"{case_id}:workflow_closed")
    assert notice is not None
    told = render(notice, None, None, case_url=None, email_to=None)
    shown = notice["detail"]["payout_id"]
    assert told.title.startswith(f"Payout {shown}") and "TERMINATED" in told.text, told
    assert ("Payout", shown) in told.facts and told.ticket == "incident"
    held = [h["released_at"] for h in await stack.store.payouts.beneficiary_holds(payout.beneficiary_id)]
    held_payout = await stack.store.payouts.payout(payout.id)
    assert held_payout is not None
    if stage == "remediated":  # the hold stays for ops to decide on
        assert held == [None] and held_payout.status == "on_hold"
    else:
        assert held == [] and held_payout.status == "paid"
    assert case_id not in await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=0)


async def test_a_case_remediated_past_its_reissue_window_is_asked_about_once(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A remediated case's workflow completes when its reissue window closes; the case stays
    remediated, as it should. The sweep hands it to nobody, and no longer asks Temporal
    about it on every pass for good (every such case was described on every pass)."""
    stack = await open_stack(store, client, temporal_server.address, payout_reissue_window_seconds=1)
    try:
        await add_payout_approvers(stack)
        payout = await paid_payout(stack, 300_000)
        await move_payout(stack, payout.provider_payout_id, "failed", failure_code="account_closed")
        case_id = payout_case_id("sandbox", payout.provider_payout_id)
        await wait_for_case(stack, case_id, "awaiting_approval")
        assert (await decide(stack, "lena", case_id)).status_code == 202
        await wait_for_case(stack, case_id, "remediated")
        await stack.client.get_workflow_handle(case_id).result()  # the window closed
        swept = await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=0)
        assert case_id not in swept and await _break(stack, case_id) is None
        assert case_id not in {r["case_id"] for r in await stack.store.payouts.idle_open(0, 10_000)}
    finally:
        await stack.close()
