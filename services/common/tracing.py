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
from opentelemetry.sdk.util import ns_to_iso_str
from opentelemetry.trace import SpanContext

ATTR_USER_ID = "switchboard.user_id"
ATTR_RUN_ID = "switchboard.run_id"
ATTR_AGENT = "switchboard.agent"
ATTR_EVENT_SEQ = "switchboard.event.seq"


def _json_default(value: object) -> str:
    # Attribute values JSON has no type for (bytes): as the SDK's Resource.to_json.
    if isinstance(value, bytes | bytearray):
        return value.hex()
    return str(value)


_encode = json.JSONEncoder(separators=(",", ":"), default=_json_default).encode


def _context_json(context: SpanContext) -> dict[str, str]:
    return {
        "trace_id": f"0x{context.trace_id:032x}",
        "span_id": f"0x{context.span_id:016x}",
        "trace_state": repr(context.trace_state),
    }


def _attributes_json(attributes: Mapping[str, object] | None) -> dict[str, object] | None:
    return None if attributes is None else dict(attributes)


class SpanJsonEncoder:
    """A span as one line of compact JSON: the object `ReadableSpan.to_json()`
    describes (what `switchboard trace show` and the tests read), encoded once.

    `to_json()` pretty-prints with the pure-Python encoder and re-encodes the
    span's resource, identical for every span of a process, each time; this
    encodes with the C encoder and the resource once."""

    def __init__(self) -> None:
        self._resources: dict[int, tuple[Resource, str]] = {}

    def _resource_json(self, resource: Resource) -> str:
        known = self._resources.get(id(resource))
        if known is None or known[0] is not resource:
            encoded = _encode({"attributes": dict(resource.attributes), "schema_url": resource.schema_url})
            known = self._resources[id(resource)] = (resource, encoded)
        return known[1]

    def line(self, span: ReadableSpan) -> str:
        status = span.status
        status_json = {"status_code": status.status_code.name}
        if status.description:
            status_json["description"] = status.description
        parent = span.parent
        body = _encode(
            {
                "name": span.name,
                "context": _context_json(span.context) if span.context else None,
                "kind": str(span.kind),
                "parent_id": f"0x{parent.span_id:016x}" if parent is not None else None,
                "start_time": ns_to_iso_str(span.start_time) if span.start_time else None,
                "end_time": ns_to_iso_str(span.end_time) if span.end_time else None,
                "status": status_json,
                "attributes": _attributes_json(span.attributes),
                "events": [
                    {
                        "name": event.name,
                        "timestamp": ns_to_iso_str(event.timestamp),
                        "attributes": _attributes_json(event.attributes),
                    }
                    for event in span.events
                ],
                "links": [
                    {"context": _context_json(link.context), "attributes": _attributes_json(link.attributes)}
                    for link in span.links
                ],
            }
        )
        # The resource goes last, as in to_json(): splice its encoding in.
        return f'{body[:-1]},"resource":{self._resource_json(span.resource)}}}\n'


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans, one JSON object a line, to a file shared by all services."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._encoder = SpanJsonEncoder()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(self._encoder.line(span) for span in spans)
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
