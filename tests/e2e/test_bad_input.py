"""Bad input across the suite: the right code, the details a client can act
on, and nothing internal (no traceback, SQL or file path) in any answer."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc
from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from tests.harness.clients import struct
from tests.harness.suite import Suite, metadata

LEAKS = (
    "Traceback",
    'File "',
    ".py",
    "SELECT",
    "INSERT",
    "sqlalchemy",
    "sqlite",
    "psycopg",
    "/work/",
    "/tmp/",
)


async def rejected(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    error = raised.value
    visible = f"{error.details()} {error.trailing_metadata()}"
    for leak in LEAKS:
        assert leak not in visible, (leak, visible)
    return error


def details_of(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """(ErrorInfo reason, BadRequest field names)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    reason, fields = "", []
    for detail in status.details if status else []:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return reason, fields


@pytest.fixture
async def user_token(suite: Suite) -> str:
    return (await suite.create_user(f"bad-{uuid.uuid4().hex[:6]}"))[1]


async def test_calls_without_a_token_are_unauthenticated_everywhere(suite: Suite) -> None:
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: auth_service_pb2_grpc.AuthServiceStub(suite.channel("auth")).GetCurrentUser(
            auth_service_pb2.GetCurrentUserRequest()
        ),
        lambda: registry_service_pb2_grpc.RegistryServiceStub(suite.channel("registry")).ListAgents(
            registry_service_pb2.ListAgentsRequest()
        ),
        lambda: executor_service_pb2_grpc.ExecutorServiceStub(suite.channel("executor")).ListRuns(
            executor_service_pb2.ListRunsRequest()
        ),
        lambda: events_service_pb2_grpc.EventsServiceStub(suite.channel("events")).ListEvents(
            events_service_pb2.ListEventsRequest(run_id=str(uuid.uuid4()))
        ),
    ]
    for call in calls:
        error = await rejected(call())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details_of(error)[0] == "TOKEN_MISSING"


async def test_invalid_fields_are_named(suite: Suite, user_token: str) -> None:
    executor = executor_service_pb2_grpc.ExecutorServiceStub(suite.channel("executor"))
    request = executor_service_pb2.StartRunRequest(agent="Not A Name!", input=struct({"text": "x"}))
    request.timeout.seconds = -5
    error = await rejected(executor.StartRun(request, metadata=metadata(user_token)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, fields = details_of(error)
    assert {"agent", "timeout"} <= set(fields), fields

    registry = registry_service_pb2_grpc.RegistryServiceStub(suite.channel("registry"))
    error = await rejected(
        registry.RegisterAgent(
            registry_service_pb2.RegisterAgentRequest(agent=agent_pb2.Agent(name="x", endpoint="nowhere")),
            metadata=metadata(await suite.admin_token()),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"agent.name", "agent.endpoint"} <= set(details_of(error)[1])


async def test_input_not_matching_the_agents_schema_names_the_path(suite: Suite, user_token: str) -> None:
    executor = executor_service_pb2_grpc.ExecutorServiceStub(suite.channel("executor"))
    error = await rejected(
        executor.StartRun(
            executor_service_pb2.StartRunRequest(agent="text-stats", input=struct({"text": 42})),
            metadata=metadata(user_token),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(field.startswith("input") for field in details_of(error)[1])


async def test_wrong_role_is_permission_denied(suite: Suite, user_token: str) -> None:
    events = events_service_pb2_grpc.EventsServiceStub(suite.channel("events"))
    forged = event_pb2.Event(event_id=str(uuid.uuid4()), run_id=str(uuid.uuid4()), user_id="someone", seq=1)
    error = await rejected(
        events.Publish(events_service_pb2.PublishRequest(events=[forged]), metadata=metadata(user_token))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    auth = auth_service_pb2_grpc.AuthServiceStub(suite.channel("auth"))
    error = await rejected(
        auth.CreateUser(
            auth_service_pb2.CreateUserRequest(username="mallory", password="x" * 16),
            metadata=metadata(user_token),
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_oversized_messages_are_refused(suite: Suite, user_token: str) -> None:
    # The documented maximum is 4 MiB per message (SWITCHBOARD_<SVC>_MAX_MESSAGE_BYTES).
    executor = executor_service_pb2_grpc.ExecutorServiceStub(suite.channel("executor"))
    huge = executor_service_pb2.StartRunRequest(
        agent="text-stats", input=struct({"text": "a" * (5 * 1024 * 1024)})
    )
    error = await rejected(executor.StartRun(huge, metadata=metadata(user_token)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Nothing was started by it.
    listed = await executor.ListRuns(executor_service_pb2.ListRunsRequest(), metadata=metadata(user_token))
    assert list(listed.runs) == []
