"""Runs, steps and their events: the model, the state machine and the rules.

No grpc or proto here. Storage, the registry, agent workers and the events
service are reached through the small protocols at the bottom of this module,
so every rule can be exercised in-process.

A run's history is a sequence of `RunChange`s. Each change is decided by a pure
function from the run as it is now (so a change that no longer applies, e.g.
progress of a run that was cancelled meanwhile, decides to do nothing), and is
written with its events in one transaction.

A single-agent run has one step ("main"); a workflow run (no agent of its
own) has one step per workflow step. A step runs attempts: RUNNING, then
SUCCEEDED, or RETRYING (its last attempt's error kept) until the next one, or
FAILED for good. A workflow whose step fails, or that is cancelled or times
out while something may need undoing, first *winds down* (`ending` records
how it will end; no new attempt starts), its compensations run, and then it
ends (`finish_run`). Every event names its step.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from jsonschema import exceptions as jsonschema_exceptions
from jsonschema import validators as jsonschema_validators

from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.executor.retry import RetrySettings
from services.executor.workflow import WorkflowStepSpec, thaw_json

if TYPE_CHECKING:
    from services.common.auth import Principal

MAIN_STEP = "main"

# Reasons (ErrorInfo.reason) of the errors this service raises or records.
AGENT_NOT_FOUND = "AGENT_NOT_FOUND"
AGENT_SCHEMA_INVALID = "AGENT_SCHEMA_INVALID"
USER_QUEUE_FULL = "USER_QUEUE_FULL"
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
# A step of a workflow stopped because the workflow is ending (another step failed).
WORKFLOW_STOPPED = "WORKFLOW_STOPPED"


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
    # FAILED before any attempt: its agent is gone, or its input cannot be built.
    StepState.PENDING: frozenset(
        {StepState.RUNNING, StepState.SKIPPED, StepState.CANCELLED, StepState.FAILED}
    ),
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


class LeaseLost(Exception):
    """A write carried a fence the run no longer has: another replica claimed
    the run after this one's lease expired. Nothing was written; whoever
    wrote should stop working on the run."""

    def __init__(self, run_id: str, fence: int, current: int) -> None:
        super().__init__(f"run {run_id}: fence {fence} was superseded by {current}")
        self.run_id = run_id
        self.fence = fence
        self.current = current


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

    def with_step(self, step_id: str, attempt: int, deadline: datetime | None = None) -> ExecutionContext:
        """The child context of one attempt of a step. `deadline` replaces the
        run's only for work done after the run's own deadline (compensation)."""
        if attempt < 1:
            raise ValueError("attempts count from 1")
        return dataclasses.replace(self, step_id=step_id, attempt=attempt, deadline=deadline or self.deadline)

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
    # A workflow step's own input (see workflow.resolve_step_input); None for
    # the single step of an agent run, which runs with the run's input.
    input: Mapping[str, Any] | None = None
    # 1 for the run's first step to succeed, 2 for the next...; 0 until then.
    # Compensation undoes steps in reverse of this order.
    completion: int = 0

    @property
    def active(self) -> bool:
        """An attempt is running, or the next one is waiting for its backoff."""
        return self.state in (StepState.RUNNING, StepState.RETRYING)


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
    # Set while a workflow winds down (compensating) before it ends in this
    # state; `error` already says why.
    ending: RunState | None = None
    # The admission tick (fair queue round-robin) when the run left the queue;
    # 0 while it waits.
    admission: int = 0
    # The replica that holds the run ("" while it waits to be admitted) and
    # the fencing token of that claim (see `admission`). Storage sets them;
    # a change never does.
    owner: str = ""
    fence: int = 0

    @property
    def is_workflow(self) -> bool:
        return not self.agent

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
    completion: int | None = None


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
    ending: RunState | None = None
    admission: int | None = None


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
        completion=step.completion if change.completion is None else change.completion,
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
        ending=change.ending or run.ending,
        admission=run.admission if change.admission is None else change.admission,
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


def _queued_event(run: RunRecord, context: ExecutionContext, now: datetime) -> EventDraft:
    return _draft(
        EventType.RUN_QUEUED,
        "",
        run.agent,
        {"state": run_state_name(RunState.QUEUED), "deadline": context.deadline.isoformat()},
        now,
        context.carrier(),
    )


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
    return run, _queued_event(run, context, now)


def new_workflow_run(
    context: ExecutionContext,
    *,
    steps: Sequence[WorkflowStepSpec],
    input: Mapping[str, Any],
    labels: Mapping[str, str],
    now: datetime,
    trace_id: str,
) -> tuple[RunRecord, EventDraft]:
    """A workflow run as StartRun persists it (after `validate_workflow`):
    QUEUED, every step pending, no agent of its own."""
    run = RunRecord(
        run_id=context.run_id,
        user_id=context.user_id,
        agent="",
        thread_id=context.thread_id,
        request_id=context.request_id,
        state=RunState.QUEUED,
        input=dict(input),
        labels=dict(labels),
        create_time=now,
        deadline=context.deadline,
        trace_id=trace_id,
        trace_carrier=context.trace_carrier,
        steps=tuple(
            StepRecord(
                step_id=spec.step_id,
                agent=spec.agent,
                state=StepState.PENDING,
                depends_on=spec.depends_on,
                compensation_agent=spec.compensation_agent,
                input=thaw_json(spec.input),
            )
            for spec in steps
        ),
    )
    return run, _queued_event(run, context, now)


def admit_run(run: RunRecord, tick: int) -> RunChange | None:
    """Records that the fair queue let the run in (its user's turn `tick`)."""
    if run.state is not RunState.QUEUED:
        return None
    return RunChange(admission=tick)


def begin_attempt(
    run: RunRecord, step_id: str, attempt: int, now: datetime, carrier: Mapping[str, str]
) -> RunChange | None:
    if run.state.terminal or run.ending is not None:
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


def _compensating(run: RunRecord, step: StepRecord) -> bool:
    return (
        run.state is RunState.RUNNING
        and run.ending is not None
        and step.state is StepState.SUCCEEDED
        and bool(step.compensation_agent)
    )


def record_progress(
    run: RunRecord,
    step_id: str,
    attempt: int,
    update: Progress,
    now: datetime,
    carrier: Mapping[str, str],
    *,
    compensation: bool = False,
) -> RunChange | None:
    step = run.step(step_id)
    if compensation:
        if not _compensating(run, step):
            return None
        agent = step.compensation_agent
    else:
        if run.state is not RunState.RUNNING or step.state is not StepState.RUNNING:
            return None
        agent = step.agent
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
    if compensation:
        payload["compensation"] = True
    return RunChange(events=(_draft(type_, step_id, agent, payload, now, carrier),))


def _attempt_in_progress(run: RunRecord, step: StepRecord, attempt: int) -> bool:
    return run.state is RunState.RUNNING and step.state is StepState.RUNNING and step.attempts == attempt


def retry_later(
    run: RunRecord,
    step_id: str,
    attempt: int,
    error: RunError,
    delay_seconds: float,
    now: datetime,
    carrier: Mapping[str, str],
) -> RunChange | None:
    """An attempt failed and the step will try again after `delay_seconds`:
    the step waits RETRYING with the attempt's error; AGENT_FAILED says so."""
    step = run.step(step_id)
    if not _attempt_in_progress(run, step, attempt) or run.ending is not None:
        return None
    payload = {"error": error.as_payload(), "attempt": attempt, "retry_in_seconds": round(delay_seconds, 3)}
    return RunChange(
        steps=(StepChange(step_id, state=StepState.RETRYING, error=error),),
        events=(_draft(EventType.AGENT_FAILED, step_id, step.agent, payload, now, carrier),),
    )


def workflow_output(run: RunRecord, outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A workflow's output: the outputs of its final steps (those no other step
    depends on), by step id."""
    needed = {dependency for step in run.steps for dependency in step.depends_on}
    return {
        step.step_id: dict(outputs.get(step.step_id) or {})
        for step in run.steps
        if step.step_id not in needed
    }


def complete_step(
    run: RunRecord,
    step_id: str,
    attempt: int,
    output: Mapping[str, Any],
    now: datetime,
    carrier: Mapping[str, str],
) -> RunChange | None:
    """The attempt succeeded: the step is SUCCEEDED. When it was the last step
    to finish, the run succeeds in the same transaction (so a crash can never
    leave succeeded steps inside a run that looks unfinished). A single-agent
    run's output is its step's; a workflow's is `workflow_output`."""
    step = run.step(step_id)
    if not _attempt_in_progress(run, step, attempt):
        return None
    completion = 1 + max((s.completion for s in run.steps), default=0)
    step_change = StepChange(
        step_id, state=StepState.SUCCEEDED, output=dict(output), end_time=now, completion=completion
    )
    completed = _draft(
        EventType.AGENT_COMPLETED,
        step_id,
        step.agent,
        {"output": dict(output), "attempt": attempt},
        now,
        carrier,
    )
    others_done = all(s.state is StepState.SUCCEEDED for s in run.steps if s.step_id != step_id)
    if run.ending is not None or not others_done:
        return RunChange(steps=(step_change,), events=(completed,))
    if run.is_workflow:
        outputs = {s.step_id: s.output or {} for s in run.steps}
        outputs[step_id] = output
        run_output = workflow_output(run, outputs)
    else:
        run_output = dict(output)
    return RunChange(
        state=RunState.SUCCEEDED,
        output=run_output,
        end_time=now,
        steps=(step_change,),
        events=(
            completed,
            _draft(
                EventType.RUN_COMPLETED,
                "",
                run.agent,
                {"state": run_state_name(RunState.SUCCEEDED), "output": run_output},
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
        if step.active:
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


def _skip_pending(run: RunRecord, now: datetime) -> tuple[StepChange, ...]:
    return tuple(
        StepChange(s.step_id, state=StepState.SKIPPED, end_time=now)
        for s in run.steps
        if s.state is StepState.PENDING
    )


def may_need_compensation(run: RunRecord) -> bool:
    """Whether ending the run may have to undo steps: a started workflow with
    a compensation agent on a step that has succeeded or may still succeed."""
    return (
        run.is_workflow
        and run.state is RunState.RUNNING
        and any(
            step.compensation_agent and (step.state is StepState.SUCCEEDED or step.active)
            for step in run.steps
        )
    )


def stop_run(
    run: RunRecord, state: RunState, error: RunError, now: datetime, carrier: Mapping[str, str]
) -> RunChange | None:
    """Ends the run as `state` (cancelled, timed out, failed) from outside its
    steps. A run with nothing to undo ends at once (`end_run`); a workflow that
    may need compensation starts winding down instead: it records how it will
    end, skips the steps that never started, and the runner stops the running
    ones, compensates and then ends it (`finish_run`)."""
    if run.state.terminal or run.ending is not None:
        return None
    if not may_need_compensation(run):
        return end_run(run, state, error, now, carrier)
    if state not in _STEP_STATE_WHEN_RUN_ENDS:
        raise ValueError(f"a run does not end {state} with an error")
    return RunChange(ending=state, error=error, steps=_skip_pending(run, now))


def fail_step(
    run: RunRecord,
    step_id: str,
    error: RunError,
    now: datetime,
    carrier: Mapping[str, str],
    *,
    state: StepState = StepState.FAILED,
) -> RunChange | None:
    """The step failed for good (FAILED, or TIMED_OUT by the run's deadline):
    no attempts left, or a failure no retry can fix (also before any attempt:
    an unknown agent, an input that cannot be built). A single-agent run ends
    with it; a workflow starts winding down (`stop_run`), the step's error
    becoming the run's."""
    if state not in (StepState.FAILED, StepState.TIMED_OUT):
        raise ValueError(f"a step does not fail as {state}")
    step = run.step(step_id)
    if run.state.terminal or not (step.active or step.state is StepState.PENDING):
        return None
    run_state = RunState.TIMED_OUT if state is StepState.TIMED_OUT else RunState.FAILED
    failed = StepChange(step_id, state=state, error=error, end_time=now)
    event = _draft(
        EventType.AGENT_FAILED,
        step_id,
        step.agent,
        {"error": error.as_payload(), "attempt": step.attempts},
        now,
        carrier,
    )
    if not run.is_workflow:
        check_run_transition(run.state, run_state)
        completed = _draft(
            EventType.RUN_COMPLETED,
            "",
            run.agent,
            {"state": run_state_name(run_state), "error": error.as_payload()},
            now,
            carrier,
        )
        return RunChange(
            state=run_state, error=error, end_time=now, steps=(failed,), events=(event, completed)
        )
    if run.ending is not None:
        return RunChange(steps=(failed,), events=(event,))
    run_error = RunError(error.code, error.reason, f"step {step_id!r} failed: {error.message}")
    return RunChange(
        ending=run_state,
        error=run_error,
        steps=(failed, *(c for c in _skip_pending(run, now) if c.step_id != step_id)),
        events=(event,),
    )


def halt_steps(run: RunRecord, now: datetime, carrier: Mapping[str, str]) -> RunChange | None:
    """While a workflow winds down, after the runner stopped their attempts:
    the steps still running or waiting to retry end (CANCELLED, or TIMED_OUT
    past the deadline), each with AGENT_FAILED; pending ones are SKIPPED."""
    if run.state.terminal or run.ending is None:
        return None
    error = run.error or RunError("ABORTED", WORKFLOW_STOPPED, "the workflow is ending")
    if run.ending is RunState.TIMED_OUT:
        state = StepState.TIMED_OUT
    else:
        state = StepState.CANCELLED
        if run.ending is RunState.FAILED:
            error = RunError("CANCELLED", WORKFLOW_STOPPED, f"stopped because {error.message}")
    changes: list[StepChange] = list(_skip_pending(run, now))
    events: list[EventDraft] = []
    for step in run.steps:
        if step.active:
            changes.append(StepChange(step.step_id, state=state, error=error, end_time=now))
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
    if not changes:
        return None
    return RunChange(steps=tuple(changes), events=tuple(events))


def steps_to_compensate(run: RunRecord) -> list[str]:
    """Succeeded steps with a compensation agent, last completed first."""
    done = sorted((s for s in run.steps if s.state is StepState.SUCCEEDED), key=lambda s: s.completion)
    return [s.step_id for s in reversed(done) if s.compensation_agent]


def _compensation_event(
    step: StepRecord,
    type_: EventType,
    payload: Mapping[str, Any],
    now: datetime,
    carrier: Mapping[str, str],
) -> EventDraft:
    return _draft(
        type_, step.step_id, step.compensation_agent, {**payload, "compensation": True}, now, carrier
    )


def begin_compensation(
    run: RunRecord, step_id: str, attempt: int, now: datetime, carrier: Mapping[str, str]
) -> RunChange | None:
    step = run.step(step_id)
    if not _compensating(run, step):
        return None
    return RunChange(
        events=(_compensation_event(step, EventType.AGENT_STARTED, {"attempt": attempt}, now, carrier),)
    )


def retry_compensation_later(
    run: RunRecord,
    step_id: str,
    attempt: int,
    error: RunError,
    delay_seconds: float,
    now: datetime,
    carrier: Mapping[str, str],
) -> RunChange | None:
    step = run.step(step_id)
    if not _compensating(run, step):
        return None
    payload = {"error": error.as_payload(), "attempt": attempt, "retry_in_seconds": round(delay_seconds, 3)}
    return RunChange(events=(_compensation_event(step, EventType.AGENT_FAILED, payload, now, carrier),))


def complete_compensation(
    run: RunRecord,
    step_id: str,
    attempt: int,
    output: Mapping[str, Any],
    now: datetime,
    carrier: Mapping[str, str],
) -> RunChange | None:
    """The step was undone: COMPENSATED (its own output stays as it was)."""
    step = run.step(step_id)
    if not _compensating(run, step):
        return None
    payload = {"output": dict(output), "attempt": attempt}
    return RunChange(
        steps=(StepChange(step_id, state=StepState.COMPENSATED),),
        events=(_compensation_event(step, EventType.AGENT_COMPLETED, payload, now, carrier),),
    )


def fail_compensation(
    run: RunRecord, step_id: str, attempt: int, error: RunError, now: datetime, carrier: Mapping[str, str]
) -> RunChange | None:
    """The step could not be undone: it stays SUCCEEDED, with the
    compensation's error on it."""
    step = run.step(step_id)
    if not _compensating(run, step):
        return None
    recorded = RunError(
        error.code, error.reason, f"compensation by {step.compensation_agent!r} failed: {error.message}"
    )
    payload = {"error": error.as_payload(), "attempt": attempt}
    return RunChange(
        steps=(StepChange(step_id, error=recorded),),
        events=(_compensation_event(step, EventType.AGENT_FAILED, payload, now, carrier),),
    )


def finish_run(run: RunRecord, now: datetime, carrier: Mapping[str, str]) -> RunChange | None:
    """Ends a workflow that wound down, in the state `stop_run`/`fail_step` chose."""
    if run.state.terminal or run.ending is None:
        return None
    error = run.error or RunError("ABORTED", WORKFLOW_STOPPED, "the workflow ended")
    return end_run(run, run.ending, error, now, carrier)


def interrupt_run(
    run: RunRecord, error: RunError, now: datetime, carrier: Mapping[str, str]
) -> RunChange | None:
    """After a crash: attempts that were running when the executor died failed
    with `error`; their steps wait RETRYING, and the runner decides by the
    agent's policy whether they get another attempt."""
    if run.state is not RunState.RUNNING:
        return None
    changes: list[StepChange] = []
    events: list[EventDraft] = []
    for step in run.steps:
        if step.state is StepState.RUNNING:
            changes.append(StepChange(step.step_id, state=StepState.RETRYING, error=error))
            events.append(
                _draft(
                    EventType.AGENT_FAILED,
                    step.step_id,
                    step.agent,
                    {"error": error.as_payload(), "attempt": step.attempts, "interrupted": True},
                    now,
                    carrier,
                )
            )
    if not changes:
        return None
    return RunChange(steps=tuple(changes), events=tuple(events))


# Failures that say the endpoint itself is unwell (it cannot be reached, went
# silent, broke off, ran out of time, or failed internally) and so count
# against its circuit breaker. An agent's own answer ("bad input", "the tool
# said no") says nothing about the endpoint: one user's bad input must not
# shut an agent off for everyone.
_ENDPOINT_FAILURE_REASONS = frozenset(
    {WORKER_UNAVAILABLE, HEARTBEAT_TIMEOUT, WORKER_STREAM_ENDED, ATTEMPT_DEADLINE_EXCEEDED}
)
_ENDPOINT_FAILURE_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "DATA_LOSS"})


def counts_against_endpoint(error: RunError) -> bool:
    return error.reason in _ENDPOINT_FAILURE_REASONS or error.code in _ENDPOINT_FAILURE_CODES


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
    retry: RetrySettings = field(default_factory=RetrySettings)


def _field_path(path: Sequence[Any], prefix: str) -> str:
    return ".".join([prefix, *(str(part) for part in path)])


def input_violations(
    schema: Mapping[str, Any], value: Mapping[str, Any], prefix: str = "input"
) -> list[FieldViolation]:
    """The ways `value` does not match the agent's JSON Schema: one violation
    per failing path, named `<prefix>.<path>` (a missing property names
    itself). FailedPrecondition when the schema itself is broken."""
    if not schema:
        return []
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
                    violations.setdefault(_field_path([*path, name], prefix), "is required")
            continue
        violations.setdefault(_field_path(path, prefix), error.message)
    return [FieldViolation(f, d) for f, d in violations.items()]


def validate_input(schema: Mapping[str, Any], value: Mapping[str, Any], prefix: str = "input") -> None:
    """Checks a run's (or a step's) input against its agent's JSON Schema."""
    violations = input_violations(schema, value, prefix)
    if violations:
        raise InvalidArgument(
            violations,
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

    async def update_run(
        self, run_id: str, decide: Decide, fence: int | None = None
    ) -> tuple[RunRecord, bool] | None:
        """In one transaction: reads the run (locked), asks `decide` for a
        change and writes it with its events. Returns the run afterwards and
        whether anything changed, or None for an unknown run. With a `fence`
        (a replica's write while it runs the run), raises LeaseLost and writes
        nothing unless the run still has that fence."""
        ...

    async def runs_in_state(self, state: RunState) -> list[RunRecord]:
        """Every run in `state`, oldest first."""
        ...

    async def queued_count(self, user_id: str | None = None) -> int:
        """Runs waiting to be admitted (of one user, or of all)."""
        ...

    async def overdue_queued(self, limit: int) -> list[str]:
        """Waiting runs whose deadline has passed, soonest first."""
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
    # Past this many QUEUED runs of one user, StartRun answers RESOURCE_EXHAUSTED
    # (USER_QUEUE_FULL) with this RetryInfo delay.
    max_queued_runs_per_user: int = 1000
    queue_full_retry_after_seconds: float = 5.0


def deadline_for(now: datetime, timeout_seconds: float | None, settings: ExecutorSettings) -> datetime:
    seconds = timeout_seconds or settings.default_run_timeout_seconds
    return now + timedelta(seconds=min(seconds, settings.max_run_timeout_seconds))
