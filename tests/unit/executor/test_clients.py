"""The executor's adapters to other services: the agent cache, the registry
lookup over real gRPC, and the translation of worker updates and events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from switchboard.agent.v1 import agent_worker_pb2
from switchboard.events.v1 import event_pb2
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from services.common import convert
from services.common.errors import NotFound, Unavailable
from services.executor.clients import (
    CachedAgents,
    RegistryAgents,
    agent_spec_from_proto,
    event_to_proto,
    update_from_proto,
)
from services.executor.domain import (
    AgentSpec,
    EventType,
    Failure,
    Heartbeat,
    OutboxEvent,
    Result,
    Thinking,
    ToolFinished,
    ToolStarted,
)
from services.executor.retry import RetrySettings
from tests.unit.executor.conftest import NoCredentials, StaticAgents, agent_spec, error_status


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_agents_are_cached_for_their_ttl_only() -> None:
    inner = StaticAgents({"echo": agent_spec("echo", "h:1")})
    clock = Clock()
    cached = CachedAgents(inner, ttl=5.0, monotonic=clock)

    await cached.get("echo")
    await cached.get("echo")
    assert inner.lookups == 1
    clock.now += 5.0
    inner.specs["echo"] = agent_spec("echo", "h:2")
    assert (await cached.get("echo")).endpoint == "h:2"
    assert inner.lookups == 2


async def test_unknown_agents_are_not_cached() -> None:
    inner = StaticAgents({})
    cached = CachedAgents(inner, ttl=5.0, monotonic=Clock())
    with pytest.raises(NotFound):
        await cached.get("late")
    inner.specs["late"] = agent_spec("late", "h:1")
    assert (await cached.get("late")).name == "late"


def test_unset_agent_fields_take_the_registry_defaults() -> None:
    schema = convert.struct({"type": "object", "properties": {"text": {"type": "string", "maxLength": 10}}})
    spec = agent_spec_from_proto(agent_pb2.Agent(name="a", endpoint="h:1", tools=["t"], input_schema=schema))
    assert (spec.timeout_seconds, spec.heartbeat_timeout_seconds, spec.max_concurrency) == (60.0, 10.0, 10)
    # Struct numbers are doubles; JSON Schema wants an integer maxLength.
    assert spec.input_schema["properties"]["text"]["maxLength"] == 10
    assert isinstance(spec.input_schema["properties"]["text"]["maxLength"], int)
    timed = agent_spec_from_proto(
        agent_pb2.Agent(name="a", timeout=convert.duration(2.5), heartbeat_timeout=convert.duration(0.5))
    )
    assert (timed.timeout_seconds, timed.heartbeat_timeout_seconds) == (2.5, 0.5)


def test_the_agents_limits_and_retry_policy_come_from_the_registry() -> None:
    spec = agent_spec_from_proto(
        agent_pb2.Agent(
            name="a",
            max_concurrency=3,
            retry_policy=agent_pb2.RetryPolicy(
                max_attempts=4,
                initial_backoff=convert.duration(0.5),
                backoff_multiplier=3.0,
                non_retryable_reasons=["NO_SUCH_CITY"],
            ),
        )
    )
    assert spec.max_concurrency == 3
    assert spec.retry == RetrySettings(
        max_attempts=4,
        initial_backoff_seconds=0.5,
        max_backoff_seconds=60.0,  # unset: the registry's documented default
        multiplier=3.0,
        non_retryable_reasons=frozenset({"NO_SUCH_CITY"}),
    )
    # Unset entirely: the documented defaults.
    assert agent_spec_from_proto(agent_pb2.Agent(name="b")).retry == RetrySettings()
    # A stored policy that makes no sense here falls back to the defaults.
    nonsense = agent_pb2.RetryPolicy(initial_backoff=convert.duration(10), max_backoff=convert.duration(1))
    assert agent_spec_from_proto(agent_pb2.Agent(name="c", retry_policy=nonsense)).retry == RetrySettings()


async def test_while_the_registry_is_unreachable_the_last_known_definition_is_used() -> None:
    class Flaky(StaticAgents):
        down = False

        async def get(self, name: str) -> AgentSpec:
            if self.down:
                self.lookups += 1
                raise Unavailable("registry down")
            return await super().get(name)

    inner = Flaky({"echo": agent_spec("echo", "h:1")})
    clock = Clock()
    cached = CachedAgents(inner, ttl=5.0, monotonic=clock)
    await cached.get("echo")
    inner.down = True
    clock.now += 5.0
    assert (await cached.get("echo")).endpoint == "h:1"
    # Asked again only after another ttl, not on every call.
    await cached.get("echo")
    assert inner.lookups == 2
    with pytest.raises(Unavailable):
        await cached.get("never-seen")


class FakeRegistry(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, Any]] = []
        self.broken = False

    async def GetAgent(self, request: Any, context: Any) -> registry_service_pb2.GetAgentResponse:
        self.metadata.append(dict(context.invocation_metadata()))
        if self.broken:
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        if request.name != "echo":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such agent")
        return registry_service_pb2.GetAgentResponse(agent=agent_pb2.Agent(name="echo", endpoint="h:9"))


@pytest.fixture
async def registry() -> AsyncIterator[tuple[FakeRegistry, RegistryAgents]]:
    fake = FakeRegistry()  # type: ignore[abstract]
    server = grpc.aio.server()
    registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
    yield fake, RegistryAgents(stub, NoCredentials(), 5.0)
    await channel.close(None)
    await server.stop(None)


async def test_the_registry_is_asked_with_the_service_token(
    registry: tuple[FakeRegistry, RegistryAgents],
) -> None:
    fake, agents = registry
    spec = await agents.get("echo")
    assert isinstance(spec, AgentSpec) and spec.endpoint == "h:9"
    assert fake.metadata[-1]["authorization"] == "Bearer service-token"


async def test_an_unknown_agent_is_not_found_naming_it(registry: tuple[FakeRegistry, RegistryAgents]) -> None:
    _, agents = registry
    with pytest.raises(NotFound) as missing:
        await agents.get("ghost")
    assert missing.value.reason == "AGENT_NOT_FOUND"
    assert "ghost" in missing.value.message
    assert missing.value.metadata == {"agent": "ghost"}


async def test_a_failing_registry_is_unavailable(registry: tuple[FakeRegistry, RegistryAgents]) -> None:
    fake, agents = registry
    fake.broken = True
    with pytest.raises(Unavailable) as refused:
        await agents.get("echo")
    assert refused.value.reason == "REGISTRY_UNAVAILABLE"


def test_worker_updates_become_domain_updates() -> None:
    update = agent_worker_pb2.ExecuteUpdate
    assert update_from_proto(update(thinking=agent_worker_pb2.Thinking(text="t"))) == Thinking("t")
    started = agent_worker_pb2.ToolStarted(call_id="c", tool="x", arguments=convert.struct({"a": 1}))
    assert update_from_proto(update(tool_started=started)) == ToolStarted("c", "x", {"a": 1.0})
    finished = agent_worker_pb2.ToolFinished(
        call_id="c", tool="x", error=error_status(grpc.StatusCode.NOT_FOUND, "gone", "NO_FILE")
    )
    converted = update_from_proto(update(tool_finished=finished))
    assert isinstance(converted, ToolFinished) and converted.error is not None
    assert (converted.error.code, converted.error.reason) == ("NOT_FOUND", "NO_FILE")
    assert update_from_proto(update(heartbeat=agent_worker_pb2.Heartbeat())) == Heartbeat()
    result = agent_worker_pb2.Result(output=convert.struct({"ok": True}))
    assert update_from_proto(update(result=result)) == Result({"ok": True})
    failed = update_from_proto(
        update(error=error_status(grpc.StatusCode.INVALID_ARGUMENT, "bad", "INVALID_INPUT"))
    )
    assert isinstance(failed, Failure)
    assert (failed.error.code, failed.error.reason, failed.error.message) == (
        "INVALID_ARGUMENT",
        "INVALID_INPUT",
        "bad",
    )
    assert update_from_proto(update()) is None


def test_an_outbox_row_becomes_an_event_with_its_trace_context() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    row = OutboxEvent(
        event_id="e1",
        run_id="r1",
        user_id="u1",
        seq=3,
        type=EventType.TOOL_EXECUTING,
        step_id="main",
        agent="echo",
        payload={"tool": "x"},
        create_time=datetime(2030, 1, 1, tzinfo=UTC),
        trace_carrier=(("traceparent", traceparent),),
    )
    event = event_to_proto(row)
    assert (event.event_id, event.run_id, event.user_id, event.seq) == ("e1", "r1", "u1", 3)
    assert event.type == event_pb2.EVENT_TYPE_TOOL_EXECUTING
    assert (event.step_id, event.agent) == ("main", "echo")
    assert convert.from_struct(event.payload) == {"tool": "x"}
    assert event.trace_context.traceparent == traceparent
    assert event.create_time.ToDatetime(tzinfo=UTC) == row.create_time
