"""Request validation at the servicer: every problem named at once, by field path."""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2
from switchboard.registry.v1 import agent_pb2, registry_service_pb2

from services.common.errors import InvalidArgument, PermissionDenied
from services.registry.servicer import RegistryServicer
from tests.unit.registry.conftest import ADMIN, SERVICE, USER, context_of
from tests.unit.registry.helpers import agent, schema, seconds, violated_fields


async def register(
    servicer: RegistryServicer, body: agent_pb2.Agent, request_id: str = ""
) -> agent_pb2.Agent:
    response = await servicer.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(agent=body, request_id=request_id), context_of(ADMIN)
    )
    return response.agent


async def test_every_bad_field_is_named_in_one_answer(servicer: RegistryServicer) -> None:
    bad = agent_pb2.Agent(
        name="Bad_Name",
        endpoint="no-port",
        tools=["ok_tool", "bad tool"],
        input_schema=schema({"type": "not-a-type"}),
        max_concurrency=-1,
        timeout=seconds(-1),
        heartbeat_timeout=seconds(7200),
        retry_policy=agent_pb2.RetryPolicy(
            max_attempts=21,
            initial_backoff=seconds(-2),
            backoff_multiplier=0.5,
            non_retryable_reasons=["lower_case"],
        ),
        labels={"Bad Key": "v"},
    )
    with pytest.raises(InvalidArgument) as caught:
        await register(servicer, bad, request_id="x" * 129)
    assert violated_fields(caught.value) == {
        "agent.name",
        "agent.endpoint",
        "agent.tools[1]",
        "agent.input_schema",
        "agent.max_concurrency",
        "agent.timeout",
        "agent.heartbeat_timeout",
        "agent.retry_policy.max_attempts",
        "agent.retry_policy.initial_backoff",
        "agent.retry_policy.backoff_multiplier",
        "agent.retry_policy.non_retryable_reasons[0]",
        "agent.labels['Bad Key']",
        "request_id",
    }


async def test_missing_agent_is_named(servicer: RegistryServicer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await servicer.RegisterAgent(registry_service_pb2.RegisterAgentRequest(), context_of(ADMIN))
    assert "agent" in violated_fields(caught.value)


@pytest.mark.parametrize("name", ["a", "1abc", "-abc", "abc_def", "ABC", "a" * 64, "agent.x", ""], ids=repr)
async def test_names_outside_the_pattern_are_refused(servicer: RegistryServicer, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await register(servicer, agent(name))
    assert violated_fields(caught.value) == {"agent.name"}


@pytest.mark.parametrize("name", ["ab", "a-1", "text-stats", "a" * 63])
async def test_names_inside_the_pattern_are_accepted(servicer: RegistryServicer, name: str) -> None:
    assert (await register(servicer, agent(name))).name == name


@pytest.mark.parametrize(
    "endpoint", ["localhost:50055", "10.0.0.7:1", "[::1]:8080", "worker.svc.cluster.local:65535"]
)
async def test_host_port_endpoints_are_accepted(servicer: RegistryServicer, endpoint: str) -> None:
    assert (await register(servicer, agent(endpoint=endpoint))).endpoint == endpoint


@pytest.mark.parametrize(
    "endpoint", ["", "localhost", "localhost:0", "localhost:70000", "http://x:80", ":80", "a b:80"]
)
async def test_malformed_endpoints_are_refused(servicer: RegistryServicer, endpoint: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await register(servicer, agent(endpoint=endpoint))
    assert violated_fields(caught.value) == {"agent.endpoint"}


async def test_input_schema_must_be_a_json_schema(servicer: RegistryServicer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await register(servicer, agent(input_schema=schema({"properties": {"n": {"minimum": "five"}}})))
    assert violated_fields(caught.value) == {"agent.input_schema"}
    good = {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1}},
        "required": ["text"],
    }
    stored = await register(servicer, agent(input_schema=schema(good)))
    assert stored.input_schema["required"] == ["text"]


async def test_backoff_bounds_are_checked_together(servicer: RegistryServicer) -> None:
    policy = agent_pb2.RetryPolicy(initial_backoff=seconds(30), max_backoff=seconds(5))
    with pytest.raises(InvalidArgument) as caught:
        await register(servicer, agent(retry_policy=policy))
    assert violated_fields(caught.value) == {"agent.retry_policy.max_backoff"}


async def test_defaults_are_stored_and_returned_explicitly(servicer: RegistryServicer) -> None:
    stored = await register(servicer, agent())
    assert stored.max_concurrency == 10
    assert stored.timeout.ToTimedelta().total_seconds() == 60
    assert stored.heartbeat_timeout.ToTimedelta().total_seconds() == 10
    assert stored.retry_policy.max_attempts == 3
    assert stored.retry_policy.initial_backoff.ToTimedelta().total_seconds() == 1
    assert stored.retry_policy.max_backoff.ToTimedelta().total_seconds() == 60
    assert stored.retry_policy.backoff_multiplier == 2.0
    assert stored.create_time.seconds > 0 and stored.update_time == stored.create_time


async def test_explicit_values_are_kept(servicer: RegistryServicer) -> None:
    stored = await register(
        servicer,
        agent(
            max_concurrency=3,
            timeout=seconds(0.5),
            retry_policy=agent_pb2.RetryPolicy(max_attempts=1, non_retryable_reasons=["BAD_INPUT"]),
            tools=["word_count"],
            labels={"team": "core"},
        ),
    )
    assert stored.max_concurrency == 3
    assert stored.timeout.ToMilliseconds() == 500
    assert stored.retry_policy.max_attempts == 1
    assert list(stored.retry_policy.non_retryable_reasons) == ["BAD_INPUT"]
    assert list(stored.tools) == ["word_count"]
    assert dict(stored.labels) == {"team": "core"}


async def test_users_cannot_write_even_with_bad_input(servicer: RegistryServicer) -> None:
    for request in (
        registry_service_pb2.RegisterAgentRequest(agent=agent("Not Valid")),
        registry_service_pb2.RegisterAgentRequest(agent=agent()),
    ):
        with pytest.raises(PermissionDenied):
            await servicer.RegisterAgent(request, context_of(USER))
    with pytest.raises(PermissionDenied):
        await servicer.DeleteAgent(
            registry_service_pb2.DeleteAgentRequest(name="text-stats"), context_of(USER)
        )
    with pytest.raises(PermissionDenied):
        await servicer.UpdateAgent(registry_service_pb2.UpdateAgentRequest(agent=agent()), context_of(USER))


async def test_services_may_write_and_users_may_read(servicer: RegistryServicer) -> None:
    await servicer.RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(agent=agent()), context_of(SERVICE)
    )
    got = await servicer.GetAgent(registry_service_pb2.GetAgentRequest(name="text-stats"), context_of(USER))
    assert got.agent.endpoint == "127.0.0.1:50055"
    listed = await servicer.ListAgents(registry_service_pb2.ListAgentsRequest(), context_of(USER))
    assert [a.name for a in listed.agents] == ["text-stats"]


async def test_update_mask_names_unknown_and_immutable_paths(servicer: RegistryServicer) -> None:
    await register(servicer, agent())
    request = registry_service_pb2.UpdateAgentRequest(
        agent=agent(),
        update_mask=field_mask_pb2.FieldMask(paths=["name", "create_time", "colour", "max_concurrency"]),
    )
    with pytest.raises(InvalidArgument) as caught:
        await servicer.UpdateAgent(request, context_of(ADMIN))
    descriptions = " ".join(v.description for v in caught.value.violations)
    assert violated_fields(caught.value) == {"update_mask"}
    for path in ("'name'", "'create_time'", "'colour'"):
        assert path in descriptions
    assert "max_concurrency" not in descriptions


async def test_update_validates_only_the_masked_fields(servicer: RegistryServicer) -> None:
    await register(servicer, agent())
    change = agent_pb2.Agent(name="text-stats", max_concurrency=4)  # no endpoint: not in the mask
    response = await servicer.UpdateAgent(
        registry_service_pb2.UpdateAgentRequest(
            agent=change, update_mask=field_mask_pb2.FieldMask(paths=["max_concurrency"])
        ),
        context_of(ADMIN),
    )
    assert response.agent.max_concurrency == 4
    assert response.agent.endpoint == "127.0.0.1:50055"
    with pytest.raises(InvalidArgument) as caught:
        await servicer.UpdateAgent(
            registry_service_pb2.UpdateAgentRequest(
                agent=change, update_mask=field_mask_pb2.FieldMask(paths=["endpoint"])
            ),
            context_of(ADMIN),
        )
    assert violated_fields(caught.value) == {"agent.endpoint"}


async def test_get_and_delete_check_the_name(servicer: RegistryServicer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await servicer.GetAgent(registry_service_pb2.GetAgentRequest(name="NOPE!"), context_of(USER))
    assert violated_fields(caught.value) == {"name"}
    with pytest.raises(InvalidArgument) as caught:
        await servicer.DeleteAgent(registry_service_pb2.DeleteAgentRequest(name=""), context_of(ADMIN))
    assert violated_fields(caught.value) == {"name"}


async def test_paging_arguments_are_checked(servicer: RegistryServicer) -> None:
    for request in (
        registry_service_pb2.ListAgentsRequest(page_size=-1),
        registry_service_pb2.ListAgentsRequest(page_token="garbage!"),
    ):
        with pytest.raises(InvalidArgument):
            await servicer.ListAgents(request, context_of(USER))
