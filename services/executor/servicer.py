"""`switchboard.executor.v1.ExecutorService`: validates requests, translates
proto <-> domain and calls the run use cases as the authenticated caller."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc, run_pb2

from services.common import convert
from services.common.auth import Role
from services.common.errors import (
    FieldViolation,
    InvalidArgument,
    Violations,
    status_from_code,
)
from services.common.interceptors import principal_of
from services.common.pagination import next_page_token, page_request
from services.executor.domain import (
    ExecutorSettings,
    PageKey,
    RunError,
    RunFilter,
    RunRecord,
    RunState,
    StepRecord,
)
from services.executor.runs import RunService, StartRunCommand, run_not_found
from services.executor.workflow import WORKFLOW_INVALID, WorkflowStepSpec, workflow_violations

AGENT_NAME = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
MAX_LABELS = 64
MAX_LABEL_VALUE_CHARS = 256
MAX_ID_CHARS = 128
MAX_RUN_ID_CHARS = 64
MAX_CANCEL_REASON_CHARS = 512
MAX_INPUT_BYTES = 1024 * 1024
LIST_DEFAULT_PAGE_SIZE = 50
LIST_MAX_PAGE_SIZE = 500
# WaitRun answers this long before the caller's own deadline, so the answer arrives.
WAIT_DEADLINE_MARGIN_SECONDS = 0.25

_CALLER_ROLES = (Role.USER, Role.ADMIN)


def _printable(value: str) -> bool:
    return value.isprintable()


def _check_id(violations: Violations, field: str, value: str) -> None:
    if len(value) > MAX_ID_CHARS:
        violations.add(field, f"must be at most {MAX_ID_CHARS} characters")
    elif not _printable(value):
        violations.add(field, "must not contain control characters")


def start_command(
    request: executor_service_pb2.StartRunRequest, settings: ExecutorSettings
) -> StartRunCommand:
    target = request.WhichOneof("target")
    violations = Violations()
    steps: tuple[WorkflowStepSpec, ...] = ()
    workflow_problems: list[FieldViolation] = []
    if target is None:
        violations.add("agent", "is required (or a workflow)")
    elif target == "agent" and not AGENT_NAME.fullmatch(request.agent):
        violations.add("agent", "must match ^[a-z][a-z0-9-]{1,62}$")
    elif target == "workflow":
        steps = workflow_steps(request.workflow)
        workflow_problems = workflow_violations(steps)
    _check_id(violations, "thread_id", request.thread_id)
    _check_id(violations, "request_id", request.request_id)
    timeout: float | None = None
    if request.HasField("timeout"):
        if request.timeout.seconds < 0 or request.timeout.nanos < 0:
            violations.add("timeout", "must not be negative")
        else:
            timeout = convert.seconds(request.timeout) or None
            if timeout is not None and timeout > settings.max_run_timeout_seconds:
                violations.add("timeout", f"must be at most {settings.max_run_timeout_seconds:g}s")
    if len(request.labels) > MAX_LABELS:
        violations.add("labels", f"must have at most {MAX_LABELS} entries")
    for key, value in sorted(request.labels.items()):
        if not LABEL_KEY.fullmatch(key):
            violations.add(f"labels.{key}", "key must match ^[a-z][a-z0-9_.-]{0,62}$")
        if len(value) > MAX_LABEL_VALUE_CHARS or not _printable(value):
            violations.add(
                f"labels.{key}", f"value must be at most {MAX_LABEL_VALUE_CHARS} printable characters"
            )
    if request.input.ByteSize() > MAX_INPUT_BYTES:
        violations.add("input", f"must be at most {MAX_INPUT_BYTES} bytes")
    if request.workflow.ByteSize() > MAX_INPUT_BYTES:
        violations.add("workflow", f"must be at most {MAX_INPUT_BYTES} bytes")
    if workflow_problems:
        # One answer names every problem; the broken graph decides the reason.
        others: list[FieldViolation] = []
        try:
            violations.raise_if_any()
        except InvalidArgument as exc:
            others = exc.violations
        raise InvalidArgument([*workflow_problems, *others], reason=WORKFLOW_INVALID)
    violations.raise_if_any()
    return StartRunCommand(
        agent=request.agent,
        workflow=steps,
        input=convert.from_struct(request.input),
        thread_id=request.thread_id,
        request_id=request.request_id,
        timeout_seconds=timeout,
        labels=dict(request.labels),
    )


def workflow_steps(workflow: run_pb2.Workflow) -> tuple[WorkflowStepSpec, ...]:
    return tuple(
        WorkflowStepSpec(
            step_id=step.step_id,
            agent=step.agent,
            input=convert.from_struct(step.input),
            depends_on=tuple(step.depends_on),
            compensation_agent=step.compensation_agent,
        )
        for step in workflow.steps
    )


def _run_id(value: str) -> str:
    if not value:
        raise InvalidArgument([FieldViolation("run_id", "is required")])
    if len(value) > MAX_RUN_ID_CHARS:
        raise run_not_found(value[:MAX_RUN_ID_CHARS])  # no such run: same answer as any unknown id
    return value


def _status(error: RunError) -> Any:
    return status_from_code(grpc.StatusCode[error.code].value[0], error.message, error.reason)


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


def _struct(value: Any) -> struct_pb2.Struct:
    return convert.struct(dict(value))


def step_to_proto(step: StepRecord) -> run_pb2.Step:
    message = run_pb2.Step(
        step_id=step.step_id,
        agent=step.agent,
        state=run_pb2.StepState.Value(f"STEP_STATE_{step.state.value}"),
        depends_on=list(step.depends_on),
        attempts=step.attempts,
        compensation_agent=step.compensation_agent,
    )
    if step.output is not None:
        message.output.CopyFrom(_struct(step.output))
    if step.error is not None:
        message.error.CopyFrom(_status(step.error))
    if step.start_time is not None:
        message.start_time.CopyFrom(_timestamp(step.start_time))
    if step.end_time is not None:
        message.end_time.CopyFrom(_timestamp(step.end_time))
    return message


def run_to_proto(run: RunRecord) -> run_pb2.Run:
    message = run_pb2.Run(
        run_id=run.run_id,
        user_id=run.user_id,
        agent=run.agent,
        thread_id=run.thread_id,
        request_id=run.request_id,
        state=run_pb2.RunState.Value(f"RUN_STATE_{run.state.value}"),
        input=_struct(run.input),
        steps=[step_to_proto(step) for step in run.steps],
        labels=dict(run.labels),
        create_time=_timestamp(run.create_time),
        deadline=_timestamp(run.deadline),
        trace_id=run.trace_id,
    )
    if run.is_workflow:
        message.workflow.steps.extend(
            run_pb2.WorkflowStep(
                step_id=step.step_id,
                agent=step.agent,
                input=_struct(step.input or {}),
                depends_on=list(step.depends_on),
                compensation_agent=step.compensation_agent,
            )
            for step in run.steps
        )
    if run.output is not None:
        message.output.CopyFrom(_struct(run.output))
    if run.error is not None:
        message.error.CopyFrom(_status(run.error))
    if run.start_time is not None:
        message.start_time.CopyFrom(_timestamp(run.start_time))
    if run.end_time is not None:
        message.end_time.CopyFrom(_timestamp(run.end_time))
    return message


def run_state_from_proto(value: int) -> RunState | None:
    if value == run_pb2.RUN_STATE_UNSPECIFIED:
        return None
    name = run_pb2.RunState.Name(value)  # type: ignore[arg-type]
    return RunState(name.removeprefix("RUN_STATE_"))


def _page_key(after: Any) -> PageKey | None:
    if after is None:
        return None
    try:
        created, run_id = after
        datetime.fromisoformat(created)
    except (TypeError, ValueError):
        raise InvalidArgument([FieldViolation("page_token", "is not a token this method returned")]) from None
    return str(created), str(run_id)


class ExecutorServicer(executor_service_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, runs: RunService, settings: ExecutorSettings) -> None:
        self._runs = runs
        self._settings = settings

    async def StartRun(
        self, request: executor_service_pb2.StartRunRequest, context: Any
    ) -> executor_service_pb2.StartRunResponse:
        principal = principal_of(context)
        principal.require_role(*_CALLER_ROLES)
        command = start_command(request, self._settings)
        run = await self._runs.start_run(principal, command)
        return executor_service_pb2.StartRunResponse(run=run_to_proto(run))

    async def GetRun(
        self, request: executor_service_pb2.GetRunRequest, context: Any
    ) -> executor_service_pb2.GetRunResponse:
        principal = principal_of(context)
        principal.require_role(*_CALLER_ROLES)
        run = await self._runs.get_run(principal, _run_id(request.run_id))
        return executor_service_pb2.GetRunResponse(run=run_to_proto(run))

    async def ListRuns(
        self, request: executor_service_pb2.ListRunsRequest, context: Any
    ) -> executor_service_pb2.ListRunsResponse:
        principal = principal_of(context)
        principal.require_role(*_CALLER_ROLES)
        violations = Violations()
        state: RunState | None = None
        try:
            state = run_state_from_proto(request.state)
        except ValueError:
            violations.add("state", "is not a run state")
        if request.agent and not AGENT_NAME.fullmatch(request.agent):
            violations.add("agent", "must match ^[a-z][a-z0-9-]{1,62}$")
        _check_id(violations, "thread_id", request.thread_id)
        violations.raise_if_any()
        run_filter = RunFilter(state=state, agent=request.agent, thread_id=request.thread_id)
        page = page_request(
            request.page_size,
            request.page_token,
            default=LIST_DEFAULT_PAGE_SIZE,
            maximum=LIST_MAX_PAGE_SIZE,
            filters=run_filter.as_dict(),
        )
        found, next_key = await self._runs.list_runs(principal, run_filter, page.size, _page_key(page.after))
        return executor_service_pb2.ListRunsResponse(
            runs=[run_to_proto(run) for run in found],
            next_page_token=next_page_token(list(next_key), run_filter.as_dict()) if next_key else "",
        )

    async def CancelRun(
        self, request: executor_service_pb2.CancelRunRequest, context: Any
    ) -> executor_service_pb2.CancelRunResponse:
        principal = principal_of(context)
        principal.require_role(*_CALLER_ROLES)
        run_id = _run_id(request.run_id)
        if len(request.reason) > MAX_CANCEL_REASON_CHARS:
            raise InvalidArgument(
                [FieldViolation("reason", f"must be at most {MAX_CANCEL_REASON_CHARS} characters")]
            )
        run = await self._runs.cancel_run(principal, run_id, request.reason)
        return executor_service_pb2.CancelRunResponse(run=run_to_proto(run))

    async def WaitRun(
        self, request: executor_service_pb2.WaitRunRequest, context: Any
    ) -> executor_service_pb2.WaitRunResponse:
        principal = principal_of(context)
        principal.require_role(*_CALLER_ROLES)
        run_id = _run_id(request.run_id)
        if request.timeout.seconds < 0 or request.timeout.nanos < 0:
            raise InvalidArgument([FieldViolation("timeout", "must not be negative")])
        timeout = convert.seconds(request.timeout)
        call_remaining = context.time_remaining()
        if call_remaining is not None:
            budget = max(0.0, call_remaining - WAIT_DEADLINE_MARGIN_SECONDS)
            timeout = min(timeout, budget) if timeout else budget
        elif not timeout:
            timeout = self._settings.wait_run_default_seconds
        run, done = await self._runs.wait_run(principal, run_id, timeout)
        return executor_service_pb2.WaitRunResponse(run=run_to_proto(run), done=done)


def service_names() -> list[str]:
    return [executor_service_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name]
