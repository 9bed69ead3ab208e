"""Events reach only their provider's cases: a verified event whose reference names
another provider's case does not signal that case; it is followed as the sending
provider's own refund instead."""

import uuid

import httpx
from temporalio.client import Client

from adapters.db import Store
from domain.events import tracking_case_id
from domain.models import RefundRequest
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, foreign_refund_event
from tests.test_adyen import MERCHANT, adyen_rig, notification
from tests.test_bad_input import event_body, signed
from workflows.refund import RefundWorkflow


async def test_an_event_naming_another_providers_case_does_not_reach_it(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    foreign = RefundRequest.model_validate(stack.refund_body("ch_elsewhere", 1_000, provider="adyen"))
    await stack.store.cases.create(foreign, "alice")
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
    row = await stack.store.cases.get(foreign.refund_request_id)
    assert row is not None and row["provider_refund_id"] is None


async def test_the_notification_wait_takes_only_its_providers_events(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Adyen has no status lookup, so a case whose create answer was lost waits for the
    notification; an event naming the case from another provider (here signalled straight
    to the workflow) must not end that wait."""
    async with adyen_rig(store, client, temporal_server, charges_from_fake=True,
                         late_failure_window_seconds=3) as rig:
        psp = rig.fake.payment(10_000, "EUR", MERCHANT)
        rig.proxy.lose_next("POST", f"/v71/payments/{psp}/refunds")
        case_id = await rig.stack.request_refund("alice", psp, 1_800, provider="adyen",
                                                 currency="EUR", merchant_account=MERCHANT)
        await rig.stack.wait_for_audit(case_id, "awaiting_provider_notification")
        foreign = foreign_refund_event("sandbox", case_id, psp, 1_800, "EUR")
        await client.get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, foreign)
        [made] = rig.fake.refunds_of(psp)
        body = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                            merchantReference=case_id, amount={"currency": "EUR", "value": 1800})
        assert (await rig.post(body)).text == "[accepted]"
        await rig.stack.wait_for_status(case_id, "succeeded")
        # and neither after: the late-failure watch leaves the foreign event alone too (the
        # workflow ends once its watch does; the case must still read succeeded then)
        await client.get_workflow_handle(case_id).result()
        row = await rig.stack.store.cases.get(case_id)
        assert row is not None and row["status"] == "succeeded"
        assert row["provider_refund_id"] == made["pspReference"]
        assert "duplicate_provider_refund" not in await rig.stack.actions(case_id)
