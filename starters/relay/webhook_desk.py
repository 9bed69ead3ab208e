"""The webhook path of the relay: receipt first, then verify, dedup, route; plus replay,
re-drive and coverage, which all go through that same path.

A delivery is acknowledged (2xx) only after its receipt is durable and its workflow was
started or signalled. A replay re-feeds a stored body and headers as a new receipt
(`replay_of`) verified at the original reception time, so the signature is still checked
and the `(provider, event_id)` gate keeps every event acting once. Re-driving an accepted
receipt that never reached its workflow (a crash between receipt and signal) is a replay.
"""

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from ipaddress import IPv6Address, ip_address
from typing import Any

from pydantic import ValidationError
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from adapters import metrics, receipts
from adapters.break_dispatch import reconcile_at_once
from adapters.config import Settings
from adapters.db import CaseCreation, Store, StoredReceipt
from adapters.db.rows import CaseRow
from adapters.providers.base import (
    BatchedNotifications,
    NotificationRecorder,
    ProviderAdapter,
    WebhookRejected,
)
from adapters.telemetry import bind_case
from domain.events import NO_REFUND_PREFIX, OPS_RESOLUTION, tells_nothing_new, tracking_case_id
from domain.lifecycle import FINAL_PROVIDER_STATUSES
from domain.models import (
    CLOSED_STATUSES,
    CaseStatus,
    EventKind,
    LedgerKind,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundRequest,
)
from domain.payments import PaymentEvent
from domain.payouts import (
    PAID_AFTER_FAILURE,
    PAID_AFTER_REVERSAL,
    WITHOUT_OPEN_CASE,
    PayoutEvent,
    ProviderPayout,
    ProviderPayoutStatus,
    paid_report,
    paid_report_notice,
    payout_case_id,
)
from domain.reconciliation import SHOWN_PENDING
from starters.actions.provider_wait import WAIT_CLOSED
from starters.actions.starting import (
    entry_refusal,
    open_payout_case,
    request_from_event,
    start_refund,
    track_refund,
)
from starters.relay.processed import ProcessedEvents
from workflows.payout import PayoutReversalWorkflow
from workflows.refund import RefundWorkflow

log = logging.getLogger("relay")

REJECTION_STATUS = {"too_large": 413, "unknown_provider": 404, "unknown_type": 202, "malformed": 400,
                    "unreadable": 400, "invalid_request": 400, "unexpected_status": 422,
                    "forbidden_source": 403, "bad_signature": 401, "stale": 401, "foreign_account": 202,
                    "sample": 202}
LOUD_VERDICTS = frozenset({"unknown_type", "unexpected_status", "foreign_account", "unreadable",
                           "invalid_request"})


def _coverage_entry(handled: frozenset[str]) -> dict[str, Any]:
    return {"handled": sorted(handled), "arrived": {}, "unknown_types": [], "never_seen": [],
            "rejected": {}}


def actor_of(event: ProviderEvent | PayoutEvent | PaymentEvent) -> str:
    """Who acts, in the audit and as a request's requester, when a provider's event does."""
    return f"provider:{event.provider}"


async def first_delivery_done(store: Store, settings: Settings, provider: str, event_id: str | None,
                              duplicate: StoredReceipt) -> bool:
    """Whether a duplicate's first delivery, unprocessed when the duplicate was stored, reached
    its workflow within the wait (`ReceiptRepository.first_done`); when not, the duplicate
    re-drives it, which is counted and logged: that first delivery's relay crashed or failed."""
    if await store.receipts.first_done(duplicate, settings.webhook_duplicate_wait_seconds,
                                       settings.webhook_redrive_after_seconds):
        return True
    metrics.DUPLICATE_REDRIVES.labels(provider).inc()
    log.warning("first receipt %s of %s %s still unprocessed (received %.0f s before its duplicate %s,"
                " which re-drives it)", duplicate.first_receipt_id, provider, event_id,
                duplicate.first_age_seconds, duplicate.receipt_id)
    return False


ENDING_ACTIONS = frozenset({"refund_failed", "refund_canceled", "refund_failed_after_success"})
"""The case actions that record a provider refund failing or cancelled (with their source)."""
OPS_RESOLUTION_SOURCE = f"webhook:{OPS_RESOLUTION}."
"""How the source of a status ops gave when resolving a notification wait begins."""


@dataclass(frozen=True)
class IngestResult:
    """What the relay answers for one delivery (or replay)."""

    status_code: int
    receipt_id: int
    verdict: str
    workflow_id: str | None = None
    detail: str | None = None
    replay_of: int | None = None
    acknowledgement: str | None = None
    """A provider's required plain-text answer to a 2xx (Adyen's `[accepted]`), else JSON."""

    def body(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"receipt_id": self.receipt_id, "verdict": self.verdict}
        if self.replay_of is not None:
            answer["replay_of"] = self.replay_of
        if self.detail is not None:
            answer["detail"] = self.detail
        else:
            answer["workflow_id"] = self.workflow_id
        return answer


TEMPORAL_AWAY = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED})
"""Temporal not answering: a re-drive pass that meets it tried nothing (no receipt's fault)."""
def as_held(event: ProviderEvent, holder: CaseRow) -> ProviderEvent:
    """A status event naming only its refund (Rainforest tabulates refund.succeeded, .failed
    and .canceled as its id, status and time), read as of the case holding that refund: the
    charge, amount and currency that case asked the refund for, as an ops resolution reads
    them. Before, such an event was unreadable and the case never heard its refund end."""
    if event.kind is not EventKind.REFUND_STATUS or event.status is None or event.as_refund() is not None:
        return event
    return event.model_copy(update={
        "charge_id": holder["charge_id"], "amount": holder["amount"], "currency": holder["currency"],
        "merchant_account": event.merchant_account or holder["merchant_account"]})


def failure_read_by_ops(trail: list[dict[str, Any]]) -> bool:
    """Whether the failure a case's trail ends on was ops' reading of the provider, not the
    provider's word: an ops resolution the follow loop applied (its source names it), or one
    a notification wait took (then the failure's source is the wait's read, `verify_state`
    or `provider_status`, never a webhook), with no provider notification taken since."""
    taken_from_ops = read_by_ops = False
    for entry in trail:
        if entry["action"] == WAIT_CLOSED:  # the wait took the event that ends it
            taken_from_ops = str(entry["detail"].get("event_type", "")).startswith(f"{OPS_RESOLUTION}.")
        elif entry["action"] in ENDING_ACTIONS:
            source = str(entry["detail"].get("source", ""))
            read_by_ops = source.startswith(OPS_RESOLUTION_SOURCE) or (
                taken_from_ops and not source.startswith("webhook:"))
    return read_by_ops


class WebhookDesk:
    """Ingests deliveries for the relay, the replay and re-drive commands alike."""

    def __init__(self, store: Store, client: Client, providers: Mapping[str, ProviderAdapter],
                 settings: Settings) -> None:
        self._store = store
        self._client = client
        self._providers = providers
        self._settings = settings
        self._processed = ProcessedEvents()

    def _source_allowed(self, provider_name: str, peer: str) -> bool:
        networks = self._settings.webhook_allowed_sources.get(provider_name)
        if not networks:
            return True
        try:
            address = ip_address(peer)
        except ValueError:
            return False
        # a dual-stack socket (bound to ::) sees an IPv4 peer as ::ffff:a.b.c.d, which no
        # IPv4 network contains: an IPv4 address and its mapped form are one peer, whichever
        # form the allowlist names
        other = address.ipv4_mapped if isinstance(address, IPv6Address) else IPv6Address(f"::ffff:{address}")
        return any(form in network for form in (address, other) if form is not None for network in networks)

    def _parse(self, provider_name: str, headers: Mapping[str, str], body: bytes | None, now: float,
               peer: str | None, source_refused: bool = False
               ) -> tuple[ProviderEvent | PayoutEvent | PaymentEvent, RefundRequest | None]:
        """Verifies and normalises, or raises WebhookRejected with the receipt's verdict; a
        provider's refund request comes with the request it asks for, built once here.
        `source_refused`: a replay of a delivery whose sender was not an allowed source (a
        replay has no sender to check, and must not vouch for one that was refused)."""
        if body is None:
            raise WebhookRejected("too_large", f"body exceeds {self._settings.webhook_max_body_bytes} bytes")
        provider = self._providers.get(provider_name)
        if provider is None:
            raise WebhookRejected("unknown_provider", f"no provider {provider_name!r}")
        if peer is not None and not self._source_allowed(provider_name, peer):
            raise WebhookRejected("forbidden_source", f"{peer} is not an allowed source for {provider_name}")
        if source_refused:
            raise WebhookRejected("forbidden_source", "a replay of a delivery whose sender was not an "
                                  f"allowed source for {provider_name}")
        event = provider.parse_webhook(headers, body, now)
        if receipts.unstorable(event):
            raise WebhookRejected("unreadable", "the event holds text PostgreSQL cannot store (NUL or a "
                                  "lone surrogate)", event_id=receipts.storable(event.event_id),
                                  event_type=receipts.storable(event.event_type))
        if isinstance(event, ProviderEvent) and event.kind is EventKind.REFUND_REQUESTED:
            try:
                request = request_from_event(event)
            except ValidationError as exc:
                raise WebhookRejected("invalid_request", f"invalid refund request: {exc.errors()[0]['msg']}",
                                      event_id=event.event_id, event_type=event.event_type) from None
            if refused := entry_refusal(self._providers, provider_name, request.amount, request.currency,
                                        request.refund_request_id):
                raise WebhookRejected("invalid_request", refused[1], event_id=event.event_id,
                                      event_type=event.event_type)
            return event, request
        return event, None

    async def ingest(self, provider_name: str, headers: Mapping[str, str], body: bytes | None, *,
                     now: float, peer: str | None, replay_of: int | None = None,
                     source_refused: bool = False) -> IngestResult:
        """Receipt, verdict, dedup, then start or signal; the result says what to answer.
        A provider that requires an acknowledgement text gets it on every 2xx. A body that
        carries several events is taken as one delivery per event (each its own receipt); the
        answer is the first refused one's (the provider sends the whole body again, and the
        events that acted are duplicates then), else the first one's."""
        provider = self._providers.get(provider_name)
        parts = None
        if (isinstance(provider, BatchedNotifications) and body and not source_refused
                and (peer is None or self._source_allowed(provider_name, peer))):
            parts = provider.split_batch(body)  # a stranger's batch is one refusal
        results = [await self._ingest(provider_name, headers, part, now=now, peer=peer,
                                      replay_of=replay_of, source_refused=source_refused)
                   for part in parts or [body]]
        result = next((r for r in results if not 200 <= r.status_code < 300), results[0])
        ack = getattr(provider, "acknowledgement", None)
        if ack is not None and 200 <= result.status_code < 300:
            return replace(result, acknowledgement=ack)
        return result

    async def _ingest(self, provider_name: str, headers: Mapping[str, str], body: bytes | None, *,
                      now: float, peer: str | None, replay_of: int | None,
                      source_refused: bool = False) -> IngestResult:
        kept_headers = receipts.storable_headers(headers)
        digest = hashlib.sha256(body or b"").hexdigest()
        try:
            event, request = self._parse(provider_name, headers, body, now, peer, source_refused)
        except WebhookRejected as rejection:
            stored = await self._store.receipts.store(
                provider=receipts.storable(provider_name),
                event_id=rejection.event_id and receipts.storable(rejection.event_id),
                event_type=rejection.event_type and receipts.storable(rejection.event_type), body=body,
                body_sha256=digest, headers=kept_headers, verdict=rejection.verdict,
                error=receipts.storable(rejection.message), replay_of=replay_of)
            label = provider_name if provider_name in self._providers else "unknown"
            metrics.RECEIPTS.labels(label, rejection.verdict).inc()
            if rejection.verdict == "unknown_type":
                metrics.UNKNOWN_EVENT_TYPES.labels(label, (rejection.event_type or "")[:64]).inc()
            level = logging.ERROR if rejection.verdict in LOUD_VERDICTS else logging.WARNING
            log.log(level, "webhook %s rejected (%s, receipt %s): %s", provider_name, rejection.verdict,
                    stored.receipt_id, rejection.message)
            return IngestResult(REJECTION_STATUS[rejection.verdict], stored.receipt_id,
                                rejection.verdict, detail=rejection.message, replay_of=replay_of)
        first = self._processed.first_receipt(provider_name, event.event_id) if replay_of is None else None
        if first is not None:
            stored = await self._store.receipts.store_known_duplicate(
                provider=provider_name, event_id=event.event_id, event_type=event.event_type, body=body,
                body_sha256=digest, headers=kept_headers, first_receipt_id=first)
        else:
            opens = (request, actor_of(event)) if request is not None else None
            stored = await self._store.receipts.store(
                provider=provider_name, event_id=event.event_id, event_type=event.event_type, body=body,
                body_sha256=digest, headers=kept_headers, verdict="accepted", error=None,
                replay_of=replay_of, opens=opens)
        metrics.RECEIPTS.labels(provider_name, stored.verdict).inc()
        if isinstance(event, PayoutEvent):
            await self._payout_receipt(event, stored)
        if stored.verdict == "duplicate":
            metrics.DUPLICATES.labels(provider_name).inc()
            # DEBUG: the receipt (verdict, first receipt) and the metric keep it; a retry
            # storm would otherwise be a log storm too
            log.debug("duplicate delivery of %s %s (first receipt %s)", provider_name,
                     event.event_id, stored.first_receipt_id)
            assert stored.first_receipt_id is not None
            if stored.first_processed or (replay_of is None and await first_delivery_done(
                    self._store, self._settings, provider_name, event.event_id, stored)):
                self._processed.add(provider_name, event.event_id, stored.first_receipt_id)
                return IngestResult(200, stored.receipt_id, "duplicate", replay_of=replay_of)
            if stored.first_sha256 != digest:
                # a copy unlike the first (fields a signature leaves out: Adyen's item, re-sent
                # with its unsigned `modification.action` flipped): the event is what was first
                # received, so the first's stored body is re-driven, never this one
                redriven = await self.replay(stored.first_receipt_id)
                return IngestResult(200, stored.receipt_id, "duplicate", replay_of=replay_of,
                                    workflow_id=redriven.workflow_id if redriven is not None else None)
        provider = self._providers[provider_name]
        if isinstance(provider, NotificationRecorder) and not isinstance(event, PayoutEvent):
            await provider.record_notification(event)
        workflow_id = await self.route(event, stored.case_creation, request=request)
        first_receipt = stored.first_receipt_id or stored.receipt_id
        await self._store.receipts.mark_processed(first_receipt, workflow_id)
        self._processed.add(provider_name, event.event_id, first_receipt)
        return IngestResult(200, stored.receipt_id, stored.verdict, workflow_id=workflow_id,
                            replay_of=replay_of)

    async def route(self, event: ProviderEvent | PayoutEvent | PaymentEvent,
                    case_creation: CaseCreation | None = None, *,
                    request: RefundRequest | None = None) -> str | None:
        """Starts or signals the event's workflow; returns its id (None when unmatched).
        `case_creation` is the case outcome when the receipt's transaction already opened it."""
        if isinstance(event, PayoutEvent):
            return await self._route_payout(event)
        if isinstance(event, PaymentEvent):
            log.info("%s %s about payment %s is recorded for validation; no case moves",
                     event.provider, event.event_type, event.payment_id)
            return None
        if event.kind is EventKind.REFUND_REQUESTED:
            request = request or request_from_event(event)
            bind_case(request.refund_request_id)
            requester = actor_of(event)
            outcome = case_creation or (await self._store.cases.create(request, requester))[0]
            if outcome is CaseCreation.CONFLICT:
                log.error("provider request %s conflicts with an existing case", request.refund_request_id)
                return None
            case = await self._store.cases.get(request.refund_request_id)
            assert case is not None
            handle = await start_refund(self._client, self._settings, request, requester, case["status"],
                                        trigger=event)
            return handle.id
        refund_id = event.refund_id
        if refund_id is None:
            log.info("%s %s is a charge-level notice; refund events move the cases",
                     event.provider, event.event_type)
            return None
        # the case holding the refund hears of it whatever reference the refund carries (its
        # metadata can be edited); by reference only a refund no case holds yet
        row = await self._store.cases.by_provider_refund(event.provider, refund_id)
        if row is not None:
            event = as_held(event, row)
        elif event.refund_request_id:
            row = await self._by_reference(event, event.refund_request_id)
        if row is None:
            return await self._track(event)
        case_id = str(row["refund_request_id"])
        bind_case(case_id)
        reported = event.as_refund()
        booked = None if row["status"] == CaseStatus.OPS_REVIEW else (row["amount"], row["currency"])
        if reported is not None and tells_nothing_new(row["applied_refund_id"], row["applied_status"],
                                                      reported, booked):
            metrics.EVENTS_WITHOUT_NEWS.labels(event.provider).inc()
            log.debug("%s %s repeats what case %s applied (%s): not signalled", event.provider,
                      event.event_id, case_id, reported.status.value)
            return case_id
        tracking = case_id == tracking_case_id(event.provider, refund_id)
        if tracking and row["status"] == CaseStatus.TRACKING:
            # a tracking case its workflow never moved: its first start may have failed, so
            # signal-with-start; one it moved is signalled (gone past retention: closed)
            return await self._track(event)
        try:
            await self._client.get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, event)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            await self._after_close(case_id, event, row)
        return case_id

    async def _by_reference(self, event: ProviderEvent, case_id: str) -> CaseRow | None:
        """The case an event's reference names, when the refund is one it may have made: of
        the same provider and charge (a refund off another charge moved that charge's money,
        whatever reference it carries)."""
        row = await self._store.cases.get(case_id)
        if row is None:
            return None
        if row["provider"] != event.provider:
            log.warning("%s event %s names %s, a %s case: it reaches only %s's cases",
                        event.provider, event.event_id, case_id, row["provider"], event.provider)
            return None
        if event.charge_id and event.charge_id != row["charge_id"]:
            log.warning("%s event %s names case %s but is about a refund of charge %s, not the case's %s: "
                        "followed as that charge's own", event.provider, event.event_id, case_id,
                        event.charge_id, row["charge_id"])
            return None
        return row

    async def _after_close(self, case_id: str, event: ProviderEvent, row: CaseRow | None = None) -> None:
        """An event for a case whose workflow has closed is audited, and news the case does
        not show is reconciled at once: a final failure (failed, canceled: nothing follows
        either), or a success for a case shown failed that the provider never failed itself
        (ops read "no refund", a cancel, a decline), or either for a case its workflow left
        pending (nothing else moves it), or a refund in flight the case does not hold. Each
        becomes a break for ops and its tier's approvers, never a row only a run might read
        later (a run cannot list Adyen or Cashfree, and its window passes). Any other status
        may be an old delivery arriving late (a success the provider's own failure of that
        refund followed): audited only.
        `row`: the case as the caller read it (its workflow is closed: nothing moves it),
        else read here once."""
        log.error("case %s is closed; event %s (%s) is reconciled now", case_id, event.event_id,
                  event.event_type)
        refund = event.as_refund()
        if row is None:
            row = await self._store.cases.get(case_id)
        await self._store.audit.record(case_id, actor_of(event), "event_after_close", {
            "event_id": event.event_id, "event_type": event.event_type,
            **({"refund_id": refund.refund_id, "status": refund.status.value} if refund else {})})
        if refund is None or not (refund.status in FINAL_PROVIDER_STATUSES
                                  or await self._success_is_news(case_id, refund, row)
                                  or await self._in_flight_unheld(case_id, refund, row)):
            return
        await self._reconcile_now(event, refund)

    async def _reconcile_now(self, event: ProviderEvent | PayoutEvent,
                             reported: ProviderRefund | ProviderPayout) -> None:
        """What an event reported about an object whose case cannot take it, classified now
        in an incident run of its own, its breaks' exception workflows started."""
        await reconcile_at_once(self._client, self._store.reconciliation, self._settings.timings(),
                                self._settings.task_queue, event.event_id, reported, event.occurred_at,
                                actor_of(event))

    async def _success_is_news(self, case_id: str, refund: ProviderRefund, case: CaseRow | None) -> bool:
        """Whether a success is news for a closed case: another refund carrying the case's
        reference beside the one it holds (money moved twice: a duplicate, for ops), a case
        its workflow left pending (a tracking case whose watch ended without a final status),
        or the case shows no refund (failed, canceled, declined, cancelled by ops) and not
        because the provider failed this very refund (then the success is older than that failure).
        A failure that came from ops resolving a wait "no refund" is their reading, not the
        provider's."""
        if refund.status is not ProviderRefundStatus.SUCCEEDED:
            return False
        if case is None:
            return False
        held = case["provider_refund_id"]
        if held is not None and held != refund.refund_id and not held.startswith(NO_REFUND_PREFIX):
            return True
        status = CaseStatus(case["status"])
        if status in SHOWN_PENDING:  # its workflow left it pending: nothing else will move it
            return True
        if status not in CLOSED_STATUSES:  # it shows the refund made
            return False
        if held != refund.refund_id or case["provider_status"] not in FINAL_PROVIDER_STATUSES:
            return True
        return failure_read_by_ops(await self._store.audit.trail(case_id))

    async def _in_flight_unheld(self, case_id: str, refund: ProviderRefund, case: CaseRow | None) -> bool:
        """Whether a refund still in flight (pending, waiting on someone) is one the closed
        case does not hold: it may yet move the request's money (an earlier attempt's refund
        the case never learned of, a second one), so it is news (a break: a reissue waits
        for it). Before, it was audited only; a reissue paid, then so did this refund. One
        the case holds, or one heard failed or canceled after the close (this delivery is
        older than that word), may be an old delivery: audited only."""
        if refund.status is ProviderRefundStatus.SUCCEEDED or refund.status in FINAL_PROVIDER_STATUSES:
            return False
        if case is None or case["provider_refund_id"] == refund.refund_id:
            return False
        for final in FINAL_PROVIDER_STATUSES:
            heard = {"refund_id": refund.refund_id, "status": final.value}
            if await self._store.audit.has_action(case_id, "event_after_close", detail=heard):
                return False
        return True

    async def _payout_receipt(self, event: PayoutEvent, stored: StoredReceipt) -> None:
        """Every delivery of a payout event, duplicates too, joins the case's timeline with
        its validation: signature verified, idempotency key, first or repeated receipt."""
        await self._store.audit.record(
            payout_case_id(event.provider, event.payout.payout_id), actor_of(event),
            "payout_event_received",
            {"receipt_id": stored.receipt_id, "verdict": stored.verdict, "signature": "verified",
             "event_id": event.event_id, "event_type": event.event_type,
             "idempotency_key": event.idempotency_key(), "body_sha256": event.body_sha256,
             "first_receipt_id": stored.first_receipt_id})

    async def _route_payout(self, event: PayoutEvent) -> str | None:
        """A failure of a payout our books hold opens (or joins) its exception case; any
        other status only reaches a case already open. An unknown payout acts on nothing now:
        its events act when it is booked (`payout_registered`; a booking that landed while this
        one was being recorded is seen by the second look)."""
        case_id = payout_case_id(event.provider, event.payout.payout_id)
        bind_case(case_id)
        actor = actor_of(event)
        detail = {"event_id": event.event_id, "event_type": event.event_type}
        if await self._store.payouts.payout_at_provider(event.provider, event.payout.payout_id) is None:
            log.error("NO INTERNAL PAYOUT for %s %s (%s): nothing acts", event.provider,
                      event.payout.payout_id, event.event_type)
            await self._store.audit.record(case_id, actor, "payout_unknown", detail)
            if await self._store.payouts.payout_at_provider(event.provider, event.payout.payout_id) is None:
                return None  # booked since the first look, its registration may have missed this row
            return await self._route_payout(event)
        if event.is_exception():
            if await open_payout_case(self._client, self._settings, event) is not None:
                return case_id
        else:
            await self._paid_after_reversal(event, case_id)
            try:
                await self._client.get_workflow_handle(case_id).signal(PayoutReversalWorkflow.payout_event,
                                                                       event)
                return case_id
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
        log.warning("no open exception case for payout %s; %s %s is on its timeline%s",
                    event.payout.payout_id, event.event_type, event.event_id,
                    " and reconciled now" if event.is_exception() else " only")
        # a paid report heard before the failure that opens the case: that case reads it
        # (`PayoutRepository.admit`), as Adyen's notifications come in any order
        heard = ({**paid_report(event), "status": event.payout.status.value}
                 if event.payout.status is ProviderPayoutStatus.PAID else {})
        await self._store.audit.record(case_id, actor, WITHOUT_OPEN_CASE, detail | heard)
        if event.is_exception():
            # its case ended (the reversal denied, expired, or left to ops) with the payout as
            # it was: a failure our books still show paid is a break now, for people (a run
            # lists only payouts made in its window, and says nothing till it runs)
            await self._reconcile_now(event, event.payout)
        return case_id

    async def _paid_after_reversal(self, event: PayoutEvent, case_id: str) -> None:
        """A payout reported paid, by an event that happened after the failure our books
        reversed it for: the money left after all (a bank's correction after the failure;
        after a reissue, paid twice). The case reads the report as stale and nothing moves by
        it, so ops are told here, once per case (reconciliation raises it too,
        `payout_paid_shown_failed`). One that happened after the case opened, its reversal not
        booked (approvers deciding, or the case ended without it), tells ops too: an approval
        (the case's, or a break's) would book back money that left. Either is measured from
        the failure (the provider's clock), not from our booking: a correction made while
        approvers decided may be heard only after the reversal was booked."""
        if event.payout.status is not ProviderPayoutStatus.PAID:
            return
        reversed_at = await self._store.ledger.first_posted(case_id, LedgerKind.PAYOUT_REVERSED)
        since = ((await self._store.payouts.opened_at_provider(case_id) or reversed_at) if reversed_at
                 else await self._failed_while_unbooked(case_id))
        # a provider stamps its events to the second: one in the failure's second is after it
        if since is None or event.occurred_at < since.replace(microsecond=0):
            return  # the payout's own paid, arriving late or again: older than its failure
        kind = PAID_AFTER_REVERSAL if reversed_at is not None else PAID_AFTER_FAILURE
        log.error("PAYOUT PAID AFTER ITS %s: %s %s (%s)", "REVERSAL" if reversed_at else "FAILURE",
                  event.provider, event.payout.payout_id, case_id)
        detail = paid_report(event)
        await self._store.outbox.queue_recorded(paid_report_notice(case_id, kind, detail),
                                                actor_of(event), kind, detail)

    async def _failed_while_unbooked(self, case_id: str) -> datetime | None:
        """When the failure that opened the case happened (the provider's clock; else when we
        opened it), for a case whose reversal is not booked (its caller found no entry):
        approvers deciding, the runbook running, finance by hand after its entry failed, or
        the case ended without it (denied, expired, rolled back), where a reconciliation
        break may still book it and, for a provider without a payout lookup, reads this
        report (before, one for an ended case was kept as an event only, and the break's
        approval reversed a payout that had left). None with no case yet."""
        case = await self._store.payouts.case(case_id)
        if case is None:
            return None
        return await self._store.payouts.opened_at_provider(case_id) or case["created_at"]

    async def payout_registered(self, provider: str, provider_payout_id: str) -> None:
        """A payout booked after the relay received its events (an instant payout that failed
        before the payments system booked it): each event that found no payout then
        (`payout_unknown` on the chain its failure opens) is routed now, from its stored
        delivery, so a failure opens the exception case instead of being lost. Its receipt is
        unprocessed again first: if routing fails now (Temporal away), the re-drive routes it.
        Each registration call asks (a repeat finds what a call that died left), and a
        receipt already routed to a workflow is left as it is."""
        adapter = self._providers.get(provider)
        if adapter is None:
            return
        trail = await self._store.audit.trail(payout_case_id(provider, provider_payout_id))
        for event_id in dict.fromkeys(str(e["detail"]["event_id"]) for e in trail
                                      if e["action"] == "payout_unknown"):
            first = next((r for r in await self._store.receipts.find(provider, event_id)
                          if r.verdict == "accepted"), None)
            if first is None or first.workflow_id is not None:
                continue
            stored = await self._store.receipts.delivery(first.id)
            if stored is None or stored.body is None:
                continue
            await self._store.receipts.to_redrive(first.id)
            try:  # the booking stands whatever happens here
                event = adapter.parse_webhook(stored.headers, stored.body, stored.received_at.timestamp())
                if isinstance(event, PayoutEvent) and event.payout.payout_id == provider_payout_id:
                    await self._store.receipts.mark_processed(first.id, await self._route_payout(event))
            except Exception:  # the registration is answered whatever this says
                log.exception("payout %s %s is booked, but its earlier event %s could not act now; the "
                              "relay's re-drive routes it", provider, provider_payout_id, event_id)

    async def _track(self, event: ProviderEvent) -> str | None:
        """A refund no case of ours made: open a tracking case and follow it to the ledger."""
        refund = event.as_refund()
        if refund is None or event.refund_id is None:
            log.error("NO CASE for %s %s (refund %s) and too little to track it",
                      event.provider, event.event_type, event.refund_id)
            return None
        case_id = tracking_case_id(event.provider, event.refund_id)
        if await self._store.cases.open_tracking(case_id, refund, event.merchant_account, event.event_type):
            log.warning("provider-originated refund %s %s: tracking as case %s", event.provider,
                        event.refund_id, case_id)
        if await track_refund(self._client, self._settings, case_id, event) is None:
            await self._after_close(case_id, event)
        return case_id

    # -- replay, re-drive, coverage ---------------------------------------------------------

    async def replay(self, receipt_id: int) -> IngestResult | None:
        """Re-feeds one stored delivery through `ingest`, as of its reception time."""
        stored = await self._store.receipts.delivery(receipt_id)
        if stored is None or stored.provider in receipts.INTEGRATION_SENDERS:
            return None
        return await self.ingest(stored.provider, stored.headers, stored.body,
                                 now=stored.received_at.timestamp(), peer=None, replay_of=receipt_id,
                                 source_refused=stored.verdict == "forbidden_source")

    async def replay_since(self, since: datetime, *, after_id: int = 0, limit: int) -> list[IngestResult]:
        """Replays one page of original deliveries received since `since`, oldest first: at
        most `limit`, after receipt `after_id`. A page, so one call stays short however many
        receipts the window holds (a whole window in one request outlived its client)."""
        page = await self._store.receipts.deliveries_since(since, after_id=after_id, limit=limit)
        results = [await self.replay(i) for i in page]
        return [r for r in results if r is not None]

    async def redrive(self) -> list[IngestResult]:
        """Replays accepted receipts that never reached their workflow; run at relay start,
        every `webhook_redrive_interval_seconds` (`redrive_periodically`) and by
        `refunds webhooks redrive`. Relays may overlap: each event still acts once (the
        `(provider, event_id)` gate, the workflows' event ids, the ledger's posting keys)."""
        limit = self._settings.webhook_redrive_max_attempts
        stale = await self._store.receipts.unprocessed(self._settings.webhook_redrive_after_seconds,
                                                       self._providers.keys(), limit)
        if stale:
            log.warning("re-driving %d accepted but unprocessed receipts: %s", len(stale), stale)
        results: list[IngestResult] = []
        for index, receipt_id in enumerate(stale):
            try:
                result = await self.replay(receipt_id)
            except Exception as exc:  # one receipt that cannot be routed must not stop the others
                if isinstance(exc, RPCError) and exc.status in TEMPORAL_AWAY:  # but an outage stops all
                    await self._store.receipts.untried(stale[index:])
                    log.warning("re-drive stopped, Temporal does not answer (%s): %d receipts wait for "
                                "the next pass, no try counted", exc.status.name, len(stale) - index)
                    break
                log.exception("re-driving receipt %s failed", receipt_id)
                continue
            if result is not None:
                results.append(result)
        for receipt_id in await self._store.receipts.given_up(stale, limit):
            metrics.REDRIVE_GAVE_UP.inc()
            log.error("GAVE UP re-driving receipt %s after %d tries: it is accepted but never reached "
                      "its workflow; replay it by hand once the cause is fixed", receipt_id, limit)
        return results

    async def redrive_periodically(self, every_seconds: float) -> None:
        """Re-drives for the relay's whole life, so a crash between receipt and signal heals
        without anyone asking. A failing pass (database or Temporal away) is logged and
        counted, and the next pass tries again; only cancellation ends the loop."""
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.redrive()
            except Exception:
                metrics.REDRIVE_PASSES.labels("failed").inc()
                log.exception("periodic re-drive pass failed; the next one is in %ss", every_seconds)
            else:
                metrics.REDRIVE_PASSES.labels("ok").inc()

    async def coverage(self) -> dict[str, Any]:
        """Per provider: which event types arrived, which have a handler, unknown types,
        handled types never seen, and refusals by verdict; plus the latest refusals."""
        report = {name: _coverage_entry(p.event_types) for name, p in self._providers.items()}
        for row in await self._store.receipts.type_counts(replays=False):
            entry = report.setdefault(row["provider"], _coverage_entry(frozenset()))
            if row["event_type"] is not None:
                entry["arrived"].setdefault(row["event_type"], {})[row["verdict"]] = row["n"]
                if row["event_type"] not in entry["handled"] and \
                        row["event_type"] not in entry["unknown_types"]:
                    entry["unknown_types"].append(row["event_type"])
            if row["verdict"] not in ("accepted", "duplicate"):
                entry["rejected"][row["verdict"]] = entry["rejected"].get(row["verdict"], 0) + row["n"]
        for entry in report.values():
            entry["never_seen"] = [t for t in entry["handled"] if t not in entry["arrived"]]
        recent = [{**r, "received_at": r["received_at"].isoformat()}
                  for r in await self._store.receipts.rejections(20)]
        return {"providers": report, "recent_rejections": recent}
