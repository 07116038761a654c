"""A trace's spans, from the services' local trace file or from Jaeger's query API.

The trace file holds one span a line as the OpenTelemetry SDK writes it
(`ReadableSpan.to_json()`: hex ids with a `0x` prefix, ISO-8601 UTC times with
microseconds, the service in `resource.attributes["service.name"]`), appended
by every service of the suite. Jaeger's `GET /api/traces/<trace id>` answers
`{"data": [{"traceID", "spans": [...], "processes": {...}}]}` with times in
microseconds since the epoch and parents as `CHILD_OF` references.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from switchboard_client.cli.errors import CliError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
JAEGER_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class TraceSpan:
    trace_id: str
    span_id: str
    # None for a root (or a span whose parent is in no source we read).
    parent_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    kind: str = ""
    error: bool = False
    status_message: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def duration_ns(self) -> int:
        return max(self.end_ns - self.start_ns, 0)


def _hex_id(value: Any) -> str:
    return str(value or "").lower().removeprefix("0x")


def _iso_ns(text: str) -> int:
    """Nanoseconds since the epoch of the SDK's "%Y-%m-%dT%H:%M:%S.%fZ" (exact, no float)."""
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return (moment - EPOCH) // MICROSECOND * 1000


def span_from_sdk_json(record: Mapping[str, Any]) -> TraceSpan:
    """One line of the trace file; KeyError/ValueError/TypeError if it is not a span."""
    context = record["context"]
    start = _iso_ns(record["start_time"])
    end = _iso_ns(record["end_time"]) if record.get("end_time") else start
    status = record.get("status") or {}
    resource = (record.get("resource") or {}).get("attributes") or {}
    return TraceSpan(
        trace_id=_hex_id(context["trace_id"]),
        span_id=_hex_id(context["span_id"]),
        parent_id=_hex_id(record.get("parent_id")) or None,
        name=str(record["name"]),
        service=str(resource.get("service.name", "?")),
        start_ns=start,
        end_ns=end,
        kind=str(record.get("kind", "")).removeprefix("SpanKind."),
        error=status.get("status_code") == "ERROR",
        status_message=str(status.get("description", "")),
        attributes=dict(record.get("attributes") or {}),
    )


def read_trace_file(path: Path, trace_id: str) -> list[TraceSpan]:
    """The spans of one trace in a JSON-lines trace file (unreadable lines are skipped)."""
    wanted = trace_id.lower()
    spans = []
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if wanted not in line:  # cheap: most lines are other traces'
                    continue
                try:
                    span = span_from_sdk_json(json.loads(line))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line cut short by a crash, or not a span
                if span.trace_id == wanted:
                    spans.append(span)
    except FileNotFoundError:
        raise CliError(
            f"no trace file at {path}",
            details=[
                "the services write it into their data dir (.switchboard/ for `make up`) when no OTLP "
                "endpoint is set; point to it with --trace-file or SWITCHBOARD_TRACE_FILE, or read "
                "from Jaeger with --jaeger URL"
            ],
        ) from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    return spans


def _tags(items: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    return {str(tag.get("key")): tag.get("value") for tag in items or ()}


def spans_from_jaeger(document: Mapping[str, Any], trace_id: str) -> list[TraceSpan]:
    """The spans of a Jaeger `/api/traces/<id>` answer."""
    spans = []
    for trace in document.get("data") or ():
        processes = trace.get("processes") or {}
        for raw in trace.get("spans") or ():
            tags = _tags(raw.get("tags"))
            parent = next(
                (
                    ref.get("spanID")
                    for ref in raw.get("references") or ()
                    if ref.get("refType") == "CHILD_OF"
                    and _hex_id(ref.get("traceID")) == _hex_id(raw["traceID"])
                ),
                None,
            )
            process = processes.get(raw.get("processID"), {})
            start_ns = int(raw["startTime"]) * 1000
            status_code = str(tags.pop("otel.status_code", "")).upper()
            spans.append(
                TraceSpan(
                    trace_id=_hex_id(raw["traceID"]).rjust(32, "0"),
                    span_id=_hex_id(raw["spanID"]).rjust(16, "0"),
                    parent_id=_hex_id(parent).rjust(16, "0") if parent else None,
                    name=str(raw.get("operationName", "")),
                    service=str(process.get("serviceName", "?")),
                    start_ns=start_ns,
                    end_ns=start_ns + int(raw.get("duration", 0)) * 1000,
                    kind=str(tags.pop("span.kind", "")).upper(),
                    error=status_code == "ERROR" or tags.get("error") in (True, "true"),
                    status_message=str(tags.pop("otel.status_description", "")),
                    attributes=tags,
                )
            )
    wanted = trace_id.lower()
    return [span for span in spans if span.trace_id == wanted]


def fetch_jaeger(base_url: str, trace_id: str) -> list[TraceSpan]:
    """GET <base>/api/traces/<trace id> from a Jaeger query service (blocking)."""
    url = f"{base_url.rstrip('/')}/api/traces/{urllib.parse.quote(trace_id)}"
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise CliError(f"--jaeger must be an http(s) URL, not {base_url!r}")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=JAEGER_TIMEOUT_SECONDS) as answer:
            document = json.load(answer)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise CliError(f"Jaeger at {base_url} has no trace {trace_id}") from None
        raise CliError(f"Jaeger at {base_url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach Jaeger at {base_url}: {exc.reason}") from None
    except (TimeoutError, ValueError) as exc:
        raise CliError(f"no usable answer from Jaeger at {base_url}: {exc}") from None
    if not isinstance(document, dict):
        raise CliError(f"Jaeger at {base_url} answered something that is not a trace")
    try:
        return spans_from_jaeger(document, trace_id)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CliError(f"Jaeger at {base_url} answered a trace in an unknown format ({exc!r})") from None
