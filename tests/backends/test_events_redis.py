"""What only the Redis log has: claims that fence a durable consumer's writes,
writes without a claim that never undo progress, signals between replicas,
keys that cannot collide, a bounded connection pool that makes operations
wait rather than fail, and UNAVAILABLE when Redis cannot be reached."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from services.common.errors import Aborted, Unavailable
from services.events.domain import (
    ConsumerKey,
    ConsumerPosition,
    DeliveryRecord,
    DeliveryState,
    EventType,
    NewEvent,
)
from services.events.redis_log import RedisEventLog
from tests.unit.events.backends import drop_redis_prefix, redis_logs, redis_prefix, started

pytestmark = pytest.mark.redis
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
GUARD_SECONDS = 10.0  # a hang fails instead of stalling; nothing is timed
PENDING, ACKED, DEAD = DeliveryState.PENDING, DeliveryState.ACKNOWLEDGED, DeliveryState.DEAD_LETTERED


def event(run_id: str, seq: int, user_id: str = "user-a") -> NewEvent:
    return NewEvent(f"{run_id}-{seq}", run_id, user_id, seq, EventType.AGENT_THINKING, payload={"seq": seq})


@dataclass
class Heard:
    """A LogListener that writes down what it hears."""

    signals: asyncio.Queue[tuple[str, object]] = field(default_factory=asyncio.Queue)

    def runs_appended(self, user_id: str, run_ids: Collection[str]) -> None:
        self.signals.put_nowait(("appended", (user_id, tuple(sorted(run_ids)))))

    def consumer_claimed(self, key: ConsumerKey, generation: int) -> None:
        self.signals.put_nowait(("claimed", (key, generation)))

    def consumer_changed(self, key: ConsumerKey, run_ids: Collection[str]) -> None:
        self.signals.put_nowait(("changed", (key, tuple(sorted(run_ids)))))

    def signals_lost(self) -> None:
        self.signals.put_nowait(("lost", None))

    async def next(self) -> tuple[str, object]:
        return await asyncio.wait_for(self.signals.get(), GUARD_SECONDS)


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[RedisEventLog, RedisEventLog]]:
    async with redis_logs(redis_url, count=2) as (first, second):
        yield first, second


async def test_signals_reach_the_other_replicas_only(pair: tuple[RedisEventLog, RedisEventLog]) -> None:
    first, second = pair
    here, there = Heard(), Heard()
    first.add_listener(here)
    second.add_listener(there)
    await first.append([event("r1", 1), event("r2", 1), event("r3", 1, user_id="user-b")], NOW)
    assert {await there.next(), await there.next()} == {
        ("appended", ("user-a", ("r1", "r2"))),
        ("appended", ("user-b", ("r3",))),
    }
    assert await first.claim_consumer("user-a", "inbox", "subscription-1") == 1
    assert await there.next() == ("claimed", (("user-a", "inbox"), 1))
    # A write without a claim (an ack without a stream) tells the holder's replica.
    await first.save_consumer("user-a", "inbox", [], [DeliveryRecord("r1", 1, "r1-1", 1, ACKED)])
    assert await there.next() == ("changed", (("user-a", "inbox"), ("r1",)))
    # A holder's own writes signal nothing; the origin never hears itself.
    await first.save_consumer("user-a", "inbox", [ConsumerPosition("r1", 1, 1)], [], holder="subscription-1")
    await first.append([event("r5", 1)], NOW)
    assert await there.next() == ("appended", ("user-a", ("r5",)))  # in order: nothing came between
    await second.append([event("r4", 1)], NOW)
    assert await here.next() == ("appended", ("user-a", ("r4",)))
    assert there.signals.empty() and here.signals.empty()


async def test_a_claim_fences_every_earlier_holder(pair: tuple[RedisEventLog, RedisEventLog]) -> None:
    first, second = pair
    await first.append([event("r1", 1), event("r1", 2)], NOW)
    assert await first.claim_consumer("user-a", "inbox", "older") == 1
    await first.save_consumer(
        "user-a",
        "inbox",
        [ConsumerPosition("r1", 1, 0)],
        [DeliveryRecord("r1", 1, "r1-1", 1, PENDING)],
        "older",
    )
    assert await second.claim_consumer("user-a", "inbox", "newer") == 2
    with pytest.raises(Aborted) as refused:
        await first.save_consumer(
            "user-a",
            "inbox",
            [ConsumerPosition("r1", 1, 1)],
            [DeliveryRecord("r1", 1, "r1-1", 1, ACKED)],
            "older",
        )
    assert refused.value.reason == "CONSUMER_TAKEN_OVER"
    state = (await second.load_consumer("user-a", "inbox", None))["r1"]
    assert (state.position.acked_through, state.deliveries) == (
        0,
        (DeliveryRecord("r1", 1, "r1-1", 1, PENDING),),
    )
    # Claims are per user and consumer: another consumer is untouched.
    assert await second.claim_consumer("user-a", "audit", "newer") == 1


async def test_writes_never_undo_progress(pair: tuple[RedisEventLog, RedisEventLog]) -> None:
    log, _ = pair
    await log.append([event("r1", seq) for seq in range(1, 5)], NOW)
    await log.save_consumer(
        "user-a",
        "inbox",
        [ConsumerPosition("r1", 1, 2)],
        [
            DeliveryRecord("r1", 3, "r1-3", 2, ACKED),
            DeliveryRecord("r1", 4, "r1-4", 3, PENDING),
        ],
    )
    # A late writer with an older view: position 1, seq 3 pending again, seq 4 at attempt 1.
    await log.save_consumer(
        "user-a",
        "inbox",
        [ConsumerPosition("r1", 1, 1)],
        [
            DeliveryRecord("r1", 3, "r1-3", 3, PENDING),
            DeliveryRecord("r1", 4, "r1-4", 1, PENDING),
        ],
    )
    state = (await log.load_consumer("user-a", "inbox", ["r1"]))["r1"]
    assert state.position == ConsumerPosition("r1", 1, 2)
    assert state.deliveries == (
        DeliveryRecord("r1", 3, "r1-3", 2, ACKED),
        DeliveryRecord("r1", 4, "r1-4", 3, PENDING),
    )
    # Settling moves on; a dead letter stays one.
    await log.save_consumer("user-a", "inbox", [], [DeliveryRecord("r1", 4, "r1-4", 3, DEAD)])
    await log.save_consumer("user-a", "inbox", [], [DeliveryRecord("r1", 4, "r1-4", 3, ACKED)])
    found = await log.consumer_deliveries("user-a", "inbox", ["r1-4"])
    assert [r.state for r in found] == [DEAD]


async def test_users_and_runs_with_separators_in_their_ids_do_not_collide(
    pair: tuple[RedisEventLog, RedisEventLog],
) -> None:
    log, _ = pair
    # ("a", consumer "b", run "c:d") against ("a:b", consumer "c", run "d").
    await log.append([event("c:d", 1, user_id="a"), event("d", 1, user_id="a:b")], NOW)
    await log.save_consumer(
        "a", "b", [ConsumerPosition("c:d", 1, 1)], [DeliveryRecord("c:d", 1, "c:d-1", 1, ACKED)]
    )
    assert await log.load_consumer("a:b", "c", None) == {}
    assert await log.consumer_deliveries("a:b", "c", ["c:d-1", "d-1"]) == []
    assert [s.consumer for s in await log.delivery_status("a", "c:d")] == ["b"]
    assert await log.delivery_status("a:b", "d") == []


async def test_a_lost_signal_connection_is_reported_and_restored(redis_url: str) -> None:
    prefix, name = redis_prefix(), f"test-events-{uuid.uuid4().hex[:12]}"
    first = await started(RedisEventLog.from_url(redis_url, prefix))
    # Named, so that this test finds its own connection and no one else's.
    second = await started(RedisEventLog.from_url(redis_url, prefix, client_name=name))
    heard = Heard()
    second.add_listener(heard)
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        mine = [c["id"] for c in await admin.client_list() if c.get("name") == name and c.get("sub") != "0"]
        assert len(mine) == 1
        await admin.client_kill_filter(_id=mine[0])
        # Signals that may have been missed are reported, then the replica hears again.
        assert await heard.next() == ("lost", None)
        await asyncio.wait_for(second.listening(), GUARD_SECONDS)
        await first.append([event("r1", 1)], NOW)
        assert await heard.next() == ("appended", ("user-a", ("r1",)))
    finally:
        await admin.aclose()
        await first.close()
        await second.close()
        await drop_redis_prefix(redis_url, prefix)


async def test_an_unreachable_redis_is_unavailable() -> None:
    log = RedisEventLog.from_url("redis://127.0.0.1:1/0", "test:events:unreachable:")
    try:
        with pytest.raises(Unavailable) as raised:
            await log.append([event("r1", 1)], NOW)
        assert raised.value.reason == "EVENT_LOG_UNAVAILABLE" and raised.value.retry_after
        assert not await log.ready()
    finally:
        await log.close()


async def test_more_operations_than_connections_wait_for_one(redis_url: str) -> None:
    # A busy process (many subscriptions stepping at once) must queue for the
    # pool, not answer UNAVAILABLE while Redis is there.
    prefix = redis_prefix()
    log = RedisEventLog.from_url(redis_url, prefix, max_connections=3)
    try:
        await log.append([event("r1", 1), event("r1", 2)], NOW)
        answers = await asyncio.wait_for(
            asyncio.gather(*(log.read("r1", 0, 10) for _ in range(50))), GUARD_SECONDS
        )
        assert [[e.seq for e in events] for events in answers] == [[1, 2]] * 50
    finally:
        await log.close()
        await drop_redis_prefix(redis_url, prefix)
