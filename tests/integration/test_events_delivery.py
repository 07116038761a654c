"""Delivery rules of a real events process (`python -m services.events`, next
to the real auth service), through generated stubs only, on the SQLite log and
on Redis: flow control by `max_in_flight` for a consumer that never
acknowledges (without holding up other consumers or users), redelivery after
the ack deadline, nack with a delay, the dead-letter marker after the maximum
attempts, stale and unknown acks, a resume at another epoch, and a resume from
before the retention window.

Waits are on outcomes (a heartbeat says the stream was idle: nothing was due);
the only clock checks are lower bounds (a redelivery never comes early), which
load cannot break."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc

from tests.harness.suite import Suite, start_suite
from tests.unit.events.backends import drop_redis_prefix, redis_environment, redis_prefix, require_redis
from tests.unit.events.streams import RawSubscription, error_info, publish_run, run_event

Metadata = tuple[tuple[str, str], ...]
Response = events_service_pb2.SubscribeResponse
MAX_DELIVERY_ATTEMPTS = 3
# Retention trims only events created over an hour ago: the out-of-window test
# publishes such events on purpose, every other test's events stay.
RETENTION_MAX_AGE = timedelta(hours=1)
LONG_DEADLINE_SECONDS = 600  # the longest ack deadline: nothing is redelivered by it here
GUARD_SECONDS = 60.0  # a hang fails the test instead of stalling it; nothing is timed

ACCEPTED = events_service_pb2.ACK_OUTCOME_ACCEPTED
STALE = events_service_pb2.ACK_OUTCOME_STALE
UNKNOWN = events_service_pb2.ACK_OUTCOME_UNKNOWN


@dataclass
class Events:
    suite: Suite
    stub: Any
    publisher: Metadata

    async def user(self, name: str) -> tuple[str, Metadata]:
        user_id, token = await self.suite.create_user(f"{name}-{uuid.uuid4().hex[:6]}")
        return user_id, self.suite.metadata(token)

    async def publish_run(self, user_id: str, run_id: str, events: int) -> str:
        """A whole run of `events` events, its RUN_COMPLETED last."""
        await publish_run(self.stub, self.publisher, run_id, user_id, events)
        return run_id

    def subscribe(self, metadata: Metadata, **opening: Any) -> RawSubscription:
        deadline = opening.pop("ack_deadline", None)
        message = events_service_pb2.SubscriptionOpen(**opening)
        if deadline is not None:
            message.ack_deadline.FromNanoseconds(int(deadline * 1e9))
        return RawSubscription(self.stub, metadata, message)

    async def status(self, metadata: Metadata, run_id: str) -> dict[str, tuple[int, int, int, int, int]]:
        """Per consumer: delivered, acknowledged, pending, dead-lettered, last acknowledged seq."""
        response = await self.stub.GetDeliveryStatus(
            events_service_pb2.GetDeliveryStatusRequest(run_id=run_id), metadata=metadata, timeout=10
        )
        return {
            c.consumer: (c.delivered, c.acknowledged, c.pending, c.dead_lettered, c.last_acked_seq)
            for c in response.consumers
        }

    async def epoch(self, metadata: Metadata, run_id: str) -> int:
        """The run's epoch, as a heartbeat tells it (whether or not its events are still kept)."""
        watcher = self.subscribe(
            metadata, run_id=run_id, start=events_service_pb2.StartPosition(new_only=True)
        )
        try:
            [position] = (await watcher.next("heartbeat")).positions
        finally:
            watcher.close()
        assert position.run_id == run_id
        return int(position.epoch)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def events(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Events]:
    """Auth and events as processes, with the events log on SQLite or on Redis."""
    root: Path = tmp_path_factory.mktemp("delivery")
    env = {
        "SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS": "0.5",
        "SWITCHBOARD_EVENTS_MAX_DELIVERY_ATTEMPTS": str(MAX_DELIVERY_ATTEMPTS),
        "SWITCHBOARD_EVENTS_RETENTION_MAX_AGE_SECONDS": str(RETENTION_MAX_AGE.total_seconds()),
        "SWITCHBOARD_EVENTS_RETENTION_INTERVAL_SECONDS": "0.5",
    }
    prefix = ""
    if request.param == "redis":
        prefix = redis_prefix()
        env.update(redis_environment(require_redis(), prefix))
    try:
        async with start_suite(root, services=("auth", "events"), env={"events": env}) as suite:
            publisher = suite.metadata(await suite.login("svc-executor", suite.service_password("executor")))
            yield Events(suite, events_service_pb2_grpc.EventsServiceStub(suite.channel("events")), publisher)
    finally:
        if prefix:
            await drop_redis_prefix(env["SWITCHBOARD_EVENTS_REDIS_URL"], prefix)


def new_run_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def event_ids(batch: events_service_pb2.EventBatch) -> list[str]:
    return [d.event.event_id for d in batch.deliveries]


def positions(batch: events_service_pb2.EventBatch) -> list[tuple[str, int, int]]:
    """(run, seq, delivery attempt) of each delivery of an event."""
    return [(d.event.run_id, d.event.seq, d.delivery_attempt) for d in batch.deliveries]


async def outcomes_of(subscription: RawSubscription) -> list[int]:
    return [r.outcome for r in (await subscription.next("ack_results")).results]


async def read_until(
    subscription: RawSubscription, enough: Callable[[list[Response]], bool]
) -> list[Response]:
    """Responses but heartbeats, in order, until `enough` says so: for answers
    whose order against each other a loaded machine may change."""
    responses: list[Response] = []
    while not enough(responses):
        response = await subscription.read()
        if response.WhichOneof("response") != "heartbeat":
            responses.append(response)
    return responses


def answered(responses: Sequence[Response]) -> list[list[int]]:
    """The outcomes of each ack_results among `responses`."""
    return [
        [r.outcome for r in response.ack_results.results]
        for response in responses
        if response.WhichOneof("response") == "ack_results"
    ]


def delivered(responses: Sequence[Response]) -> list[tuple[str, int, int]]:
    return [
        position
        for response in responses
        if response.WhichOneof("response") == "events"
        for position in positions(response.events)
    ]


async def until_idle(subscription: RawSubscription, heartbeats: int = 2) -> list[Response]:
    """Everything but heartbeats, read until `heartbeats` heartbeats came: a
    heartbeat is sent only on a stream that had nothing to send for a while."""
    others = []
    while heartbeats:
        response = await subscription.read()
        if response.WhichOneof("response") == "heartbeat":
            heartbeats -= 1
        else:
            others.append(response)
    return others


async def follow(subscription: RawSubscription, runs: Sequence[str]) -> dict[str, list[int]]:
    """Acknowledges every batch as it comes until each of `runs` completed;
    returns the seqs received per run."""
    received: dict[str, list[int]] = {}
    completed: set[str] = set()
    while not completed >= set(runs):
        response = await subscription.read()
        kind = response.WhichOneof("response")
        if kind == "events":
            for delivery in response.events.deliveries:
                received.setdefault(delivery.event.run_id, []).append(delivery.event.seq)
            subscription.ack(event_ids(response.events))
        elif kind == "ack_results":
            assert {r.outcome for r in response.ack_results.results} == {ACCEPTED}
        elif kind == "run_completed":
            completed.add(response.run_completed.run_id)
        else:
            assert kind in ("opened", "heartbeat"), response
    return received


async def test_a_consumer_that_never_acknowledges_holds_at_most_max_in_flight(events: Events) -> None:
    (ann_id, ann), (ben_id, ben) = await asyncio.gather(events.user("ann"), events.user("ben"))
    first = await events.publish_run(ann_id, new_run_id("ann"), 12)
    second = await events.publish_run(ann_id, new_run_id("ann"), 12)
    bens = await events.publish_run(ben_id, new_run_id("ben"), 12)
    third = new_run_id("ann")

    stuck = events.subscribe(
        ann, all_runs=True, consumer="stuck", max_in_flight=3, ack_deadline=LONG_DEADLINE_SECONDS
    )
    fast = events.subscribe(ann, all_runs=True, consumer="fast", max_in_flight=3)
    # Consumer names are per user: Ben's "stuck" is another consumer, and acknowledges.
    other_user = events.subscribe(ben, all_runs=True, consumer="stuck", max_in_flight=3)
    try:
        held = await stuck.next("events")
        assert positions(held) == [(first, 1, 1), (first, 2, 1), (first, 3, 1)]

        # While it holds three, Ann's other consumer and Ben get everything,
        # including a run that begins meanwhile.
        async with asyncio.timeout(GUARD_SECONDS):
            _, ann_got, ben_got = await asyncio.gather(
                events.publish_run(ann_id, third, 5),
                follow(fast, [first, second, third]),
                follow(other_user, [bens]),
            )
        assert ben_got == {bens: list(range(1, 13))}
        assert ann_got == {first: list(range(1, 13)), second: list(range(1, 13)), third: [1, 2, 3, 4, 5]}

        # The stuck consumer got nothing more, not even of the new run (which
        # its heartbeats show it follows).
        while True:
            response = await stuck.read()
            assert response.WhichOneof("response") == "heartbeat", response
            if (third, 5) in {(p.run_id, p.last_seq) for p in response.heartbeat.positions}:
                break
        assert await until_idle(stuck) == []
        assert await events.status(ann, first) == {
            "fast": (12, 12, 0, 0, 12),
            "stuck": (3, 0, 3, 0, 0),
        }

        # One acknowledged, one more comes: it is flow control, not a stuck stream.
        stuck.ack([held.deliveries[0].event.event_id])
        assert await outcomes_of(stuck) == [ACCEPTED]
        assert positions(await stuck.next("events")) == [(first, 4, 1)]
        assert await until_idle(stuck) == []
    finally:
        for subscription in (stuck, fast, other_user):
            subscription.close()

    # A new connection of the consumer gets what it left unacknowledged, and no more.
    again = events.subscribe(ann, all_runs=True, consumer="stuck", max_in_flight=3)
    try:
        assert positions(await again.next("events")) == [(first, 2, 2), (first, 3, 2), (first, 4, 2)]
        assert await until_idle(again) == []
    finally:
        again.close()


async def test_an_unacknowledged_event_is_redelivered_after_its_ack_deadline(events: Events) -> None:
    user_id, mine = await events.user("cid")
    run_id = await events.publish_run(user_id, new_run_id("cid"), 3)
    opened_at = time.monotonic()
    subscription = events.subscribe(mine, run_id=run_id, consumer="slow", ack_deadline=2)
    try:
        batch = await subscription.next("events")
        assert positions(batch) == [(run_id, 1, 1), (run_id, 2, 1), (run_id, 3, 1)]
        subscription.ack(event_ids(batch)[1:])
        seen = await read_until(
            subscription,
            lambda responses: bool(answered(responses)) and (run_id, 1, 2) in delivered(responses),
        )
        assert answered(seen) == [[ACCEPTED, ACCEPTED]]
        # Only seq 1 comes again (once the acks are in), as the same event with the attempt counted.
        after_acks = delivered(seen[[r.WhichOneof("response") for r in seen].index("ack_results") :])
        assert {seq for _, seq, _ in after_acks} == {1}
        redelivery = next(r.events for r in seen if r.WhichOneof("response") == "events")
        assert event_ids(redelivery) == event_ids(batch)[:1]
        assert time.monotonic() - opened_at >= 2.0  # never before its deadline
        subscription.ack(event_ids(redelivery))
        assert await outcomes_of(subscription) == [ACCEPTED]
        completed = await subscription.next("run_completed")
        assert (completed.run_id, completed.last_seq) == (run_id, 3)
    finally:
        subscription.close()
    assert await events.status(mine, run_id) == {"slow": (3, 3, 0, 0, 3)}


async def test_a_nacked_event_is_redelivered_after_the_nacks_delay(events: Events) -> None:
    user_id, mine = await events.user("dee")
    run_id = await events.publish_run(user_id, new_run_id("dee"), 3)
    subscription = events.subscribe(mine, run_id=run_id, consumer="picky", ack_deadline=LONG_DEADLINE_SECONDS)
    try:
        batch = await subscription.next("events")
        first, second, third = event_ids(batch)
        nacked_at = time.monotonic()
        subscription.nack([first, f"{run_id}:404"], delay=1)
        subscription.nack([second], delay=LONG_DEADLINE_SECONDS)
        seen = await read_until(
            subscription, lambda responses: len(answered(responses)) == 2 and bool(delivered(responses))
        )
        assert answered(seen) == [[ACCEPTED, UNKNOWN], [ACCEPTED]]
        assert delivered(seen) == [(run_id, 1, 2)]
        assert time.monotonic() - nacked_at >= 1.0  # not before the nack's delay
        # Seq 2 waits out its (long) delay: the stream goes idle without it.
        assert await until_idle(subscription) == []
        subscription.ack([first, second, third])
        assert await outcomes_of(subscription) == [ACCEPTED, ACCEPTED, ACCEPTED]
        assert (await subscription.next("run_completed")).last_seq == 3
    finally:
        subscription.close()
    assert await events.status(mine, run_id) == {"picky": (3, 3, 0, 0, 3)}


async def test_after_the_maximum_attempts_a_dead_letter_marker_takes_the_events_place(
    events: Events,
) -> None:
    user_id, mine = await events.user("eve")
    run_id = await events.publish_run(user_id, new_run_id("eve"), 3)
    subscription = events.subscribe(mine, run_id=run_id, consumer="dlq")
    try:
        batch = await subscription.next("events")
        poison = event_ids(batch)[0]
        subscription.ack(event_ids(batch)[1:])
        assert await outcomes_of(subscription) == [ACCEPTED, ACCEPTED]
        for attempt in range(2, MAX_DELIVERY_ATTEMPTS + 1):
            subscription.nack([poison])
            assert await outcomes_of(subscription) == [ACCEPTED]
            assert positions(await subscription.next("events")) == [(run_id, 1, attempt)]
        # The last attempt failed too: a marker at seq 1, never a silent gap.
        subscription.nack([poison])
        assert await outcomes_of(subscription) == [ACCEPTED]
        [marker] = (await subscription.next("events")).deliveries
        assert marker.WhichOneof("item") == "dead_letter"
        assert (
            marker.dead_letter.event_id,
            marker.dead_letter.run_id,
            marker.dead_letter.seq,
            marker.dead_letter.delivery_attempts,
        ) == (poison, run_id, 1, MAX_DELIVERY_ATTEMPTS)
        # Settled by the marker: the run is complete, and the event is never sent again.
        assert (await subscription.next("run_completed")).last_seq == 3
        subscription.ack([poison])
        assert await outcomes_of(subscription) == [STALE]
        assert await until_idle(subscription) == []
    finally:
        subscription.close()
    assert await events.status(mine, run_id) == {"dlq": (3, 2, 0, 1, 3)}

    # A new connection of the consumer finds nothing left to deliver.
    again = events.subscribe(mine, run_id=run_id, consumer="dlq")
    try:
        assert [r.WhichOneof("response") for r in await until_idle(again, heartbeats=1)] == [
            "opened",
            "run_completed",
        ]
    finally:
        again.close()


async def test_stale_and_unknown_acks_change_nothing(events: Events) -> None:
    user_id, mine = await events.user("fox")
    run_id = await events.publish_run(user_id, new_run_id("fox"), 4)
    subscription = events.subscribe(mine, run_id=run_id, consumer="acker", max_in_flight=1)
    try:
        [one] = event_ids(await subscription.next("events"))
        subscription.ack([one, one])  # the second names what the first settled
        assert await outcomes_of(subscription) == [ACCEPTED, STALE]
        assert event_ids(await subscription.next("events")) == [f"{run_id}:2"]
        # Seq 4 was not delivered yet, and no event has this id.
        subscription.ack([f"{run_id}:4", f"{run_id}:missing"])
        assert await outcomes_of(subscription) == [UNKNOWN, UNKNOWN]
        # Through seq 1 everything is settled already; through 2 settles seq 2.
        subscription.ack(cumulative=[(run_id, 1), (run_id, 2), (run_id, 2)])
        assert await outcomes_of(subscription) == [STALE, ACCEPTED, STALE]
        [three] = event_ids(await subscription.next("events"))

        # Without a stream, for the same consumer: the same answers.
        unary = await events.stub.Acknowledge(
            events_service_pb2.AcknowledgeRequest(
                consumer="acker",
                event_ids=[one, three, three, f"{run_id}:4"],
                cumulative=[events_service_pb2.CumulativeAck(run_id=run_id, through_seq=2)],
            ),
            metadata=mine,
            timeout=10,
        )
        assert [r.outcome for r in unary.results] == [STALE, ACCEPTED, STALE, UNKNOWN, STALE]
        # Seq 3 was settled through the unary call: the stream moves on to 4.
        [four] = event_ids(await subscription.next("events"))
        assert four == f"{run_id}:4"
        assert await events.status(mine, run_id) == {"acker": (4, 3, 1, 0, 3)}
        subscription.ack([three, four])
        assert await outcomes_of(subscription) == [STALE, ACCEPTED]
        assert (await subscription.next("run_completed")).last_seq == 4
    finally:
        subscription.close()
    assert await events.status(mine, run_id) == {"acker": (4, 4, 0, 0, 4)}


async def test_a_resume_at_another_epoch_is_out_of_range(events: Events) -> None:
    user_id, mine = await events.user("gil")
    run_id = await events.publish_run(user_id, new_run_id("gil"), 4)
    epoch = await events.epoch(mine, run_id)

    durable = events.subscribe(mine, run_id=run_id, consumer="resumer")
    try:
        durable.ack(event_ids(await durable.next("events"))[:1])
        assert await outcomes_of(durable) == [ACCEPTED]
    finally:
        durable.close()
    before = await events.status(mine, run_id)
    assert before == {"resumer": (4, 1, 3, 0, 1)}

    def resume(epoch: int, last_acked_seq: int, consumer: str = "") -> RawSubscription:
        point = events_service_pb2.ResumePoint(run_id=run_id, epoch=epoch, last_acked_seq=last_acked_seq)
        return events.subscribe(
            mine,
            run_id=run_id,
            consumer=consumer,
            start=events_service_pb2.StartPosition(resume=point),
        )

    for stale_epoch, consumer in ((epoch + 1, ""), (epoch - 1, "resumer")):
        refused = resume(stale_epoch, 3, consumer)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await refused.read()  # refused before anything is sent, `opened` included
        finally:
            refused.close()
        assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_info(raised.value) == ("EPOCH_MISMATCH", {"run_id": run_id, "epoch": str(epoch)})
    # The refused resume did not move the consumer.
    assert await events.status(mine, run_id) == before

    beyond = resume(epoch, 9)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await beyond.read()
    finally:
        beyond.close()
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(raised.value)[0] == "SEQ_BEYOND_STREAM"

    # At the run's epoch, the resume continues after the seq it names.
    resumed = resume(epoch, 2, "resumer")
    try:
        assert positions(await resumed.next("events")) == [(run_id, 3, 2), (run_id, 4, 2)]
    finally:
        resumed.close()
    assert (await events.status(mine, run_id))["resumer"][4] == 2


async def test_a_resume_from_before_the_retention_window_is_out_of_range(events: Events) -> None:
    user_id, mine = await events.user("hed")
    run_id = new_run_id("hed")
    # Four events from two hours ago: past the maximum age, the next retention pass takes them.
    old = datetime.now(UTC) - 2 * RETENTION_MAX_AGE
    batch = [run_event(run_id, user_id, seq, last=6) for seq in range(1, 5)]
    for event in batch:
        event.create_time.FromDatetime(old)
    await events.stub.Publish(
        events_service_pb2.PublishRequest(events=batch), metadata=events.publisher, timeout=10
    )
    epoch = await events.epoch(mine, run_id)
    async with asyncio.timeout(GUARD_SECONDS):
        while True:
            try:
                await events.stub.ListEvents(
                    events_service_pb2.ListEventsRequest(run_id=run_id), metadata=mine, timeout=10
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.OUT_OF_RANGE
                assert error_info(error) == (
                    "EVENTS_TRIMMED",
                    {"run_id": run_id, "epoch": str(epoch), "trimmed_through": "4"},
                )
                break
            await asyncio.sleep(0.2)
    # The run goes on after the trim (same epoch).
    await events.stub.Publish(
        events_service_pb2.PublishRequest(events=[run_event(run_id, user_id, seq, 6) for seq in (5, 6)]),
        metadata=events.publisher,
        timeout=10,
    )

    def resume(last_acked_seq: int) -> RawSubscription:
        point = events_service_pb2.ResumePoint(run_id=run_id, epoch=epoch, last_acked_seq=last_acked_seq)
        return events.subscribe(mine, run_id=run_id, start=events_service_pb2.StartPosition(resume=point))

    # From inside the trimmed part: refused, naming where the window begins.
    behind = resume(2)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await behind.read()
    finally:
        behind.close()
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(raised.value) == (
        "EVENTS_TRIMMED",
        {"run_id": run_id, "epoch": str(epoch), "trimmed_through": "4"},
    )

    # From the window's edge: the rest, complete.
    edge = resume(4)
    try:
        assert positions(await edge.next("events")) == [(run_id, 5, 1), (run_id, 6, 1)]
        edge.ack(cumulative=[(run_id, 6)])
        assert await outcomes_of(edge) == [ACCEPTED]
        assert (await edge.next("run_completed")).last_seq == 6
    finally:
        edge.close()
    listed = await events.stub.ListEvents(
        events_service_pb2.ListEventsRequest(run_id=run_id, after_seq=4), metadata=mine, timeout=10
    )
    assert [(e.seq, e.type) for e in listed.events] == [
        (5, event_pb2.EVENT_TYPE_AGENT_THINKING),
        (6, event_pb2.EVENT_TYPE_RUN_COMPLETED),
    ]
