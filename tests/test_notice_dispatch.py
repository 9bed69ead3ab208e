"""The worker pool's notice dispatcher (issue 21), on the real outbox: each case's notices go
out in order, one claim at a time across dispatchers, only its own task queue's; a certain
failure is tried again on the courier activity's old schedule, then left to the sweeper;
a failure for good is given up at once; a dispatcher that died leaves its claims to others."""

import asyncio
import uuid
from datetime import datetime

import pytest
from temporalio.exceptions import ApplicationError

import workers.outbox
from adapters.db import Store
from domain.errors import NOTICE_CHANNEL_REFUSED
from domain.models import NoticeInput
from workers.outbox import SCHEDULE, dispatch_once, notice_dispatcher, retry_delay, sweep_once


class Channel:
    """Stands in for the delivery code: records each key sent; fails as scripted."""

    def __init__(self, failures: dict[str, ApplicationError] | None = None) -> None:
        self.sent: list[str] = []
        self.failures = failures or {}

    async def deliver(self, dedup_key: str) -> None:
        self.sent.append(dedup_key)
        if dedup_key in self.failures:
            raise self.failures[dedup_key]


async def queued(store: Store, case_id: str, kinds: list[str], queue: str | None) -> list[str]:
    keys = [f"{case_id}:{kind}" for kind in kinds]
    for key, kind in zip(keys, kinds, strict=True):
        await store.outbox.queue(NoticeInput(refund_request_id=case_id, kind=kind, audience="ops",
                                             dedup_key=key, dispatch_queue=queue))
    return keys


async def due_now(store: Store, keys: list[str]) -> None:
    """As if the backoff had passed (no waiting in tests)."""
    await store.database.execute("UPDATE notices SET next_attempt_at = now() WHERE dedup_key = ANY(%s)",
                                 (keys,))


async def column(store: Store, key: str, name: str) -> object:
    row = await store.database.fetch_one(f"SELECT {name} FROM notices WHERE dedup_key = %s", (key,))
    assert row is not None
    return row[name]


async def test_a_cases_notices_go_out_in_order_and_only_its_own_queues(store: Store) -> None:
    queue, run = f"dq-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    first = await queued(store, f"a-{run}", ["approval_needed", "refund_approved", "refund_succeeded"], queue)
    other = await queued(store, f"b-{run}", ["refund_failed"], queue)
    elsewhere = await queued(store, f"c-{run}", ["refund_failed"], f"{queue}-other")
    legacy = await queued(store, f"d-{run}", ["refund_failed"], None)
    channel = Channel()
    assert await dispatch_once(store.outbox, channel, queue) == 2
    assert channel.sent == [first[0], other[0]]  # each case's first; the rest wait their turn
    while await dispatch_once(store.outbox, channel, queue):
        pass
    assert channel.sent == [first[0], other[0], first[1], first[2]]
    assert not set(channel.sent) & {*elsewhere, *legacy}
    assert await column(store, legacy[0], "dispatched_at") is None
    assert await column(store, first[2], "dispatched_at") is not None
    # the sweeper leaves dispatched notices alone
    swept = await store.outbox.claim_unswept(0, 10_000, retry_after_seconds=0)
    assert legacy[0] in swept and not set(swept) & {*first, *other, *elsewhere}


async def test_two_dispatchers_never_claim_the_same_notice_or_two_of_one_case(store: Store) -> None:
    queue, run = f"dq-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    keys = [k for i in range(20) for k in await queued(store, f"{i}-{run}", ["one", "two"], queue)]
    claims = await asyncio.gather(*(store.outbox.claim_dispatch(queue, 100, 60) for _ in range(4)))
    taken = [key for claim in claims for _, key, _, _ in claim]
    assert sorted(taken) == sorted(k for k in keys if k.endswith(":one"))  # once each, heads only
    assert await store.outbox.claim_dispatch(queue, 100, 60) == []  # claimed: nobody else takes them


async def test_a_dispatcher_that_died_leaves_its_claims_to_another_once_the_lease_ends(store: Store) -> None:
    queue = f"dq-{uuid.uuid4().hex[:8]}"
    [key] = await queued(store, f"e-{uuid.uuid4().hex[:8]}", ["refund_succeeded"], queue)
    [(_, claimed, attempt, _)] = await store.outbox.claim_dispatch(queue, 100, 60)  # and then it died
    assert (claimed, attempt) == (key, 1)
    assert await dispatch_once(store.outbox, Channel(), queue) == 0
    await store.database.execute("UPDATE notices SET claimed_until = now() - interval '1 second'"
                                 " WHERE dedup_key = %s", (key,))
    channel = Channel()
    assert await dispatch_once(store.outbox, channel, queue) == 1
    assert channel.sent == [key] and await column(store, key, "attempts") == 2


async def test_a_certain_failure_is_tried_again_with_backoff_then_given_up(store: Store) -> None:
    queue, case_id = f"dq-{uuid.uuid4().hex[:8]}", f"f-{uuid.uuid4().hex[:8]}"
    failing, after = await queued(store, case_id, ["refund_failed", "refund_succeeded"], queue)
    channel = Channel({failing: ApplicationError("slack: 503")})
    assert await dispatch_once(store.outbox, channel, queue) == 1
    assert await dispatch_once(store.outbox, channel, queue) == 0  # not due yet; the next waits behind it
    wait = await store.database.fetch_one(
        "SELECT extract(epoch FROM next_attempt_at - now()) AS s FROM notices WHERE dedup_key = %s",
        (failing,))
    assert wait is not None and 0 < wait["s"] <= retry_delay(1)
    attempts = SCHEDULE.maximum_attempts
    for _ in range(attempts - 1):
        await due_now(store, [failing])
        assert await dispatch_once(store.outbox, channel, queue) == 1
    assert channel.sent == [failing] * attempts
    assert await column(store, failing, "dispatched_at") is not None  # given up
    assert await dispatch_once(store.outbox, channel, queue) == 1 and channel.sent[-1] == after


async def test_a_notice_the_dispatcher_gave_up_on_is_swept_later(store: Store) -> None:
    """A channel down for longer than the dispatcher's few minutes of tries (an approval
    request to Slack) must not lose the notice: the sweeper takes it on its own schedule."""
    queue = f"dq-{uuid.uuid4().hex[:8]}"
    [key] = await queued(store, f"h-{uuid.uuid4().hex[:8]}", ["approval_needed"], queue)
    down = Channel({key: ApplicationError("slack: 503")})
    for _ in range(SCHEDULE.maximum_attempts):
        await due_now(store, [key])
        assert await dispatch_once(store.outbox, down, queue) == 1
    assert await dispatch_once(store.outbox, down, queue) == 0  # the dispatcher is done with it
    back = Channel()
    await sweep_once(store.outbox, back, older_than_seconds=0, retry_after_seconds=60, limit=1000)
    assert key not in back.sent  # a sweep's delay after the last try, not at once
    await store.database.execute("UPDATE notices SET swept_at = swept_at - interval '61 seconds'"
                                 " WHERE dedup_key = %s", (key,))
    while await sweep_once(store.outbox, back, older_than_seconds=0, retry_after_seconds=60,
                           limit=1000):
        pass
    assert back.sent.count(key) == 1


async def test_a_refusal_that_minutes_will_not_change_is_left_to_the_sweeper_at_once(store: Store) -> None:
    queue, case_id = f"dq-{uuid.uuid4().hex[:8]}", f"r-{uuid.uuid4().hex[:8]}"
    refused, after = await queued(store, case_id, ["approval_needed", "refund_succeeded"], queue)
    channel = Channel({refused: ApplicationError("slack: HTTP 404: no_service", type=NOTICE_CHANNEL_REFUSED)})
    assert await dispatch_once(store.outbox, channel, queue) == 1
    assert await dispatch_once(store.outbox, channel, queue) == 1  # the case's next, at once
    assert channel.sent == [refused, after]
    assert await column(store, refused, "dispatch_queue") is None  # the sweeper's now
    assert await column(store, refused, "swept_at") is not None


async def test_a_failure_for_good_is_not_tried_again(store: Store) -> None:
    queue = f"dq-{uuid.uuid4().hex[:8]}"
    [key] = await queued(store, f"g-{uuid.uuid4().hex[:8]}", ["refund_failed"], queue)
    channel = Channel({key: ApplicationError("no such notice", non_retryable=True)})
    assert await dispatch_once(store.outbox, channel, queue) == 1
    assert await column(store, key, "dispatched_at") is not None and channel.sent == [key]


@pytest.mark.parametrize(("attempt", "seconds"), [(1, 1.0), (2, 2.0), (4, 8.0), (7, 64.0), (8, 120.0)])
def test_the_backoff_is_the_courier_activitys(attempt: int, seconds: float) -> None:
    assert retry_delay(attempt) == seconds


async def test_a_notice_another_dispatcher_took_after_the_batch_lease_ran_out_is_left_to_it(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch is claimed under one lease; a slow channel can outlast it, and another
    dispatcher then takes the notices not sent yet. The first must not send them too (nor
    mark them done while the other's send may still fail): each is claimed again just before
    its delivery once the batch is no longer fresh."""
    monkeypatch.setattr(workers.outbox, "DISPATCH_LEASE_SECONDS", 0.4)
    queue, run = f"dq-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    [slow] = await queued(store, f"s-{run}", ["refund_failed"], queue)
    [later] = await queued(store, f"t-{run}", ["refund_failed"], queue)
    taken_by_other: list[tuple[int, str, int, datetime]] = []

    class SlowThenRacing(Channel):
        async def deliver(self, dedup_key: str) -> None:
            await super().deliver(dedup_key)
            if dedup_key == slow:
                await asyncio.sleep(0.5)  # the batch's lease runs out meanwhile
                taken_by_other.extend(await store.outbox.claim_dispatch(queue, 100, 60))

    first = SlowThenRacing()
    assert await dispatch_once(store.outbox, first, queue) == 2
    assert later in [key for _, key, _, _ in taken_by_other]
    assert first.sent == [slow]  # the other dispatcher sends `later`
    assert await column(store, later, "dispatched_at") is None


class StoppedWhileSending(Channel):
    """A delivery during which the worker is told to stop (SIGTERM mid-batch)."""

    def __init__(self, stop: asyncio.Event) -> None:
        super().__init__()
        self.stop = stop

    async def deliver(self, dedup_key: str) -> None:
        await super().deliver(dedup_key)
        self.stop.set()


async def test_a_stopping_dispatcher_sends_nothing_more_and_hands_its_batch_back(store: Store) -> None:
    """Stopped mid-batch, the dispatcher finishes the notice it is sending and no other: a
    slow channel would otherwise run the batch past the pod's grace, and a send killed
    mid-way is never sent again (its delivery left uncertain). The rest of its batch is
    unclaimed, as untried, for the next dispatcher now, not after the lease."""
    queue, run = f"dq-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    keys = [k for i in range(3) for k in await queued(store, f"{i}-{run}", ["refund_failed"], queue)]
    stop = asyncio.Event()
    channel = StoppedWhileSending(stop)
    await dispatch_once(store.outbox, channel, queue, stop=stop)
    assert channel.sent == keys[:1]
    assert [await column(store, key, "claimed_until") for key in keys[1:]] == [None, None]
    assert [await column(store, key, "attempts") for key in keys[1:]] == [0, 0]
    after = Channel()
    assert await dispatch_once(store.outbox, after, queue) == 2 and after.sent == keys[1:]


async def test_a_stopping_sweeper_takes_no_further_notice(store: Store) -> None:
    run = uuid.uuid4().hex[:8]
    keys = [k for i in range(3) for k in await queued(store, f"{i}-{run}", ["refund_failed"], None)]
    stop = asyncio.Event()
    channel = StoppedWhileSending(stop)
    await sweep_once(store.outbox, channel, older_than_seconds=0, stop=stop)
    assert len(channel.sent) == 1 and [await column(store, key, "swept_at") for key in keys].count(None) >= 2


async def test_a_stopping_worker_s_dispatcher_claims_nothing_more(store: Store) -> None:
    """The worker stops (SIGTERM): its dispatcher finishes the send in hand and claims no
    more. It had its own stop, set only after the worker's other loops were awaited, so it
    went on claiming and sending through the shutdown, and the deployment's grace period
    could kill it mid-send: that channel's claim then read as `uncertain`, never resent."""
    queue, run = f"dq-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    first = await queued(store, f"a-{run}", ["refund_failed"], queue)
    later = await queued(store, f"b-{run}", ["refund_failed"], queue)
    release = asyncio.Event()

    class Slow(Channel):
        async def deliver(self, dedup_key: str) -> None:
            await super().deliver(dedup_key)
            await release.wait()

    channel, stopping = Slow(), asyncio.Event()
    async with notice_dispatcher(store.outbox, channel, queue, every_seconds=0.05, stopping=stopping):
        while not channel.sent:
            await asyncio.sleep(0.01)
        stopping.set()  # the worker's stop, with one send in hand
        release.set()
        await asyncio.sleep(0.5)  # what it would claim next, it would claim now
        assert len(channel.sent) == 1, channel.sent
    assert set(channel.sent) <= {*first, *later}
    assert len(channel.sent) == 1
