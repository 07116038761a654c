"""A trace as a waterfall in the terminal: one line per span, indented under its
parent, with its service, start offset, duration and a bar on the trace's
timeline; failed spans are marked and their errors listed below."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from switchboard_client.cli.spans import TraceSpan

# gRPC span names ("/switchboard.events.v1.EventsService/Publish" on the client,
# without the slash on the server) are shown as "EventsService/Publish".
RPC_NAME = re.compile(r"^/?(?:[A-Za-z_][A-Za-z0-9_]*\.)+([A-Za-z_][A-Za-z0-9_]*/[A-Za-z_][A-Za-z0-9_]*)$")
SERVICE_PREFIX = "switchboard-"
MAX_NAME_WIDTH = 60
MAX_SERVICE_WIDTH = 24
MIN_BAR_WIDTH = 10
TIME_WIDTH = 8


@dataclass(frozen=True)
class Glyphs:
    bar: str
    error_mark: str
    ellipsis: str
    micro: str


UNICODE = Glyphs(bar="█", error_mark="✗", ellipsis="…", micro="µs")
ASCII = Glyphs(bar="#", error_mark="!", ellipsis="~", micro="us")


@dataclass(frozen=True)
class Row:
    span: TraceSpan
    depth: int
    # From the start of the trace's first span.
    offset_ns: int


def ordered(spans: Sequence[TraceSpan]) -> list[Row]:
    """Depth first, each span after its parent, siblings by start time. A span whose
    parent is not among `spans` (the client's span, or one not exported yet) is a root."""
    if not spans:
        return []
    by_id = {span.span_id: span for span in spans}
    children: dict[str | None, list[TraceSpan]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in by_id and span.parent_id != span.span_id else None
        children.setdefault(parent, []).append(span)
    for siblings in children.values():
        siblings.sort(key=lambda s: (s.start_ns, s.end_ns, s.name))
    origin = min(span.start_ns for span in spans)
    rows: list[Row] = []
    seen: set[str] = set()

    def visit(span: TraceSpan, depth: int) -> None:
        if span.span_id in seen:  # a repeated id; never loop
            return
        seen.add(span.span_id)
        rows.append(Row(span, depth, span.start_ns - origin))
        for child in children.get(span.span_id, ()):
            visit(child, depth + 1)

    for root in children.get(None, ()):
        visit(root, 0)
    # Spans only reachable through a parent cycle (corrupt input) still show, as roots.
    for span in sorted(spans, key=lambda s: s.start_ns):
        visit(span, 0)
    return rows


def format_duration(ns: int, glyphs: Glyphs = UNICODE) -> str:
    if ns < 1_000_000:
        return f"{ns / 1000:.0f}{glyphs.micro}"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.1f}ms"
    if ns < 120_000_000_000:
        return f"{ns / 1_000_000_000:.2f}s"
    return f"{ns / 60_000_000_000:.1f}m"


def display_name(name: str) -> str:
    match = RPC_NAME.match(name)
    return match.group(1) if match else name


def display_service(service: str) -> str:
    return service.removeprefix(SERVICE_PREFIX) or service


def _fit(text: str, width: int, glyphs: Glyphs) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + glyphs.ellipsis


def bar(offset_ns: int, duration_ns: int, total_ns: int, cells: int, glyph: str) -> str:
    """`cells` wide; the span's share of the trace filled, at least one cell."""
    total_ns = max(total_ns, 1)
    first = min(int(offset_ns * cells / total_ns), cells - 1)
    last = max(first + 1, min(math.ceil((offset_ns + duration_ns) * cells / total_ns), cells))
    return " " * first + glyph * (last - first) + " " * (cells - last)


def render(spans: Sequence[TraceSpan], *, width: int = 100, glyphs: Glyphs = UNICODE) -> list[str]:
    """The waterfall's lines (no trailing newlines), at most about `width` columns wide."""
    rows = ordered(spans)
    if not rows:
        return []
    start = min(row.span.start_ns for row in rows)
    total = max(row.span.end_ns for row in rows) - start
    labels = ["  " * row.depth + display_name(row.span.name) for row in rows]
    services = [display_service(row.span.service) for row in rows]
    name_width = min(max(len(label) for label in labels), MAX_NAME_WIDTH, max(16, width // 3))
    service_width = min(max(len(service) for service in services), MAX_SERVICE_WIDTH)
    name_width = max(name_width, len("SPAN"))
    service_width = max(service_width, len("SERVICE"))
    fixed = 2 + name_width + 2 + service_width + 2 + TIME_WIDTH + 2 + TIME_WIDTH + 2
    cells = max(width - fixed, MIN_BAR_WIDTH)
    errors = [row for row in rows if row.span.error]
    trace_id = rows[0].span.trace_id
    summary = f"trace {trace_id}  {len(rows)} spans  {format_duration(total, glyphs)}"
    if errors:
        summary += f"  {len(errors)} failed"
    lines = [
        summary,
        f"  {'SPAN':<{name_width}}  {'SERVICE':<{service_width}}  {'START':>{TIME_WIDTH}}  "
        f"{'DURATION':>{TIME_WIDTH}}  {'0':<{cells - len(format_duration(total, glyphs))}}"
        f"{format_duration(total, glyphs)}",
    ]
    for row, label, service in zip(rows, labels, services, strict=True):
        mark = glyphs.error_mark if row.span.error else " "
        lines.append(
            f"{mark} {_fit(label, name_width, glyphs):<{name_width}}  "
            f"{_fit(service, service_width, glyphs):<{service_width}}  "
            f"{format_duration(row.offset_ns, glyphs):>{TIME_WIDTH}}  "
            f"{format_duration(row.span.duration_ns, glyphs):>{TIME_WIDTH}}  "
            f"{bar(row.offset_ns, row.span.duration_ns, total, cells, glyphs.bar)}".rstrip()
        )
    if errors:
        lines.append("")
        lines.append("failed spans:")
        for row in errors:
            detail = f": {row.span.status_message}" if row.span.status_message else ""
            where = f"{display_name(row.span.name)} ({display_service(row.span.service)})"
            lines.append(f"  {glyphs.error_mark} {where} at {format_duration(row.offset_ns, glyphs)}{detail}")
    return lines


def _iso(ns: int) -> str:
    moment = datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


def to_json(spans: Sequence[TraceSpan]) -> list[dict[str, Any]]:
    """The spans in waterfall order, as JSON-ready dicts (lowerCamelCase, like the API's JSON)."""
    return [
        {
            "traceId": row.span.trace_id,
            "spanId": row.span.span_id,
            "parentSpanId": row.span.parent_id or "",
            "name": row.span.name,
            "service": row.span.service,
            "kind": row.span.kind,
            "depth": row.depth,
            "startTime": _iso(row.span.start_ns),
            "endTime": _iso(row.span.end_ns),
            "startOffsetMs": row.offset_ns / 1e6,
            "durationMs": row.span.duration_ns / 1e6,
            "error": row.span.error,
            "statusMessage": row.span.status_message,
            "attributes": dict(row.span.attributes),
        }
        for row in ordered(spans)
    ]
