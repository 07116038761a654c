"""Write a Switchboard agent worker in a few lines.

    from switchboard_client.worker import AgentContext, Worker

    worker = Worker()

    @worker.tool("word_count")
    def word_count(text: str) -> dict:
        return {"words": len(text.split())}

    @worker.agent("text-stats", description="Counts words", tools=["word_count"])
    async def text_stats(ctx: AgentContext, input: dict) -> dict:
        await ctx.think("Counting words")
        counted = await ctx.call_tool("word_count", text=input["text"])
        return {"words": counted["words"]}

    worker.run(port=50055)

The worker implements `switchboard.agent.v1.AgentWorker.Execute`: each call runs
one agent function as a task and streams what it does — `ctx.think(...)` as
Thinking, `ctx.call_tool(...)` as ToolStarted then ToolFinished — plus a
Heartbeat whenever the stream has been quiet for `heartbeat_interval`. The
stream ends with exactly one Result (the function's return value) or one error
status: an `AgentError` keeps its reason, any other exception is AGENT_ERROR,
an unknown agent is NOT_FOUND (AGENT_NOT_FOUND). Cancelling the call (or its
deadline passing) cancels the agent task: `asyncio.CancelledError` is raised
where the agent awaits, and `ctx.cancelled` becomes true.

Input numbers arrive as a `google.protobuf.Struct`, which knows only floats;
whole numbers are handed to the agent as `int`.

With `auth_address`, the worker accepts only calls that carry a valid access
token of role `service` (verified locally against the auth service's keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, json_format, struct_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry import propagate, trace
from switchboard.agent.v1 import agent_worker_pb2, agent_worker_pb2_grpc
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from switchboard_client._worker_auth import ServiceTokenVerifier, status_with_reason

__all__ = [
    "AgentContext",
    "AgentError",
    "AgentSpec",
    "ExecutionContext",
    "RetryPolicy",
    "ToolError",
    "ToolSpec",
    "Worker",
]

log = logging.getLogger("switchboard_client.worker")

SERVICE_NAME = agent_worker_pb2.DESCRIPTOR.services_by_name["AgentWorker"].full_name
ATTR_USER_ID = "switchboard.user_id"
ATTR_RUN_ID = "switchboard.run_id"
ATTR_AGENT = "switchboard.agent"
# Fields of a registered agent that the worker's code defines; on re-registration
# only these (plus any limits the decorator sets) are updated, so limits an admin
# tuned live survive a worker restart.
OWNED_FIELDS = ("description", "endpoint", "tools", "input_schema")

AgentFunction = Callable[["AgentContext", dict[str, Any]], Awaitable[Any]]
ToolFunction = Callable[..., Any]
# Decides whether a call may run; raises (or aborts the call) if not.
Authorize = Callable[[Any], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Any])


class AgentError(Exception):
    """Raise from an agent (or a tool) to fail the attempt with a reason.

    `reason` (UPPER_SNAKE) ends up in the error status's ErrorInfo: the
    executor's retry policy decides by it whether to retry.
    """

    def __init__(
        self,
        message: str = "the agent failed",
        *,
        reason: str = "AGENT_ERROR",
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.code = code
        self.metadata = dict(metadata or {})


class ToolError(AgentError):
    """Raised by `AgentContext.call_tool` when the tool failed or may not be called."""

    def __init__(self, tool: str, message: str, *, reason: str = "TOOL_FAILED") -> None:
        super().__init__(message, reason=reason, metadata={"tool": tool})
        self.tool = tool


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the executor retries the agent (seconds; 0 means the registry's default)."""

    max_attempts: int = 0
    initial_backoff: float = 0.0
    max_backoff: float = 0.0
    backoff_multiplier: float = 0.0
    non_retryable_reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    function: ToolFunction


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """An agent as the worker knows it; `None` limits are left to the registry."""

    name: str
    function: AgentFunction
    description: str = ""
    tools: tuple[str, ...] = ()
    input_schema: Mapping[str, Any] = field(default_factory=dict)
    max_concurrency: int | None = None
    timeout: float | None = None
    heartbeat_timeout: float | None = None
    retry_policy: RetryPolicy | None = None
    labels: Mapping[str, str] | None = None

    def to_proto(self, endpoint: str) -> agent_pb2.Agent:
        agent = agent_pb2.Agent(
            name=self.name,
            description=self.description,
            endpoint=endpoint,
            tools=self.tools,
            input_schema=_struct(self.input_schema),
            max_concurrency=self.max_concurrency or 0,
            labels=dict(self.labels or {}),
        )
        if self.timeout is not None:
            agent.timeout.CopyFrom(_duration(self.timeout))
        if self.heartbeat_timeout is not None:
            agent.heartbeat_timeout.CopyFrom(_duration(self.heartbeat_timeout))
        if self.retry_policy is not None:
            policy = self.retry_policy
            agent.retry_policy.CopyFrom(
                agent_pb2.RetryPolicy(
                    max_attempts=policy.max_attempts,
                    initial_backoff=_duration(policy.initial_backoff),
                    max_backoff=_duration(policy.max_backoff),
                    backoff_multiplier=policy.backoff_multiplier,
                    non_retryable_reasons=policy.non_retryable_reasons,
                )
            )
        return agent

    def update_paths(self) -> list[str]:
        optional = {
            "max_concurrency": self.max_concurrency,
            "timeout": self.timeout,
            "heartbeat_timeout": self.heartbeat_timeout,
            "retry_policy": self.retry_policy,
            "labels": self.labels,
        }
        return [*OWNED_FIELDS, *(path for path, value in optional.items() if value is not None)]


@dataclass(frozen=True, slots=True)
class ExecutionContext:
    """The immutable context the executor created for this attempt."""

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    step_id: str
    attempt: int
    deadline: datetime | None

    @classmethod
    def from_proto(cls, context: agent_worker_pb2.ExecutionContext) -> ExecutionContext:
        deadline = context.deadline.ToDatetime(tzinfo=UTC) if context.HasField("deadline") else None
        return cls(
            user_id=context.user_id,
            thread_id=context.thread_id,
            run_id=context.run_id,
            request_id=context.request_id,
            step_id=context.step_id,
            attempt=context.attempt,
            deadline=deadline,
        )


def _duration(seconds: float) -> duration_pb2.Duration:
    result = duration_pb2.Duration()
    result.FromNanoseconds(round(seconds * 1e9))
    return result


def _struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    if value:
        # Through JSON: tuples, nested mappings and other JSON-able values all fit.
        result.update(json.loads(json.dumps(value)))
    return result


def _as_struct(value: Any, what: str) -> struct_pb2.Struct:
    """A tool's or agent's return value as a Struct; non-objects become {"result": value}."""
    payload = value if isinstance(value, Mapping) else {"result": value}
    try:
        return _struct(payload)
    except (TypeError, ValueError):
        raise AgentError(f"{what} is not JSON", reason="OUTPUT_NOT_JSON") from None


def _whole_numbers(value: Any) -> Any:
    """Struct numbers are floats; JSON's whole numbers are more natural as ints."""
    if isinstance(value, float) and value.is_integer() and math.isfinite(value) and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _error_update(
    code: grpc.StatusCode, message: str, reason: str, metadata: Mapping[str, str] | None = None
) -> agent_worker_pb2.ExecuteUpdate:
    return agent_worker_pb2.ExecuteUpdate(
        time=_now(), error=status_with_reason(code, message, reason, metadata)
    )


class AgentContext:
    """What an agent function gets besides its input: the execution context
    (read-only), and the means to report progress and call tools."""

    def __init__(
        self,
        agent: str,
        execution: ExecutionContext,
        allowed_tools: Iterable[str],
        tools: Mapping[str, ToolSpec],
        emit: Callable[[agent_worker_pb2.ExecuteUpdate], None],
        span: trace.Span,
    ) -> None:
        self._agent = agent
        self._execution = execution
        self._allowed = frozenset(allowed_tools)
        self._tools = tools
        self._emit = emit
        self._span = span
        self._call_ids = itertools.count(1)
        self._cancelled = False
        self._heartbeats = True

    @property
    def agent(self) -> str:
        return self._agent

    @property
    def execution(self) -> ExecutionContext:
        return self._execution

    @property
    def user_id(self) -> str:
        return self._execution.user_id

    @property
    def thread_id(self) -> str:
        return self._execution.thread_id

    @property
    def run_id(self) -> str:
        return self._execution.run_id

    @property
    def request_id(self) -> str:
        return self._execution.request_id

    @property
    def step_id(self) -> str:
        return self._execution.step_id

    @property
    def attempt(self) -> int:
        return self._execution.attempt

    @property
    def deadline(self) -> datetime | None:
        return self._execution.deadline

    @property
    def tools(self) -> frozenset[str]:
        """The tools this attempt may call."""
        return self._allowed

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the attempt (or its deadline passed)."""
        return self._cancelled

    @property
    def heartbeats(self) -> bool:
        return self._heartbeats

    def stop_heartbeats(self) -> None:
        """Go silent: no more automatic heartbeats (to test how a caller handles a stuck worker)."""
        self._heartbeats = False

    def resume_heartbeats(self) -> None:
        self._heartbeats = True

    async def think(self, text: str) -> None:
        """Reports a step of the agent's reasoning."""
        self._span.add_event("thinking", {"text": text[:256]})
        self._emit(agent_worker_pb2.ExecuteUpdate(time=_now(), thinking=agent_worker_pb2.Thinking(text=text)))
        await asyncio.sleep(0)  # let the stream send it now

    async def call_tool(self, name: str, /, **arguments: Any) -> Any:
        """Runs a tool of this worker, reporting its start and its result (or
        error), and returns what the tool returned. Raises `ToolError` if the
        tool may not be called or failed."""
        if name not in self._allowed:
            raise ToolError(name, f"tool {name!r} is not allowed for this agent", reason="TOOL_NOT_ALLOWED")
        tool = self._tools.get(name)
        if tool is None:
            raise ToolError(name, f"this worker has no tool {name!r}", reason="TOOL_NOT_FOUND")
        call_id = f"call-{next(self._call_ids)}"
        arguments_struct = _as_struct(arguments, f"the arguments of {name!r}")
        self._span.add_event("tool_started", {"tool": name, "call_id": call_id})
        self._emit(
            agent_worker_pb2.ExecuteUpdate(
                time=_now(),
                tool_started=agent_worker_pb2.ToolStarted(
                    call_id=call_id, tool=name, arguments=arguments_struct
                ),
            )
        )
        try:
            if inspect.iscoroutinefunction(tool.function):
                result = await tool.function(**arguments)
            else:
                # Off the event loop, so heartbeats keep flowing while it runs.
                result = await asyncio.to_thread(tool.function, **arguments)
            result_struct = _as_struct(result, f"the result of {name!r}")
        except AgentError as exc:
            self._finish_tool(call_id, name, error=status_with_reason(exc.code, exc.message, exc.reason))
            raise ToolError(name, exc.message, reason=exc.reason) from exc
        except Exception as exc:  # tool code may raise anything: it becomes the tool's error
            message = f"tool {name!r} raised {type(exc).__name__}"
            log.warning("tool failed", exc_info=exc, extra={"tool": name, "call_id": call_id})
            self._finish_tool(
                call_id, name, error=status_with_reason(grpc.StatusCode.UNKNOWN, message, "TOOL_FAILED")
            )
            raise ToolError(name, message) from exc
        self._finish_tool(call_id, name, result=result_struct)
        return result

    def _finish_tool(
        self,
        call_id: str,
        name: str,
        *,
        result: struct_pb2.Struct | None = None,
        error: Any = None,
    ) -> None:
        self._span.add_event("tool_finished", {"tool": name, "call_id": call_id, "ok": error is None})
        finished = agent_worker_pb2.ToolFinished(call_id=call_id, tool=name, result=result, error=error)
        self._emit(agent_worker_pb2.ExecuteUpdate(time=_now(), tool_finished=finished))

    def _mark_cancelled(self) -> None:
        self._cancelled = True


def _is_final(update: agent_worker_pb2.ExecuteUpdate) -> bool:
    return update.WhichOneof("update") in ("result", "error")


class _Attempt:
    """One Execute call: the agent task and the stream of its updates."""

    def __init__(
        self,
        spec: AgentSpec,
        ctx: AgentContext,
        input: dict[str, Any],
        queue: asyncio.Queue[agent_worker_pb2.ExecuteUpdate],
        cancel_grace: float,
    ) -> None:
        self.spec = spec
        self.ctx = ctx
        self.input = input
        self.queue = queue
        self.cancel_grace = cancel_grace

    async def _run(self, span: trace.Span) -> None:
        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
            await self._run_in_span(span)

    async def _run_in_span(self, span: trace.Span) -> None:
        try:
            output = await self._call_agent()
            final = agent_worker_pb2.ExecuteUpdate(
                time=_now(), result=agent_worker_pb2.Result(output=_as_struct(output, "the agent's output"))
            )
        except AgentError as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, exc.reason))
            final = _error_update(exc.code, exc.message, exc.reason, exc.metadata)
        except asyncio.CancelledError:
            if self.ctx.cancelled:
                raise
            # The agent cancelled itself: an error, not the caller's cancellation.
            final = _error_update(grpc.StatusCode.CANCELLED, "the agent was cancelled", "AGENT_CANCELLED")
        except Exception as exc:  # agent code may raise anything: it becomes the attempt's error
            log.error(
                "agent failed", exc_info=exc, extra={"agent": self.spec.name, "run_id": self.ctx.run_id}
            )
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, "AGENT_ERROR"))
            final = _error_update(
                grpc.StatusCode.UNKNOWN, f"the agent raised {type(exc).__name__}", "AGENT_ERROR"
            )
        self.queue.put_nowait(final)

    async def _call_agent(self) -> Any:
        deadline = self.ctx.deadline
        if deadline is None:
            return await self.spec.function(self.ctx, self.input)
        remaining = (deadline - datetime.now(UTC)).total_seconds()
        try:
            async with asyncio.timeout(max(0.0, remaining)) as scope:
                return await self.spec.function(self.ctx, self.input)
        except TimeoutError:
            if not scope.expired():
                raise  # the agent's own timeout, not the attempt's deadline
            raise AgentError(
                "the attempt's deadline passed",
                reason="AGENT_DEADLINE_EXCEEDED",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None

    async def updates(
        self, heartbeat_interval: float, span: trace.Span
    ) -> AsyncIterator[agent_worker_pb2.ExecuteUpdate]:
        task = asyncio.create_task(self._run(span), name=f"agent {self.spec.name}")
        getter: asyncio.Future[agent_worker_pb2.ExecuteUpdate] | None = None
        last_sent = time.monotonic()
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(self.queue.get())
                quiet_for = time.monotonic() - last_sent
                done, _ = await asyncio.wait({getter}, timeout=max(0.0, heartbeat_interval - quiet_for))
                if getter in done:
                    update = getter.result()
                    getter = None
                    yield update
                    last_sent = time.monotonic()
                    if _is_final(update):
                        await task  # it ends right after handing over its final update
                        return
                    continue
                # Quiet for a whole interval: say we are alive (unless told to go silent).
                if self.ctx.heartbeats:
                    yield agent_worker_pb2.ExecuteUpdate(time=_now(), heartbeat=agent_worker_pb2.Heartbeat())
                last_sent = time.monotonic()
        finally:
            if getter is not None:
                getter.cancel()
            if not task.done():
                self.ctx._mark_cancelled()
                task.cancel()
                # A well-behaved agent stops at once; one that swallows the
                # cancellation is abandoned after the grace period.
                await asyncio.wait({task}, timeout=self.cancel_grace)
                span.add_event("cancelled")


class _Servicer(agent_worker_pb2_grpc.AgentWorkerServicer):
    def __init__(self, worker: Worker, authorize: Authorize | None) -> None:
        self._worker = worker
        self._authorize = authorize

    async def Execute(  # type: ignore[override]
        self, request: agent_worker_pb2.ExecuteRequest, context: Any
    ) -> AsyncIterator[agent_worker_pb2.ExecuteUpdate]:
        if self._authorize is not None:
            await self._authorize(context)
        spec = self._worker.agents.get(request.agent)
        if spec is None:
            yield _error_update(
                grpc.StatusCode.NOT_FOUND,
                f"this worker has no agent {request.agent!r}",
                "AGENT_NOT_FOUND",
                {"agent": request.agent},
            )
            return
        execution = ExecutionContext.from_proto(request.context)
        attributes = {
            key: value
            for key, value in (
                (ATTR_AGENT, spec.name),
                (ATTR_RUN_ID, execution.run_id),
                (ATTR_USER_ID, execution.user_id),
            )
            if value
        }
        # Not made current here: a generator may be resumed and closed in other
        # contexts. The agent task makes it current for the agent's own code.
        span = self._worker.tracer.start_span(
            f"agent {spec.name}",
            context=_parent_context(context),
            kind=trace.SpanKind.INTERNAL,
            attributes=attributes,
        )
        try:
            # Tools the registry granted; without that list, the ones the agent declared.
            allowed = list(request.tools) or list(spec.tools)
            queue: asyncio.Queue[agent_worker_pb2.ExecuteUpdate] = asyncio.Queue()
            ctx = AgentContext(spec.name, execution, allowed, self._worker.tools, queue.put_nowait, span)
            input = _whole_numbers(json_format.MessageToDict(request.input))
            attempt = _Attempt(spec, ctx, input, queue, self._worker.cancel_grace)
            async for update in attempt.updates(self._worker.heartbeat_interval, span):
                yield update
        finally:
            span.end()


def _parent_context(context: Any) -> Any:
    """The caller's trace: the current span when a tracing interceptor made one,
    otherwise the W3C context in the call's metadata."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    with contextlib.suppress(AttributeError, TypeError):
        carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        return propagate.extract(carrier)
    return None


class Worker:
    """A set of agents and tools, served as an `AgentWorker`."""

    def __init__(
        self,
        *,
        heartbeat_interval: float = 1.0,
        auth_address: str | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        token_issuer: str = "switchboard-auth",
        token_audience: str = "switchboard",
        cancel_grace: float = 5.0,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        self.heartbeat_interval = heartbeat_interval
        self.cancel_grace = cancel_grace
        # The global provider unless one is given (tests pass an in-memory one).
        self.tracer = trace.get_tracer("switchboard_client.worker", tracer_provider=tracer_provider)
        self._auth_address = auth_address
        self._interceptors = list(interceptors)
        self._issuer = token_issuer
        self._audience = token_audience
        self._agents: dict[str, AgentSpec] = {}
        self._tools: dict[str, ToolSpec] = {}
        self._server: grpc.aio.Server | None = None
        self._verifier: ServiceTokenVerifier | None = None

    @property
    def agents(self) -> Mapping[str, AgentSpec]:
        return self._agents

    @property
    def tools(self) -> Mapping[str, ToolSpec]:
        return self._tools

    def tool(self, name: str | None = None) -> Callable[[F], F]:
        """Registers a tool (sync or async) under `name` (default: the function's name)."""

        def register(function: F) -> F:
            tool_name = name or function.__name__
            if tool_name in self._tools:
                raise ValueError(f"tool {tool_name!r} is already defined")
            self._tools[tool_name] = ToolSpec(tool_name, function)
            return function

        return register

    def agent(
        self,
        name: str,
        *,
        description: str = "",
        tools: Iterable[str] = (),
        input_schema: Mapping[str, Any] | None = None,
        max_concurrency: int | None = None,
        timeout: float | None = None,
        heartbeat_timeout: float | None = None,
        retry_policy: RetryPolicy | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Callable[[F], F]:
        """Registers an async agent function `(ctx, input) -> dict` under `name`."""

        def register(function: F) -> F:
            if not inspect.iscoroutinefunction(function):
                raise TypeError(f"agent {name!r} must be an async function")
            if name in self._agents:
                raise ValueError(f"agent {name!r} is already defined")
            self._agents[name] = AgentSpec(
                name=name,
                function=function,
                description=description,
                tools=tuple(tools),
                input_schema=dict(input_schema or {}),
                max_concurrency=max_concurrency,
                timeout=timeout,
                heartbeat_timeout=heartbeat_timeout,
                retry_policy=retry_policy,
                labels=labels,
            )
            return function

        return register

    def servicer(self, authorize: Authorize | None = None) -> agent_worker_pb2_grpc.AgentWorkerServicer:
        """The AgentWorker servicer; `authorize(context)` runs before each call."""
        return _Servicer(self, authorize)

    def add_to_server(self, server: grpc.aio.Server, authorize: Authorize | None = None) -> list[str]:
        """Adds the AgentWorker service to a server you run; returns its full name."""
        agent_worker_pb2_grpc.add_AgentWorkerServicer_to_server(self.servicer(authorize), server)
        return [SERVICE_NAME]

    async def start(self, host: str = "127.0.0.1", port: int = 50055) -> int:
        """Starts serving (with health checks) and returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("the worker is already serving")
        authorize: Authorize | None = None
        if self._auth_address:
            self._verifier = ServiceTokenVerifier(
                self._auth_address, issuer=self._issuer, audience=self._audience
            )
            authorize = self._verifier.authorize
        server = grpc.aio.server(interceptors=self._interceptors)
        self.add_to_server(server, authorize)
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        log.info("worker listening", extra={"address": f"{host}:{bound}", "agents": sorted(self._agents)})
        return bound

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stops serving; running attempts get `grace` seconds, then are cancelled."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._verifier is not None:
            await self._verifier.close()
            self._verifier = None

    async def serve(self, host: str = "127.0.0.1", port: int = 50055, grace: float = 5.0) -> None:
        """Serves until SIGINT or SIGTERM, then stops gracefully."""
        await self.start(host, port)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        try:
            await stopping.wait()
        finally:
            await self.stop(grace)

    def run(self, host: str = "127.0.0.1", port: int = 50055, grace: float = 5.0) -> None:
        """`serve` in a fresh event loop: the whole program of a standalone worker."""
        asyncio.run(self.serve(host, port, grace))

    async def register(
        self,
        registry: registry_service_pb2_grpc.RegistryServiceAsyncStub,
        endpoint: str,
        metadata: Sequence[tuple[str, str]],
        timeout: float = 10.0,
    ) -> list[agent_pb2.Agent]:
        """Registers every agent of this worker at `endpoint`; an agent that
        exists is updated (its owned fields and the limits set here), so a
        restarted worker re-registers without failing."""
        registered: list[agent_pb2.Agent] = []
        for spec in self._agents.values():
            agent = spec.to_proto(endpoint)
            try:
                response = await registry.RegisterAgent(
                    registry_service_pb2.RegisterAgentRequest(agent=agent), metadata=metadata, timeout=timeout
                )
                registered.append(response.agent)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                updated = await registry.UpdateAgent(
                    registry_service_pb2.UpdateAgentRequest(
                        agent=agent, update_mask=field_mask_pb2.FieldMask(paths=spec.update_paths())
                    ),
                    metadata=metadata,
                    timeout=timeout,
                )
                registered.append(updated.agent)
        return registered
