"""Over 400 lines: one repository whose runs, breaks and settlements share row locks and audit
writes; its batch statements are apart already (`reconciliation_sql.py`).

Reconciliation: runs and their cursors, the set-based classification of each batch of
provider objects against our cases and ledger (`reconciliation_sql.py`), breaks (one per
provider, object and class, also those a case or the sweep raises) and the governed end of
each break.

A batch is staged in a temporary table and joined with cases and ledger postings in one
statement, so memory and round trips stay flat however large the window; the batch's
breaks, their audit rows and notices, and the run's cursor commit together.
"""

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from adapters.db.access import AccessRepository
from adapters.db.audit import AuditLog
from adapters.db.cases import CaseRepository
from adapters.db.database import Conn, Database, Repository, jsonb
from adapters.db.ledger import LedgerRepository
from adapters.db.outbox import OutboxRepository
from adapters.db.reconciliation_sql import CLASSIFY, CLASSIFY_PAYOUTS, STAGE
from adapters.db.rows import BreakRow, RunBreakRow, RunRow
from adapters.db.sweep import open_incident_run
from domain.audit import BREAK_GRANTS
from domain.events import NO_REFUND_PREFIX, tracking_case_id
from domain.incidents import DuplicateRefundInput
from domain.ledger import REFUNDED_ACCOUNT
from domain.lifecycle import unfilled
from domain.models import (
    CaseStatus,
    LedgerInput,
    LedgerKind,
    NoticeInput,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundTimings,
    RoleRequirement,
)
from domain.payouts import (
    ENDED_UNREVERSED,
    EXCEPTION_STATUSES,
    PayoutStatus,
    ProviderPayout,
    ProviderPayoutStatus,
    final_status,
    payout_case_id,
)
from domain.reconciliation import (
    LOOK_AGAIN,
    NON_TERMINAL_PROVIDER,
    RAISED_AGAIN,
    REOPENABLE,
    SHOWN_FAILED,
    SHOWN_PENDING,
    SHOWN_REFUNDED,
    UNMAPPED,
    BreakApproval,
    BreakCase,
    BreakClass,
    BreakOutcome,
    BreakSettlement,
    BreakState,
    ListedPayout,
    ListedRefund,
    ReconcileOptions,
    RunWindow,
    UnmappedListing,
    amount_at_stake,
    compensation,
    corrected_status,
    expected_net,
    lifecycle_takes,
    truth_event,
)

Listed = ListedRefund | ListedPayout | UnmappedListing
"""One object of a provider's list call, as a batch stages it."""


class Phase(StrEnum):
    """Which of the provider's lists a run's cursor walks: refunds first, then payouts."""

    REFUNDS = "refunds"
    PAYOUTS = "payouts"


REPORT_COLUMNS = ("break_id", "break_class", "provider", "object_id", "case_id", "amount", "currency",
                  "provider_status", "failure_reason", "case_status", "ledger_delta", "object_created_at",
                  "state", "new_in_run")


LATE_EVENT_RUN = "late-event-"
"""The prefix of the incident run a late provider event is classified in."""


class RunConflict(Exception):
    """Another unfinished backfill holds the provider (ask it to finish, or resume it)."""


def _names(statuses: Iterable[StrEnum]) -> list[str]:
    return sorted(s.value for s in statuses)


def _object_id(listed: Listed) -> str:
    if isinstance(listed, ListedRefund):
        return listed.refund.refund_id
    return listed.payout.payout_id if isinstance(listed, ListedPayout) else listed.object_id


def _staged(listed: Listed) -> tuple[str, int, str, str, str, str | None, str | None]:
    """charge, amount, currency, status, raw status, failure reason, reference of a listed
    object, as the batch table stages them (a payout has no charge; its failure code)."""
    if isinstance(listed, ListedRefund):
        r = listed.refund
        return r.charge_id, r.amount, r.currency, r.status.value, r.raw_status, r.failure_reason, r.reference
    if isinstance(listed, ListedPayout):
        p = listed.payout
        return "", p.amount, p.currency, p.status.value, p.raw_status, p.failure_code, p.reference
    return "", listed.amount, listed.currency, UNMAPPED, listed.raw_status, listed.error, None


def truth_of(row: Mapping[str, Any]) -> ProviderRefund | ProviderPayout:
    """The provider's refund or payout as a stored break recorded it."""
    if row["object_kind"] == "payout":
        return ProviderPayout(
            provider=row["provider"], payout_id=row["object_id"], amount=int(row["amount"]),
            currency=row["currency"], status=ProviderPayoutStatus(row["provider_status"]),
            raw_status=row["raw_status"], failure_code=row["failure_reason"],
            reference=row["evidence"]["provider"].get("reference"))
    return ProviderRefund(
        provider=row["provider"], refund_id=row["object_id"], charge_id=row["charge_id"],
        amount=int(row["amount"]), currency=row["currency"],
        status=ProviderRefundStatus(row["provider_status"]), raw_status=row["raw_status"],
        failure_reason=row["failure_reason"], reference=row["evidence"]["provider"].get("reference"))


BOOKS = {ProviderRefundStatus.SUCCEEDED: LedgerKind.REFUND_SETTLED,
         ProviderRefundStatus.FAILED: LedgerKind.REFUND_REVERSED,
         ProviderRefundStatus.CANCELED: LedgerKind.REFUND_REVERSED}
"""What a case's workflow books for the provider's word: a compensation that books the same
word takes the workflow's key (see `_compensate`)."""


def _compensation_reference(row: Mapping[str, Any]) -> str:
    """The posting reference of a break's compensation: one per round of its exception case
    (a break raised again for what its first approval could not cover posts under its own
    key; a settlement retried in one round finds its entry)."""
    return f"reconciliation-{row['id']}" + (f"-{row['reopened']}" if row["reopened"] else "")



def behind_break(evidence: Mapping[str, Any]) -> tuple[str, ...]:
    """Who may not approve a break's compensation: whoever may not approve the refund (its
    requester and trigger identities; breaks found before identities were kept name the
    requester alone), and whoever reopened the break (undoing a colleague's decision)."""
    case = evidence.get("case") or {}
    people = [case["requester"]] if case.get("requester") else []
    return tuple(dict.fromkeys([*people, *(case.get("trigger_identities") or ()),
                                *(evidence.get("reopened_by") or ())]))


def break_case(row: Mapping[str, Any], timings: RefundTimings) -> BreakCase:
    """The exception workflow's input for a stored break."""
    case = row["evidence"].get("case") or {}
    held = case.get("provider_status")
    return BreakCase(
        break_id=int(row["id"]), break_class=BreakClass(row["break_class"]), provider=row["provider"],
        object_id=row["object_id"], chain=row["chain"], case_id=row["refund_request_id"],
        case_holds_refund=bool(case.get("holds_refund")),
        case_holds_no_refund=bool(case) and case.get("provider_refund_id") is None,
        case_provider_status=ProviderRefundStatus(held) if held else None, truth=truth_of(row),
        ledger_delta=None if row["ledger_delta"] is None else int(row["ledger_delta"]),
        conflicted=behind_break(row["evidence"]), timings=timings,
        reopened=int(row["reopened"]))


def run_view(row: RunRow) -> dict[str, Any]:
    """The public shape of a run: window, progress (the cursor's creation time moves from
    the window's end to its start) and state."""
    return {"run_id": row.id, "provider": row.provider, "kind": row.kind, "state": row.state,
            "window": {"since": row.window_start.isoformat(), "until": row.window_end.isoformat()},
            "requested_by": row.requested_by, "objects_seen": row.objects_seen,
            "batches": row.batches,
            "cursor_created": row.cursor_created.isoformat() if row.cursor_created else None,
            "started_at": row.started_at.isoformat(), "warnings": row.warnings,
            "failure": row.failure,
            "finished_at": row.finished_at.isoformat() if row.finished_at else None,
            "links": {"run": f"/v1/reconciliation/runs/{row.id}"}}


CASE_ROUTES = {"refund": "refund-requests", "payout": "payout-exceptions"}


def proposed_entry(row: BreakRow) -> dict[str, Any] | None:
    """The journal entry an approval books, for the approver to read beside the button: a
    payout's reversal (`_compensate_payout`), or the move that brings a refund's ledger to
    the provider (at most: it is the provider as it is then, never past the move found).
    None when it books none (a duplicate waits for ops, never for an approval)."""
    if row.object_kind == "payout":
        return ({"template": LedgerKind.PAYOUT_REVERSED.value, "amount": row.amount, "currency": row.currency}
                if row.break_class == BreakClass.PAYOUT_FAILED_SHOWN_PAID else None)
    move = None if row.break_class == BreakClass.DUPLICATE_REFUND else compensation(row.ledger_delta or 0)
    return None if move is None else {"template": move[0].value, "amount": move[1], "currency": row.currency}


def break_view(row: BreakRow) -> dict[str, Any]:
    """The public shape of a break, with links to its case and exception workflow."""
    case_id = row.refund_request_id
    return {
        "break_id": row.id, "break_class": row.break_class, "provider": row.provider,
        "object_id": row.object_id, "case_id": case_id, "amount": row.amount,
        "currency": row.currency, "provider_status": row.provider_status,
        "failure_reason": row.failure_reason, "case_status": row.case_status,
        "ledger_delta": row.ledger_delta, "entry": proposed_entry(row),
        "object_created_at": row.object_created_at.isoformat(),
        "state": row.state, "found_at": row.found_at.isoformat(), "evidence": row.evidence,
        "resolution": row.resolution,
        "object_kind": row.object_kind, "reopened": row.reopened,
        "links": {"break": f"/v1/reconciliation/breaks/{row.id}",
                  "case": f"/v1/{CASE_ROUTES[row.object_kind]}/{case_id}" if case_id else None,
                  "workflow": f"recon-break-{row.id}"},
    }


class ReconciliationRepository(Repository):
    """Runs, their breaks and how each break ended."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self._cases = CaseRepository(database)

    # -- runs -----------------------------------------------------------------------

    async def open_run(self, window: RunWindow, task_queue: str) -> dict[str, Any]:
        """Records the run once; a continued or retried workflow finds the row it made."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "INSERT INTO reconciliation_runs (id, provider, task_queue, kind, window_start, window_end,"
                " requested_by) VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (window.run_id, window.provider, task_queue, window.kind.value, window.since, window.until,
                 window.requested_by))
            row = await (await conn.execute("SELECT * FROM reconciliation_runs WHERE id = %s",
                                            (window.run_id,))).fetchone()
        if row is None:
            raise RunConflict(f"another backfill of {window.provider} is unfinished")
        return row

    async def open_backfill(self, provider: str, since: datetime, until: datetime, requested_by: str,
                            task_queue: str) -> tuple[RunRow, bool]:
        """A new backfill run, or the provider's unfinished one on this deployment (resumed:
        True), whose cursor says where it stopped."""
        run_id = f"reconcile-{provider}-backfill-{secrets.token_hex(6)}"
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO reconciliation_runs (id, provider, task_queue, kind, window_start, window_end,"
                " requested_by) VALUES (%s,%s,%s,'backfill',%s,%s,%s)"
                " ON CONFLICT (provider, task_queue) WHERE kind = 'backfill' AND state = 'running'"
                " DO NOTHING RETURNING *", (run_id, provider, task_queue, since, until, requested_by))
            created = await cur.fetchone()
            if created is not None:
                await AuditLog.append(conn, None, requested_by, "reconciliation_backfill_requested",
                                      {"run_id": run_id, "provider": provider, "since": since,
                                       "until": until})
                return RunRow.from_row(created), False
            cur = await conn.execute(
                "SELECT * FROM reconciliation_runs WHERE provider = %s AND task_queue = %s"
                " AND kind = 'backfill' AND state = 'running'", (provider, task_queue))
            existing = await cur.fetchone()
        assert existing is not None
        return RunRow.from_row(existing), True

    async def run(self, run_id: str) -> dict[str, Any] | None:
        return await self._db.fetch_one("SELECT * FROM reconciliation_runs WHERE id = %s",
                                        (run_id,))

    async def runs(self, limit: int = 50) -> list[RunRow]:
        rows = await self._db.fetch_all(
            "SELECT * FROM reconciliation_runs ORDER BY started_at DESC LIMIT %s", (limit,))
        return [RunRow.from_row(row) for row in rows]

    async def store_batch(self, run_id: str, provider: str, batch: Sequence[Listed],
                          options: ReconcileOptions, *, cursor: str | None, phase: Phase,
                          next_phase: Phase | None = None,
                          warning: str | None = None) -> list[dict[str, Any]]:
        """Classifies one batch of the phase's objects and moves the run's cursor past it
        (or, with `next_phase`, to the start of the next list), in one transaction, with any
        `warning` for the run's report (a list the provider refused); returns
        the breaks not seen before (each already audited and announced to ops). `cursor`
        and `phase` are where the batch was read: a run moved on by someone else fails."""
        run = await self.run(run_id)
        assert run is not None
        # judged as of now, not the window's end: a backfill of an old window judges what was
        # made in its last minutes (no later run lists it), and "stuck" is stuck today; the
        # window's end when later (a clock behind the database's)
        now = max(datetime.now(UTC), run["window_end"])
        unique = {_object_id(listed): listed for listed in batch}
        async with self._db.transaction() as conn:
            await conn.execute(STAGE)
            async with conn.cursor().copy(
                    "COPY recon_batch (object_id, charge_id, amount, currency, status, raw_status,"
                    " failure_reason, reference, created_at) FROM STDIN") as copy:
                for object_id, listed in unique.items():
                    await copy.write_row((object_id, *_staged(listed), listed.created))
            statement = CLASSIFY if phase is Phase.REFUNDS else CLASSIFY_PAYOUTS
            cur = await conn.execute(statement, {
                "provider": provider, "run_id": run_id, "account": REFUNDED_ACCOUNT,
                "judge_before": now - options.grace, "stuck_before": now - options.stuck_after,
                "shown_refunded": _names(SHOWN_REFUNDED), "shown_pending": _names(SHOWN_PENDING),
                "shown_failed": _names(SHOWN_FAILED), "non_terminal": _names(NON_TERMINAL_PROVIDER),
                "ledger_pending": CaseStatus.EXECUTED_LEDGER_PENDING.value,
                "in_review": CaseStatus.OPS_REVIEW.value,
                "no_refund": f"{NO_REFUND_PREFIX}%",
                "tracking_prefix": tracking_case_id(provider, ""), "unmapped": UNMAPPED,
                "payout_failed": _names(EXCEPTION_STATUSES), "paid": PayoutStatus.PAID.value,
                "payout_reversed": LedgerKind.PAYOUT_REVERSED.value,
                "raised_again": _names(RAISED_AGAIN), "look_again": list(LOOK_AGAIN),
                "case_ended": _names(ENDED_UNREVERSED),
                "case_prefix": payout_case_id(provider, "")})
            new = list(await cur.fetchall())
            for row in new:
                await self._announce(conn, row)
            last = batch[-1] if batch and next_phase is None else None
            moved_to = (None, None) if next_phase else (
                (_object_id(last), last.created) if last else (cursor, run["cursor_created"]))
            moved = await conn.execute(
                "UPDATE reconciliation_runs SET cursor = %s, cursor_created = %s, phase = %s,"
                " objects_seen = objects_seen + %s, batches = batches + 1, warnings = warnings || %s,"
                " updated_at = now() WHERE id = %s AND cursor IS NOT DISTINCT FROM %s AND phase = %s",
                (*moved_to, (next_phase or phase).value, len(unique), Jsonb([warning] if warning else []),
                 run_id, cursor, phase.value))
            if moved.rowcount != 1:
                raise RunConflict(f"run {run_id} moved past {phase}:{cursor} elsewhere: the batch is dropped")
        return new

    async def reconcile_event(self, provider: str, event_id: str, reported: ProviderRefund | ProviderPayout,
                              reported_at: datetime, requested_by: str) -> str:
        """Classifies one refund a provider reported after its case closed (failed or
        canceled, or a success the case cannot show), or that its running case cannot apply
        (a success for a refund it ended failed on ops' reading), or one payout's failure
        after its exception case ended (the books may still hold it paid), as a run would, in an
        `incident` run of its own (`late-event-<provider>-<event id>`); returns the run's id,
        whose breaks the caller dispatches. No grace: nothing
        follows a failure or a cancel, so it is not a webhook still in flight; and no age
        before a case shown pending is stuck: its workflow is gone, nothing else moves it. The
        event's time stands for the object's, which the event does not carry. A redelivery (or
        another relay classifying the same event at once) finds the run and its breaks."""
        run_id = f"{LATE_EVENT_RUN}{provider}-{event_id}"
        async with self._db.transaction() as conn:
            await open_incident_run(conn, run_id, provider, requested_by)
        run = await self.run(run_id)
        assert run is not None
        created = min(reported_at, run["window_end"] - timedelta(microseconds=1))
        listed, phase = ((ListedRefund(refund=reported, created=created), Phase.REFUNDS)
                         if isinstance(reported, ProviderRefund)
                         else (ListedPayout(payout=reported, created=created), Phase.PAYOUTS))
        options = ReconcileOptions(grace=timedelta(0), stuck_after=timedelta(0))
        cursor = run["cursor"]
        with suppress(RunConflict):  # classified by a concurrent call: its breaks stand
            if Phase(run["phase"]) is not phase:  # a run opens on refunds: a payout's moves on first
                await self.store_batch(run_id, provider, [], options, cursor=cursor,
                                       phase=Phase(run["phase"]), next_phase=phase)
                cursor = None
            await self.store_batch(run_id, provider, [listed], options, cursor=cursor, phase=phase)
        return run_id

    @staticmethod
    async def _announce(conn: Conn, row: dict[str, Any], *, notify: bool = True) -> None:
        """The break's audit row on its case's chain and (unless the case tells ops itself)
        its notice to ops."""
        detail = {"break_id": row["id"], "break_class": row["break_class"], "object_id": row["object_id"],
                  "run_id": row["first_run_id"], "ledger_delta": row["ledger_delta"],
                  "evidence": row["evidence"]}
        await AuditLog.append(conn, row["chain"], "reconciliation", "reconciliation_break_found", detail)
        if not notify:
            return
        await OutboxRepository.queue_in(conn, NoticeInput(
            refund_request_id=row["chain"], kind="reconciliation_break", audience="ops",
            dedup_key=f"reconciliation_break:{row['id']}{_round(row)}", detail=detail))

    async def undispatched(self, run_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """Breaks the run found or saw again whose exception workflow was not started yet
        (one raised again while its last round's case was ending waits for the next run)."""
        return await self._undispatched(sql.SQL(
            "id IN (SELECT break_id FROM reconciliation_run_breaks WHERE run_id = %s)"), (run_id,), limit)

    async def undispatched_of(self, provider: str, limit: int = 500) -> list[dict[str, Any]]:
        """The provider's breaks whose exception workflow never started, whatever found them:
        a late event's (Temporal away through every re-drive of the delivery), one raised
        again while its last round's case was ending (its object may lie outside every later
        run's window). A run's finish starts them."""
        return await self._undispatched(sql.SQL("provider = %s"), (provider,), limit)

    async def _undispatched(self, which: sql.SQL, params: tuple[str, ...],
                            limit: int) -> list[dict[str, Any]]:
        """Breaks `which` selects whose exception workflow was not started: new ones only (a
        break its case opened or settled never gets another, whatever its mark says)."""
        return await self._db.fetch_all(sql.SQL(
            "SELECT * FROM reconciliation_breaks WHERE {} AND dispatched_at IS NULL"
            " AND state = 'new' ORDER BY id LIMIT %s").format(which), (*params, limit))

    async def mark_dispatched(self, break_id: int) -> None:
        await self._db.execute("UPDATE reconciliation_breaks SET dispatched_at = now() WHERE id = %s",
                               (break_id,))

    async def finish(self, run_id: str, files: Sequence[str]) -> None:
        await self._db.execute(
            "UPDATE reconciliation_runs SET state = 'completed', finished_at = coalesce(finished_at,"
            " now()), report_files = %s, updated_at = now() WHERE id = %s",
            (Jsonb(list(files)), run_id))

    async def fail(self, run_id: str, reason: str) -> None:
        """A running run becomes `failed` with its reason (a completed one stays completed)."""
        await self._db.execute(
            "UPDATE reconciliation_runs SET state = 'failed', failure = %s, finished_at = now(),"
            " updated_at = now() WHERE id = %s AND state = 'running'", (reason, run_id))

    # -- reports --------------------------------------------------------------------

    async def report(self, run_id: str) -> dict[str, Any] | None:
        """Counts by class (new to this run, and seen again), amounts per currency, the
        oldest break, breaks by state."""
        run = await self.run(run_id)
        if run is None:
            return None
        async with self._db.transaction() as conn:
            rows = await (await conn.execute(
                "SELECT b.break_class, b.currency, count(*) AS seen,"
                " count(*) FILTER (WHERE b.first_run_id = %(run)s) AS new, sum(b.amount) AS amount,"
                " sum(b.ledger_delta) AS ledger_delta"
                " FROM reconciliation_run_breaks rb JOIN reconciliation_breaks b ON b.id = rb.break_id"
                " WHERE rb.run_id = %(run)s GROUP BY b.break_class, b.currency"
                " ORDER BY b.break_class, b.currency", {"run": run_id})).fetchall()
            states = await (await conn.execute(
                "SELECT b.state, count(*) AS n FROM reconciliation_run_breaks rb"
                " JOIN reconciliation_breaks b ON b.id = rb.break_id WHERE rb.run_id = %s"
                " GROUP BY b.state ORDER BY b.state", (run_id,))).fetchall()
            oldest = await (await conn.execute(
                "SELECT b.* FROM reconciliation_run_breaks rb JOIN reconciliation_breaks b"
                " ON b.id = rb.break_id WHERE rb.run_id = %s ORDER BY b.object_created_at, b.id LIMIT 1",
                (run_id,))).fetchone()
        classes: dict[str, dict[str, Any]] = {}
        for row in rows:
            entry = classes.setdefault(row["break_class"], {"new": 0, "seen": 0, "amounts": {},
                                                            "ledger_delta": {}})
            entry["new"] += row["new"]
            entry["seen"] += row["seen"]
            entry["amounts"][row["currency"]] = int(row["amount"])
            if row["ledger_delta"] is not None:
                entry["ledger_delta"][row["currency"]] = int(row["ledger_delta"])
        new = sum(c["new"] for c in classes.values())
        return {
            **run_view(RunRow.from_row(run)), "new_breaks": new,
            "known_breaks": sum(c["seen"] for c in classes.values()) - new,
            "classes": classes, "states": {r["state"]: r["n"] for r in states},
            "oldest_break": break_view(BreakRow.from_row(oldest)) if oldest else None,
            "report_files": run["report_files"],
        }

    async def run_breaks(self, run_id: str, limit: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every break the run saw, oldest object first, streamed from a server-side cursor."""
        async with self._db.transaction() as conn, conn.cursor(name="run_breaks") as cur:
            await cur.execute(
                "SELECT b.*, b.first_run_id = %(run)s AS new_in_run FROM reconciliation_run_breaks rb"
                " JOIN reconciliation_breaks b ON b.id = rb.break_id WHERE rb.run_id = %(run)s"
                " ORDER BY b.object_created_at, b.id LIMIT %(limit)s", {"run": run_id, "limit": limit})
            async for row in cur:
                yield row

    async def breaks(self, run_id: str, limit: int | None = None) -> AsyncIterator[RunBreakRow]:
        """`run_breaks` as typed rows, for the front ends (the report writer takes the columns)."""
        async for row in self.run_breaks(run_id, limit):
            yield RunBreakRow.from_row(row)

    async def waiting_breaks(self, limit: int) -> list[BreakRow]:
        """Breaks waiting for approval, longest waiting first, whatever run found them: the
        console's newest runs alone would hide the older ones from their approvers."""
        return [BreakRow.from_row(r) for r in await self._db.fetch_all(
            "SELECT * FROM reconciliation_breaks WHERE state = 'awaiting_approval'"
            " ORDER BY found_at, id LIMIT %s", (limit,))]

    async def get_break(self, break_id: int, *, settled_write: bool = False) -> BreakRow | None:
        """The break; `settled_write`: once a transaction writing it now (a reopen, which
        starts the break's next run before it commits) has ended, so that run reads its round."""
        row = await self._db.fetch_one(
            "SELECT * FROM reconciliation_breaks WHERE id = %s FOR SHARE" if settled_write
            else "SELECT * FROM reconciliation_breaks WHERE id = %s", (break_id,))
        return None if row is None else BreakRow.from_row(row)

    # -- the exception case -------------------------------------------------------------

    async def truth_for_its_case(self, found: BreakRow, at: datetime) -> ProviderEvent | None:
        """The provider event an approved refund break's case would take through its own
        lifecycle, judged by the case as it is now (`lifecycle_takes`); None when it would
        not (then the settlement decides). A refund unknown to us when found has the case
        its chain names if a webhook has opened its tracking case since: that case's
        workflow books the refund when its word comes, so it takes the approved word too."""
        if found.object_kind != "refund":
            return None
        case = await self._cases.get(found.refund_request_id or found.chain)
        truth = truth_of(found)
        if case is None or not lifecycle_takes(
                truth, case.refund_request_id, holds_refund=case.provider_refund_id == found.object_id,
                holds_no_refund=case.provider_refund_id is None,
                held_status=ProviderRefundStatus(case.provider_status) if case.provider_status else None):
            return None
        handed = break_case(found, RefundTimings()).model_copy(update={"case_id": case.refund_request_id})
        return truth_event(handed, at)

    async def open_exception(self, break_id: int, approval: BreakApproval) -> None:
        """The break now waits for people: audited on its chain, approvers told once."""
        async with self._db.transaction() as conn:
            row = await (await conn.execute(
                "UPDATE reconciliation_breaks SET state = 'awaiting_approval' WHERE id = %s"
                " AND state = 'new' RETURNING *", (break_id,))).fetchone()
            if row is None:  # a retried activity: already open
                return
            detail = {"break_id": break_id, "break_class": row["break_class"], "tier": approval.tier,
                      "requirements": [r.model_dump() for r in approval.requirements],
                      "proposed_ledger_delta": row["ledger_delta"], "currency": row["currency"]}
            await AuditLog.append(conn, row["chain"], "reconciliation", "reconciliation_exception_opened",
                                  detail)
            await OutboxRepository.queue_in(conn, NoticeInput(
                refund_request_id=row["chain"], kind="reconciliation_approval_needed",
                audience="approvers", dedup_key=f"reconciliation_approval:{break_id}{_round(row)}",
                detail=detail))

    async def settle(self, settlement: BreakSettlement, at_provider: str | None = None) -> BreakOutcome:
        """Ends the exception case once. Only an approved one touches money: it brings the
        case's ledger position to the provider's truth (as it is now, so two breaks of one
        refund never post twice) and sets the case's status, in one transaction.
        `at_provider`: an approved break's refund or payout status at the provider read just
        before (`not_found` when it holds none), None when it was not read."""
        break_id = settlement.break_id
        found = await self.get_break(break_id)
        assert found is not None
        checked = settlement.state is BreakState.RESOLVED and found.object_kind == "refund"
        # a retried attempt (the break has its resolution) or an earlier round's adopts nothing:
        # the transaction below answers what was decided, and a moved refund was never adopted
        current = found.resolution is None and settlement.round in (None, found.reopened)
        if (checked and current and found.refund_request_id is None
                and provider_moved(found, at_provider) is None):
            async with self._db.connection() as conn:  # adopted only for a settlement that stands
                overtaken = await self._overtaken_by(conn, found)
                unmet = None if overtaken else await self._approval_unmet(conn, found, settlement)
                revoked = None if overtaken or unmet else await self._approval_revoked(
                    conn, found, settlement)
            if overtaken is None and unmet is None and revoked is None:
                await self._adopt(found)
        async with self._db.transaction() as conn:
            row = await (await conn.execute("SELECT * FROM reconciliation_breaks WHERE id = %s FOR UPDATE",
                                            (break_id,))).fetchone()
            assert row is not None
            if row["resolution"] is not None:  # a retried activity
                return BreakOutcome.model_validate(row["resolution"]["outcome"])
            if settlement.round not in (None, row["reopened"]):
                return await self._of_an_earlier_round(conn, row, settlement)
            outcome = BreakOutcome(break_id=break_id, state=settlement.state)
            overtaken = await self._overtaken_by(conn, row) if checked else None
            case = await (await conn.execute(
                "SELECT status, provider_status, provider_refund_id, currency FROM refund_cases"
                " WHERE refund_request_id = %s FOR UPDATE", (row["chain"],))).fetchone() if checked else None
            moved = _case_moved(row, case) if overtaken is None else None
            moved_at_provider = provider_moved(row, at_provider) if (
                settlement.state is BreakState.RESOLVED) else None
            other_money = _other_currency(row, case)
            unmet, revoked = (await self._approval_unmet(conn, row, settlement),
                              await self._approval_revoked(conn, row, settlement)) if (
                settlement.state is BreakState.RESOLVED) else (None, None)
            if any(found is not None for found in (overtaken, moved, moved_at_provider, other_money, unmet,
                                                   revoked)):
                outcome = BreakOutcome(break_id=break_id, state=BreakState.OPS_REVIEW)
            elif settlement.state is BreakState.RESOLVED:
                compensate = self._compensate_payout if row["object_kind"] == "payout" else self._compensate
                outcome = await compensate(conn, row, settlement)
            resolution = {**settlement.model_dump(mode="json"), "outcome": outcome.model_dump(mode="json"),
                          **({"overtaken_by": overtaken} if overtaken else {}),
                          **({"case_moved": moved} if moved else {}),
                          **({"provider_moved": moved_at_provider} if moved_at_provider else {}),
                          **({"currency_differs": other_money} if other_money else {}),
                          **({"approval_unmet": unmet} if unmet else {}),
                          **({"approval_revoked": revoked} if revoked else {})}
            later = {"later_break_id": overtaken["break_id"], "later_break_class": overtaken["break_class"],
                     "provider_status": overtaken["provider_status"]} if overtaken else None
            for kind, change in (("reconciliation_break_overtaken", later),
                                 ("reconciliation_break_case_moved", moved),
                                 ("reconciliation_break_provider_moved", moved_at_provider),
                                 ("reconciliation_break_currency_differs", other_money),
                                 ("reconciliation_break_approval_unmet", unmet),
                                 ("reconciliation_break_approval_revoked", revoked)):
                if change is not None:
                    await OutboxRepository.queue_in(conn, NoticeInput(
                        refund_request_id=row["chain"], kind=kind, audience="ops",
                        dedup_key=f"{kind}:{break_id}{_round(row)}",
                        detail={"break_id": break_id, "break_class": row["break_class"],
                                "approvers": list(settlement.approvers), **change}))
            await conn.execute(
                "UPDATE reconciliation_breaks SET state = %s, resolved_at = now(), resolution = %s,"
                " refund_request_id = coalesce(refund_request_id, %s) WHERE id = %s",
                (outcome.state.value, Jsonb(resolution),
                 row["chain"] if outcome.state is BreakState.RESOLVED else None, break_id))
            action = f"reconciliation_break_{outcome.state}"
            await AuditLog.append(conn, row["chain"], "reconciliation", action,
                                  {"break_id": break_id, **resolution})
            return outcome

    @staticmethod
    async def _approval_unmet(conn: Conn, row: Mapping[str, Any],
                              settlement: BreakSettlement) -> dict[str, Any] | None:
        """Why the approvals a settlement names do not meet the break as stored, or None.
        The round checks them against its run's input; a run started again in Temporal
        with other terms (nobody barred, a smaller delta's tier) let the refund's requester
        approve its compensation alone. Read here from the break's row and trail: nobody
        behind it approved, and the grants of this round (since its exception opened), one
        per person (a run started again takes the same approval twice), fill the
        requirements it opened with."""
        behind = [person for person in settlement.approvers if person in behind_break(row["evidence"])]
        opened, grants = await ReconciliationRepository._round_grants(conn, row, settlement)
        missing: list[str] = []
        if opened is not None:
            latest = {g["actor"]: frozenset(g["detail"].get("roles") or ()) for g in grants  # one per person
                      if g["actor"] not in behind}
            granted = list(latest.items())
            missing = unfilled(tuple(RoleRequirement.model_validate(r)
                                     for r in opened["detail"].get("requirements", [])), granted)
        if not behind and not missing:
            return None
        return {"behind_the_break": behind, "missing_roles": missing}

    @staticmethod
    async def _approval_revoked(conn: Conn, row: Mapping[str, Any],
                                settlement: BreakSettlement) -> dict[str, Any] | None:
        """Who of the settlement's approvers gave their grant with a token revoked since (as
        of its seal, as a refund's money gate judges), or None: the round counted it and
        cannot hear of a revocation, so the compensation was posted on a stolen token's or a
        departed person's word (reproduced: breaks alone did not ask)."""
        _, grants = await ReconciliationRepository._round_grants(conn, row, settlement)
        revoked = await AccessRepository.revoked_since_given(conn, [
            (g["actor"], datetime.fromisoformat(g["detail"]["sealed_at"]) if g["detail"].get("sealed_at")
             else g["occurred_at"]) for g in grants])
        return {"revoked": revoked} if revoked else None

    @staticmethod
    async def _round_grants(conn: Conn, row: Mapping[str, Any], settlement: BreakSettlement
                            ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The break's latest exception opening and the grants since it by the settlement's
        approvers (none when it never opened)."""
        opened = await (await conn.execute(
            "SELECT seq, detail FROM audit_events WHERE chain = %s"
            " AND action = 'reconciliation_exception_opened' AND detail->>'break_id' = %s"
            " ORDER BY seq DESC LIMIT 1", (row["chain"], str(row["id"])))).fetchone()
        if opened is None:
            return None, []
        grants = await (await conn.execute(
            "SELECT actor, detail, occurred_at FROM audit_events WHERE chain = %s AND seq > %s"
            " AND action = ANY(%s) AND detail->>'break_id' = %s AND actor = ANY(%s) ORDER BY seq",
            (row["chain"], opened["seq"], list(BREAK_GRANTS), str(row["id"]),
             list(settlement.approvers)))).fetchall()
        return opened, list(grants)

    @staticmethod
    async def _of_an_earlier_round(conn: Conn, row: Mapping[str, Any],
                                   settlement: BreakSettlement) -> BreakOutcome:
        """A settlement of a round the break has left: an attempt retried after the next run
        raised the break again. Its round settled once already; the new one waits for its
        own approval, never this one's. A new round that found this case still ending (its
        dispatch attached to it) is started again by the next run's dispatch."""
        await conn.execute("UPDATE reconciliation_breaks SET dispatched_at = NULL WHERE id = %s"
                           " AND state = 'new'", (row["id"],))
        await AuditLog.append(
            conn, row["chain"], "reconciliation", "reconciliation_settlement_of_an_earlier_round",
            {"break_id": row["id"], "round": settlement.round, "break_round": row["reopened"],
             "state": settlement.state.value, "approvers": list(settlement.approvers)})
        return BreakOutcome(break_id=row["id"], state=settlement.state)

    @staticmethod
    async def _overtaken_by(conn: Conn, row: Mapping[str, Any] | BreakRow) -> dict[str, Any] | None:
        """A later break about the same provider refund that reports another status: the
        provider changed its word while this one waited for approval, so what was approved
        is not what the provider says now (the later break decides; this one goes to ops)."""
        later = await (await conn.execute(
            "SELECT id, break_class, provider_status FROM reconciliation_breaks WHERE provider = %s"
            " AND object_kind = 'refund' AND object_id = %s AND id > %s AND provider_status <> %s"
            " ORDER BY id DESC LIMIT 1",
            (row["provider"], row["object_id"], row["id"], row["provider_status"]))).fetchone()
        return None if later is None else {"break_id": later["id"], "break_class": later["break_class"],
                                           "provider_status": later["provider_status"]}

    async def _adopt(self, row: Mapping[str, Any]) -> None:
        """A refund unknown to us becomes a tracking case (holding its amount against the
        charge), so the approved entry has a case to land on."""
        truth = truth_of(row)
        assert isinstance(truth, ProviderRefund), "only a refund is adopted"
        await self._cases.open_tracking(row["chain"], truth, None, "reconciliation")

    @staticmethod
    async def _compensate(conn: Conn, row: dict[str, Any], settlement: BreakSettlement) -> BreakOutcome:
        case_id = row["chain"]
        case = await (await conn.execute("SELECT * FROM refund_cases WHERE refund_request_id = %s FOR UPDATE",
                                         (case_id,))).fetchone()
        assert case is not None
        truth = truth_of(row)
        assert isinstance(truth, ProviderRefund)
        # whether the case's workflow booked the provider's word, asked before the ledger is
        # read: its entry committing in between is then in what is read (asked after, it was
        # found booked and this one posted beside it under a reference: the word booked twice)
        words_kind = BOOKS.get(truth.status)
        booked = words_kind is not None and await LedgerRepository.posted_in(
            conn, LedgerInput.key_of(case_id, words_kind))
        net = await (await conn.execute(
            "SELECT coalesce(sum(li.debit - li.credit), 0) AS net FROM ledger_entries e"
            " JOIN ledger_lines li ON li.entry_id = e.id WHERE e.refund_request_id = %s AND li.account = %s",
            (case_id, REFUNDED_ACCOUNT))).fetchone()
        assert net is not None
        move = compensation(expected_net(truth) - int(net["net"]))  # in the case's currency (settle)
        posting_key, limits = None, {}
        if move is not None:
            kind, amount = move
            # the tier approved the move found; the ledger may have moved since: never more
            # than that (what is left is the next run's break, for its own tier)
            approved = amount_at_stake(row["ledger_delta"], int(row["amount"]))
            if amount > approved:
                limits = {"needed": amount, "approved": approved}
                amount = approved
            entry = LedgerInput(refund_request_id=case_id, kind=kind, amount=amount,
                                currency=case["currency"], provider_refund_id=truth.refund_id)
            if kind is not words_kind or booked:
                entry = entry.model_copy(update={"reference": _compensation_reference(row)})
            # else it books the provider's word as the case's workflow would (the case's first
            # entry of that template, under the key the workflow books it by): a workflow that
            # hears the same word later (a tracking case a webhook started while this settled)
            # finds it booked, never books it beside this one. Any other move (a doubled
            # booking undone) is no word of the provider's: its own key, so a later word the
            # workflow books (a late failure's reversal) is booked
            posted = await LedgerRepository.post_in(conn, entry)
            posting_key = posted.posting_key
        status = corrected_status(BreakClass(row["break_class"]), truth.status)
        if status is not None:
            await conn.execute(
                "UPDATE refund_cases SET status = %s, provider_status = %s, failure_reason = %s,"
                # a refund that moved or may move money holds the case's amount (as the case's
                # own workflow holds it again for a refund heard after a release)
                " reserved_amount = CASE WHEN %s IN ('failed', 'canceled') THEN 0 ELSE amount END,"
                " updated_at = now(),"
                # a case that held no refund (none, or an ops "no refund") now holds the provider's
                " provider_refund_id = CASE WHEN provider_refund_id IS NULL OR provider_refund_id LIKE %s"
                " THEN %s ELSE provider_refund_id END,"
                # what its workflow applied no longer says where the case stands: forgotten, so
                # the relay takes every later word as news (a reversal of the refund just booked
                # repeated what the workflow had applied, "failed", and was dropped unheard)
                " applied_refund_id = NULL, applied_status = NULL WHERE refund_request_id = %s",
                (status.value, truth.status.value, truth.failure_reason, truth.status.value,
                 f"{NO_REFUND_PREFIX}%", truth.refund_id, case_id))
        await _compensated(conn, row, settlement, posting_key, status=status.value if status else None,
                           ledger_net_before=int(net["net"]), provider_status=truth.status.value, **limits)
        return BreakOutcome(break_id=row["id"], state=BreakState.RESOLVED, posting_key=posting_key,
                            case_status=status)


    @staticmethod
    async def _compensate_payout(conn: Conn, row: dict[str, Any],
                                 settlement: BreakSettlement) -> BreakOutcome:
        """An approved payout break whose exception case had already ended: the payout's
        reversal entry and its final status, as the case's runbook would have left them,
        fenced by the payout row (a payout no longer paid posts nothing)."""
        payout = await (await conn.execute(
            "SELECT * FROM payouts WHERE provider = %s AND provider_payout_id = %s FOR UPDATE",
            (row["provider"], row["object_id"]))).fetchone()
        assert payout is not None
        posting_key = None
        final = final_status(ProviderPayoutStatus(row["provider_status"]))
        if payout["status"] == PayoutStatus.PAID:
            posted = await LedgerRepository.post_in(conn, LedgerInput(
                refund_request_id=row["chain"], kind=LedgerKind.PAYOUT_REVERSED, amount=int(payout["amount"]),
                currency=payout["currency"], provider_refund_id=row["object_id"],
                reference=f"reconciliation-{row['id']}"))
            posting_key = posted.posting_key
            await conn.execute("UPDATE payouts SET status = %s, updated_at = now() WHERE id = %s",
                               (final.value, payout["id"]))
        await _compensated(conn, row, settlement, posting_key, payout_status=final.value,
                           payout_status_before=payout["status"], provider_status=row["provider_status"])
        return BreakOutcome(break_id=row["id"], state=BreakState.RESOLVED, posting_key=posting_key)

    # -- incidents a case raises ----------------------------------------------------------

    async def refund_broken_elsewhere(self, provider: str, refund_id: str, chain: str) -> str | None:
        """The case (chain) whose break names the provider's refund `refund_id`, in any letter
        case, other than `chain`'s: a duplicate of that case's refund, or one no case made
        (the tracking case it would open). None when no other break names it."""
        row = await self._db.fetch_one(
            "SELECT chain FROM reconciliation_breaks WHERE provider = %s AND object_kind = 'refund'"
            " AND upper(object_id) = upper(%s) AND chain <> %s ORDER BY id LIMIT 1",
            (provider, refund_id, chain))
        return str(row["chain"]) if row else None

    async def open_duplicate_refund_break(self, inp: DuplicateRefundInput) -> dict[str, Any] | None:
        """Records the duplicate as a `duplicate_refund` break in `ops_review` on the case's
        chain, found by an `incident` run; None when it was recorded already (a retry, or the
        same refund reported again)."""
        refund = inp.duplicate
        run_id = f"incident-{refund.provider}-{refund.refund_id}"
        evidence = {"provider": {**refund.model_dump(mode="json")},
                    "case": {"id": inp.case_id, "followed_refund_id": inp.followed_refund_id},
                    "source": inp.source}
        # What the ledger lacks once the duplicate settled; unknown while it is not final.
        delta = refund.amount if refund.status is ProviderRefundStatus.SUCCEEDED else None
        async with self._db.transaction() as conn:
            await open_incident_run(conn, run_id, refund.provider, f"workflow:{inp.case_id}")
            cur = await conn.execute(
                "INSERT INTO reconciliation_breaks (provider, object_id, break_class, refund_request_id,"
                " chain, charge_id, amount, currency, provider_status, raw_status, failure_reason,"
                " case_status, ledger_delta, object_created_at, evidence, first_run_id, state,"
                " dispatched_at)"
                " SELECT %s,%s,%s,c.refund_request_id,c.refund_request_id,%s,%s,%s,%s,%s,%s,c.status,%s,"
                " now(),%s,%s,%s, now() FROM refund_cases c WHERE c.refund_request_id = %s"
                " ON CONFLICT (provider, object_id, break_class) DO NOTHING RETURNING *",
                (refund.provider, refund.refund_id, BreakClass.DUPLICATE_REFUND.value, refund.charge_id,
                 refund.amount, refund.currency, refund.status.value, refund.raw_status,
                 refund.failure_reason, delta, jsonb(evidence), run_id, BreakState.OPS_REVIEW.value,
                 inp.case_id))
            row = await cur.fetchone()
            if row is None:
                return None
            await conn.execute("INSERT INTO reconciliation_run_breaks (run_id, break_id) VALUES (%s,%s)",
                               (run_id, row["id"]))
            # the case's own `duplicate_provider_refund` notice is ops' one incident (a second
            # notice filed a second ticket in each system for the same money)
            await self._announce(conn, row, notify=False)
            return dict(row)

    # -- reopening ------------------------------------------------------------------------

    async def reopen(self, break_id: int, actor: str, reason: str, seen_round: int,
                     start: Callable[[BreakRow], Awaitable[None]]) -> BreakRow:
        """Sends a dismissed or expired break back to its exception case (the same break and
        case id, `reopened` counted, the case's trigger identities read again), audited with
        the decision it undoes; `start` starts that case inside the transaction, so a start
        that fails reopens nothing (a break `new` with no case would refuse every later
        reopen). Raises LookupError for no such break, NotReopenable when it is in another
        state or its round is not `seen_round` (the decision its reader saw was reopened and
        decided again since), and what `start` raises."""
        async with self._db.transaction() as conn:
            row = await (await conn.execute("SELECT * FROM reconciliation_breaks WHERE id = %s FOR UPDATE",
                                            (break_id,))).fetchone()
            if row is None:
                raise LookupError(f"no reconciliation break {break_id}")
            if row["state"] not in REOPENABLE:
                raise NotReopenable(f"break is {row['state']}; only dismissed or expired breaks reopen")
            if row["reopened"] != seen_round:
                raise NotReopenable(f"the break was reopened and decided again since (round {seen_round}, "
                                    f"now {row['reopened']}): reload it and look at that decision")
            # who is behind the case is read again (a break found before its trigger
            # identities were kept would otherwise bar the requester alone), and whoever
            # reopens it is behind it from now on
            reopened = await (await conn.execute(
                "UPDATE reconciliation_breaks b SET state = 'new', reopened = reopened + 1,"
                " resolution = NULL, resolved_at = NULL,"
                " evidence = jsonb_set(CASE WHEN jsonb_typeof(b.evidence->'case') = 'object'"
                " THEN jsonb_set(b.evidence, '{case,trigger_identities}', coalesce((SELECT"
                " to_jsonb(c.trigger_identities) FROM refund_cases c WHERE c.refund_request_id ="
                " b.refund_request_id), '[]'::jsonb)) ELSE b.evidence END, '{reopened_by}',"
                " coalesce(b.evidence->'reopened_by', '[]'::jsonb) || to_jsonb(%s::text))"
                " WHERE id = %s RETURNING *", (actor, break_id))).fetchone()
            assert reopened is not None
            opened = BreakRow.from_row(reopened)
            await start(opened)  # before the audit row: the case chain's head is not held across it
            await AuditLog.append(conn, row["chain"], actor, "reconciliation_break_reopened", {
                "break_id": break_id, "reason": reason, "reopened": reopened["reopened"],
                "previous_state": row["state"], "previous_resolution": row["resolution"]})
            return opened


def _case_moved(row: Mapping[str, Any], case: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The case's own workflow applied another provider status since the break was found
    (neither the one the break found it holding nor the break's), or the case holds another
    refund than it did then (nor the break's): the approval was given
    for a case that is no longer there, and settled against the case as it is now it
    would undo what the workflow applied (a stuck refund's success reversed). People look
    again; nothing moves. `case`: the break's case as the settlement locked it."""
    found = row["evidence"].get("case") or {}
    if not found or row["refund_request_id"] is None or case is None:
        return None
    # or it came to hold another refund (another break's approval, its own lookup): settled
    # against its ledger, the break would count that refund's entry as this one's
    held_then = found.get("provider_refund_id")
    other_refund = ("provider_refund_id" in found and case["provider_refund_id"] != held_then
                    and case["provider_refund_id"] != row["object_id"])
    if not other_refund and case["provider_status"] in (found.get("provider_status"), row["provider_status"]):
        return None
    return {"provider_status": case["provider_status"], "status": case["status"],
            "found_provider_status": found.get("provider_status"),
            "provider_refund_id": case["provider_refund_id"], "found_provider_refund_id": held_then}


def _other_currency(row: Mapping[str, Any], case: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A refund the provider holds in another currency than its case: the ledger books in
    the case's currency and cannot follow it, and taking the provider's status would mark
    the case refunded with nothing booked (no ledger break is raised while the currency
    break is open). People fix the cause; nothing moves, whichever of its breaks is approved."""
    if case is None or case["currency"] == row["currency"]:
        return None
    return {"case_currency": case["currency"], "provider_currency": row["currency"]}


class NotReopenable(Exception):
    """Only a break that ended without moving money (dismissed, expired) can be reopened."""


def provider_moved(row: Mapping[str, Any], at_provider: str | None) -> dict[str, Any] | None:
    """An approved break whose object the provider no longer shows as found: a refund in
    another status (failed after all, succeeded since, gone), a payout no longer failed,
    canceled or reversed (a bank's late correction to paid). What was approved is not
    what the provider says now: people look again; nothing moves."""
    if at_provider is None:
        return None
    if row["object_kind"] == "payout" and at_provider in _names(EXCEPTION_STATUSES):
        return None
    if row["object_kind"] != "payout" and at_provider == row["provider_status"]:
        return None
    return {"provider_status": at_provider, "found_provider_status": row["provider_status"]}


def _round(row: dict[str, Any]) -> str:
    """Suffix of a break's per-round dedup keys: empty for the first round, so keys written
    before breaks could reopen stay the same."""
    return f":reopen-{row['reopened']}" if row["reopened"] else ""


async def _compensated(conn: Conn, row: dict[str, Any], settlement: BreakSettlement, posting_key: str | None,
                       **detail: Any) -> None:
    """The compensation's audit row on the break's chain: who approved, what posted."""
    await AuditLog.append(conn, row["chain"], "reconciliation", "reconciliation_compensated",
                          {"break_id": row["id"], "approvers": list(settlement.approvers),
                           "posting_key": posting_key, **detail})
