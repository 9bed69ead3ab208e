"""The console's payout exception pages over plain HTTP: the list, a case's page (every
delivery on the timeline, duplicates included; the recommendation marked advisory;
approvals needed and given; runbook steps; ticket; hold), and approve/deny by the API's
own rule (tier roles, segregation of duties), refusals audited."""

import html

import httpx

from adapters.db.rows import HoldRow, PayoutListRow
from domain.payouts import payout_case_id
from tests.harness import Stack
from tests.payouts_kit import add_payout_approvers, ask_reissue, move_payout, paid_payout, wait_for_case
from tests.test_console import console, field, post_form, refusals


async def decide(client: httpx.AsyncClient, case_id: str, decision: str, **extra: str) -> httpx.Response:
    """Submits the case page's verdict form: for the round the page shows now, unless told."""
    if "awaiting" not in extra:
        page = (await client.get(f"/console/payouts/{case_id}")).text
        extra["awaiting"] = field(page, "awaiting") if 'name="awaiting"' in page else "awaiting_approval"
    return await post_form(client, f"/console/payouts/{case_id}/approval", {"decision": decision, **extra})


async def test_a_payout_case_page_shows_the_case_and_approvals_go_through_the_apis_rule(
        stack: Stack) -> None:
    await add_payout_approvers(stack)
    payout = await paid_payout(stack, 1_250_000, beneficiary="ben-console")
    await move_payout(stack, payout.provider_payout_id, "settlement_failed",
                      failure_code="bank_rejection", copies=3)
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    fiona = await console(stack, "fiona")
    listing = await fiona.get("/console/payouts?status=awaiting_approval")
    assert listing.status_code == 200 and f'data-case="{case_id}"' in listing.text
    assert "12500.00 USD" in listing.text and "finance_and_compliance" in listing.text
    assert (await fiona.get("/console/payouts?status=nonsense")).status_code == 422
    [listed] = [c for c in await stack.store.payouts.cases(50, "awaiting_approval") if c.case_id == case_id]
    assert isinstance(listed, PayoutListRow) and listed.tier == "finance_and_compliance"
    assert (listed.amount, listed.currency, listed.beneficiary_id) == (1_250_000, "USD", "ben-console")

    page = await fiona.get(f"/console/payouts/{case_id}")
    text = html.unescape(page.text)
    assert page.status_code == 200 and 'data-testid="approval-form"' in text
    assert "advisory only" in text
    assert "do not reissue until the beneficiary's bank details are verified" in text
    assert "Still needs approval from: <strong>finance_manager, compliance</strong>" in text
    assert text.count('data-action="payout_event_received"') == 3 and text.count("(duplicate)") == 2
    assert "not held: paid" in text

    lena = await console(stack, "lena")  # an approver, but the ops lead's tier is lower
    wrong_tier = await decide(lena, case_id, "approve")
    assert wrong_tier.status_code == 403 and "needs one of the roles" in html.unescape(wrong_tier.text)
    assert [r["detail"]["via"] for r in await refusals(stack, case_id, "approval_refused")] == ["console"]
    forged = await post_form(fiona, f"/console/payouts/{case_id}/approval", {"decision": "approve"},
                             csrf=False)
    assert forged.status_code == 403 and "CSRF" in forged.text
    bad = await decide(fiona, case_id, "maybe")
    assert bad.status_code == 422 and "invalid decision" in bad.text
    dave = await console(stack, "dave")  # an auditor reads, and cannot decide
    assert 'data-testid="approval-form"' not in (await dave.get(f"/console/payouts/{case_id}")).text
    assert (await decide(dave, case_id, "approve")).status_code == 403
    alice = await console(stack, "alice")  # a refund requester does not read payout cases
    assert (await alice.get(f"/console/payouts/{case_id}")).status_code == 403
    assert await stack.store.ledger.entries(case_id) == []

    approved = await decide(fiona, case_id, "approve", reason="bank confirmed the return")
    assert approved.status_code == 303 and approved.headers["location"].endswith("notice=approve")
    page = await fiona.get(approved.headers["location"])
    assert "Your approval was recorded" in page.text and "<strong>compliance</strong>" in page.text
    cora = await console(stack, "cora")
    assert (await decide(cora, case_id, "approve")).status_code == 303
    row = await wait_for_case(stack, case_id, "remediated")

    [hold] = await stack.store.payouts.beneficiary_holds("ben-console")
    assert isinstance(hold, HoldRow) and hold.case_id == case_id and hold.released_at is None
    text = html.unescape((await dave.get(f"/console/payouts/{case_id}")).text)
    assert "on hold</span> (was paid)" in text and "ben-console" in text
    assert f'data-testid="ticket-ref">{row["ticket_ref"]}<' in text
    runbook = text.split('data-testid="runbook"')[1].split("</table>")[0]
    assert runbook.count("UTC") == 4  # hold, entry, ticket, notice done; no rollback, no reissue
    assert "fiona" in text.split('data-testid="approvals"')[1] and "Nothing for you to do" in text
    after = await decide(fiona, case_id, "approve")
    assert after.status_code == 409 and "not awaiting approval" in after.text


async def failed_payout_case(stack: Stack) -> str:
    """A 1,000.00 payout failed at the provider, its case awaiting approval; the payout
    approvers have tokens. Returns the case id."""
    await add_payout_approvers(stack)
    payout = await paid_payout(stack, 100_000)
    await move_payout(stack, payout.provider_payout_id, "failed", failure_code="insufficient_funds")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    return case_id


async def test_the_reissue_requester_cannot_approve_it_from_the_console(stack: Stack) -> None:
    case_id = await failed_payout_case(stack)
    lena = await console(stack, "lena")
    assert (await decide(lena, case_id, "approve")).status_code == 303
    await wait_for_case(stack, case_id, "remediated")
    assert (await ask_reissue(stack, "omar", case_id)).status_code == 202
    omar = await console(stack, "omar")
    page = await omar.get(f"/console/payouts/{case_id}")
    assert "Approve or deny the reissue" in page.text and field(page.text, "csrf")
    own = await decide(omar, case_id, "approve")
    assert own.status_code == 403 and "requester cannot approve" in own.text
    assert (await decide(lena, case_id, "deny")).status_code == 303
    await wait_for_case(stack, case_id, "reissue_denied")
    text = html.unescape((await lena.get(f"/console/payouts/{case_id}?notice=deny")).text)
    assert "Your denial was recorded" in text and "reissue denied" in text


async def test_a_verdict_from_the_reversals_page_never_approves_the_reissue(stack: Stack) -> None:
    """The two rounds of a payout case can need the same role. A page loaded for the
    reversal and submitted once the case awaits its reissue (another approver decided the
    reversal meanwhile, ops asked for the reissue) is refused, 409, and pays nobody again:
    the form names the round it was shown for."""
    case_id = await failed_payout_case(stack)
    lena = await console(stack, "lena")
    stale = await lena.get(f"/console/payouts/{case_id}")
    assert field(stale.text, "awaiting") == "awaiting_approval"
    async with stack.api("lena") as api:
        decided = await api.post(f"/v1/payout-exceptions/{case_id}/approvals",
                                 json={"decision": "approve", "awaiting": "awaiting_approval"})
    assert decided.status_code == 202, decided.text
    await wait_for_case(stack, case_id, "remediated")
    assert (await ask_reissue(stack, "omar", case_id)).status_code == 202
    await wait_for_case(stack, case_id, "awaiting_reissue_approval")

    late = await decide(lena, case_id, "approve", awaiting="awaiting_approval")
    assert late.status_code == 409 and "reload" in html.unescape(late.text), late.text
    assert (await stack.store.payouts.case(case_id)).status == "awaiting_reissue_approval"  # type: ignore[union-attr]
    async with stack.api("lena") as api:
        stale_api = await api.post(f"/v1/payout-exceptions/{case_id}/approvals",
                                   json={"decision": "approve", "awaiting": "awaiting_approval"})
    assert stale_api.status_code == 409 and "awaiting_reissue_approval" in stale_api.json()["detail"]
    async with stack.api("lena") as api:  # a verdict that names no round would count in this one
        unnamed = await api.post(f"/v1/payout-exceptions/{case_id}/approvals", json={"decision": "approve"})
    assert unnamed.status_code == 422 and "awaiting" in unnamed.text, unnamed.text
    assert (await stack.store.payouts.case(case_id)).status == "awaiting_reissue_approval"  # type: ignore[union-attr]
    trail = [e for e in await stack.store.audit.trail(case_id) if e["action"] == "action_refused"]
    assert [e["detail"]["via"] for e in trail] == ["console", "api"]

    fresh = await lena.get(f"/console/payouts/{case_id}")
    assert field(fresh.text, "awaiting") == "awaiting_reissue_approval"
    assert (await decide(lena, case_id, "approve", awaiting="awaiting_reissue_approval")).status_code == 303
    await wait_for_case(stack, case_id, "reissued")
