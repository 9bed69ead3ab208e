"""Adyen waits can end: a create that never reached Adyen goes again with the same
Idempotency-Key; a notification wait escalates to ops review and ops resolve it from the
API or the console ("Adyen shows refunded / not refunded"), with segregation of duties and
an audit row, so the reservation is never held for good. Adyen's API is tests/adyen_fake.py."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from adapters.db import Principal, Store
from adapters.db.cases import CaseRepository, RefundHeldElsewhere
from adapters.http_server import AppServer
from adapters.providers.adyen import AdyenProvider, ProviderNotReached
from domain.incidents import DuplicateRefundInput
from domain.models import ProviderRefund, ProviderRefundStatus, RefundReason, RefundRequest
from starters.actions.cases import CaseActions
from starters.actions.provider_wait import ProviderWaitBody, resolve_provider_wait
from starters.actions.provider_wait import _deliver as deliver_resolution
from starters.dev.stack import TemporalDevServer
from tests.adyen_fake import FakeAdyen
from tests.harness import Stack, write_held
from tests.reconciliation_kit import wait_for_breaks
from tests.test_adyen import (
    API_KEY,
    MERCHANT,
    TEST_KEY,
    AdyenRig,
    adyen_rig,
    notification,
    refunded,
    unique_psp,
)
from tests.test_console import console, post_form
from tests.test_reconciliation import decide


class RefuseConnections(httpx.AsyncBaseTransport):
    """The first `times` requests fail to connect (nothing is sent), as a refused or
    unreachable host does; the rest go through."""

    def __init__(self, inner: httpx.AsyncBaseTransport, times: int, *, after_seconds: float = 0) -> None:
        self.inner, self.times, self.refused, self.after = inner, times, 0, after_seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.refused < self.times:
            self.refused += 1
            if self.after:  # a host that drops the connection attempt: the connect times out
                await asyncio.sleep(self.after)
                raise httpx.ConnectTimeout("timed out connecting", request=request)
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return await self.inner.handle_async_request(request)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeAdyen, str]]:
    adyen = FakeAdyen(API_KEY)
    server = AppServer(adyen.app(), "127.0.0.1", 0)
    await server.start()
    yield adyen, server.url
    await server.stop()


def _refusing(url: str, times: int, *, after_seconds: float = 0,
              **settings: Any) -> tuple[AdyenProvider, RefuseConnections]:
    provider = AdyenProvider(hmac_keys=[TEST_KEY], api_base=url, api_key=API_KEY,
                             connect_backoff_seconds=0.01, **settings)
    assert provider._http is not None
    gate = RefuseConnections(provider._http._transport, times, after_seconds=after_seconds)
    provider._http._transport = gate
    return provider, gate


def _request(psp: str) -> RefundRequest:
    return RefundRequest(refund_request_id="rr-adyen-connect", provider="adyen", charge_id=psp,
                         amount=1_500, currency="EUR", merchant_account=MERCHANT,
                         reason=RefundReason.DUPLICATE)


async def test_a_create_that_never_connected_goes_again_with_the_same_key(
        fake: tuple[FakeAdyen, str]) -> None:
    adyen, url = fake
    psp = adyen.payment(10_000, "EUR", MERCHANT)
    provider, gate = _refusing(url, times=2)
    try:
        refund = await provider.create_refund(_request(psp), "rfo_same_key")
    finally:
        await provider.aclose()
    [made] = adyen.refunds_of(psp)
    assert gate.refused == 2 and made["idempotencyKey"] == "rfo_same_key"
    assert refund.refund_id == made["pspReference"]


async def test_a_create_that_never_connected_at_all_is_a_definite_no(fake: tuple[FakeAdyen, str]) -> None:
    adyen, url = fake
    psp = adyen.payment(10_000, "EUR", MERCHANT)
    provider, gate = _refusing(url, times=3)
    try:
        with pytest.raises(ProviderNotReached, match="nothing was sent"):
            await provider.create_refund(_request(psp), "rfo_same_key")
    finally:
        await provider.aclose()
    assert gate.refused == 3 and adyen.refunds_of(psp) == []


async def test_no_create_goes_again_once_it_could_outlive_the_submit_attempt(
        fake: tuple[FakeAdyen, str]) -> None:
    """Each connect timed out after the request timeout: a third try could connect and send
    after the activity's start-to-close (30 s against 3 x 10 s and the backoffs), when the
    case has moved on to waiting for the notification. A try that could end past the submit
    attempt's time is not made: nothing was sent."""
    adyen, url = fake
    psp = adyen.payment(10_000, "EUR", MERCHANT)
    provider, gate = _refusing(url, times=3, after_seconds=0.4, timeout_seconds=0.4,
                               submit_deadline_seconds=1.0)
    try:
        with pytest.raises(ProviderNotReached, match="nothing was sent"):
            await provider.create_refund(_request(psp), "rfo_same_key")
    finally:
        await provider.aclose()
    assert gate.refused in (1, 2) and adyen.refunds_of(psp) == []  # a third try: past 1.2 s


# -- ops resolve a notification wait -------------------------------------------------------

@pytest.fixture(scope="module")
async def rig(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[AdyenRig]:
    async with adyen_rig(store, client, temporal_server, charges_from_fake=True) as rigged:
        yield rigged


async def waiting_case(rig: AdyenRig, amount: int, requester: str = "alice", *,
                       lose_answer: bool = True, settled: bool = True) -> tuple[str, str]:
    """A refund whose create answer never came back, escalated to ops review: (case, payment).
    `settled`: returns once a create its submit sent can no longer land (ops may say what
    the dashboard shows)."""
    psp = rig.fake.payment(10_000, "EUR", MERCHANT)
    if lose_answer:
        rig.proxy.lose_next("POST", f"/v71/payments/{psp}/refunds")
    else:
        rig.fake.unavailable += 1
    case_id = await rig.stack.request_refund(requester, psp, amount, provider="adyen", currency="EUR",
                                             merchant_account=MERCHANT)
    await rig.stack.wait_for_audit(case_id, "no_status_lookup_escalated")
    row = await rig.stack.wait_for_status(case_id, "ops_review")
    assert row["reserved_amount"] == amount
    if settled:
        await past_the_create_s_horizon(rig.stack, case_id)
    return case_id, psp


async def past_the_create_s_horizon(stack: Stack, case_id: str) -> None:
    """Waits until a create the case's last submit sent can no longer land at the provider
    (the submit's timeout and the provider horizon after it started): ops' "not refunded"
    is taken from then on."""
    trail = await stack.store.audit.trail(case_id)
    started = max(e["occurred_at"] for e in trail if e["action"] == "provider_submit_started")
    left = started + stack.settings.timings().create_lands_within() - datetime.now(UTC)
    await asyncio.sleep(max(0.0, left.total_seconds()) + 0.2)


async def resolve(rig: AdyenRig, user: str, case_id: str, **body: Any) -> httpx.Response:
    async with rig.stack.api(user) as api:
        return await api.post(f"/v1/refund-requests/{case_id}/provider-wait", json=body)


async def test_ops_resolve_a_wait_with_the_refund_adyen_shows(rig: AdyenRig) -> None:
    rig.stack.tokens["rita"] = await rig.stack.store.access.create_token(
        "rita", ["requester", "ops"], token="t-rita-adyen-waits", by="test")
    case_id, psp = await waiting_case(rig, 1_700, requester="rita")
    [made] = rig.fake.refunds_of(psp)
    shows = {"provider_shows": "refunded", "provider_refund_id": made["pspReference"],
             "reason": "Customer Area: refund settled"}
    assert (await resolve(rig, "rita", case_id, **shows)).status_code == 403  # her own request
    assert (await resolve(rig, "bob", case_id, **shows)).status_code == 403  # not ops
    assert (await resolve(rig, "olga", case_id, provider_shows="refunded", reason="x")).status_code == 422
    answer = await resolve(rig, "olga", case_id, **shows)
    assert answer.status_code == 200, answer.text
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert (row["provider_refund_id"], row["reserved_amount"]) == (made["pspReference"], 1_700)
    assert [x["debit"] for x in await rig.stack.store.ledger.entries(case_id)] == [1_700, 0]
    [resolved] = [e for e in await rig.stack.store.audit.trail(case_id)
                  if e["action"] == "provider_wait_resolved"]
    assert (resolved["actor"], resolved["detail"]["provider_shows"], resolved["detail"]["via"]) == (
        "olga", "refunded", "api")
    refusals = [e["actor"] for e in await rig.stack.store.audit.trail(case_id)
                if e["action"] == "access_refused"]
    assert refusals == ["rita", "bob"]
    assert (await resolve(rig, "olga", case_id, **shows)).status_code == 409  # no longer waiting
    assert len(rig.fake.refunds_of(psp)) == 1


async def test_ops_resolve_a_wait_adyen_shows_no_refund_for_and_the_reservation_is_released(
        rig: AdyenRig) -> None:
    case_id, psp = await waiting_case(rig, 900, lose_answer=False)  # a 500: Adyen may have acted
    assert rig.fake.refunds_of(psp) == []
    answer = await resolve(rig, "olga", case_id, provider_shows="not_refunded",
                           reason="Customer Area: no refund on the payment")
    assert answer.status_code == 200, answer.text
    row = await rig.stack.wait_for_status(case_id, "refund_failed")
    assert row["reserved_amount"] == 0 and "no refund" in row["failure_reason"]
    assert await rig.stack.store.ledger.entries(case_id) == []


async def test_no_refund_is_not_taken_while_the_lost_create_can_still_land(rig: AdyenRig) -> None:
    """Adyen's create answered 500 and the wait opens at once: ops looking seconds later
    see no refund while the create may still land (until its submit's timeout and the
    provider horizon have passed), and "not refunded" released the hold; a reissue could
    then pay beside the refund that lands. Refused until then (409, recorded); after it,
    taken."""
    case_id, psp = await waiting_case(rig, 950, lose_answer=False, settled=False)  # a 500
    early = await resolve(rig, "olga", case_id, provider_shows="not_refunded",
                          reason="Customer Area: nothing yet")
    assert early.status_code == 409 and "may still land" in early.json()["detail"], early.text
    refused = [e for e in await rig.stack.store.audit.trail(case_id) if e["action"] == "action_refused"]
    assert [e["actor"] for e in refused] == ["olga"]
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None and (row["status"], row["reserved_amount"]) == ("ops_review", 950)
    await past_the_create_s_horizon(rig.stack, case_id)
    assert rig.fake.refunds_of(psp) == []
    later = await resolve(rig, "olga", case_id, provider_shows="not_refunded",
                          reason="Customer Area: no refund on the payment")
    assert later.status_code == 200, later.text
    await rig.stack.wait_for_status(case_id, "refund_failed")


async def test_two_ops_resolving_one_wait_at_once_are_told_which_one_counts(rig: AdyenRig) -> None:
    """Two ops read the dashboard and answer at once (or one submits twice): the case takes
    one resolution, so only one is recorded and answered 200; the other is refused 409,
    never told "recorded" while the case follows the other answer."""
    rig.stack.tokens["otto"] = await rig.stack.store.access.create_token(
        "otto", ["ops"], token="t-otto-adyen-waits", by="test")
    case_id, _ = await waiting_case(rig, 800, lose_answer=False)
    answers = await asyncio.gather(
        resolve(rig, "olga", case_id, provider_shows="not_refunded", reason="no refund on the payment"),
        resolve(rig, "otto", case_id, provider_shows="not_refunded", reason="none listed"))
    assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
    [won] = [user for user, a in zip(("olga", "otto"), answers, strict=True) if a.status_code == 200]
    await rig.stack.wait_for_status(case_id, "refund_failed")
    resolved = [e["actor"] for e in await rig.stack.store.audit.trail(case_id)
                if e["action"] == "provider_wait_resolved"]
    assert resolved == [won]


async def test_ops_resolve_a_wait_from_the_console(rig: AdyenRig) -> None:
    case_id, psp = await waiting_case(rig, 600, lose_answer=False)
    path = f"/console/cases/{case_id}"
    olga, dave = await console(rig.stack, "olga"), await console(rig.stack, "dave")
    try:
        page = await olga.get(path)
        assert 'data-testid="provider-wait-form"' in page.text and 'data-testid="banner"' in page.text
        assert 'data-testid="provider-wait-form"' not in (await dave.get(path)).text  # auditors read
        blank = await post_form(olga, f"{path}/provider-wait", {"provider_shows": "not_refunded",
                                                               "provider_refund_id": "", "reason": ""})
        assert blank.status_code == 422
        done = await post_form(olga, f"{path}/provider-wait", {
            "provider_shows": "not_refunded", "provider_refund_id": "",
            "reason": "Customer Area: nothing on the payment"})
        assert done.status_code == 303 and done.headers["location"] == f"{path}?notice=wait_resolved"
        row = await rig.stack.wait_for_status(case_id, "refund_failed")
        assert row["reserved_amount"] == 0 and rig.fake.refunds_of(psp) == []
        [resolved] = [e for e in await rig.stack.store.audit.trail(case_id)
                      if e["action"] == "provider_wait_resolved"]
        assert (resolved["actor"], resolved["detail"]["via"]) == ("olga", "console")
        assert 'data-testid="provider-wait-form"' not in (await olga.get(path)).text
    finally:
        await olga.aclose()
        await dave.aclose()


async def success_after_not_refunded(rig: AdyenRig, case_id: str, psp: str, made: dict[str, Any],
                                     amount: int) -> dict[str, Any]:
    """Ops resolve the case's wait "not refunded", its run closes failed, then Adyen reports
    `made` refunded: the break that opens (asserted a `provider_succeeded_shown_failed`)."""
    answer = await resolve(rig, "olga", case_id, provider_shows="not_refunded",
                           reason="Customer Area: nothing shown yet")
    assert answer.status_code == 200, answer.text
    await rig.stack.wait_for_status(case_id, "refund_failed")
    await rig.stack.client.get_workflow_handle(case_id).result()
    body = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                        merchantReference=case_id, amount={"currency": "EUR", "value": amount})
    assert (await rig.post(body)).text == "[accepted]"
    [found] = await wait_for_breaks(rig.stack, [made["pspReference"]], "awaiting_approval")
    assert (found["break_class"], found["refund_request_id"]) == ("provider_succeeded_shown_failed", case_id)
    return found


async def test_a_success_adyen_reports_after_ops_said_not_refunded_opens_a_break(rig: AdyenRig) -> None:
    """Ops read "no refund" while Adyen still processed the create whose answer was lost;
    the case closed failed and released its reservation. Adyen's REFUND:true arriving then
    is money that moved under a case shown failed, and Adyen has no listing a run could
    find it in: it becomes a break for ops and its tier's approvers, never an audit row."""
    case_id, psp = await waiting_case(rig, 1_300)
    [made] = rig.fake.refunds_of(psp)
    found = await success_after_not_refunded(rig, case_id, psp, made, 1_300)
    assert await rig.stack.store.ledger.entries(case_id) == []  # nothing posted before approval
    notices = await rig.stack.store.database.fetch_all(
        "SELECT kind, audience FROM notices WHERE refund_request_id = %s", (case_id,))
    assert {"kind": "reconciliation_break", "audience": "ops"} in notices
    assert (await decide(rig.stack, "carol", int(found["id"]))).status_code == 202
    await wait_for_breaks(rig.stack, [made["pspReference"]], "resolved")
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None
    assert (row["status"], row["provider_refund_id"], row["reserved_amount"]) == (
        "succeeded", made["pspReference"], 1_300)
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"], x["credit"]) for x in lines] == [
        ("refund_settled", 1_300, 0), ("refund_settled", 0, 1_300)]


async def test_a_wait_is_not_resolved_with_a_refund_another_case_holds(rig: AdyenRig) -> None:
    """Ops name the refund the dashboard shows: naming one another case already holds (a
    copy-paste from the wrong row) was answered 200, then the case's write of that id broke
    the unique index and retried for ever, the case stuck with its reservation held and no
    second resolution allowed. Refused 409 (audited), the case still waiting; its own
    refund then resolves it."""
    first, psp = await waiting_case(rig, 1_100)
    [made] = rig.fake.refunds_of(psp)
    shows = {"provider_shows": "refunded", "reason": "Customer Area: refund settled"}
    answer = await resolve(rig, "olga", first, provider_refund_id=made["pspReference"], **shows)
    assert answer.status_code == 200
    await rig.stack.wait_for_status(first, "succeeded")

    second, other_psp = await waiting_case(rig, 1_200)
    taken = await resolve(rig, "olga", second, provider_refund_id=made["pspReference"], **shows)
    assert taken.status_code == 409 and first in taken.json()["detail"], taken.text
    refused = [e for e in await rig.stack.store.audit.trail(second) if e["action"] == "action_refused"]
    assert [e["actor"] for e in refused] == ["olga"]
    [own] = rig.fake.refunds_of(other_psp)
    answer = await resolve(rig, "olga", second, provider_refund_id=own["pspReference"], **shows)
    assert answer.status_code == 200, answer.text
    row = await rig.stack.wait_for_status(second, "succeeded")
    assert row["provider_refund_id"] == own["pspReference"]


async def test_a_wait_is_not_resolved_with_a_refund_another_case_s_break_names(rig: AdyenRig) -> None:
    """A refund no case holds but another case's break does (a duplicate of that case's
    refund, in ops review): naming it for this wait claimed it here, its money then counted
    on that break and in this case's ledger. Refused 409 (audited), the case still waiting."""
    first, psp = await waiting_case(rig, 1_300)
    [made] = rig.fake.refunds_of(psp)
    shows = {"provider_shows": "refunded", "reason": "Customer Area: refund settled"}
    answer = await resolve(rig, "olga", first, provider_refund_id=made["pspReference"], **shows)
    assert answer.status_code == 200, answer.text
    await rig.stack.wait_for_status(first, "succeeded")
    duplicate = ProviderRefund(provider="adyen", refund_id=f"DUP{uuid.uuid4().hex[:13].upper()}",
                               charge_id=psp, amount=1_300, currency="EUR",
                               status=ProviderRefundStatus.SUCCEEDED, raw_status="REFUND", reference=first)
    assert await rig.stack.store.reconciliation.open_duplicate_refund_break(DuplicateRefundInput(
        case_id=first, followed_refund_id=made["pspReference"], duplicate=duplicate, source="test"))
    second, _ = await waiting_case(rig, 1_300)
    taken = await resolve(rig, "olga", second, provider_refund_id=duplicate.refund_id.lower(), **shows)
    assert taken.status_code == 409 and first in taken.json()["detail"], taken.text
    row = await rig.stack.store.cases.get(second)
    assert row is not None and (row["status"], row["provider_refund_id"]) == ("ops_review", None)


async def answered_then_unheard(rig: AdyenRig, amount: int) -> tuple[str, str, dict[str, Any]]:
    """A create Adyen answered (the case holds its refund, pending) whose notification never
    came, escalated to ops review: (case id, payment, the refund Adyen made)."""
    psp = rig.fake.payment(10_000, "EUR", MERCHANT)
    case_id = await rig.stack.request_refund("alice", psp, amount, provider="adyen", currency="EUR",
                                             merchant_account=MERCHANT)
    await rig.stack.wait_for_audit(case_id, "no_status_lookup_escalated")
    [made] = rig.fake.refunds_of(psp)
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None and row["provider_refund_id"] == made["pspReference"]
    return case_id, psp, made


async def test_a_success_after_ops_said_not_refunded_of_a_refund_the_case_followed_opens_a_break(
        rig: AdyenRig) -> None:
    """The create was answered (the case holds Adyen's refund, pending), its notification
    never came, the wait escalated and ops read "no refund": the case closed failed, its
    reservation released, the customer told it failed. Adyen's REFUND:true for that very
    refund was only audited: the failure the case shows was taken from the wait (source
    `verify_state`), so it read as Adyen's own word, older news than the success."""
    case_id, psp, made = await answered_then_unheard(rig, 1_400)
    found = await success_after_not_refunded(rig, case_id, psp, made, 1_400)
    # the break approved books the refund; Adyen reversing it later is news again (the case's
    # record of what its workflow applied still said "failed": the reversal was dropped unheard)
    assert (await decide(rig.stack, "carol", int(found["id"]))).status_code == 202
    await wait_for_breaks(rig.stack, [made["pspReference"]], "resolved")
    await rig.stack.wait_for_status(case_id, "succeeded")
    reversed_ = notification("REFUNDED_REVERSED", pspReference=made["pspReference"], originalReference=psp,
                             merchantReference=case_id, amount={"currency": "EUR", "value": 1_400})
    assert (await rig.post(reversed_)).text == "[accepted]"
    deadline = asyncio.get_running_loop().time() + 60  # a hang detector, not a timing assertion
    while len(breaks := await wait_for_breaks(rig.stack, [made["pspReference"]], "resolved",
                                              "awaiting_approval")) < 2:
        assert asyncio.get_running_loop().time() < deadline, breaks
        await asyncio.sleep(0.2)
    late = breaks[-1]
    assert (late["break_class"], late["refund_request_id"], late["state"]) == (
        "provider_failed_shown_refunded", case_id, "awaiting_approval")


async def not_refunded_heard_with_adyen_s_success(rig: AdyenRig, amount: int, *,
                                                   answered: bool = True) -> tuple[str, str]:
    """Ops read "no refund" for the refund the case follows (`answered`; else for the case
    whose create answer was lost, the create having landed), and Adyen's REFUND:true for it
    reaches the case before its run ends (both in its inbox: the worker was away); returns
    once the run ended: (case id, the refund's pspReference)."""
    if answered:
        case_id, psp, made = await answered_then_unheard(rig, amount)
    else:
        case_id, psp = await waiting_case(rig, amount)
        [made] = rig.fake.refunds_of(psp)
    assert rig.stack.worker is not None
    await rig.stack.worker.shutdown()
    try:
        answer = await resolve(rig, "olga", case_id, provider_shows="not_refunded",
                               reason="Customer Area: nothing shown yet")
        assert answer.status_code == 200, answer.text
        body = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                            merchantReference=case_id, amount={"currency": "EUR", "value": amount})
        assert (await rig.post(body)).text == "[accepted]"
    finally:
        await rig.stack.start_worker()
    await rig.stack.client.get_workflow_handle(case_id).result()
    return case_id, str(made["pspReference"])


@pytest.mark.parametrize("answered", [True, False], ids=["create-answered", "create-unanswered"])
async def test_adyen_s_success_the_case_hears_as_it_applies_ops_not_refunded_opens_a_break(
        rig: AdyenRig, answered: bool) -> None:
    """The case applied ops' reading (failed, reservation released), then read Adyen's word
    for the same refund as older news than that failure: audited only, no break (the relay
    had signalled a running case, so its after-close path never ran), and Adyen has no
    listing a run could find it in: the case showed refund_failed for money that moved. It is
    reconciled as after the close: a break for ops and its tier's approvers. So is the
    success of a create whose answer was lost (the case holding ops' "none"): it was raised
    as a second refund, a duplicate for ops that no approval books, the hold left released."""
    case_id, refund_id = await not_refunded_heard_with_adyen_s_success(rig, 1_500, answered=answered)
    trail = [e["action"] for e in await rig.stack.store.audit.trail(case_id)]
    assert "event_after_close" not in trail, trail  # the case itself heard it
    assert "duplicate_provider_refund" not in trail, trail
    [found] = await wait_for_breaks(rig.stack, [refund_id], "awaiting_approval")
    assert (found["break_class"], found["refund_request_id"]) == ("provider_succeeded_shown_failed", case_id)
    assert (await decide(rig.stack, "carol", int(found["id"]))).status_code == 202
    await wait_for_breaks(rig.stack, [refund_id], "resolved")
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert (row["provider_refund_id"], row["reserved_amount"]) == (refund_id, 1_500)


async def test_a_wait_whose_workflow_has_ended_is_not_resolved(rig: AdyenRig) -> None:
    """The case's workflow ended while it waited (terminated from the Temporal UI): nobody
    would take a resolution. Ops are told so (409) before anything is recorded; the trail
    never says the wait was resolved while nothing followed it (it answered 500 after
    recording, and every retry was told "already resolved; the case follows that")."""
    case_id, _ = await waiting_case(rig, 700, lose_answer=False)
    await rig.stack.client.get_workflow_handle(case_id).terminate(reason="test: ended under the wait")
    for _ in range(2):
        answer = await resolve(rig, "olga", case_id, provider_shows="not_refunded",
                               reason="Customer Area: no refund on the payment")
        assert answer.status_code == 409 and "workflow has ended" in answer.json()["detail"], answer.text
    trail = [e["action"] for e in await rig.stack.store.audit.trail(case_id)]
    assert "provider_wait_resolved" not in trail and trail.count("action_refused") == 2
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None and row["reserved_amount"] == 700


async def test_a_refund_named_with_a_stray_space_or_control_character_is_refused(rig: AdyenRig) -> None:
    """Ops paste the refund's pspReference from the dashboard with a space or a newline: it
    would name no refund we know, so the one-case-per-refund check let another case's refund
    be booked as this one's too (one refund, two cases settled). Refused 422, nothing recorded
    as resolved."""
    held_by_other, _ = await refunded(rig, 500)
    other = await rig.stack.store.cases.get(held_by_other)
    assert other is not None and other["provider_refund_id"]
    case_id, _ = await waiting_case(rig, 500, lose_answer=False)
    for pasted in (f" {other['provider_refund_id']}", f"{other['provider_refund_id']}\n"):
        answer = await resolve(rig, "olga", case_id, provider_shows="refunded", provider_refund_id=pasted,
                               reason="Customer Area: refund settled")
        assert answer.status_code == 422, answer.text
    trail = [e["action"] for e in await rig.stack.store.audit.trail(case_id)]
    assert "provider_wait_resolved" not in trail
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None and (row["status"], row["provider_refund_id"]) == ("ops_review", None)


@pytest.mark.parametrize("reference", ["case", "none"], ids=["ours", "customer_area"])
async def test_a_refund_named_in_lower_case_is_the_one_adyen_then_notifies(rig: AdyenRig,
                                                                         reference: str) -> None:
    """Ops type the pspReference the dashboard shows in lower case. The case held it as typed,
    and Adyen's notification of that refund (as Adyen writes it) named no refund we know:
    without our reference (a Customer Area refund) it opened a tracking case that held and
    booked the same money again (reproduced); with it, the case raised a duplicate. The id is
    taken as Adyen writes it (upper case), so its notification is the case's own."""
    case_id, psp = await waiting_case(rig, 1_450)
    [made] = rig.fake.refunds_of(psp)
    answer = await resolve(rig, "olga", case_id, provider_shows="refunded",
                           provider_refund_id=str(made["pspReference"]).lower(),
                           reason="Customer Area: refund settled")
    assert answer.status_code == 200, answer.text
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert row["provider_refund_id"] == made["pspReference"]
    heard = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                         merchantReference=case_id if reference == "case" else "",
                         amount={"currency": "EUR", "value": 1_450})
    assert (await rig.post(heard)).text == "[accepted]"
    holder = await rig.stack.store.cases.by_provider_refund("adyen", str(made["pspReference"]))
    assert holder is not None and holder["refund_request_id"] == case_id
    assert await rig.stack.store.cases.refund_held_elsewhere("adyen", str(made["pspReference"]),
                                                             case_id) is None
    assert [x["debit"] for x in await rig.stack.store.ledger.entries(case_id)] == [1_450, 0]


async def test_a_resolution_recorded_in_lower_case_before_is_delivered_when_sent_again(rig: AdyenRig) -> None:
    """A resolution recorded (and its refund claimed) as typed, in lower case, before ids were
    taken as Adyen writes them, its signal lost: sent again as it was, it is delivered (the
    case takes the refund as Adyen writes it), not refused as naming another refund."""
    case_id, psp = await waiting_case(rig, 1_650)
    [made] = rig.fake.refunds_of(psp)
    typed = str(made["pspReference"]).lower()
    named = {"provider_shows": "refunded", "provider_refund_id": typed, "reason": "Customer Area: settled"}
    assert await rig.stack.store.audit.record_once_opened(
        case_id, "olga", "provider_wait_resolved", {**named, "via": "api"},
        opened_by="awaiting_provider_notification", closed_by="provider_notification_received",
        also=partial(CaseRepository.claim_refund_in, case_id=case_id, refund_id=typed)) is None
    again = await resolve(rig, "olga", case_id, **named)
    assert again.status_code == 200, again.text
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert row["provider_refund_id"] == made["pspReference"]


async def notification_taken_under_a_cancel(rig: AdyenRig, amount: int) -> tuple[str, dict[str, Any]]:
    """A case waiting for Adyen's notification takes it, and ops cancel the case while the
    write recording the take runs: (case, the refund Adyen made)."""
    case_id, psp = await waiting_case(rig, amount)
    [made] = rig.fake.refunds_of(psp)
    with write_held(rig.stack.store, "provider_notification_received") as held:
        own = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                           merchantReference=case_id, amount={"currency": "EUR", "value": amount})
        assert (await rig.post(own)).text == "[accepted]"
        await asyncio.wait_for(held.wait(), 60)
        await rig.stack.client.get_workflow_handle(case_id).cancel()
    return case_id, made


async def test_a_notification_taken_as_ops_cancel_is_still_the_case_s_refund(rig: AdyenRig) -> None:
    """The case took Adyen's notification off its inbox and was recording it when ops
    cancelled: the cancel's look at the provider (Adyen has none) waited for a notification
    already taken, and Adyen's redelivery is the same event, dropped. The refund Adyen made
    was never booked. The cancel takes it as the case's refund and follows it to the ledger."""
    case_id, made = await notification_taken_under_a_cancel(rig, 1_100)
    row = await rig.stack.wait_for_status(case_id, "succeeded", timeout=60)
    assert (row["provider_refund_id"], row["reserved_amount"]) == (made["pspReference"], 1_100)
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"]) for x in lines] == [("refund_settled", 1_100), ("refund_settled", 0)]


class SignalsLost:
    """A Temporal client whose signals fail (Temporal away after the case was read); the
    rest passes."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_workflow_handle(self, workflow_id: str, **kwargs: Any) -> Any:
        handle = self._client.get_workflow_handle(workflow_id, **kwargs)

        class Handle:
            def __getattr__(self, name: str) -> Any:
                return getattr(handle, name)

            async def signal(self, *_: Any, **__: Any) -> None:
                raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

        return Handle()


async def test_a_resolution_whose_signal_was_lost_is_sent_again_by_whoever_resolved_it(
        rig: AdyenRig) -> None:
    """Ops resolve a wait, the record commits and the signal finds Temporal away (503: send
    the same request again). The same request sent again delivers it and is answered as the
    first would have been, and a retry that again finds Temporal away is told so (a 503),
    never "already resolved; the case follows that" while the case still waits. The console
    keeps the form until the case takes the resolution. Before, every retry was a 409 (the
    resend's failure swallowed) and the form was gone: the case sat in ops review, its
    reservation held."""
    case_id, psp = await waiting_case(rig, 650, lose_answer=False)
    body = ProviderWaitBody(provider_shows="not_refunded", reason="Customer Area: nothing on the payment")
    olga = Principal("olga", frozenset({"ops"}))
    away = CaseActions(rig.stack.store, cast(Client, SignalsLost(rig.stack.client)), rig.stack.settings)
    for _ in range(2):  # the first try and its retry, both while Temporal is away
        with pytest.raises(RPCError):
            await resolve_provider_wait(away, olga, case_id, body, via="console")
    path = f"/console/cases/{case_id}"
    page = await console(rig.stack, "olga")
    try:
        assert 'data-testid="provider-wait-form"' in (await page.get(path)).text
    finally:
        await page.aclose()
    with pytest.raises(RPCError):  # another person, Temporal away: a 503, not "olga's counts"
        await resolve_provider_wait(away, Principal("oona", frozenset({"ops"})), case_id, body, via="api")
    again = await resolve(rig, "olga", case_id, **body.model_dump())
    assert again.status_code == 200, again.text
    assert again.json() == {"refund_request_id": case_id, "provider_shows": "not_refunded",
                            "resolved_by": "olga"}
    row = await rig.stack.wait_for_status(case_id, "refund_failed")
    assert row["reserved_amount"] == 0 and rig.fake.refunds_of(psp) == []
    assert (await resolve(rig, "olga", case_id, **body.model_dump())).status_code == 409  # taken
    resolved = [e["actor"] for e in await rig.stack.store.audit.trail(case_id)
                if e["action"] == "provider_wait_resolved"]
    assert resolved == ["olga"]


async def resolved_unsent(rig: AdyenRig, amount: int) -> tuple[str, str, dict[str, Any]]:
    """A waiting case olga resolved with the refund Adyen made for it, recorded and claimed,
    its signal lost (Temporal away): (the case, its pspReference, the resolution's body)."""
    case_id, psp = await waiting_case(rig, amount)
    [made] = rig.fake.refunds_of(psp)
    named = {"provider_shows": "refunded", "provider_refund_id": made["pspReference"],
             "reason": "Customer Area: refund settled"}
    away = CaseActions(rig.stack.store, cast(Client, SignalsLost(rig.stack.client)), rig.stack.settings)
    with pytest.raises(RPCError):
        await resolve_provider_wait(away, Principal("olga", frozenset({"ops"})), case_id,
                                    ProviderWaitBody.model_validate(named), via="api")
    return case_id, str(made["pspReference"]), named


async def test_a_refund_another_resolution_named_first_is_not_named_again(rig: AdyenRig) -> None:
    """Ops resolve one case with the refund the dashboard shows and, before that case has
    written it (its signal lost, or its worker busy), resolve another with the same refund, or
    with it pasted in lower case: one refund was booked for two cases (reproduced). The first
    resolution claims the refund for its case as it is recorded; the second is refused 409
    naming that case, its case still waiting."""
    first, made, named = await resolved_unsent(rig, 1_050)
    second, _ = await waiting_case(rig, 1_150)
    for refund_id in (made, made.lower()):
        taken = await resolve(rig, "olga", second, **{**named, "provider_refund_id": refund_id})
        assert taken.status_code == 409 and first in taken.json()["detail"], taken.text
    row = await rig.stack.store.cases.get(second)
    assert row is not None and (row["status"], row["provider_refund_id"]) == ("ops_review", None)
    assert (await resolve(rig, "olga", first, **named)).status_code == 200  # sent again: it counts
    done = await rig.stack.wait_for_status(first, "succeeded")
    assert done["provider_refund_id"] == made


@pytest.mark.parametrize("pasted", [str, str.lower], ids=["as_adyen_writes_it", "lower_case"])
async def test_a_claim_made_between_the_check_and_the_record_still_refuses(
        rig: AdyenRig, monkeypatch: pytest.MonkeyPatch, pasted: Callable[[str], str]) -> None:
    """Two resolutions of two cases naming one refund at once: both checks find no holder
    (forced here: the check reads before the other's claim commits). The claim recorded with
    the resolution is checked again under a lock on the refund's id in any letter case (the
    index tells letter cases apart: the lower-case claim committed and one refund was booked
    for two cases, reproduced), so the second is refused 409, nothing recorded."""
    first, made, named = await resolved_unsent(rig, 1_250)
    named = {**named, "provider_refund_id": pasted(made)}
    second, _ = await waiting_case(rig, 1_350)
    looked_up, calls = rig.stack.store.cases.refund_held_elsewhere, []

    async def unseen_once(provider: str, refund_id: str, case_id: str) -> Any:
        calls.append(refund_id)
        return None if len(calls) == 1 else await looked_up(provider, refund_id, case_id)

    monkeypatch.setattr(rig.stack.store.cases, "refund_held_elsewhere", unseen_once)
    taken = await resolve(rig, "olga", second, **named)
    assert taken.status_code == 409 and first in taken.json()["detail"], taken.text
    assert [e["action"] for e in await rig.stack.store.audit.trail(second)
            if e["action"] in ("provider_wait_resolved", "action_refused")] == ["action_refused"]
    row = await rig.stack.store.cases.get(second)
    assert row is not None and row["provider_refund_id"] is None and len(calls) == 2


async def test_claims_of_one_refund_in_two_letter_cases_at_once_take_turns(rig: AdyenRig) -> None:
    """Two resolutions claiming one refund, in two letter cases, at the same moment: neither
    check sees the other's uncommitted claim and the index tells letter cases apart, so both
    would commit. Claims of one id take turns: the second waits for the first's transaction
    and is refused, naming the case that holds it."""
    first, _ = await waiting_case(rig, 1_650)
    second, _ = await waiting_case(rig, 1_750)
    made, database = unique_psp(), rig.stack.store.database

    async def claim(case_id: str, refund_id: str) -> None:
        async with database.transaction() as conn:
            await CaseRepository.claim_refund_in(conn, case_id, refund_id)

    async with database.transaction() as conn:
        await CaseRepository.claim_refund_in(conn, first, made)
        other = asyncio.create_task(claim(second, made.lower()))
        await asyncio.sleep(1)  # the second claim runs while the first is open
    with pytest.raises(RefundHeldElsewhere, match=first):
        await other
    held = {case_id: (await rig.stack.store.cases.get(case_id)) for case_id in (first, second)}
    assert {k: v and v["provider_refund_id"] for k, v in held.items()} == {first: made, second: None}


async def test_a_resend_naming_a_refund_another_case_came_to_hold_is_refused(rig: AdyenRig) -> None:
    """A resolution named a refund in lower case before the case it belongs to held it; the
    claim committed as typed (the index tells letter cases apart), that case then wrote it as
    Adyen does, and the resend found the resolving case's own claim and delivered it: one
    refund booked for two cases. The claim now holds it as Adyen writes it, so the case whose
    create Adyen answers with it cannot write it too: it waits in ops review with its money
    held and nothing booked, and the refund is booked once, for the case ops named."""
    first, _ = await waiting_case(rig, 1_450)
    psp = rig.fake.payment(10_000, "EUR", MERCHANT)
    named = {"provider_shows": "refunded", "reason": "Customer Area: refund settled"}
    pasted = unique_psp().lower()
    away = CaseActions(rig.stack.store, cast(Client, SignalsLost(rig.stack.client)), rig.stack.settings)
    olga = Principal("olga", frozenset({"ops"}))
    rig.fake.next_psp = pasted.upper()  # the refund the other case's create is answered with
    with pytest.raises(RPCError):
        await resolve_provider_wait(away, olga, first, ProviderWaitBody.model_validate(
            {**named, "provider_refund_id": pasted}), via="api")
    second = await rig.stack.request_refund("alice", psp, 1_550, provider="adyen", currency="EUR",
                                            merchant_account=MERCHANT)
    held = await rig.stack.wait_for_status(second, "ops_review")
    assert (held["provider_refund_id"], held["reserved_amount"]) == (None, 1_550)
    again = await resolve(rig, "olga", first, **named, provider_refund_id=pasted)
    assert again.status_code == 200, again.text
    booked = await rig.stack.wait_for_status(first, "succeeded")
    assert booked["provider_refund_id"] == pasted.upper()
    assert await rig.stack.store.ledger.entries(second) == []
    assert [x["debit"] for x in await rig.stack.store.ledger.entries(first)] == [1_450, 0]


async def resolution_after_adyen_s_word(rig: AdyenRig, amount: int, *, refund_known: bool,
                                        names: str | None = None) -> tuple[str, str]:
    """Ops resolve a waiting case "not refunded" (or "refunded" naming `names`) while Adyen's
    REFUND:true is on its way: both pass the relay while the wait is open, the case takes
    Adyen's word first (succeeded, booked), then the resolution's signal lands: (the case,
    Adyen's refund). `refund_known`: the create was answered (the case holds the refund),
    else its answer was lost."""
    psp = rig.fake.payment(10_000, "EUR", MERCHANT)
    if not refund_known:
        rig.proxy.lose_next("POST", f"/v71/payments/{psp}/refunds")
    case_id = await rig.stack.request_refund("alice", psp, amount, provider="adyen", currency="EUR",
                                             merchant_account=MERCHANT)
    await rig.stack.wait_for_audit(case_id, "no_status_lookup_escalated")
    waiting_row = await rig.stack.wait_for_status(case_id, "ops_review")
    await past_the_create_s_horizon(rig.stack, case_id)
    [made] = rig.fake.refunds_of(psp)
    assert (waiting_row["provider_refund_id"] == made["pspReference"]) is refund_known
    body = ProviderWaitBody(provider_shows="not_refunded" if names is None else "refunded",
                            provider_refund_id=names, reason="Customer Area: as read then")
    olga = Principal("olga", frozenset({"ops"}))
    away = CaseActions(rig.stack.store, cast(Client, SignalsLost(rig.stack.client)), rig.stack.settings)
    with pytest.raises(RPCError):  # recorded while the wait is open; its signal still on its way
        await resolve_provider_wait(away, olga, case_id, body, via="api")
    success = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                           merchantReference=case_id, amount={"currency": "EUR", "value": amount})
    assert (await rig.post(success)).text == "[accepted]"
    await rig.stack.wait_for_status(case_id, "succeeded", "ops_review")
    actions = CaseActions(rig.stack.store, rig.stack.client, rig.stack.settings)
    await deliver_resolution(actions, waiting_row, body, "olga")  # the resolution's signal lands now
    return case_id, str(made["pspReference"])


@pytest.mark.parametrize("refund_known", [True, False], ids=["case-holds-the-refund", "create-unanswered"])
async def test_a_resolution_that_reaches_the_case_after_adyen_s_own_word_changes_nothing(
        rig: AdyenRig, refund_known: bool) -> None:
    """The resolution, a reading of the dashboard older than Adyen's word, changes nothing
    and is recorded as superseded (`resolution_after_adyen_s_word`). Before, it was applied
    as Adyen's late failure of the refund (a reversal booked, the hold released, the case
    failed and reissuable while the money had moved), or, naming no refund, raised as a
    duplicate."""
    case_id, psp = await resolution_after_adyen_s_word(rig, 1_400, refund_known=refund_known)
    await rig.stack.wait_for_audit(case_id, "provider_wait_resolution_superseded")
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None
    assert (row["status"], row["provider_refund_id"], row["reserved_amount"]) == ("succeeded", psp, 1_400)
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"], x["credit"]) for x in lines] == [
        ("refund_settled", 1_400, 0), ("refund_settled", 0, 1_400)]
    trail = [e["action"] for e in await rig.stack.store.audit.trail(case_id)]
    assert not {"refund_failed_after_success", "duplicate_provider_refund"} & set(trail), trail
    told = [(n["kind"], n["audience"]) for n in await rig.stack.store.outbox.notices(case_id)]
    assert told.count(("provider_wait_resolution_superseded", "operator")) == 1, told


async def test_a_late_resolution_naming_another_refund_is_still_a_second_refund(rig: AdyenRig) -> None:
    """Ops named refund Y as the case's while Adyen reported X for it first: Y, named by ops
    as a refund under the case, is a second refund carrying its reference (a duplicate for
    ops), not a reading to set aside."""
    case_id, _ = await resolution_after_adyen_s_word(rig, 1_500, refund_known=False, names=unique_psp())
    trail = await rig.stack.wait_for_audit(case_id, "duplicate_provider_refund")
    assert "provider_wait_resolution_superseded" not in trail


async def ops_read_then_adyen_says(rig: AdyenRig, amount: int, reported: int) -> tuple[str, str]:
    """Ops resolve a wait "refunded" naming Adyen's refund (the case books `amount`), then
    Adyen's REFUND for it says `reported` moved: (case id, the refund's pspReference)."""
    case_id, psp = await waiting_case(rig, amount)
    [made] = rig.fake.refunds_of(psp)
    answer = await resolve(rig, "olga", case_id, provider_shows="refunded",
                           provider_refund_id=made["pspReference"], reason="Customer Area: refund settled")
    assert answer.status_code == 200, answer.text
    await rig.stack.wait_for_status(case_id, "succeeded")
    body = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                        merchantReference=case_id, amount={"currency": "EUR", "value": reported})
    assert (await rig.post(body)).text == "[accepted]"
    return case_id, str(made["pspReference"])


async def test_adyen_s_word_for_other_money_than_ops_read_goes_to_ops(rig: AdyenRig) -> None:
    """Ops resolve the wait "refunded" naming Adyen's refund: the case books its own amount.
    Adyen's REFUND for that pspReference then says another amount moved: money other than
    booked, which Adyen cannot be listed for. The case goes to ops review and ops hear, once.
    Before, the relay dropped it as repeating what the case applied (same refund, same
    status), and the case would have too: the ledger kept the amount ops read."""
    case_id, refund_id = await ops_read_then_adyen_says(rig, 1_700, 1_200)
    row = await rig.stack.wait_for_status(case_id, "ops_review")
    [mismatch] = [e["detail"] for e in await rig.stack.store.audit.trail(case_id)
                  if e["action"] == "provider_refund_mismatch"]
    assert (mismatch["provider_refund_id"], mismatch["reported"]) == (refund_id, "12.00 EUR")
    assert row["provider_refund_id"] == refund_id
    notices = [(n["kind"], n["audience"]) for n in await rig.stack.store.outbox.notices(case_id)]
    assert notices.count(("provider_refund_mismatch", "operator")) == 1
