"""Printing for people (tables, one-line events, a spinner on long waits) and, with
`--json`, for programs (protobuf's JSON mapping)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from switchboard.events.v1 import event_pb2
from switchboard.executor.v1 import run_pb2
from switchboard.registry.v1 import agent_pb2


def message_dict(message: Message) -> dict[str, Any]:
    """A message in protobuf's canonical JSON mapping (lowerCamelCase), every field present."""
    result: dict[str, Any] = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return result


def can_encode(stream: TextIO, text: str) -> bool:
    try:
        text.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class Output:
    """stdout for results; stderr for notes, progress and errors."""

    def __init__(self, json_mode: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

    def line(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def json(self, value: Any, *, compact: bool = False) -> None:
        """One JSON document; `compact` for a stream (one document a line)."""
        text = json.dumps(value, separators=(",", ":")) if compact else json.dumps(value, indent=2)
        print(text, file=self.stdout, flush=True)

    def message(self, message: Message, *, compact: bool = False) -> None:
        self.json(message_dict(message), compact=compact)

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
        rows = [list(row) for row in rows]
        widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
        for row in [list(headers), *rows]:
            self.line(
                "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
            )


# -- values as people read them


def local_time(stamp: timestamp_pb2.Timestamp, *, precise: bool = False) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    moment = stamp.ToDatetime(tzinfo=UTC).astimezone()
    if precise:
        return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def seconds_text(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def run_duration(run: run_pb2.Run) -> str:
    if not run.HasField("start_time"):
        return "-"
    start = run.start_time.ToDatetime(tzinfo=UTC)
    end = run.end_time.ToDatetime(tzinfo=UTC) if run.HasField("end_time") else datetime.now(UTC)
    return seconds_text(max((end - start).total_seconds(), 0.0))


def state_name(run: run_pb2.Run) -> str:
    return run_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")


def step_state_name(step: run_pb2.Step) -> str:
    return run_pb2.StepState.Name(step.state).removeprefix("STEP_STATE_")


def event_type_name(event: event_pb2.Event) -> str:
    return event_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_").lower()


def tidy(value: Any) -> Any:
    """Struct numbers are doubles: 3.0 reads better as 3 (for people only; --json keeps them)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: tidy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [tidy(item) for item in value]
    return value


def struct_value(struct: struct_pb2.Struct) -> Any:
    return tidy(json_format.MessageToDict(struct))


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def indented_json(value: Any, indent: str = "  ") -> list[str]:
    return [indent + line for line in json.dumps(value, indent=2, ensure_ascii=False).splitlines()]


def status_text(status: status_pb2.Status) -> str:
    """A google.rpc.Status (a run's or step's error) on one line: reason and message."""
    reason = ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return f"{reason}: {status.message}" if reason else status.message


def event_line(event: event_pb2.Event) -> str:
    payload = struct_value(event.payload) if event.HasField("payload") else {}
    step = event.step_id or "-"
    text = (
        f"{event.seq:>4}  {local_time(event.create_time, precise=True)}  {event_type_name(event):<15}  {step}"
    )
    return f"{text}  {compact_json(payload)}" if payload else text


def print_run(out: Output, run: run_pb2.Run) -> None:
    """A run, field by field, with its steps, output and error."""
    target = run.agent or f"workflow of {len(run.workflow.steps)} steps"
    fields = [
        ("run", run.run_id),
        ("agent", target),
        ("state", state_name(run)),
        ("thread", run.thread_id or "-"),
        ("created", local_time(run.create_time)),
        ("started", local_time(run.start_time)),
        ("ended", local_time(run.end_time)),
        ("duration", run_duration(run)),
        ("trace", run.trace_id or "-"),
    ]
    fields.extend((f"label {key}", value) for key, value in sorted(run.labels.items()))
    for name, value in fields:
        out.line(f"{name:<10} {value}")
    if len(run.steps) > 1 or (run.steps and run.steps[0].step_id != "main"):
        out.line("steps:")
        out.table(
            ["  STEP", "AGENT", "STATE", "ATTEMPTS", "ERROR"],
            [
                [
                    f"  {s.step_id}",
                    s.agent,
                    step_state_name(s),
                    str(s.attempts),
                    status_text(s.error) if s.HasField("error") else "",
                ]
                for s in run.steps
            ],
        )
    elif run.steps:
        out.line(f"{'attempts':<10} {run.steps[0].attempts}")
    if run.HasField("output"):
        out.line("output:")
        for text in indented_json(struct_value(run.output)):
            out.line(text)
    if run.HasField("error") and (run.error.code or run.error.message):
        out.line(f"{'error':<10} {status_text(run.error)}")


def run_row(run: run_pb2.Run) -> list[str]:
    target = run.agent or f"workflow({len(run.workflow.steps)})"
    return [run.run_id, target, state_name(run), local_time(run.create_time), run_duration(run)]


RUN_HEADERS = ["RUN", "AGENT", "STATE", "CREATED", "DURATION"]


def duration_text(seconds: float) -> str:
    return "-" if not seconds else f"{seconds:g}s"


def agent_row(agent: agent_pb2.Agent) -> list[str]:
    description = agent.description if len(agent.description) <= 50 else agent.description[:49] + "…"
    return [
        agent.name,
        agent.endpoint,
        str(agent.max_concurrency or "-"),
        duration_text(agent.timeout.ToMilliseconds() / 1000),
        description,
    ]


AGENT_HEADERS = ["NAME", "ENDPOINT", "MAX CONCURRENCY", "TIMEOUT", "DESCRIPTION"]


def print_agent(out: Output, agent: agent_pb2.Agent) -> None:
    policy = agent.retry_policy
    fields = [
        ("name", agent.name),
        ("description", agent.description or "-"),
        ("endpoint", agent.endpoint),
        ("tools", ", ".join(agent.tools) or "-"),
        ("max concurrency", str(agent.max_concurrency or "default")),
        ("timeout", duration_text(agent.timeout.ToMilliseconds() / 1000)),
        ("heartbeat timeout", duration_text(agent.heartbeat_timeout.ToMilliseconds() / 1000)),
        ("max attempts", str(policy.max_attempts or "default")),
        ("initial backoff", duration_text(policy.initial_backoff.ToMilliseconds() / 1000)),
        ("max backoff", duration_text(policy.max_backoff.ToMilliseconds() / 1000)),
        ("backoff multiplier", f"{policy.backoff_multiplier:g}" if policy.backoff_multiplier else "-"),
        ("non-retryable", ", ".join(policy.non_retryable_reasons) or "-"),
        ("created", local_time(agent.create_time)),
        ("updated", local_time(agent.update_time)),
    ]
    fields.extend((f"label {key}", value) for key, value in sorted(agent.labels.items()))
    for name, value in fields:
        out.line(f"{name:<18} {value}")
    if agent.HasField("input_schema") and agent.input_schema.fields:
        out.line("input schema:")
        for text in indented_json(struct_value(agent.input_schema)):
            out.line(text)


# -- progress


class Progress:
    """A spinner with the elapsed time on stderr while something long is awaited.

    Only when stderr is a terminal: piped or redirected, it writes nothing, so
    logs and programs reading the output see no control characters."""

    INTERVAL = 0.1

    def __init__(self, stream: TextIO, text: str) -> None:
        self._stream = stream
        self.text = text
        self.enabled = stream.isatty()
        frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
        self._frames = itertools.cycle(frames if can_encode(stream, frames) else "|/-\\")
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def frame(self, elapsed: float) -> str:
        return f"\r{next(self._frames)} {self.text}  {seconds_text(elapsed)}\033[K"

    async def _spin(self) -> None:
        while True:
            self._stream.write(self.frame(time.monotonic() - self._started))
            self._stream.flush()
            await asyncio.sleep(self.INTERVAL)

    async def __aenter__(self) -> Progress:
        if self.enabled:
            self._task = asyncio.create_task(self._spin())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._stream.write("\r\033[K")
            self._stream.flush()
