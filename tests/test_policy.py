"""The deterministic policy: every rule, tier selection, files, and approval matching."""

from pathlib import Path

import pytest

from adapters.policy_file import PolicyFileError, load_policy
from domain.lifecycle import unfilled
from domain.models import PolicyContext, RefundMethod, RefundReason, RefundRequest, RoleRequirement
from domain.policy import ChargePriors, decide, policy_context

POLICY = load_policy()


def request(amount: int, currency: str = "USD", reason: RefundReason = RefundReason.ITEM_DAMAGED,
            evidence: dict[str, str] | None = None) -> RefundRequest:
    return RefundRequest(refund_request_id="r-1", provider="sandbox", charge_id="ch_1", amount=amount,
                         currency=currency, merchant_account="acct_1", reason=reason,
                         evidence={"order_id": "o-1"} if evidence is None else evidence)


def test_small_first_evidenced_refund_is_auto_approved_with_version_and_hash() -> None:
    decision = decide(POLICY, request(5_000), PolicyContext())
    assert decision.auto_approve and decision.rules_fired == ("auto_approve",)
    assert decision.policy_version == POLICY.version
    assert decision.policy_hash == POLICY.fingerprint() and len(decision.policy_hash) == 64
    assert decision.requirements == ()


@pytest.mark.parametrize(("req", "context", "rule"), [
    (request(5_001), PolicyContext(), "amount_above_threshold"),
    (request(100, currency="CHF"), PolicyContext(), "no_threshold_for_currency"),
    (request(1_000), PolicyContext(prior_refund_count=1), "prior_refunds_on_charge"),
    (request(1_000), PolicyContext(prior_refund_count=1, prior_partial_refund=True, is_partial=True),
     "repeat_partial_refund"),
    (request(1_000, evidence={}), PolicyContext(), "missing_evidence:order_id"),
    (request(1_000, reason=RefundReason.FRAUDULENT), PolicyContext(), "high_risk_reason:fraudulent"),
    (request(1_000, reason=RefundReason.ITEM_NOT_RECEIVED), PolicyContext(prior_dispute_count=2),
     "high_risk_reason:item_not_received"),
    (request(1_000, reason=RefundReason.ITEM_NOT_RECEIVED), PolicyContext(prior_dispute_count=None),
     "high_risk_reason:item_not_received"),
    (request(1_000).model_copy(update={"method": RefundMethod.BANK_TRANSFER}), PolicyContext(),
     "method_needs_review:bank_transfer"),
    (request(1_000), PolicyContext(prior_refusal_count=1), "prior_refusal_on_charge"),
    (request(1_000), PolicyContext(prior_dispute_count=1), "charge_disputed"),
    (request(1_000).model_copy(update={"method": RefundMethod.BANK_TRANSFER}),
     PolicyContext(prior_dispute_count=1), "charge_disputed"),
], ids=["threshold", "no-threshold", "prior", "repeat-partial", "evidence", "fraud", "inr-disputes",
        "inr-disputes-unknown", "bank-transfer", "refused-before", "disputed", "disputed-transfer"])
def test_each_rule_sends_the_refund_to_people(req: RefundRequest, context: PolicyContext,
                                              rule: str) -> None:
    decision = decide(POLICY, req, context)
    assert not decision.auto_approve
    assert rule in decision.rules_fired
    if req.currency == "CHF":  # no amounts configured: the catch-all tier decides
        assert decision.tier == "large"
    else:
        assert decision.tier == "standard"
        assert decision.requirements == (RoleRequirement(role="approver", count=1),)


def test_a_charge_whose_disputes_are_unknown_is_not_held_as_disputed() -> None:
    """A refund of a disputed charge goes to people: the chargeback may return the money
    already, and a refund beside it pays twice (before, only two reasons' high-risk rules
    read disputes: a small refund of a charged-back charge was auto-approved, a bank
    transfer of it approved with nothing saying so). A provider that does not say is no
    reason on its own (every emulator's refund would wait for people)."""
    assert decide(POLICY, request(1_000), PolicyContext(prior_dispute_count=None)).auto_approve


def test_item_not_received_without_prior_disputes_is_not_high_risk() -> None:
    decision = decide(POLICY, request(1_000, reason=RefundReason.ITEM_NOT_RECEIVED), PolicyContext())
    assert decision.auto_approve


def test_zero_and_three_decimal_currencies_use_their_own_thresholds() -> None:
    assert decide(POLICY, request(7_000, currency="JPY"), PolicyContext()).auto_approve
    assert not decide(POLICY, request(7_001, currency="JPY"), PolicyContext()).auto_approve
    assert decide(POLICY, request(15_000, currency="KWD"), PolicyContext()).auto_approve


def test_large_refunds_need_an_approver_and_a_finance_manager() -> None:
    decision = decide(POLICY, request(50_001), PolicyContext())
    assert decision.tier == "large"
    assert {r.role for r in decision.requirements} == {"approver", "finance_manager"}


def test_the_tier_is_chosen_on_the_request_and_what_other_refunds_hold_on_its_charge() -> None:
    parts = PolicyContext(prior_refund_count=2, prior_refund_total=30_000)
    assert decide(POLICY, request(20_000), parts).tier == "standard"  # 500.00 in all
    assert decide(POLICY, request(20_001), parts).tier == "large"


def test_money_refunded_outside_our_cases_is_a_prior_refund_its_tier_counts() -> None:
    """A dashboard refund the provider reports (none of our cases made it) fires its own
    rule, is one more prior refund, and counts toward the tier like our own refunds."""
    context = policy_context(request(1_000), 100_000, 0, ChargePriors(amounts=(500,), outside=30_000))
    assert (context.prior_refund_count, context.prior_refund_total, context.prior_partial_refund) == (
        2, 30_500, True)
    decision = decide(POLICY, request(1_000), context)
    assert "refunded_outside_cases" in decision.rules_fired and decision.tier == "standard"
    assert decide(POLICY, request(20_000), context).tier == "large"  # 515.00 in all
    ours_only = policy_context(request(1_000), 100_000, 0, ChargePriors(amounts=(500,)))
    alone = decide(POLICY, request(1_000), ours_only)
    assert "refunded_outside_cases" not in alone.rules_fired


def test_matching_counts_each_person_once_whatever_the_order() -> None:
    needs = (RoleRequirement(role="approver"), RoleRequirement(role="finance_manager"))
    both = frozenset({"approver", "finance_manager"})
    assert unfilled(needs, [("ann", both)]) == ["finance_manager"]
    assert unfilled(needs, [("ann", both), ("bo", frozenset({"approver"}))]) == []
    assert unfilled(needs, [("bo", frozenset({"approver"})), ("ann", both)]) == []
    assert unfilled(needs, [("bo", frozenset({"approver"})), ("cy", frozenset({"approver"}))]) == [
        "finance_manager"]


def test_a_policy_file_without_a_catch_all_tier_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('version = "x"\n[refunds]\n[[refunds.tiers]]\nname = "only"\n'
                   'max_amount = { USD = 100 }\napprovals = [{ role = "approver" }]\n')
    with pytest.raises(PolicyFileError, match="catches the rest"):
        load_policy(bad)


REFUND_TIERS = '[[refunds.tiers]]\nname = "catch_all"\napprovals = [{ role = "approver" }]\n'
PAYOUT_TIERS = '[[payout_reversal.tiers]]\nname = "treasury"\napprovals = [{ role = "treasury" }]\n'


@pytest.mark.parametrize(("tiers", "refusal"), [
    # a tier with no limit before others: every amount stops there, the rest never apply
    ('[[refunds.tiers]]\nname = "standard"\napprovals = [{ role = "approver" }]\n'
     '[[refunds.tiers]]\nname = "large"\napprovals = [{ role = "finance_manager" }]\n' + PAYOUT_TIERS,
     "standard has no max_amount"),
    # a later tier's limit at or below an earlier one's in the same currency never applies
    ('[[refunds.tiers]]\nname = "strict"\nmax_amount = { USD = 90000 }\napprovals = [{ role = "approver" }]\n'
     '[[refunds.tiers]]\nname = "small"\nmax_amount = { USD = 50000 }\napprovals = [{ role = "approver" }]\n'
     + REFUND_TIERS + PAYOUT_TIERS, "small's USD limit"),
    # a role nobody can hold: the tier's refunds could only expire
    ('[[refunds.tiers]]\nname = "large"\napprovals = [{ role = "finance_manger" }]\n' + PAYOUT_TIERS,
     "finance_manger"),
    # no payout reversal tiers: every payout case retried its decision until the file changed
    (REFUND_TIERS, "payout_reversal"),
])
def test_a_policy_whose_tiers_could_never_apply_as_written_is_refused(tmp_path: Path, tiers: str,
                                                                      refusal: str) -> None:
    """Refused at load (and by `refunds policy check`) rather than found at run time: a
    tier after one with no limit, or under a lower limit in the same currency, could never
    apply; a role no approver can hold could never be filled; no payout reversal tiers left
    every payout case retrying its decision."""
    bad = tmp_path / "bad.toml"
    bad.write_text('version = "x"\n[refunds]\n' + tiers)
    with pytest.raises(PolicyFileError, match=refusal):
        load_policy(bad)
    good = tmp_path / "good.toml"
    good.write_text('version = "x"\n[refunds]\n' + REFUND_TIERS + PAYOUT_TIERS)
    assert load_policy(good).version == "x"


def test_reformatting_a_policy_keeps_its_hash(tmp_path: Path) -> None:
    from importlib import resources

    text = resources.files("adapters.policies").joinpath("default.toml").read_text()
    copy = tmp_path / "same.toml"
    copy.write_text("# reformatted\n\n" + text.replace(" = ", "="))
    assert load_policy(copy).fingerprint() == POLICY.fingerprint()
    changed = tmp_path / "changed.toml"
    changed.write_text(text.replace("USD = 5000", "USD = 6000"))
    assert load_policy(changed).fingerprint() != POLICY.fingerprint()


POLICY_WITH = ('version = "x"\n[refunds]\nauto_approve_max = {{ {auto} }}\n'
               '[[refunds.tiers]]\nname = "small"\nmax_amount = {{ {tier} }}\n'
               'approvals = [{{ role = "approver" }}]\n'
               '[[refunds.tiers]]\nname = "rest"\napprovals = [{{ role = "finance_manager" }}]\n'
               '[[payout_reversal.tiers]]\nname = "treasury"\napprovals = [{{ role = "treasury" }}]\n')


def test_a_policy_names_currencies_in_any_letter_case(tmp_path: Path) -> None:
    """`usd = 5000` was kept as written and never matched a request's USD: the refund went to
    a stricter tier than its author meant, and `refunds policy check` passed the file."""
    lower = tmp_path / "lower.toml"
    lower.write_text(POLICY_WITH.format(auto="usd = 5000", tier="usd = 20000"))
    policy = load_policy(lower)
    assert decide(policy, request(5_000), PolicyContext()).auto_approve
    needs = decide(policy, request(20_000), PolicyContext())
    assert (needs.tier, needs.auto_approve) == ("small", False)


@pytest.mark.parametrize(("auto", "tier", "refused"), [
    ('USD = "5000"', "USD = 20000", "auto_approve_max"),
    ("USD = 5000.0", "USD = 20000", "auto_approve_max"),
    ("USD = -1", "USD = 20000", "auto_approve_max"),
    ("USD = 5000", "USD = true", "max_amount"),
    ("USD = 5000", "XYZ = 20000", "max_amount"),
    ("USD = 5000", "usd = 20000, USD = 30000", "max_amount"),
])
def test_a_policy_amount_is_a_whole_number_of_minor_units_of_a_known_currency(
        tmp_path: Path, auto: str, tier: str, refused: str) -> None:
    """A quoted, fractional, negative or yes/no amount, an unknown currency, one currency
    named twice: the file is refused, naming the field, never read as something else."""
    bad = tmp_path / "bad.toml"
    bad.write_text(POLICY_WITH.format(auto=auto, tier=tier))
    with pytest.raises(PolicyFileError, match=refused):
        load_policy(bad)
