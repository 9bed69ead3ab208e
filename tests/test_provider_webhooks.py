"""Rainforest and Cashfree webhooks through the relay, with payloads recorded in the shape
of each provider's refund webhook documentation (tests/payloads/, ids made unique per
test): signed ones are accepted and tracked to the ledger; every tampered byte, stale
timestamp, wrong secret, missing header and oversize body is refused with a clear 4xx and
a receipt, and no case or workflow is touched."""

import base64
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
from svix.webhooks import Webhook as SvixWebhook
from temporalio import client as temporal
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from adapters.config import Settings
from adapters.db import Store
from adapters.providers import cashfree, sandbox
from adapters.providers.base import WebhookRejected
from domain.events import tracking_case_id
from domain.models import EventKind, ProviderEvent, ProviderRefund, ProviderRefundStatus
from starters.cli.parser import build_parser
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.harness import Stack, open_stack
from tests.test_bad_input import receipt, workflow_exists

PAYLOADS = Path(__file__).parent / "payloads"
RAINFOREST_SECRET = "whsec_" + base64.b64encode(b"rainforest-test-secret-0123456789").decode()
CASHFREE_SECRET = "cashfree-test-client-secret"
Delivery = tuple[bytes, dict[str, str]]


def sign_rainforest(body: bytes, secret: str = RAINFOREST_SECRET, at: float | None = None,
                    msg_id: str | None = None) -> dict[str, str]:
    sent = datetime.fromtimestamp(int(time.time() if at is None else at), UTC)
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    return {"svix-id": msg_id, "svix-timestamp": str(int(sent.timestamp())),
            "svix-signature": SvixWebhook(secret).sign(msg_id, sent, body.decode()),
            "content-type": "application/json"}


def sign_cashfree(body: bytes, secret: str = CASHFREE_SECRET, at: float | None = None) -> dict[str, str]:
    stamp = int((time.time() if at is None else at) * 1000)
    return {"x-webhook-timestamp": str(stamp), "x-webhook-signature": cashfree.sign(secret, body, stamp),
            "x-webhook-version": "2023-08-01", "content-type": "application/json"}


SIGNERS: dict[str, Callable[..., dict[str, str]]] = {"rainforest": sign_rainforest, "cashfree": sign_cashfree}
RECORDED = {  # provider, payload file, the refund id in it, its derived-id replacement prefix
    "rainforest": ("rainforest_refund.processing.json", b"rfd_2sPMefai6yWsyp4MSGUkAo32pp7", b"rfd_"),
    "cashfree": ("cashfree_auto_refund_status.json", b"1243460973", b"9"),
}


def recorded(provider: str) -> tuple[bytes, str]:
    """The recorded payload with its refund id made unique; returns (body, refund id)."""
    name, original, prefix = RECORDED[provider]
    unique = prefix + str(uuid.uuid4().int)[:12].encode()
    return (PAYLOADS / name).read_bytes().replace(original, unique), unique.decode()


@pytest.fixture(scope="module")
async def hooks(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    stack = await open_stack(store, client, temporal_server.address,
                             rainforest_webhook_secret=RAINFOREST_SECRET,
                             cashfree_webhook_secret=f"{CASHFREE_SECRET},older-cashfree-secret",
                             webhook_allowed_sources={"sandbox": ["10.0.0.0/8"]},
                             webhook_redrive_after_seconds=0)
    yield stack
    await stack.close()


async def post(stack: Stack, provider: str, body: bytes | Any, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        return await http.post(f"/webhooks/{provider}", content=body, headers=headers)


# -- accepted ------------------------------------------------------------------------------

async def test_rainforest_refund_events_are_tracked_to_a_final_state(hooks: Stack) -> None:
    body, refund_id = recorded("rainforest")
    response = await post(hooks, "rainforest", body, sign_rainforest(body))
    case_id = tracking_case_id("rainforest", refund_id)
    assert response.status_code == 200, response.text
    assert response.json()["verdict"] == "accepted" and response.json()["workflow_id"] == case_id
    row = await hooks.wait_for_status(case_id, "pending")
    assert (row["amount"], row["currency"], row["reserved_amount"]) == (1500, "USD", 1500)
    assert row["merchant_account"] == "mid_2sPMdFkHyz2NsLvGB3U9DeaLdMz"

    failed = (PAYLOADS / "rainforest_refund.failed.json").read_bytes().replace(
        RECORDED["rainforest"][1], refund_id.encode())
    assert (await post(hooks, "rainforest", failed, sign_rainforest(failed))).status_code == 200
    row = await hooks.wait_for_status(case_id, "refund_failed")
    assert row["failure_reason"] == "account_closed: The customer's account is closed."
    assert row["reserved_amount"] == 0
    assert await hooks.store.ledger.entries(case_id) == []


async def test_cashfree_auto_refund_reaches_the_ledger_in_exact_minor_units(hooks: Stack) -> None:
    body, refund_id = recorded("cashfree")
    headers = sign_cashfree(body, secret="older-cashfree-secret")  # a rotated-out secret still counts
    response = await post(hooks, "cashfree", body, headers)
    assert response.status_code == 200, response.text
    case_id = tracking_case_id("cashfree", refund_id)
    row = await hooks.wait_for_status(case_id, "succeeded")
    assert (row["amount"], row["currency"], row["charge_id"]) == (3900, "INR", "2148333968")
    lines = await hooks.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"], x["credit"], x["currency"]) for x in lines] == [
        ("refund_settled", 3900, 0, "INR"), ("refund_settled", 0, 3900, "INR")]
    again = await post(hooks, "cashfree", body, sign_cashfree(body))
    assert again.json()["verdict"] == "duplicate"
    assert len(await hooks.store.ledger.entries(case_id)) == 2


@pytest.mark.parametrize("reason", ["Refunded to customer for Dispute.", "A reason Cashfree added later"])
async def test_a_cashfree_auto_refund_of_the_order_s_own_money_is_held_on_the_order(
        hooks: Stack, reason: str) -> None:
    """A dispute's auto-refund gives back the money the order kept (so may one whose reason
    Cashfree has not listed): its hold is on the order, the charge our refunds of that order
    count against. Held on the payment (as a second payment's is), a refund of the same
    order saw the full amount refundable and paid the customer again."""
    body, refund_id = recorded("cashfree")
    body = body.replace(b"Multiple payments were performed against same order.", reason.encode())
    assert (await post(hooks, "cashfree", body, sign_cashfree(body))).status_code == 200
    row = await hooks.wait_for_status(tracking_case_id("cashfree", refund_id), "succeeded")
    assert (row["charge_id"], row["amount"]) == ("order_1944392Tpba8y2fHcHVx0SwREojp51Jgr", 3900)


# -- refused -------------------------------------------------------------------------------

AMOUNT_KEYS = {"rainforest": b'"amount": ', "cashfree": b'"refund_amount": '}


def tampered(provider: str, body: bytes) -> Delivery:
    headers = SIGNERS[provider](body)
    at = body.index(AMOUNT_KEYS[provider]) + len(AMOUNT_KEYS[provider])
    return body[:at] + (b"8" if body[at:at + 1] == b"9" else b"9") + body[at + 1:], headers


def stale(provider: str, body: bytes) -> Delivery:
    return body, SIGNERS[provider](body, at=time.time() - 600)


def wrong_secret(provider: str, body: bytes) -> Delivery:
    other = "whsec_" + base64.b64encode(b"not-the-rainforest-secret-000000").decode()
    return body, SIGNERS[provider](body, secret=other if provider == "rainforest" else "not-it")


def missing_header(provider: str, body: bytes) -> Delivery:
    headers = SIGNERS[provider](body)
    del headers["svix-signature" if provider == "rainforest" else "x-webhook-signature"]
    return body, headers


def oversize(provider: str, body: bytes) -> Delivery:
    padded = body.rstrip()[:-1] + b', "padding": "' + b"x" * (300 * 1024) + b'"}'
    return padded, SIGNERS[provider](padded)


REFUSALS: dict[str, tuple[Callable[[str, bytes], Delivery], int, str]] = {
    "tampered_byte": (tampered, 401, "bad_signature"),
    "stale_timestamp": (stale, 401, "stale"),
    "wrong_secret": (wrong_secret, 401, "bad_signature"),
    "missing_header": (missing_header, 401, "bad_signature"),
    "oversize_body": (oversize, 413, "too_large"),
}


@pytest.mark.parametrize("provider", ["rainforest", "cashfree"])
@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_delivery_is_recorded_and_touches_nothing(hooks: Stack, provider: str,
                                                                case: str) -> None:
    build, status, verdict = REFUSALS[case]
    body, refund_id = recorded(provider)
    content, headers = build(provider, body)
    assert content != body or case != "tampered_byte"
    response = await post(hooks, provider, content, headers)
    assert response.status_code == status, response.text
    assert response.json()["verdict"] == verdict and response.json()["detail"]
    row = await receipt(hooks, provider, response.json()["receipt_id"])
    assert row["verdict"] == verdict and row["error"] and row["processed_at"] is None
    case_id = tracking_case_id(provider, refund_id)
    assert await hooks.store.cases.get(case_id) is None
    assert not await workflow_exists(hooks, case_id)


async def test_unexpected_status_is_a_loud_422_with_a_receipt(hooks: Stack) -> None:
    body, refund_id = recorded("cashfree")
    body = body.replace(b'"SUCCESS"', b'"REVERSED_BY_BANK"')
    response = await post(hooks, "cashfree", body, sign_cashfree(body))
    assert response.status_code == 422, response.text
    assert "REVERSED_BY_BANK" in response.json()["detail"]
    row = await receipt(hooks, "cashfree", response.json()["receipt_id"])
    assert (row["verdict"], row["event_type"]) == ("unexpected_status", "AUTO_REFUND_STATUS_WEBHOOK")
    assert await hooks.store.cases.get(tracking_case_id("cashfree", refund_id)) is None


async def test_source_outside_the_allowlist_is_403(hooks: Stack) -> None:
    response = await post(hooks, "sandbox", b"{}", {"content-type": "application/json"})
    assert response.status_code == 403, response.text
    row = await receipt(hooks, "sandbox", response.json()["receipt_id"])
    assert row["verdict"] == "forbidden_source" and "127.0.0.1" in row["error"]


@pytest.mark.parametrize(("peer", "allowed"), [
    ("::ffff:10.1.2.3", True), ("10.1.2.3", True), ("::ffff:11.1.2.3", False), ("::1", False)])
async def test_an_allowed_ipv4_source_seen_through_a_dual_stack_socket_is_allowed(
        hooks: Stack, peer: str, allowed: bool) -> None:
    """A relay bound to `::` sees IPv4 peers as IPv4-mapped IPv6 addresses (::ffff:a.b.c.d),
    which no IPv4 network contains: every genuine delivery from an allowed source was 403."""
    desk = WebhookDesk(hooks.store, hooks.client, hooks.providers, hooks.settings)
    result = await desk.ingest("sandbox", {"content-type": "application/json"}, b"{}", now=time.time(),
                               peer=peer)
    assert (result.status_code == 403) is not allowed, result
    # an allowlist written in the mapped form (what worked on a dual-stack socket) still holds
    mapped_form = hooks.settings.model_copy(update={"webhook_allowed_sources": {
        "sandbox": [ip_network("::ffff:10.0.0.0/104")]}})
    assert WebhookDesk(hooks.store, hooks.client, hooks.providers, mapped_form)._source_allowed(
        "sandbox", peer) is allowed


async def test_a_replay_never_vouches_for_a_delivery_from_a_source_not_allowed(
        hooks: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """The source allowlist is what stands when a signing secret leaks: a validly signed
    event from elsewhere is refused 403, and replaying its receipt (by id or in a window)
    must refuse it again, not accept it as if it had come from the provider."""
    secret = hooks.settings.sandbox_webhook_secret
    assert secret is not None
    refund_id = f"re_{uuid.uuid4().hex[:12]}"
    leaked = {"id": refund_id, "charge": "ch_leak", "amount": 4_000, "currency": "usd", "status": "succeeded",
              "metadata": {}}
    body = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "refund.updated", "created": int(time.time()),
                       "data": {"object": leaked}}).encode()
    signed = {"sandbox-signature": sandbox.sign(secret.get_secret_value(), body, int(time.time())),
              "content-type": "application/json"}
    refused = await post(hooks, "sandbox", body, signed)
    assert refused.status_code == 403, refused.text
    [again] = await cli(hooks, capsys, "webhooks", "replay", "--receipt", str(refused.json()["receipt_id"]))
    assert again["verdict"] == "forbidden_source", again
    assert await hooks.store.cases.get(tracking_case_id("sandbox", refund_id)) is None


# -- normalisation, without a stack --------------------------------------------------------

@pytest.mark.parametrize(("raw", "status"), [
    ("SUCCESS", "succeeded"), ("PENDING", "pending"), ("INITIATED", "pending"),
    ("ONHOLD", "requires_action"), ("CANCELLED", "canceled"), ("FAILED", "failed")])
def test_cashfree_refund_status_webhook_maps_every_status(raw: str, status: str) -> None:
    body = (PAYLOADS / "cashfree_refund_status.json").read_bytes().replace(b'"SUCCESS"', f'"{raw}"'.encode())
    adapter = cashfree.CashfreeProvider(webhook_secrets=[CASHFREE_SECRET])
    event = adapter.parse_webhook(sign_cashfree(body), body, time.time())
    assert (event.status, event.raw_status, event.amount, event.currency) == (status, raw, 200, "INR")
    assert event.refund_request_id == "refund_sampleorder0413" and event.refund_id == "11325632"
    assert (event.failure_reason is not None) == (status in ("failed", "canceled"))


def test_cashfree_amount_with_more_decimals_than_the_currency_is_unreadable() -> None:
    """Signed, so the provider's own word that no rule can read: `unreadable` (kept, loud),
    not `malformed` (pruned after the refused retention like unsigned traffic)."""
    body = (PAYLOADS / "cashfree_refund_status.json").read_bytes().replace(b"2.00", b"2.005")
    adapter = cashfree.CashfreeProvider(webhook_secrets=[CASHFREE_SECRET])
    with pytest.raises(WebhookRejected) as refused:
        adapter.parse_webhook(sign_cashfree(body), body, time.time())
    assert refused.value.verdict == "unreadable" and "decimals" in refused.value.message


# -- coverage, replay, re-drive ------------------------------------------------------------

async def cli(hooks: Stack, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """Runs a `refunds` command in-process against the stack's relay; returns its JSON."""
    args = build_parser().parse_args(["--token", hooks.tokens["admin"], *argv])
    capsys.readouterr()
    assert await args.run(args, Settings(relay_url=hooks.relay_url)) == 0
    return json.loads(capsys.readouterr().out)


async def test_coverage_lists_arrived_handled_unknown_and_refused(
        hooks: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    body, _ = recorded("cashfree")
    assert (await post(hooks, "cashfree", body, sign_cashfree(body))).status_code == 200
    unknown = body.replace(b"AUTO_REFUND_STATUS_WEBHOOK", b"REFUND_TELEPORTED_WEBHOOK")
    response = await post(hooks, "cashfree", unknown, sign_cashfree(unknown))
    assert (response.status_code, response.json()["verdict"]) == (202, "unknown_type")
    forged = await post(hooks, "cashfree", body, sign_cashfree(body, secret="forger"))
    report = await cli(hooks, capsys, "webhooks", "coverage")
    async with hooks.api("dave") as api:  # auditors read it over the API too
        over_api = (await api.get("/v1/webhooks/coverage")).json()
    assert over_api["providers"].keys() == report["providers"].keys()
    entry = report["providers"]["cashfree"]
    assert entry["handled"] == ["AUTO_REFUND_STATUS_WEBHOOK", "REFUND_STATUS_WEBHOOK"]
    assert entry["arrived"]["AUTO_REFUND_STATUS_WEBHOOK"]["accepted"] >= 1
    assert entry["unknown_types"] == ["REFUND_TELEPORTED_WEBHOOK"]
    assert entry["rejected"]["unknown_type"] >= 1 and entry["rejected"]["bad_signature"] >= 1
    # the latest 20 refusals of the shared database: in it, unless 20 newer ones (other tests
    # running beside this one) pushed it out, counted after the report was read
    forged_id = forged.json()["receipt_id"]
    [newer] = await hooks.store.database.fetch_all(
        "SELECT count(*) AS n FROM webhook_receipts WHERE id > %s"
        " AND verdict NOT IN ('accepted', 'duplicate')", (forged_id,))
    listed = [r["id"] for r in report["recent_rejections"]]
    assert forged_id in listed or newer["n"] >= 20, (forged_id, listed)
    assert listed == sorted(listed, reverse=True)  # newest first
    assert "refund.in_review" in report["providers"]["rainforest"]["handled"]


async def test_replay_goes_through_the_same_path_and_acts_once(
        hooks: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    body, refund_id = recorded("cashfree")
    first = (await post(hooks, "cashfree", body, sign_cashfree(body))).json()
    case_id = tracking_case_id("cashfree", refund_id)
    await hooks.wait_for_status(case_id, "succeeded")
    forged = (await post(hooks, "cashfree", body, sign_cashfree(body, secret="forger"))).json()

    [again] = await cli(hooks, capsys, "webhooks", "replay", "--receipt", str(first["receipt_id"]))
    assert (again["verdict"], again["replay_of"]) == ("duplicate", first["receipt_id"])
    stored = await hooks.store.receipts.delivery(first["receipt_id"])
    assert stored is not None
    replayed = await cli(hooks, capsys, "webhooks", "replay", "--since", stored.received_at.isoformat())
    by_origin = {r["replay_of"]: r["verdict"] for r in replayed}
    assert by_origin[first["receipt_id"]] == "duplicate"
    assert by_origin[forged["receipt_id"]] == "bad_signature"  # the signature is checked again
    assert again["receipt_id"] not in by_origin  # replays are not replayed
    assert len(await hooks.store.ledger.entries(case_id)) == 2


async def test_a_replay_window_is_paged_so_no_call_outlives_its_client(
        hooks: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """A window's replay answers one page a call (`limit`, then `after_receipt_id`); the CLI
    walks the pages. One call over every receipt since 0 timed out in the schema fuzz."""
    firsts = []
    for _ in range(3):
        body, _refund = recorded("cashfree")
        firsts.append((await post(hooks, "cashfree", body, sign_cashfree(body))).json()["receipt_id"])
    stored = await hooks.store.receipts.delivery(firsts[0])
    assert stored is not None
    since = stored.received_at.isoformat()
    async with hooks.api("olga") as api:
        page = await api.post("/v1/webhook-receipts/replay", json={"since": since, "limit": 2})
        assert [r["replay_of"] for r in page.json()] == firsts[:2]
        rest = await api.post("/v1/webhook-receipts/replay", json={
            "since": since, "limit": 2, "after_receipt_id": firsts[1]})
        assert [r["replay_of"] for r in rest.json()][:1] == firsts[2:]
        assert (await api.post("/v1/webhook-receipts/replay", json={"since": since, "limit": 1001})
                ).status_code == 422
    walked = await cli(hooks, capsys, "webhooks", "replay", "--since", since)
    assert set(firsts) <= {r["replay_of"] for r in walked}


async def test_integration_calls_are_not_replayed_through_the_webhook_path(hooks: Stack) -> None:
    """A Slack or ServiceNow call's receipt went through the webhook path on a replay: no
    such provider, so a new `unknown_provider` receipt was stored for each (a window's replay
    did it for every integration call in it, and coverage counted them). Their sender sends
    a call again itself: a single replay is a 404 that says so, a window skips them."""
    body = b'{"sys_id": "abc"}'
    call = (await hooks.store.receipts.store(
        provider="servicenow", event_id=f"sn-{uuid.uuid4().hex}", event_type="ticket", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="accepted", error=None)).receipt_id
    stored = await hooks.store.receipts.delivery(call)
    assert stored is not None
    async with hooks.api("olga") as api:
        one = await api.post("/v1/webhook-receipts/replay", json={"receipt_id": call})
        window = await api.post("/v1/webhook-receipts/replay",
                                json={"since": stored.received_at.isoformat(), "limit": 1000})
    assert one.status_code == 404 and "ServiceNow" in one.json()["detail"], one.text
    assert window.status_code == 200 and call not in [r["replay_of"] for r in window.json()], window.text
    made = await hooks.store.database.fetch_all(
        "SELECT verdict FROM webhook_receipts WHERE replay_of = %s", (call,))
    assert made == []


async def test_redrive_heals_a_receipt_stored_but_never_routed(
        hooks: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    body, refund_id = recorded("cashfree")
    event_id = f"AUTO_REFUND_STATUS_WEBHOOK:{refund_id}:SUCCESS"
    crashed = await hooks.store.receipts.store(  # what the relay wrote before a crash
        provider="cashfree", event_id=event_id, event_type="AUTO_REFUND_STATUS_WEBHOOK", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers=sign_cashfree(body), verdict="accepted",
        error=None)
    case_id = tracking_case_id("cashfree", refund_id)
    assert await hooks.store.cases.get(case_id) is None
    healed = await cli(hooks, capsys, "webhooks", "redrive")
    assert {"replay_of": crashed.receipt_id, "verdict": "duplicate", "workflow_id": case_id,
            "receipt_id": healed[-1]["receipt_id"], "status_code": 200} in healed
    await hooks.wait_for_status(case_id, "succeeded")
    row = await receipt(hooks, "cashfree", crashed.receipt_id)
    assert row["processed_at"] is not None and row["workflow_id"] == case_id
    assert crashed.receipt_id not in [r["replay_of"] for r in await cli(hooks, capsys, "webhooks", "redrive")]


class TemporalAway(temporal.Interceptor):
    """A relay whose Temporal does not answer (an outage): every start and signal fails so."""

    def intercept_client(self, next: temporal.OutboundInterceptor) -> temporal.OutboundInterceptor:
        class Away(temporal.OutboundInterceptor):
            async def start_workflow(self, input: temporal.StartWorkflowInput) -> Any:
                raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

            async def signal_workflow(self, input: temporal.SignalWorkflowInput) -> None:
                raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

        return Away(next)


async def test_a_temporal_outage_uses_up_no_redrive_tries(hooks: Stack) -> None:
    """Re-drive gives up on a receipt after `webhook_redrive_max_attempts` tries; passes that
    found Temporal away tried nothing, so an outage longer than the tries (a few minutes at
    the defaults) must not give up on every receipt of its window. And the tracking case the
    first try opened before Temporal failed it gets its workflow when Temporal is back (it
    was taken for a case whose workflow had closed)."""
    body, refund_id = recorded("cashfree")
    crashed = await hooks.store.receipts.store(
        provider="cashfree", event_id=f"AUTO_REFUND_STATUS_WEBHOOK:{refund_id}:SUCCESS",
        event_type="AUTO_REFUND_STATUS_WEBHOOK", body=body, body_sha256=hashlib.sha256(body).hexdigest(),
        headers=sign_cashfree(body), verdict="accepted", error=None)
    patient = hooks.settings.model_copy(update={"webhook_redrive_max_attempts": 2})
    config = hooks.client.config()
    config["interceptors"] = [*config["interceptors"], TemporalAway()]
    during_outage = WebhookDesk(hooks.store, temporal.Client(**config), hooks.providers, patient)
    for _ in range(3):
        assert await during_outage.redrive() == []
    after = await WebhookDesk(hooks.store, hooks.client, hooks.providers, patient).redrive()
    assert crashed.receipt_id in [r.replay_of for r in after]
    await hooks.wait_for_status(tracking_case_id("cashfree", refund_id), "succeeded")


async def test_a_tracking_case_past_retention_is_not_followed_again_from_scratch(hooks: Stack) -> None:
    """A tracking case its workflow followed (it applied the refund's success) whose workflow
    Temporal's retention has dropped: a later failure must go the closed case's way (audited,
    reconciled into a break), not start a fresh tracking run that knows nothing of it."""
    refund = ProviderRefund(provider="sandbox", refund_id=f"re_{uuid.uuid4().hex[:12]}", charge_id="ch_ret",
                            amount=700, currency="USD", status=ProviderRefundStatus.SUCCEEDED,
                            raw_status="succeeded")
    case_id = tracking_case_id("sandbox", refund.refund_id)
    assert await hooks.store.cases.open_tracking(case_id, refund, None, "refund.updated")
    await hooks.store.database.execute(  # as its workflow left it before retention dropped it
        "UPDATE refund_cases SET status = 'succeeded' WHERE refund_request_id = %s", (case_id,))
    failed = ProviderEvent(
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="refund.updated",
        kind=EventKind.REFUND_STATUS, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
        refund_id=refund.refund_id, charge_id=refund.charge_id, amount=700, currency="USD",
        status=ProviderRefundStatus.FAILED, raw_status="failed", failure_reason="card_account_closed")
    desk = WebhookDesk(hooks.store, hooks.client, hooks.providers, hooks.settings)
    assert await desk.route(failed) == case_id
    assert not await workflow_exists(hooks, case_id)
    assert "event_after_close" in await hooks.actions(case_id)
