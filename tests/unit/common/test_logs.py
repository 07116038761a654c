"""The JSON log lines: one object a line, with the time in UTC to the
millisecond, the trace and span ids, and the caller's extra fields."""

from __future__ import annotations

import json
import logging
import sys

from opentelemetry.sdk.trace import TracerProvider

from services.common.logs import JsonFormatter


def record(created: float, message: str = "rpc", **extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord({"name": "switchboard.rpc", "levelno": logging.INFO, "levelname": "INFO"})
    made.msg = message
    made.created = created
    made.msecs = int((created - int(created)) * 1000) + 0.0
    made.__dict__.update(extra)
    return made


def test_times_are_utc_to_the_millisecond_across_seconds() -> None:
    formatter = JsonFormatter("executor")
    # 2023-11-14T22:13:20Z, the next second, then back (binary-exact fractions).
    times = [
        json.loads(formatter.format(record(at)))["time"]
        for at in (1700000000.125, 1700000000.875, 1700000001.5, 1700000000.0)
    ]
    assert times == [
        "2023-11-14T22:13:20.125Z",
        "2023-11-14T22:13:20.875Z",
        "2023-11-14T22:13:21.500Z",
        "2023-11-14T22:13:20.000Z",
    ]


def test_a_line_carries_the_service_extra_fields_and_the_current_trace() -> None:
    formatter = JsonFormatter("executor")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("GetRun") as span:
        line = formatter.format(
            record(1700000000.0, rpc_method="/x.Y/Z", code="OK", duration_ms=1.25, _private=1)
        )
        context = span.get_span_context()
    entry = json.loads(line)
    assert (
        entry["service"] == "executor" and entry["logger"] == "switchboard.rpc" and entry["level"] == "INFO"
    )
    assert (entry["message"], entry["rpc_method"], entry["code"], entry["duration_ms"]) == (
        "rpc",
        "/x.Y/Z",
        "OK",
        1.25,
    )
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")
    assert "_private" not in entry and "process" not in entry and "thread" not in entry
    # Outside a span, no ids; values JSON has no type for are written as text.
    entry = json.loads(formatter.format(record(1700000000.0, address=("127.0.0.1", 50051), path=sys)))
    assert (
        "trace_id" not in entry
        and entry["address"] == ["127.0.0.1", 50051]
        and "module 'sys'" in entry["path"]
    )


def test_an_exception_is_logged_with_its_traceback() -> None:
    formatter = JsonFormatter("executor")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = record(1700000000.0, message="unexpected error")
        failed.exc_info = sys.exc_info()
    entry = json.loads(formatter.format(failed))
    assert "Traceback" in entry["exception"] and "RuntimeError: boom" in entry["exception"]
