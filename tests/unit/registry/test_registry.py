"""The registry's rules: idempotent writes, field masks, pagination, deletion."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.common.auth import Role
from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.pagination import page_request
from services.registry.domain import AgentDefinition, Registry, RetryPolicy
from tests.unit.registry.conftest import ADMIN, SERVICE, USER, Clock, principal

DEFINITION = AgentDefinition(
    name="summarize",
    description="extractive summary",
    endpoint="127.0.0.1:50055",
    tools=("split_sentences",),
    input_schema={"type": "object"},
)


async def test_repeat_with_the_same_request_id_returns_the_first_answer(
    registry: Registry, clock: Clock
) -> None:
    first = await registry.register(ADMIN, DEFINITION, "req-1")
    clock.advance(5)
    await registry.update(
        ADMIN, "summarize", dataclasses.replace(DEFINITION, max_concurrency=2), ["max_concurrency"], ""
    )
    again = await registry.register(ADMIN, DEFINITION, "req-1")
    assert again == first  # the agent as the first call returned it
    assert (await registry.get(USER, "summarize")).definition.max_concurrency == 2


async def test_existing_name_is_already_exists_unless_identical(registry: Registry) -> None:
    stored = await registry.register(ADMIN, DEFINITION, "")
    # Identical once defaults are applied: a harmless repeat.
    explicit = dataclasses.replace(DEFINITION, max_concurrency=10, timeout=60.0)
    assert await registry.register(SERVICE, explicit, "") == stored
    with pytest.raises(AlreadyExists) as caught:
        await registry.register(ADMIN, dataclasses.replace(DEFINITION, description="other"), "req-2")
    assert caught.value.reason == "AGENT_ALREADY_EXISTS"


async def test_a_request_id_reused_for_another_request_is_refused(registry: Registry) -> None:
    await registry.register(ADMIN, DEFINITION, "req-1")
    other = dataclasses.replace(DEFINITION, name="other-agent")
    with pytest.raises(InvalidArgument) as caught:
        await registry.register(ADMIN, other, "req-1")
    assert caught.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(InvalidArgument):
        await registry.delete(ADMIN, "summarize", "req-1")


async def test_request_ids_belong_to_their_caller(registry: Registry) -> None:
    await registry.register(ADMIN, DEFINITION, "req-1")
    other_admin = principal(Role.ADMIN, "admin-2")
    created = await registry.register(
        other_admin, dataclasses.replace(DEFINITION, name="other-agent"), "req-1"
    )
    assert created.name == "other-agent"


async def test_request_ids_are_forgotten_after_the_retention(registry: Registry, clock: Clock) -> None:
    await registry.register(ADMIN, DEFINITION, "req-1")
    clock.advance(3601)
    created = await registry.register(ADMIN, dataclasses.replace(DEFINITION, name="later-agent"), "req-1")
    assert created.name == "later-agent"


async def test_concurrent_repeats_create_one_agent(registry: Registry) -> None:
    results = await asyncio.gather(*(registry.register(ADMIN, DEFINITION, "req-9") for _ in range(4)))
    assert all(result == results[0] for result in results)
    assert [a.name for a in (await registry.list(USER, page_request(0, "", default=10, maximum=10)))[0]] == [
        "summarize"
    ]


async def test_update_changes_only_masked_fields(registry: Registry, clock: Clock) -> None:
    created = await registry.register(ADMIN, DEFINITION, "")
    clock.advance(10)
    changes = AgentDefinition(name="summarize", max_concurrency=7, description="ignored")
    updated = await registry.update(ADMIN, "summarize", changes, ["max_concurrency"], "")
    assert updated.definition == dataclasses.replace(created.definition, max_concurrency=7)
    assert updated.create_time == created.create_time
    assert updated.update_time > created.update_time
    assert updated.revision == created.revision + 1
    assert await registry.get(USER, "summarize") == updated


async def test_retry_policy_parts_can_be_updated_alone(registry: Registry) -> None:
    await registry.register(
        ADMIN, dataclasses.replace(DEFINITION, retry_policy=RetryPolicy(non_retryable_reasons=("BAD",))), ""
    )
    changes = AgentDefinition(name="summarize", retry_policy=RetryPolicy(max_attempts=5))
    updated = await registry.update(ADMIN, "summarize", changes, ["retry_policy.max_attempts"], "")
    assert updated.definition.retry_policy == RetryPolicy(5, 1.0, 60.0, 2.0, ("BAD",))


async def test_an_empty_mask_replaces_every_mutable_field(registry: Registry) -> None:
    await registry.register(ADMIN, dataclasses.replace(DEFINITION, max_concurrency=3, labels={"a": "b"}), "")
    replacement = AgentDefinition(name="summarize", endpoint="10.0.0.2:7000")
    updated = await registry.update(ADMIN, "summarize", replacement, [], "")
    assert updated.definition == replacement.with_defaults()


async def test_update_checks_the_merged_backoffs(registry: Registry) -> None:
    await registry.register(ADMIN, DEFINITION, "")
    changes = AgentDefinition(name="summarize", retry_policy=RetryPolicy(initial_backoff=120.0))
    with pytest.raises(InvalidArgument) as caught:
        await registry.update(ADMIN, "summarize", changes, ["retry_policy.initial_backoff"], "")
    assert [v.field for v in caught.value.violations] == ["agent.retry_policy.max_backoff"]


async def test_an_update_that_changes_nothing_keeps_update_time(registry: Registry, clock: Clock) -> None:
    created = await registry.register(ADMIN, DEFINITION, "")
    clock.advance(10)
    same = await registry.update(ADMIN, "summarize", DEFINITION, ["description", "tools"], "")
    assert same == created


async def test_a_repeated_update_returns_the_first_answer(registry: Registry, clock: Clock) -> None:
    await registry.register(ADMIN, DEFINITION, "")
    changes = AgentDefinition(name="summarize", max_concurrency=4)
    first = await registry.update(ADMIN, "summarize", changes, ["max_concurrency"], "upd-1")
    clock.advance(1)
    await registry.update(
        ADMIN, "summarize", AgentDefinition(name="summarize", max_concurrency=9), ["max_concurrency"], ""
    )
    assert await registry.update(ADMIN, "summarize", changes, ["max_concurrency"], "upd-1") == first


async def test_updating_a_missing_agent_is_not_found(registry: Registry) -> None:
    with pytest.raises(NotFound) as caught:
        await registry.update(ADMIN, "ghost", AgentDefinition(name="ghost"), ["description"], "")
    assert caught.value.reason == "AGENT_NOT_FOUND"


async def test_delete_then_get_is_not_found_and_repeats_are_idempotent(registry: Registry) -> None:
    await registry.register(ADMIN, DEFINITION, "")
    await registry.delete(ADMIN, "summarize", "del-1")
    with pytest.raises(NotFound):
        await registry.get(USER, "summarize")
    await registry.delete(ADMIN, "summarize", "del-1")  # the same request again: same answer
    with pytest.raises(NotFound):
        await registry.delete(ADMIN, "summarize", "del-2")
    # The name is free again.
    assert (await registry.register(ADMIN, DEFINITION, "")).name == "summarize"


async def test_pages_walk_all_agents_in_name_order(registry: Registry) -> None:
    names = ["delta", "alpha", "echo", "charlie", "bravo"]
    for name in names:
        await registry.register(ADMIN, dataclasses.replace(DEFINITION, name=name), "")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        agents, token = await registry.list(USER, page_request(2, token, default=100, maximum=1000))
        seen += [agent.name for agent in agents]
        pages += 1
        if not token:
            break
    assert seen == sorted(names)
    assert pages == 3


async def test_page_size_is_capped_at_the_maximum(registry: Registry) -> None:
    for name in ("one-agent", "two-agent", "six-agent"):
        await registry.register(ADMIN, dataclasses.replace(DEFINITION, name=name), "")
    page = page_request(5000, "", default=100, maximum=2)
    agents, token = await registry.list(USER, page)
    assert len(agents) == 2 and token
