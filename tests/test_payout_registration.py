"""Registering payouts the internal payments system made: the relay's `POST /v1/payouts`
(token and role, pydantic validation, idempotent on the payout id, audited) and the
`refunds payouts` commands (real processes, exit codes)."""

import uuid
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.payout import PayoutActivities
from adapters.policy_file import load_policy
from adapters.providers.base import AmountLimit
from domain import errors
from domain.payouts import PayoutStatus, ReissueInput, payout_case_id
from tests.harness import Stack
from tests.payouts_kit import (
    add_payout_approvers,
    ask_reissue,
    decide,
    move_payout,
    reissues_at_provider,
    remediate,
    wait_for_case,
)
from tests.test_cli import run


def registration(**overrides: Any) -> dict[str, Any]:
    body = {"id": f"P-{uuid.uuid4().hex[:10]}", "provider": "sandbox",
            "provider_payout_id": f"po_{uuid.uuid4().hex[:12]}", "beneficiary_id": "ben-77",
            "amount": 1_250_000, "currency": "usd"}
    return {**body, **overrides}


async def register(stack: Stack, body: dict[str, Any], user: str = "olga") -> Any:
    async with stack.api(user) as api:
        return await api.post("/v1/payouts", json=body)


async def test_a_registration_books_once_and_the_same_again_is_a_no_op(stack: Stack) -> None:
    body = registration()
    first = await register(stack, body)
    assert first.status_code == 201, first.text
    assert first.json()["created"] is True and first.json()["payout"]["currency"] == "USD"
    case_id = payout_case_id("sandbox", body["provider_payout_id"])
    assert first.json()["case_id"] == case_id
    again = await register(stack, body)
    assert again.status_code == 200 and again.json()["created"] is False
    booked = await stack.store.payouts.payout(body["id"])
    assert booked is not None
    assert (booked.status, booked.amount, booked.currency) == ("paid", 1_250_000, "USD")
    trail = await stack.store.audit.trail(case_id)
    [registered] = [e for e in trail if e["action"] == "payout_registered"]
    assert registered["actor"] == "olga" and registered["detail"]["amount"] == 1_250_000


@pytest.mark.parametrize("change", ["provider_removed", "maximum_lowered"])
async def test_a_registration_sent_again_gets_its_booking_whatever_the_entry_rules_say_now(
        stack: Stack, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """After a deploy removed the provider or lowered its maximum, the payments system's
    resend of a booked payout was answered 422 and audited as refused (reproduced): it would
    take the payout for unregistered while its failure still opens a case. The entry rules
    judge a payout not booked yet."""
    body = registration(amount=5_000)
    assert (await register(stack, body)).status_code == 201
    if change == "provider_removed":
        monkeypatch.delitem(stack.providers, "sandbox")
    else:
        monkeypatch.setattr(stack.providers["sandbox"], "max_amount", AmountLimit(100, "lowered"))
    again = await register(stack, body)
    assert (again.status_code, again.json().get("created")) == (200, False), again.text
    assert (await register(stack, {**body, "amount": 5_001})).status_code == 409
    fresh = await register(stack, registration(amount=5_000))
    assert fresh.status_code == 422, fresh.text
    refused = [e for e in await stack.store.audit.trail(payout_case_id("sandbox", body["provider_payout_id"]))
               if e["action"] == "payout_registration_refused"]
    assert [e["detail"]["refusal"].startswith("payout") for e in refused] == [True]  # the 409 only


@pytest.mark.parametrize("change", [{"amount": 1_250_001}, {"beneficiary_id": "ben-other"},
                                    {"id": "same-provider-payout"}],
                         ids=["amount", "beneficiary", "provider-payout-id-under-another-id"])
async def test_the_same_payout_with_other_data_is_a_409_and_changes_nothing(
        stack: Stack, change: dict[str, Any]) -> None:
    body = registration()
    assert (await register(stack, body)).status_code == 201
    other = {**body, **change}
    if "id" in change:
        other["id"] = f"P-{uuid.uuid4().hex[:10]}"
    refused = await register(stack, other)
    assert refused.status_code == 409 and "already registered with other data" in refused.json()["detail"]
    booked = await stack.store.payouts.payout(body["id"])
    assert booked is not None and (booked.amount, booked.beneficiary_id) == (1_250_000, "ben-77")
    if "id" in change:
        assert await stack.store.payouts.payout(other["id"]) is None
    trail = await stack.store.audit.trail(payout_case_id("sandbox", body["provider_payout_id"]))
    assert [e["action"] for e in trail] == ["payout_registered", "payout_registration_refused"]


@pytest.mark.parametrize(("change", "where"), [
    ({"amount": 0}, "amount"), ({"amount": -5}, "amount"), ({"amount": 12.5}, "amount"),
    ({"amount": "1250"}, "amount"), ({"currency": "XYZ"}, "currency"), ({"currency": "XAU"}, "currency"),
    ({"status": "failed"}, "status"), ({"id": "has space"}, "id"), ({"id": "P-77-r1"}, "id"),
    ({"provider_payout_id": "po_" + "7" * 125}, "provider_payout_id"),
], ids=["zero", "negative", "float", "string", "unknown-currency", "no-minor-unit", "unknown-field",
        "bad-id", "a-reissue-id", "case-id-past-its-limit"])
async def test_bad_input_is_a_recorded_422_that_books_nothing(stack: Stack, change: dict[str, Any],
                                                             where: str) -> None:
    body = registration(**change)
    refused = await register(stack, body)
    assert refused.status_code == 422
    assert where in str(refused.json()["detail"][0]["loc"])
    assert await stack.store.payouts.payout(str(body["id"])) is None
    refusals = [e for e in await stack.store.audit.trail("") if e["action"] == "action_refused"
                and e["actor"] == "olga" and e["detail"]["action"] == "POST /v1/payouts"]
    assert refusals and where in refusals[-1]["detail"]["refusal"]


async def test_an_unconfigured_provider_is_refused_and_recorded(stack: Stack) -> None:
    body = registration(provider="nowhere")
    refused = await register(stack, body)
    assert refused.status_code == 422 and "not configured" in refused.json()["detail"]
    assert await stack.store.payouts.payout(body["id"]) is None
    trail = await stack.store.audit.trail(payout_case_id("nowhere", body["provider_payout_id"]))
    assert [e["action"] for e in trail] == ["payout_registration_refused"]


async def test_registration_needs_a_token_and_the_role(stack: Stack) -> None:
    body = registration()
    assert (await register(stack, body, "bob")).status_code == 403
    async with stack.api("olga") as api:
        api.headers["Authorization"] = "Bearer nope"
        assert (await api.post("/v1/payouts", json=body)).status_code == 401
    assert await stack.store.payouts.payout(body["id"]) is None
    case_id = payout_case_id("sandbox", body["provider_payout_id"])
    assert await stack.store.audit.trail(case_id) == []  # no case: bob begins no trail of it
    assert [e["actor"] for e in await stack.store.audit.trail("")
            if e["action"] == "access_refused" and e["detail"].get("case_id") == case_id] == ["bob"]


async def test_the_cli_registers_lists_and_shows_and_a_registered_payout_opens_a_case(stack: Stack) -> None:
    async with stack.sandbox() as sb:
        made = (await sb.post("/v1/payouts", json={"amount": 2_500, "currency": "KWD"})).json()
    payout_id = f"P-{uuid.uuid4().hex[:10]}"
    env = {"REFUNDS_RELAY_URL": stack.relay_url, "REFUNDS_TOKEN": stack.tokens["olga"]}
    args = ("payouts", "register", "--id", payout_id, "--provider", "sandbox", "--provider-payout-id",
            made["id"], "--beneficiary", "ben-cli", "--amount", "2.500", "--currency", "KWD")
    first = await run(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert '"created": true' in first.stdout and '"amount": 2500' in first.stdout
    again = await run(*args, env=env)
    assert again.returncode == 0 and '"created": false' in again.stdout
    conflict = await run(*args[:-4], "--amount", "2.501", "--currency", "KWD", env=env)
    assert conflict.returncode == 1 and "already registered with other data" in conflict.stderr
    too_precise = await run(*args[:-4], "--amount", "2.5001", "--currency", "KWD", env=env)
    assert too_precise.returncode == 2 and "more than 3 decimals" in too_precise.stderr
    listed = await run("payouts", "list", "--limit", "500", env=env)
    assert listed.returncode == 0 and f"{payout_id}  sandbox {made['id']}  2.500 KWD  paid" in listed.stdout
    shown = await run("payouts", "show", payout_id, env=env)
    case_id = payout_case_id("sandbox", made["id"])
    assert shown.returncode == 0 and f'"case_id": "{case_id}"' in shown.stdout
    assert '"case_status": null' in shown.stdout

    await move_payout(stack, made["id"], "failed", failure_code="account_closed")
    await wait_for_case(stack, case_id, "awaiting_approval")
    actions = [e["action"] for e in await stack.store.audit.trail(case_id)]
    assert actions[0] == "payout_registered" and "payout_exception_opened" in actions
    missing = await run("payouts", "show", "P-missing", env=env)
    assert missing.returncode == 1 and "no payout" in missing.stderr


async def registered_and_remediated(stack: Stack, amount: int, beneficiary: str,
                                    registrar: str = "olga") -> tuple[dict[str, Any], str]:
    """A payout made at the sandbox that `registrar` registers (naming `beneficiary`), then
    the provider fails and lena approves its reversal; payout approvers and otis (ops) have
    tokens: (its registration, its case id)."""
    await add_payout_approvers(stack)
    stack.tokens["otis"] = await stack.store.access.create_token(
        "otis", ["ops"], by="test", token=f"t-otis-{uuid.uuid4().hex}")
    async with stack.sandbox() as sb:
        made = (await sb.post("/v1/payouts", json={"amount": amount, "currency": "USD"})).json()
    body = registration(provider_payout_id=made["id"], amount=amount, beneficiary_id=beneficiary)
    assert (await register(stack, body, registrar)).status_code == 201
    return body, await remediate(stack, made["id"])


async def test_whoever_registered_a_payout_does_not_ask_for_its_reissue(stack: Stack) -> None:
    """The registration names the beneficiary; a reissue pays that beneficiary again, and
    only one approver of the tier decides it. The same ops person registering a payout to an
    account of their choosing and asking for its reissue was one person choosing where money
    goes and asking for it to go: another person asks."""
    _, case_id = await registered_and_remediated(stack, 4_000, "ben-chosen")
    refused = await ask_reissue(stack, "olga", case_id)
    assert refused.status_code == 403 and "registered" in refused.json()["detail"], refused.text
    assert [e["actor"] for e in await stack.store.audit.trail(case_id)
            if e["action"] == "reissue_requested"] == []
    assert (await ask_reissue(stack, "otis", case_id)).status_code == 202


async def test_whoever_registered_a_payout_does_not_approve_its_reissue(stack: Stack) -> None:
    """omar (ops and payments-ops lead) registered a payout to a beneficiary he named; it
    failed, otis asked for its reissue and omar's approval alone filled the tier: a payout to
    the account he chose, decided by him (reproduced). Whoever registered a payout the
    reissue stands in for does not approve it (403, audited); another approver does."""
    body, case_id = await registered_and_remediated(stack, 4_500, "ben-chosen-by-omar", "omar")
    assert (await ask_reissue(stack, "otis", case_id)).status_code == 202
    await wait_for_case(stack, case_id, "awaiting_reissue_approval")
    refused = await decide(stack, "omar", case_id)
    assert refused.status_code == 403 and "registered" in refused.json()["detail"], refused.text
    trail = await stack.store.audit.trail(case_id)
    assert [e["actor"] for e in trail if e["action"] == "access_refused"] == ["omar"]
    row = await stack.store.payouts.case(case_id)
    assert row is not None and row["status"] == "awaiting_reissue_approval"
    # where the payout is made, his approval declines it, whatever path counted it
    original = await stack.store.payouts.payout(body["id"])
    assert original is not None
    activities = PayoutActivities(stack.store, stack.providers, load_policy())
    with pytest.raises(ApplicationError) as declined:
        await ActivityEnvironment().run(activities.reissue_payout, ReissueInput(
            case_id=case_id, original=original, final_status=PayoutStatus.FAILED, approvers=("omar",)))
    assert declined.value.type == errors.DECLINED and "registered" in str(declined.value)
    assert await reissues_at_provider(stack, original.reissue_id()) == []
    assert (await decide(stack, "lena", case_id)).status_code == 202
    await wait_for_case(stack, case_id, "reissued")


async def test_whoever_registered_a_payout_does_not_ask_for_a_reissue_of_its_reissue(stack: Stack) -> None:
    """The payout olga registered failed and was paid again (someone else asked); that
    reissue, to the beneficiary she named, failed too. Its case is another chain, where she
    registered nothing: she was let ask for the third payment to her beneficiary (202;
    reproduced). Every payout the reissue stands in for is read for its registrar."""
    body, first_case = await registered_and_remediated(stack, 3_000, "ben-chosen-again")
    assert (await ask_reissue(stack, "otis", first_case)).status_code == 202
    assert (await decide(stack, "lena", first_case)).status_code == 202
    await wait_for_case(stack, first_case, "reissued")
    first = await stack.store.payouts.payout(body["id"])
    assert first is not None
    second = await stack.store.payouts.payout(first.reissue_id())
    assert second is not None and second.reissue_of == first.id
    second_case = await remediate(stack, second.provider_payout_id)
    refused = await ask_reissue(stack, "olga", second_case)
    assert refused.status_code == 403 and "registered" in refused.json()["detail"], refused.text
    assert [e["actor"] for e in await stack.store.audit.trail(second_case)
            if e["action"] in ("reissue_requested", "access_refused")] == ["olga"]
    assert (await ask_reissue(stack, "otis", second_case)).status_code == 202
