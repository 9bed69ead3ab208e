"""The request surface says only what a caller may say: fields the server sets are refused,
system ids cannot be taken first, and every refusal is a clear 4xx that changes nothing."""

from typing import Any

import pytest

from domain.events import tracking_case_id
from domain.models import RefundRequestBody, RequestSource
from domain.payouts import payout_case_id
from domain.reconciliation import break_workflow_id
from tests.harness import Stack
from tests.test_bad_input import assert_untouched
from tests.test_cli import run

SERVER_SET_FIELDS: dict[str, Any] = {
    "trigger_identities": ["carol", "frank"],  # approver shopping
    "parent_refund_request_id": "rr-someone-elses-failed-case",  # reissue hijack
    "source": "webhook",  # fake provenance
    "method": "bank_transfer",
}


@pytest.mark.parametrize("field", list(SERVER_SET_FIELDS))
async def test_fields_the_server_sets_are_refused_from_a_caller(stack: Stack, field: str) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 3_000, **{field: SERVER_SET_FIELDS[field]})
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 422, response.text
    assert any(e["loc"][-1] == field for e in response.json()["detail"]), response.text
    await assert_untouched(stack, body["refund_request_id"], charge)
    refused = [e for e in await stack.store.audit.trail("") if e["action"] == "action_refused"
               and e["actor"] == "alice" and field in e["detail"]["refusal"]]
    assert refused, "the refusal is recorded under the caller's name"


async def test_a_request_records_its_channel_not_what_the_caller_claims(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    api_case = await stack.request_refund("alice", charge, 1_000)
    body = stack.refund_body(charge, 1_000)
    async with stack.api("alice") as api:
        cli = await api.post("/v1/refund-requests", json=body, headers={"X-Refund-Channel": "cli"})
        forged = await api.post("/v1/refund-requests", json=stack.refund_body(charge, 1_000),
                                headers={"X-Refund-Channel": "webhook"})
    assert cli.status_code == 202 and forged.status_code == 202
    assert (api_case_row := await stack.store.cases.get(api_case)) is not None
    assert (api_case_row["source"], cli.json()["source"], forged.json()["source"]) == ("api", "cli", "api")


async def test_a_repeat_through_another_channel_is_the_same_request(stack: Stack) -> None:
    """The channel says how a request came, not what it asks: the CLI's request that timed
    out, sent again with curl, is the same refund (200), recorded under its first channel;
    other values under the id are still a conflict."""
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_000)
    async with stack.api("alice") as api:
        first = await api.post("/v1/refund-requests", json=body, headers={"X-Refund-Channel": "cli"})
        again = await api.post("/v1/refund-requests", json=body)
        other = await api.post("/v1/refund-requests", json={**body, "amount": 1_001})
    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 409), again.text
    assert again.json()["source"] == "cli"


async def test_a_repeat_through_another_channel_starts_the_case_as_it_was_stored(stack: Stack) -> None:
    """The first request's row was committed but its workflow never started (Temporal away:
    503, "send the same request again"); the caller sends it again through another channel.
    The repeat starts the workflow with the stored request: started with the repeat's own
    copy (another channel, so another fingerprint than the row's), validation refused it as
    not the stored request and the case stayed `requested` with no refund (reproduced)."""
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_000)
    stored = RefundRequestBody.model_validate(body).as_request(RequestSource.CLI)
    await stack.store.cases.create(stored, "alice")  # the CLI's request; its start never happened
    async with stack.api("alice") as api:
        again = await api.post("/v1/refund-requests", json=body)
    assert again.status_code == 200, again.text
    await stack.wait_for_status(body["refund_request_id"], "succeeded")
    assert [r["amount"] for r in await stack.provider_refunds(charge)] == [1_000]


SYSTEM_IDS = {
    "reconciliation_break": break_workflow_id(43),
    "payout_exception": payout_case_id("sandbox", "po_1"),
    "provider_made_refund": tracking_case_id("sandbox", "re_1"),
    "servicenow_ticket": "servicenow-0123456789abcdef0123456789abcdef",
    "provider_request": "sandbox-rrq_squatted",
    "reissue": "rr-someone-elses-case-r1",
    "scheduled_reconciliation": "reconcile-refunds-sandbox-2026-12-05T02:00:00Z",
    "backfill_run": "reconcile-sandbox-backfill-0123456789ab",
}


@pytest.mark.parametrize("kind", list(SYSTEM_IDS))
async def test_a_caller_cannot_take_a_system_id_first(stack: Stack, kind: str) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 3_000, refund_request_id=SYSTEM_IDS[kind])
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "refund_request_id"
    assert await stack.store.cases.get(SYSTEM_IDS[kind]) is None


@pytest.mark.parametrize("case_id", ["my-order-refund-1", "recon-breakfast-1", "servicenow", "rr-1",
                                     "reconciled-1", "order-r1x"])
def test_caller_ids_that_only_look_alike_are_accepted(case_id: str) -> None:
    body = RefundRequestBody(refund_request_id=case_id, provider="sandbox", charge_id="ch_1",
                             amount=1, currency="USD", merchant_account="acct_1",
                             reason="other")
    assert body.refund_request_id == case_id


async def test_the_cli_request_says_only_what_a_caller_may_say(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    case_id = stack.new_id("cli")
    made = await run("request", "--id", case_id, "--charge", charge, "--amount", "10.00",
                     "--currency", "USD", "--merchant", "acct_1", "--evidence", "order_id=o-9",
                     env={"REFUNDS_RELAY_URL": stack.relay_url, "REFUNDS_TOKEN": stack.tokens["alice"]})
    assert made.returncode == 0, made.stdout + made.stderr
    row = await stack.store.cases.get(case_id)
    assert row is not None and (row["source"], row["requester"], row["amount"]) == ("cli", "alice", 1_000)
