"""Runs, steps and their events: the model, the state machine and the rules.

No grpc or proto here. Storage, the registry, agent workers and the events
service are reached through the small protocols at the bottom of this module,
so every rule can be exercised in-process.

A run's history is a sequence of `RunChange`s. Each change is decided by a pure
function from the run as it is now (so a change that no longer applies, e.g.
progress of a run that was cancelled meanwhile, decides to do nothing), and is
written with its events in one transaction.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from jsonschema import exceptions as jsonschema_exceptions
from jsonschema import validators as jsonschema_validators

from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument

if TYPE_CHECKING:
    from services.common.auth import Principal

MAIN_STEP = "main"

# Reasons (ErrorInfo.reason) of the errors this service raises or records.
AGENT_NOT_FOUND = "AGENT_NOT_FOUND"
AGENT_SCHEMA_INVALID = "AGENT_SCHEMA_INVALID"
WORKFLOWS_NOT_IMPLEMENTED = "WORKFLOWS_NOT_IMPLEMENTED"
INPUT_INVALID = "INPUT_INVALID"
HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"
RUN_DEADLINE_EXCEEDED = "RUN_DEADLINE_EXCEEDED"
ATTEMPT_DEADLINE_EXCEEDED = "ATTEMPT_DEADLINE_EXCEEDED"
RUN_CANCELLED = "RUN_CANCELLED"
EXECUTOR_RESTARTED = "EXECUTOR_RESTARTED"
EXECUTOR_ERROR = "EXECUTOR_ERROR"
WORKER_UNAVAILABLE = "WORKER_UNAVAILABLE"
WORKER_STREAM_ENDED = "WORKER_STREAM_ENDED"
AGENT_ERROR = "AGENT_ERROR"
REGISTRY_UNAVAILABLE = "REGISTRY_UNAVAILABLE"
RUN_NOT_FOUND = "RUN_NOT_FOUND"
INVALID_STATE_TRANSITION = "INVALID_STATE_TRANSITION"


class RunState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_RUN_STATES


_TERMINAL_RUN_STATES = frozenset(
    {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT}
)


class StepState(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"
    TIMED_OUT = "TIMED_OUT"
    COMPENSATED = "COMPENSATED"

    @property
    def terminal(self) -> bool:
        return self not in (StepState.PENDING, StepState.RUNNING, StepState.RETRYING)


# The state machines. Anything not listed is refused.
RUN_TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.RUNNING, RunState.CANCELLED, RunState.TIMED_OUT, RunState.FAILED}),
    RunState.RUNNING: frozenset(
        {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT}
    ),
    RunState.SUCCEEDED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
    RunState.TIMED_OUT: frozenset(),
}

STEP_TRANSITIONS: Mapping[StepState, frozenset[StepState]] = {
    StepState.PENDING: frozenset({StepState.RUNNING, StepState.SKIPPED, StepState.CANCELLED}),
    StepState.RUNNING: frozenset(
        {
            StepState.SUCCEEDED,
            StepState.FAILED,
            StepState.CANCELLED,
            StepState.TIMED_OUT,
            StepState.RETRYING,
        }
    ),
    StepState.RETRYING: frozenset(
        {StepState.RUNNING, StepState.FAILED, StepState.CANCELLED, StepState.TIMED_OUT}
    ),
    # Only a workflow's compensation undoes a succeeded step.
    StepState.SUCCEEDED: frozenset({StepState.COMPENSATED}),
    StepState.FAILED: frozenset(),
    StepState.CANCELLED: frozenset(),
    StepState.SKIPPED: frozenset(),
    StepState.TIMED_OUT: frozenset(),
    StepState.COMPENSATED: frozenset(),
}


class InvalidTransition(FailedPrecondition):
    def __init__(self, what: str, current: str, target: str) -> None:
        super().__init__(
            f"a {what} cannot go from {current} to {target}",
            reason=INVALID_STATE_TRANSITION,
            metadata={"from": current, "to": target},
        )


def check_run_transition(current: RunState, target: RunState) -> None:
    if target not in RUN_TRANSITIONS[current]:
        raise InvalidTransition("run", current, target)


def check_step_transition(current: StepState, target: StepState) -> None:
    if target not in STEP_TRANSITIONS[current]:
        raise InvalidTransition("step", current, target)


class EventType(enum.StrEnum):
    RUN_QUEUED = "RUN_QUEUED"
    AGENT_STARTED = "AGENT_STARTED"
    AGENT_THINKING = "AGENT_THINKING"
    TOOL_EXECUTING = "TOOL_EXECUTING"
    TOOL_COMPLETED = "TOOL_COMPLETED"
    AGENT_COMPLETED = "AGENT_COMPLETED"
    AGENT_FAILED = "AGENT_FAILED"
    RUN_COMPLETED = "RUN_COMPLETED"


TraceCarrier = tuple[tuple[str, str], ...]


def freeze_carrier(carrier: Mapping[str, str]) -> TraceCarrier:
    return tuple(sorted((str(k), str(v)) for k, v in carrier.items()))


@dataclass(frozen=True, slots=True)
class RunError:
    """Why a run or step failed: a gRPC code name, an UPPER_SNAKE reason and a
    message that is safe to show to the run's owner."""

    code: str
    reason: str
    message: str

    def as_payload(self) -> dict[str, str]:
        return {"code": self.code, "reason": self.reason, "message": self.message}


@dataclass(frozen=True, slots=True)
class ExecutionContext:
    """Everything a run executes under, created once per run from the
    authenticated caller and handed explicitly to every layer. Immutable and
    never shared between users: a step gets its own copy (`with_step`)."""

    user_id: str
    run_id: str
    request_id: str
    thread_id: str
    deadline: datetime
    # W3C context of the span that started the run (the StartRun span).
    trace_carrier: TraceCarrier
    step_id: str = ""
    # 1 for a step's first attempt; 0 outside a step.
    attempt: int = 0

    @classmethod
    def for_new_run(
        cls,
        principal: Principal,
        *,
        thread_id: str,
        request_id: str,
        deadline: datetime,
        trace_carrier: Mapping[str, str],
    ) -> ExecutionContext:
        # Ids are the server's; a run without a client request_id gets one too,
        # so logs and traces can always name the request.
        return cls(
            user_id=principal.user_id,
            run_id=str(uuid.uuid4()),
            request_id=request_id or str(uuid.uuid4()),
            thread_id=thread_id,
            deadline=deadline,
            trace_carrier=freeze_carrier(trace_carrier),
        )

    def with_step(self, step_id: str, attempt: int) -> ExecutionContext:
        if attempt < 1:
            raise ValueError("attempts count from 1")
        return dataclasses.replace(self, step_id=step_id, attempt=attempt)

    def remaining_seconds(self, now: datetime) -> float:
        return (self.deadline - now).total_seconds()

    def carrier(self) -> dict[str, str]:
        """A fresh dict for propagation APIs; the context itself stays immutable."""
        return dict(self.trace_carrier)


@dataclass(frozen=True, slots=True)
class StepRecord:
    step_id: str
    agent: str
    state: StepState
    attempts: int = 0
    output: Mapping[str, Any] | None = None
    error: RunError | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    depends_on: tuple[str, ...] = ()
    compensation_agent: str = ""


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    user_id: str
    agent: str
    thread_id: str
    request_id: str
    state: RunState
    input: Mapping[str, Any]
    labels: Mapping[str, str]
    create_time: datetime
    deadline: datetime
    trace_id: str
    trace_carrier: TraceCarrier
    steps: tuple[StepRecord, ...]
    output: Mapping[str, Any] | None = None
    error: RunError | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    # Seq of the run's newest event; the next one gets last_seq + 1.
    last_seq: int = 0

    def step(self, step_id: str) -> StepRecord:
        for step in self.steps:
            if step.step_id == step_id:
                return step
        raise KeyError(step_id)

    def context(self) -> ExecutionContext:
        """The run's execution context, as created by StartRun."""
        return ExecutionContext(
            user_id=self.user_id,
            run_id=self.run_id,
            request_id=self.request_id,
            thread_id=self.thread_id,
            deadline=self.deadline,
            trace_carrier=self.trace_carrier,
        )


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event decided by a change; storage assigns its seq on commit."""

    event_id: str
    type: EventType
    step_id: str
    agent: str
    payload: Mapping[str, Any]
    create_time: datetime
    trace_carrier: TraceCarrier


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A committed event waiting in (or relayed from) the outbox."""

    event_id: str
    run_id: str
    user_id: str
    seq: int
    type: EventType
    step_id: str
    agent: str
    payload: Mapping[str, Any]
    create_time: datetime
    trace_carrier: TraceCarrier


@dataclass(frozen=True, slots=True)
class StepChange:
    """New values for one step; None leaves a field as it is."""

    step_id: str
    state: StepState | None = None
    attempts: int | None = None
    output: Mapping[str, Any] | None = None
    error: RunError | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class RunChange:
    """One transaction's worth of change to a run: its fields, its steps' and
    the events that describe them. None leaves a field as it is."""

    state: RunState | None = None
    output: Mapping[str, Any] | None = None
    error: RunError | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    steps: tuple[StepChange, ...] = ()
    events: tuple[EventDraft, ...] = ()


def _changed_step(step: StepRecord, change: StepChange) -> StepRecord:
    if change.state is not None and change.state is not step.state:
        check_step_transition(step.state, change.state)
    return dataclasses.replace(
        step,
        state=change.state or step.state,
        attempts=step.attempts if change.attempts is None else change.attempts,
        output=step.output if change.output is None else change.output,
        error=change.error or step.error,
        start_time=change.start_time or step.start_time,
        end_time=change.end_time or step.end_time,
    )


def apply_change(run: RunRecord, change: RunChange) -> RunRecord:
    """The run after `change`; refuses a transition the state machine forbids."""
    if change.state is not None and change.state is not run.state:
        check_run_transition(run.state, change.state)
    by_id = {c.step_id: c for c in change.steps}
    unknown = set(by_id) - {s.step_id for s in run.steps}
    if unknown:
        raise KeyError(f"unknown steps {sorted(unknown)}")
    steps = tuple(_changed_step(s, by_id[s.step_id]) if s.step_id in by_id else s for s in run.steps)
    return dataclasses.replace(
        run,
        state=change.state or run.state,
        output=run.output if change.output is None else change.output,
        error=change.error or run.error,
        start_time=change.start_time or run.start_time,
        end_time=change.end_time or run.end_time,
        steps=steps,
        last_seq=run.last_seq + len(change.events),
    )


def events_with_seq(run: RunRecord, change: RunChange) -> list[OutboxEvent]:
    """The change's events, numbered after the run's newest one (gapless)."""
    return [
        OutboxEvent(
            event_id=draft.event_id,
            run_id=run.run_id,
            user_id=run.user_id,
            seq=run.last_seq + offset,
            type=draft.type,
            step_id=draft.step_id,
            agent=draft.agent,
            payload=draft.payload,
            create_time=draft.create_time,
            trace_carrier=draft.trace_carrier,
        )
        for offset, draft in enumerate(change.events, start=1)
    ]


# ---------------------------------------------------------------------------
# What a worker reports during an attempt.


@dataclass(frozen=True, slots=True)
class Thinking:
    text: str


@dataclass(frozen=True, slots=True)
class ToolStarted:
    call_id: str
    tool: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ToolFinished:
    call_id: str
    tool: str
    result: Mapping[str, Any]
    error: RunError | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Result:
    output: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Failure:
    error: RunError


Progress = Thinking | ToolStarted | ToolFinished
WorkerUpdate = Thinking | ToolStarted | ToolFinished | Heartbeat | Result | Failure


# ---------------------------------------------------------------------------
# The rules: each decides a change from the run as it is now, or None when the
# change no longer applies (the run ended meanwhile).


def _draft(
    type_: EventType,
    step_id: str,
    agent: str,
    payload: Mapping[str, Any],
    now: datetime,
    carrier: Mapping[str, str],
) -> EventDraft:
    return EventDraft(
        event_id=str(uuid.uuid4()),
        type=type_,
        step_id=step_id,
        agent=agent,
        payload=payload,
        create_time=now,
        trace_carrier=freeze_carrier(carrier),
    )


def run_state_name(state: RunState) -> str:
    """The state as clients see it in event payloads (the proto enum name)."""
    return f"RUN_STATE_{state.value}"


def new_run(
    context: ExecutionContext,
    *,
    agent: str,
    input: Mapping[str, Any],
    labels: Mapping[str, str],
    now: datetime,
    trace_id: str,
) -> tuple[RunRecord, EventDraft]:
    """A run as StartRun persists it: QUEUED, one pending step, RUN_QUEUED."""
    run = RunRecord(
        run_id=context.run_id,
        user_id=context.user_id,
        agent=agent,
        thread_id=context.thread_id,
        request_id=context.request_id,
        state=RunState.QUEUED,
        input=dict(input),
        labels=dict(labels),
        create_time=now,
        deadline=context.deadline,
        trace_id=trace_id,
        trace_carrier=context.trace_carrier,
        steps=(StepRecord(step_id=MAIN_STEP, agent=agent, state=StepState.PENDING),),
    )
    queued = _draft(
        EventType.RUN_QUEUED,
        "",
        agent,
        {"state": run_state_name(RunState.QUEUED), "deadline": context.deadline.isoformat()},
        now,
        context.carrier(),
    )
    return run, queued


def begin_attempt(
    run: RunRecord, step_id: str, attempt: int, now: datetime, carrier: Mapping[str, str]
) -> RunChange | None:
    if run.state.terminal:
        return None
    step = run.step(step_id)
    check_step_transition(step.state, StepState.RUNNING)
    return RunChange(
        state=RunState.RUNNING,
        start_time=run.start_time or now,
        steps=(
            StepChange(step_id, state=StepState.RUNNING, attempts=attempt, start_time=step.start_time or now),
        ),
        events=(_draft(EventType.AGENT_STARTED, step_id, step.agent, {"attempt": attempt}, now, carrier),),
    )


def record_progress(
    run: RunRecord, step_id: str, attempt: int, update: Progress, now: datetime, carrier: Mapping[str, str]
) -> RunChange | None:
    if run.state is not RunState.RUNNING or run.step(step_id).state is not StepState.RUNNING:
        return None
    agent = run.step(step_id).agent
    type_: EventType
    payload: dict[str, Any]
    match update:
        case Thinking(text=text):
            type_, payload = EventType.AGENT_THINKING, {"text": text}
        case ToolStarted(call_id=call_id, tool=tool, arguments=arguments):
            type_ = EventType.TOOL_EXECUTING
            payload = {"call_id": call_id, "tool": tool, "arguments": dict(arguments)}
        case ToolFinished(call_id=call_id, tool=tool, result=result, error=error):
            type_ = EventType.TOOL_COMPLETED
            payload = {"call_id": call_id, "tool": tool, "result": dict(result)}
            if error is not None:
                payload["error"] = error.as_payload()
    payload["attempt"] = attempt
    return RunChange(events=(_draft(type_, step_id, agent, payload, now, carrier),))


def complete_with_output(
    run: RunRecord,
    step_id: str,
    attempt: int,
    output: Mapping[str, Any],
    now: datetime,
    carrier: Mapping[str, str],
) -> RunChange | None:
    """The single step succeeded, and with it the run (one transaction, so a
    crash can never leave a succeeded step inside a run that looks unfinished)."""
    if run.state is not RunState.RUNNING:
        return None
    agent = run.step(step_id).agent
    return RunChange(
        state=RunState.SUCCEEDED,
        output=dict(output),
        end_time=now,
        steps=(StepChange(step_id, state=StepState.SUCCEEDED, output=dict(output), end_time=now),),
        events=(
            _draft(
                EventType.AGENT_COMPLETED,
                step_id,
                agent,
                {"output": dict(output), "attempt": attempt},
                now,
                carrier,
            ),
            _draft(
                EventType.RUN_COMPLETED,
                "",
                run.agent,
                {"state": run_state_name(RunState.SUCCEEDED), "output": dict(output)},
                now,
                carrier,
            ),
        ),
    )


_STEP_STATE_WHEN_RUN_ENDS = {
    RunState.FAILED: StepState.FAILED,
    RunState.CANCELLED: StepState.CANCELLED,
    RunState.TIMED_OUT: StepState.TIMED_OUT,
}


def end_run(
    run: RunRecord, state: RunState, error: RunError, now: datetime, carrier: Mapping[str, str]
) -> RunChange | None:
    """Ends an unfinished run as FAILED, CANCELLED or TIMED_OUT: its running
    steps end the same way (each with AGENT_FAILED), steps that never started
    are SKIPPED, and RUN_COMPLETED closes the stream."""
    if run.state.terminal:
        return None
    if state not in _STEP_STATE_WHEN_RUN_ENDS:
        raise ValueError(f"a run does not end {state} with an error")
    check_run_transition(run.state, state)
    step_changes: list[StepChange] = []
    events: list[EventDraft] = []
    for step in run.steps:
        if step.state in (StepState.RUNNING, StepState.RETRYING):
            step_changes.append(
                StepChange(step.step_id, state=_STEP_STATE_WHEN_RUN_ENDS[state], error=error, end_time=now)
            )
            events.append(
                _draft(
                    EventType.AGENT_FAILED,
                    step.step_id,
                    step.agent,
                    {"error": error.as_payload(), "attempt": step.attempts},
                    now,
                    carrier,
                )
            )
        elif step.state is StepState.PENDING:
            step_changes.append(StepChange(step.step_id, state=StepState.SKIPPED, end_time=now))
    events.append(
        _draft(
            EventType.RUN_COMPLETED,
            "",
            run.agent,
            {"state": run_state_name(state), "error": error.as_payload()},
            now,
            carrier,
        )
    )
    return RunChange(state=state, error=error, end_time=now, steps=tuple(step_changes), events=tuple(events))


# ---------------------------------------------------------------------------
# Agents and input validation.


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """What the executor needs to know of a registered agent."""

    name: str
    endpoint: str
    tools: tuple[str, ...]
    input_schema: Mapping[str, Any]
    timeout_seconds: float
    heartbeat_timeout_seconds: float
    max_concurrency: int


def _field_path(path: Sequence[Any]) -> str:
    return ".".join(["input", *(str(part) for part in path)])


def validate_input(schema: Mapping[str, Any], value: Mapping[str, Any]) -> None:
    """Checks a run's input against its agent's JSON Schema; one violation per
    failing path, named `input.<path>` (a missing property names itself)."""
    if not schema:
        return
    validator_class = jsonschema_validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema_exceptions.SchemaError:
        raise FailedPrecondition(
            "the agent's input schema is not a valid JSON Schema", reason=AGENT_SCHEMA_INVALID
        ) from None
    violations: dict[str, str] = {}
    errors = sorted(validator_class(schema).iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        path = list(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, Mapping):
            for name in error.validator_value:
                if name not in error.instance:
                    violations.setdefault(_field_path([*path, name]), "is required")
            continue
        violations.setdefault(_field_path(path), error.message)
    if violations:
        raise InvalidArgument(
            [FieldViolation(f, d) for f, d in violations.items()],
            reason=INPUT_INVALID,
            message="the input does not match the agent's input schema",
        )


# ---------------------------------------------------------------------------
# Ports to the outside.


@dataclass(frozen=True, slots=True)
class RunFilter:
    state: RunState | None = None
    agent: str = ""
    thread_id: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state or "", "agent": self.agent, "thread_id": self.thread_id}


# (create_time ISO string, run_id) of the last run of a page.
PageKey = tuple[str, str]

Decide = Callable[[RunRecord], RunChange | None]


class RunStore(Protocol):
    async def create_run(self, run: RunRecord, events: Sequence[EventDraft]) -> tuple[RunRecord, bool]:
        """Stores a new run with its first events; on a repeated (user,
        request_id) returns the existing run and False instead."""
        ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def find_run_by_request(self, user_id: str, request_id: str) -> RunRecord | None: ...

    async def list_runs(
        self, user_id: str, run_filter: RunFilter, limit: int, after: PageKey | None
    ) -> list[RunRecord]: ...

    async def update_run(self, run_id: str, decide: Decide) -> tuple[RunRecord, bool] | None:
        """In one transaction: reads the run (locked), asks `decide` for a
        change and writes it with its events. Returns the run afterwards and
        whether anything changed, or None for an unknown run."""
        ...

    async def runs_in_state(self, state: RunState) -> list[RunRecord]:
        """Every run in `state`, oldest first."""
        ...


class AgentDirectory(Protocol):
    async def get(self, name: str) -> AgentSpec:
        """Raises NotFound (AGENT_NOT_FOUND) or Unavailable."""
        ...


class WorkerCallCancelled(Exception):
    """The attempt's worker call was cancelled by us (CancelRun)."""


class WorkerSession(Protocol):
    async def next(self, timeout: float) -> WorkerUpdate | None:
        """The next update; None when the stream ended; TimeoutError when none
        came within `timeout`; WorkerCallCancelled after `cancel`."""
        ...

    def cancel(self) -> None: ...


class WorkerConnector(Protocol):
    async def open(
        self, agent: AgentSpec, input: Mapping[str, Any], context: ExecutionContext, timeout: float
    ) -> WorkerSession: ...


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    default_run_timeout_seconds: float = 300.0
    max_run_timeout_seconds: float = 24 * 3600.0
    publish_wait_seconds: float = 1.0
    wait_run_default_seconds: float = 60.0


def deadline_for(now: datetime, timeout_seconds: float | None, settings: ExecutorSettings) -> datetime:
    seconds = timeout_seconds or settings.default_run_timeout_seconds
    return now + timedelta(seconds=min(seconds, settings.max_run_timeout_seconds))
