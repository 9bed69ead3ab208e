"""Typed rows the repositories hand to the front ends, instead of a column dict.

A table's row is a frozen dataclass of its columns that also reads as the mapping it was
made from (`row.status` and `row["status"]`, `dict(row)`), so code written against dict
rows keeps working while front ends use the attributes.
"""

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self


class Row(Mapping[str, Any]):
    """A dataclass row readable by column name too."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        """The typed row of a fetched one; a column the class does not name is an error (a
        migration added it: add the field), never silently dropped."""
        return cls(**row)

    def __getitem__(self, column: str) -> Any:
        if column not in self._columns():
            raise KeyError(column)
        return getattr(self, column)

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns())

    def __len__(self) -> int:
        return len(self._columns())

    @classmethod
    def _columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class CaseRow(Row):
    """A refund case (`refund_cases`): what was asked, where it stands, what it holds."""

    refund_request_id: str
    provider: str
    charge_id: str
    amount: int
    currency: str
    merchant_account: str
    reason: str
    evidence: dict[str, Any]
    source: str
    requester: str
    params_hash: str
    status: str
    reserved_amount: int
    provider_refund_id: str | None
    provider_status: str | None
    failure_reason: str | None
    decision: dict[str, Any] | None
    submission_started_at: datetime | None
    created_at: datetime
    updated_at: datetime
    parent_refund_request_id: str | None
    method: str
    trigger_identities: list[str]
    applied_refund_id: str | None
    applied_status: str | None
    workflow_end_seen_at: datetime | None


@dataclass(frozen=True, eq=False)
class ManualRefundRow(Row):
    """The instruction ops carry out for a manual refund (`manual_refunds`), and its outcome."""

    id: str
    refund_request_id: str
    charge_id: str
    amount: int
    currency: str
    method: str
    status: str
    failure_reason: str | None
    created_at: datetime
    confirmed_by: str | None
    confirmed_at: datetime | None


@dataclass(frozen=True, eq=False)
class LedgerLineRow(Row):
    """One line of a case's journal entry (`ledger_lines` with its entry's key and template),
    in minor units of its currency."""

    posting_key: str
    template: str
    account: str
    debit: int
    credit: int
    currency: str


@dataclass(frozen=True, eq=False)
class NoticeRow(Row):
    """A case's notice as its page lists it (`notices`)."""

    kind: str
    audience: str
    detail: dict[str, Any]
    delivered_at: datetime | None


@dataclass(frozen=True, eq=False)
class PayoutCaseRow(Row):
    """A payout exception case (`payout_cases`): its payout, where it stands, what it decided."""

    case_id: str
    payout_id: str
    status: str
    reported_status: str
    failure_code: str | None
    decision: dict[str, Any] | None
    recommendation: dict[str, Any] | None
    ticket_ref: str | None
    reversal_entry_id: int | None
    created_at: datetime
    updated_at: datetime
    workflow_end_seen_at: datetime | None
    reversal_given_up_at: datetime | None


@dataclass(frozen=True, eq=False)
class PayoutListRow(Row):
    """A payout exception case as the payout list shows it: the case, its tier and its payout."""

    case_id: str
    status: str
    reported_status: str
    failure_code: str | None
    ticket_ref: str | None
    tier: str | None
    created_at: datetime
    updated_at: datetime
    payout_id: str
    provider: str
    provider_payout_id: str
    beneficiary_id: str
    amount: int
    currency: str
    payout_status: str


@dataclass(frozen=True, eq=False)
class HoldRow(Row):
    """A hold a payout case placed on its beneficiary (`beneficiary_holds`); active while
    `released_at` is None."""

    case_id: str
    placed_at: datetime
    released_at: datetime | None


@dataclass(frozen=True, eq=False)
class RunRow(Row):
    """A reconciliation run (`reconciliation_runs`): its window, cursor, progress and state."""

    id: str
    provider: str
    task_queue: str
    kind: str
    window_start: datetime
    window_end: datetime
    requested_by: str
    state: str
    cursor: str | None
    cursor_created: datetime | None
    objects_seen: int
    batches: int
    report_files: list[str]
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    phase: str
    warnings: list[str]
    failure: str | None


@dataclass(frozen=True, eq=False)
class BreakRow(Row):
    """A reconciliation break (`reconciliation_breaks`): the provider's object, how it
    differs from our books, and how its exception case ended."""

    id: int
    provider: str
    object_kind: str
    object_id: str
    break_class: str
    refund_request_id: str | None
    chain: str
    charge_id: str
    amount: int
    currency: str
    provider_status: str
    raw_status: str
    failure_reason: str | None
    case_status: str | None
    ledger_delta: int | None
    object_created_at: datetime
    evidence: dict[str, Any]
    first_run_id: str
    found_at: datetime
    state: str
    dispatched_at: datetime | None
    resolved_at: datetime | None
    resolution: dict[str, Any] | None
    reopened: int


@dataclass(frozen=True, eq=False)
class RunBreakRow(BreakRow):
    """A break as one run's report lists it: new in that run, or seen before."""

    new_in_run: bool


@dataclass(frozen=True, eq=False)
class ReceiptRow(Row):
    """A stored webhook delivery as ops list it (`webhook_receipts`, without body and headers)."""

    id: int
    provider: str
    event_id: str | None
    event_type: str | None
    verdict: str
    error: str | None
    workflow_id: str | None
    processed_at: datetime | None


@dataclass(frozen=True, eq=False)
class TokenRow(Row):
    """An API token as ops see it: owner, roles, state, and a short hash prefix that tells
    tokens apart (it matches `token_fingerprint` in refusals), never the secret itself."""

    id: int
    user_name: str
    roles: list[str]
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None
    fingerprint: str


@dataclass(frozen=True, eq=False)
class TicketRow(Row):
    """A case's ticket in an outside system (`case_tickets`), one per system and purpose."""

    system: str
    purpose: str
    external_id: str
    number: str | None
    url: str | None


@dataclass(frozen=True, eq=False)
class DeliveryRow(Row):
    """One channel's delivery of a case's notice (`notice_deliveries` with its notice)."""

    kind: str
    audience: str
    channel: str
    status: str
    attempts: int
    external_id: str | None
    last_error: str | None


@dataclass(frozen=True, eq=False)
class AdviceRow(Row):
    """The advisor's stored answer for a case (`case_advice`): the advice, or why there is none."""

    refund_request_id: str
    source: str
    advice: dict[str, Any] | None
    error: str | None
    context_sha256: str
    created_at: datetime


@dataclass(frozen=True)
class ApprovalStep:
    """One step of a case's approval rounds, from the approvals projection: asked
    (`approval_requested`), granted with the approver's roles, denied, refused, expired."""

    approver: str
    action: str
    roles: frozenset[str]
    reason: str
    occurred_at: datetime
