"""The executor's calls to other services, behind the domain's ports: the
registry (agent definitions, cached), agent workers (Execute streams) and the
events service (Publish). All of them carry the executor's own service token,
never a user's; the channel interceptors add the client spans.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from switchboard.agent.v1 import agent_worker_pb2, agent_worker_pb2_grpc
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from services.common import convert
from services.common.channels import ServiceChannels
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.executor.domain import (
    AGENT_ERROR,
    AGENT_NOT_FOUND,
    ATTEMPT_DEADLINE_EXCEEDED,
    REGISTRY_UNAVAILABLE,
    WORKER_UNAVAILABLE,
    AgentDirectory,
    AgentSpec,
    ExecutionContext,
    Failure,
    Heartbeat,
    OutboxEvent,
    Result,
    RunError,
    Thinking,
    ToolFinished,
    ToolStarted,
    WorkerCallCancelled,
    WorkerUpdate,
)
from services.executor.outbox import PublishFailed
from services.executor.retry import RetrySettings

log = logging.getLogger("switchboard.executor.clients")

# Registry defaults for unset agent fields (see registry/v1/agent.proto).
DEFAULT_AGENT_TIMEOUT_SECONDS = 60.0
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_CONCURRENCY = 10

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class CallCredentials(Protocol):
    """The executor's own identity for outgoing calls (`ServiceCredentials`)."""

    async def metadata(self) -> tuple[tuple[str, str], ...]: ...


def _plain(value: Any) -> Any:
    """Struct numbers are doubles; JSON Schema keywords such as maxLength want ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def retry_settings_from_proto(policy: agent_pb2.RetryPolicy) -> RetrySettings:
    """The agent's retry policy (0 fields take the documented defaults). The
    registry checks policies on write; one it stored that still does not make
    sense here falls back to the defaults rather than breaking every run."""
    try:
        return RetrySettings.from_policy(
            max_attempts=policy.max_attempts,
            initial_backoff=convert.seconds(policy.initial_backoff),
            max_backoff=convert.seconds(policy.max_backoff),
            backoff_multiplier=policy.backoff_multiplier,
            non_retryable_reasons=tuple(policy.non_retryable_reasons),
        )
    except InvalidArgument:
        log.warning("unusable retry policy; using the defaults", extra={"policy": str(policy)})
        return RetrySettings()


def agent_spec_from_proto(agent: agent_pb2.Agent) -> AgentSpec:
    timeout = convert.seconds(agent.timeout) if agent.HasField("timeout") else 0.0
    heartbeat = convert.seconds(agent.heartbeat_timeout) if agent.HasField("heartbeat_timeout") else 0.0
    return AgentSpec(
        name=agent.name,
        endpoint=agent.endpoint,
        tools=tuple(agent.tools),
        input_schema=_plain(struct_to_dict(agent.input_schema)),
        timeout_seconds=timeout or DEFAULT_AGENT_TIMEOUT_SECONDS,
        heartbeat_timeout_seconds=heartbeat or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
        max_concurrency=agent.max_concurrency or DEFAULT_MAX_CONCURRENCY,
        retry=retry_settings_from_proto(agent.retry_policy),
    )


def _unknown_agent(name: str) -> NotFound:
    return NotFound(f"agent {name!r} is not registered", reason=AGENT_NOT_FOUND, metadata={"agent": name})


class RegistryAgents:
    """Agent definitions straight from the registry."""

    def __init__(
        self,
        stub: registry_service_pb2_grpc.RegistryServiceAsyncStub,
        credentials: CallCredentials,
        call_timeout: float,
    ) -> None:
        self._stub = stub
        self._credentials = credentials
        self._call_timeout = call_timeout

    async def get(self, name: str) -> AgentSpec:
        try:
            response = await self._stub.GetAgent(
                registry_service_pb2.GetAgentRequest(name=name),
                metadata=await self._credentials.metadata(),
                timeout=self._call_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise _unknown_agent(name) from None
            raise Unavailable(
                "the agent registry could not be reached", reason=REGISTRY_UNAVAILABLE, retry_after=1.0
            ) from None
        return agent_spec_from_proto(response.agent)


class CachedAgents:
    """Keeps each agent definition for at most `ttl` seconds, so limit,
    timeout and retry policy changes in the registry apply within that time.
    Unknown agents are not cached: one registered a moment later is found at
    once. While the registry cannot be reached, the last definition it gave
    is used (a registry outage must not stop runs of known agents)."""

    def __init__(
        self, inner: AgentDirectory, ttl: float, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._monotonic = monotonic
        self._entries: dict[str, tuple[float, AgentSpec]] = {}

    async def get(self, name: str) -> AgentSpec:
        entry = self._entries.get(name)
        now = self._monotonic()
        if entry is not None and now < entry[0]:
            return entry[1]
        try:
            spec = await self._inner.get(name)
        except NotFound:
            self._entries.pop(name, None)
            raise
        except Unavailable:
            if entry is None:
                raise
            log.warning("registry unreachable; using the last known agent definition", extra={"agent": name})
            # Asked again after another ttl, not on every call meanwhile.
            self._entries[name] = (now + self._ttl, entry[1])
            return entry[1]
        if self._ttl > 0:
            self._entries[name] = (now + self._ttl, spec)
        return spec


def _error_from_status(status: status_pb2.Status) -> RunError:
    reason = AGENT_ERROR
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.reason:
            reason = info.reason
            break
    code = _CODE_NAMES.get(status.code, "UNKNOWN")
    return RunError(code, reason, status.message or "the agent failed")


def _error_from_rpc(exc: grpc.aio.AioRpcError) -> RunError:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return RunError(code.name, WORKER_UNAVAILABLE, "the agent's worker could not be reached")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RunError(code.name, ATTEMPT_DEADLINE_EXCEEDED, "the agent's worker did not answer in time")
    # The worker ended the call with an error status instead of an `error` update.
    status = status_pb2.Status(code=code.value[0], message=exc.details() or "")
    trailing: Any = exc.trailing_metadata() or ()
    for key, value in trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status.ParseFromString(value)
    return _error_from_status(status)


def update_from_proto(message: agent_worker_pb2.ExecuteUpdate) -> WorkerUpdate | None:
    """The domain's view of one worker update; None for one we do not know."""
    match message.WhichOneof("update"):
        case "thinking":
            return Thinking(message.thinking.text)
        case "tool_started":
            started = message.tool_started
            return ToolStarted(started.call_id, started.tool, struct_to_dict(started.arguments))
        case "tool_finished":
            finished = message.tool_finished
            error = _error_from_status(finished.error) if finished.HasField("error") else None
            return ToolFinished(finished.call_id, finished.tool, struct_to_dict(finished.result), error)
        case "heartbeat":
            return Heartbeat()
        case "result":
            return Result(struct_to_dict(message.result.output))
        case "error":
            return Failure(_error_from_status(message.error))
    return None


def context_to_proto(context: ExecutionContext) -> agent_worker_pb2.ExecutionContext:
    return agent_worker_pb2.ExecutionContext(
        user_id=context.user_id,
        thread_id=context.thread_id,
        run_id=context.run_id,
        request_id=context.request_id,
        step_id=context.step_id,
        attempt=context.attempt,
        deadline=convert.timestamp(context.deadline),
    )


class GrpcWorkerSession:
    """One Execute call. Reads are bounded by a timeout (the heartbeat timer);
    `cancel` ends the call at once, and the worker sees it cancelled."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False
        self._expired = False

    async def next(self, timeout: float) -> WorkerUpdate | None:
        if self._cancelled:
            raise WorkerCallCancelled
        if self._expired:
            raise TimeoutError
        while True:
            try:
                try:
                    async with asyncio.timeout(timeout):
                        message = await self._call.read()
                except TimeoutError:
                    # The timed-out read cancelled the call: it is over.
                    self._expired = True
                    raise
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._cancelled and (task is None or not task.cancelling()):
                    raise WorkerCallCancelled from None
                raise
            except grpc.aio.AioRpcError as exc:
                if self._cancelled:
                    raise WorkerCallCancelled from None
                return Failure(_error_from_rpc(exc))
            if not isinstance(message, agent_worker_pb2.ExecuteUpdate):
                return None  # grpc.aio.EOF: the worker closed the stream
            update = update_from_proto(message)
            if update is not None:
                return update
            # An update kind newer than this executor: it still proves the worker alive.
            return Heartbeat()

    def cancel(self) -> None:
        if not self._call.done():
            self._cancelled = True
            self._call.cancel()


class FailedSession:
    """A call that could not even start (e.g. no service token)."""

    def __init__(self, error: RunError) -> None:
        self._error = error

    async def next(self, timeout: float) -> WorkerUpdate | None:
        return Failure(self._error)

    def cancel(self) -> None:
        return None


class GrpcWorkers:
    def __init__(self, channels: ServiceChannels, credentials: CallCredentials) -> None:
        self._channels = channels
        self._credentials = credentials

    async def open(
        self, agent: AgentSpec, input: Mapping[str, Any], context: ExecutionContext, timeout: float
    ) -> GrpcWorkerSession | FailedSession:
        try:
            metadata = await self._credentials.metadata()
        except grpc.aio.AioRpcError:
            return FailedSession(
                RunError("UNAVAILABLE", WORKER_UNAVAILABLE, "the executor could not obtain its service token")
            )
        stub = agent_worker_pb2_grpc.AgentWorkerStub(self._channels.get(agent.endpoint))
        call = stub.Execute(
            agent_worker_pb2.ExecuteRequest(
                agent=agent.name,
                input=convert.struct(dict(input)),
                context=context_to_proto(context),
                tools=list(agent.tools),
            ),
            metadata=metadata,
            timeout=timeout,
        )
        return GrpcWorkerSession(call)


def event_to_proto(event: OutboxEvent) -> event_pb2.Event:
    carrier = dict(event.trace_carrier)
    return event_pb2.Event(
        event_id=event.event_id,
        run_id=event.run_id,
        user_id=event.user_id,
        seq=event.seq,
        type=event_pb2.EventType.Value(f"EVENT_TYPE_{event.type.value}"),
        step_id=event.step_id,
        agent=event.agent,
        payload=convert.struct(dict(event.payload)),
        create_time=convert.timestamp(event.create_time),
        trace_context=event_pb2.TraceContext(
            traceparent=carrier.get("traceparent", ""), tracestate=carrier.get("tracestate", "")
        ),
    )


class GrpcEventPublisher:
    def __init__(
        self,
        stub: events_service_pb2_grpc.EventsServiceAsyncStub,
        credentials: CallCredentials,
        call_timeout: float,
    ) -> None:
        self._stub = stub
        self._credentials = credentials
        self._call_timeout = call_timeout

    async def publish(self, events: Sequence[OutboxEvent]) -> None:
        request = events_service_pb2.PublishRequest(events=[event_to_proto(e) for e in events])
        try:
            # A repeat of a stored event answers `duplicate`: that is success too.
            await self._stub.Publish(
                request, metadata=await self._credentials.metadata(), timeout=self._call_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise PublishFailed(exc.code().name, exc.details() or "") from None
