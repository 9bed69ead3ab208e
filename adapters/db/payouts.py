"""Payouts: internal payouts, payout exception cases, beneficiary holds, and the case's
runbook steps (hold, compensating entry, ticket, reissue). Every row lands in the same
transaction as the audit row that describes it, through the audit log, ledger and outbox
writers.
"""

from collections.abc import Collection
from datetime import datetime
from typing import Any, Literal

from psycopg import sql
from psycopg.types.json import Jsonb

from adapters.db.access import AccessRepository
from adapters.db.audit import AuditLog
from adapters.db.database import Conn, Repository, jsonb
from adapters.db.ledger import LedgerRepository
from adapters.db.outbox import OutboxRepository
from adapters.db.rows import HoldRow, PayoutCaseRow, PayoutListRow
from adapters.db.steps import once
from adapters.db.sweep import idle_unswept, mark_end_seen, open_incident_run
from domain.audit import APPROVAL_REQUESTED, canonical_detail
from domain.integrations import TICKETING_AUDIENCE, ticket_purpose
from domain.models import CaseWritten, LedgerInput, LedgerKind, LedgerResult, NoticeInput
from domain.money import format_minor
from domain.payouts import (
    OPEN_STATUSES,
    PAID_AFTER_FAILURE,
    PAID_REPORT_FIELDS,
    WITHOUT_OPEN_CASE,
    Admission,
    AdmitResult,
    HoldResult,
    PayoutCaseEventInput,
    PayoutCaseStatus,
    PayoutEvent,
    PayoutRegistration,
    PayoutSnapshot,
    PayoutStatus,
    ProviderPayout,
    ProviderPayoutStatus,
    ReleaseResult,
    admit,
    left_open,
    paid_report_notice,
    payout_case_id,
)
from domain.reconciliation import BreakClass

TICKET_KIND = "payout_exception_ticket"
"""The notice kind that opens and updates a payout case's ticket."""


async def _open_payout_break(conn: Conn, *, provider: str, case_id: str, run_id: str,
                             break_class: BreakClass, amount: int, currency: str, reported_status: str,
                             failure_code: str | None, case_status: str, created_at: datetime,
                             evidence: dict[str, Any]) -> int | None:
    """A payout case's break for ops (`ops_review`, never dispatched to a workflow), found
    by the incident run `run_id`; its id, or None when the case has one of that class."""
    opened = await (await conn.execute(
        "INSERT INTO reconciliation_breaks (provider, object_kind, object_id, break_class,"
        " refund_request_id, chain, charge_id, amount, currency, provider_status, raw_status,"
        " failure_reason, case_status, object_created_at, evidence, first_run_id, state)"
        " VALUES (%s,'payout',%s,%s,%s,%s,'',%s,%s,%s,%s,%s,%s,%s,%s,%s,'ops_review')"
        " ON CONFLICT DO NOTHING RETURNING id",
        (provider, case_id, break_class.value, case_id, case_id, amount, currency, reported_status,
         reported_status, failure_code, case_status, created_at, jsonb(evidence), run_id))).fetchone()
    return int(opened["id"]) if opened else None


async def _reroute_events_before_booking(conn: Conn, provider: str, case_id: str) -> None:
    """The events that found no payout before it was booked (`payout_unknown` on the chain
    its case would have) are unprocessed, in the booking's transaction, so the relay's
    re-drive routes them whoever booked it (a registration's caller routes them at once):
    a failure heard first would otherwise be lost."""
    await conn.execute(
        "UPDATE webhook_receipts SET processed_at = NULL, redrive_attempts = 0"
        " WHERE provider = %s AND verdict = 'accepted' AND workflow_id IS NULL"
        " AND event_id IN (SELECT detail->>'event_id' FROM audit_events"
        " WHERE chain = %s AND action = 'payout_unknown')", (provider, case_id))


async def _end_beneficiary_holds(conn: Conn, case_id: str) -> list[str]:
    """Ends the case's active beneficiary holds (a rollback, a reissue, an ops release): the
    beneficiaries they held."""
    cur = await conn.execute("UPDATE beneficiary_holds SET released_at = now()"
                             " WHERE case_id = %s AND released_at IS NULL RETURNING beneficiary_id",
                             (case_id,))
    return [str(r["beneficiary_id"]) for r in await cur.fetchall()]


class HoldReleased(RuntimeError):
    """The hold this posting depends on was rolled back: the compensating entry must not land."""


class ApprovalRevoked(RuntimeError):
    """An approval of the reversal was given with a token revoked since: the entry must not land."""


def snapshot(row: dict[str, Any]) -> PayoutSnapshot:
    return PayoutSnapshot(
        id=row["id"], provider=row["provider"], provider_payout_id=row["provider_payout_id"],
        beneficiary_id=row["beneficiary_id"], amount=int(row["amount"]), currency=row["currency"],
        status=row["status"], held_from_status=row["held_from_status"], reissue_of=row["reissue_of"])


ADMISSION_ACTIONS = {
    Admission.OPEN: "payout_exception_opened",
    Admission.JOIN: "payout_event_joined",
    Admission.ALREADY_HANDLED: "payout_already_handled",
    Admission.STALE: "payout_status_stale_ignored",
    Admission.SAME: "payout_status_unchanged",
    Admission.MISMATCH: "payout_amount_mismatch",
}


FAILURES_TAKEN = (ADMISSION_ACTIONS[Admission.OPEN], ADMISSION_ACTIONS[Admission.JOIN])
"""A case's rows of a failure or return it took (its opening, a joined event)."""


class PayoutRepository(Repository):
    """Payouts, payout cases and beneficiary holds, fenced by the case row's lock."""

    async def record_payout(self, payout: PayoutSnapshot) -> bool:
        """What the internal payments system writes when it pays out; once per id."""
        async with self._db.transaction() as conn:
            return await self._insert_payout(conn, payout)

    async def register_payout(self, registration: PayoutRegistration,
                              actor: str) -> tuple[PayoutSnapshot | None, bool]:
        """Books a registered payout once, with its audit row on the case chain its failure
        would open (so the case's timeline starts with it). Returns the booked payout (None
        when the id or the provider's payout id is already booked with other data) and
        whether this call booked it (False: the same registration again, a no-op). The
        events that found no payout before (`payout_unknown` on that chain) are unprocessed
        in the same transaction: if the relay dies before it routes them, its re-drive does."""
        payout = registration.snapshot()
        case_id = payout_case_id(payout.provider, payout.provider_payout_id)
        async with self._db.transaction() as conn:
            if await self._insert_payout(conn, payout):
                await AuditLog.append(conn, case_id, actor, "payout_registered",
                                      registration.model_dump(mode="json"))
                await _reroute_events_before_booking(conn, payout.provider, case_id)
                return payout, True
        booked = (await self.payout(payout.id)
                  or await self.payout_at_provider(payout.provider, payout.provider_payout_id))
        return (booked if booked is not None and registration.matches(booked) else None), False

    async def payouts(self, limit: int) -> list[PayoutSnapshot]:
        """The most recently booked payouts, newest first."""
        rows = await self._db.fetch_all(
            "SELECT * FROM payouts ORDER BY created_at DESC, id LIMIT %s", (limit,))
        return [snapshot(row) for row in rows]

    @staticmethod
    async def _insert_payout(conn: Conn, payout: PayoutSnapshot) -> bool:
        cur = await conn.execute(
            "INSERT INTO payouts (id, provider, provider_payout_id, beneficiary_id, amount,"
            " currency, status, held_from_status, reissue_of) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            " ON CONFLICT DO NOTHING RETURNING id",
            (payout.id, payout.provider, payout.provider_payout_id, payout.beneficiary_id,
             payout.amount, payout.currency, payout.status.value,
             payout.held_from_status.value if payout.held_from_status else None, payout.reissue_of))
        return await cur.fetchone() is not None

    async def payout(self, payout_id: str) -> PayoutSnapshot | None:
        row = await self._db.fetch_one("SELECT * FROM payouts WHERE id = %s", (payout_id,))
        return snapshot(row) if row else None

    async def lineage(self, payout: PayoutSnapshot) -> list[PayoutSnapshot]:
        """The payout and every one it reissued in turn, newest first: one debt (any of them
        paid after all, and a reissue pays it twice; whoever registered any of them chose
        the beneficiary a reissue pays)."""
        chain = [payout]
        while chain[-1].reissue_of is not None:
            earlier = await self.payout(chain[-1].reissue_of)
            if earlier is None or earlier in chain:
                break
            chain.append(earlier)
        return chain

    async def registered_in_lineage(self, payout: PayoutSnapshot, user: str) -> str | None:
        """A payout of `payout`'s lineage that `user` registered (its id), if any: the
        registration names the beneficiary a reissue pays, so its registrar neither asks for
        nor approves paying them again."""
        for replaced in await self.lineage(payout):
            chain = payout_case_id(replaced.provider, replaced.provider_payout_id)
            if await self._db.fetch_one("SELECT 1 FROM audit_events WHERE chain = %s AND actor = %s"
                                        " AND action = 'payout_registered' LIMIT 1", (chain, user)):
                return replaced.id
        return None

    async def payout_at_provider(self, provider: str, provider_payout_id: str) -> PayoutSnapshot | None:
        row = await self._db.fetch_one(
            "SELECT * FROM payouts WHERE provider = %s AND provider_payout_id = %s",
            (provider, provider_payout_id))
        return snapshot(row) if row else None

    async def case(self, case_id: str) -> PayoutCaseRow | None:
        row = await self._db.fetch_one("SELECT * FROM payout_cases WHERE case_id = %s", (case_id,))
        return PayoutCaseRow.from_row(row) if row else None

    async def cases(self, limit: int, status: str | None = None) -> list[PayoutListRow]:
        """Payout exception cases with their payout, most recently updated first."""
        rows = await self._db.fetch_all(
            "SELECT c.case_id, c.status, c.reported_status, c.failure_code, c.ticket_ref,"
            " c.decision->'decision'->>'tier' AS tier, c.created_at, c.updated_at, p.id AS payout_id,"
            " p.provider, p.provider_payout_id, p.beneficiary_id, p.amount, p.currency,"
            " p.status AS payout_status FROM payout_cases c JOIN payouts p ON p.id = c.payout_id"
            " WHERE %(status)s::text IS NULL OR c.status = %(status)s"
            " ORDER BY c.updated_at DESC, c.case_id LIMIT %(limit)s", {"status": status, "limit": limit})
        return [PayoutListRow.from_row(row) for row in rows]

    async def beneficiary_holds(self, beneficiary_id: str) -> list[HoldRow]:
        """Every hold on the beneficiary, active ones with `released_at` None."""
        rows = await self._db.fetch_all(
            "SELECT case_id, placed_at, released_at FROM beneficiary_holds"
            " WHERE beneficiary_id = %s ORDER BY placed_at", (beneficiary_id,))
        return [HoldRow.from_row(row) for row in rows]

    # -- the case ---------------------------------------------------------------------

    async def admit(self, case_id: str, event: PayoutEvent, *, case_open: bool) -> AdmitResult:
        """The internal-state gate for one event: reads the payout under lock, applies
        `domain.payouts.admit`, opens the case row on the first failure, and audits the
        validation (idempotency key, payout found, its status, open case)."""
        async with self._db.transaction() as conn:
            row = await (await conn.execute(
                "SELECT * FROM payouts WHERE provider = %s AND provider_payout_id = %s FOR UPDATE",
                (event.provider, event.payout.payout_id))).fetchone()
            if row is None:
                raise LookupError(f"no internal payout for {event.provider} {event.payout.payout_id}")
            payout = snapshot(row)
            admission = admit(payout.status, event.payout.status, case_open=case_open)
            reported = (event.payout.amount, event.payout.currency)
            if admission is Admission.OPEN and reported != (payout.amount, payout.currency):
                admission = Admission.MISMATCH
            if admission in (Admission.OPEN, Admission.MISMATCH):
                status = (PayoutCaseStatus.OPENING if admission is Admission.OPEN
                          else PayoutCaseStatus.OPS_REVIEW)
                await conn.execute(
                    "INSERT INTO payout_cases (case_id, payout_id, status, reported_status, failure_code)"
                    " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (case_id) DO NOTHING",
                    (case_id, payout.id, status.value, event.payout.status.value, event.payout.failure_code))
            amounts = {"booked": format_minor(payout.amount, payout.currency),
                       "reported": format_minor(*reported)} if admission is Admission.MISMATCH else {}
            await AuditLog.append(conn, case_id, "workflow", ADMISSION_ACTIONS[admission], {
                "event_id": event.event_id, "event_type": event.event_type,
                "occurred_at": event.occurred_at.isoformat(),
                "idempotency_key": event.idempotency_key(), "reported": event.payout.raw_status,
                "failure_code": event.payout.failure_code, "payout_exists": True,
                "internal_status": payout.status.value, "open_case": case_open, **amounts})
            if amounts:
                await self._mismatched(conn, case_id, payout, event, amounts)
            elif admission is Admission.OPEN:
                await self._paid_heard_first(conn, case_id, event)
            return AdmitResult(admission=admission, payout=payout)

    @staticmethod
    async def _paid_heard_first(conn: Conn, case_id: str, failure: PayoutEvent) -> None:
        """A paid report delivered before the failure that opens the case, made after it
        (Adyen's notifications come in any order; a provider stamps its events to the
        second: one in the failure's second is after it): the money left after all, as the
        relay tells of one heard once the case is open. It found no case and was kept on the
        chain only (`WITHOUT_OPEN_CASE`); the case never read it, and with no payout lookup
        an approval booked back money that had left (reproduced)."""
        heard = await (await conn.execute(
            "SELECT actor, detail FROM audit_events WHERE chain = %s AND action = %s"
            " AND detail->>'status' = %s AND (detail->>'occurred_at')::timestamptz >= %s"
            " ORDER BY seq LIMIT 1",
            (case_id, WITHOUT_OPEN_CASE, ProviderPayoutStatus.PAID.value,
             failure.occurred_at.replace(microsecond=0)))).fetchone()
        if heard is not None:
            detail = {k: heard["detail"][k] for k in PAID_REPORT_FIELDS}
            await OutboxRepository.queue_recorded_in(conn, paid_report_notice(
                case_id, PAID_AFTER_FAILURE, detail), heard["actor"], PAID_AFTER_FAILURE, detail)

    @staticmethod
    async def _mismatched(conn: Conn, case_id: str, payout: PayoutSnapshot, event: PayoutEvent,
                          amounts: dict[str, str]) -> None:
        """The mismatch's break (ops review, never dispatched) and the payments-ops notice. A
        reconciliation run that listed the payout first raised the break already (under the
        provider's payout id) and it is not closed (resolved, dismissed, expired; one reopened
        is open): the notice names that one, no second
        break is opened."""
        evidence = {**amounts, "payout_id": payout.id, "provider_payout_id": payout.provider_payout_id,
                    "event_id": event.event_id}
        listed = await (await conn.execute(
            "SELECT id FROM reconciliation_breaks WHERE provider = %s AND object_kind = 'payout'"
            " AND object_id = %s AND break_class IN ('amount_mismatch', 'currency_mismatch')"
            " AND state NOT IN ('resolved', 'dismissed', 'expired') ORDER BY id LIMIT 1",
            (payout.provider, payout.provider_payout_id))).fetchone()
        if listed is not None:
            opened: int | None = int(listed["id"])
        else:
            run_id = f"payout-admission-{case_id}"
            await open_incident_run(conn, run_id, payout.provider, "payout-admission")
            case = await (await conn.execute("SELECT created_at FROM payout_cases WHERE case_id = %s",
                                             (case_id,))).fetchone()
            assert case is not None
            currency_differs = event.payout.currency != payout.currency
            opened = await _open_payout_break(
                conn, provider=payout.provider, case_id=case_id, run_id=run_id, evidence=evidence,
                break_class=BreakClass.CURRENCY_MISMATCH if currency_differs else BreakClass.AMOUNT_MISMATCH,
                amount=payout.amount, currency=payout.currency, reported_status=event.payout.status.value,
                failure_code=event.payout.failure_code, case_status=PayoutCaseStatus.OPS_REVIEW.value,
                created_at=case["created_at"])
        await OutboxRepository.queue_in(conn, NoticeInput(
            refund_request_id=case_id, kind="payout_amount_mismatch", audience="payments_ops",
            dedup_key=f"{case_id}:payout_amount_mismatch",
            detail={**evidence, "break_id": opened, "amount": payout.amount, "currency": payout.currency}))

    async def record_event(self, event: PayoutCaseEventInput, step_key: str | None = None) -> None:
        """The status and audit row in one transaction, once per `step_key` (see
        `CaseRepository.record_event`)."""
        async def write(conn: Conn) -> CaseWritten:
            if event.status is not None:
                await conn.execute("UPDATE payout_cases SET status = %s, updated_at = now()"
                                   " WHERE case_id = %s", (event.status.value, event.case_id))
            status = {"status": event.status.value} if event.status else {}
            await AuditLog.append(conn, event.case_id, event.actor, event.action, {**event.detail, **status})
            return CaseWritten(actions=(event.action,))

        await once(self._db, step_key, event.case_id, CaseWritten, write)

    async def record_case_field(self, case_id: str, field: Literal["decision", "recommendation"],
                                value: dict[str, Any], action: str, actor: str) -> None:
        """Stores the decision or the recommendation with its audit row."""
        async with self._db.transaction() as conn:
            await conn.execute(
                sql.SQL("UPDATE payout_cases SET {} = %s, updated_at = now() WHERE case_id = %s")
                .format(sql.Identifier(field)), (Jsonb(canonical_detail(value)), case_id))
            await AuditLog.append(conn, case_id, actor, action, value)

    # -- the closed-workflow sweep -------------------------------------------------------

    async def idle_open(self, idle_seconds: float, limit: int,
                        after: tuple[datetime, str] | None = None) -> list[dict[str, Any]]:
        """Payout cases only their workflow moves on, untouched for `idle_seconds` and not
        swept yet, by last update then id, from `after` on (like `CaseRepository.idle_open`)."""
        async with self._db.connection() as conn:
            return await idle_unswept(
                conn, table="payout_cases", key="case_id", still_open=sql.SQL("status = ANY(%s)"),
                open_values=[s.value for s in OPEN_STATUSES],
                idle_seconds=idle_seconds, limit=limit, after=after)

    async def mark_end_seen(self, case_id: str, seen_updated_at: datetime) -> None:
        """See `sweep.mark_end_seen`."""
        async with self._db.connection() as conn:
            await mark_end_seen(conn, table="payout_cases", key="case_id", case_id=case_id,
                                seen_updated_at=seen_updated_at)

    async def sweep_closed(self, case_id: str, *, workflow_status: str, seen_updated_at: datetime) -> bool:
        """A payout case whose workflow ended while it was open, in one transaction:
        `ops_review`, a reconciliation break for ops (never dispatched), the audit row and
        the payments-ops notice. Holds, the payout's status and the ledger stay as they are:
        a hold is money state, and only ops release it. False when the case was not open, or
        moved since the sweep read it (`seen_updated_at`; the next pass reads it again)."""
        async with self._db.transaction() as conn:
            row = await (await conn.execute(
                "SELECT c.*, p.provider, p.provider_payout_id, p.beneficiary_id, p.amount, p.currency,"
                " p.status AS payout_status FROM payout_cases c JOIN payouts p ON p.id = c.payout_id"
                " WHERE c.case_id = %s FOR UPDATE OF c", (case_id,))).fetchone()
            if (row is None or not left_open(PayoutCaseStatus(row["status"]), workflow_status)
                    or row["updated_at"] != seen_updated_at):
                return False
            run_id = f"case-sweep-{case_id}"
            await open_incident_run(conn, run_id, row["provider"], "case-sweep")
            held = await (await conn.execute(
                "SELECT count(*) AS n FROM beneficiary_holds WHERE case_id = %s AND released_at IS NULL",
                (case_id,))).fetchone()
            evidence = {"workflow_status": workflow_status, "case_status": row["status"],
                        "payout_id": row["payout_id"], "payout_status": row["payout_status"],
                        "beneficiary_id": row["beneficiary_id"], "beneficiary_held": bool(held and held["n"]),
                        "compensating_entry_posted": row["reversal_entry_id"] is not None}
            opened = await _open_payout_break(
                conn, provider=row["provider"], case_id=case_id, run_id=run_id, evidence=evidence,
                break_class=BreakClass.WORKFLOW_CLOSED, amount=row["amount"], currency=row["currency"],
                reported_status=row["reported_status"], failure_code=row["failure_code"],
                case_status=row["status"], created_at=row["created_at"])
            await conn.execute("UPDATE payout_cases SET status = %s, updated_at = now() WHERE case_id = %s",
                               (PayoutCaseStatus.OPS_REVIEW.value, case_id))
            detail = {**evidence, "break_id": opened,
                      "status": PayoutCaseStatus.OPS_REVIEW.value}
            await AuditLog.append(conn, case_id, "case-sweep", "workflow_closed_case_swept", detail)
            await OutboxRepository.queue_in(conn, NoticeInput(
                refund_request_id=case_id, kind="workflow_closed", audience="payments_ops",
                dedup_key=f"{case_id}:workflow_closed", detail={
                    **detail, "amount": row["amount"], "currency": row["currency"]}))
            return True

    # -- the runbook --------------------------------------------------------------------

    async def hold(self, case_id: str, payout_id: str, *, hold_beneficiary: bool,
                   step_key: str | None = None) -> HoldResult:
        """Step A: the payout goes on hold (remembering its status) and, when asked, the
        beneficiary's further payouts too. A repeat finds the hold and changes nothing; an
        attempt under a `step_key` that was written (its retry's) writes nothing: woken after
        the rollback, it would hold the payout again."""
        async def write(conn: Conn) -> HoldResult:
            row = await (await conn.execute("SELECT * FROM payouts WHERE id = %s FOR UPDATE",
                                            (payout_id,))).fetchone()
            assert row is not None
            payout = snapshot(row)
            newly = payout.status is not PayoutStatus.ON_HOLD
            if newly:
                await conn.execute("UPDATE payouts SET status = 'on_hold', held_from_status = status,"
                                   " updated_at = now() WHERE id = %s", (payout_id,))
            beneficiary_newly = False
            if hold_beneficiary:
                cur = await conn.execute(
                    "INSERT INTO beneficiary_holds (beneficiary_id, case_id) VALUES (%s,%s)"
                    " ON CONFLICT DO NOTHING RETURNING case_id", (payout.beneficiary_id, case_id))
                beneficiary_newly = await cur.fetchone() is not None
            held_from = payout.status if newly else payout.held_from_status
            assert held_from is not None
            if newly or beneficiary_newly:
                await AuditLog.append(conn, case_id, "system", "payout_held", {
                    "payout_id": payout_id, "held_from": held_from.value,
                    "beneficiary_id": payout.beneficiary_id, "beneficiary_held": hold_beneficiary})
            return HoldResult(held_from=held_from, newly_held=newly, beneficiary_held=hold_beneficiary)

        return await once(self._db, step_key, case_id, HoldResult, write)

    async def post_reversal(self, case_id: str, payout: PayoutSnapshot) -> LedgerResult:
        """Step B, fenced by the case row: the entry lands only while the payout is still on
        hold, and the case row records it in the same transaction (see `after_failed_reversal`); once
        per case whatever its key: a payout a reconciliation break reversed (under the
        break's key) is not reversed again by a case opened for it later."""
        async with self._db.transaction() as conn:
            await conn.execute("SET LOCAL lock_timeout = '5s'")  # fail fast, let Temporal retry
            case = await (await conn.execute(
                "SELECT reversal_given_up_at FROM payout_cases WHERE case_id = %s FOR UPDATE",
                (case_id,))).fetchone()
            if case is not None and case["reversal_given_up_at"] is not None:
                raise HoldReleased(f"case {case_id} gave its compensating entry up")
            status = await self._status(conn, payout.id)
            if status is not PayoutStatus.ON_HOLD:
                raise HoldReleased(f"payout {payout.id} is {status.value}, no longer on hold")
            reversed_before = await (await conn.execute(
                "SELECT id, posting_key FROM ledger_entries WHERE refund_request_id = %s AND template = %s"
                " ORDER BY id LIMIT 1", (case_id, LedgerKind.PAYOUT_REVERSED.value))).fetchone()
            if reversed_before is not None:  # by this step before, or by a break's settlement
                await conn.execute("UPDATE payout_cases SET reversal_entry_id = %s, updated_at = now()"
                                   " WHERE case_id = %s", (reversed_before["id"], case_id))
                return LedgerResult(posting_key=reversed_before["posting_key"],
                                    entry_id=reversed_before["id"], newly_posted=False)
            # as a refund's money gate asks: the round counted it and cannot hear of a revocation
            if revoked := await AccessRepository.approvals_revoked_in(conn, case_id, APPROVAL_REQUESTED):
                raise ApprovalRevoked(f"a token of {', '.join(revoked)}, live when they approved this "
                                      "reversal, was revoked since: their approval counts no more; "
                                      "nothing is booked back")
            result = await LedgerRepository.post_in(conn, LedgerInput(
                refund_request_id=case_id, kind=LedgerKind.PAYOUT_REVERSED, amount=payout.amount,
                currency=payout.currency, provider_refund_id=payout.provider_payout_id))
            await conn.execute("UPDATE payout_cases SET reversal_entry_id = %s, updated_at = now()"
                               " WHERE case_id = %s", (result.entry_id, case_id))
            return result

    async def after_failed_reversal(self, case_id: str, payout_id: str, *, keep_hold: bool) -> ReleaseResult:
        """Step B failed: under the case row's lock, so a posting still in flight either
        landed first (reported `posted`: the hold stays, the runbook goes on) or can no longer
        land. Then the rollback (the payout back to the status it was held from, the case's
        beneficiary holds ended), or where policy keeps the hold (`keep_hold`) the entry given
        up (see `post_reversal`), so the case's word that it failed stays true."""
        async with self._db.transaction() as conn:
            case = await (await conn.execute(
                "SELECT reversal_entry_id FROM payout_cases WHERE case_id = %s FOR UPDATE",
                (case_id,))).fetchone()
            assert case is not None
            if case["reversal_entry_id"] is not None:
                await AuditLog.append(conn, case_id, "system",
                                      "payout_reversal_landed_late" if keep_hold else "payout_hold_kept",
                                      {"reason": "the compensating entry was posted after all",
                                       "entry_id": case["reversal_entry_id"]})
                return ReleaseResult(rolled_back=False, posted=True)
            if keep_hold:
                await conn.execute(
                    "UPDATE payout_cases SET reversal_given_up_at = coalesce(reversal_given_up_at, now()),"
                    " updated_at = now() WHERE case_id = %s", (case_id,))
                await AuditLog.append(conn, case_id, "system", "payout_reversal_given_up", {"hold": "kept"})
                return ReleaseResult(rolled_back=False, posted=False)
            cur = await conn.execute(
                "UPDATE payouts SET status = held_from_status, held_from_status = NULL, updated_at = now()"
                " WHERE id = %s AND status = 'on_hold' RETURNING status", (payout_id,))
            restored = await cur.fetchone()
            released = await _end_beneficiary_holds(conn, case_id)
            status = PayoutStatus(restored["status"]) if restored else None
            await AuditLog.append(conn, case_id, "system", "payout_hold_rolled_back",
                                  {"payout_id": payout_id, "restored": status.value if status else None,
                                   "beneficiary_holds_released": released})
            return ReleaseResult(rolled_back=True, posted=False, restored=status)

    async def acted_on_beneficiary(self, case_id: str, user: str, action: str,
                                   statuses: Collection[PayoutCaseStatus] = ()) -> list[str]:
        """The other cases of this case's beneficiary (in `statuses`, when named) on whose
        trail `user` did `action`: one person may not both lift a beneficiary hold and ask for
        a payout it checks (a case's own hold never holds its own reissue)."""
        rows = await self._db.fetch_all(
            "SELECT c.case_id FROM payout_cases c JOIN payouts p ON p.id = c.payout_id"
            " WHERE p.beneficiary_id = (SELECT b.beneficiary_id FROM payout_cases o"
            "   JOIN payouts b ON b.id = o.payout_id WHERE o.case_id = %(case)s) AND c.case_id <> %(case)s"
            " AND (cardinality(%(statuses)s::text[]) = 0 OR c.status = ANY(%(statuses)s))"
            " AND EXISTS (SELECT 1 FROM audit_events a WHERE a.chain = c.case_id"
            "   AND a.action = %(action)s AND a.actor = %(user)s) ORDER BY c.case_id",
            {"case": case_id, "statuses": [s.value for s in statuses], "action": action, "user": user})
        return [r["case_id"] for r in rows]

    async def opened_at_provider(self, case_id: str) -> datetime | None:
        """When, by the provider's clock, the failure that opened the case happened (its
        admission's `occurred_at`; None for a case opened before that was recorded)."""
        row = await self._db.fetch_one(
            "SELECT detail->>'occurred_at' AS at FROM audit_events WHERE chain = %s"
            " AND action = %s ORDER BY seq LIMIT 1", (case_id, ADMISSION_ACTIONS[Admission.OPEN]))
        return datetime.fromisoformat(row["at"]) if row is not None and row["at"] else None

    async def reissue_requester(self, case_id: str) -> str | None:
        """Who asked for the case's reissue (its latest `reissue_requested`), if anyone."""
        row = await self._db.fetch_one(
            "SELECT actor FROM audit_events WHERE chain = %s AND action = 'reissue_requested'"
            " ORDER BY seq DESC LIMIT 1", (case_id,))
        return str(row["actor"]) if row is not None else None

    async def release_beneficiary(self, case_id: str, actor: str, reason: str, *, via: str) -> str | None:
        """Ops end the case's hold on its beneficiary's payouts (their details verified): a
        reissue another case waits for can then pay. The payout's own hold and the ledger
        stay. The audit row and the payments-ops notice in the same transaction; None (and
        nothing written) when the case holds no beneficiary."""
        async with self._db.transaction() as conn:
            released = await _end_beneficiary_holds(conn, case_id)
            if not released:
                return None
            detail = {"beneficiary_id": released[0], "reason": reason, "via": via}
            await AuditLog.append(conn, case_id, actor, "beneficiary_hold_released", detail)
            await OutboxRepository.queue_in(conn, NoticeInput(
                refund_request_id=case_id, kind="beneficiary_hold_released", audience="payments_ops",
                dedup_key=f"{case_id}:beneficiary_hold_released", detail={**detail, "released_by": actor}))
            return released[0]

    async def open_ticket(self, case_id: str, occasion: str, priority: str,
                          detail: dict[str, Any]) -> tuple[str, bool, str]:
        """Step C: the case's ticket reference (a placeholder until a ticketing system
        answers) and the outbox notice (kind `payout_exception_ticket`) that files it, once
        per occasion; the first occasion opens the ticket, later ones update it. Returns
        the reference, whether the notice is new, and its dedup key."""
        async with self._db.transaction() as conn:
            row = await (await conn.execute(
                "SELECT ticket_ref FROM payout_cases WHERE case_id = %s FOR UPDATE", (case_id,))).fetchone()
            assert row is not None
            ref, opening = row["ticket_ref"] or f"pending:{case_id}", row["ticket_ref"] is None
            if opening:
                await conn.execute("UPDATE payout_cases SET ticket_ref = %s, updated_at = now()"
                                   " WHERE case_id = %s", (ref, case_id))
            notice = NoticeInput(
                refund_request_id=case_id, kind=TICKET_KIND, audience=TICKETING_AUDIENCE,
                dedup_key=f"{case_id}:{TICKET_KIND}:{occasion}",
                detail={**detail, "ticket_ref": ref, "action": "open" if opening else "update",
                        "priority": priority, "occasion": occasion})
            queued = await OutboxRepository.queue_in(conn, notice)
            if queued:
                action = "ticket_opened" if opening else "ticket_updated"
                await AuditLog.append(conn, case_id, "system", action,
                                      {"ticket_ref": ref, "placeholder": True, "priority": priority,
                                       "occasion": occasion})
            return ref, queued, notice.dedup_key

    async def link_ticket(self, case_id: str, occasion: str) -> tuple[str, bool]:
        """Records on the case the tickets the ticketing systems filed for it (ServiceNow
        and Jira, as `case_tickets` holds them), replacing the placeholder. Returns the
        reference and whether any system has filed it. Idempotent: an unchanged reference
        is not recorded again."""
        purpose = ticket_purpose("incident", TICKET_KIND)
        async with self._db.transaction() as conn:
            row = await (await conn.execute(
                "SELECT ticket_ref FROM payout_cases WHERE case_id = %s FOR UPDATE", (case_id,))).fetchone()
            assert row is not None
            cur = await conn.execute(
                "SELECT system, external_id, number, url FROM case_tickets WHERE refund_request_id = %s"
                " AND purpose = %s ORDER BY system", (case_id, purpose))
            tickets = list(await cur.fetchall())
            if not tickets:
                return str(row["ticket_ref"]), False
            ref = "; ".join(f"{t['system']} {t['number'] or t['external_id']}" for t in tickets)
            if ref != row["ticket_ref"]:
                await conn.execute("UPDATE payout_cases SET ticket_ref = %s, updated_at = now()"
                                   " WHERE case_id = %s", (ref, case_id))
                await AuditLog.append(conn, case_id, "system", "ticket_ref_recorded", {
                    "ticket_ref": ref, "occasion": occasion,
                    "tickets": [{"system": t["system"], "number": t["number"], "url": t["url"]}
                                for t in tickets]})
            return ref, True

    async def record_reissue(self, case_id: str, original: PayoutSnapshot, made: ProviderPayout,
                             final: PayoutStatus) -> PayoutSnapshot:
        """The reissue in our books, once (a unique index allows one per payout): the new
        payout is paid, the original ends failed or reversed, the case's beneficiary holds
        end (approving the reissue is the verification they waited for). Events about the
        new payout that came before this booking are left for the relay's re-drive."""
        reissue = PayoutSnapshot(
            id=original.reissue_id(), provider=made.provider, provider_payout_id=made.payout_id,
            beneficiary_id=original.beneficiary_id, amount=made.amount, currency=made.currency,
            status=PayoutStatus.PAID, reissue_of=original.id)
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO payouts (id, provider, provider_payout_id, beneficiary_id, amount, currency,"
                " status, reissue_of) VALUES (%s,%s,%s,%s,%s,%s,'paid',%s) ON CONFLICT (id) DO NOTHING"
                " RETURNING id", (reissue.id, reissue.provider, reissue.provider_payout_id,
                                  reissue.beneficiary_id, reissue.amount, reissue.currency, original.id))
            if await cur.fetchone() is not None:
                await conn.execute(
                    "UPDATE payouts SET status = %s, held_from_status = NULL, updated_at = now()"
                    " WHERE id = %s AND status = 'on_hold'", (final.value, original.id))
                await _end_beneficiary_holds(conn, case_id)
                await _reroute_events_before_booking(conn, made.provider, payout_case_id(made.provider,
                                                                                         made.payout_id))
                await AuditLog.append(conn, case_id, f"provider:{made.provider}", "payout_reissued", {
                    "reissue_id": reissue.id, "provider_payout_id": made.payout_id,
                    "amount": made.amount, "currency": made.currency, "original_final_status": final.value})
        found = await self.payout(reissue.id)
        assert found is not None
        return found

    @staticmethod
    async def _status(conn: Conn, payout_id: str) -> PayoutStatus:
        row = await (await conn.execute("SELECT status FROM payouts WHERE id = %s", (payout_id,))).fetchone()
        assert row is not None
        return PayoutStatus(row["status"])
