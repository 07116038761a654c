"""The built-in worker as a real process: only services may call it, its agents
run over the network, and it is SERVING only once its agents are registered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.agent.v1 import agent_worker_pb2, agent_worker_pb2_grpc
from switchboard.registry.v1 import registry_service_pb2, registry_service_pb2_grpc

from tests.harness.suite import Suite, start_suite


@pytest.fixture(scope="module")
async def suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    async with start_suite(
        tmp_path_factory.mktemp("worker"),
        services=("auth", "registry", "worker"),
        env={
            "worker": {
                "SWITCHBOARD_WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.1",
                "SWITCHBOARD_WORKER_REGISTRATION_MAX_BACKOFF_SECONDS": "0.5",
            }
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def service_token(suite: Suite) -> str:
    # The executor's account: the one principal that calls workers in the suite.
    return await suite.login("svc-executor", suite.service_password("executor"))


def worker_stub(suite: Suite) -> Any:
    return agent_worker_pb2_grpc.AgentWorkerStub(suite.channel("worker"))


def execute_request(agent: str, **input: Any) -> agent_worker_pb2.ExecuteRequest:
    request = agent_worker_pb2.ExecuteRequest(
        agent=agent, context=agent_worker_pb2.ExecutionContext(user_id="u-1", run_id="run-1", attempt=1)
    )
    request.input.update(input)
    return request


async def test_a_service_runs_an_agent_and_sees_every_step(suite: Suite, service_token: str) -> None:
    updates = [
        update
        async for update in worker_stub(suite).Execute(
            execute_request("text-stats", text="Ships sail. Ships sink."),
            metadata=suite.metadata(service_token),
            timeout=15,
        )
        if not update.HasField("heartbeat")
    ]
    assert [u.WhichOneof("update") for u in updates] == [
        "thinking",
        "tool_started",
        "tool_finished",
        "thinking",
        "result",
    ]
    output = json_format.MessageToDict(updates[-1].result.output)
    assert output["words"] == 4 and output["sentences"] == 2
    assert output["top_words"][0] == {"word": "ships", "count": 2}


async def test_users_and_admins_cannot_call_the_worker(suite: Suite) -> None:
    _, user = await suite.create_user(f"eve-{uuid.uuid4().hex[:6]}")
    for token, code in (
        (user, grpc.StatusCode.PERMISSION_DENIED),
        (await suite.admin_token(), grpc.StatusCode.PERMISSION_DENIED),
        ("garbage", grpc.StatusCode.UNAUTHENTICATED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in worker_stub(suite).Execute(
                execute_request("chaos"), metadata=suite.metadata(token), timeout=15
            ):
                pass
        assert caught.value.code() == code


async def test_heartbeats_flow_while_an_agent_hangs(suite: Suite, service_token: str) -> None:
    call = worker_stub(suite).Execute(
        execute_request("chaos", action="hang"), metadata=suite.metadata(service_token), timeout=15
    )
    seen = [await call.read() for _ in range(3)]
    assert [u.WhichOneof("update") for u in seen] == ["thinking", "heartbeat", "heartbeat"]
    call.cancel()


async def health_status(suite: Suite) -> int:
    async with grpc.aio.insecure_channel(suite.address["worker"]) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(response.status)


async def test_the_worker_serves_only_once_registered_and_reregisters_on_restart(
    suite: Suite, service_token: str
) -> None:
    registry: Any = registry_service_pb2_grpc.RegistryServiceStub(suite.channel("registry"))
    await suite.stop("registry")
    await suite.stop("worker")
    suite.processes["worker"].start()
    status = None
    try:
        # Listening, but NOT_SERVING while the registry is away.
        for _ in range(100):
            try:
                status = await health_status(suite)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await suite.start("registry")
    await suite.processes["worker"].wait_serving(timeout=30)
    logs = suite.logs("worker")
    assert logs.count("could not register agents yet") >= 1
    assert logs.count("agents registered") == 2  # first start, and again after the restart
    response = await registry.GetAgent(
        registry_service_pb2.GetAgentRequest(name="summarize"),
        metadata=suite.metadata(service_token),
        timeout=10,
    )
    assert response.agent.endpoint == suite.address["worker"]


async def test_the_worker_logs_no_errors(suite: Suite) -> None:
    # Runs last: cancelled calls, refused callers and restarts above are all routine.
    errors = [line for line in suite.logs("worker").splitlines() if '"level": "ERROR"' in line]
    # Known and harmless, from the shared OpenTelemetry server interceptor: a
    # streaming call cancelled by its client may be closed in another context.
    errors = [line for line in errors if '"message": "Failed to detach context"' not in line]
    assert errors == []
