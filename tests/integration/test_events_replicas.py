"""Two events processes on one Redis log serving the same users, through real
processes and generated stubs: a subscriber on one replica gets what is
published through the other at once (no polling), a durable consumer that
reconnects to the other replica resumes exactly where it left off, and the
newer of two connections of one consumer on different replicas wins."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc

from services.launcher import ServiceProcess, SuiteLayout, service_environment
from tests.harness.suite import Suite, free_port, start_suite
from tests.unit.events.backends import drop_redis_prefix, redis_environment, redis_prefix, require_redis
from tests.unit.events.streams import RawSubscription, publish_run

pytestmark = pytest.mark.redis
EVENTS_PER_RUN = 6


@dataclass
class Replicas:
    suite: Suite
    # The suite's events process, and a second one on the same Redis prefix.
    a: Any
    b: Any

    async def user(self, name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        user_id, token = await self.suite.create_user(f"{name}-{uuid.uuid4().hex[:6]}")
        return user_id, self.suite.metadata(token)

    async def publisher(self) -> tuple[tuple[str, str], ...]:
        token = await self.suite.login("svc-executor", self.suite.service_password("svc-executor"))
        return self.suite.metadata(token)


@pytest.fixture(scope="module")
async def replicas(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Replicas]:
    url, prefix = require_redis(), redis_prefix()
    root: Path = tmp_path_factory.mktemp("replicas")
    env = {**redis_environment(url, prefix), "SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS": "1"}
    log: IO[bytes] | None = None
    try:
        async with start_suite(root, services=("auth", "events"), env={"events": env}) as suite:
            layout = SuiteLayout(suite.layout.data_dir, ports={**suite.layout.ports, "events": free_port()})
            log = (root / "logs" / "events-b.log").open("ab")
            second = ServiceProcess(
                "events",
                layout.address("events"),
                service_environment(
                    "events", layout, suite.credentials, {**env, "SWITCHBOARD_EVENTS_LOG_LEVEL": "INFO"}
                ),
                log,
            )
            second.start()
            channel = grpc.aio.insecure_channel(layout.address("events"))
            try:
                await second.wait_serving()
                yield Replicas(
                    suite,
                    events_service_pb2_grpc.EventsServiceStub(suite.channel("events")),
                    events_service_pb2_grpc.EventsServiceStub(channel),
                )
            finally:
                await channel.close(grace=None)
                await second.stop()
    finally:
        if log is not None:
            log.close()
        await drop_redis_prefix(url, prefix)


async def test_a_subscriber_on_one_replica_gets_what_is_published_through_the_other(
    replicas: Replicas,
) -> None:
    (ann_id, ann), (ben_id, ben) = await asyncio.gather(replicas.user("ann"), replicas.user("ben"))
    publisher = await replicas.publisher()
    subscriptions = {
        user_id: RawSubscription(
            replicas.b,
            metadata,
            events_service_pb2.SubscriptionOpen(
                all_runs=True, start=events_service_pb2.StartPosition(new_only=True)
            ),
        )
        for user_id, metadata in ((ann_id, ann), (ben_id, ben))
    }
    try:
        for subscription in subscriptions.values():
            await subscription.next("opened")
        runs = {ann_id: f"ann-{uuid.uuid4().hex[:6]}", ben_id: f"ben-{uuid.uuid4().hex[:6]}"}
        await asyncio.gather(
            *(
                publish_run(replicas.a, publisher, run_id, user_id, EVENTS_PER_RUN)
                for user_id, run_id in runs.items()
            )
        )
        # Nothing polls: only the signal from replica A can bring these to B's streams.
        for user_id, subscription in subscriptions.items():
            got: list[event_pb2.Event] = []
            while len(got) < EVENTS_PER_RUN:
                batch = [d.event for d in (await subscription.next("events")).deliveries]
                subscription.ack([e.event_id for e in batch])
                got += batch
            assert {(e.user_id, e.run_id) for e in got} == {(user_id, runs[user_id])}
            assert [e.seq for e in got] == list(range(1, EVENTS_PER_RUN + 1))
    finally:
        for subscription in subscriptions.values():
            subscription.close()


async def test_a_durable_consumer_resumes_on_the_other_replica_exactly_where_it_left_off(
    replicas: Replicas,
) -> None:
    user_id, metadata = await replicas.user("cat")
    run_id = f"cat-{uuid.uuid4().hex[:6]}"
    await publish_run(replicas.a, await replicas.publisher(), run_id, user_id, EVENTS_PER_RUN)
    opening = events_service_pb2.SubscriptionOpen(run_id=run_id, consumer="inbox")

    on_a = RawSubscription(replicas.a, metadata, opening)
    try:
        batch = await on_a.next("events")
        assert [d.event.seq for d in batch.deliveries] == [1, 2, 3, 4, 5, 6]
        on_a.ack([f"{run_id}:5"], cumulative=[(run_id, 3)])
        outcomes = [r.outcome for r in (await on_a.next("ack_results")).results]
        assert outcomes == [events_service_pb2.ACK_OUTCOME_ACCEPTED] * 2
    finally:
        on_a.close()

    on_b = RawSubscription(replicas.b, metadata, opening)
    try:
        batch = await on_b.next("events")
        # Nothing acknowledged again, nothing unacknowledged skipped, attempts counted.
        assert [(d.event.seq, d.delivery_attempt) for d in batch.deliveries] == [(4, 2), (6, 2)]
        on_b.ack([d.event.event_id for d in batch.deliveries])
        assert (await on_b.next("run_completed")).last_seq == EVENTS_PER_RUN
    finally:
        on_b.close()

    # Back on replica A: the run is complete for this consumer and nothing is sent again.
    again = RawSubscription(replicas.a, metadata, opening)
    try:
        first = await again.read()
        assert first.WhichOneof("response") == "opened"
        following = [(await again.read()).WhichOneof("response") for _ in range(2)]
        assert following == ["run_completed", "heartbeat"]
    finally:
        again.close()
    status = await replicas.b.GetDeliveryStatus(
        events_service_pb2.GetDeliveryStatusRequest(run_id=run_id), metadata=metadata, timeout=10
    )
    [inbox] = status.consumers
    assert (inbox.delivered, inbox.acknowledged, inbox.pending, inbox.last_acked_seq) == (6, 6, 0, 6)


async def test_the_newer_connection_of_a_consumer_wins_across_replicas(replicas: Replicas) -> None:
    user_id, metadata = await replicas.user("dan")
    run_id = f"dan-{uuid.uuid4().hex[:6]}"
    await publish_run(replicas.a, await replicas.publisher(), run_id, user_id, EVENTS_PER_RUN)
    opening = events_service_pb2.SubscriptionOpen(run_id=run_id, consumer="inbox", max_in_flight=2)
    older = RawSubscription(replicas.a, metadata, opening)
    newer: RawSubscription | None = None
    try:
        assert [d.event.seq for d in (await older.next("events")).deliveries] == [1, 2]
        newer = RawSubscription(replicas.b, metadata, opening)
        assert [(d.event.seq, d.delivery_attempt) for d in (await newer.next("events")).deliveries] == [
            (1, 2),
            (2, 2),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await older.read()
        assert ended.value.code() == grpc.StatusCode.ABORTED
        assert "newer connection" in (ended.value.details() or "")
    finally:
        older.close()
        if newer is not None:
            newer.close()
