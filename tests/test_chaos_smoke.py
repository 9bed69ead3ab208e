"""Small versions of the reliability suite (`make chaos` runs the full sizes)."""

import pytest
from temporalio.client import Client

from adapters.store import Store
from bench import chaos
from bench.common import Embedded
from starters.stack import TemporalDevServer


@pytest.fixture
def env(store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str) -> Embedded:
    return Embedded(temporal_server, client, store, postgres_dsn)


async def test_storms_execute_once_and_store_every_receipt(env: Embedded) -> None:
    outcome = await chaos.storms(env, copies=4)
    assert outcome.violations == []
    assert outcome.counts["provider_refunds"] == 1


async def test_every_order_of_events_ends_in_the_providers_state(env: Embedded) -> None:
    outcome = await chaos.order(env, sequence=("pending", "succeeded"))
    assert outcome.cases == 2 and outcome.violations == []


async def test_bad_input_never_answers_5xx_nor_changes_state(env: Embedded) -> None:
    outcome = await chaos.bad_input(env, 60)
    assert outcome.violations == []
    assert sum(n for answer, n in outcome.counts.items() if answer.startswith("http_")) == 60
    assert outcome.counts["webhook_receipts"] == 40  # the four webhook kinds of six, each stored


async def test_concurrent_requests_never_over_refund(env: Embedded) -> None:
    outcome = await chaos.concurrency(env, 10)
    assert outcome.violations == [] and outcome.counts["cases"] == 10
    # ten of 700 fit in the 10,000 captured: each is approved and refunded, once
    assert outcome.counts["succeeded"] == 10 and outcome.counts["refunded"] == 7_000


@pytest.mark.slow
async def test_killing_the_worker_repeatedly_keeps_one_refund_per_request(env: Embedded) -> None:
    outcome = await chaos.kill_worker(env, 3)
    assert outcome.violations == []
    assert outcome.counts["provider_refunds"] == 3 and outcome.counts["kills"] >= 1


async def test_schemathesis_finds_no_server_error_and_changes_nothing(env: Embedded) -> None:
    outcome = await chaos.schema_fuzz(env, 3)
    # the message is schemathesis's own report, whole: pytest's diff would cut it short
    assert outcome.violations == [] and outcome.counts["exit_code"] == 0, "\n".join(outcome.violations)
