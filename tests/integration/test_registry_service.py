"""The registry as a real process, with auth and the built-in worker: who may
read and write agents, what bad input is told, idempotency, paging, durability."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from tests.harness.suite import Suite, start_suite

BUILT_IN = {"text-stats", "summarize", "calculator", "json-transform", "chaos"}


@pytest.fixture(scope="module")
async def suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    async with start_suite(
        tmp_path_factory.mktemp("registry"), services=("auth", "registry", "worker")
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def tokens(suite: Suite) -> dict[str, str]:
    _, ada = await suite.create_user(f"ada-{uuid.uuid4().hex[:6]}")
    _, bob = await suite.create_user(f"bob-{uuid.uuid4().hex[:6]}")
    return {"admin": await suite.admin_token(), "ada": ada, "bob": bob}


def stub(suite: Suite) -> Any:
    return registry_service_pb2_grpc.RegistryServiceStub(suite.channel("registry"))


def unique_name() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}"


async def list_all(suite: Suite, token: str, page_size: int = 0) -> list[agent_pb2.Agent]:
    agents: list[agent_pb2.Agent] = []
    token_ = ""
    while True:
        response = await stub(suite).ListAgents(
            registry_service_pb2.ListAgentsRequest(page_size=page_size, page_token=token_),
            metadata=suite.metadata(token),
            timeout=10,
        )
        agents += response.agents
        token_ = response.next_page_token
        if not token_:
            return agents


def details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [violation.field for violation in bad.field_violations]
    return reason, fields


async def test_the_worker_registered_its_agents_and_everyone_can_read_them(
    suite: Suite, tokens: dict[str, str]
) -> None:
    for who in ("admin", "ada"):
        agents = {agent.name: agent for agent in await list_all(suite, tokens[who])}
        assert BUILT_IN <= set(agents)
        assert {agents[name].endpoint for name in BUILT_IN} == {suite.address["worker"]}
    got = await stub(suite).GetAgent(
        registry_service_pb2.GetAgentRequest(name="text-stats"),
        metadata=suite.metadata(tokens["ada"]),
        timeout=10,
    )
    assert list(got.agent.tools) == ["word_count"]
    assert got.agent.max_concurrency == 10  # defaults are explicit
    assert got.agent.input_schema["required"] == ["text"]


async def test_users_cannot_write(suite: Suite, tokens: dict[str, str]) -> None:
    agent = agent_pb2.Agent(name=unique_name(), endpoint="127.0.0.1:1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(suite).RegisterAgent(
            registry_service_pb2.RegisterAgentRequest(agent=agent),
            metadata=suite.metadata(tokens["ada"]),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(suite).DeleteAgent(
            registry_service_pb2.DeleteAgentRequest(name="chaos"),
            metadata=suite.metadata(tokens["ada"]),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_no_token_is_unauthenticated(suite: Suite) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(suite).ListAgents(registry_service_pb2.ListAgentsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_input_names_each_field(suite: Suite, tokens: dict[str, str]) -> None:
    negative = duration_pb2.Duration(seconds=-5)
    bad = agent_pb2.Agent(
        name="Not_Valid",
        endpoint="nowhere",
        timeout=negative,
        max_concurrency=-3,
        retry_policy=agent_pb2.RetryPolicy(max_attempts=50),
    )
    bad.input_schema.update({"type": 12})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(suite).RegisterAgent(
            registry_service_pb2.RegisterAgentRequest(agent=bad),
            metadata=suite.metadata(tokens["admin"]),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, fields = details(caught.value)
    assert reason == "INVALID_ARGUMENT"
    assert set(fields) == {
        "agent.name",
        "agent.endpoint",
        "agent.timeout",
        "agent.max_concurrency",
        "agent.retry_policy.max_attempts",
        "agent.input_schema",
    }


async def test_write_lifecycle_with_idempotency(suite: Suite, tokens: dict[str, str]) -> None:
    admin = suite.metadata(tokens["admin"])
    name = unique_name()
    agent = agent_pb2.Agent(name=name, endpoint=suite.address["worker"], description="first")
    request = registry_service_pb2.RegisterAgentRequest(agent=agent, request_id=f"req-{name}")
    first = await stub(suite).RegisterAgent(request, metadata=admin, timeout=10)
    repeat = await stub(suite).RegisterAgent(request, metadata=admin, timeout=10)
    assert repeat.agent == first.agent

    other = agent_pb2.Agent(name=name, endpoint=suite.address["worker"], description="second")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(suite).RegisterAgent(
            registry_service_pb2.RegisterAgentRequest(agent=other), metadata=admin, timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details(caught.value)[0] == "AGENT_ALREADY_EXISTS"

    updated = await stub(suite).UpdateAgent(
        registry_service_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(name=name, max_concurrency=2),
            update_mask=field_mask_pb2.FieldMask(paths=["max_concurrency"]),
        ),
        metadata=admin,
        timeout=10,
    )
    assert updated.agent.max_concurrency == 2 and updated.agent.description == "first"
    assert updated.agent.create_time == first.agent.create_time

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(suite).UpdateAgent(
            registry_service_pb2.UpdateAgentRequest(
                agent=agent_pb2.Agent(name=name),
                update_mask=field_mask_pb2.FieldMask(paths=["name", "colour"]),
            ),
            metadata=admin,
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = caught.value.details() or ""
    assert "'name'" in message and "'colour'" in message
    assert details(caught.value)[1] == ["update_mask", "update_mask"]

    delete = registry_service_pb2.DeleteAgentRequest(name=name, request_id=f"del-{name}")
    await stub(suite).DeleteAgent(delete, metadata=admin, timeout=10)
    await stub(suite).DeleteAgent(delete, metadata=admin, timeout=10)  # a repeat: same answer
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(suite).GetAgent(
            registry_service_pb2.GetAgentRequest(name=name), metadata=admin, timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_two_users_page_through_agents_concurrently(suite: Suite, tokens: dict[str, str]) -> None:
    ada, bob = await asyncio.gather(list_all(suite, tokens["ada"], 2), list_all(suite, tokens["bob"], 3))
    names = [agent.name for agent in ada]
    assert names == sorted(names) and len(names) == len(set(names))
    assert names == [agent.name for agent in bob]
    assert BUILT_IN <= set(names)


async def test_agents_survive_a_registry_restart(suite: Suite, tokens: dict[str, str]) -> None:
    before = {agent.name: agent for agent in await list_all(suite, tokens["admin"])}
    await suite.stop("registry")
    await suite.start("registry")
    after = {agent.name: agent for agent in await list_all(suite, tokens["admin"])}
    assert after == before
