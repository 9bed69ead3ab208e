"""Segregation of duties beyond approvals: nobody behind a refund (its requester, a person
behind its trigger, an approver) confirms that its bank transfer was paid, and requesters
read only their own cases, through the API and the console alike."""

import uuid

import httpx

from tests.harness import Stack
from tests.test_console import console, refusals
from tests.test_reissue import failed_case, reissue, reissued_as_transfer


async def person(stack: Stack, *roles: str) -> str:
    user = f"u-{uuid.uuid4().hex[:8]}"
    stack.tokens[user] = await stack.store.access.create_token(user, list(roles), by="test")
    return user


async def approved_bank_transfer(stack: Stack, original_requester: str, approver: str) -> str:
    """A failed refund of `original_requester`, reissued by olga as a bank transfer that
    `approver` approved: it waits for ops to confirm the payment."""
    case_id, _ = await failed_case(stack, requester=original_requester)
    return await reissued_as_transfer(stack, case_id, approver)


async def declared_unpaid(stack: Stack, user: str, case_id: str) -> None:
    """`user` confirms the case's bank transfer was not paid; the case fails."""
    async with stack.api(user) as api:
        unpaid = await api.post(f"/v1/manual-refunds/{case_id}/confirmation",
                                json={"paid": False, "reason": "the transfer bounced"})
    assert unpaid.status_code == 200, unpaid.text
    await stack.wait_for_status(case_id, "refund_failed")


async def transfer_awaiting_approval(stack: Stack, user: str, case_id: str) -> str:
    """`user` asks for the case's reissue by bank transfer; it waits for approval: its id."""
    status, made = await reissue(stack, user, case_id, method="bank_transfer")
    assert status == 202, made
    made_id = str(made["refund_request_id"])
    await stack.wait_for_status(made_id, "awaiting_approval")
    return made_id


async def verdict(stack: Stack, user: str, case_id: str, decision: str = "approve") -> httpx.Response:
    async with stack.api(user) as api:
        return await api.post(f"/v1/refund-requests/{case_id}/approvals", json={"decision": decision})


async def test_nobody_behind_a_refund_confirms_its_bank_transfer(stack: Stack) -> None:
    original = await person(stack, "requester", "ops")  # now a trigger identity of the reissue
    approver = await person(stack, "approver", "ops")
    child_id = await approved_bank_transfer(stack, original, approver)
    for user in (original, approver):
        async with stack.api(user) as api:
            refused = await api.post(f"/v1/manual-refunds/{child_id}/confirmation", json={"paid": True})
        assert refused.status_code == 403, (user, refused.text)
    assert [r["actor"] for r in await refusals(stack, child_id, "access_refused")] == [original, approver]
    assert (await stack.store.cases.get(child_id))["status"] == "pending"  # type: ignore[index]
    async with stack.api("admin") as api:
        confirmed = await api.post(f"/v1/manual-refunds/{child_id}/confirmation", json={"paid": True})
    assert confirmed.status_code == 200, confirmed.text
    await stack.wait_for_status(child_id, "succeeded")


async def test_a_confirmation_for_a_case_whose_workflow_ended_moves_nothing(stack: Stack) -> None:
    """The bank transfer's workflow was terminated (the closed-workflow sweep hands such a
    case to ops); a confirmation then was committed and its signal found no workflow: a 500,
    the instruction marked paid, and nobody to book it or release the hold. Refused before
    anything is written (409, audited); the instruction stays pending for ops."""
    approver = await person(stack, "approver")
    child_id = await approved_bank_transfer(stack, "alice", approver)
    await stack.client.get_workflow_handle(child_id).terminate("terminated in the Temporal UI")
    async with stack.api("admin") as api:
        late = await api.post(f"/v1/manual-refunds/{child_id}/confirmation", json={"paid": True})
    assert late.status_code == 409 and "TERMINATED" in late.json()["detail"], late.text
    manual = await stack.store.manual_refunds.get(child_id)
    assert manual is not None and manual["status"] == "pending"
    assert "manual_refund_confirmed" not in await stack.actions(child_id)


async def test_requesters_read_only_their_own_cases(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    theirs = await stack.request_refund("alice", charge, 1_000)
    other = await person(stack, "requester")
    for path in (f"/v1/refund-requests/{theirs}", f"/v1/refund-requests/{theirs}/audit"):
        async with stack.api(other) as api:
            assert (await api.get(path)).status_code == 404
        for reader in ("alice", "dave", "bob", "olga"):
            async with stack.api(reader) as api:
                assert (await api.get(path)).status_code == 200, (reader, path)
    assert [r["actor"] for r in await refusals(stack, theirs, "access_refused")] == [other, other]
    browser = await console(stack, other)
    page = await browser.get(f"/console/cases/{theirs}")
    assert page.status_code == 404 and "no refund request" in page.text.lower()
    listing = await browser.get("/console/cases", params={"q": theirs})
    assert listing.status_code == 200 and f"/console/cases/{theirs}" not in listing.text
    owner = await console(stack, "alice")
    assert f"/console/cases/{theirs}" in (await owner.get("/console/cases", params={"q": theirs})).text
    await browser.aclose()
    await owner.aclose()


async def test_repeating_someone_elses_request_does_not_show_their_case(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_000)
    other = await person(stack, "requester")
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    async with stack.api(other) as api:
        repeated = await api.post("/v1/refund-requests", json=body)
    assert repeated.status_code == 409, repeated.text
    assert "requester" not in repeated.json()
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 200


async def test_whoever_declared_a_refund_unpaid_does_not_approve_its_reissue(stack: Stack) -> None:
    """Vic (ops and approver) confirmed a bank transfer was not paid; the case failed, its
    reservation released, and olga reissued it. Vic's approval of the reissue counted: one
    person's word that the money never went, and their own approval to send it again
    (reproduced). Whoever said what the refund's money did stands behind its reissue: 403,
    as for its requester; another approver does."""
    vic = await person(stack, "approver", "ops")
    child_id = await approved_bank_transfer(stack, await person(stack, "requester"), "bob")
    await declared_unpaid(stack, vic, child_id)
    again_id = await transfer_awaiting_approval(stack, "olga", child_id)
    refused = await verdict(stack, vic, again_id)
    assert refused.status_code == 403, refused.text
    assert (await stack.store.cases.get(again_id))["status"] == "awaiting_approval"  # type: ignore[index]
    approved = await verdict(stack, "carol", again_id)
    assert approved.status_code == 202, approved.text


async def test_whoever_declared_a_refund_unpaid_does_not_ask_for_it_to_be_paid_again(stack: Stack) -> None:
    """Vic (ops) confirmed a bank transfer was not paid, then asked for its reissue himself:
    a small reissue is auto-approved, so his word that the money never went and his request
    to send it again moved money with nobody else involved (the payout side refuses the
    same). Refused 403, audited; another ops person asks for it."""
    vic = await person(stack, "approver", "ops")
    child_id = await approved_bank_transfer(stack, await person(stack, "requester"), "bob")
    await declared_unpaid(stack, vic, child_id)
    status, refused = await reissue(stack, vic, child_id, method="provider")
    assert status == 403, refused
    assert await stack.store.cases.children(child_id) == []
    trail = [(e["actor"], e["action"]) for e in await stack.store.audit.trail(child_id)]
    assert (vic, "access_refused") in trail
    grandchild = await reissued_as_transfer(stack, child_id, "carol")
    await declared_unpaid(stack, await person(stack, "ops"), grandchild)  # another ops person
    # vic's word is on this refund's money too, one reissue up: he does not ask again either
    status, refused = await reissue(stack, vic, grandchild, method="provider")
    assert status == 403, refused
    assert await stack.store.cases.children(grandchild) == []


async def test_whoever_declared_a_reissue_unpaid_does_not_ask_for_the_original_to_be_paid_again(
        stack: Stack) -> None:
    """Vic declared the reissue's transfer unpaid and asked for the original (failed too) to
    be reissued instead: the same request's money, so the same 403 (audited). The reissue
    another ops person asks for names him among its trigger identities: he does not approve
    it either. Before, only the reissued case and those above it were read."""
    vic = await person(stack, "approver", "ops")
    child_id = await approved_bank_transfer(stack, await person(stack, "requester"), "bob")
    await declared_unpaid(stack, vic, child_id)
    original = (await stack.store.cases.get(child_id))["parent_refund_request_id"]  # type: ignore[index]
    status, refused = await reissue(stack, vic, original, method="bank_transfer")
    assert status == 403, refused
    assert [c["refund_request_id"] for c in await stack.store.cases.children(original)] == [child_id]
    trail = [(e["actor"], e["action"]) for e in await stack.store.audit.trail(original)]
    assert (vic, "access_refused") in trail
    status, second = await reissue(stack, "olga", original, method="bank_transfer")
    assert status == 202, second
    assert vic in (await stack.store.cases.get(second["refund_request_id"]))["trigger_identities"]  # type: ignore[index]


async def test_whoever_asked_for_an_earlier_reissue_does_not_approve_the_next(stack: Stack) -> None:
    """Oscar (ops and approver) asked for a failed refund's reissue; it was denied. Olga asks
    again: the same request's money, which oscar asked to pay once already, so his approval
    would count his own ask. He is among the new reissue's trigger identities: 403; another
    approver does. Before, only the requesters up the chain were named, never a sibling's."""
    oscar = await person(stack, "approver", "ops")
    case_id, _ = await failed_case(stack)
    first_id = await transfer_awaiting_approval(stack, oscar, case_id)
    denied = await verdict(stack, "carol", first_id, "deny")
    assert denied.status_code == 202, denied.text
    await stack.wait_for_status(first_id, "denied")
    await stack.client.get_workflow_handle(first_id).result()
    second_id = await transfer_awaiting_approval(stack, "olga", case_id)
    refused = await verdict(stack, oscar, second_id)
    assert refused.status_code == 403, refused.text
    approved = await verdict(stack, "carol", second_id)
    assert approved.status_code == 202, approved.text


async def test_a_witness_recorded_as_a_reissue_opened_does_not_approve_it(stack: Stack) -> None:
    """Vic (ops and approver) said what the request's money did (he resolved a provider
    wait of the original) in a transaction that committed just as olga's reissue opened: the
    reissue read the family's witnesses before his row, so its trigger identities miss him
    and the approval round takes his approval. The money's gate reads the family again:
    not submitted, the case with ops. Before, only the row's trigger identities were read."""
    vic = await person(stack, "approver", "ops")
    case_id, _ = await failed_case(stack)
    child_id = await transfer_awaiting_approval(stack, "olga", case_id)
    assert vic not in (await stack.store.cases.get(child_id))["trigger_identities"]  # type: ignore[index]
    await stack.store.audit.record(case_id, vic, "provider_wait_resolved", {"provider_shows": "no_refund"})
    approved = await verdict(stack, vic, child_id)
    assert approved.status_code == 202, approved.text  # the round knows only the trigger identities
    row = await stack.wait_for_status(child_id, "ops_review", "pending")
    assert row["status"] == "ops_review", row
    [refused] = [e for e in await stack.store.audit.trail(child_id) if e["action"] == "submission_refused"]
    assert vic in refused["detail"]["reason"]
    assert await stack.store.manual_refunds.get(child_id) is None


async def test_a_refund_split_into_parts_needs_the_approvals_of_the_whole(stack: Stack) -> None:
    """The tier is chosen on what leaves the charge: this request and the other refunds still
    holding money on it. Before, a 2,000.00 refund asked as four of 500.00 each needed one
    approver (the standard tier, up to 500.00) four times, never the large tier's finance
    manager, and one approver could sign all four."""
    charge = await stack.charge(200_000)
    needs: list[list[str]] = []
    for part in range(3):
        case_id = await stack.request_refund("alice", charge, 50_000)
        await stack.wait_for_status(case_id, "awaiting_approval")
        async with stack.api("bob") as api:
            needs.append(sorted((await api.get(f"/v1/refund-requests/{case_id}")).json()["missing_roles"]))
            if part < 2:
                answer = await api.post(f"/v1/refund-requests/{case_id}/approvals",
                                        json={"decision": "approve"})
                assert answer.status_code == 202, answer.text
        if part < 2:
            await stack.wait_for_status(case_id, "succeeded", "awaiting_approval")
    assert needs[0] == ["approver"]
    assert needs[1:] == [["approver", "finance_manager"]] * 2, needs
