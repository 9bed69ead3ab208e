"""Over 400 lines: the case's writes that share one transaction (reservation with the
policy decision, submission intent with its event, ledger with notices and events) need the
same charge lock and status helpers, so they stay with the case's repository.

Refund cases and the reservations they hold on a charge: creation (once per request
id), validation's reservation under the charge's lock, status changes, submission intent,
the closed-workflow sweep, and the console's case search.

Every change is written with its audit row in one transaction.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from psycopg import sql

from adapters.db.access import AccessRepository
from adapters.db.audit import AuditLog
from adapters.db.database import Conn, Repository, jsonb
from adapters.db.ledger import LedgerRepository
from adapters.db.outbox import OutboxRepository
from adapters.db.rows import CaseRow
from adapters.db.steps import once
from adapters.db.sweep import idle_unswept, mark_end_seen, open_incident_run
from domain.audit import APPROVAL_REQUESTED, SAID_WHAT_THE_MONEY_DID
from domain.lifecycle import BACKWARDS, FINAL_PROVIDER_STATUSES, classify_status_change
from domain.models import (
    CLOSED_STATUSES,
    CaseEventInput,
    CaseStatus,
    CaseWrite,
    CaseWrites,
    CaseWritten,
    ChargeSnapshot,
    NoticeInput,
    PolicyDecision,
    ProviderRefund,
    ProviderRefundStatus,
    RefundMethod,
    RefundRequest,
    RequestSource,
    ValidationResult,
    Vetted,
)
from domain.policy import ChargePriors
from domain.reconciliation import NON_TERMINAL_PROVIDER, BreakClass

APPROVAL_GRANTED = "approval_granted"
"""The audit action of an approval that counts (the round records it)."""

SETTLED_STATUSES = CLOSED_STATUSES | {CaseStatus.SUCCEEDED}
"""Statuses no workflow moves any more; a case in any other one needs its workflow."""

BANNER_STATUSES = ("refund_failed", "refund_canceled", "executed_ledger_pending", "ops_review")
"""Cases a person must look at: money did not go back as the case once said it would."""


def request_from_row(row: Mapping[str, Any]) -> RefundRequest:
    """The request a stored case was made from."""
    return RefundRequest(
        refund_request_id=row["refund_request_id"], provider=row["provider"],
        charge_id=row["charge_id"], amount=int(row["amount"]), currency=row["currency"],
        merchant_account=row["merchant_account"], reason=row["reason"], evidence=row["evidence"],
        source=row["source"], method=row["method"],
        parent_refund_request_id=row["parent_refund_request_id"],
        trigger_identities=tuple(row.get("trigger_identities") or ()))


_CASE_COLUMNS = ("refund_request_id", "provider", "charge_id", "amount", "currency", "merchant_account",
                 "reason", "evidence", "source", "requester", "params_hash", "status", "method",
                 "parent_refund_request_id", "trigger_identities")
_INSERT_CASE = sql.SQL("INSERT INTO refund_cases ({columns}) SELECT {values}").format(
    columns=sql.SQL(", ").join(map(sql.Identifier, _CASE_COLUMNS)),
    values=sql.SQL(", ").join(map(sql.Placeholder, _CASE_COLUMNS)))
"""A new case's row from `_case_values`, once, or once per row of a FROM the caller adds."""
_CREATE_CASE = (_INSERT_CASE + sql.SQL(" ON CONFLICT (refund_request_id) DO NOTHING RETURNING *")).as_string()

# A reissue family: the original request (no parent) and every reissue below it.
_FAMILY_ROOT = """
WITH RECURSIVE up AS (
    SELECT refund_request_id, parent_refund_request_id FROM refund_cases WHERE refund_request_id = %s
    UNION ALL
    SELECT c.refund_request_id, c.parent_refund_request_id
    FROM refund_cases c JOIN up ON c.refund_request_id = up.parent_refund_request_id
)
SELECT refund_request_id FROM up WHERE parent_refund_request_id IS NULL"""
_FAMILY_OPEN = """
WITH RECURSIVE down AS (
    SELECT refund_request_id, status, created_at FROM refund_cases WHERE refund_request_id = %(root)s
    UNION ALL
    SELECT c.refund_request_id, c.status, c.created_at
    FROM refund_cases c JOIN down ON c.parent_refund_request_id = down.refund_request_id
)
SELECT c.* FROM down JOIN refund_cases c USING (refund_request_id)
WHERE down.status <> ALL(%(closed)s) ORDER BY down.created_at LIMIT 1"""

_FAMILY = """
WITH RECURSIVE down AS (
    SELECT refund_request_id FROM refund_cases WHERE refund_request_id = %s
    UNION ALL
    SELECT c.refund_request_id
    FROM refund_cases c JOIN down ON c.parent_refund_request_id = down.refund_request_id
)
SELECT refund_request_id FROM down"""
# Breaks on a family's cases saying money of the request moved or may move outside the case
# that would be reissued: a duplicate refund not failed or canceled (whatever ops did with
# its break, the money moved), and a refund of a case shown failed that the provider shows
# succeeded or still pending, its break not resolved (a denial or an expiry corrects nothing:
# the provider's word stands).
_MONEY_MOVED_ELSEWHERE = """
SELECT DISTINCT ON (object_id) object_id, break_class FROM reconciliation_breaks
WHERE chain = ANY(%(family)s) AND provider_status NOT IN ('failed', 'canceled')
  AND (break_class = 'duplicate_refund'
       OR (break_class IN ('provider_succeeded_shown_failed', 'stuck_non_terminal')
           AND state <> 'resolved'))
ORDER BY object_id, id DESC"""


async def _family_below(conn: Conn, root: str) -> list[str]:
    """The reissue family under `root` (the original request), `root` included."""
    return [r["refund_request_id"] for r in await (await conn.execute(_FAMILY, (root,))).fetchall()]


async def _moved_elsewhere(conn: Conn, family: list[str]) -> str | None:
    """The refunds whose breaks say the family's money moved or may move outside the case
    to be paid (`_MONEY_MOVED_ELSEWHERE`), with their classes; None when none do."""
    moved = await (await conn.execute(_MONEY_MOVED_ELSEWHERE, {"family": family})).fetchall()
    return ", ".join(f"{m['object_id']} ({m['break_class']})" for m in moved) or None


def _sealed_grants(writes: Sequence[CaseWrite]) -> list[tuple[str, datetime]]:
    """The approvals among a step's writes, each with when the relay sealed it: the deciding
    approval, written with the submit (its token may have been revoked while it waited)."""
    return [(w.event.actor, datetime.fromisoformat(w.event.detail["sealed_at"])) for w in writes
            if w.event is not None and w.event.action == APPROVAL_GRANTED and "sealed_at" in w.event.detail]


async def _reissue_paid_elsewhere(conn: Conn, case_id: str) -> str | None:
    """Why a reissue may not pay now, read at its submit (its family was read when it
    opened, and news comes while approvers decide): a break says a refund of the family
    moved the money (`_moved_elsewhere`), or another member holds it again (a break
    approved, the original corrected to succeeded). None when nothing says so. The other
    members' rows are locked (shared) first: an approval committing under one of them is
    read whole."""
    root = await (await conn.execute(_FAMILY_ROOT, (case_id,))).fetchone()
    assert root is not None  # the case's own row is on its way up
    family = await _family_below(conn, root["refund_request_id"])
    others = await (await conn.execute(
        "SELECT refund_request_id, status, reserved_amount FROM refund_cases"
        " WHERE refund_request_id = ANY(%s) AND refund_request_id <> %s"
        " ORDER BY refund_request_id FOR SHARE", (family, case_id))).fetchall()
    if moved := await _moved_elsewhere(conn, family):
        return moved
    return ", ".join(f"{r['refund_request_id']} ({r['status']})" for r in others
                     if r["reserved_amount"] > 0) or None


async def _family_behind(conn: Conn, case_id: str) -> list[str]:
    """Who stands behind a reissue's request, read again at its money's gate: the requester
    of each refund of the family and whoever said what one's money did
    (`SAID_WHAT_THE_MONEY_DID`). The reissue named them among its trigger identities when it
    opened; one whose word committed as it opened is read only here."""
    root = await (await conn.execute(_FAMILY_ROOT, (case_id,))).fetchone()
    assert root is not None  # the case's own row is on its way up
    family = await _family_below(conn, root["refund_request_id"])
    cur = await conn.execute(
        "SELECT requester AS person FROM refund_cases WHERE refund_request_id = ANY(%(family)s)"
        " UNION SELECT actor FROM audit_events WHERE chain = ANY(%(family)s) AND action = ANY(%(said)s)",
        {"family": family, "said": list(SAID_WHAT_THE_MONEY_DID)})
    return [str(r["person"]) for r in await cur.fetchall()]


class MoneyMovedElsewhere(Exception):
    """A reissue refused: a refund outside the reissued case moved (or may move) the
    request's money (the refunds and their breaks' classes: the message)."""


def _case_values(request: RefundRequest, requester: str) -> dict[str, Any]:
    return {"refund_request_id": request.refund_request_id, "provider": request.provider,
            "charge_id": request.charge_id, "amount": request.amount, "currency": request.currency,
            "merchant_account": request.merchant_account, "reason": request.reason.value,
            "evidence": jsonb(request.evidence), "source": request.source.value, "requester": requester,
            "params_hash": request.params_hash(), "status": CaseStatus.REQUESTED.value,
            "method": request.method.value, "parent_refund_request_id": request.parent_refund_request_id,
            "trigger_identities": list(request.trigger_identities)}


def _received(request: RefundRequest, params_hash: str) -> dict[str, Any]:
    """The `request_received` entry's detail."""
    return {"source": request.source.value, "params_hash": params_hash, "amount": request.amount,
            "currency": request.currency}


class SubmissionRefused(Exception):
    """A submit attempt that outlived its case: cancelled, denied, or its hold released."""


class RefundHeldElsewhere(Exception):
    """A refund a person names for a case that another case holds (its id: the message)."""


async def _charge_priors(conn: Conn, provider: str, charge_id: str, exclude: str,
                         refunded: int = 0) -> ChargePriors:
    """`ChargePriors`; `refunded`: what the provider reports refunded on the charge, of which
    the holds of our refunds made there (a submit begun, or a provider refund followed) are
    ours: the rest was refunded outside our cases. Never more than the provider reports."""
    cur = await conn.execute(
        "SELECT coalesce(array_agg(amount ORDER BY refund_request_id) FILTER (WHERE reserved_amount > 0),"
        " '{}') AS amounts, count(*) FILTER (WHERE status = ANY(%s)) AS refusals,"
        " coalesce(sum(reserved_amount) FILTER (WHERE method = %s"
        " AND (submission_started_at IS NOT NULL OR provider_refund_id IS NOT NULL)), 0) AS made_there"
        " FROM refund_cases WHERE provider = %s AND charge_id = %s AND refund_request_id <> %s",
        ([s.value for s in REFUSED_STATUSES], RefundMethod.PROVIDER.value, provider, charge_id, exclude))
    row = await cur.fetchone()
    assert row is not None  # an aggregate answers one row
    return ChargePriors(amounts=tuple(int(a) for a in row["amounts"]), refusals=int(row["refusals"]),
                        outside=max(0, refunded - int(row["made_there"])))


SUBMIT_STARTED = "provider_submit_started"
"""Each submit attempt's entry, written as it records its intent, before the provider call."""
REFUSED_STATUSES = frozenset({CaseStatus.DENIED, CaseStatus.EXPIRED})
"""A request people refused: denied, or let expire."""


async def _ended(conn: Conn, case_id: str) -> Vetted | None:
    """A validation (under a step key: every run since local validation) writes nothing on
    a case that ended (closed, or succeeded) or whose workflow ended while it was open (the
    closed-workflow sweep's `workflow_closed` break: ops handle it): its one workflow is
    over, so a run validating it now is a start straight in Temporal of its recorded request
    (its id reused), which would reserve again and act on the stored decision. The refusal,
    audited as `start_refused`. (A case in `ops_review` otherwise does validate again: its
    live workflow resumes a validation whose reads ran out.)"""
    cur = await conn.execute(
        "SELECT status, EXISTS (SELECT 1 FROM reconciliation_breaks b WHERE b.provider = c.provider"
        " AND b.object_id = c.refund_request_id AND b.break_class = %s) AS swept"  # the sweep's break key
        " FROM refund_cases c WHERE refund_request_id = %s", (BreakClass.WORKFLOW_CLOSED.value, case_id))
    row = await cur.fetchone()
    if row is None or (row["status"] not in {s.value for s in SETTLED_STATUSES} and not row["swept"]):
        return None
    reason = f"the case is {row['status']}: another run took it; refunds start only through the relay"
    await AuditLog.append(conn, case_id, "system", "start_refused", {"reason": reason})
    return Vetted(validation=ValidationResult(ok=False, reason=reason))


class CaseCreation(StrEnum):
    CREATED = "created"
    IDENTICAL = "identical"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class CaseFilter:
    """What the cases list was asked for; amounts are minor units of `currency`."""

    statuses: tuple[str, ...] = ()
    provider: str | None = None
    currency: str | None = None
    min_amount: int | None = None
    max_amount: int | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    search: str | None = None
    requester: str | None = None
    limit: int = 200
    before: tuple[datetime, str] | None = None
    """Only cases after this one in the list's order (created_at, id): the next page."""


class CaseRepository(Repository):
    """The `refund_cases` rows and the `charges` rows whose lock orders their reservations."""

    async def create(self, request: RefundRequest, requester: str) -> tuple[CaseCreation, CaseRow]:
        """Inserts the case once; a repeat is identical or a conflict, decided by params hash."""
        async with self._db.transaction() as conn:
            return await self._create_in(conn, request, requester)

    async def create_reissue(self, request: RefundRequest,
                             requester: str) -> tuple[CaseCreation | None, CaseRow]:
        """A reissue's case, unless a member of its family (the original request, its
        reissues and theirs: one request's money) has not ended: then (None, that member).
        Under the original's row lock, so two reissues of one family never both open.
        Raises MoneyMovedElsewhere when a break on any member says a refund paid (or may
        pay) the request's money (`_MONEY_MOVED_ELSEWHERE`): the reissue would pay again."""
        assert request.parent_refund_request_id is not None
        async with self._db.transaction() as conn:
            cur = await conn.execute(_FAMILY_ROOT, (request.parent_refund_request_id,))
            root = await cur.fetchone()
            assert root is not None
            await conn.execute("SELECT 1 FROM refund_cases WHERE refund_request_id = %s FOR UPDATE",
                               (root["refund_request_id"],))
            cur = await conn.execute(_FAMILY_OPEN, {"root": root["refund_request_id"],
                                                    "closed": [s.value for s in CLOSED_STATUSES]})
            member = await cur.fetchone()
            if member is not None:
                return None, CaseRow.from_row(member)
            if moved := await _moved_elsewhere(conn, await _family_below(conn, root["refund_request_id"])):
                raise MoneyMovedElsewhere(moved)
            return await self._create_in(conn, request, requester)

    async def family(self, case_id: str) -> list[str]:
        """Every case of `case_id`'s reissue family: the original request and all below it."""
        async with self._db.transaction() as conn:
            root = await (await conn.execute(_FAMILY_ROOT, (case_id,))).fetchone()
            return [] if root is None else await _family_below(conn, root["refund_request_id"])

    @staticmethod
    async def _create_in(conn: Conn, request: RefundRequest, requester: str) -> tuple[CaseCreation, CaseRow]:
        values = _case_values(request, requester)
        cur = await conn.execute(_CREATE_CASE, values)
        row = await cur.fetchone()
        if row is not None:
            await AuditLog.append(conn, request.refund_request_id, requester, "request_received",
                                  _received(request, values["params_hash"]))
            return CaseCreation.CREATED, CaseRow.from_row(row)
        cur = await conn.execute(
            "SELECT * FROM refund_cases WHERE refund_request_id = %s", (request.refund_request_id,))
        existing = await cur.fetchone()
        assert existing is not None
        # the channel says how a request came, not what it asks: a repeat through another
        # is compared as if it came through the first (a stored hash includes the channel)
        as_first = request.model_copy(update={"source": RequestSource(existing["source"])})
        same = existing["params_hash"] == as_first.params_hash()
        await AuditLog.append(conn, request.refund_request_id, requester,
                              "request_repeated" if same else "request_conflict",
                              {"source": request.source.value, "params_hash": values["params_hash"]})
        return (CaseCreation.IDENTICAL if same else CaseCreation.CONFLICT), CaseRow.from_row(existing)

    @staticmethod
    def opening(source: str) -> sql.Composed:
        """The case and its `request_received` entry as CTEs of the caller's statement
        (params from `opening_values`), written when the CTE `source` returns a row and no
        case has the id (`case_opened` then returns it). A case already there is left to
        `create` (repeat or conflict); a chain already begun under the id fails the
        statement (`AuditLog.opening_entry`)."""
        return sql.SQL("case_opened AS ({insert} FROM {source} ON CONFLICT (refund_request_id)"
                       " DO NOTHING RETURNING refund_request_id), {entry}").format(
                           insert=_INSERT_CASE, source=sql.Identifier(source),
                           entry=AuditLog.opening_entry("case_opened"))

    @staticmethod
    def opening_values(request: RefundRequest, requester: str) -> dict[str, Any]:
        """The params of `opening`: the case's row and its first entry, hashed now."""
        values = _case_values(request, requester)
        return {**values, **AuditLog.opening_entry_values(
            request.refund_request_id, requester, "request_received",
            _received(request, values["params_hash"]))}

    async def get(self, case_id: str) -> CaseRow | None:
        row = await self._db.fetch_one("SELECT * FROM refund_cases WHERE refund_request_id = %s", (case_id,))
        return CaseRow.from_row(row) if row else None

    async def by_provider_refund(self, provider: str, refund_id: str) -> CaseRow | None:
        row = await self._db.fetch_one(
            "SELECT * FROM refund_cases WHERE provider = %s AND provider_refund_id = %s",
            (provider, refund_id))
        return CaseRow.from_row(row) if row else None

    async def refund_held_elsewhere(self, provider: str, refund_id: str, case_id: str) -> CaseRow | None:
        """Another case than `case_id` holding the provider's refund, its id written in any
        letter case (a person's paste; not indexed, so not for the webhook path)."""
        row = await self._db.fetch_one(
            "SELECT * FROM refund_cases WHERE provider = %s AND upper(provider_refund_id) = upper(%s)"
            " AND refund_request_id <> %s LIMIT 1", (provider, refund_id, case_id))
        return CaseRow.from_row(row) if row else None

    @staticmethod
    async def claim_refund_in(conn: Conn, case_id: str, refund_id: str) -> None:
        """Names the case's refund before its workflow writes it (ops read it at the provider),
        in the caller's transaction. Claims of one id in any letter case take turns (the index
        tells letter cases apart, a person's paste does not), and another case holding it by
        then is `RefundHeldElsewhere`. The workflow's own write of the provider's id takes no
        such lock: the one-case-per-refund index (`psycopg.errors.UniqueViolation`, letter
        cases apart) is its only guard."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                           (f"refund-claim:{refund_id.upper()}",))
        holder = await (await conn.execute(
            "SELECT other.refund_request_id FROM refund_cases own JOIN refund_cases other"
            " ON other.provider = own.provider AND upper(other.provider_refund_id) = upper(%s)"
            " AND other.refund_request_id <> own.refund_request_id"
            " WHERE own.refund_request_id = %s LIMIT 1", (refund_id, case_id))).fetchone()
        if holder is not None:
            raise RefundHeldElsewhere(str(holder["refund_request_id"]))
        await conn.execute("UPDATE refund_cases SET provider_refund_id = %s"
                           " WHERE refund_request_id = %s AND provider_refund_id IS NULL",
                           (refund_id, case_id))

    async def open_tracking(self, case_id: str, refund: ProviderRefund,
                            merchant_account: str | None, event_type: str) -> bool:
        """Records a refund the provider made without us as a `tracking` case that holds its
        amount against the charge (so later requests see less refundable). Once per id."""
        async with self._db.transaction() as conn:
            # Its hold is a reservation like any other: taken under the charge's lock.
            await self._lock_charge(conn, refund.provider, refund.charge_id, refund.currency)
            cur = await conn.execute(
                "INSERT INTO refund_cases (refund_request_id, provider, charge_id, amount, currency,"
                " merchant_account, reason, evidence, source, requester, params_hash, status,"
                " reserved_amount, provider_refund_id, provider_status)"
                " VALUES (%s,%s,%s,%s,%s,%s,'other','{}','webhook',%s,'',%s,%s,%s,%s)"
                " ON CONFLICT (refund_request_id) DO NOTHING RETURNING refund_request_id",
                (case_id, refund.provider, refund.charge_id, refund.amount, refund.currency,
                 merchant_account or "", f"provider:{refund.provider}", CaseStatus.TRACKING.value,
                 refund.amount, refund.refund_id, refund.status.value))
            if await cur.fetchone() is None:
                return False
            await AuditLog.append(conn, case_id, f"provider:{refund.provider}", "tracking_opened",
                                  {**refund.model_dump(mode="json"), "event_type": event_type})
            return True

    @staticmethod
    async def _lock_charge(conn: Conn, provider: str, charge_id: str, currency: str,
                           amount_captured: int | None = None) -> None:
        """Locks the charge's row (created if new) for the transaction: every change to the
        reservations held on a charge is made under it, so none is decided on a stale sum.
        `amount_captured`, when known, is stored as the provider reported it."""
        await conn.execute(
            "INSERT INTO charges (provider, charge_id, currency, amount_captured)"
            " VALUES (%s,%s,%s,%s) ON CONFLICT (provider, charge_id) DO UPDATE"
            " SET amount_captured = coalesce(%s, charges.amount_captured), updated_at = now()",
            (provider, charge_id, currency, amount_captured or 0, amount_captured))
        await conn.execute(
            "SELECT 1 FROM charges WHERE provider = %s AND charge_id = %s FOR UPDATE",
            (provider, charge_id))

    async def reserve(self, request: RefundRequest, charge: ChargeSnapshot) -> ValidationResult:
        """Takes the case's reservation against the charge, atomically with every other
        entry point: remaining = captured - all reservations held on the charge."""
        async with self._db.transaction() as conn:
            return await self._reserve_in(conn, request, charge)

    @classmethod
    async def _reserve_in(cls, conn: Conn, request: RefundRequest,
                          charge: ChargeSnapshot) -> ValidationResult:
        """`reserve` inside the caller's transaction."""
        case_id = request.refund_request_id
        holds, uncounted = await cls._charge_holds(conn, charge, request.method)
        prior = len([k for k in holds if k != case_id])
        if case_id in holds:  # a retried activity: the reservation is already ours
            remaining = charge.amount_captured - sum(holds.values()) + holds[case_id]
            return ValidationResult(ok=True, remaining_before=remaining, prior_refund_count=prior,
                                    amount_captured=charge.amount_captured,
                                    dispute_count=charge.dispute_count)
        remaining = _remaining(charge, holds, uncounted)
        if request.amount > remaining:
            result = ValidationResult(
                ok=False, remaining_before=remaining, prior_refund_count=prior,
                amount_captured=charge.amount_captured,
                reason=f"amount {request.amount} exceeds remaining refundable {remaining}")
            await cls._set_status(conn, case_id, CaseStatus.REJECTED)
            await AuditLog.append(conn, case_id, "system", "validation_rejected", result.model_dump())
            return result
        await conn.execute(
            "UPDATE refund_cases SET reserved_amount = %s, status = %s, updated_at = now()"
            " WHERE refund_request_id = %s",
            (request.amount, CaseStatus.VALIDATING.value, case_id))
        result = ValidationResult(ok=True, remaining_before=remaining, prior_refund_count=prior,
                                  amount_captured=charge.amount_captured,
                                  dispute_count=charge.dispute_count)
        await AuditLog.append(conn, case_id, "system", "validation_passed",
                              {**result.model_dump(), "reserved": request.amount})
        return result

    @classmethod
    async def _charge_holds(cls, conn: Conn, charge: ChargeSnapshot,
                            method: RefundMethod) -> tuple[dict[str, int], int]:
        """Locks the charge's row (see `_lock_charge`); every hold on it, by case, and how
        much of them the provider's refunded figure leaves out, as a request of `method`
        reads them."""
        await cls._lock_charge(conn, charge.provider, charge.charge_id, charge.currency,
                                charge.amount_captured or None)
        cur = await conn.execute(
            "SELECT refund_request_id, reserved_amount,"
            " (submission_started_at IS NULL AND provider_refund_id IS NULL) OR method <> %(provider)s"
            " AS uncounted, method = %(provider)s AND submission_started_at IS NOT NULL"
            " AND provider_refund_id IS NULL AS unanswered,"
            " method = %(provider)s AND provider_status = ANY(%(in_flight)s) AS in_flight"
            " FROM refund_cases WHERE provider = %(name)s AND charge_id = %(charge)s AND reserved_amount > 0",
            {"provider": RefundMethod.PROVIDER.value, "name": charge.provider, "charge": charge.charge_id,
             "in_flight": [s.value for s in NON_TERMINAL_PROVIDER]})
        rows = await cur.fetchall()
        holds = {r["refund_request_id"]: int(r["reserved_amount"]) for r in rows}
        uncounted = sum(int(r["reserved_amount"]) for r in rows if r["uncounted"])
        if method is not RefundMethod.PROVIDER:
            # nobody else guards a bank transfer: a submit whose answer is unknown may not be
            # in what the provider reports yet, nor a refund still in flight where its figure
            # counts only successes (Adyen's), and either may land beside it
            uncounted += sum(int(r["reserved_amount"]) for r in rows
                             if r["unanswered"] or (r["in_flight"] and not charge.refunded_counts_pending))
        return holds, uncounted

    async def reject(self, case_id: str, reason: str, step_key: str | None = None) -> Vetted:
        """Rejects the case (status and audit row); under a `step_key` that answered before
        (see `write_case_steps`), only that answer comes back: a validation run again
        rejects nothing twice, nor a case the first run took (nor, see `_ended`, a case
        whose workflow is over)."""
        async def rejecting(conn: Conn) -> Vetted:
            if step_key is not None and (ended := await _ended(conn, case_id)) is not None:
                return ended
            await self._set_status(conn, case_id, CaseStatus.REJECTED, release=True)
            await AuditLog.append(conn, case_id, "system", "validation_rejected", {"reason": reason})
            return Vetted(validation=ValidationResult(ok=False, reason=reason))
        return await once(self._db, step_key, case_id, Vetted, rejecting)

    async def charge_priors(self, provider: str, charge_id: str, exclude: str) -> ChargePriors:
        """The charge's other requests as the policy reads them (`ChargePriors`)."""
        async with self._db.connection() as conn:
            return await _charge_priors(conn, provider, charge_id, exclude)

    @staticmethod
    async def _set_status(conn: Conn, case_id: str, status: CaseStatus,
                          release: bool = False) -> None:
        await conn.execute(
            "UPDATE refund_cases SET status = %s, updated_at = now(),"
            " reserved_amount = CASE WHEN %s THEN 0 ELSE reserved_amount END"
            " WHERE refund_request_id = %s", (status.value, release, case_id))

    async def record_event(self, event: CaseEventInput, step_key: str | None = None, *,
                           after_commit: Callable[[CaseWritten], None] | None = None) -> None:
        """The event in a transaction of its own. Under a `step_key` (an activity's: the same
        in every attempt) an attempt that finds its step written writes nothing: a stalled
        attempt waking after its retry committed would move the status back (`steps.once`)."""
        await once(self._db, step_key, event.refund_request_id, CaseWritten,
                   lambda conn: self._event_written(conn, event), after_commit=after_commit)

    @classmethod
    async def _event_written(cls, conn: Conn, event: CaseEventInput) -> CaseWritten:
        await cls.record_event_in(conn, event)
        return CaseWritten(actions=(event.action,))

    @classmethod
    async def record_event_in(cls, conn: Conn, event: CaseEventInput, *, applied: bool = False) -> None:
        """`record_event` inside the caller's transaction. `applied`: the event is the refund
        workflow's own step, so its refund is what the workflow holds (`applied_*`, which the
        relay reads to leave out events that tell the workflow nothing new). A refund that moved
        or may move money holds the case's amount again where a cancel or a decline had
        released it (a refund heard only after: it counts against the charge, as
        reconciliation's correction sets it)."""
        refund = event.provider_refund
        if refund is not None:
            await conn.execute(
                "UPDATE refund_cases SET provider_refund_id = %(id)s, provider_status = %(status)s,"
                " failure_reason = %(reason)s, updated_at = now(),"
                " reserved_amount = CASE WHEN %(holds)s AND reserved_amount = 0 THEN amount"
                " ELSE reserved_amount END,"
                " applied_refund_id = CASE WHEN %(applied)s THEN %(id)s ELSE applied_refund_id END,"
                " applied_status = CASE WHEN %(applied)s THEN %(status)s ELSE applied_status END"
                " WHERE refund_request_id = %(case)s",
                {"id": refund.refund_id, "status": refund.status.value, "reason": refund.failure_reason,
                 "applied": applied, "case": event.refund_request_id,
                 "holds": refund.status not in FINAL_PROVIDER_STATUSES})
        if event.status is not None:
            await cls._set_status(conn, event.refund_request_id, event.status,
                                   event.release_reservation)
        await AuditLog.append(conn, event.refund_request_id, event.actor, event.action,
                              {**event.detail, **({"status": event.status.value} if event.status else {}),
                               **({"reservation_released": True} if event.release_reservation else {})})

    async def idle_open(self, idle_seconds: float, limit: int,
                        after: tuple[datetime, str] | None = None) -> list[CaseRow]:
        """Cases whose workflow still has to move them (tracking cases too), untouched for
        `idle_seconds` and not swept yet, by last update then id, from `after` on: what the
        closed-workflow sweep asks Temporal about."""
        async with self._db.connection() as conn:
            rows = await idle_unswept(
                conn, table="refund_cases", key="refund_request_id", still_open=sql.SQL("status <> ALL(%s)"),
                open_values=[s.value for s in SETTLED_STATUSES],
                idle_seconds=idle_seconds, limit=limit, after=after)
        return self._typed(rows)

    async def mark_end_seen(self, case_id: str, seen_updated_at: datetime) -> None:
        """See `sweep.mark_end_seen`."""
        async with self._db.connection() as conn:
            await mark_end_seen(conn, table="refund_cases", key="refund_request_id", case_id=case_id,
                                seen_updated_at=seen_updated_at)

    async def sweep_closed(self, case_id: str, *, workflow_status: str, provider_holds: bool | None,
                           found: ProviderRefund | None, seen_updated_at: datetime) -> bool:
        """A case whose workflow closed while it was open, in one transaction: `ops_review`,
        a reconciliation break for ops (its own completed run, `ops_review`, never dispatched
        to a workflow), the audit row and the ops notice; the reservation is released only
        when the provider certainly holds no refund (`provider_holds` False). False when the
        case moved since the sweep read it (`seen_updated_at`: a workflow started since, or an
        attempt still running on a worker began a submit: what the sweep asked Temporal and
        the provider is stale, and the next pass reads it again), reached a final status, or
        another worker's sweep took it first."""
        async with self._db.transaction() as conn:
            cur = await conn.execute("SELECT * FROM refund_cases WHERE refund_request_id = %s FOR UPDATE",
                                     (case_id,))
            row = await cur.fetchone()
            if (row is None or row["status"] in {s.value for s in SETTLED_STATUSES}
                    or row["updated_at"] != seen_updated_at):
                return False
            run_id = f"case-sweep-{case_id}"
            await open_incident_run(conn, run_id, row["provider"], "case-sweep")
            provider_status = found.status.value if found else row["provider_status"] or "none"
            evidence = {"workflow_status": workflow_status, "case_status": row["status"],
                        "reserved_amount": row["reserved_amount"], "provider_holds_refund": provider_holds,
                        "provider_refund_id": found.refund_id if found else row["provider_refund_id"]}
            cur = await conn.execute(
                "INSERT INTO reconciliation_breaks (provider, object_id, break_class, refund_request_id,"
                " chain, charge_id, amount, currency, provider_status, raw_status, failure_reason,"
                " case_status, object_created_at, evidence, first_run_id, state)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'ops_review')"
                " ON CONFLICT DO NOTHING RETURNING id",
                (row["provider"], case_id, BreakClass.WORKFLOW_CLOSED.value, case_id, case_id,
                 row["charge_id"], row["amount"], row["currency"], provider_status,
                 found.raw_status if found else provider_status, row["failure_reason"], row["status"],
                 row["created_at"], jsonb(evidence), run_id))
            opened = await cur.fetchone()
            if opened is None:  # another worker's sweep handed it over first
                return False
            release = provider_holds is False and row["provider_refund_id"] is None
            await self._set_status(conn, case_id, CaseStatus.OPS_REVIEW, release=release)
            detail = {**evidence, "break_id": opened["id"],
                      **({"reservation_released": True} if release else {})}
            await AuditLog.append(conn, case_id, "case-sweep", "workflow_closed_case_swept", detail)
            await OutboxRepository.queue_in(conn, NoticeInput(
                refund_request_id=case_id, kind="workflow_closed", audience="operator",
                dedup_key=f"{case_id}:workflow_closed", detail=detail))
            return True

    async def record_decision(self, case_id: str, decision: dict[str, Any]) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE refund_cases SET decision = %s, updated_at = now() WHERE refund_request_id = %s",
                (jsonb(decision), case_id))
            await AuditLog.append(conn, case_id, "policy", "policy_decision", decision)

    async def begin_submission(self, case_id: str, idempotency_key: str,
                               writes: tuple[CaseWrite, ...] = (), *,
                               charge_now: ChargeSnapshot | None = None) -> bool:
        """Records the intent to call the provider before the call (with the case's `writes`,
        `SubmitInput.intent_writes`: the deciding approval's and `execution_started`, on the
        first attempt); returns True when an earlier attempt already started, so the caller
        must look before it leaps. `charge_now`: a bank transfer's charge read again, its
        amount checked once more against what is left (nobody but us guards one; the charge
        may have been refunded elsewhere while it waited for approval)."""
        refusal = None
        async with self._db.transaction() as conn:
            left = None
            if charge_now is not None:  # the charge's lock first, as every reservation takes it
                left = _remaining(charge_now, *_without(case_id, *await self._charge_holds(
                    conn, charge_now, RefundMethod.BANK_TRANSFER)))
            row = await self._locked_submission(conn, case_id)
            started = row is not None and row["submission_started_at"] is not None
            if row is None or row["status"] in CLOSED_STATUSES or row["reserved_amount"] < row["amount"]:
                # an attempt that outlived its case (stuck past its timeout while ops
                # cancelled it, or it was denied): it may not call the provider
                raise SubmissionRefused(f"case {case_id} is {row['status'] if row else 'gone'} with "
                                        f"{row['reserved_amount'] if row else 0} held: not submitted")
            # on the first attempt: a later one follows what an earlier may have made
            if not started and (own := await self._approved_by_whoever_asked(conn, case_id, row, writes)):
                refusal = (f"{', '.join(own)} asked for case {case_id} (its requester or trigger "
                           "identity) and approved it: not submitted")
            elif not started and (revoked := await AccessRepository.approvals_revoked_in(
                    conn, case_id, opened_by=APPROVAL_REQUESTED, deciding=_sealed_grants(writes))):
                refusal = (f"a token of {', '.join(revoked)}, live when they approved case {case_id}, was "
                           "revoked since: their approval counts no more; not submitted")
            elif not started and row["parent_refund_request_id"] is not None and (
                    elsewhere := await _reissue_paid_elsewhere(conn, case_id)):
                refusal = (f"the request's money moved since this reissue was asked: {elsewhere}; "
                           "not submitted (the reissue would pay it again)")
            elif not started and left is not None and row["amount"] > left:
                refusal = (f"amount {row['amount']} exceeds remaining refundable {left} as the provider "
                           "shows the charge now (refunded elsewhere, or no longer refundable, since this "
                           "was validated): not submitted")
            if refusal is not None:
                await self._set_status(conn, case_id, CaseStatus.OPS_REVIEW)
                await AuditLog.append(conn, case_id, "system", "submission_refused", {"reason": refusal})
            elif not started:
                await self._write_in(conn, writes)
                await conn.execute(
                    "UPDATE refund_cases SET submission_started_at = now(), status = %s,"
                    " updated_at = now() WHERE refund_request_id = %s",
                    (CaseStatus.EXECUTING.value, case_id))
            else:  # a resubmit's create may land too: the case is not idle (the sweep's read is stale)
                await conn.execute("UPDATE refund_cases SET updated_at = now() WHERE refund_request_id = %s",
                                   (case_id,))
            if refusal is None:
                await AuditLog.append(conn, case_id, "system", SUBMIT_STARTED,
                                      {"idempotency_key": idempotency_key, "earlier_attempt": started})
        if refusal is not None:  # after the commit: the case waits in ops review, audited
            raise SubmissionRefused(refusal)
        return started

    async def reserve_and_decide(
            self, request: RefundRequest, charge: ChargeSnapshot,
            decide: Callable[[ValidationResult, ChargePriors], PolicyDecision],
            step_key: str | None = None) -> Vetted:
        """Validation's reservation and, when it holds, the policy's decision with its audit
        row, in one transaction. `decide` is the pure policy: it gets the validation and the
        charge's other requests as it reads them (`ChargePriors`). A retry finds both stored; a
        run again under a `step_key` that answered before gets that answer (see `reject`)."""
        case_id = request.refund_request_id

        async def reserving_and_deciding(conn: Conn) -> Vetted:
            if step_key is not None and (ended := await _ended(conn, case_id)) is not None:
                return ended
            validation = await self._reserve_in(conn, request, charge)
            if not validation.ok:
                return Vetted(validation=validation)
            cur = await conn.execute(
                "SELECT decision FROM refund_cases WHERE refund_request_id = %s", (case_id,))
            row = await cur.fetchone()
            if row is not None and row["decision"] is not None:
                return Vetted(validation=validation, decision=PolicyDecision.model_validate(row["decision"]))
            decision = decide(validation, await _charge_priors(conn, request.provider, request.charge_id,
                                                               case_id, charge.amount_refunded))
            stored = decision.model_dump(mode="json")
            await conn.execute(
                "UPDATE refund_cases SET decision = %s, updated_at = now() WHERE refund_request_id = %s",
                (jsonb(stored), case_id))
            await AuditLog.append(conn, case_id, "policy", "policy_decision", stored)
            return Vetted(validation=validation, decision=decision)
        return await once(self._db, step_key, case_id, Vetted, reserving_and_deciding)

    async def write_case_steps(self, steps: CaseWrites, step_key: str | None = None, *,
                               after_commit: Callable[[CaseWritten], None] | None = None) -> CaseWritten:
        """A case step's writes in one transaction: the ledger posting (once per posting
        key), then each notice (once per dedup key) and event (status and audit row) in
        order; none of it when `unless_submitted` and a submit began, and no notice when
        the case has moved on to ops review or closed. Under a `step_key`
        (a local activity's, the same in each run of the step) a step that ran before answers
        as it did and writes nothing (`steps.once`): events carry no key of their own.
        `after_commit` gets the answer of a run that wrote (not of one answering as before)."""
        return await once(self._db, step_key, steps.refund_request_id, CaseWritten,
                          lambda conn: self._write_steps_in(conn, steps), after_commit=after_commit)

    async def _write_steps_in(self, conn: Conn, steps: CaseWrites) -> CaseWritten:
        writes = steps.writes
        if steps.unless_submitted:
            row = await self._locked_submission(conn, steps.refund_request_id)
            if row is not None and row["submission_started_at"] is not None:
                return CaseWritten()
            if row is not None and row["status"] in CLOSED_STATUSES | {CaseStatus.OPS_REVIEW}:
                # the case moved on under the submit (refused, swept): the deciding approval
                # is on record, and nobody is told the refund goes ahead
                writes = tuple(write for write in writes if write.notice is None)
        posting = None
        if steps.posting is not None:
            await conn.execute("SET LOCAL lock_timeout = '5s'")  # fail fast, let Temporal retry
            posting = await LedgerRepository.post_in(conn, steps.posting)
        actions = await self._write_in(conn, writes)
        return CaseWritten(posting=posting, posted=steps.posting.kind if steps.posting else None,
                           actions=actions)

    @classmethod
    async def _write_in(cls, conn: Conn, writes: tuple[CaseWrite, ...]) -> tuple[str, ...]:
        """Each notice (once per dedup key) and event (status and audit row) in order; the
        events' actions."""
        actions: list[str] = []
        for write in writes:
            if write.notice is not None:
                await OutboxRepository.queue_in(conn, write.notice)
            elif write.event is not None:  # the refund workflow's steps only
                await cls.record_event_in(conn, write.event, applied=True)
                actions.append(write.event.action)
        return tuple(actions)

    @staticmethod
    async def _locked_submission(conn: Conn, case_id: str) -> dict[str, Any] | None:
        """What a submit decides on, the case row locked until the transaction ends."""
        cur = await conn.execute(
            "SELECT submission_started_at, status, amount, reserved_amount, requester,"
            " trigger_identities, parent_refund_request_id FROM refund_cases"
            " WHERE refund_request_id = %s FOR UPDATE", (case_id,))
        return await cur.fetchone()

    @staticmethod
    async def _approved_by_whoever_asked(conn: Conn, case_id: str, row: Mapping[str, Any],
                                         writes: tuple[CaseWrite, ...]) -> list[str]:
        """Who is behind the case (its row's requester and trigger identities; for a reissue,
        its family's too, read again: `_family_behind`) and granted it an approval, recorded
        or among the deciding writes. The round bars them too, but it believes the requester
        its run was started with: a run started again in Temporal naming another let the
        real requester approve her own refund. Read here, at the money's gate, from the case
        as the relay recorded it."""
        behind = [row["requester"], *(row["trigger_identities"] or ())]
        if row["parent_refund_request_id"] is not None:
            behind += await _family_behind(conn, case_id)
        deciding = [w.event.actor for w in writes
                    if w.event is not None and w.event.action == APPROVAL_GRANTED and w.event.actor in behind]
        cur = await conn.execute(
            "SELECT DISTINCT approver FROM case_approvals WHERE chain = %s AND action = %s"
            " AND approver = ANY(%s)", (case_id, APPROVAL_GRANTED, behind))
        return sorted({*deciding, *(r["approver"] for r in await cur.fetchall())})

    async def record_provider_refund(self, case_id: str, refund: ProviderRefund, action: str,
                                     detail: dict[str, Any] | None = None) -> None:
        """Stores what the provider reported for the case's refund, with its audit row. A
        read of the refund the case holds that would move its status back (`STALE`,
        `IMPOSSIBLE`: an attempt that read before its retry and committed after it) is only
        recorded, marked stale: a provider's older word never overwrites a newer one."""
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "SELECT provider_refund_id, provider_status FROM refund_cases WHERE refund_request_id = %s"
                " FOR UPDATE", (case_id,))
            held = await cur.fetchone()
            stale = held is not None and held["provider_refund_id"] == refund.refund_id \
                and held["provider_status"] is not None and classify_status_change(
                    ProviderRefundStatus(held["provider_status"]), refund.status) in BACKWARDS
            if not stale:
                await conn.execute(
                    "UPDATE refund_cases SET provider_refund_id = %s, provider_status = %s,"
                    " failure_reason = %s, updated_at = now() WHERE refund_request_id = %s",
                    (refund.refund_id, refund.status.value, refund.failure_reason, case_id))
            await AuditLog.append(conn, case_id, f"provider:{refund.provider}", action,
                                  {**refund.model_dump(mode="json"), **(detail or {}),
                                   **({"stale": True} if stale else {})})

    async def decisions_since(self, since: datetime) -> list[CaseRow]:
        """Cases with a stored policy decision, newest last (for policy simulation)."""
        return self._typed(await self._db.fetch_all(
            "SELECT * FROM refund_cases WHERE decision IS NOT NULL AND created_at >= %s"
            " ORDER BY created_at", (since,)))

    async def children(self, case_id: str) -> list[CaseRow]:
        return self._typed(await self._db.fetch_all(
            "SELECT * FROM refund_cases WHERE parent_refund_request_id = %s ORDER BY created_at",
            (case_id,)))

    # -- the console's reads -------------------------------------------------------------

    async def find(self, wanted: CaseFilter) -> list[CaseRow]:
        """Newest first. `search` matches a refund request id, charge id, provider refund id or
        a ticket's id or number exactly, or a refund request id by prefix."""
        clauses: list[str] = []
        params: list[Any] = []

        def where(clause: str, *values: Any) -> None:
            clauses.append(clause)
            params.extend(values)

        if wanted.statuses:
            where("status = ANY(%s)", list(wanted.statuses))
        if wanted.requester:
            where("requester = %s", wanted.requester)
        if wanted.provider:
            where("provider = %s", wanted.provider)
        if wanted.currency:
            where("currency = %s", wanted.currency)
        if wanted.min_amount is not None:
            where("amount >= %s", wanted.min_amount)
        if wanted.max_amount is not None:
            where("amount <= %s", wanted.max_amount)
        if wanted.older_than is not None:
            where("created_at <= now() - %s", wanted.older_than)
        if wanted.newer_than is not None:
            where("created_at >= now() - %s", wanted.newer_than)
        if wanted.before is not None:
            where("(created_at, refund_request_id) < (%s, %s)", *wanted.before)
        if wanted.search:
            prefix = wanted.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where("(%s IN (refund_request_id, charge_id, provider_refund_id)"
                  " OR refund_request_id LIKE %s OR refund_request_id IN (SELECT t.refund_request_id"
                  " FROM case_tickets t WHERE %s IN (t.external_id, t.number)))",
                  wanted.search, prefix, wanted.search)
        query = "SELECT * FROM refund_cases"
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY created_at DESC, refund_request_id DESC LIMIT %s"
        return self._typed(await self._db.fetch_all(query, [*params, wanted.limit]))

    async def providers(self) -> list[str]:
        rows = await self._db.fetch_all("SELECT DISTINCT provider FROM refund_cases ORDER BY provider")
        return [r["provider"] for r in rows]

    @staticmethod
    def _typed(rows: list[dict[str, Any]]) -> list[CaseRow]:
        return [CaseRow.from_row(row) for row in rows]


def _remaining(charge: ChargeSnapshot, holds: Mapping[str, int], uncounted: int) -> int:
    """What the charge can still refund. What the provider reports refunded includes the
    refunds our cases made there (a submit whose answer was lost too, for a provider refund:
    the provider refuses an over-refund itself) and the ones tracking cases follow, but never
    a hold with neither a submit begun nor a provider refund (awaiting approval, validating)
    or a bank transfer's: those add to it. Never less than all our holds."""
    return charge.amount_captured - max(sum(holds.values()), charge.amount_refunded + uncounted)


def _without(case_id: str, holds: Mapping[str, int], uncounted: int) -> tuple[dict[str, int], int]:
    """The charge's holds and uncounted sum but a bank transfer's own (which is uncounted)."""
    own = holds.get(case_id, 0)
    return {k: v for k, v in holds.items() if k != case_id}, uncounted - own
