"""Small versions of the reliability suite (`make chaos` runs the full sizes)."""

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from psycopg.types.json import Jsonb
from temporalio.client import Client

from adapters.db import Store
from adapters.db.ledger import LedgerRepository
from bench import chaos, fault_schedule
from bench.checker import Outcome, Sent, check
from bench.common import Embedded
from bench.fuzz_hooks import Steering
from domain.models import CaseWrites, CaseWritten, LedgerInput, LedgerKind, RefundRequest
from starters.actions.cases import CaseActions
from starters.dev.stack import EmbeddedPostgres, TemporalDevServer
from tests.harness import Stack, open_stack
from tests.test_local_step_rerun import signal_a_charge_notice

# The schedule the smoke runs; on the code before issue #18's fixes it finds refunds made
# twice (a slow first create landing after the resubmit) and a case refund_failed while the
# provider refunded (the resubmit refused as over-captured after the slow create landed).
SMOKE_SEED = 1


@pytest.fixture
def env(store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str) -> Embedded:
    return Embedded(temporal_server, client, store, postgres_dsn)


@pytest.fixture
async def own_postgres(tmp_path: Path, client: Client,
                       temporal_server: TemporalDevServer) -> AsyncIterator[Embedded]:
    """The session's Temporal with a PostgreSQL of the test's own, which it may restart."""
    pg = EmbeddedPostgres(tmp_path / "pg")  # kept on stop: a restart must find its data
    dsn = await asyncio.to_thread(pg.start)
    store = await Store.open(dsn, max_size=10)
    await store.database.migrate()
    try:
        yield Embedded(temporal_server, client, store, dsn, pg)
    finally:
        await store.close()
        await asyncio.to_thread(pg.stop)


async def test_restarts_strike_cases_in_flight_and_every_case_ends_exact(own_postgres: Embedded) -> None:
    outcome = await chaos.restart_services(own_postgres, 4)
    assert outcome.violations == [], "\n".join(outcome.violations)
    assert outcome.counts["in_flight_at_temporal_restart"] > 0
    assert outcome.counts["in_flight_at_postgres_restart"] > 0
    assert outcome.counts["provider_refunded"] == 2 * 1_000 + 2 * 6_000


async def test_the_randomised_fault_schedule_keeps_every_refund_exact(env: Embedded) -> None:
    """50 cases of the schedule `make chaos` runs at 500 (a failure prints the seed: replay
    it with `make chaos SEED=<seed>`)."""
    outcome = await fault_schedule.run(
        env, 50, SMOKE_SEED, worker=lambda stack: chaos.worker_process(stack, env.dsn, env.temporal.address))
    assert outcome.violations == [], "\n".join(outcome.violations)
    assert outcome.counts["temporal_restarts"] == 1 and outcome.counts["worker_kills"] == 1
    assert outcome.counts["in_flight_at_disruptions_min"] > 0
    drawn = {k: v for k, v in outcome.counts.items() if k in fault_schedule.CREATE_FAULTS}
    fired = {k.removeprefix("fired_"): v for k, v in outcome.counts.items() if k.startswith("fired_")}
    assert drawn and all(fired.get(kind, 0) > 0 for kind in drawn), (drawn, fired)  # injected, not only drawn
    # every race was decided: the worker process verifies the relay's approval seals
    assert outcome.counts["approval_race"] > 0 and outcome.waiting_for_person == []


def test_a_seed_stands_for_one_schedule() -> None:
    first, again, other = (fault_schedule.draw(seed, 50) for seed in (SMOKE_SEED, SMOKE_SEED, SMOKE_SEED + 1))
    assert first == again and first != other
    drawn = {name for plan in first.cases for name in plan.names}
    assert {"acts_after_give_up", "lookup_401", "lookup_404", "approval_race", "late_failure"} <= drawn


def test_an_unknown_scenario_exits_non_zero() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.chaos", "--scenario", "no_such"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "invalid choice: 'no_such'" in done.stderr


async def test_storms_execute_once_and_store_every_receipt(env: Embedded) -> None:
    outcome = await chaos.storms(env, copies=4)
    assert outcome.violations == []
    assert outcome.counts["provider_refunded"] == 3_000  # one storm of each kind, 1,000 refunded once


async def test_every_order_of_events_ends_in_the_providers_state(env: Embedded) -> None:
    outcome = await chaos.order(env, sequence=("pending", "succeeded"))
    assert outcome.cases == 2 and outcome.violations == []


async def test_bad_input_never_answers_5xx_nor_changes_state(env: Embedded) -> None:
    outcome = await chaos.bad_input(env, 60)
    assert outcome.violations == []
    assert outcome.counts["provider_refunded"] == 0  # the checker ran: every receipt processed, no refund
    assert sum(n for answer, n in outcome.counts.items() if answer.startswith("http_")) == 60
    # the four webhook kinds of six, each stored, and the named inputs that store a receipt
    named = {name.removeprefix("named_"): status for name, status in outcome.counts.items()
             if name.startswith("named_")}
    assert named == {"stripe_signed_old_then_new_and_old_t": 401, "stripe_t_with_a_tail": 401,
                     "deep_json_sandbox": 400, "deep_json_stripe": 400, "deep_json_adyen": 400,
                     "adyen_additional_data_a_list": 401, "svix_timestamp_year_9999": 401,
                     "cashfree_superscript_timestamp": 401, "nul_in_a_header_value": 202,
                     "nul_in_a_header_value_on_the_wire": 400, "signed_event_id_with_nul": 400,
                     "slack_signed_with_an_empty_key": 401, "caller_set_trigger_identities": 422,
                     "caller_set_source": 422, "nul_in_a_reason": 422, "amount_of_2_to_the_63": 422,
                     "body_over_the_limit": 413}
    assert outcome.counts["webhook_receipts"] == 40 + 11


async def test_contending_entry_points_never_refund_more_than_captured(env: Embedded) -> None:
    outcome = await chaos.concurrency(env, 9)
    assert outcome.violations == [], "\n".join(outcome.violations)
    # nine of 1,500 from the API, webhooks and ServiceNow ask 13,500 of the 10,000 captured:
    # six fit and are refunded once each, three are rejected before the provider is asked
    assert outcome.counts["requested"] == 13_500
    assert (outcome.counts["succeeded"], outcome.counts["rejected"]) == (6, 3)
    assert outcome.counts["refunded"] == 9_000


async def test_a_signal_at_the_close_runs_the_closing_task_again_and_writes_nothing_twice(
        env: Embedded, monkeypatch: pytest.MonkeyPatch) -> None:
    """close_race, with the race made certain: the provider's own webhook lands at the close
    only now and then (1 to 3 refunds in 60 in one pytest process, none in 300 once under the
    loaded suite), so each settlement's first run also signals its case from inside the step
    (a charge notice, which moves nothing): every closing task runs again."""
    write, signalled = env.store.cases.write_case_steps, set[str]()

    async def write_with_a_signal(steps: CaseWrites, step_key: str | None = None,
                                  **options: Callable[[CaseWritten], None]) -> CaseWritten:
        closing = any(w.event is not None and w.event.action == "refund_succeeded" for w in steps.writes)
        if closing and steps.refund_request_id not in signalled:
            signalled.add(steps.refund_request_id)
            await signal_a_charge_notice(env.client, steps.refund_request_id)
        return await write(steps, step_key, **options)

    monkeypatch.setattr(env.store.cases, "write_case_steps", write_with_a_signal)
    outcome = await chaos.close_race(env, 20)
    assert outcome.violations == [], "\n".join(outcome.violations)
    assert outcome.cases == 20 and outcome.counts["provider_refunded"] == 20 * 1_000
    assert outcome.counts["tasks_run_again"] == 20  # each refused as an unhandled command
    assert not [k for k in outcome.counts if k.startswith("other_task_failures_")], outcome.counts


@pytest.mark.slow
async def test_killing_the_worker_repeatedly_keeps_one_refund_per_request(env: Embedded) -> None:
    outcome = await chaos.kill_worker(env, 1)
    assert outcome.violations == [], "\n".join(outcome.violations)
    assert {k: v for k, v in outcome.counts.items() if k.startswith("kills_")} == {
        f"kills_{point}": 1 for point in chaos.KILL_POINTS}
    assert outcome.counts["provider_refunded"] == 4_000


async def test_schemathesis_finds_no_server_error_and_accounts_every_case_it_made(env: Embedded) -> None:
    outcome = await chaos.schema_fuzz(env, 3, seed=5, phases="examples,fuzzing")  # `make chaos`: all four
    # the message is schemathesis's own report, whole: pytest's diff would cut it short
    assert outcome.violations == [], "\n".join(outcome.violations)
    assert outcome.seed == 5  # a violation names the seed that replays it
    assert [outcome.counts[f"exit_code_{user}"] for user in ("alice", "bob", "olga")] == [0, 0, 0]
    assert outcome.counts["requests"] > 0  # the answers were recorded, so the accounting read them
    assert outcome.counts["cases_created"] >= 1  # the accounting had cases to hold to the provider


def plant_schemathesis_cache(folder: Path, body: dict[str, Any]) -> Path:
    """A request cache as schemathesis 4 leaves one in its working directory after a run: one
    refund request it saw refused (the amount not an integer), to replay when it next starts."""
    cache = folder / ".schemathesis" / "default" / "cache"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({
        "format_version": 1, "schemathesis_version": metadata.version("schemathesis"),
        "schema_location": "", "base_url": "", "created_at": "2026-12-05T00:00:00+00:00",
        "next_run_id": 1, "auth_identities": {}}))
    operation = "POST /v1/refund-requests"
    request = {"method": "POST", "path_parameters": {}, "query": {}, "headers": {}, "cookies": {},
               "body": body, "media_type": "application/json"}
    entries = cache / "entries.jsonl"
    entries.write_text(json.dumps({
        "id": 1, "kind": "error_feedback", "operation": operation, "last_replayed_run": 0, "request": request,
        "observation_keys": [f"(('{operation}', 'body'), ('amount',), 'type_mismatch', 'integer')"]}) + "\n")
    return entries


async def fuzz_once(stack: Stack, steering: Steering) -> tuple[set[str], set[str]]:
    """One `st run` (1 example, fuzzing): the cases created meanwhile and those the answers to
    its creating calls (POSTs) announced. Only those: the steering hooks aim later calls at
    every case a call made, a replayed one too, so a GET's answer names it as well."""
    since = datetime.now(UTC)
    entries, exit_code, report = await chaos.run_schemathesis(stack, "alice", 1, "fuzzing", steering)
    assert exit_code == 0, report
    async with stack.store.database.transaction() as conn:
        created = {r["refund_request_id"] for r in await (await conn.execute(
            "SELECT refund_request_id FROM refund_cases WHERE created_at >= %s", (since,))).fetchall()}
    return created, chaos.announced_cases([e for e in entries if e["request"]["method"] == "POST"])


async def test_a_fuzz_run_sends_nothing_an_earlier_run_left_behind(
        bare: Stack, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """schemathesis replays the requests it cached in its working directory when it next
    starts, outside the run's HAR and through the steering hooks: a whole suite's run made two
    cases so that no answer announced. Each run starts from nothing and leaves nothing."""
    monkeypatch.chdir(tmp_path)
    charge = await bare.charge(10_000)
    refused = {**bare.refund_body(charge, 1_000), "amount": 1_000.5}
    cached = plant_schemathesis_cache(tmp_path, refused)
    left = cached.read_text()
    steering = Steering(charges=[charge], amounts=[1_000], currencies=["USD"], share=1.0, seed=3)
    # The control: run in a folder holding such a cache (as every run did before), the planted
    # request is replayed and makes a case no answer announces. If a schemathesis release stops
    # reading this cache, this fails, rather than the test below passing without testing anything.
    control = tmp_path_factory.mktemp("control")
    plant_schemathesis_cache(control, refused)
    with monkeypatch.context() as patched:
        patched.setattr(tempfile, "TemporaryDirectory",
                        lambda **_: contextlib.nullcontext(str(control)))
        created, announced = await fuzz_once(bare, steering)
    assert created - announced, "schemathesis no longer replays the planted cache: update the planting"

    # every case it made, a create's answer in its HAR shows (it may make none: with the seed,
    # the fuzzer's own id may be kept, and the shared database may hold that id already)
    created, announced = await fuzz_once(bare, steering)
    assert created <= announced, (created, announced)
    assert cached.read_text() == left and sorted(p.name for p in tmp_path.iterdir()) == [".schemathesis"]


# -- the checker can fail: each planted bad state is reported ----------------------------

@pytest.fixture
async def bare(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    """A stack without a worker: the checker reads what the test planted, nothing moves it.
    The sandbox holds its webhooks: a planted refund's `refund.created` would otherwise race
    the check, which waits for nothing (it once found it received and not yet processed)."""
    opened = await open_stack(store, client, temporal_server.address, worker=False)
    async with opened.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"hold_webhooks": True})
    yield opened
    await opened.close()


AUTO = {"auto_approve": True, "rules_fired": ["auto_approve"], "policy_version": "planted",
        "requirements": []}
TWO_PEOPLE = {"auto_approve": False, "rules_fired": ["amount_over_auto_limit"], "policy_version": "planted",
              "tier": "two", "requirements": [{"role": "approver", "count": 2}]}


async def plant(stack: Stack, status: str, *, reserved: int = 0, provider_refund: str | None = None,
                refund_amount: int = 1_000, decision: dict[str, Any] | None = AUTO) -> Sent:
    """A case of 1,000 in `status` holding `reserved`, decided by `decision`, with
    (optionally) a provider refund of `refund_amount` in the given status made for it at the
    sandbox, as if a run had ended there."""
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_000)
    await stack.store.cases.create(RefundRequest.model_validate(body), "alice")
    async with stack.store.database.transaction() as conn:
        await conn.execute("UPDATE refund_cases SET status = %s, reserved_amount = %s, decision = %s"
                           " WHERE refund_request_id = %s",
                           (status, reserved, Jsonb(decision) if decision else None,
                            body["refund_request_id"]))
    if provider_refund is not None:
        async with stack.sandbox() as sb:
            made = await sb.post("/v1/refunds", json={
                "charge": charge, "amount": refund_amount,
                "metadata": {"refund_request_id": body["refund_request_id"]}})
        await stack.set_provider_status(made.json()["id"], provider_refund, send_webhook=False)
    return Sent(body["refund_request_id"], charge, 202)


async def checked(stack: Stack, sent: list[Sent], since: datetime) -> Outcome:
    outcome = Outcome("planted", seed=42)
    await check(stack, outcome, sent, since=since, timeout=0)
    return outcome


async def test_the_checker_passes_a_consistent_state(bare: Stack) -> None:
    since = datetime.now(UTC)
    sent = [await plant(bare, "rejected"), await plant(bare, "succeeded", reserved=1_000,
                                                       provider_refund="succeeded")]
    async with bare.store.database.transaction() as conn:  # the succeeded case's settlement, as posted
        await LedgerRepository.post_in(conn, LedgerInput(
            refund_request_id=sent[1].case_id, kind=LedgerKind.REFUND_SETTLED, amount=1_000,
            currency="USD", provider_refund_id="re_planted"))
    outcome = await checked(bare, sent, since)
    assert outcome.violations == [] and outcome.counts["provider_refunded"] == 1_000


@pytest.mark.parametrize(("status", "reserved", "provider_refund", "reported"), [
    ("succeeded", 1_000, None, "expected one of ['denied', 'expired', 'refund_failed', 'rejected'] "
                               "(the provider holds no refund), observed succeeded"),
    ("refund_failed", 0, "succeeded", "is succeeded), observed refund_failed"),
    ("rejected", 1_000, None, "expected reservation released (rejected), observed 1000 still reserved"),
    ("executing", 1_000, None, "expected a final status, observed still executing"),
])
async def test_the_checker_reports_a_planted_bad_case(bare: Stack, status: str, reserved: int,
                                                      provider_refund: str | None, reported: str) -> None:
    since = datetime.now(UTC)
    sent = await plant(bare, status, reserved=reserved, provider_refund=provider_refund)
    outcome = await checked(bare, [sent], since)
    assert any(v.startswith(f"[seed 42] {sent.case_id}: ") and reported in v
               for v in outcome.violations), outcome.violations


async def test_the_checker_reports_a_refund_of_another_amount_than_the_case_s(bare: Stack) -> None:
    """A units bug sends 900 for a case of 1,000: the ledger posts the provider's figure, so
    only the case's own amount shows it."""
    since = datetime.now(UTC)
    sent = await plant(bare, "succeeded", provider_refund="succeeded", refund_amount=900)
    async with bare.store.database.transaction() as conn:
        await LedgerRepository.post_in(conn, LedgerInput(
            refund_request_id=sent.case_id, kind=LedgerKind.REFUND_SETTLED, amount=900,
            currency="USD", provider_refund_id="re_planted"))
    outcome = await checked(bare, [sent], since)
    assert [v for v in outcome.violations if sent.case_id in v] == [
        f"[seed 42] {sent.case_id}: expected a refund of 1000 USD (the case's), observed refund "
        f"{(await bare.provider_refunds(sent.charge))[0]['id']} of 900 usd"]


async def test_the_checker_reports_a_case_waiting_for_a_person_with_no_workflow_or_with_a_refund(
        bare: Stack) -> None:
    """Waiting for an approver is open by design, but only with a workflow to take the
    approval; and money moved while it waits stepped around the approvers."""
    since = datetime.now(UTC)
    orphan = await plant(bare, "awaiting_approval", reserved=1_000, decision=TWO_PEOPLE)
    paid = await plant(bare, "awaiting_approval", reserved=1_000, provider_refund="succeeded",
                       decision=TWO_PEOPLE)
    outcome = await checked(bare, [orphan, paid], since)
    text = "\n".join(outcome.violations)
    for case_id in (orphan.case_id, paid.case_id):
        assert (f"{case_id}: expected a running workflow to take a person's word (awaiting_approval), "
                "observed no workflow") in text
    assert f"{paid.case_id}: expected no refund while it waits for an approver" in text
    assert f"{paid.case_id}: expected money moved only as its policy decision allowed, observed " \
           "approvals by [] before the execution started" in text
    assert f"{orphan.case_id}: expected money moved" not in text  # no money: nothing stepped around


@pytest.mark.parametrize(("approvers", "reported"), [
    (["alice", "bob"], "approvals by ['bob'] before the execution started; the tier asks for 2 people"),
    (["bob", "erin"], "short of ['approver x2']"),
    (["bob", "carol"], None)])
async def test_the_checker_holds_money_moved_to_the_approvals_its_decision_asked_for(
        bare: Stack, approvers: list[str], reported: str | None) -> None:
    """A case of two approvers' tier that moved money: the requester's own approval and an
    approver without the tier's role do not count; two approvers with it do. Read from the
    trail, before the execution started."""
    since = datetime.now(UTC)
    sent = await plant(bare, "succeeded", provider_refund="succeeded", decision=TWO_PEOPLE)
    roles = {"alice": ["approver"], "bob": ["approver"], "carol": ["approver"], "erin": ["auditor"]}
    for approver in approvers:
        await bare.store.audit.record(sent.case_id, approver, "approval_granted",
                                      {"reason": "planted", "roles": roles[approver]})
    await bare.store.audit.record(sent.case_id, "workflow", "execution_started", {})
    async with bare.store.database.transaction() as conn:
        await LedgerRepository.post_in(conn, LedgerInput(
            refund_request_id=sent.case_id, kind=LedgerKind.REFUND_SETTLED, amount=1_000,
            currency="USD", provider_refund_id="re_planted"))
    outcome = await checked(bare, [sent], since)
    mine = [v for v in outcome.violations if sent.case_id in v]
    if reported is None:
        assert mine == []
    else:
        assert len(mine) == 1 and "money moved only as its policy decision allowed" in mine[0] \
            and reported in mine[0], mine


async def test_the_checker_reports_a_chain_whose_head_is_past_its_rows(bare: Stack) -> None:
    """The chain's rows end before its head (rows deleted): `verify` says so as
    "chain <id>: head is …", which the checker's filter on the scenario's chains dropped."""
    since = datetime.now(UTC)
    sent = await plant(bare, "rejected")
    await bare.store.audit.record(sent.case_id, "system", "validation_rejected", {"reason": "planted"})
    async with bare.store.database.transaction() as conn:
        await conn.execute("UPDATE audit_heads SET seq = seq + 1 WHERE chain = %s", (sent.case_id,))
    try:
        outcome = await checked(bare, [sent], since)
    finally:
        async with bare.store.database.transaction() as conn:
            await conn.execute("UPDATE audit_heads SET seq = seq - 1 WHERE chain = %s", (sent.case_id,))
    head = f"[seed 42] audit chain: expected verifies, observed chain {sent.case_id}: head is"
    assert any(v.startswith(head) for v in outcome.violations), outcome.violations


async def test_the_checker_reports_a_one_time_row_written_twice(bare: Stack) -> None:
    """As a step run again wrote it before step keys (`refund_succeeded` twice)."""
    since = datetime.now(UTC)
    sent = await plant(bare, "rejected")
    for _ in range(2):
        await bare.store.audit.record(sent.case_id, "system", "validation_rejected", {"reason": "planted"})
    outcome = await checked(bare, [sent], since)
    assert any(v.startswith(f"[seed 42] {sent.case_id}: expected each of ['validation_rejected'] once")
               for v in outcome.violations), outcome.violations


async def test_the_checker_reports_a_second_refund_a_stray_and_an_unprocessed_receipt(bare: Stack) -> None:
    since = datetime.now(UTC)
    sent = await plant(bare, "succeeded", reserved=1_000, provider_refund="succeeded")
    async with bare.sandbox() as sb:
        for reference in (sent.case_id, "not-ours"):
            await sb.post("/v1/refunds", json={"charge": sent.charge, "amount": 500,
                                               "metadata": {"refund_request_id": reference}})
    receipt = await bare.store.receipts.store(
        provider="sandbox", event_id=f"evt_{bare.new_id()}", event_type="refund.updated", body=b"{}",
        body_sha256="0" * 64, headers={}, verdict="accepted", error=None)
    outcome = await checked(bare, [sent], since)
    text = "\n".join(outcome.violations)
    assert f"{sent.case_id}: expected one provider refund, observed 2" in text
    assert f"charge {sent.charge}: expected no refund without a request of ours" in text
    assert f"receipt {receipt.receipt_id} (refund.updated" in text and "never processed" in text
    assert f"{sent.case_id}: expected ledger net 1500" in text  # nothing was posted for either


def har_entry(stack: Stack, body: dict[str, Any], status: int) -> dict[str, Any]:
    """One refund request and its answer as schemathesis's HAR report holds them."""
    return {"request": {"method": "POST", "url": f"{stack.relay_url}/v1/refund-requests",
                        "postData": {"text": json.dumps(body)}},
            "response": {"status": status, "content": {"text": json.dumps(
                {"refund_request_id": body["refund_request_id"], "status": "requested"})}}}


async def test_the_fuzz_accounting_reports_a_case_made_behind_its_back(bare: Stack) -> None:
    """What the fuzz's accounting must see: a case no 2xx announced (its id inside an
    announced one's, as text), a 2xx whose case is missing, an announced case the provider
    contradicts (succeeded, no refund there) and a ledger entry for a case it did not make.
    The announced, consistent case passes."""
    since = datetime.now(UTC)
    announced, contradicted = await plant(bare, "rejected"), await plant(bare, "succeeded")
    behind = bare.refund_body(announced.charge, 1_000, refund_request_id=announced.case_id[:-4])
    await bare.store.cases.create(RefundRequest.model_validate(behind), "alice")
    elsewhere = bare.new_id("rr-elsewhere")
    async with bare.store.database.transaction() as conn:
        await conn.execute("UPDATE refund_cases SET status = 'rejected' WHERE refund_request_id = %s",
                           (behind["refund_request_id"],))
        await LedgerRepository.post_in(conn, LedgerInput(
            refund_request_id=elsewhere, kind=LedgerKind.REFUND_SETTLED, amount=1_000,
            currency="USD", provider_refund_id="re_elsewhere"))
    missing = bare.refund_body(announced.charge, 1_000)
    answers = [har_entry(bare, {"refund_request_id": case_id}, 202)
               for case_id in (announced.case_id, contradicted.case_id)] + [har_entry(bare, missing, 202)]
    outcome = Outcome("planted", seed=42)
    await chaos.account_fuzz(bare, outcome, answers, since, [], timeout=0)
    assert sorted(outcome.violations) == sorted([
        f"[seed 42] {behind['refund_request_id']}: expected a case only where a 2xx answer announced it,"
        " observed created unannounced",
        f"[seed 42] {missing['refund_request_id']}: expected the case its 2xx answer announced,"
        " observed no case",
        f"[seed 42] {contradicted.case_id}: expected one of ['denied', 'expired', 'refund_failed',"
        " 'rejected'] (the provider holds no refund), observed succeeded",
        f"[seed 42] ledger of {elsewhere}: expected entries only for the fuzz's and the seeded cases,"
        " observed posted for a case neither made"])
    assert outcome.counts["cases_created"] == 3 and outcome.counts["created_ended_rejected"] == 2


async def test_a_request_whose_answer_failed_after_it_was_accepted_counts_as_accepted(
        bare: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The case is made and its workflow started, then the answer fails (PostgreSQL going
    down while the relay reads the case back, as a fault-schedule run saw): the client's
    repeat is answered 200, the identical request already there. That request was accepted
    and the checker must hold its case to the provider like any other."""
    view, failed = CaseActions.view, list[str]()

    async def fails_once(self: CaseActions, case_id: str) -> dict[str, Any]:
        if not failed:
            failed.append(case_id)
            raise RuntimeError("the database went away while the answer was read")
        return await view(self, case_id)

    monkeypatch.setattr(CaseActions, "view", fails_once)
    charge = await bare.charge(10_000)
    body = bare.refund_body(charge, 1_000)
    assert await fault_schedule.post_retrying(bare, body) == 202
    assert failed == [body["refund_request_id"]]  # the first answer did fail
    assert (await bare.store.cases.get(body["refund_request_id"])) is not None


async def test_the_checker_reports_an_unexpected_answer(bare: Stack) -> None:
    outcome = await checked(bare, [Sent("rr-refused", "ch_none", answered=422, expected=202)],
                            datetime.now(UTC))
    assert outcome.violations == ["[seed 42] rr-refused request: expected HTTP 202, observed HTTP 422"]
