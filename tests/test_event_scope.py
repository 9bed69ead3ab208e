"""Events reach only their provider's cases: a verified event whose reference names
another provider's case does not signal that case; it is followed as the sending
provider's own refund instead."""

import uuid

import httpx

from domain.events import tracking_case_id
from domain.models import RefundRequest
from tests.harness import Stack
from tests.test_bad_input import event_body, signed


async def test_an_event_naming_another_providers_case_does_not_reach_it(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    foreign = RefundRequest.model_validate(stack.refund_body("ch_elsewhere", 1_000, provider="adyen"))
    await stack.store.create_case(foreign, "alice")
    refund_id = f"re_{uuid.uuid4().hex[:12]}"
    refund = {"id": refund_id, "object": "refund", "charge": charge, "amount": 1_000,
              "currency": "usd", "status": "succeeded",
              "metadata": {"refund_request_id": foreign.refund_request_id}}
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None
    body = event_body("refund.updated", refund)
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        response = await http.post("/webhooks/sandbox", content=body,
                                   headers=signed(secret.get_secret_value(), body))
    assert response.status_code == 200, response.text
    assert response.json()["workflow_id"] == tracking_case_id("sandbox", refund_id)
    assert await stack.actions(foreign.refund_request_id) == ["request_received"]
    row = await stack.store.get_case(foreign.refund_request_id)
    assert row is not None and row["provider_refund_id"] is None
