"""Adyen's payments source in its production wiring: the relay records AUTHORISATION,
CAPTURE, CAPTURE_FAILED and CANCELLATION notifications (Adyen's documented examples in
tests/payloads/, re-signed after their references are made unique) and the refund ones in
`payment_notifications`, and validation reads the charge from there. Payment notifications
get receipts and dedup like every delivery and never start a workflow."""

import hashlib
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import httpx
import psycopg
import pytest
from temporalio.client import Client

from adapters.db import Store
from adapters.db.payments import PaymentNotificationRepository
from domain.events import tracking_case_id
from domain.models import ChargeSnapshot
from domain.payments import PaymentStatus, RecordedNotification, charge_from_notifications
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.test_adyen import MERCHANT, AdyenRig, adyen_rig, notification, unique_psp
from tests.test_bad_input import receipt, workflow_exists
from tests.test_governance import approve


@pytest.fixture(scope="module")
async def rig(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[AdyenRig]:
    async with adyen_rig(store, client, temporal_server, charges_from_fake=False) as rigged:
        yield rigged


async def recorded_rows(rig: AdyenRig, payment_id: str) -> list[dict[str, Any]]:
    async with rig.stack.store.database.transaction() as conn:
        cur = await conn.execute("SELECT event_type, psp_reference, status, amount FROM payment_notifications"
                                 " WHERE provider = 'adyen' AND payment_id = %s ORDER BY recorded_at",
                                 (payment_id,))
        return list(await cur.fetchall())


async def notify(rig: AdyenRig, name: str, **fields: Any) -> httpx.Response:
    """Posts a recorded notification through the relay; asserts Adyen's acknowledgement."""
    response = await rig.post(notification(name, **fields))
    assert (response.status_code, response.text) == (200, "[accepted]"), response.text
    return response


async def paid(rig: AdyenRig, authorised: int, captured: int | None = None, currency: str = "EUR") -> str:
    """A payment authorised (and captured, partly if asked) as Adyen notifies it, amounts in
    Adyen's units; the fake Checkout API knows it too. Returns its pspReference."""
    psp = unique_psp()
    await notify(rig, "AUTHORISATION", pspReference=psp, amount={"currency": currency, "value": authorised})
    if captured is not None:
        await notify(rig, "CAPTURE", pspReference=unique_psp(), originalReference=psp,
                     amount={"currency": currency, "value": captured})
    rig.fake.payment(authorised, currency, MERCHANT, psp=psp)
    return psp


async def request(rig: AdyenRig, psp: str, amount: int, currency: str = "EUR") -> str:
    return await rig.stack.request_refund("alice", psp, amount, provider="adyen", currency=currency,
                                          merchant_account=MERCHANT)


async def rejected(rig: AdyenRig, case_id: str, psp: str) -> str:
    """The case was rejected at validation and no money state moved; returns the reason."""
    row = await rig.stack.wait_for_status(case_id, "rejected")
    assert row["reserved_amount"] == 0
    assert rig.fake.refunds_of(psp) == []
    assert await rig.stack.store.ledger.entries(case_id) == []
    trail = await rig.stack.store.audit.trail(case_id)
    [refusal] = [e for e in trail if e["action"] == "validation_rejected"]
    return str(refusal["detail"]["reason"])


async def test_payment_notifications_are_receipted_recorded_once_and_start_nothing(rig: AdyenRig) -> None:
    psp, capture = unique_psp(), unique_psp()
    first = await notify(rig, "AUTHORISATION", pspReference=psp)
    again = await notify(rig, "AUTHORISATION", pspReference=psp)
    captured = await notify(rig, "CAPTURE", pspReference=capture, originalReference=psp)
    assert [r.headers["x-webhook-verdict"] for r in (first, again, captured)] == [
        "accepted", "duplicate", "accepted"]
    row = await receipt(rig.stack, "adyen", int(first.headers["x-receipt-id"]))
    assert (row["event_id"], row["event_type"]) == (f"AUTHORISATION:{psp}:true", "AUTHORISATION")
    assert row["processed_at"] is not None and row["workflow_id"] is None
    assert [(r["event_type"], r["psp_reference"], r["status"]) for r in await recorded_rows(rig, psp)] == [
        ("AUTHORISATION", psp, "authorised"), ("CAPTURE", capture, "captured")]
    for no_case in (tracking_case_id("adyen", psp), tracking_case_id("adyen", capture)):
        assert not await workflow_exists(rig.stack, no_case)

    async with rig.stack.api("olga") as api:
        report = (await api.get("/v1/webhooks/coverage")).json()["providers"]["adyen"]
    for handled in ("AUTHORISATION", "CAPTURE", "CAPTURE_FAILED", "CANCELLATION"):
        assert handled in report["handled"] and handled not in report["unknown_types"]
    assert report["arrived"]["AUTHORISATION"]["duplicate"] >= 1


async def test_a_payment_notification_cut_off_by_a_crash_is_recorded_by_the_re_drive(rig: AdyenRig) -> None:
    psp = unique_psp()
    body = notification("AUTHORISATION", pspReference=psp)
    crashed = await rig.stack.store.receipts.store(  # what the relay wrote before a crash
        provider="adyen", event_id=f"AUTHORISATION:{psp}:true", event_type="AUTHORISATION", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={"content-type": "application/json"},
        verdict="accepted", error=None)
    assert await recorded_rows(rig, psp) == []
    desk = WebhookDesk(rig.stack.store, rig.stack.client, rig.stack.providers, rig.stack.settings)
    healed = await desk.replay(crashed.receipt_id)  # what a re-drive pass does with it
    assert healed is not None and (healed.verdict, healed.workflow_id) == ("duplicate", None)
    assert [r["status"] for r in await recorded_rows(rig, psp)] == ["authorised"]
    assert (await receipt(rig.stack, "adyen", crashed.receipt_id))["processed_at"] is not None


async def test_forged_payment_notification_records_nothing(rig: AdyenRig) -> None:
    psp = unique_psp()
    response = await rig.post(notification("AUTHORISATION", key="AB" * 32, pspReference=psp))
    assert response.status_code == 401 and response.json()["verdict"] == "bad_signature"
    assert await recorded_rows(rig, psp) == []


async def test_refund_of_a_notified_payment_runs_end_to_end(rig: AdyenRig) -> None:
    psp = await paid(rig, 10_000, captured=10_000)
    case_id = await request(rig, psp, 2_500)
    await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.fake.refunds_of(psp)
    assert (made["reference"], made["amount"]) == (case_id, {"value": 2_500, "currency": "EUR"})
    await notify(rig, "REFUND", pspReference=made["pspReference"], originalReference=psp,
                 merchantReference=case_id, amount={"currency": "EUR", "value": 2_500})
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert row["reserved_amount"] == 2_500
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"], x["credit"], x["currency"]) for x in lines] == [
        ("refund_settled", 2_500, 0, "EUR"), ("refund_settled", 0, 2_500, "EUR")]
    charge = await rig.stack.providers["adyen"].get_charge(psp)
    assert charge is not None and (charge.amount_captured, charge.amount_refunded) == (10_000, 2_500)


@pytest.mark.parametrize(("currency", "paid_at_adyen", "asked", "at_adyen"), [
    ("IDR", 150_000, 1_000_000, 10_000),  # no decimals at Adyen, two in ISO 4217
    ("CLP", 5_000_000, 20_000, 2_000_000),  # two decimals at Adyen, none in ISO 4217
])
async def test_a_currency_adyen_counts_in_other_decimals_refunds_the_amount_asked(
        rig: AdyenRig, currency: str, paid_at_adyen: int, asked: int, at_adyen: int) -> None:
    """Adyen's documented exceptions to ISO 4217 (IDR and CVE without decimals, CLP and ISK
    with two): our ISO minor units are converted where they cross, both ways. 10,000.00 IDR
    must be asked of Adyen as 10,000, and a 150,000 IDR payment read as 15,000,000 of ours."""
    psp = await paid(rig, paid_at_adyen, captured=paid_at_adyen, currency=currency)
    case_id = await request(rig, psp, asked, currency)
    await rig.stack.wait_for_status(case_id, "awaiting_approval")
    for approver in ("bob", "frank"):
        answer = await approve(rig.stack, approver, case_id)
        assert answer.status_code == 202, answer.text
    await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.fake.refunds_of(psp)
    assert made["amount"] == {"value": at_adyen, "currency": currency}
    await notify(rig, "REFUND", pspReference=made["pspReference"], originalReference=psp,
                 merchantReference=case_id, amount={"currency": currency, "value": at_adyen})
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert (row["amount"], row["reserved_amount"]) == (asked, asked)
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["debit"], x["credit"], x["currency"]) for x in lines] == [
        (asked, 0, currency), (0, asked, currency)]
    charge = await rig.stack.providers["adyen"].get_charge(psp)
    assert charge is not None
    assert (charge.amount_captured, charge.amount_refunded) == (paid_at_adyen * asked // at_adyen, asked)


async def test_refund_of_an_unknown_payment_is_rejected_and_moves_nothing(rig: AdyenRig) -> None:
    psp = unique_psp()
    rig.fake.payment(10_000, "EUR", MERCHANT, psp=psp)  # Adyen has it; no notification reached us
    case_id = await request(rig, psp, 1_000)
    assert await rejected(rig, case_id, psp) == f"charge {psp} not found at adyen"


async def test_authorised_but_not_captured_is_rejected(rig: AdyenRig) -> None:
    psp = await paid(rig, 10_000)
    assert await rejected(rig, await request(rig, psp, 1_000), psp) == "charge is not captured"


async def test_refund_above_the_captured_amount_is_refused(rig: AdyenRig) -> None:
    psp = await paid(rig, 10_000, captured=6_000)  # a partial capture
    reason = await rejected(rig, await request(rig, psp, 7_000), psp)
    assert reason == "amount 7000 exceeds remaining refundable 6000"


async def test_refunds_already_made_count_against_the_capture(rig: AdyenRig) -> None:
    psp = await paid(rig, 10_000, captured=6_000)
    dashboard = unique_psp()  # a refund made in Adyen's Customer Area, not by a case of ours
    await notify(rig, "REFUND", pspReference=dashboard, originalReference=psp,
                 merchantReference="", amount={"currency": "EUR", "value": 4_000})
    await rig.stack.wait_for_status(tracking_case_id("adyen", dashboard), "succeeded")
    charge = await rig.stack.providers["adyen"].get_charge(psp)
    assert charge is not None and (charge.amount_captured, charge.amount_refunded) == (6_000, 4_000)
    reason = await rejected(rig, await request(rig, psp, 2_500), psp)
    assert reason == "amount 2500 exceeds remaining refundable 2000"


async def test_failed_capture_and_cancellation_leave_nothing_captured(rig: AdyenRig) -> None:
    psp, capture = await paid(rig, 5_000), unique_psp()
    await notify(rig, "CAPTURE", pspReference=capture, originalReference=psp,
                 amount={"currency": "EUR", "value": 5_000})
    await notify(rig, "CAPTURE_FAILED", pspReference=capture, originalReference=psp,
                 amount={"currency": "EUR", "value": 5_000})
    assert await rejected(rig, await request(rig, psp, 1_000), psp) == "charge is not captured"
    cancelled = await paid(rig, 5_000)
    await notify(rig, "CANCELLATION", pspReference=unique_psp(), originalReference=cancelled,
                 amount={"currency": "EUR", "value": 5_000})
    charge = await rig.stack.providers["adyen"].get_charge(cancelled)
    assert charge is not None and (charge.captured, charge.amount_captured) == (False, 0)


async def test_a_payment_adyen_cancelled_for_a_cancel_or_refund_has_nothing_captured(rig: AdyenRig) -> None:
    """With automatic capture an authorisation counts as captured until told otherwise. A
    CANCEL_OR_REFUND that Adyen carried out as a cancel (the payment was never captured) was
    recorded as a failed refund, so the payment still read captured: a bank-transfer refund
    of it would validate against money never taken (reproduced). It is the payment's
    cancellation; one carried out as a refund stays a refund."""
    cancelled, refunded = await paid(rig, 5_000), await paid(rig, 5_000)
    for psp, action in ((cancelled, "cancel"), (refunded, "refund")):
        await notify(rig, "CANCEL_OR_REFUND", pspReference=unique_psp(), originalReference=psp,
                     merchantReference="", merchantAccountCode=MERCHANT,
                     amount={"currency": "EUR", "value": 5_000},
                     additionalData={"modification.action": action})
    payments = PaymentNotificationRepository(rig.stack.store.database, "adyen", auto_capture=True)
    charge = await payments.charge(cancelled)
    assert charge is not None and (charge.captured, charge.amount_captured, charge.amount_refunded) == (
        False, 0, 0), charge
    charge = await payments.charge(refunded)
    assert charge is not None and (charge.amount_captured, charge.amount_refunded) == (5_000, 5_000), charge


async def test_a_disputed_payment_reaches_the_prior_dispute_rule(rig: AdyenRig) -> None:
    psp, dispute = await paid(rig, 10_000, captured=10_000), unique_psp()
    for code in ("NOTIFICATION_OF_CHARGEBACK", "CHARGEBACK"):  # one dispute, two of its events
        await notify(rig, "NOTIFICATION_OF_CHARGEBACK", eventCode=code, pspReference=dispute,
                     originalReference=psp, amount={"currency": "EUR", "value": 10_000})
    charge = await rig.stack.providers["adyen"].get_charge(psp)
    assert charge is not None and (charge.dispute_count, charge.amount_captured) == (1, 10_000)
    case_id = await rig.stack.request_refund("alice", psp, 1_000, provider="adyen", currency="EUR",
                                             merchant_account=MERCHANT, reason="item_not_received")
    row = await rig.stack.wait_for_status(case_id, "awaiting_approval", "pending")
    assert row["status"] == "awaiting_approval"
    assert "high_risk_reason:item_not_received" in row["decision"]["rules_fired"]
    assert not await workflow_exists(rig.stack, tracking_case_id("adyen", dispute))


# -- the rule, without a stack ----------------------------------------------------------------

def note(status: PaymentStatus, amount: int, ref: str = "P1") -> RecordedNotification:
    return RecordedNotification(psp_reference=ref, status=status, amount=amount, currency="EUR",
                                merchant_account=MERCHANT)


def charge(*notes: RecordedNotification, auto_capture: bool = False) -> ChargeSnapshot | None:
    return charge_from_notifications("adyen", "P1", notes, auto_capture=auto_capture)


def test_charge_rule() -> None:
    authorised = note(PaymentStatus.AUTHORISED, 9_000)
    assert charge() is None
    assert charge(note(PaymentStatus.REFUNDED, 100, "R1")) is None  # a refund alone names no payment
    assert charge(authorised) == ChargeSnapshot(
        provider="adyen", charge_id="P1", currency="EUR", merchant_account=MERCHANT, amount=9_000,
        amount_captured=0, captured=False, refunded_counts_pending=False)
    auto = charge(authorised, auto_capture=True)
    assert auto is not None and (auto.captured, auto.amount_captured) == (True, 9_000)
    two_captures = charge(authorised, note(PaymentStatus.CAPTURED, 3_000, "C1"),
                          note(PaymentStatus.CAPTURED, 2_000, "C2"),
                          note(PaymentStatus.CAPTURE_FAILED, 2_000, "C2"), auto_capture=True)
    assert two_captures is not None and two_captures.amount_captured == 3_000
    refunds = charge(authorised, note(PaymentStatus.CAPTURED, 9_000, "C1"),
                     note(PaymentStatus.REFUNDED, 1_000, "R1"), note(PaymentStatus.REFUNDED, 500, "R2"),
                     note(PaymentStatus.REFUND_FAILED, 500, "R2"),
                     note(PaymentStatus.REFUND_PENDING, 7, "R3"))
    assert refunds is not None and refunds.amount_refunded == 1_000
    cancelled = charge(authorised, note(PaymentStatus.CANCELLED, 9_000, "X1"), auto_capture=True)
    assert cancelled is not None and not cancelled.captured
    refused = charge(note(PaymentStatus.REFUSED, 9_000))
    assert refused is not None and not refused.captured
    disputed = charge(authorised, note(PaymentStatus.DISPUTED, 9_000, "D1"),
                      note(PaymentStatus.DISPUTED, 9_000, "D1"), note(PaymentStatus.DISPUTED, 50, "D2"))
    assert disputed is not None and disputed.dispute_count == 2  # two disputes, one of them twice


async def test_notifications_recorded_in_adyens_units_are_migrated_to_ours(rig: AdyenRig) -> None:
    """Rows recorded before the adapter converted hold Adyen's units: migration 0800 puts
    them in ours (run here inside a transaction that is rolled back)."""
    migration = resources.files("adapters.migrations").joinpath("0800_adyen_iso_amounts.sql").read_text()
    planted = {"IDR": (150_000, 15_000_000), "CVE": (7, 700), "CLP": (500_000, 5_000),
               "ISK": (12_345, 123), "EUR": (2_500, 2_500)}
    payment = unique_psp()
    async with rig.stack.store.database.transaction() as conn:
        for currency, (theirs, _) in planted.items():
            await conn.execute(
                "INSERT INTO payment_notifications (provider, event_id, event_type, payment_id,"
                " psp_reference, status, amount, currency, merchant_account, occurred_at)"
                " VALUES ('adyen', %s, 'AUTHORISATION', %s, %s, 'authorised', %s, %s, %s, now())",
                (f"planted:{payment}:{currency}", payment, payment, theirs, currency, MERCHANT))
        await conn.execute(migration)
        cur = await conn.execute("SELECT currency, amount FROM payment_notifications WHERE payment_id = %s",
                                 (payment,))
        migrated = {row["currency"]: row["amount"] for row in await cur.fetchall()}
        raise psycopg.Rollback()
    assert migrated == {currency: ours for currency, (_, ours) in planted.items()}


@pytest.mark.parametrize("value", [-1, 2**63])
async def test_a_signed_payment_notification_with_an_impossible_amount_is_unreadable(
        rig: AdyenRig, value: int) -> None:
    """Signed, but no payment is negative or past what PostgreSQL can hold: refused as
    unreadable with its receipt (kept: signed) (a refund event with such an amount is too), never a 500 that
    leaves an accepted receipt Adyen retries and the re-drive gives up on."""
    psp = unique_psp()
    response = await rig.post(notification("AUTHORISATION", pspReference=psp,
                                           amount={"currency": "EUR", "value": value}))
    assert response.status_code == 400 and response.json()["verdict"] == "unreadable", response.text
    row = await receipt(rig.stack, "adyen", response.json()["receipt_id"])
    assert row["verdict"] == "unreadable"
    assert await recorded_rows(rig, psp) == []
