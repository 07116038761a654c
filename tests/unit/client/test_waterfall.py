"""The waterfall renderer and the span sources it reads: pure functions, no services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.tracing import JsonLinesSpanExporter
from switchboard_client.cli import waterfall
from switchboard_client.cli.errors import CliError
from switchboard_client.cli.spans import TraceSpan, read_trace_file, span_from_sdk_json, spans_from_jaeger

TRACE = "0af7651916cd43dd8448eb211c80319c"
MS = 1_000_000


def span(
    span_id: str,
    name: str,
    start_ms: float,
    duration_ms: float,
    parent: str | None = None,
    service: str = "switchboard-executor",
    error: bool = False,
) -> TraceSpan:
    start = 1_700_000_000_000 * MS + int(start_ms * MS)
    return TraceSpan(
        trace_id=TRACE,
        span_id=span_id,
        parent_id=parent,
        name=name,
        service=service,
        start_ns=start,
        end_ns=start + int(duration_ms * MS),
        error=error,
        status_message="BOOM" if error else "",
    )


def test_spans_follow_their_parents_depth_first_and_siblings_by_start() -> None:
    spans = [
        span("c", "late child", 50, 10, parent="a"),
        span("a", "root", 0, 100),
        span("b", "early child", 10, 20, parent="a"),
        span("d", "grandchild", 12, 5, parent="b"),
        # Its parent was never exported (the client's span): shown as a root.
        span("e", "orphan", 5, 1, parent="f"),
    ]

    rows = waterfall.ordered(spans)

    assert [(r.span.name, r.depth) for r in rows] == [
        ("root", 0),
        ("early child", 1),
        ("grandchild", 2),
        ("late child", 1),
        ("orphan", 0),
    ]
    assert [r.offset_ns // MS for r in rows] == [0, 10, 12, 50, 5]


def test_a_parent_cycle_still_shows_every_span_once() -> None:
    rows = waterfall.ordered([span("a", "one", 0, 1, parent="b"), span("b", "two", 1, 1, parent="a")])
    assert sorted(r.span.name for r in rows) == ["one", "two"]


@pytest.mark.parametrize(
    ("offset", "duration", "expected"),
    [
        (0, 100, "##########"),
        (0, 50, "#####     "),
        (50, 50, "     #####"),
        # Too short to see: still one cell, where it starts.
        (20, 0, "  #       "),
        (100, 0, "         #"),
    ],
)
def test_bars_are_scaled_to_the_trace(offset: int, duration: int, expected: str) -> None:
    assert waterfall.bar(offset, duration, 100, 10, "#") == expected


def test_render_lines_show_indent_service_offset_duration_bar_and_errors() -> None:
    spans = [
        span("a", "switchboard.executor.v1.ExecutorService/StartRun", 0, 1000),
        span("b", "/switchboard.agent.v1.AgentWorker/Execute", 500, 250, parent="a"),
        span("c", "agent chaos", 600, 100, parent="b", service="switchboard-worker", error=True),
    ]

    lines = waterfall.render(spans, width=80, glyphs=waterfall.ASCII)

    assert lines[0] == f"trace {TRACE}  3 spans  1.00s  1 failed"
    assert lines[1].split()[:4] == ["SPAN", "SERVICE", "START", "DURATION"]
    root, call, agent = lines[2:5]
    assert root.startswith("  ExecutorService/StartRun ") and root.split()[1:4] == [
        "executor",
        "0us",
        "1.00s",
    ]
    assert call.startswith("    AgentWorker/Execute ") and call.split()[1:4] == [
        "executor",
        "500.0ms",
        "250.0ms",
    ]
    assert agent.startswith("!     agent chaos ") and agent.split()[3:6] == ["worker", "600.0ms", "100.0ms"]
    # One timeline: every bar starts at the same column for offset 0, the root fills it.
    bar_column = root.index("#")
    assert root[bar_column:] == "#" * (len(root) - bar_column)
    assert call.index("#") == bar_column + (len(root) - bar_column) // 2
    assert all(len(line) <= 80 for line in lines)
    assert lines[-2:] == ["failed spans:", "  ! agent chaos (worker) at 600.0ms: BOOM"]


def test_long_names_are_cut_to_the_width_with_unicode_glyphs() -> None:
    spans = [span("a", "x" * 200, 0, 1), span("b", "child", 0, 1, parent="a", error=True)]

    lines = waterfall.render(spans, width=90, glyphs=waterfall.UNICODE)

    assert "…" in lines[2] and "x" * 200 not in lines[2]
    assert lines[3].startswith("✗") and "█" in lines[3]
    assert max(len(line) for line in lines[2:4]) <= 90


def test_no_spans_render_nothing() -> None:
    assert waterfall.render([]) == []


def test_json_lists_spans_in_waterfall_order_with_depth_and_times() -> None:
    spans = [span("b", "child", 250, 500, parent="a"), span("a", "root", 0, 1000)]

    documents = waterfall.to_json(spans)

    assert [(d["spanId"], d["parentSpanId"], d["depth"]) for d in documents] == [("a", "", 0), ("b", "a", 1)]
    assert documents[1]["startOffsetMs"] == 250.0 and documents[1]["durationMs"] == 500.0
    assert documents[0]["startTime"].endswith("Z") and json.dumps(documents)


# -- sources


def exported_spans(tmp_path: Path) -> tuple[Path, str]:
    """Spans of one trace written by the services' own exporter (plus another trace's)."""
    path = tmp_path / "traces.jsonl"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "switchboard-test"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("parent") as parent, tracer.start_as_current_span("child") as child:
        child.set_status(trace.Status(trace.StatusCode.ERROR, "it broke"))
        child.set_attribute("switchboard.run_id", "r-1")
    with tracer.start_as_current_span("another trace"):
        pass
    provider.shutdown()
    return path, format(parent.get_span_context().trace_id, "032x")


def test_the_services_trace_file_is_read_one_trace_at_a_time(tmp_path: Path) -> None:
    path, trace_id = exported_spans(tmp_path)
    with path.open("a") as handle:
        handle.write('{"cut short by a crash": \n')  # a torn line is skipped, not fatal
        handle.write(f'{{"not a span": "{trace_id}"}}\n')

    spans = read_trace_file(path, trace_id)

    assert sorted(s.name for s in spans) == ["child", "parent"]
    by_name = {s.name: s for s in spans}
    assert by_name["child"].parent_id == by_name["parent"].span_id and by_name["parent"].parent_id is None
    assert by_name["child"].error and by_name["child"].status_message == "it broke"
    assert by_name["child"].service == "switchboard-test" and by_name["child"].kind == "INTERNAL"
    assert by_name["child"].attributes["switchboard.run_id"] == "r-1"
    assert by_name["parent"].start_ns <= by_name["child"].start_ns <= by_name["child"].end_ns
    assert by_name["child"].end_ns <= by_name["parent"].end_ns


def test_times_keep_microsecond_precision() -> None:
    record = {
        "name": "s",
        "context": {"trace_id": f"0x{TRACE}", "span_id": "0x00f067aa0ba902b7"},
        "parent_id": None,
        "start_time": "2024-01-02T03:04:05.000001Z",
        "end_time": "2024-01-02T03:04:05.250002Z",
        "status": {"status_code": "UNSET"},
    }
    parsed = span_from_sdk_json(record)
    assert parsed.duration_ns == 250_001_000 and parsed.start_ns % 1_000_000_000 == 1_000
    assert parsed.span_id == "00f067aa0ba902b7" and parsed.service == "?"


def test_a_missing_trace_file_is_an_error_that_says_where_to_look(tmp_path: Path) -> None:
    with pytest.raises(CliError) as raised:
        read_trace_file(tmp_path / "absent.jsonl", TRACE)
    assert "no trace file" in raised.value.message and "--trace-file" in raised.value.details[0]


def test_jaeger_documents_give_parents_services_and_errors() -> None:
    document = {
        "data": [
            {
                "traceID": TRACE,
                "spans": [
                    {
                        "traceID": TRACE,
                        "spanID": "a1",
                        "operationName": "root",
                        "references": [],
                        "startTime": 1_000_000,
                        "duration": 300,
                        "tags": [{"key": "span.kind", "type": "string", "value": "server"}],
                        "processID": "p1",
                    },
                    {
                        "traceID": TRACE,
                        "spanID": "b2",
                        "operationName": "child",
                        "references": [
                            {"refType": "FOLLOWS_FROM", "traceID": TRACE, "spanID": "zz"},
                            {"refType": "CHILD_OF", "traceID": TRACE, "spanID": "a1"},
                        ],
                        "startTime": 1_000_100,
                        "duration": 100,
                        "tags": [
                            {"key": "otel.status_code", "type": "string", "value": "ERROR"},
                            {"key": "otel.status_description", "type": "string", "value": "nope"},
                        ],
                        "processID": "p2",
                    },
                ],
                "processes": {"p1": {"serviceName": "svc-one"}, "p2": {"serviceName": "svc-two"}},
            }
        ]
    }

    root, child = spans_from_jaeger(document, TRACE)

    assert (root.span_id, root.parent_id, root.service, root.kind) == (
        "00000000000000a1",
        None,
        "svc-one",
        "SERVER",
    )
    assert (child.parent_id, child.service) == ("00000000000000a1", "svc-two")
    assert child.error and child.status_message == "nope" and not root.error
    assert (child.start_ns - root.start_ns, child.duration_ns) == (100_000, 100_000)
    assert spans_from_jaeger({"data": None}, TRACE) == []


def test_in_memory_sdk_spans_round_trip_through_to_json() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("only"):
        pass
    (finished,) = exporter.get_finished_spans()

    parsed = span_from_sdk_json(json.loads(finished.to_json()))

    assert parsed.trace_id == format(finished.context.trace_id, "032x")
    # The SDK writes microseconds, rounded through a float: within a microsecond or two.
    assert abs(parsed.start_ns - (finished.start_time or 0)) < 2_000
