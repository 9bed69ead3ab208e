"""A payout case whose workflow was terminated mid-way is found by the closed-workflow sweep
and handed to ops: `ops_review`, a reconciliation break, an audit row and an ops notice. The
beneficiary hold stays: the sweep never releases money state on its own (issue 18, item 4)."""

from typing import Any

import pytest

from domain.payouts import payout_case_id
from tests.harness import Stack
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
    held = [h["released_at"] for h in await stack.store.payouts.beneficiary_holds(payout.beneficiary_id)]
    held_payout = await stack.store.payouts.payout(payout.id)
    assert held_payout is not None
    if stage == "remediated":  # the hold stays for ops to decide on
        assert held == [None] and held_payout.status == "on_hold"
    else:
        assert held == [] and held_payout.status == "paid"
    assert case_id not in await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=0)
