"""One refund end to end through the relay, the workflow, the sandbox and the ledger."""

from tests.harness import Stack


async def test_small_refund_is_auto_approved_executed_once_and_posted(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 3_000)
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
        assert response.status_code == 202, response.text
        assert response.json()["requester"] == "alice"
    row = await stack.wait_for_status(body["refund_request_id"], "succeeded")
    assert row["provider_refund_id"].startswith("re_")
    refunds = await stack.provider_refunds(charge)
    assert [r["amount"] for r in refunds] == [3_000]
    lines = await stack.store.ledger.entries(body["refund_request_id"])
    assert sum(line["debit"] for line in lines) == sum(line["credit"] for line in lines) == 3_000
    trail = [e["action"] for e in await stack.store.audit.trail(body["refund_request_id"])]
    assert trail[0] == "request_received"
    assert "policy_decision" in trail and "ledger_posted" in trail and "refund_succeeded" in trail
