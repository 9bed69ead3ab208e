"""Fewer round trips per refund (issue 21) changes the workflow's steps, never what a case
shows: the audit trail and the notices of a refund are the rows they were before the
fold (recorded here from the code before `fewer-round-trips-1`; advice's row now lands
beside the money path, so order is compared on the money path's rows only)."""

from collections import Counter

from tests.harness import Stack

AUTO_APPROVED_ROWS = ["request_received", "validation_passed", "advice_recorded", "policy_decision",
                      "execution_started", "provider_submit_started", "provider_refund_created",
                      "ledger_posted", "notice_queued", "refund_succeeded"]
WITH_APPROVAL_ROWS = ["request_received", "validation_passed", "advice_recorded", "policy_decision",
                      "approval_requested", "notice_queued", "approval_granted", "notice_queued",
                      "execution_started", "provider_submit_started", "provider_refund_created",
                      "ledger_posted", "notice_queued", "refund_succeeded"]
MONEY_PATH = ("validation_passed", "policy_decision", "approval_requested", "approval_granted",
              "execution_started", "provider_submit_started", "provider_refund_created", "ledger_posted",
              "refund_succeeded")


async def finished(stack: Stack, case_id: str) -> tuple[list[str], list[str]]:
    """The case's audit actions and notice kinds once its workflow ended."""
    await stack.client.get_workflow_handle(case_id).result()
    return await stack.actions(case_id), [n["kind"] for n in await stack.store.outbox.notices(case_id)]


def assert_same_rows(actions: list[str], expected: list[str]) -> None:
    assert Counter(actions) == Counter(expected)
    assert [a for a in actions if a in MONEY_PATH] == [a for a in expected if a in MONEY_PATH]


async def test_an_auto_approved_refund_writes_the_rows_it_wrote_before(stack: Stack) -> None:
    case_id = await stack.request_refund("alice", await stack.charge(10_000), 3_000)
    actions, notices = await finished(stack, case_id)
    assert_same_rows(actions, AUTO_APPROVED_ROWS)
    assert notices == ["refund_succeeded"]


async def test_a_refund_with_one_approval_writes_the_rows_it_wrote_before(stack: Stack) -> None:
    case_id = await stack.request_refund("alice", await stack.charge(20_000), 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    async with stack.api("bob") as api:
        (await api.post(f"/v1/refund-requests/{case_id}/approvals",
                        json={"decision": "approve", "reason": "checked"})).raise_for_status()
    actions, notices = await finished(stack, case_id)
    assert_same_rows(actions, WITH_APPROVAL_ROWS)
    assert notices == ["approval_needed", "refund_approved", "refund_succeeded"]
