"""`switchboard.registry.v1.RegistryService`: request validation and proto <-> domain.

Idempotency, as the registry implements it:
- Writes (RegisterAgent, UpdateAgent, DeleteAgent) take an optional `request_id`
  (at most 128 characters), scoped to the caller: a repeat of the same request
  by the same principal with the same `request_id` returns the first answer
  (the agent as it was then, or OK for a delete), even if the agent changed or
  was deleted since. The same `request_id` with a different request is
  INVALID_ARGUMENT (reason REQUEST_ID_REUSED). Request ids are remembered for
  `SWITCHBOARD_REGISTRY_IDEMPOTENCY_RETENTION_SECONDS` (24 h by default).
- RegisterAgent of a name that exists is ALREADY_EXISTS (reason
  AGENT_ALREADY_EXISTS), except when the stored definition is identical to the
  requested one once defaults are applied: then it is a harmless repeat and
  returns the stored agent, with or without a `request_id`.
- UpdateAgent takes a FieldMask. Updatable paths: description, endpoint, tools,
  input_schema, max_concurrency, timeout, heartbeat_timeout, retry_policy,
  retry_policy.<field>, labels. `name`, `create_time` and `update_time` are
  immutable; naming them or an unknown path is INVALID_ARGUMENT naming each.
  An empty mask (or `*`) replaces every mutable field. A field set to 0 or left
  empty takes its documented default, so a stored agent always carries explicit
  values. An update that changes nothing leaves `update_time` as it was.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2, field_mask_pb2, json_format
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from services.common.convert import duration, seconds, struct, timestamp
from services.common.errors import FieldViolation, Violations
from services.common.interceptors import principal_of
from services.common.pagination import page_request
from services.registry.domain import (
    IMMUTABLE_FIELDS,
    LIST_DEFAULT_PAGE_SIZE,
    LIST_MAX_PAGE_SIZE,
    MAX_REQUEST_ID_CHARS,
    MUTABLE_FIELDS,
    NAME_PATTERN,
    UPDATABLE_PATHS,
    Agent,
    AgentDefinition,
    Registry,
    RetryPolicy,
    definition_violations,
)

SERVICE_NAME = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
ALL_FIELDS = ("name", *MUTABLE_FIELDS)


def _seconds(value: duration_pb2.Duration) -> float:
    # A Duration whose seconds and nanos disagree in sign is malformed: treat it as negative.
    if value.seconds < 0 or value.nanos < 0:
        return min(-abs(seconds(value)), -1e-9)
    return seconds(value)


def definition_from_proto(agent: agent_pb2.Agent) -> AgentDefinition:
    policy = agent.retry_policy
    return AgentDefinition(
        name=agent.name,
        description=agent.description,
        endpoint=agent.endpoint,
        tools=tuple(agent.tools),
        input_schema=json_format.MessageToDict(agent.input_schema),
        max_concurrency=agent.max_concurrency,
        timeout=_seconds(agent.timeout),
        heartbeat_timeout=_seconds(agent.heartbeat_timeout),
        retry_policy=RetryPolicy(
            max_attempts=policy.max_attempts,
            initial_backoff=_seconds(policy.initial_backoff),
            max_backoff=_seconds(policy.max_backoff),
            backoff_multiplier=policy.backoff_multiplier,
            non_retryable_reasons=tuple(policy.non_retryable_reasons),
        ),
        labels=dict(agent.labels),
    )


def agent_to_proto(agent: Agent) -> agent_pb2.Agent:
    definition = agent.definition
    policy = definition.retry_policy
    return agent_pb2.Agent(
        name=definition.name,
        description=definition.description,
        endpoint=definition.endpoint,
        tools=definition.tools,
        input_schema=struct(dict(definition.input_schema)),
        max_concurrency=definition.max_concurrency,
        timeout=duration(definition.timeout),
        heartbeat_timeout=duration(definition.heartbeat_timeout),
        retry_policy=agent_pb2.RetryPolicy(
            max_attempts=policy.max_attempts,
            initial_backoff=duration(policy.initial_backoff),
            max_backoff=duration(policy.max_backoff),
            backoff_multiplier=policy.backoff_multiplier,
            non_retryable_reasons=policy.non_retryable_reasons,
        ),
        labels=dict(definition.labels),
        create_time=timestamp(agent.create_time),
        update_time=timestamp(agent.update_time),
    )


def _check_name(violations: Violations, path: str, name: str) -> None:
    if not name:
        violations.add(path, "is required")
    elif not NAME_PATTERN.match(name):
        violations.add(path, "must match ^[a-z][a-z0-9-]{1,62}$")


def _check_request_id(violations: Violations, request_id: str) -> None:
    violations.check(
        len(request_id) <= MAX_REQUEST_ID_CHARS,
        "request_id",
        f"must be at most {MAX_REQUEST_ID_CHARS} characters",
    )


def _add_all(violations: Violations, found: list[FieldViolation], prefix: str) -> None:
    for violation in found:
        violations.add(prefix + violation.field, violation.description)


def mask_paths(mask: field_mask_pb2.FieldMask, violations: Violations) -> list[str]:
    """The mask's paths, each checked; empty or `*` means every mutable field."""
    paths = list(dict.fromkeys(mask.paths))
    if not paths or paths == ["*"]:
        return list(MUTABLE_FIELDS)
    for path in paths:
        if path in IMMUTABLE_FIELDS:
            violations.add("update_mask", f"{path!r} cannot be changed")
        elif path not in UPDATABLE_PATHS:
            violations.add("update_mask", f"{path!r} is not a field of Agent that can be updated")
    return paths


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def RegisterAgent(
        self, request: registry_service_pb2.RegisterAgentRequest, context: Any
    ) -> registry_service_pb2.RegisterAgentResponse:
        caller = principal_of(context)
        self._registry.check_writer(caller)  # before validation: outsiders learn nothing
        violations = Violations()
        if not request.HasField("agent"):
            violations.add("agent", "is required")
        definition = definition_from_proto(request.agent)
        if request.HasField("agent"):
            _check_name(violations, "agent.name", definition.name)
            _add_all(violations, definition_violations(definition, MUTABLE_FIELDS), "agent.")
        _check_request_id(violations, request.request_id)
        violations.raise_if_any()
        agent = await self._registry.register(caller, definition, request.request_id)
        return registry_service_pb2.RegisterAgentResponse(agent=agent_to_proto(agent))

    async def GetAgent(
        self, request: registry_service_pb2.GetAgentRequest, context: Any
    ) -> registry_service_pb2.GetAgentResponse:
        caller = principal_of(context)
        violations = Violations()
        _check_name(violations, "name", request.name)
        violations.raise_if_any()
        agent = await self._registry.get(caller, request.name)
        return registry_service_pb2.GetAgentResponse(agent=agent_to_proto(agent))

    async def ListAgents(
        self, request: registry_service_pb2.ListAgentsRequest, context: Any
    ) -> registry_service_pb2.ListAgentsResponse:
        caller = principal_of(context)
        page = page_request(
            request.page_size, request.page_token, default=LIST_DEFAULT_PAGE_SIZE, maximum=LIST_MAX_PAGE_SIZE
        )
        agents, next_token = await self._registry.list(caller, page)
        return registry_service_pb2.ListAgentsResponse(
            agents=[agent_to_proto(agent) for agent in agents], next_page_token=next_token
        )

    async def UpdateAgent(
        self, request: registry_service_pb2.UpdateAgentRequest, context: Any
    ) -> registry_service_pb2.UpdateAgentResponse:
        caller = principal_of(context)
        self._registry.check_writer(caller)
        violations = Violations()
        definition = definition_from_proto(request.agent)
        _check_name(violations, "agent.name", definition.name)
        paths = mask_paths(request.update_mask, violations)
        _add_all(violations, definition_violations(definition, set(paths) & UPDATABLE_PATHS), "agent.")
        _check_request_id(violations, request.request_id)
        violations.raise_if_any()
        agent = await self._registry.update(caller, definition.name, definition, paths, request.request_id)
        return registry_service_pb2.UpdateAgentResponse(agent=agent_to_proto(agent))

    async def DeleteAgent(
        self, request: registry_service_pb2.DeleteAgentRequest, context: Any
    ) -> registry_service_pb2.DeleteAgentResponse:
        caller = principal_of(context)
        self._registry.check_writer(caller)
        violations = Violations()
        _check_name(violations, "name", request.name)
        _check_request_id(violations, request.request_id)
        violations.raise_if_any()
        await self._registry.delete(caller, request.name, request.request_id)
        return registry_service_pb2.DeleteAgentResponse()
