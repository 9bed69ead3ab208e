"""Tamper evidence that holds against the database's own user: chain heads checkpointed
outside PostgreSQL, an append-only ledger, one snapshot per verification, and services
that run as a role which cannot disable the triggers."""

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from temporalio.client import Client

from adapters.audit_checkpoints import CheckpointBook
from adapters.config import Settings
from adapters.db import Store
from adapters.db.audit import AuditLog
from domain.models import LedgerInput, LedgerKind
from starters.dev.stack import TemporalDevServer
from tests.harness import PAYLOAD_KEYS, create_database_roles, open_stack
from tests.test_cli import run
from workers.checkpoints import checkpoint_audit_heads, checkpoint_once
from workers.main import run_worker


def about(chain: str, problems: list[str]) -> list[str]:
    return [p for p in problems if f"chain {chain}" in p]


async def append(store: Store, chain: str, count: int) -> None:
    for n in range(count):
        await store.audit.record(chain, "tester", "step", {"n": n})


async def as_owner(store: Store, *statements: tuple[str, tuple[object, ...]]) -> None:
    """What the database's own superuser can do: switch the append-only trigger off and on."""
    async with store.database.transaction() as conn:
        await conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update")
        for statement, params in statements:
            await conn.execute(statement, params)
        await conn.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update")


async def test_a_cut_tail_with_a_rewound_head_is_caught_by_the_checkpoints(
        store: Store, tmp_path: Path, postgres_dsn: str) -> None:
    chain = f"tamper-{uuid.uuid4().hex[:10]}"
    book = CheckpointBook(tmp_path / "checkpoints", [b"checkpoint-key"])
    await append(store, chain, 3)
    known = await checkpoint_once(store, book, {})
    await append(store, chain, 2)
    known = await checkpoint_once(store, book, known)
    assert known[chain][0] == 5
    points, sealed = book.read()
    assert sealed == [] and points[chain][3] and points[chain][5]
    assert about(chain, (await store.audit.verify(points))[1]) == []

    rows = {r["seq"]: r["hash"] for r in await store.audit.trail(chain)}
    await as_owner(store, ("DELETE FROM audit_events WHERE chain = %s AND seq > 3", (chain,)),
                   ("UPDATE audit_heads SET seq = 3, hash = %s WHERE chain = %s", (rows[3], chain)))
    assert about(chain, (await store.audit.verify())[1]) == []  # the chain alone looks whole
    problems = about(chain, (await store.audit.verify(points))[1])
    assert len(problems) == 1 and "checkpointed seq 5 is gone" in problems[0], problems

    await append(store, chain, 3)  # grown again past the checkpoint: a fork, still caught
    problems = about(chain, (await store.audit.verify(points))[1])
    assert any("(seq 5)" in p and "checkpointed hash" in p for p in problems), problems

    env = {"REFUNDS_DATABASE_URL": postgres_dsn, "REFUNDS_AUDIT_CHECKPOINT_DIR": str(book.folder),
           "REFUNDS_AUDIT_CHECKPOINT_KEYS": "checkpoint-key"}
    result = await run("audit", "verify", env=env)
    assert result.returncode == 1
    assert f"TAMPERED: chain {chain}: checkpointed seq 5 is gone" not in result.stdout  # a fork now
    assert f"TAMPERED: chain {chain} row" in result.stdout and "checkpointed hash" in result.stdout

    first = sorted(book.folder.glob("*.json"))[0]
    forged = json.loads(first.read_text())
    forged["heads"][chain] = [3, "0" * 64]
    first.write_text(json.dumps(forged))
    assert any(first.name in p and "seal does not match" in p for p in book.read()[1])
    unsealed = await run("audit", "verify", env={**env, "REFUNDS_AUDIT_CHECKPOINT_KEYS": ""})
    assert unsealed.returncode == 2 and "REFUNDS_AUDIT_CHECKPOINT_KEYS" in unsealed.stderr
    typo = {**env, "REFUNDS_AUDIT_CHECKPOINT_DIR": str(tmp_path / "typo")}
    elsewhere = await run("audit", "verify", env=typo)
    assert elsewhere.returncode == 2 and "does not exist" in elsewhere.stderr


async def test_verification_vouches_for_no_row_the_checkpointer_has_not_recorded(
        store: Store, tmp_path: Path, postgres_dsn: str) -> None:
    """The checkpointer stopped (its folder unwritable, no worker running it): rows written
    since are in no checkpoint, and a cut of them with a rewound head could not be told.
    Verification says so and fails, instead of passing them as checked."""
    chain = f"lapse-{uuid.uuid4().hex[:10]}"
    await append(store, chain, 2)
    book = CheckpointBook(tmp_path / "checkpoints", [b"checkpoint-key"])
    book.folder.mkdir()
    env = {"REFUNDS_DATABASE_URL": postgres_dsn, "REFUNDS_AUDIT_CHECKPOINT_DIR": str(book.folder),
           "REFUNDS_AUDIT_CHECKPOINT_KEYS": "checkpoint-key", "REFUNDS_AUDIT_CHECKPOINT_SECONDS": "0.001"}
    lapsed = await run("audit", "verify", env=env)
    assert lapsed.returncode == 1 and "NOT CHECKPOINTED: chain" in lapsed.stdout, lapsed.stdout
    assert "is the worker's checkpointer running" in lapsed.stderr
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert (chain, 2) in [(c, seq) for c, seq, _ in await store.audit.uncheckpointed({}, later)]
    await checkpoint_once(store, book, {})
    points, _ = book.read()
    assert chain not in [c for c, _, _ in await store.audit.uncheckpointed(points, later)]
    await append(store, chain, 1)  # written after the round: the next one records it
    assert (chain, 3) in [(c, seq) for c, seq, _ in await store.audit.uncheckpointed(
        points, datetime.now(UTC) + timedelta(seconds=1))]


async def test_a_chain_whose_head_was_deleted_is_reported(store: Store) -> None:
    """Its rows still hash together, but every later append to it fails (its case records
    nothing more): verification says so, it does not pass the chain as whole."""
    chain = f"headless-{uuid.uuid4().hex[:10]}"
    await append(store, chain, 2)
    await as_owner(store, ("DELETE FROM audit_heads WHERE chain = %s", (chain,)))
    problems = about(chain, (await store.audit.verify())[1])
    assert len(problems) == 1 and "no head" in problems[0], problems
    # put back: the suite's database is shared
    await as_owner(store, ("INSERT INTO audit_heads (chain, seq, hash) SELECT chain, seq, hash"
                           " FROM audit_events WHERE chain = %s ORDER BY seq DESC LIMIT 1", (chain,)))


async def test_the_worker_loop_checkpoints_until_stopped(store: Store, tmp_path: Path) -> None:
    chain = f"loop-{uuid.uuid4().hex[:10]}"
    await append(store, chain, 1)
    book = CheckpointBook(tmp_path, [b"k"])
    stop = asyncio.Event()
    loop = asyncio.create_task(checkpoint_audit_heads(store, book, stop, every_seconds=0.05))
    while book.count() == 0:
        await asyncio.sleep(0.02)
    await append(store, chain, 1)
    stop.set()
    await loop  # the last round on the way out records the second row
    assert book.read()[0][chain].keys() == {1, 2}


async def test_the_checkpointer_s_rounds_are_counted_so_a_stopped_one_can_be_alerted_on(
        store: Store, tmp_path: Path) -> None:
    """A round that fails (the folder unwritable, the database away) was a log line only:
    nothing an alert could read, while every later cut went undetectable. Rounds are counted
    by outcome, and the time of the last good one is a gauge (alert on its age)."""
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels or None) or 0.0

    rounds = "refunds_audit_checkpoint_rounds_total"
    failed_before, ok_before = (sample(rounds, outcome=o) for o in ("failed", "ok"))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    stop = asyncio.Event()
    stop.set()  # one round, then out
    await checkpoint_audit_heads(store, CheckpointBook(blocked, [b"k"]), stop, every_seconds=0.05)
    assert sample("refunds_audit_checkpoint_rounds_total", outcome="failed") == failed_before + 1
    started = datetime.now(UTC).timestamp()
    await checkpoint_audit_heads(store, CheckpointBook(tmp_path / "ok", [b"k"]), stop, every_seconds=0.05)
    assert sample("refunds_audit_checkpoint_rounds_total", outcome="ok") == ok_before + 1
    assert sample("refunds_audit_checkpoint_last_ok_timestamp_seconds") >= started


async def test_the_worker_process_runs_the_checkpointer_when_configured(
        store: Store, postgres_dsn: str, temporal_server: TemporalDevServer, tmp_path: Path) -> None:
    chain = f"worker-{uuid.uuid4().hex[:10]}"
    await append(store, chain, 2)
    folder = tmp_path / "checkpoints"
    settings = Settings(temporal_address=temporal_server.address, payload_keys=PAYLOAD_KEYS,
                        task_queue=f"tq-{uuid.uuid4().hex[:10]}", worker_health_port=0,
                        temporal_metrics_port=0, outbox_sweep_seconds=0,
                        reconciliation_interval_seconds=0, audit_checkpoint_dir=folder,
                        audit_checkpoint_keys="k1")
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, postgres_dsn, stop))
    book = CheckpointBook(folder, [b"k1"])
    async with asyncio.timeout(60):  # a guard against a hang, not a measured wait
        while chain not in book.read()[0] and not worker.done():
            await asyncio.sleep(0.05)
    stop.set()
    await worker
    assert book.read()[0][chain] == {2: (await store.audit.heads())[chain][1]}
    with pytest.raises(ValueError, match="REFUNDS_AUDIT_CHECKPOINT_KEYS"):
        await run_worker(settings.model_copy(update={"audit_checkpoint_keys": None}), postgres_dsn, stop)


async def test_the_ledger_refuses_update_and_delete(store: Store) -> None:
    case_id = f"ledger-{uuid.uuid4().hex[:10]}"
    await store.ledger.post(LedgerInput(refund_request_id=case_id, kind=LedgerKind.REFUND_SETTLED,
                                        amount=500, currency="USD", provider_refund_id="re_1"))
    for statement in ("UPDATE ledger_lines SET debit = debit * 2 WHERE entry_id IN"
                      " (SELECT id FROM ledger_entries WHERE refund_request_id = %s)",
                      "DELETE FROM ledger_lines WHERE entry_id IN"
                      " (SELECT id FROM ledger_entries WHERE refund_request_id = %s)",
                      "DELETE FROM ledger_entries WHERE refund_request_id = %s",
                      "UPDATE ledger_entries SET template = 'x' WHERE refund_request_id = %s"):
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            async with store.database.transaction() as conn:
                await conn.execute(statement, (case_id,))
    lines = await store.ledger.entries(case_id)
    assert sorted((line["debit"], line["credit"]) for line in lines) == [(0, 500), (500, 0)]


async def test_a_posted_entry_takes_no_more_lines_and_no_table_shadows_its_check(store: Store) -> None:
    """An entry is two balanced lines, written with it. Lines inserted later for an old entry
    (balanced between themselves) changed its money while its posting key and time stayed:
    an UPDATE by another name. And the balance check read `ledger_lines` by the session's
    search path: a temporary table of that name (the runtime role may create them) hid an
    unbalanced entry from it. Both are refused at commit."""
    case_id = f"ledger-{uuid.uuid4().hex[:10]}"
    posted = await store.ledger.post(LedgerInput(refund_request_id=case_id, kind=LedgerKind.REFUND_SETTLED,
                                                 amount=500, currency="USD", provider_refund_id="re_1"))
    grown = ("INSERT INTO ledger_lines (entry_id, account, debit, credit, currency) VALUES"
             " (%s, 'refunds_contra_revenue', 1000000, 0, 'USD'),"
             " (%s, 'provider_clearing', 0, 1000000, 'USD')")
    with pytest.raises(psycopg.errors.RaiseException, match="two balanced lines"):
        async with store.database.transaction() as conn:
            await conn.execute(grown, (posted.entry_id, posted.entry_id))
    with pytest.raises(psycopg.errors.RaiseException, match="two balanced lines"):
        async with store.database.transaction() as conn:
            schema = await (await conn.execute("SELECT current_schema() AS name")).fetchone()
            assert schema is not None
            await conn.execute("CREATE TEMP TABLE ledger_lines (entry_id bigint, currency text, debit bigint,"
                               " credit bigint) ON COMMIT DROP")
            entry = await (await conn.execute(
                "INSERT INTO ledger_entries (posting_key, refund_request_id, template)"
                " VALUES (%s, %s, 'refund_settled') RETURNING id", (f"{case_id}:shadow", case_id))).fetchone()
            assert entry is not None
            await conn.execute(f'INSERT INTO "{schema["name"]}".ledger_lines'
                               " (entry_id, account, debit, credit, currency)"
                               " VALUES (%s, 'provider_clearing', 0, 700, 'USD')", (entry["id"],))
    lines = await store.ledger.entries(case_id)
    assert sorted((line["debit"], line["credit"]) for line in lines) == [(0, 500), (500, 0)]


async def test_verification_reads_heads_and_rows_in_one_snapshot(store: Store, postgres_dsn: str) -> None:
    """An append that commits after verification read the heads and before it read the rows
    is not a deletion. The writer holds the audit table's lock until verification has read
    the heads and waits on the rows, then commits: the interleaving is forced, not timed."""
    chain = f"live-{uuid.uuid4().hex[:10]}"
    await append(store, chain, 2)
    async with await psycopg.AsyncConnection.connect(postgres_dsn, row_factory=dict_row) as writer, \
            await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as watcher:
        async with writer.transaction():
            await writer.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
            await AuditLog.append(writer, chain, "tester", "step", {"n": 2})
            verifying = asyncio.create_task(store.audit.verify())
            async with asyncio.timeout(60):  # a guard against a hang, not a measured wait
                while not await (await watcher.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE '%%FROM audit_events ORDER BY chain, seq%%'")).fetchone():
                    await asyncio.sleep(0.02)
        _, problems = await verifying
    assert about(chain, problems) == []
    assert about(chain, (await store.audit.verify())[1]) == []
    assert [r["seq"] for r in await store.audit.trail(chain)] == [1, 2, 3]


async def test_services_run_as_a_role_that_cannot_step_around_the_triggers(
        postgres_dsn: str, client: Client, temporal_server: TemporalDevServer) -> None:
    owner_dsn, runtime_dsn = await create_database_roles(postgres_dsn)
    owner, runtime = (str(conninfo_to_dict(dsn)["user"]) for dsn in (owner_dsn, runtime_dsn))

    migrated = await run("migrate", env={"REFUNDS_MIGRATION_DATABASE_URL": owner_dsn,
                                         "REFUNDS_DATABASE_URL": runtime_dsn})
    assert migrated.returncode == 0, migrated.stderr
    assert f"runtime role {runtime}: granted" in migrated.stdout
    refused = await run("migrate", env={"REFUNDS_MIGRATION_DATABASE_URL": owner_dsn,
                                        "REFUNDS_RUNTIME_ROLE": owner})
    assert refused.returncode == 1 and "cannot disable triggers" in refused.stderr

    runtime_store = await Store.open(runtime_dsn, max_size=8)
    try:
        async with await psycopg.AsyncConnection.connect(runtime_dsn, autocommit=True) as app:
            for statement in ("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update",
                              "ALTER TABLE ledger_lines DISABLE TRIGGER ledger_lines_no_update",
                              "DELETE FROM ledger_lines", "DELETE FROM ledger_entries",
                              "DELETE FROM audit_events", "UPDATE audit_events SET actor = 'x'",
                              "TRUNCATE audit_events", "DROP TABLE audit_heads",
                              # a head deleted wedges its case; the approvals the duty checks
                              # read, and the event gate that makes a redelivery act once
                              "DELETE FROM audit_heads", "UPDATE case_approvals SET approver = 'x'",
                              "DELETE FROM case_approvals", "DELETE FROM webhook_events"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await app.execute(statement)

        stack = await open_stack(runtime_store, client, temporal_server.address)
        try:
            charge = await stack.charge(2_000)
            case_id = await stack.request_refund("alice", charge, 700)
            await stack.wait_for_status(case_id, "succeeded")
            assert len(await runtime_store.ledger.entries(case_id)) == 2  # debit and credit line
        finally:
            await stack.close()
        checked, problems = await runtime_store.audit.verify()
        assert checked > 0 and problems == []
    finally:
        await runtime_store.close()


async def test_a_second_posting_under_a_key_with_other_money_is_told_not_dropped(store: Store) -> None:
    """A posting key is the case and the template: a second settlement of one case for
    another amount (another refund followed, another currency read) finds the first and
    posts nothing. Right, since money is posted once, but the books then differ from what
    the second posting said: ops are told, and the trail says what was not posted."""
    case_id = f"ledger-{uuid.uuid4().hex[:10]}"
    first = LedgerInput(refund_request_id=case_id, kind=LedgerKind.REFUND_SETTLED, amount=500, currency="USD",
                        provider_refund_id="re_1")
    assert (await store.ledger.post(first)).newly_posted
    assert not (await store.ledger.post(first)).newly_posted  # a retry: nothing to tell
    assert "ledger_posting_conflict" not in [e["action"] for e in await store.audit.trail(case_id)]
    other = first.model_copy(update={"amount": 700, "provider_refund_id": "re_2"})
    assert not (await store.ledger.post(other)).newly_posted
    [conflict] = [e["detail"] for e in await store.audit.trail(case_id)
                  if e["action"] == "ledger_posting_conflict"]
    assert (conflict["posted"]["amount"], conflict["refused"]["amount"]) == (500, 700)
    assert [(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)] == [
        ("ledger_posting_conflict", "operator")]
    assert [line["debit"] for line in await store.ledger.entries(case_id)] == [500, 0]


async def test_an_approval_shown_that_the_trail_does_not_hold_is_reported(store: Store) -> None:
    """The runtime role may insert into the approvals projection: a row naming alice as an
    approver, pointing at a trail row that is no approval, shows an approval nobody gave;
    verification passed it. It reports it, and an approval step the projection lacks."""
    chain = f"projection-{uuid.uuid4().hex[:10]}"
    await append(store, chain, 1)
    forged = ("INSERT INTO case_approvals (chain, seq, approver, action, roles, reason, occurred_at)"
              " VALUES (%s, 1, 'alice', 'approval_granted', '{approver}', 'looks fine', now())", (chain,))
    await as_owner(store, forged)
    try:
        problems = about(chain, (await store.audit.verify())[1])
        assert len(problems) == 1 and "approval approval_granted by alice (seq 1)" in problems[0], problems
    finally:  # the suite's database is shared
        await as_owner(store, ("DELETE FROM case_approvals WHERE chain = %s", (chain,)))
    copied = ("INSERT INTO case_approvals (chain, seq, approver, action, roles, reason, occurred_at)"
              " VALUES (%s, 1, 'tester', 'step', '{}', 'approved after a call', now())", (chain,))
    await as_owner(store, copied)  # a copy of a trail row that is no approval step, shown as one
    try:
        problems = about(chain, (await store.audit.verify())[1])
        assert len(problems) == 1 and "approval step by tester (seq 1)" in problems[0], problems
    finally:
        await as_owner(store, ("DELETE FROM case_approvals WHERE chain = %s", (chain,)))
    await store.audit.record(chain, "bob", "approval_granted", {"roles": ["approver"]})
    await as_owner(store, ("DELETE FROM case_approvals WHERE chain = %s", (chain,)))  # lost
    problems = about(chain, (await store.audit.verify())[1])
    assert len(problems) == 1 and "approval approval_granted by bob (seq 2)" in problems[0], problems
    await as_owner(store, (  # put back
        "INSERT INTO case_approvals (chain, seq, approver, action, roles, reason, occurred_at)"
        " SELECT chain, seq, actor, action, '{approver}', '', occurred_at FROM audit_events"
        " WHERE chain = %s AND seq = 2", (chain,)))
    assert about(chain, (await store.audit.verify())[1]) == []
