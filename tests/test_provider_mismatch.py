"""A refund the provider holds under a case's reference for another amount (or currency) than
the request is money moved other than asked: the case books what the provider
reports, goes to ops review and ops hear of it; it never shows the request as done."""

from domain.events import refund_mismatch
from domain.models import ProviderRefund, ProviderRefundStatus, RefundReason, RefundRequest
from tests.harness import Stack
from workers.case_sweep import sweep_cases_once


async def test_a_refund_found_for_another_amount_goes_to_ops_and_books_what_moved(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_500)
    case_id = body["refund_request_id"]
    [made] = await stack.made_elsewhere(charge, case_id, 1_400)
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    # the mismatch (and ops review) is written before the provider's word is applied
    trail = await stack.wait_for_audit(case_id, "refund_succeeded")
    row = await stack.wait_for_status(case_id, "ops_review")
    assert row["provider_refund_id"] == made and len(await stack.provider_refunds(charge)) == 1
    assert trail.index("provider_refund_mismatch") < trail.index("refund_succeeded")
    [mismatch] = [e for e in await stack.store.audit.trail(case_id)
                  if e["action"] == "provider_refund_mismatch"]
    assert (mismatch["detail"]["requested"], mismatch["detail"]["reported"]) == ("15.00 USD", "14.00 USD")
    kinds = {(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)}
    assert ("provider_refund_mismatch", "operator") in kinds
    assert [x["debit"] for x in await stack.store.ledger.entries(case_id)] == [1_400, 0]
    # the workflow left the case to ops on purpose: the closed-workflow sweep has nothing to add
    await stack.client.get_workflow_handle(case_id).result()
    assert case_id not in await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=0)
    assert "workflow_closed_case_swept" not in await stack.actions(case_id)
    # and it is not asked about again on every pass (each pass asked Temporal about every
    # such case, for good), until something moves it
    assert case_id not in {r["refund_request_id"] for r in await stack.store.cases.idle_open(0, 10_000)}
    await stack.store.database.execute(
        "UPDATE refund_cases SET updated_at = now() WHERE refund_request_id = %s", (case_id,))
    assert case_id in {r["refund_request_id"] for r in await stack.store.cases.idle_open(0, 10_000)}


def _request(amount: int = 1_500, currency: str = "USD") -> RefundRequest:
    return RefundRequest(refund_request_id="rr-m", provider="sandbox", charge_id="ch_1", amount=amount,
                         currency=currency, merchant_account="acct_1",
                         reason=RefundReason.REQUESTED_BY_CUSTOMER, evidence={"order_id": "o-1"})


def _reported(amount: int = 1_500, currency: str = "USD") -> ProviderRefund:
    return ProviderRefund(provider="sandbox", refund_id="re_1", charge_id="ch_1", amount=amount,
                          currency=currency, status=ProviderRefundStatus.SUCCEEDED, raw_status="succeeded")


def test_amount_and_currency_are_compared() -> None:
    assert refund_mismatch(_request(), _reported()) is None
    assert refund_mismatch(_request(currency="JPY", amount=1_500), _reported(currency="JPY")) is None
    assert refund_mismatch(_request(), _reported(amount=1_501)) == {
        "requested": "15.00 USD", "reported": "15.01 USD"}
    assert refund_mismatch(_request(), _reported(currency="EUR")) is not None  # same digits, other money
    assert refund_mismatch(_request(currency="KWD"), _reported(currency="KWD")) is None
    assert refund_mismatch(_request(currency="JPY", amount=1_500), _reported(currency="JPY", amount=15)) == {
        "requested": "1500 JPY", "reported": "15 JPY"}  # a provider reading a yen amount as cents
