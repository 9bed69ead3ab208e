"""Refusals of callers with no valid credential: counted and logged (sampled), never
written to the audit chain one by one.

Anyone can send a request without a token, so a per-request audit row would let them grow
the database without bound and queue every writer behind the global chain's locked head.
The audit trail keeps what identified callers did; anonymous noise is a rate, which is
what a counter and a sampled log line show.
"""

import logging
import time

from prometheus_client import Counter

UNAUTHENTICATED_REFUSALS = Counter(
    "refunds_unauthenticated_refusals", "Requests refused for want of a valid credential",
    ["via", "refusal"])
SAMPLE_SECONDS = 10.0
"""At most one log line per this many seconds (per process), with the count since the last."""

log = logging.getLogger("relay.refusals")


class SampledRefusalLog:
    """Logs the first refusal, then at most one per `every_seconds` naming how many came
    in between, so a flood costs a few log lines, not one per request."""

    def __init__(self, every_seconds: float = SAMPLE_SECONDS) -> None:
        self._every = every_seconds
        self._last = -float("inf")
        self._unlogged = 0

    def refused(self, via: str, refusal: str, action: str, fingerprint: str | None = None) -> None:
        """Counts one refusal; logs it when the sample interval has passed."""
        UNAUTHENTICATED_REFUSALS.labels(via, refusal).inc()
        now = time.monotonic()
        if now - self._last < self._every:
            self._unlogged += 1
            return
        log.warning("refused without a valid credential (%s): %s via %s, token %s; %d more since "
                    "the last line", refusal, action, via, fingerprint or "-", self._unlogged)
        self._last, self._unlogged = now, 0
