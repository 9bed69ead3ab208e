"""Provider news a case takes only from the relay or a worker: the worker's seal check
(`adapters.approval_seal`) hands each refund or payout event over with whether its seal
held, and a case's signal handler lets through only sealed news (since `news-sealed-1`).
A refund's late failure reverses its booking and opens its reissue, so news sent straight
to Temporal (its UI, its CLI) by someone without the keys must move nothing."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from domain.models import ProviderEvent
    from domain.payouts import PayoutEvent
    from domain.seals import news_refusal, unchecked

NEWS_SEALED_PATCH = "news-sealed-1"
"""Each unsealed event of a run asks its own marker (`news-sealed-1/<k>`, k counting them): a
run that took unsealed news before the deploy replays that acceptance, and a patch asked
once would answer every later one of the run the same (the SDK keeps the first answer)."""
REFUSED = "provider_event_refused"

Recorder = Callable[[str, dict[str, Any]], Awaitable[None]]
"""Records an audit action with its detail on the case (an activity of the case's)."""


class NewsGate:
    """Lets sealed news through; refused news is recorded beside the case (a signal handler
    cannot wait for an activity), in arrival order, and never taken nor remembered (its
    event id stays free for the provider's own delivery)."""

    def __init__(self) -> None:
        self._refused: list[dict[str, Any]] = []
        self._recorder: asyncio.Task[None] | None = None
        self._unsealed = 0

    def admit_refund(self, event: ProviderEvent, record: Recorder) -> ProviderEvent | None:
        return unchecked(event) if self._sealed(event, record) else None

    def admit_payout(self, event: PayoutEvent, record: Recorder) -> PayoutEvent | None:
        return unchecked(event) if self._sealed(event, record) else None

    def _sealed(self, event: ProviderEvent | PayoutEvent, record: Recorder) -> bool:
        refusal = news_refusal(event)
        if not refusal:
            return True
        self._unsealed += 1
        if not workflow.patched(f"{NEWS_SEALED_PATCH}/{self._unsealed}"):
            return True
        workflow.logger.warning("provider news refused (%s): %s %s", refusal, event.event_type,
                                event.event_id)
        self._refused.append({"event_id": event.event_id, "event_type": event.event_type,
                              "provider": event.provider, "refusal": refusal})
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_all(record))
        return False

    async def _record_all(self, record: Recorder) -> None:
        while self._refused:
            await record(REFUSED, self._refused.pop(0))

    async def settled(self) -> None:
        """Waits until every refusal is recorded: a run ends or continues as new only then
        (the record is the one trace of the attempt)."""
        if self._recorder is not None:
            await workflow.wait_condition(
                lambda: not self._refused and self._recorder is not None and self._recorder.done())
