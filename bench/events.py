"""Event delivery: events/s published, delivered through Subscribe and
acknowledged, for one subscriber and for many (each following one run of its
own user), producer and consumers together like the Redis Streams baseline.

Each subscribed run gets its first event before the clock starts (so that the
run exists and is the user's), and its subscription opens after it. Then, timed:
the publisher (the executor's service account, as the outbox relay does) sends
the runs' next events in Publish batches of 100, in seq order per run and
round-robin across runs, one batch at a time; each subscriber acknowledges
every batch it receives cumulatively ("this run through seq N"). The clock
stops when the acknowledgement of every run's last event has been ACCEPTED.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc

from bench.backends import BenchSuite, BenchUser
from bench.load import Throughput
from bench.streams import Subscription, close_all
from tests.harness.clients import struct
from tests.harness.suite import metadata

PUBLISH_BATCH = 100
MAX_IN_FLIGHT = 1000
PATIENCE_SECONDS = 300.0


def bench_event(run_id: str, user_id: str, seq: int) -> event_pb2.Event:
    return event_pb2.Event(
        event_id=str(uuid.uuid4()),
        run_id=run_id,
        user_id=user_id,
        seq=seq,
        type=event_pb2.EVENT_TYPE_AGENT_THINKING,
        agent="bench",
        payload=struct({"n": seq}),
    )


class RunWatch:
    """One subscribed run: done once its last seq is acknowledged."""

    def __init__(self, run_id: str, last_seq: int) -> None:
        self.run_id = run_id
        self.last_seq = last_seq
        self.delivered = 0
        self.done = asyncio.Event()

    def on_batch(self, deliveries: Sequence[events_service_pb2.Delivery], arrived: float) -> None:
        self.delivered += len(deliveries)

    def on_ack_results(self, results: Sequence[events_service_pb2.AckResult]) -> None:
        for result in results:
            if result.outcome != events_service_pb2.ACK_OUTCOME_ACCEPTED:
                raise RuntimeError(f"acknowledgement not accepted: {result}")
            if result.cumulative.run_id == self.run_id and result.cumulative.through_seq >= self.last_seq:
                self.done.set()


async def delivery_benchmark(bench: BenchSuite, subscribers: int, events_per_subscriber: int) -> Throughput:
    """Events/s of `subscribers` runs x `events_per_subscriber` events, each run
    with its own subscriber (of its own user while there are users enough)."""
    if not bench.users:
        raise ValueError("the delivery benchmark needs bench users")
    events: Any = events_service_pb2_grpc.EventsServiceStub(bench.suite.channel("events"))
    service = metadata(bench.service_token)
    owners: list[BenchUser] = [bench.users[i % len(bench.users)] for i in range(subscribers)]
    run_ids = [f"bench-{uuid.uuid4().hex}" for _ in range(subscribers)]
    last_seq = events_per_subscriber + 1  # seq 1 is published before the clock starts

    async def publish(batch: list[event_pb2.Event]) -> None:
        await events.Publish(events_service_pb2.PublishRequest(events=batch), metadata=service, timeout=60)

    firsts = [bench_event(run_id, owner.user_id, 1) for run_id, owner in zip(run_ids, owners, strict=True)]
    for start in range(0, len(firsts), PUBLISH_BATCH):
        await publish(firsts[start : start + PUBLISH_BATCH])

    watches = [RunWatch(run_id, last_seq) for run_id in run_ids]
    subscriptions = [
        Subscription(
            bench.suite.channel("events"),
            owner.token,
            events_service_pb2.SubscriptionOpen(
                run_id=run_id,
                start=events_service_pb2.StartPosition(after_seq=1),
                max_in_flight=MAX_IN_FLIGHT,
            ),
            on_batch=watch.on_batch,
            on_ack_results=watch.on_ack_results,
            cumulative_acks=True,
        )
        for run_id, owner, watch in zip(run_ids, owners, watches, strict=True)
    ]
    try:
        await asyncio.gather(*(subscription.open() for subscription in subscriptions))
        # Built before the clock starts: the figure is the service's, not the client's.
        timed = [
            bench_event(run_id, owner.user_id, seq)
            for seq in range(2, last_seq + 1)
            for run_id, owner in zip(run_ids, owners, strict=True)
        ]
        started = time.perf_counter()
        for start in range(0, len(timed), PUBLISH_BATCH):
            await publish(timed[start : start + PUBLISH_BATCH])
        try:
            async with asyncio.timeout(PATIENCE_SECONDS):
                await asyncio.gather(*(watch.done.wait() for watch in watches))
        except TimeoutError:
            failures = [repr(f) for s in subscriptions if (f := s.failure()) is not None]
            behind = sum(1 for watch in watches if not watch.done.is_set())
            raise RuntimeError(
                f"{behind} subscribers never got their acks accepted; {failures[:3]}"
            ) from None
        elapsed = time.perf_counter() - started
    finally:
        await close_all(subscriptions)
    return Throughput(len(timed), elapsed)
