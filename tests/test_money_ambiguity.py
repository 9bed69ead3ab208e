"""Exactly once under ambiguity: a refused lookup is never a declined refund, no second
create goes out while the first can still land, and a revoked key sends the case to ops.

Every provider sits behind a lossy proxy (tests/lossy_proxy.py) on the real Temporal and
PostgreSQL: it loses the create's answer, hands a create on only after the client gave up
(a provider still processing it), or refuses a call with a 401/403/404 as a provider does.
"""

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from temporalio.client import Client

from adapters.config import Settings
from adapters.db import Store
from adapters.http_server import AppServer
from adapters.notify.message import FALLBACK, TEMPLATES
from starters.cli.doctor import check_timeouts
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.lossy_proxy import LossyProxy
from tests.payouts_kit import (
    add_payout_approvers,
    ask_reissue,
    decide,
    reissues_at_provider,
    remediated,
    wait_for_case,
)
from tests.rainforest_cashfree_fakes import (
    CASHFREE_API_SECRET,
    CASHFREE_ID,
    RAINFOREST_KEY,
    FakeCashfree,
    FakeRainforest,
)
from tests.test_provider_webhooks import CASHFREE_SECRET, RAINFOREST_SECRET
from workers.main import refuse_bad_settings

# The provider acts on a late create this long after our client gave up (its HTTP timeout,
# 2 s in test stacks): later than today's resubmit, within the horizon these stacks set.
LATE_SECONDS = 3.0
HORIZON: dict[str, Any] = {"resubmit_margin_seconds": 4}
SETTLED = ("pending", "succeeded", "refund_failed", "ops_review")
STRIPE_KEY = "sk_test_orchestrator"
STRIPE_MERCHANT = "acct_localstripe"


@dataclass
class Rig:
    """One provider behind a proxy, and how to make a charge, ask for and count refunds."""

    stack: Stack
    proxy: LossyProxy
    charge: Callable[[int], Awaitable[str]]
    refunds: Callable[[str], Awaitable[list[dict[str, Any]]]]
    create_path: Callable[[str], str]
    lookup: tuple[str, Callable[[str, str], str]]
    request: Callable[[str, int], Awaitable[str]]
    refund_id_key: str = "id"


async def _proxied(target: str) -> tuple[LossyProxy, AppServer]:
    proxy = LossyProxy(target)
    server = AppServer(proxy, "127.0.0.1", 0)
    await server.start()
    return proxy, server


@asynccontextmanager
async def rig_for(provider: str, store: Store, client: Client, temporal_server: TemporalDevServer,
                  localstripe: str | None = None, **overrides: Any) -> AsyncIterator[Rig]:
    """A stack whose `provider` API is reached through a lossy proxy."""
    servers: list[AppServer] = []
    proxy, proxy_server = await _proxied("")
    servers.append(proxy_server)
    address = temporal_server.address
    try:
        if provider == "sandbox":
            stack = await open_stack(store, client, address, sandbox_api_base=proxy_server.url, **overrides)
            proxy.target = stack.sandbox_url

            async def sandbox_refunds(charge: str) -> list[dict[str, Any]]:
                return await stack.provider_refunds(charge)

            rig = Rig(stack, proxy, stack.charge, sandbox_refunds, lambda _: "/v1/refunds",
                      ("GET", lambda _c, _r: "/v1/refunds"),
                      lambda charge, amount: stack.request_refund("alice", charge, amount))
        elif provider == "stripe":
            assert localstripe is not None
            proxy.target = localstripe
            stack = await open_stack(store, client, address, stripe_api_base=proxy_server.url,
                                     stripe_api_key=STRIPE_KEY, stripe_webhook_secret="whsec_x",
                                     stripe_merchant_account=STRIPE_MERCHANT, **overrides)

            def http() -> httpx.AsyncClient:
                return httpx.AsyncClient(base_url=localstripe, auth=(STRIPE_KEY, ""), timeout=30)

            async def stripe_charge(amount: int) -> str:
                async with http() as h:
                    made = await h.post("/v1/charges", data={"amount": amount, "currency": "usd",
                                                             "source": "pm_card_visa"})
                return str(made.raise_for_status().json()["id"])

            async def stripe_refunds(charge: str) -> list[dict[str, Any]]:
                async with http() as h:
                    listed = await h.get("/v1/refunds", params={"charge": charge, "limit": 100})
                return list(listed.raise_for_status().json()["data"])

            rig = Rig(stack, proxy, stripe_charge, stripe_refunds, lambda _: "/v1/refunds",
                      ("GET", lambda _c, _r: "/v1/refunds"),
                      lambda charge, amount: stack.request_refund(
                          "alice", charge, amount, provider="stripe", merchant_account=STRIPE_MERCHANT))
        elif provider == "rainforest":
            fake = FakeRainforest(RAINFOREST_KEY)
            fake_server = AppServer(fake.app(), "127.0.0.1", 0)
            await fake_server.start()
            servers.append(fake_server)
            proxy.target = fake_server.url
            stack = await open_stack(store, client, address, rainforest_webhook_secret=RAINFOREST_SECRET,
                                     rainforest_api_base=proxy_server.url, rainforest_api_key=RAINFOREST_KEY,
                                     **overrides)

            async def payin(amount: int) -> str:
                return fake.payin(amount)

            async def rainforest_refunds(payin_id: str) -> list[dict[str, Any]]:
                return fake.refunds_of(payin_id)

            rig = Rig(stack, proxy, payin, rainforest_refunds, lambda p: f"/v1/payins/{p}/refund",
                      ("GET", lambda p, _r: f"/v1/payins/{p}"),
                      lambda charge, amount: stack.request_refund(
                          "alice", charge, amount, provider="rainforest", merchant_account=fake.merchant_id),
                      refund_id_key="refund_id")
        else:
            cashfree = FakeCashfree(CASHFREE_ID, CASHFREE_API_SECRET)
            fake_server = AppServer(cashfree.app(), "127.0.0.1", 0)
            await fake_server.start()
            servers.append(fake_server)
            proxy.target = fake_server.url
            stack = await open_stack(store, client, address, cashfree_webhook_secret=CASHFREE_SECRET,
                                     cashfree_api_base=f"{proxy_server.url}/pg",
                                     cashfree_client_id=CASHFREE_ID,
                                     cashfree_client_secret=CASHFREE_API_SECRET, **overrides)

            async def order(amount: int) -> str:
                return cashfree.order(Decimal(amount) / 100)

            async def cashfree_refunds(order_id: str) -> list[dict[str, Any]]:
                return cashfree.refunds_of(order_id)

            rig = Rig(stack, proxy, order, cashfree_refunds, lambda o: f"/pg/orders/{o}/refunds",
                      ("GET", lambda o, r: f"/pg/orders/{o}/refunds/{r}"),
                      lambda charge, amount: stack.request_refund(
                          "alice", charge, amount, provider="cashfree", currency="INR",
                          merchant_account=CASHFREE_ID),
                      refund_id_key="cf_refund_id")
        try:
            yield rig
        finally:
            await stack.close()
    finally:
        for server in reversed(servers):
            await server.stop()


async def reissue(stack: Stack, case_id: str) -> httpx.Response:
    async with stack.api("olga") as api:
        return await api.post(f"/v1/refund-requests/{case_id}/reissue",
                              json={"method": "provider", "reason": "customer asked again"})


async def reached_provider(proxy: LossyProxy) -> None:
    """Waits until the late create has been handed to the provider (and answered)."""
    while not proxy.lost:
        await asyncio.sleep(0.1)


async def escalations(reason: str) -> float:
    return REGISTRY.get_sample_value("refunds_ops_review_escalations_total", {"reason": reason}) or 0.0


# -- 1. a refused lookup is never a declined refund ------------------------------------------

@pytest.mark.parametrize("provider", ["sandbox", "stripe", "rainforest", "cashfree"])
async def test_lookups_refused_after_a_lost_create_answer_never_fail_the_case(
        provider: str, store: Store, client: Client, temporal_server: TemporalDevServer,
        localstripe: str) -> None:
    async with rig_for(provider, store, client, temporal_server, localstripe) as rig:
        charge = await rig.charge(10_000)
        before = await escalations("provider_configuration_refused")
        rig.proxy.act_late("POST", rig.create_path(charge), after_seconds=1)  # made after we gave up
        case_id = await rig.request(charge, 3_000)
        await rig.stack.wait_for_audit(case_id, "verify_state")  # not there yet: resubmit ahead
        rig.proxy.refuse_next(rig.lookup[0], rig.lookup[1](charge, case_id), 401, 404)  # then fine
        row = await rig.stack.wait_for_status(case_id, "pending", "succeeded", "refund_failed", timeout=90)
        assert row["status"] in ("pending", "succeeded") and row["reserved_amount"] == 3_000
        assert [status for *_, status in rig.proxy.refused] == [401, 404]
        [made] = await rig.refunds(charge)
        assert made[rig.refund_id_key] == row["provider_refund_id"]  # the late create's, found
        trail = await rig.stack.actions(case_id)
        assert "provider_configuration_refused" in trail and "refund_declined" not in trail
        assert ("provider_configuration_refused", "operator") in {
            (n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)}
        assert await escalations("provider_configuration_refused") == before + 1
        assert (await reissue(rig.stack, case_id)).status_code == 409


# -- 2. no second create while the first can still land --------------------------------------

@pytest.mark.parametrize("provider", ["sandbox", "stripe", "rainforest", "cashfree"])
async def test_a_create_the_provider_makes_after_we_gave_up_is_found_not_made_twice(
        provider: str, store: Store, client: Client, temporal_server: TemporalDevServer,
        localstripe: str) -> None:
    async with rig_for(provider, store, client, temporal_server, localstripe, **HORIZON) as rig:
        charge = await rig.charge(10_000)
        rig.proxy.act_late("POST", rig.create_path(charge), after_seconds=LATE_SECONDS)
        case_id = await rig.request(charge, 2_000)
        row = await rig.stack.wait_for_status(case_id, *SETTLED, timeout=90)
        assert row["status"] in ("pending", "succeeded")
        await rig.stack.wait_for_audit(case_id, "verify_state")
        await reached_provider(rig.proxy)
        refunds = await rig.refunds(charge)
        assert len(refunds) == 1, refunds


async def reissue_approved(rig: Rig, arm: Callable[[], None]) -> tuple[str, str]:
    """A failed payout remediated and its reissue approved, with `arm` set on the proxy just
    before the approval that starts it; returns the case id and the reissue's reference."""
    stack = rig.stack
    await add_payout_approvers(stack)
    payout, case_id = await remediated(stack, 150_000, "insufficient_funds")
    assert (await ask_reissue(stack, "omar", case_id)).status_code == 202
    arm()
    assert (await decide(stack, "lena", case_id)).status_code == 202
    row = await wait_for_case(stack, case_id, "reissued", "reissue_failed", timeout=90)
    assert row["status"] == "reissued"
    return case_id, payout.reissue_id()


async def test_a_payout_reissue_the_provider_makes_after_we_gave_up_is_made_once(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with rig_for("sandbox", store, client, temporal_server, **HORIZON) as rig:
        _, reference = await reissue_approved(
            rig, lambda: rig.proxy.act_late("POST", "/v1/payouts", after_seconds=LATE_SECONDS))
        await reached_provider(rig.proxy)
        made = await reissues_at_provider(rig.stack, reference)
        assert len(made) == 1, made


async def test_a_payout_reissue_landing_after_its_last_attempt_gave_up_is_found_and_booked(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The case's last reissue attempt (one, here) gets no answer, and the provider makes the
    payout after our client gave up. Sent to ops at once, the case never looked again: the
    beneficiary was paid, our books showed no reissue and the original on hold, and ops who
    checked the provider straight away found nothing and paid by hand (twice). The horizon
    is waited out and the provider asked once more: the late payout is booked as the reissue."""
    async with rig_for("sandbox", store, client, temporal_server, max_submit_attempts=1, **HORIZON) as rig:
        stack = rig.stack
        await add_payout_approvers(stack)
        payout, case_id = await remediated(stack, 150_000, "insufficient_funds")
        assert (await ask_reissue(stack, "omar", case_id)).status_code == 202
        rig.proxy.act_late("POST", "/v1/payouts", after_seconds=LATE_SECONDS)
        assert (await decide(stack, "lena", case_id)).status_code == 202
        row = await wait_for_case(stack, case_id, "reissued", "reissue_failed", "ops_review", timeout=90)
        await reached_provider(rig.proxy)
        assert len(await reissues_at_provider(stack, payout.reissue_id())) == 1
        assert row["status"] == "reissued", await stack.actions(case_id)
        assert [e["template"] for e in await store.ledger.entries(case_id)].count("payout_reissued") == 2


async def test_a_payout_reissue_whose_key_is_refused_tells_ops_and_is_made_once_fixed(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with rig_for("sandbox", store, client, temporal_server) as rig:
        case_id, reference = await reissue_approved(
            rig, lambda: rig.proxy.refuse_next("GET", "/v1/payouts", 401))
        assert [status for *_, status in rig.proxy.refused] == [401]
        assert len(await reissues_at_provider(rig.stack, reference)) == 1
        assert ("payout_reissue_configuration_refused", "payments_ops") in {
            (n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)}
        assert "reissue_configuration_refused" in await rig.stack.actions(case_id)


def test_a_submit_timeout_within_the_provider_http_timeout_is_refused() -> None:
    bad = Settings(submit_timeout_seconds=10, provider_http_timeout_seconds=10)
    finding = check_timeouts(bad)
    assert not finding.ok and "REFUNDS_SUBMIT_TIMEOUT_SECONDS" in finding.detail
    with pytest.raises(SystemExit, match="REFUNDS_SUBMIT_TIMEOUT_SECONDS"):
        refuse_bad_settings(bad)
    good = Settings(submit_timeout_seconds=30, provider_http_timeout_seconds=10)
    assert check_timeouts(good).ok
    refuse_bad_settings(good)


def test_a_case_sweep_that_could_outrun_a_create_in_flight_is_refused() -> None:
    """The sweep hands a case whose workflow ended to ops and releases its reservation when
    one lookup finds no refund. A case idle for less than a submit attempt plus the provider's
    horizon may still have a create in flight (the attempt runs on after a terminate): the
    refund would land after the release."""
    bad = Settings(submit_timeout_seconds=30, provider_http_timeout_seconds=10, resubmit_margin_seconds=60,
                   case_sweep_after_seconds=60)
    with pytest.raises(SystemExit, match="REFUNDS_CASE_SWEEP_AFTER_SECONDS \\(60\\) must exceed 100"):
        refuse_bad_settings(bad)
    assert not check_timeouts(bad).ok
    refuse_bad_settings(bad.model_copy(update={"case_sweep_seconds": 0}))  # no sweep: nothing to outrun
    refuse_bad_settings(bad.model_copy(update={"case_sweep_after_seconds": 101}))


def test_the_worker_process_refuses_to_start_with_such_settings() -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("REFUNDS_", "TEMPORAL_"))},
           "REFUNDS_DATABASE_URL": "postgresql://127.0.0.1:1/never", "REFUNDS_SUBMIT_TIMEOUT_SECONDS": "5",
           "REFUNDS_PROVIDER_HTTP_TIMEOUT_SECONDS": "10", "REFUNDS_WORKER_HEALTH_PORT": "0",
           "REFUNDS_TEMPORAL_METRICS_PORT": "0"}
    refused = subprocess.run([str(Path(sys.executable).parent / "refunds"), "worker"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2  # the CLI's exit status for an error it names
    assert "refusing to start: REFUNDS_SUBMIT_TIMEOUT_SECONDS (5) must exceed" in refused.stderr


# -- 6. retries that cannot succeed say so ---------------------------------------------------

async def test_a_revoked_key_sends_the_case_to_ops_and_it_resumes_once_fixed(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with rig_for("sandbox", store, client, temporal_server) as rig:
        charge = await rig.charge(10_000)
        rig.proxy.refuse_next("GET", f"/v1/charges/{charge}", 401)  # validating
        rig.proxy.refuse_next("POST", "/v1/refunds", 403)  # executing
        before = await escalations("provider_configuration_refused")
        case_id = await rig.request(charge, 1_000)
        row = await rig.stack.wait_for_status(case_id, "succeeded", "refund_failed", "rejected", timeout=60)
        assert row["status"] == "succeeded"
        assert [status for *_, status in rig.proxy.refused] == [401, 403]
        trail = await rig.stack.actions(case_id)
        assert trail.count("provider_configuration_refused") == 2  # validating, then executing
        assert "provider_credentials_refused" in trail  # the create's own answer, audited
        assert trail.count("provider_answering_again") == 2  # back to validating, then executing
        kinds = [n["kind"] for n in await store.outbox.notices(case_id)]
        assert kinds.count("provider_configuration_refused") == 2
        assert await escalations("provider_configuration_refused") == before + 2
        assert len(await rig.refunds(charge)) == 1


async def test_provider_reads_that_keep_failing_go_to_ops_then_resume(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with rig_for("sandbox", store, client, temporal_server, provider_read_attempts=2) as rig:
        charge = await rig.charge(10_000)
        rig.proxy.refuse_next("GET", f"/v1/charges/{charge}", 503, 503)  # validation's two attempts
        rig.proxy.lose_next("POST", "/v1/refunds")  # made, its answer lost
        rig.proxy.refuse_next("GET", "/v1/refunds", 503, 503)  # verify-state's two attempts
        before = {step: await escalations(f"{step}_retries_exhausted") for step in ("validate", "verify")}
        case_id = await rig.request(charge, 1_500)
        row = await rig.stack.wait_for_status(case_id, "succeeded", "refund_failed", "rejected", timeout=60)
        assert row["status"] == "succeeded"
        assert [status for *_, status in rig.proxy.refused] == [503] * 4
        trail = await rig.stack.actions(case_id)
        assert trail.index("validate_retries_exhausted") < trail.index("validation_passed")
        assert trail.index("verify_retries_exhausted") < trail.index("refund_succeeded")
        assert trail.count("provider_answering_again") == 2
        kinds = {(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)}
        assert {("validate_retries_exhausted", "operator"), ("verify_retries_exhausted", "operator")} <= kinds
        for step in ("validate", "verify"):
            assert await escalations(f"{step}_retries_exhausted") == before[step] + 1
        [made] = await rig.refunds(charge)
        assert made["id"] == row["provider_refund_id"]


async def test_each_outage_a_case_goes_through_is_announced(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The provider stops answering lookups, answers again, and stops again while the case
    follows a pending refund: two incidents, two notices. Before, the second had the first's
    key (kind and the refund's unchanged status) and was never queued: ops saw the case back
    in ops review with nothing said."""
    async with rig_for("sandbox", store, client, temporal_server, provider_read_attempts=2) as rig:
        async with rig.stack.sandbox() as sb:
            await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
        charge = await rig.charge(10_000)
        case_id = await rig.request(charge, 1_500)
        row = await rig.stack.wait_for_status(case_id, "pending")
        for outage in (1, 2):
            rig.proxy.refuse_next("GET", "/v1/refunds", 503, 503)
            await rig.stack.wait_for_audit(case_id, "provider_answering_again", count=outage)
        kinds = [n["kind"] for n in await store.outbox.notices(case_id)]
        assert kinds.count("verify_retries_exhausted") == 2, kinds
        await rig.stack.set_provider_status(row["provider_refund_id"], "succeeded")
        await rig.stack.wait_for_status(case_id, "succeeded")


def test_every_escalation_has_its_own_notice_template() -> None:
    for kind in ("provider_configuration_refused", "validate_retries_exhausted",
                 "verify_retries_exhausted", "payout_reissue_configuration_refused"):
        assert TEMPLATES.get(kind, FALLBACK) is not FALLBACK, kind
    assert TEMPLATES["payout_reissue_configuration_refused"].payout
