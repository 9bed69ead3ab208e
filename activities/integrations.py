"""Activities of the integrations: notice delivery and the advisor.

Both serve people and never the money path: the workflow starts deliveries beside the
case and tolerates their failure, and it learns from the advisor only whether advice
exists, never what it says.
"""

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.advisor import AdvisorUnavailable, build_advisor
from adapters.config import Settings
from adapters.db import Store
from adapters.db.outbox import SendingElsewhere
from adapters.notify.channels import build_channels, email_recipient
from adapters.notify.delivery import DeliveryFailed, DeliveryUncertain
from adapters.notify.message import render, template_for
from domain import contracts, errors
from domain.advice import AdviceContext, PriorRefund, TimelineEntry, guarded, untrusted_for_model
from domain.integrations import AdviceReceipt, AdviseInput, DeliverNoticeInput, DeliverNoticesInput

log = logging.getLogger(__name__)

ADVICE_MARGIN = timedelta(seconds=1)


def _priors(rows: Sequence[dict[str, Any]]) -> tuple[PriorRefund, ...]:
    return tuple(PriorRefund(refund_request_id=r["refund_request_id"], amount=int(r["amount"]),
                             status=r["status"]) for r in rows)


class IntegrationActivities:
    """Holds the channels and the advisor the environment configures (built once per worker)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._integrations = store.integrations
        self._outbox = store.outbox
        self._settings = settings
        self._channels = build_channels(settings, self._integrations)
        self._advisor = build_advisor(settings)

    @activity.defn(name=contracts.DELIVER_NOTICE.name)
    async def deliver_notice(self, inp: DeliverNoticeInput) -> None:
        """Sends an outbox notice to every channel that carries it (see `deliver`)."""
        await self.deliver(inp.dedup_key)

    @activity.defn(name=contracts.DELIVER_NOTICES.name)
    async def deliver_notices(self, inp: DeliverNoticesInput) -> None:
        """A courier's batch, in order; one notice's failure does not hold back the others,
        and a retry resends only what certainly failed (see `deliver`)."""
        failures: list[ApplicationError] = []
        for key in inp.dedup_keys:
            try:
                await self.deliver(key)
            except ApplicationError as exc:
                failures.append(exc)
        if failures:
            raise ApplicationError("; ".join(str(f) for f in failures), type=errors.NOTICE_DELIVERY_FAILED,
                                   non_retryable=all(f.non_retryable for f in failures))

    async def deliver(self, dedup_key: str) -> None:
        """Sends an outbox notice to every channel that carries it, at most once per channel:
        each send is claimed in `notice_deliveries` first, so a retry skips what was sent
        (or may have been) and retries only channels that certainly failed, or that another
        attempt was still sending (a retryable failure: the notice is not delivered until
        every channel's outcome is known). The activity and the worker's outbox sweeper both
        come here."""
        notice = await self._outbox.notice(dedup_key)
        if notice is None:
            raise ApplicationError(f"no notice {dedup_key!r} in the outbox", non_retryable=True)
        case_id: str | None = notice["refund_request_id"]
        case = await self._store.cases.get(case_id) if case_id else None
        advice = await self._integrations.advice(case_id) if case_id else None
        payout = template_for(notice, case).payout
        message = render(notice, case, advice,
                         case_url=self._settings.case_url(case_id, payout=payout) if case_id else None,
                         email_to=email_recipient(self._settings, notice["audience"],
                                                  case["evidence"] if case else None))
        failed: list[str] = []
        refused = 0  # failures that only the sweeper's slower schedule tries again
        carriers = [c for c in self._channels if c.accepts(message)]
        for channel in carriers:
            try:
                if not await self._outbox.claim_delivery(message.notice_id, case_id, channel.name):
                    continue
            except SendingElsewhere as exc:  # its outcome decides; until then not delivered
                failed.append(str(exc))
                continue
            try:
                external_id = await channel.send(message)
            except DeliveryUncertain as exc:
                log.error("notice %s to %s may or may not have arrived; not resent: %s",
                          message.notice_id, channel.name, exc)
                await self._outbox.finish_delivery(message.notice_id, case_id, channel.name,
                                                   "uncertain", error=str(exc))
            except Exception as exc:  # one channel's failure never stops the others
                log.warning("notice %s to %s failed: %s", message.notice_id, channel.name, exc)
                await self._outbox.finish_delivery(message.notice_id, case_id, channel.name,
                                                   "failed", error=str(exc)[:1000])
                failed.append(f"{channel.name}: {exc}")
                refused += isinstance(exc, DeliveryFailed) and exc.refused
            else:
                await self._outbox.finish_delivery(message.notice_id, case_id, channel.name,
                                                   "delivered", external_id=external_id)
        if failed:
            raise ApplicationError("; ".join(failed), type=errors.NOTICE_CHANNEL_REFUSED
                                   if refused == len(failed) else errors.NOTICE_DELIVERY_FAILED)
        if carriers:  # with no channel for it, the notice stays undelivered in the outbox
            await self._outbox.mark_delivered(message.notice_id)

    async def _context(self, inp: AdviseInput) -> AdviceContext:
        request, validation = inp.request, inp.validation
        case_id = request.refund_request_id
        charge = await self._integrations.charge_history(request.provider, request.charge_id, case_id)
        customer_id = request.evidence.get("customer_id")
        customer = await self._integrations.customer_history(customer_id, case_id) if customer_id else []
        trail = await self._store.audit.trail(case_id)
        return AdviceContext(
            refund_request_id=case_id, provider=request.provider, charge_id=request.charge_id,
            amount=request.amount, currency=request.currency, reason=request.reason,
            method=request.method.value, source=request.source.value,
            amount_captured=validation.amount_captured, remaining_before=validation.remaining_before,
            dispute_count=validation.dispute_count, prior_refunds_on_charge=_priors(charge),
            customer_history=_priors(customer), untrusted_text=untrusted_for_model(request.evidence),
            timeline=tuple(TimelineEntry(at=e["occurred_at"], actor=e["actor"], action=e["action"])
                           for e in trail[-50:]))

    @activity.defn(name=contracts.ADVISE_REFUND.name)
    async def advise_refund(self, inp: AdviseInput) -> AdviceReceipt:
        """Asks the advisor about a validated case and stores its advice (or "no advice")
        on the case for approvers. Finishes inside its own timeout, so a slow model ends
        as "no advice" rather than a late answer. A retry keeps the first stored result."""
        return await self._advise(inp, (activity.info().start_to_close_timeout or timedelta(seconds=30))
                                  - ADVICE_MARGIN)

    async def advise_in_process(self, inp: AdviseInput) -> AdviceReceipt | None:
        """Advice made inside validation when the advisor never leaves this process (the
        offline rules): one activity fewer per case. `None` (the workflow then asks
        `advise_refund`) for a model behind the network, or when it failed here: advice
        must never hold up or fail the validation it rides along with."""
        if not self._advisor.in_process:
            return None
        try:
            return await self._advise(inp, timedelta(seconds=self._settings.advice_timeout_seconds))
        except Exception:  # any failure: the workflow's own advice activity tries again
            log.exception("advice inside validation failed for %s", inp.request.refund_request_id)
            return None

    async def _advise(self, inp: AdviseInput, budget: timedelta) -> AdviceReceipt:
        case_id = inp.request.refund_request_id
        stored = await self._integrations.advice(case_id)
        if stored is None:
            context = await self._context(inp)
            try:
                advice = guarded(await self._advisor.advise(context, budget.total_seconds()), context)
                error = None
            except AdvisorUnavailable as exc:
                log.warning("no advice for %s: %s", case_id, exc)
                advice, error = None, str(exc)
            stored = await self._integrations.save_advice(
                case_id, source=self._advisor.source, advice=advice, error=error,
                context_sha256=context.fingerprint())
        return AdviceReceipt(available=stored["advice"] is not None, source=stored["source"])

    def all(self) -> list[Callable[..., Any]]:
        return [self.deliver_notice, self.deliver_notices, self.advise_refund]
