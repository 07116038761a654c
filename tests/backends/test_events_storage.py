"""The events service's log on every backend (SQLite, PostgreSQL, Redis): atomic
appends under concurrency, consumer positions and delivery records, the same
assertions on each; and the SQL log's migrations."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.common.db import create_engine, migrate
from services.common.errors import AlreadyExists, FailedPrecondition
from services.events.__main__ import MIGRATIONS
from services.events.domain import (
    ConsumerPosition,
    DeliveryRecord,
    DeliveryState,
    EventLog,
    EventType,
    NewEvent,
)
from services.events.redis_log import RedisEventLog
from services.events.storage import SqlEventLog
from tests.unit.events.backends import BACKENDS, open_event_log

NOW = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def event(run_id: str, seq: int, user_id: str = "user-a", **fields: object) -> NewEvent:
    return NewEvent(
        event_id=str(fields.pop("event_id", f"{run_id}-{seq}")),
        run_id=run_id,
        user_id=user_id,
        seq=seq,
        type=int(fields.pop("type", EventType.AGENT_THINKING)),  # type: ignore[call-overload]
        payload={"seq": seq, "nested": {"list": [1, 2.5, "x", None, True]}},
        **fields,  # type: ignore[arg-type]
    )


async def new_log(url: str) -> SqlEventLog:
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    return SqlEventLog(create_engine(url))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def log(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventLog]:
    async with open_event_log(backend, request, tmp_path) as opened:
        yield opened


@pytest.fixture
async def sql_log(database_url: str) -> AsyncIterator[SqlEventLog]:
    store = await new_log(database_url)
    yield store
    await store._engine.dispose()


async def test_migrations_are_idempotent(database_url: str, sql_log: EventLog) -> None:
    await asyncio.to_thread(migrate, database_url, MIGRATIONS)  # already at head: a no-op
    await sql_log.append([event("r1", 1)], NOW)
    assert (await sql_log.runs(["r1"]))["r1"].last_seq == 1


async def test_events_round_trip(log: EventLog) -> None:
    created = datetime(2026, 2, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    plan = await log.append(
        [
            event(
                "r1", 1, step_id="s", agent="a", create_time=created, traceparent="00-tp", tracestate="k=v"
            ),
            event("r1", 2, type=EventType.RUN_COMPLETED),
        ],
        NOW,
    )
    first, second = await log.read("r1", 0, 10)
    assert first == plan.events[0]
    assert first.create_time == created and first.create_time.utcoffset() == timedelta(0)
    assert second.create_time == NOW
    assert first.payload == {"seq": 1, "nested": {"list": [1, 2.5, "x", None, True]}}
    assert (await log.events_by_id(["r1-2", "nope"])).keys() == {"r1-2"}
    run = (await log.runs(["r1", "nope"]))["r1"]
    assert (run.user_id, run.last_seq, run.completed_seq) == ("user-a", 2, 2)
    assert [e.seq for e in await log.read("r1", 1, 1)] == [2]


async def test_runs_of_a_user_oldest_first(log: EventLog) -> None:
    await log.append([event("late", 1)], NOW + timedelta(seconds=5))
    await log.append([event("early", 1)], NOW)
    await log.append([event("other", 1, user_id="user-b")], NOW)
    assert [r.run_id for r in await log.runs_of_user("user-a")] == ["early", "late"]


async def test_a_refused_batch_leaves_nothing_behind(log: EventLog) -> None:
    await log.append([event("r1", 1)], NOW)
    with pytest.raises(FailedPrecondition):
        await log.append([event("r2", 1), event("r1", 2), event("r1", 9)], NOW)
    with pytest.raises(AlreadyExists):
        await log.append([event("r3", 1), event("r1", 1, step_id="changed")], NOW)
    assert (await log.runs(["r1", "r2", "r3"])).keys() == {"r1"}
    assert [e.seq for e in await log.read("r1", 0, 10)] == [1]


async def test_concurrent_appends_keep_each_run_gapless(log: EventLog) -> None:
    async def producer(run_id: str) -> None:
        for seq in range(1, 11):
            await log.append([event(run_id, seq)], NOW)

    async def repeater() -> None:
        for _ in range(10):
            await log.append([event("a", 1)], NOW)

    await log.append([event("a", 1)], NOW)
    await asyncio.gather(producer("b"), producer("c"), repeater())
    for run_id in ("b", "c"):
        assert [e.seq for e in await log.read(run_id, 0, 100)] == list(range(1, 11))


@contextlib.asynccontextmanager
async def second_writer(log: EventLog, request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    """Another process's view of the same storage."""
    if isinstance(log, RedisEventLog):
        other_redis = RedisEventLog.from_url(request.getfixturevalue("redis_url"), log.keys.prefix)
        try:
            yield other_redis
        finally:
            await other_redis.close()
        return
    other_sql = SqlEventLog(create_engine(request.getfixturevalue("postgres_url")))
    try:
        yield other_sql
    finally:
        await other_sql._engine.dispose()


async def test_two_writers_racing_on_one_store(
    backend: str, log: EventLog, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        pytest.skip("an embedded SQLite log has a single writer process")
    async with second_writer(log, request) as other:
        for attempt in range(5):
            run_id = f"shared-{attempt}"
            batch = [event(run_id, seq) for seq in range(1, 6)]
            results = await asyncio.gather(log.append(batch, NOW), other.append(batch, NOW))
            flags = sorted(all(r.duplicate for r in plan.results) for plan in results)
            assert flags == [False, True]  # one stored it, the other saw a repeat
            assert [e.seq for e in await log.read(run_id, 0, 100)] == [1, 2, 3, 4, 5]


async def test_consumer_positions_and_deliveries(log: EventLog) -> None:
    await log.append([event("r1", seq) for seq in range(1, 5)], NOW)
    await log.append([event("r2", 1)], NOW)
    pending = DeliveryState.PENDING
    await log.save_consumer(
        "user-a",
        "inbox",
        [ConsumerPosition("r1", 7, 1), ConsumerPosition("r2", 7, 0)],
        [
            DeliveryRecord("r1", 1, "r1-1", 1, DeliveryState.ACKNOWLEDGED),
            DeliveryRecord("r1", 2, "r1-2", 1, pending),
            DeliveryRecord("r1", 3, "r1-3", 1, pending),
            DeliveryRecord("r2", 1, "r2-1", 1, pending),
        ],
    )
    # Upserts: a later save changes state and attempts, and moves the position.
    await log.save_consumer(
        "user-a",
        "inbox",
        [ConsumerPosition("r1", 7, 2)],
        [
            DeliveryRecord("r1", 2, "r1-2", 2, DeliveryState.ACKNOWLEDGED),
            DeliveryRecord("r1", 3, "r1-3", 3, DeliveryState.DEAD_LETTERED),
        ],
    )
    everything = await log.load_consumer("user-a", "inbox", None)
    assert everything.keys() == {"r1", "r2"}
    assert everything["r1"].position == ConsumerPosition("r1", 7, 2)
    assert everything["r1"].deliveries == (DeliveryRecord("r1", 3, "r1-3", 3, DeliveryState.DEAD_LETTERED),)
    assert (await log.load_consumer("user-a", "inbox", ["r2"])).keys() == {"r2"}
    assert await log.load_consumer("user-b", "inbox", None) == {}
    assert await log.load_consumer("user-a", "other", None) == {}

    found = await log.consumer_deliveries("user-a", "inbox", ["r1-1", "r2-1", "missing"])
    assert sorted((r.event_id, r.state) for r in found) == [
        ("r1-1", DeliveryState.ACKNOWLEDGED),
        ("r2-1", pending),
    ]
    assert await log.consumer_deliveries("user-b", "inbox", ["r1-1"]) == []

    await log.save_consumer("user-a", "audit", [ConsumerPosition("r1", 7, 0)], [])
    statuses = await log.delivery_status("user-a", "r1")
    assert [
        (s.consumer, s.delivered, s.acknowledged, s.pending, s.dead_lettered, s.last_acked_seq)
        for s in statuses
    ] == [
        ("audit", 0, 0, 0, 0, 0),
        ("inbox", 3, 2, 0, 1, 2),
    ]
    assert await log.delivery_status("user-b", "r1") == []


async def test_the_migration_matches_the_tables(database_url: str, sql_log: EventLog) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine as create_sync_engine
    from sqlalchemy.engine import make_url

    from services.events.storage import metadata

    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")

    def differences() -> list[object]:
        engine = create_sync_engine(url)
        try:
            with engine.connect() as connection:
                return list(compare_metadata(MigrationContext.configure(connection), metadata))
        finally:
            engine.dispose()

    assert await asyncio.to_thread(differences) == []
