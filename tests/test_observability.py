"""One trace per case, from the relay through the workflow to every activity and provider
call; Prometheus counters that move when receipts arrive and refunds run."""

import asyncio
import logging
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client.parser import text_string_to_metric_families
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

from adapters.config import Settings
from adapters.db.outbox import OutboxRepository
from adapters.telemetry import CORE_LOGGER, sdk_runtime, span_log, trace_connection, tracer_provider
from domain.models import NoticeInput
from starters import relay
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack
from workers.health import health_app


def _flushed(spans: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.force_flush()
    return spans.get_finished_spans()


async def _scrape(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with stack.api("dave") as api:
        response = await api.get("/metrics")
    assert response.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_one_trace_from_relay_request_through_workflow_activities_and_provider(
        stack: Stack, spans: InMemorySpanExporter) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 2_500)
    case_id = body["refund_request_id"]
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    await stack.wait_for_status(case_id, "succeeded")

    finished = _flushed(spans)
    [endpoint] = [s for s in finished if s.name == "fastapi.endpoint"
                  and (s.attributes or {}).get("refund_request_id") == case_id
                  and str((s.attributes or {}).get("code.function.name")).endswith("request_refund")]
    assert endpoint.context is not None
    in_trace = [s for s in finished if s.context is not None
                and s.context.trace_id == endpoint.context.trace_id]
    [root] = [s for s in in_trace if s.parent is None]
    assert root.name == "POST /v1/refund-requests"
    names = {s.name for s in in_trace}
    assert {"StartWorkflow:RefundWorkflow", "RunWorkflow:RefundWorkflow"} <= names
    # since fewer-round-trips-1: validation with the decision; the case's writes (ledger posting
    # included) in local activities, traced as activities too
    for activity in ("validate_and_decide", "write_case_steps", "submit_provider_refund"):
        assert f"RunActivity:{activity}" in names, activity
    assert "provider.create_refund" in names  # its HTTP spans: tests/test_tracing_instrumentation.py
    [create] = [s for s in in_trace if s.name == "provider.create_refund"]
    assert (create.attributes or {})["refund_request_id"] == case_id


async def test_metrics_count_receipts_duplicates_unknown_types_provider_calls_and_cases(
        stack: Stack) -> None:
    before = await _scrape(stack)
    charge = await stack.charge(5_000)
    request_id, event_id = f"rrq_{uuid.uuid4().hex[:10]}", f"evt_{uuid.uuid4().hex[:10]}"
    obj = {"id": request_id, "object": "refund_request", "charge": charge, "amount": 1_000,
           "currency": "usd", "merchant_account": "acct_1", "reason": "duplicate",
           "evidence": {"order_id": "ord-3"}}
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/events", json={"type": "refund.requested", "object": obj, "copies": 2,
                                                "event_id": event_id})
        await sb.post("/_sandbox/events", json={"type": "refund.mystery", "object": {"id": "x"}})
    await stack.wait_for_status(f"sandbox-{request_id}", "succeeded")
    after = await _scrape(stack)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("refunds_webhook_receipts_total", provider="sandbox", verdict="accepted") >= 1
    assert moved("refunds_webhook_receipts_total", provider="sandbox", verdict="duplicate") == 1
    assert moved("refunds_webhook_duplicates_total", provider="sandbox") == 1
    assert moved("refunds_webhook_unknown_event_types_total", provider="sandbox",
                 event_type="refund.mystery") == 1
    assert moved("refunds_provider_call_seconds_count", provider="sandbox", operation="create_refund") == 1
    assert _value(after, "refunds_cases", state="succeeded") >= 1
    assert ("refunds_ledger_pending", frozenset()) in after


async def test_approval_wait_is_observed_when_an_approver_decides(stack: Stack) -> None:
    before = await _scrape(stack)
    body = stack.refund_body(await stack.charge(20_000), 9_000)
    case_id = body["refund_request_id"]
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    await stack.wait_for_status(case_id, "awaiting_approval")
    async with stack.api("bob") as api:
        response = await api.post(f"/v1/refund-requests/{case_id}/approvals", json={"decision": "approve"})
    assert response.status_code == 202, response.text
    after = await _scrape(stack)
    name = "refunds_approval_wait_seconds_count"
    assert _value(after, name, decision="approve") - _value(before, name, decision="approve") == 1
    await stack.wait_for_status(case_id, "succeeded")


@workflow.defn(sandboxed=False)
class _BrokenWorkflow:
    """Fails its workflow task, which the SDK core logs (at WARN) from its own thread."""

    @workflow.run
    async def run(self, reason: str) -> str:
        raise RuntimeError(reason)


async def test_the_sdk_cores_log_lines_reach_the_products_logging(
        temporal_server: TemporalDevServer, caplog: pytest.LogCaptureFixture) -> None:
    """The worker's SDK core writes its log lines through Python logging (the product's
    format), not to stdout in its own: a stdout nobody reads stalls the core (a benchmark
    stopped polling on it) and a log collector cannot parse the core's format."""
    settings = Settings(temporal_address=temporal_server.address, temporal_metrics_port=0)
    client = await Client.connect(temporal_server.address, runtime=sdk_runtime(settings))
    queue = f"core-logs-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.WARNING, logger=CORE_LOGGER)

    def core_failed_a_task() -> bool:
        return any(r.name == CORE_LOGGER and r.levelno == logging.WARNING
                   and "Failing workflow task" in r.getMessage() for r in caplog.records)

    async with Worker(client, task_queue=queue, workflows=[_BrokenWorkflow]):
        handle = await client.start_workflow(_BrokenWorkflow.run, "a workflow task that fails", id=queue,
                                             task_queue=queue)
        for _ in range(300):
            if core_failed_a_task():
                break
            await asyncio.sleep(0.1)
        await handle.terminate()
    assert core_failed_a_task(), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("reader", ["nobody", "exporter", "otlp", "span_log_at_debug"])
def test_spans_are_recorded_only_where_something_reads_them(
        reader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an exporter, an OTLP endpoint or the span log at DEBUG, every span (one per SQL
    statement, activity, workflow task) was built, batched and dropped: the worker's CPU in
    production, not in the benchmarks. Such spans are sampled out now; their ids remain, so
    log lines keep their trace ids."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    if reader == "otlp":
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    previous = span_log.level
    span_log.setLevel(logging.DEBUG if reader == "span_log_at_debug" else logging.INFO)
    try:
        provider = tracer_provider("refunds-worker", InMemorySpanExporter() if reader == "exporter" else None)
    finally:
        span_log.setLevel(previous)
    span = provider.get_tracer(__name__).start_span("probe")
    recording = span.is_recording()
    span.end()
    provider.shutdown()
    assert recording == (reader != "nobody") and span.get_span_context().trace_id != 0


@pytest.mark.parametrize("recorded", [True, False])
async def test_statements_get_spans_only_where_spans_are_recorded(
        recorded: bool, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement's span under a provider that samples everything out is never recorded,
    yet building it (and its operation name, parsed from the SQL) cost the relay about a
    twentieth of its CPU per delivery: the store's connections are instrumented only where
    a span can be kept."""
    provider = TracerProvider(sampler=None if recorded else ALWAYS_OFF)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await trace_connection(conn)
        instrumented = getattr(conn, "_is_instrumented_by_opentelemetry", False)
    assert instrumented is recorded


@pytest.mark.parametrize("server", ["relay", "worker"])
@pytest.mark.parametrize("recorded", [True, False])
async def test_requests_get_server_spans_only_where_spans_are_recorded(
        recorded: bool, server: str, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI's own OpenTelemetry built four spans (the request's, its dependencies', its
    endpoint's, its serialisation's) for every request, recorded or not: a tenth of the
    relay's work per webhook where the provider samples all out."""
    provider = TracerProvider(sampler=None if recorded else ALWAYS_OFF)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    started: list[str] = []
    start_span = SdkTracer.start_span

    def spy(self: SdkTracer, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        started.append(name)
        return start_span(self, name, *args, **kwargs)

    monkeypatch.setattr(SdkTracer, "start_span", spy)
    assert stack.worker is not None
    app = (relay.create_app(stack.store, stack.client, stack.providers, stack.settings) if server == "relay"
           else health_app(stack.worker, stack.client, stack.store, stack.settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as http:
        assert (await http.get("/healthz")).status_code == 200
    spans = [name for name in started if name.startswith(("GET", "fastapi."))]
    assert bool(spans) is recorded, started


async def _notice_on(stack: Stack, case_id: str, channel: str, outcome: str, *,
                     queue: str | None = None) -> int:
    """A queued notice whose delivery on `channel` ended as `outcome`; its id."""
    key = f"{case_id}:{uuid.uuid4().hex[:8]}"
    notice_input = NoticeInput(refund_request_id=case_id, kind="refund_failed", audience="operator",
                               dedup_key=key, dispatch_queue=queue)
    assert await stack.store.outbox.queue(notice_input)
    notice = await stack.store.outbox.notice(key)
    assert notice is not None
    assert await stack.store.outbox.claim_delivery(notice["id"], case_id, channel)
    await stack.store.outbox.finish_delivery(notice["id"], case_id, channel, outcome, error="HTTP 500")
    return int(notice["id"])


async def test_notices_nobody_will_send_again_are_counted_by_channel(stack: Stack) -> None:
    """A notice whose delivery failed for good (the dispatcher gave up, or the sweeper spent
    its sweeps) or may have been sent (uncertain: never resent) reaches nobody unless ops
    look: the relay reports such deliveries by channel. Failures still being retried, and a
    failure a later try delivered, are not counted."""
    outbox, case_id = stack.store.outbox, f"rr-{uuid.uuid4().hex[:10]}"
    channel = f"chat-{uuid.uuid4().hex[:8]}"  # this test's own label in the shared database
    given_up = await _notice_on(stack, case_id, channel, "failed", queue="q")
    await outbox.dispatched(given_up)  # a failure for good
    swept_out = await _notice_on(stack, case_id, channel, "failed")
    await stack.store.database.execute("UPDATE notices SET attempts = %s WHERE id = %s",
                                       (OutboxRepository.SWEEP_ATTEMPTS, swept_out))
    await _notice_on(stack, case_id, channel, "failed")  # the sweeper tries it again
    await outbox.dispatch_later(await _notice_on(stack, case_id, channel, "failed", queue="q"), 60)
    await _notice_on(stack, case_id, channel, "uncertain")
    recovered = await _notice_on(stack, case_id, channel, "failed", queue="q")
    assert await outbox.claim_delivery(recovered, case_id, channel)
    await outbox.finish_delivery(recovered, case_id, channel, "delivered")
    await outbox.mark_delivered(recovered)
    await outbox.dispatched(recovered)

    samples = await _scrape(stack)
    assert _value(samples, "refunds_notice_deliveries_unsent", channel=channel, state="abandoned") == 2
    assert _value(samples, "refunds_notice_deliveries_unsent", channel=channel, state="uncertain") == 1
