"""The client helper (`switchboard_client.events.EventSubscriber`) through real
processes: the events service is killed with SIGKILL in the middle of a stream
while a producer keeps publishing, and restarted; the helper hands over every
event of every run exactly once and in order, on the SQLite log and on Redis.
With Redis persisting to its append-only file (`appendfsync always`), Redis
itself is killed with SIGKILL too, and restarted from that file."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.events.v1 import events_service_pb2, events_service_pb2_grpc

from switchboard_client.events import CHANNEL_OPTIONS, EventSubscriber, Reconnect
from tests.harness.suite import Suite, free_port, start_suite
from tests.unit.events.backends import (
    RedisServer,
    drop_redis_prefix,
    own_redis_with_aof,
    redis_environment,
    redis_prefix,
    require_redis,
)
from tests.unit.events.streams import run_event

RUNS = 4
EVENTS_PER_RUN = 25
KILL_AFTER = 30  # events handled before the service is killed (of RUNS * EVENTS_PER_RUN)
GUARD_SECONDS = 120.0  # a hang fails the test instead of stalling it; nothing is timed


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def crash_suite(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Suite]:
    env: dict[str, str] = {"SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS": "1"}
    prefix = ""
    if request.param == "redis":
        prefix = redis_prefix()
        env.update(redis_environment(require_redis(), prefix))
    try:
        async with start_suite(tmp_path, services=("auth", "events"), env={"events": env}) as suite:
            yield suite
    finally:
        if prefix:
            await drop_redis_prefix(env["SWITCHBOARD_EVENTS_REDIS_URL"], prefix)


async def publish_through_outages(
    stub: Any, metadata: Sequence[tuple[str, str]], runs: Sequence[str], user_id: str
) -> None:
    """Round-robin over the runs, three events at a time, retrying what failed
    (publishing is idempotent), as the executor's relay does."""
    for start in range(1, EVENTS_PER_RUN + 1, 3):
        for run_id in runs:
            seqs = range(start, min(start + 3, EVENTS_PER_RUN + 1))
            request = events_service_pb2.PublishRequest(
                events=[run_event(run_id, user_id, s, EVENTS_PER_RUN) for s in seqs]
            )
            while True:
                try:
                    await stub.Publish(request, metadata=metadata, timeout=5)
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    await asyncio.sleep(0.1)
        await asyncio.sleep(0.01)


async def follow_through_a_crash(suite: Suite, crash: Callable[[], Awaitable[None]]) -> None:
    """A producer publishes RUNS runs while an EventSubscriber follows them;
    `crash` happens in the middle of handling an event. Every event of every
    run must come out exactly once, in order."""
    suffix = uuid.uuid4().hex[:6]
    user_id, token = await suite.create_user(f"fay-{suffix}")
    publisher = suite.metadata(await suite.login("svc-executor", suite.service_password("svc-executor")))
    runs = [f"fay-{suffix}-{n}" for n in range(RUNS)]
    received: dict[str, list[int]] = defaultdict(list)

    async with grpc.aio.insecure_channel(suite.address["events"], options=CHANNEL_OPTIONS) as channel:
        producer = asyncio.create_task(
            publish_through_outages(
                events_service_pb2_grpc.EventsServiceStub(channel), publisher, runs, user_id
            )
        )
        subscriber = EventSubscriber(
            suite.address["events"],
            token=token,
            consumer="app",
            max_in_flight=8,
            reconnect=Reconnect(initial_backoff=0.05, max_backoff=0.5),
            idle_timeout=10.0,
        )
        try:
            async with asyncio.timeout(GUARD_SECONDS), subscriber:
                async for event in subscriber:
                    received[event.run_id].append(event.seq)
                    handled = sum(len(seqs) for seqs in received.values())
                    if handled == KILL_AFTER:
                        # In the middle of handling: this event's ack cannot reach the service.
                        await crash()
                    if handled == RUNS * EVENTS_PER_RUN:
                        break
            await producer
        finally:
            producer.cancel()

    assert sorted(received) == sorted(runs)
    for run_id in runs:
        assert received[run_id] == list(range(1, EVENTS_PER_RUN + 1)), run_id
    assert subscriber.reconnects >= 1
    # The event being handled at the kill came again and was not handed over twice.
    assert subscriber.duplicates_skipped >= 1


async def test_every_event_exactly_once_in_order_across_a_kill_9(crash_suite: Suite) -> None:
    async def kill_events() -> None:
        crash_suite.kill("events")
        await crash_suite.start("events")

    await follow_through_a_crash(crash_suite, kill_events)


@pytest.fixture
async def aof_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis of this test's own, with AOF on: the shared one keeps nothing on disk."""
    async with own_redis_with_aof(tmp_path / "redis", free_port()) as server:
        yield server


@pytest.mark.redis
@pytest.mark.parametrize("killed", [("redis", "events"), ("redis",)], ids=["redis-and-events", "redis-alone"])
async def test_every_event_exactly_once_in_order_when_redis_with_aof_is_killed(
    tmp_path: Path, aof_redis: RedisServer, killed: tuple[str, ...]
) -> None:
    env = {
        "SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS": "1",
        **redis_environment(aof_redis.url, redis_prefix()),
    }
    async with start_suite(tmp_path / "suite", services=("auth", "events"), env={"events": env}) as suite:

        async def kill() -> None:
            # Neither is told: Redis loses whatever its AOF does not hold, the
            # events service everything in memory (live streams, ack deadlines).
            aof_redis.kill()
            if "events" in killed:
                suite.kill("events")
            await aof_redis.start()
            if "events" in killed:
                await suite.start("events")

        await follow_through_a_crash(suite, kill)
