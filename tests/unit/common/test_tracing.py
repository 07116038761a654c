"""The span file the services write by default: each line is the object
`ReadableSpan.to_json()` describes, whatever the span carries."""

from __future__ import annotations

import json
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.tracing import JsonLinesSpanExporter, SpanJsonEncoder


def finished_spans(service: str = "switchboard-test") -> list[ReadableSpan]:
    """Spans with everything a span can carry: parent, kind, attributes of each
    type, events with and without attributes, links, error status."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service, "replica": 2}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("root", kind=trace.SpanKind.SERVER) as root:
        root.set_attribute("rpc.grpc.status_code", 0)
        with tracer.start_as_current_span(
            "child",
            attributes={"switchboard.run_id": "r-1", "ratio": 0.5, "ok": True, "tools": ("a", "b")},
            links=[trace.Link(root.get_span_context(), {"why": "follows"})],
        ) as child:
            child.add_event("agent_thinking", {"switchboard.event.seq": 3, "text": 'h\u00e9llo "quoted"\n'})
            child.add_event("heartbeat")
            child.set_status(trace.Status(trace.StatusCode.ERROR, "it broke"))
    provider.shutdown()
    return list(exporter.get_finished_spans())


def test_each_line_is_the_sdks_own_json_of_the_span() -> None:
    encoder = SpanJsonEncoder()
    spans = finished_spans()
    assert {span.name for span in spans} == {"root", "child"}
    for span in spans:
        line = encoder.line(span)
        assert line.endswith("\n") and "\n" not in line[:-1]
        assert json.loads(line) == json.loads(span.to_json())


def test_the_exporter_appends_one_line_per_span_with_each_spans_resource(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    exporter = JsonLinesSpanExporter(path)
    first, second = finished_spans("switchboard-a"), finished_spans("switchboard-b")
    exporter.export(first)
    exporter.export(second)

    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(span.to_json()) for span in first + second]
    services = [json.loads(line)["resource"]["attributes"]["service.name"] for line in lines]
    assert services == ["switchboard-a"] * 2 + ["switchboard-b"] * 2
