"""Payout reversal rules without a stack: the internal-state gate, the approval tiers at
their exact boundaries, advisory triage, and payout webhooks as Stripe and the sandbox
send them (signed, normalised, an unknown status refused loudly)."""

import json
import time
from datetime import UTC, datetime

import pytest
import stripe

from adapters.policy_file import load_policy
from adapters.providers.base import WebhookRejected
from adapters.providers.sandbox import SandboxProvider, sign
from adapters.providers.stripe import StripeProvider
from domain.payouts import (
    PAID_AFTER_FAILURE,
    Admission,
    PayoutEvent,
    PayoutSnapshot,
    PayoutStatus,
    ProviderPayout,
    ProviderPayoutStatus,
    admit,
    paid_since,
    payout_case_id,
)
from domain.policy import decide_payout_reversal
from domain.triage import triage_offline

POLICY = load_policy()
P = ProviderPayoutStatus


@pytest.mark.parametrize(("internal", "reported", "case_open", "admission"), [
    (PayoutStatus.PAID, P.FAILED, False, Admission.OPEN),
    (PayoutStatus.PAID, P.REVERSED, False, Admission.OPEN),
    (PayoutStatus.PAID, P.CANCELED, False, Admission.OPEN),
    (PayoutStatus.PAID, P.REVERSED, True, Admission.JOIN),
    (PayoutStatus.ON_HOLD, P.FAILED, True, Admission.JOIN),
    (PayoutStatus.FAILED, P.FAILED, False, Admission.ALREADY_HANDLED),
    (PayoutStatus.REVERSED, P.REVERSED, False, Admission.ALREADY_HANDLED),
    (PayoutStatus.ON_HOLD, P.FAILED, False, Admission.ALREADY_HANDLED),
    (PayoutStatus.PAID, P.PAID, True, Admission.STALE),
    (PayoutStatus.ON_HOLD, P.PAID, True, Admission.STALE),
    (PayoutStatus.FAILED, P.PAID, False, Admission.STALE),
    (PayoutStatus.PAID, P.PENDING, True, Admission.STALE),
    (PayoutStatus.PAID, P.PAID, False, Admission.SAME),
])
def test_the_internal_state_gate(internal: PayoutStatus, reported: ProviderPayoutStatus, case_open: bool,
                                 admission: Admission) -> None:
    assert admit(internal, reported, case_open=case_open) is admission


@pytest.mark.parametrize(("amount", "currency", "tier", "roles"), [
    (1, "USD", "ops_lead", ["payments_ops_lead"]),
    (499_999, "USD", "ops_lead", ["payments_ops_lead"]),  # 4,999.99
    (500_000, "USD", "finance_and_compliance", ["compliance", "finance_manager"]),  # 5,000.00
    (5_000_000, "EUR", "finance_and_compliance", ["compliance", "finance_manager"]),  # 50,000.00
    (5_000_001, "EUR", "treasury", ["treasury"]),  # 50,000.01
    # the runbook's dollars in each currency, as the refund tiers convert them: GBP 4,500.00
    # was the ops lead's alone, GBP 45,000.00 finance's and compliance's (both over $50k)
    (399_999, "GBP", "ops_lead", ["payments_ops_lead"]),
    (450_000, "GBP", "finance_and_compliance", ["compliance", "finance_manager"]),
    (4_500_000, "GBP", "treasury", ["treasury"]),
    (699_999, "JPY", "ops_lead", ["payments_ops_lead"]),  # no decimals
    (7_000_000, "JPY", "finance_and_compliance", ["compliance", "finance_manager"]),
    (1_499_999, "KWD", "ops_lead", ["payments_ops_lead"]),  # three decimals: 1,499.999
    (1_500_000, "KWD", "finance_and_compliance", ["compliance", "finance_manager"]),
    (15_000_001, "KWD", "treasury", ["treasury"]),
    (100, "CHF", "treasury", ["treasury"]),  # a currency no tier names: the strictest
])
def test_payout_tiers_at_their_boundaries(amount: int, currency: str, tier: str, roles: list[str]) -> None:
    decision = decide_payout_reversal(POLICY, amount, currency)
    assert not decision.auto_approve and decision.tier == tier
    assert sorted(r.role for r in decision.requirements) == roles
    assert decision.policy_hash == POLICY.fingerprint()


def test_a_policy_without_payout_tiers_decides_nothing() -> None:
    bare = POLICY.model_copy(update={"payout_reversal": POLICY.payout_reversal.model_copy(
        update={"tiers": ()})})
    with pytest.raises(ValueError, match="no payout_reversal tiers"):
        decide_payout_reversal(bare, 1_000, "USD")


PAYOUT = PayoutSnapshot(id="P-1", provider="sandbox", provider_payout_id="po_1", beneficiary_id="ben-1",
                        amount=1_250_000, currency="USD", status=PayoutStatus.PAID)


def event(status: ProviderPayoutStatus, code: str | None, event_id: str = "evt_1",
          raw: str | None = None) -> PayoutEvent:
    return PayoutEvent(
        provider="sandbox", event_id=event_id, event_type=f"payout.{raw or status.value}",
        body_sha256="0" * 64,
        occurred_at=datetime(2026, 11, 2, 9, 30, tzinfo=UTC),
        payout=ProviderPayout(provider="sandbox", payout_id="po_1", amount=1_250_000, currency="USD",
                              status=status, raw_status=raw or status.value, failure_code=code))


@pytest.mark.parametrize(("code", "cause", "step"), [
    ("insufficient_funds", "insufficient_funds", "reissue"),
    ("bank_rejection", "bank_rejection", "hold"),
    ("invalid_account_number", "bank_rejection", "hold"),
    ("account_closed", "account_closed", "request_new_bank_details"),
    ("compliance_hold", "compliance_hold", "escalate"),
    ("something_new", "unknown", "escalate"),
    (None, "unknown", "escalate"),
])
def test_triage_names_a_likely_cause_and_a_next_step(code: str | None, cause: str, step: str) -> None:
    advice = triage_offline(PAYOUT, [event(P.FAILED, code)])
    assert (advice.root_cause, advice.next_step, advice.source) == (cause, step, "offline_rules")


def test_triage_summarises_the_timeline_and_reads_the_latest_cause() -> None:
    events = [event(P.FAILED, "insufficient_funds", "evt_1", raw="settlement_failed"),
              event(P.REVERSED, "account_closed", "evt_2")]
    advice = triage_offline(PAYOUT, events)
    assert advice.root_cause == "account_closed"
    assert "12500.00 USD" in advice.summary and "ben-1" in advice.summary
    assert advice.summary.index("payout.settlement_failed") < advice.summary.index("payout.reversed")


def test_ids_and_keys_are_derived_never_random() -> None:
    assert payout_case_id("stripe", "po_9") == "stripe-payout-po_9"
    assert event(P.FAILED, None, "evt_7").idempotency_key() == "evt_7:po_1"
    assert PAYOUT.reissue_id() == "P-1-r1" and PAYOUT.reissue_key() == PAYOUT.model_copy().reissue_key()
    assert PAYOUT.reissue_key().startswith("rfo_")


STRIPE_SECRET = "whsec_payout_test"


def stripe_payout_event(event_type: str, **payout: object) -> tuple[dict[str, str], bytes]:
    obj = {"id": "po_1OaT", "object": "payout", "amount": 250_000, "currency": "usd", "status": "paid",
           "failure_code": None, "failure_message": None, "metadata": {}, **payout}
    raw = json.dumps({"id": "evt_po_1", "object": "event", "type": event_type,
                      "created": int(time.time()), "data": {"object": obj}}).encode()
    return {"stripe-signature": stripe.WebhookSignature.generate_signature_header(
        raw.decode(), STRIPE_SECRET)}, raw


@pytest.mark.parametrize(("event_type", "raw_status", "status"), [
    ("payout.paid", "paid", "paid"),
    ("payout.failed", "failed", "failed"),
    ("payout.canceled", "canceled", "canceled"),
    ("payout.updated", "in_transit", "pending"),
    ("payout.updated", "failed", "failed"),  # paid, then failed days later
])
def test_stripe_payout_webhooks_normalise(event_type: str, raw_status: str, status: str) -> None:
    adapter = StripeProvider("sk_test", webhook_secrets=[STRIPE_SECRET], api_base="http://127.0.0.1:9")
    code = "account_closed" if status == "failed" else None
    headers, raw = stripe_payout_event(event_type, status=raw_status, failure_code=code)
    parsed = adapter.parse_webhook(headers, raw, time.time())
    assert isinstance(parsed, PayoutEvent)
    assert (parsed.payout.status, parsed.payout.raw_status, parsed.payout.amount, parsed.payout.currency) == (
        status, raw_status, 250_000, "USD")
    assert parsed.payout.failure_code == code and parsed.idempotency_key() == "evt_po_1:po_1OaT"


def test_an_unknown_payout_status_is_refused_loudly() -> None:
    adapter = StripeProvider("sk_test", webhook_secrets=[STRIPE_SECRET], api_base="http://127.0.0.1:9")
    headers, raw = stripe_payout_event("payout.updated", status="teleported")
    with pytest.raises(WebhookRejected) as refused:
        adapter.parse_webhook(headers, raw, time.time())
    assert refused.value.verdict == "unexpected_status"
    assert "payout status 'teleported'" in refused.value.message


def test_sandbox_settlement_failure_is_a_failure_with_its_raw_status_kept() -> None:
    adapter = SandboxProvider("http://127.0.0.1:9", webhook_secrets=["s3cret"])
    body = json.dumps({"id": "evt_s", "type": "payout.settlement_failed", "created": int(time.time()),
                       "data": {"object": {"id": "P-10492", "amount": 1_250_000, "currency": "usd",
                                           "status": "settlement_failed",
                                           "failure_code": "bank_rejection"}}}).encode()
    parsed = adapter.parse_webhook({"sandbox-signature": sign("s3cret", body, int(time.time()))}, body,
                                   time.time())
    assert isinstance(parsed, PayoutEvent) and parsed.is_exception()
    assert (parsed.payout.status, parsed.payout.raw_status) == ("failed", "settlement_failed")
    with pytest.raises(WebhookRejected) as forged:
        adapter.parse_webhook({"sandbox-signature": sign("forger", body, int(time.time()))}, body,
                              time.time())
    assert forged.value.verdict == "bad_signature"


def test_a_paid_report_is_read_after_the_latest_failure_and_an_untimed_one_always() -> None:
    """A paid report counts from the latest failure or return on: one older (paid, then
    returned again) says nothing of the money now. One recorded before reports kept their
    time is read as paid (ops decide): dropping it let an approved reversal book back money
    that had left (found reviewing `paid_since`)."""
    failed = datetime(2026, 12, 8, 10, 0, 5, 400_000, tzinfo=UTC)
    timed = [{"action": PAID_AFTER_FAILURE, "detail": {"occurred_at": "2026-12-08T10:00:05+00:00"}}]
    assert paid_since(timed, failed)  # the failure's own second: after it
    assert not paid_since(timed, failed.replace(second=6))
    assert paid_since([{"action": PAID_AFTER_FAILURE, "detail": {}}], failed)
    assert not paid_since([{"action": "payout_event_joined", "detail": {}}], failed)
