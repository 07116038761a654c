"""OpenTelemetry set-up: one tracer provider per process, W3C propagation.

Spans go to OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard
`OTEL_*` variables are honoured by the SDK), otherwise to a local JSON-lines
file that `switchboard trace show` renders as a waterfall.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

ATTR_USER_ID = "switchboard.user_id"
ATTR_RUN_ID = "switchboard.run_id"
ATTR_AGENT = "switchboard.agent"
ATTR_EVENT_SEQ = "switchboard.event.seq"


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans, one JSON object a line, to a file shared by all services."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(
            json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n" for span in spans
        )
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            # One write per batch: appends from several processes do not interleave.
            handle.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def setup_tracing(service: str, trace_file: Path | None) -> TracerProvider:
    resource = Resource.create({SERVICE_NAME: f"switchboard-{service}"})
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif trace_file is not None:
        exporter = JsonLinesSpanExporter(trace_file)
    else:
        return provider
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def current_trace_carrier() -> dict[str, str]:
    """The W3C context of the current span, to travel inside a message or event."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from_carrier(carrier: Mapping[str, str]) -> otel_context.Context:
    return propagate.extract(dict(carrier))


def trace_id_hex(span: trace.Span | None = None) -> str:
    span_context = (span or trace.get_current_span()).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
