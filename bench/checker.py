"""The reliability suite's end-of-scenario checker: compares our records with the provider's.

Run after every scenario with a bounded wait. It reads the provider's refunds per charge
(not by our metadata, so a refund nobody asked for is seen too) and holds each request the
scenario sent to what the provider did:

- exactly one provider refund when our case says money moved, none when it says it did not
  (rejected, denied, expired, declined before acting), and no refund on a charge that no
  request of ours names; the refund is for the case's amount and currency;
- money moved only as the case's policy decision allowed: a decision that asked for people
  has, before the execution started, approvals from as many distinct people (never the
  requester) as its tier's slots, each role's count met, and no denial; a case still waiting
  for an approver has no refund at the provider;
- the case's final status is the provider's truth; the ledger's net for the case is what
  the provider refunded; a closed case holds no reservation; the audit chain verifies,
  and a case's one-time rows (validation, decision, execution start, success) are in its
  trail once (a step run again by a retried workflow task or a killed worker writes
  nothing twice);
- every request is accounted for: accepted and ended, or refused with the status the
  scenario expected; a case left open must be waiting for a person (reported by name), with
  a workflow to take that person's word (running; a case left in ops review by a workflow
  that completed is ops' by design);
- every accepted webhook receipt since the scenario began was processed.

Each violation names the case, the expected and the observed, and the scenario's seed.
"""

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from domain.models import CLOSED_STATUSES, CaseStatus
from tests.harness import Stack

FINAL = frozenset({"succeeded", "refund_failed", "refund_canceled", "rejected", "denied", "expired"})
# Open by design until a person acts: reported by name, not a violation.
WAITS_FOR_PERSON = frozenset({CaseStatus.AWAITING_APPROVAL.value, CaseStatus.OPS_REVIEW.value})
# What a case may say when the provider holds no refund for it.
NO_MONEY = frozenset({"rejected", "denied", "expired", "refund_failed"})
# The case status that reports each provider status (final ones, and those still moving).
PROVIDER_TRUTH = {"succeeded": "succeeded", "failed": "refund_failed", "canceled": "refund_canceled",
                  "pending": "pending", "requires_action": "requires_action"}
RUNNING, COMPLETED = WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.COMPLETED
# Rows a case's trail holds at most once, however often its steps run.
ONCE_PER_CASE = frozenset({"validation_passed", "validation_rejected", "policy_decision", "execution_started",
                           "refund_succeeded"})
# The account a refund debits when it settles and credits when it is reversed.
REFUND_ACCOUNT = "refunds_contra_revenue"


@dataclass
class Sent:
    """One request a scenario sent: the case it names, its charge, what it expected back."""

    case_id: str
    charge: str
    answered: int
    expected: int = 202


@dataclass
class Outcome:
    """What a scenario saw: how many cases it drove and which invariants broke."""

    scenario: str
    cases: int = 0
    seed: int | None = None
    violations: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    waiting_for_person: list[str] = field(default_factory=list)

    def violation(self, subject: str, expected: object, observed: object) -> None:
        self.violations.append(f"[seed {self.seed}] {subject}: expected {expected}, observed {observed}")


async def _workflow_status(stack: Stack, case_id: str) -> WorkflowExecutionStatus | None:
    """The case's workflow status; None when it never started (a refused request, or a case
    planted by a test). Temporal not answering raises: it is no answer about the workflow."""
    try:
        described = await stack.client.get_workflow_handle(case_id).describe()
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            return None
        raise
    return described.status


async def _unprocessed_receipts(stack: Stack, since: datetime) -> list[dict[str, Any]]:
    async with stack.store.database.transaction() as conn:
        cur = await conn.execute(
            "SELECT id, event_id, event_type FROM webhook_receipts WHERE verdict = 'accepted'"
            " AND processed_at IS NULL AND received_at >= %s ORDER BY id", (since,))
        return list(await cur.fetchall())


async def _settled(stack: Stack, accepted: list[str], since: datetime) -> bool:
    """Every accepted case ended (or waits for a person) with its workflow closed, and every
    receipt was processed: nothing is still moving."""
    for case_id in accepted:
        row = await stack.store.cases.get(case_id)
        if row is None or row["status"] not in FINAL | WAITS_FOR_PERSON:
            return False
        try:
            status = await _workflow_status(stack, case_id)
        except RPCError:  # Temporal not answering yet (a restart): not settled as far as we know
            return False
        if row["status"] in FINAL and status == RUNNING:
            return False
    return not await _unprocessed_receipts(stack, since)


def _ledger_net(lines: Sequence[Mapping[str, Any]]) -> int:
    return sum(int(x["debit"]) - int(x["credit"]) for x in lines if x["account"] == REFUND_ACCOUNT)


async def check(stack: Stack, outcome: Outcome, sent: list[Sent], *, since: datetime,
                timeout: float) -> None:
    """Waits (at most `timeout` seconds) for the scenario's cases to settle, then records
    every broken invariant in `outcome.violations`."""
    for request in sent:
        if request.answered != request.expected:
            outcome.violation(f"{request.case_id} request", f"HTTP {request.expected}",
                              f"HTTP {request.answered}")
    accepted = [r for r in sent if r.answered == 202]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await _settled(stack, [r.case_id for r in accepted], since):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    by_charge: dict[str, list[dict[str, Any]]] = {}
    for charge in {r.charge for r in sent}:
        by_charge[charge] = await stack.provider_refunds(charge)
    known = {r.case_id for r in sent}
    for charge, refunds in by_charge.items():
        for stray in (r for r in refunds if r["metadata"].get("refund_request_id") not in known):
            outcome.violation(f"charge {charge}", "no refund without a request of ours",
                              f"refund {stray['id']} ({stray['status']}, {stray['amount']})")
    moved = 0
    for request in accepted:
        moved += await _check_case(stack, outcome, request, by_charge[request.charge])
    outcome.counts["provider_refunded"] = moved
    for receipt in await _unprocessed_receipts(stack, since):
        outcome.violation(f"receipt {receipt['id']} ({receipt['event_type']} {receipt['event_id']})",
                          "processed", "accepted but never processed")
    _, problems = await stack.store.audit.verify()
    for problem in problems:  # the scenario's chains (a shared test database holds others)
        if any(problem.startswith((f"chain {case_id} ", f"chain {case_id}:")) for case_id in known):
            outcome.violation("audit chain", "verifies", problem)


async def _check_case(stack: Stack, outcome: Outcome, request: Sent,
                      charge_refunds: list[dict[str, Any]]) -> int:
    """One accepted request against the provider's truth; returns what the provider refunded."""
    case_id = request.case_id
    row = await stack.store.cases.get(case_id)
    if row is None:
        outcome.violation(case_id, "a case for the accepted request", "no case")
        return 0
    status = row["status"]
    refunds = [r for r in charge_refunds if r["metadata"].get("refund_request_id") == case_id]
    refunded = sum(int(r["amount"]) for r in refunds if r["status"] == "succeeded")
    try:
        workflow_status, known = await _workflow_status(stack, case_id), True
    except RPCError as exc:
        outcome.violation(case_id, "its workflow's status", f"Temporal did not answer ({exc})")
        workflow_status, known = None, False
    if status in WAITS_FOR_PERSON:
        outcome.waiting_for_person.append(f"{case_id} ({status})")
        if known and workflow_status != RUNNING and not (status == CaseStatus.OPS_REVIEW.value
                                                         and workflow_status == COMPLETED):
            outcome.violation(case_id, f"a running workflow to take a person's word ({status})",
                              workflow_status.name if workflow_status else "no workflow")
        if status == CaseStatus.AWAITING_APPROVAL.value and refunds:
            outcome.violation(case_id, "no refund while it waits for an approver",
                              [(r["id"], r["status"]) for r in refunds])
    elif status not in FINAL:
        outcome.violation(case_id, "a final status", f"still {status}")
    elif workflow_status == RUNNING:
        outcome.violation(case_id, "its workflow closed", f"still running ({status})")
    for refund in refunds:
        if (int(refund["amount"]), str(refund["currency"]).upper()) != (int(row["amount"]), row["currency"]):
            outcome.violation(case_id, f"a refund of {row['amount']} {row['currency']} (the case's)",
                              f"refund {refund['id']} of {refund['amount']} {refund['currency']}")
    if len(refunds) > 1:
        outcome.violation(case_id, "one provider refund",
                          f"{len(refunds)}: {[(r['id'], r['status']) for r in refunds]}")
    elif not refunds and status not in NO_MONEY | WAITS_FOR_PERSON:
        outcome.violation(case_id, f"one of {sorted(NO_MONEY)} (the provider holds no refund)", status)
    elif refunds:
        truth = PROVIDER_TRUTH.get(refunds[0]["status"], refunds[0]["status"])
        if status != truth and status not in WAITS_FOR_PERSON:
            outcome.violation(case_id, f"{truth} (provider refund {refunds[0]['id']} "
                                       f"is {refunds[0]['status']})", status)
    lines = await stack.store.ledger.entries(case_id)
    if sum(x["debit"] for x in lines) != sum(x["credit"] for x in lines):
        outcome.violation(case_id, "a balanced ledger", lines)
    if (net := _ledger_net(lines)) != refunded:
        outcome.violation(case_id, f"ledger net {refunded} (what the provider refunded)", net)
    if status in {s.value for s in CLOSED_STATUSES} and int(row["reserved_amount"]) != 0:
        outcome.violation(case_id, f"reservation released ({status})",
                          f"{row['reserved_amount']} still reserved")
    trail = await stack.store.audit.trail(case_id)
    actions = [e["action"] for e in trail]
    if repeated := sorted({a for a in actions if a in ONCE_PER_CASE and actions.count(a) > 1}):
        outcome.violation(case_id, f"each of {repeated} once in its trail", actions)
    if refunds and (stepped := _approval_stepped_around(row, trail)) is not None:
        outcome.violation(case_id, "money moved only as its policy decision allowed", stepped)
    return refunded


def _approval_stepped_around(row: Mapping[str, Any], trail: Sequence[Mapping[str, Any]]) -> str | None:
    """How the approvals recorded before the execution started fall short of what the case's
    policy decision asked for, or None. Read from the trail and the stored decision alone
    (not the workflow's own count), so a fault in that count is seen."""
    decision = row["decision"]
    if decision is None:
        return "no policy decision"
    if decision["auto_approve"]:
        return None
    started = next((i for i, e in enumerate(trail) if e["action"] == "execution_started"), len(trail))
    before = trail[:started]
    if denied := [e["actor"] for e in before if e["action"] == "approval_denied"]:
        return f"denied by {denied} before the execution started"
    granted = {e["actor"]: set(e["detail"].get("roles", ())) for e in before
               if e["action"] == "approval_granted" and e["actor"] != row["requester"]}
    slots = sum(int(r["count"]) for r in decision["requirements"])
    short = [f"{r['role']} x{r['count']}" for r in decision["requirements"]
             if sum(r["role"] in roles for roles in granted.values()) < int(r["count"])]
    if len(granted) < max(slots, 1) or short:
        return (f"approvals by {sorted(granted)} before the execution started; the tier asks for "
                f"{slots} people{f', short of {short}' if short else ''}")
    return None
