"""The registry's storage on SQLite and PostgreSQL: the same behaviour on both."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.common.db import create_engine, migrate, sessionmaker
from services.registry.domain import (
    Agent,
    AgentDefinition,
    IdempotencyRecord,
    NameTaken,
    RequestIdTaken,
    RetryPolicy,
    RevisionConflict,
)
from services.registry.storage import AgentStorage

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "registry" / "migrations"
NOW = datetime(2030, 5, 17, 12, 30, 15, 123456, tzinfo=UTC)


def make_agent(name: str, **changes: object) -> Agent:
    definition = AgentDefinition(
        name=name,
        description="déjà vu — unicode survives",
        endpoint="worker.local:50055",
        tools=("word_count", "split_sentences"),
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 1.0}, "n": {"enum": [1.0, "two", None]}},
            "required": ["text"],
        },
        max_concurrency=4,
        timeout=30.5,
        heartbeat_timeout=2.25,
        retry_policy=RetryPolicy(5, 0.25, 8.0, 1.5, ("INVALID_INPUT", "NOT_FOUND")),
        labels={"team": "core", "tier": "gold"},
    )
    return Agent(dataclasses.replace(definition, **changes), create_time=NOW, update_time=NOW)  # type: ignore[arg-type]


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[AgentStorage]:
    await asyncio.to_thread(migrate, database_url, MIGRATIONS)
    engine = create_engine(database_url)
    yield AgentStorage(sessionmaker(engine))
    await engine.dispose()


async def test_an_agent_round_trips_exactly(storage: AgentStorage) -> None:
    agent = make_agent("text-stats")
    await storage.create(agent, None)
    stored = await storage.get("text-stats")
    assert stored == agent
    assert stored is not None and stored.create_time.tzinfo is not None
    assert await storage.get("missing") is None


async def test_a_taken_name_is_reported(storage: AgentStorage) -> None:
    await storage.create(make_agent("text-stats"), None)
    with pytest.raises(NameTaken):
        await storage.create(make_agent("text-stats", description="second"), None)
    stored = await storage.get("text-stats")
    assert stored is not None and stored.definition.description.startswith("déjà")


async def test_list_is_in_name_order_after_a_key(storage: AgentStorage) -> None:
    for name in ("charlie", "alpha", "bravo", "delta"):
        await storage.create(make_agent(name), None)
    assert [a.name for a in await storage.list(None, 3)] == ["alpha", "bravo", "charlie"]
    assert [a.name for a in await storage.list("bravo", 10)] == ["charlie", "delta"]


async def test_updates_are_conditional_on_the_revision(storage: AgentStorage) -> None:
    agent = make_agent("text-stats")
    await storage.create(agent, None)
    later = NOW + timedelta(seconds=3)
    updated = Agent(dataclasses.replace(agent.definition, max_concurrency=9), NOW, later, revision=2)
    await storage.update(updated, expected_revision=1, record=None)
    assert await storage.get("text-stats") == updated
    stale = Agent(dataclasses.replace(agent.definition, max_concurrency=1), NOW, later, revision=2)
    with pytest.raises(RevisionConflict):
        await storage.update(stale, expected_revision=1, record=None)
    with pytest.raises(RevisionConflict):
        await storage.update(make_agent("ghost"), expected_revision=1, record=None)
    assert await storage.get("text-stats") == updated


async def test_records_are_written_with_their_write_and_replayed(storage: AgentStorage) -> None:
    agent = make_agent("text-stats")
    record = IdempotencyRecord("admin-1", "req-1", "f" * 64, agent, NOW)
    await storage.create(agent, record)
    assert await storage.find_request("admin-1", "req-1") == record
    assert await storage.find_request("admin-2", "req-1") is None
    # A second write with the same request id fails whole: no second agent.
    with pytest.raises(RequestIdTaken):
        await storage.create(make_agent("other-agent"), record)
    assert await storage.get("other-agent") is None


async def test_a_failed_write_leaves_no_record(storage: AgentStorage) -> None:
    await storage.create(make_agent("text-stats"), None)
    record = IdempotencyRecord("admin-1", "req-2", "e" * 64, make_agent("text-stats"), NOW)
    with pytest.raises(NameTaken):
        await storage.create(make_agent("text-stats"), record)
    assert await storage.find_request("admin-1", "req-2") is None
    assert not await storage.delete("ghost", IdempotencyRecord("admin-1", "req-3", "d" * 64, None, NOW))
    assert await storage.find_request("admin-1", "req-3") is None


async def test_delete_records_its_request(storage: AgentStorage) -> None:
    await storage.create(make_agent("text-stats"), None)
    record = IdempotencyRecord("admin-1", "del-1", "c" * 64, None, NOW)
    assert await storage.delete("text-stats", record)
    assert await storage.get("text-stats") is None
    assert await storage.find_request("admin-1", "del-1") == record


async def test_purge_drops_only_older_records(storage: AgentStorage) -> None:
    old = IdempotencyRecord("admin-1", "old", "a" * 64, None, NOW - timedelta(days=2))
    await storage.create(make_agent("one-agent"), None)
    await storage.delete("one-agent", old)
    fresh_agent = make_agent("two-agent")
    fresh = IdempotencyRecord("admin-1", "fresh", "b" * 64, fresh_agent, NOW)
    await storage.create(fresh_agent, fresh)
    await storage.purge_requests(NOW - timedelta(days=1))
    assert await storage.find_request("admin-1", "old") is None
    assert await storage.find_request("admin-1", "fresh") == fresh
