"""The worker SDK, driven through a real grpc.aio server and the generated stub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from switchboard.agent.v1 import agent_worker_pb2, agent_worker_pb2_grpc
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc, token_pb2

from switchboard_client.worker import AgentContext, AgentError, Worker
from tests.unit.common.keys import Keys

Update = agent_worker_pb2.ExecuteUpdate


def kinds(updates: list[Update]) -> list[str]:
    return [str(update.WhichOneof("update")) for update in updates]


def reason_of(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def request(agent: str, tools: tuple[str, ...] = (), **input: Any) -> agent_worker_pb2.ExecuteRequest:
    req = agent_worker_pb2.ExecuteRequest(
        agent=agent,
        tools=tools,
        context=agent_worker_pb2.ExecutionContext(
            user_id="user-7",
            thread_id="thread-1",
            run_id="run-42",
            request_id="req-1",
            step_id="main",
            attempt=2,
        ),
    )
    req.input.update(input)
    return req


class Probe:
    """Lets tests synchronise with agent code running in the same event loop."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.saw_cancelled_flag = False


def build_worker(probe: Probe, **options: Any) -> Worker:
    worker = Worker(**options)

    @worker.tool("word_count")
    def word_count(text: str) -> dict[str, int]:
        return {"words": len(text.split())}

    @worker.tool()
    async def explode(why: str) -> dict[str, str]:
        raise RuntimeError(why)

    @worker.tool()
    def refuse() -> None:
        raise AgentError("no such thing", reason="NOTHING_THERE")

    @worker.agent("text-stats", description="counts words", tools=["word_count"])
    async def text_stats(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        await ctx.think("Counting words")
        counted = await ctx.call_tool("word_count", text=input["text"])
        return {"words": counted["words"]}

    @worker.agent("waits", tools=[])
    async def waits(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        await ctx.think("waiting")
        if input.get("silent"):
            ctx.stop_heartbeats()
        await probe.release.wait()
        return {"released": True}

    @worker.agent("hangs")
    async def hangs(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        await ctx.think("hanging")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            probe.saw_cancelled_flag = ctx.cancelled
            probe.cancelled.set()
            raise
        return {}

    @worker.agent("fails")
    async def fails(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        raise AgentError(reason="BAD_INPUT", message="the text is empty", metadata={"field": "text"})

    @worker.agent("crashes")
    async def crashes(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("/secret/path/of/the/worker")

    @worker.agent("uses-tools", tools=["explode", "refuse", "word_count"])
    async def uses_tools(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        return {"value": await ctx.call_tool(input["tool"], **input.get("arguments", {}))}

    @worker.agent("own-timeout")
    async def own_timeout(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        async with asyncio.timeout(0):
            await asyncio.Event().wait()
        return {}

    @worker.agent("echo")
    async def echo(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        deadline = ctx.deadline.isoformat() if ctx.deadline else None
        return {
            "input": input,
            "n_is_int": isinstance(input.get("n"), int),
            "context": [ctx.user_id, ctx.thread_id, ctx.run_id, ctx.request_id, ctx.step_id, ctx.attempt],
            "deadline": deadline,
            "tools": sorted(ctx.tools),
        }

    return worker


@pytest.fixture
def probe() -> Probe:
    return Probe()


ServeFactory = Callable[..., Any]


@pytest.fixture
async def serve(probe: Probe) -> AsyncIterator[ServeFactory]:
    """Starts a worker on a free port; returns (worker, stub)."""
    started: list[tuple[Worker, grpc.aio.Channel]] = []

    async def start(**options: Any) -> tuple[Worker, Any]:
        worker = build_worker(probe, **options)
        port = await worker.start(port=0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((worker, channel))
        return worker, agent_worker_pb2_grpc.AgentWorkerStub(channel)

    yield start
    for worker, channel in started:
        await channel.close(None)
        await worker.stop(grace=None)


async def collect(stub: Any, req: agent_worker_pb2.ExecuteRequest, **kwargs: Any) -> list[Update]:
    return [update async for update in stub.Execute(req, timeout=10, **kwargs)]


async def test_updates_arrive_in_order_and_end_with_one_result(serve: ServeFactory) -> None:
    _, stub = await serve()
    updates = await collect(stub, request("text-stats", text="one two three"))
    meaningful = [u for u in updates if not u.HasField("heartbeat")]
    assert kinds(meaningful) == ["thinking", "tool_started", "tool_finished", "result"]
    thinking, started, finished, result = meaningful
    assert thinking.thinking.text == "Counting words"
    assert started.tool_started.tool == "word_count"
    assert json_format.MessageToDict(started.tool_started.arguments) == {"text": "one two three"}
    assert finished.tool_finished.call_id == started.tool_started.call_id != ""
    assert json_format.MessageToDict(finished.tool_finished.result) == {"words": 3.0}
    assert not finished.tool_finished.HasField("error")
    assert json_format.MessageToDict(result.result.output) == {"words": 3.0}
    assert all(u.time.seconds > 0 for u in updates)


async def test_heartbeats_flow_while_the_agent_waits(serve: ServeFactory, probe: Probe) -> None:
    _, stub = await serve(heartbeat_interval=0.02)
    call = stub.Execute(request("waits"), timeout=10)
    seen: list[Update] = []
    async for update in call:
        seen.append(update)
        if kinds(seen).count("heartbeat") == 3:
            probe.release.set()
    assert kinds(seen)[0] == "thinking"
    assert kinds(seen)[-1] == "result"
    assert kinds(seen).count("heartbeat") >= 3
    assert kinds(seen).count("result") == 1


async def test_a_silenced_agent_sends_no_heartbeats(serve: ServeFactory, probe: Probe) -> None:
    _, stub = await serve(heartbeat_interval=0.01)
    call = stub.Execute(request("waits", silent=True), timeout=10)
    first = await call.read()
    assert first.HasField("thinking")
    await asyncio.sleep(0.2)  # many heartbeat intervals; none may come
    probe.release.set()
    rest = []
    while (update := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        rest.append(update)
    assert kinds(rest) == ["result"]


async def test_cancelling_the_call_cancels_the_agent(serve: ServeFactory, probe: Probe) -> None:
    _, stub = await serve()
    call = stub.Execute(request("hangs"), timeout=10)
    first = await call.read()
    assert first.thinking.text == "hanging"
    call.cancel()
    await asyncio.wait_for(probe.cancelled.wait(), timeout=10)
    assert probe.saw_cancelled_flag


async def test_the_call_deadline_cancels_the_agent(serve: ServeFactory, probe: Probe) -> None:
    _, stub = await serve()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Execute(request("hangs"), timeout=0.3):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(probe.cancelled.wait(), timeout=10)


async def test_an_agent_error_keeps_its_reason(serve: ServeFactory) -> None:
    _, stub = await serve()
    updates = await collect(stub, request("fails"))
    assert kinds(updates) == ["error"]
    error = updates[0].error
    assert error.message == "the text is empty"
    info = reason_of(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "BAD_INPUT",
        "switchboard.dev",
        {"field": "text"},
    )


async def test_an_unexpected_exception_is_agent_error_without_details(serve: ServeFactory) -> None:
    _, stub = await serve()
    updates = await collect(stub, request("crashes"))
    assert kinds(updates) == ["error"]
    assert reason_of(updates[0].error).reason == "AGENT_ERROR"
    assert "secret" not in updates[0].error.message
    assert "ValueError" in updates[0].error.message


async def test_an_unknown_agent_is_not_found(serve: ServeFactory) -> None:
    _, stub = await serve()
    updates = await collect(stub, request("no-such-agent"))
    assert kinds(updates) == ["error"]
    assert updates[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert reason_of(updates[0].error).reason == "AGENT_NOT_FOUND"


async def test_a_failing_tool_reports_its_error_then_fails_the_agent(serve: ServeFactory) -> None:
    _, stub = await serve()
    updates = await collect(stub, request("uses-tools", tool="explode", arguments={"why": "/private/detail"}))
    assert kinds(updates) == ["tool_started", "tool_finished", "error"]
    finished = updates[1].tool_finished
    assert finished.HasField("error") and reason_of(finished.error).reason == "TOOL_FAILED"
    assert "/private/detail" not in finished.error.message
    assert reason_of(updates[2].error).reason == "TOOL_FAILED"


async def test_a_tool_agent_error_keeps_its_reason(serve: ServeFactory) -> None:
    _, stub = await serve()
    updates = await collect(stub, request("uses-tools", tool="refuse"))
    assert kinds(updates) == ["tool_started", "tool_finished", "error"]
    assert reason_of(updates[1].tool_finished.error).reason == "NOTHING_THERE"
    assert reason_of(updates[2].error).reason == "NOTHING_THERE"


async def test_only_granted_tools_may_be_called(serve: ServeFactory) -> None:
    _, stub = await serve()
    # The registry granted only `refuse`: word_count is off limits for this run.
    updates = await collect(
        stub, request("uses-tools", ("refuse",), tool="word_count", arguments={"text": "a"})
    )
    assert kinds(updates) == ["error"]
    assert reason_of(updates[0].error).reason == "TOOL_NOT_ALLOWED"
    updates = await collect(stub, request("uses-tools", ("nothing",), tool="nothing"))
    assert reason_of(updates[0].error).reason == "TOOL_NOT_FOUND"


async def test_the_execution_context_reaches_the_agent(serve: ServeFactory) -> None:
    _, stub = await serve()
    req = request("echo", ("a", "b"), n=3, text="x")
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    req.context.deadline.FromDatetime(deadline)
    updates = await collect(stub, req)
    output = json_format.MessageToDict(updates[-1].result.output)
    assert output["context"] == ["user-7", "thread-1", "run-42", "req-1", "main", 2]
    assert output["n_is_int"] is True
    assert output["tools"] == ["a", "b"]
    assert datetime.fromisoformat(output["deadline"]) == deadline


async def test_a_passed_deadline_fails_the_attempt(serve: ServeFactory, probe: Probe) -> None:
    _, stub = await serve()
    req = request("hangs")
    req.context.deadline.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
    updates = await collect(stub, req)
    assert kinds(updates)[-1] == "error"
    assert reason_of(updates[-1].error).reason == "AGENT_DEADLINE_EXCEEDED"


async def test_an_agents_own_timeout_is_not_the_attempts_deadline(serve: ServeFactory) -> None:
    _, stub = await serve()
    req = request("own-timeout")
    req.context.deadline.FromDatetime(datetime.now(UTC) + timedelta(minutes=5))
    updates = await collect(stub, req)
    assert reason_of(updates[-1].error).reason == "AGENT_ERROR"


async def test_each_attempt_is_one_span_with_its_steps_as_events(serve: ServeFactory) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _, stub = await serve(tracer_provider=provider)
    await collect(stub, request("text-stats", text="a b"))
    (span,) = exporter.get_finished_spans()
    assert span.name == "agent text-stats"
    assert dict(span.attributes or {}) == {
        "switchboard.agent": "text-stats",
        "switchboard.run_id": "run-42",
        "switchboard.user_id": "user-7",
    }
    assert [event.name for event in span.events] == ["thinking", "tool_started", "tool_finished"]


class JwksOnly(auth_service_pb2_grpc.AuthServiceServicer):
    """The one auth RPC a standalone worker uses."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    async def GetJwks(self, request: Any, context: Any) -> auth_service_pb2.GetJwksResponse:
        published = []
        for kid, private in self.keys.private.items():
            jwk = jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
            published.append(
                token_pb2.JsonWebKey(kid=kid, kty="OKP", crv="Ed25519", x=jwk["x"], alg="EdDSA", use="sig")
            )
        return auth_service_pb2.GetJwksResponse(keys=published)


async def test_with_an_auth_address_only_service_tokens_are_accepted(serve: ServeFactory) -> None:
    keys = Keys()
    kid = keys.add()
    auth = grpc.aio.server()
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(JwksOnly(keys), auth)  # type: ignore[abstract]
    auth_port = auth.add_insecure_port("127.0.0.1:0")
    await auth.start()
    try:
        _, stub = await serve(auth_address=f"127.0.0.1:{auth_port}")
        req = request("text-stats", text="a b")
        refused = {
            "": grpc.StatusCode.UNAUTHENTICATED,
            "Bearer not-a-token": grpc.StatusCode.UNAUTHENTICATED,
            f"Bearer {keys.sign(kid, role='user')}": grpc.StatusCode.PERMISSION_DENIED,
            f"Bearer {keys.sign(kid, role='service', exp=1)}": grpc.StatusCode.UNAUTHENTICATED,
        }
        for header, code in refused.items():
            metadata = (("authorization", header),) if header else ()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, req, metadata=metadata)
            assert caught.value.code() == code, header
        accepted = await collect(
            stub, req, metadata=(("authorization", f"Bearer {keys.sign(kid, role='service')}"),)
        )
        assert kinds(accepted)[-1] == "result"
    finally:
        await auth.stop(None)


def test_agents_must_be_async_and_names_unique() -> None:
    worker = Worker()
    with pytest.raises(TypeError):
        worker.agent("sync-agent")(lambda ctx, input: {})
    worker.agent("twice")(_async_agent)
    with pytest.raises(ValueError):
        worker.agent("twice")(_async_agent)


async def _async_agent(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
    return {}


def test_registration_updates_only_what_the_worker_sets() -> None:
    worker = Worker()
    worker.agent("plain", tools=["t"], input_schema={"type": "object"})(_async_agent)
    worker.agent("tuned", max_concurrency=3, timeout=2.5)(_async_agent)
    plain, tuned = worker.agents["plain"], worker.agents["tuned"]
    assert plain.update_paths() == ["description", "endpoint", "tools", "input_schema"]
    assert tuned.update_paths() == [
        "description",
        "endpoint",
        "tools",
        "input_schema",
        "max_concurrency",
        "timeout",
    ]
    proto = tuned.to_proto("127.0.0.1:1")
    assert (proto.endpoint, proto.max_concurrency, proto.timeout.ToMilliseconds()) == ("127.0.0.1:1", 3, 2500)
    assert not proto.HasField("heartbeat_timeout")
    assert json_format.MessageToDict(plain.to_proto("h:1").input_schema) == {"type": "object"}
