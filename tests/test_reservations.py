"""Property: whatever the amounts and however concurrently they arrive, the reservations
held on a charge never exceed what was captured (invariant 2)."""

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.db import Store
from domain.models import ChargeSnapshot, LedgerInput, LedgerKind, RefundMethod, RefundReason, RefundRequest
from tests.harness import Stack


async def reserve_all(dsn: str, captured: int, amounts: list[int]) -> tuple[int, int]:
    store = await Store.open(dsn, max_size=len(amounts) + 1)
    try:
        await store.database.migrate()
        charge_id = f"ch_{uuid.uuid4().hex[:10]}"
        charge = ChargeSnapshot(provider="prop", charge_id=charge_id, currency="USD",
                                merchant_account="m", amount=captured, amount_captured=captured,
                                captured=True)
        requests = [RefundRequest(refund_request_id=f"{charge_id}-{i}", provider="prop",
                                  charge_id=charge_id, amount=amount, currency="USD",
                                  merchant_account="m", reason=RefundReason.OTHER)
                    for i, amount in enumerate(amounts)]
        for request in requests:
            await store.cases.create(request, "prop")
        results = await asyncio.gather(*(store.cases.reserve(r, charge) for r in requests))
        async with store.database.transaction() as conn:
            cur = await conn.execute("SELECT coalesce(sum(reserved_amount), 0) AS held FROM refund_cases"
                                     " WHERE charge_id = %s", (charge_id,))
            row = await cur.fetchone()
        granted = sum(r.amount for r, res in zip(requests, results, strict=True) if res.ok)
        return int(row["held"]) if row else -1, granted
    finally:
        await store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(captured=st.integers(min_value=1, max_value=20_000),
       amounts=st.lists(st.integers(min_value=1, max_value=9_000), min_size=1, max_size=10))
def test_concurrent_reservations_never_exceed_the_captured_amount(
        postgres_dsn: str, captured: int, amounts: list[int]) -> None:
    held, granted = asyncio.run(reserve_all(postgres_dsn, captured, amounts))
    assert held == granted
    assert held <= captured
    # a refund is refused only when it did not fit at its turn: if any would fit alone,
    # something was granted
    if min(amounts) <= captured:
        assert granted > 0


def _request(charge_id: str, case_id: str, amount: int) -> RefundRequest:
    return RefundRequest(refund_request_id=case_id, provider="prop", charge_id=charge_id, amount=amount,
                         currency="USD", merchant_account="m", reason=RefundReason.OTHER)


async def test_holds_the_provider_does_not_count_yet_add_to_what_it_reports_refunded(store: Store) -> None:
    """The provider reports 400 refunded by a refund none of our cases holds (a dashboard
    refund whose webhook has not come), while our case A holds 400 awaiting approval: 200
    is left, not 600 (the larger of the two counts only one). A hold whose refund the
    provider already counts (a case holding its refund id) is not counted twice."""
    charge_id = f"ch_{uuid.uuid4().hex[:10]}"
    untracked = ChargeSnapshot(provider="prop", charge_id=charge_id, currency="USD", merchant_account="m",
                               amount=1_000, amount_captured=1_000, amount_refunded=400, captured=True)
    first, second, third = (_request(charge_id, f"{charge_id}-{n}", amount)
                            for n, amount in ((1, 400), (2, 600), (3, 200)))
    for request in (first, second, third):
        await store.cases.create(request, "prop")
    assert (await store.cases.reserve(first, untracked)).ok
    refused = await store.cases.reserve(second, untracked)
    assert not refused.ok and refused.remaining_before == 200, refused
    await store.database.execute(  # A's refund is made: the provider's 800 now counts it
        "UPDATE refund_cases SET provider_refund_id = 're_a', provider_status = 'pending',"
        " submission_started_at = now() WHERE refund_request_id = %s", (first.refund_request_id,))
    counted = untracked.model_copy(update={"amount_refunded": 800})
    fits = await store.cases.reserve(third, counted)
    assert fits.ok and fits.remaining_before == 200, fits


async def test_a_made_refund_is_counted_once_and_a_bank_transfer_always(store: Store) -> None:
    """A's submit began and its answer was lost, but the provider made it and counts it (600
    refunded): A's hold is that refund, so 400 is left, not 0. A bank transfer's hold is
    something no provider ever counts: it adds to what the provider reports."""
    charge_id = f"ch_{uuid.uuid4().hex[:10]}"
    counted = ChargeSnapshot(provider="prop", charge_id=charge_id, currency="USD", merchant_account="m",
                             amount=1_000, amount_captured=1_000, amount_refunded=600, captured=True)
    lost, fits = _request(charge_id, f"{charge_id}-lost", 600), _request(charge_id, f"{charge_id}-fits", 400)
    for request in (lost, fits):
        await store.cases.create(request, "prop")
    assert (await store.cases.reserve(lost, counted.model_copy(update={"amount_refunded": 0}))).ok
    await store.database.execute("UPDATE refund_cases SET submission_started_at = now()"
                                 " WHERE refund_request_id = %s", (lost.refund_request_id,))
    allowed = await store.cases.reserve(fits, counted)
    assert allowed.ok and allowed.remaining_before == 400, allowed

    other = f"ch_{uuid.uuid4().hex[:10]}"
    untracked = counted.model_copy(update={"charge_id": other, "amount_refunded": 400})
    transfer = _request(other, f"{other}-transfer", 500).model_copy(
        update={"method": RefundMethod.BANK_TRANSFER})
    more = _request(other, f"{other}-more", 500)
    for request in (transfer, more):
        await store.cases.create(request, "prop")
    assert (await store.cases.reserve(transfer, untracked)).ok
    await store.database.execute("UPDATE refund_cases SET submission_started_at = now(),"
                                 " provider_refund_id = 'mr_1' WHERE refund_request_id = %s",
                                 (transfer.refund_request_id,))
    refused = await store.cases.reserve(more, untracked)
    assert not refused.ok and refused.remaining_before == 100, refused


async def test_a_bank_transfer_counts_a_submit_whose_answer_is_unknown_beside_what_the_provider_reports(
        store: Store) -> None:
    """The provider reports 500 refunded by a refund none of our cases holds (its webhook has
    not come); our case A's submit of 500 began and its answer is unknown. A provider refund
    may take the larger of the two as A's (the provider refuses an over-refund itself when
    A's lands), but a bank transfer is guarded by nobody else: granted the 500 the larger
    leaves, it paid out 1,500 on a 1,000 charge once A's refund landed."""
    charge_id = f"ch_{uuid.uuid4().hex[:10]}"
    untracked = ChargeSnapshot(provider="prop", charge_id=charge_id, currency="USD", merchant_account="m",
                               amount=1_000, amount_captured=1_000, amount_refunded=500, captured=True)
    in_flight = _request(charge_id, f"{charge_id}-a", 500)
    transfer = _request(charge_id, f"{charge_id}-transfer", 500).model_copy(
        update={"method": RefundMethod.BANK_TRANSFER})
    by_provider = _request(charge_id, f"{charge_id}-provider", 500)
    for request in (in_flight, transfer, by_provider):
        await store.cases.create(request, "prop")
    assert (await store.cases.reserve(in_flight, untracked.model_copy(update={"amount_refunded": 0}))).ok
    await store.database.execute("UPDATE refund_cases SET submission_started_at = now()"
                                 " WHERE refund_request_id = %s", (in_flight.refund_request_id,))
    refused = await store.cases.reserve(transfer, untracked)
    assert not refused.ok and refused.remaining_before == 0, refused
    allowed = await store.cases.reserve(by_provider, untracked)  # the provider guards the rest
    assert allowed.ok and allowed.remaining_before == 500, allowed


@pytest.mark.parametrize("counts_pending", [False, True])
async def test_a_bank_transfer_counts_a_refund_in_flight_the_provider_s_figure_leaves_out(
        store: Store, counts_pending: bool) -> None:
    """Adyen's refunded figure counts only refunds it notified as succeeded. A's 300 and a
    duplicate's 300 succeeded (600 reported; the duplicate is held by nobody); C's 200 was
    answered and is still pending, not in the 600. A provider refund may rely on the
    provider refusing an over-refund, but a bank transfer of 400 was granted the 400 the
    larger of our holds (500) and the 600 leaves, and paid out 1,200 on a 1,000 charge once
    C's refund landed: only 200 is left. Where the figure counts refunds in flight (Stripe:
    800 reported), C is counted once, not twice: a transfer of the 200 left fits."""
    charge_id = f"ch_{uuid.uuid4().hex[:10]}"
    reported = ChargeSnapshot(provider="prop", charge_id=charge_id, currency="USD", merchant_account="m",
                              amount=1_000, amount_captured=1_000, amount_refunded=0, captured=True,
                              refunded_counts_pending=counts_pending)
    succeeded = _request(charge_id, f"{charge_id}-a", 300)
    pending = _request(charge_id, f"{charge_id}-c", 200)
    transfer = _request(charge_id, f"{charge_id}-transfer", 200 if counts_pending else 400).model_copy(
        update={"method": RefundMethod.BANK_TRANSFER})
    for request in (succeeded, pending, transfer):
        await store.cases.create(request, "prop")
    for made, status in ((succeeded, "succeeded"), (pending, "pending")):
        assert (await store.cases.reserve(made, reported)).ok
        await store.database.execute(
            "UPDATE refund_cases SET submission_started_at = now(), provider_refund_id = %s,"
            " provider_status = %s WHERE refund_request_id = %s",
            (f"psp_{status}_{charge_id}", status, made.refund_request_id))
    figure = 800 if counts_pending else 600
    decided = await store.cases.reserve(transfer, reported.model_copy(update={"amount_refunded": figure}))
    if counts_pending:
        assert decided.ok and decided.remaining_before == 200, decided
    else:
        assert not decided.ok and decided.remaining_before == 200, decided


async def test_a_bank_transfer_booked_on_provider_clearing_before_is_reversed_there(store: Store) -> None:
    """Bank transfers settled before their cash moved through `bank_clearing` were booked
    on `provider_clearing`; the reversal of such a refund must undo that entry's account,
    or both accounts stay off for good."""
    charge_id = f"ch_{uuid.uuid4().hex[:10]}"
    transfer = _request(charge_id, f"{charge_id}-transfer", 700).model_copy(
        update={"method": RefundMethod.BANK_TRANSFER})
    await store.cases.create(transfer, "prop")
    case_id = transfer.refund_request_id
    async with store.database.transaction() as conn:  # as posted before bank_clearing existed
        entry = await (await conn.execute(
            "INSERT INTO ledger_entries (posting_key, refund_request_id, template) VALUES (%s,%s,%s)"
            " RETURNING id", (f"{case_id}:refund_settled", case_id, "refund_settled"))).fetchone()
        assert entry is not None
        for account, debit, credit in (("refunds_contra_revenue", 700, 0), ("provider_clearing", 0, 700)):
            await conn.execute("INSERT INTO ledger_lines (entry_id, account, debit, credit, currency)"
                               " VALUES (%s,%s,%s,%s,'USD')", (entry["id"], account, debit, credit))
    await store.ledger.post(LedgerInput(refund_request_id=case_id, kind=LedgerKind.REFUND_REVERSED,
                                        amount=700, currency="USD", provider_refund_id="mr_1"))
    lines = [(line["template"], line["account"], line["debit"], line["credit"])
             for line in await store.ledger.entries(case_id)]
    assert ("refund_reversed", "provider_clearing", 700, 0) in lines, lines


async def test_a_charge_the_provider_knows_by_another_id_takes_no_refund_under_it(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider that resolves another spelling of a charge id to the charge (an alias, a
    case-insensitive lookup) answers with the charge's own id. A request under the other
    spelling held its reservation under that spelling, beside the charge's own: two holds of
    60.00 on a 100.00 charge, both approvable. It is rejected, naming the id the provider
    knows the charge by."""
    charge = await stack.charge(10_000)
    alias = f"alias-{charge}"
    provider = stack.providers["sandbox"]
    read = provider.get_charge

    async def resolving(charge_id: str) -> ChargeSnapshot | None:
        return await read(charge if charge_id == alias else charge_id)

    monkeypatch.setattr(provider, "get_charge", resolving)
    aliased = await stack.request_refund("alice", alias, 6_000)
    row = await stack.wait_for_status(aliased, "rejected", "awaiting_approval")
    assert (row["status"], row["reserved_amount"]) == ("rejected", 0), row
    [rejected] = [e for e in await stack.store.audit.trail(aliased) if e["action"] == "validation_rejected"]
    assert f"as {charge}" in rejected["detail"]["reason"], rejected
    own = await stack.request_refund("alice", charge, 6_000)
    assert (await stack.wait_for_status(own, "awaiting_approval"))["reserved_amount"] == 6_000
