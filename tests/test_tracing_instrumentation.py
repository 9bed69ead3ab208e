"""Client and database spans from OpenTelemetry's contrib instrumentation (httpx, psycopg):
a refund's provider call is an httpx client span whose `traceparent` the provider receives
(its server span is that client span's child), under the hand-made span that names the case
and the outcome; the store's SQL shows up as database spans in the same trace."""

from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.harness import Stack
from tests.test_observability import _flushed


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def url(span: ReadableSpan) -> str:
    """The request's URL under either generation of HTTP semantic conventions."""
    return str(attrs(span).get("url.full") or attrs(span).get("http.url") or "")


async def test_a_refund_traces_its_provider_call_over_httpx_with_traceparent_and_its_sql(
        stack: Stack, spans: InMemorySpanExporter) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 2_500)
    await stack.wait_for_status(case_id, "succeeded")

    finished = _flushed(spans)
    [create] = [s for s in finished if s.name == "provider.create_refund"
                and attrs(s).get("refund_request_id") == case_id]
    assert create.context is not None
    assert attrs(create)["outcome"] == "succeeded"  # the business span names what came back
    in_trace = [s for s in finished if s.context is not None
                and s.context.trace_id == create.context.trace_id]

    [client] = [s for s in in_trace if s.kind is SpanKind.CLIENT and url(s).endswith("/v1/refunds")
                and s.parent is not None and s.parent.span_id == create.context.span_id]
    assert client.context is not None
    assert url(client).startswith(stack.sandbox_url)
    # the sandbox (a FastAPI app) continued the traceparent header it received
    [server] = [s for s in in_trace if s.kind is SpanKind.SERVER
                and s.parent is not None and s.parent.span_id == client.context.span_id]
    assert server.name == "POST /v1/refunds"

    database = [s for s in in_trace if attrs(s).get("db.system") == "postgresql"
                or attrs(s).get("db.system.name") == "postgresql"]
    statements = " ".join(str(attrs(s).get("db.statement") or attrs(s).get("db.query.text"))
                          for s in database)
    assert "ledger_entries" in statements, statements[:500]  # post_ledger's SQL, in the case's trace
