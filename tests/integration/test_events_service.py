"""The events service as a real process (`python -m services.events`) next to
the real auth service, through generated stubs only, on the SQLite log and on
Redis: a service publishes, two users follow their own runs at once, neither
can read or acknowledge the other's, and a durable consumer survives a restart
of the service."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc

from tests.harness.suite import Suite, start_suite
from tests.unit.events import streams
from tests.unit.events.backends import drop_redis_prefix, redis_environment, redis_prefix, require_redis
from tests.unit.events.streams import RawSubscription, error_info

EVENTS_PER_RUN = 6
RUNS_PER_USER = 3


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def events_suite(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    """Auth and events as processes, with the events log on SQLite or on Redis."""
    root: Path = tmp_path_factory.mktemp("events")
    env = {"SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS": "0.5"}
    prefix = ""
    if request.param == "redis":
        url, prefix = require_redis(), redis_prefix()
        env.update(redis_environment(url, prefix))
    try:
        async with start_suite(root, services=("auth", "events"), env={"events": env}) as suite:
            yield suite
    finally:
        if prefix:
            await drop_redis_prefix(env["SWITCHBOARD_EVENTS_REDIS_URL"], prefix)


def stub(suite: Suite) -> Any:
    return events_service_pb2_grpc.EventsServiceStub(suite.channel("events"))


async def service_token(suite: Suite) -> str:
    return await suite.login("svc-executor", suite.service_password("svc-executor"))


async def publish_run(
    suite: Suite, token: str, run_id: str, user_id: str, events: int = EVENTS_PER_RUN
) -> None:
    await streams.publish_run(stub(suite), suite.metadata(token), run_id, user_id, events)


def open_stream(suite: Suite, token: str, opening: events_service_pb2.SubscriptionOpen) -> RawSubscription:
    return RawSubscription(stub(suite), suite.metadata(token), opening)


async def follow_all_runs(suite: Suite, token: str, expected_runs: int) -> dict[str, list[event_pb2.Event]]:
    """Every run of the caller's, acknowledging as it goes, until each one completed."""
    subscription = open_stream(
        suite,
        token,
        events_service_pb2.SubscriptionOpen(
            all_runs=True, start=events_service_pb2.StartPosition(from_beginning=True), max_in_flight=4
        ),
    )
    received: dict[str, list[event_pb2.Event]] = {}
    completed: set[str] = set()
    try:
        while len(completed) < expected_runs:
            response = await subscription.read()
            kind = response.WhichOneof("response")
            if kind == "events":
                batch = [d.event for d in response.events.deliveries]
                for event in batch:
                    received.setdefault(event.run_id, []).append(event)
                subscription.ack([e.event_id for e in batch])
            elif kind == "run_completed":
                completed.add(response.run_completed.run_id)
    finally:
        subscription.close()
    return received


async def test_two_users_each_receive_only_their_own_runs_in_order(events_suite: Suite) -> None:
    suite = events_suite
    suffix = uuid.uuid4().hex[:6]
    (alice_id, alice), (bob_id, bob) = await asyncio.gather(
        suite.create_user(f"alice-{suffix}"), suite.create_user(f"bob-{suffix}")
    )
    publisher = await service_token(suite)
    runs = {
        alice_id: [f"alice-{suffix}-{n}" for n in range(RUNS_PER_USER)],
        bob_id: [f"bob-{suffix}-{n}" for n in range(RUNS_PER_USER)],
    }
    # Both users subscribe before anything is published, then everything happens at once.
    followers = [
        asyncio.create_task(follow_all_runs(suite, alice, RUNS_PER_USER)),
        asyncio.create_task(follow_all_runs(suite, bob, RUNS_PER_USER)),
    ]
    await asyncio.sleep(0.2)  # let both subscriptions open (they would still get every run from seq 1)
    await asyncio.gather(
        *(publish_run(suite, publisher, run_id, user_id) for user_id, ids in runs.items() for run_id in ids)
    )
    alice_got, bob_got = await asyncio.gather(*followers)
    for user_id, got in ((alice_id, alice_got), (bob_id, bob_got)):
        assert sorted(got) == sorted(runs[user_id])
        for events in got.values():
            assert {e.user_id for e in events} == {user_id}
            assert [e.seq for e in events] == list(range(1, EVENTS_PER_RUN + 1))


async def test_the_other_users_run_can_be_neither_read_nor_acknowledged(events_suite: Suite) -> None:
    suite = events_suite
    suffix = uuid.uuid4().hex[:6]
    (carol_id, carol), (dave_id, dave) = await asyncio.gather(
        suite.create_user(f"carol-{suffix}"), suite.create_user(f"dave-{suffix}")
    )
    publisher = await service_token(suite)
    carol_run, dave_run = f"carol-{suffix}", f"dave-{suffix}"
    await asyncio.gather(
        publish_run(suite, publisher, carol_run, carol_id), publish_run(suite, publisher, dave_run, dave_id)
    )
    # Carol reads her run with a durable consumer and acknowledges nothing.
    mine = open_stream(suite, carol, events_service_pb2.SubscriptionOpen(run_id=carol_run, consumer="inbox"))
    try:
        carol_events = [d.event for d in (await mine.next("events")).deliveries]
    finally:
        mine.close()
    assert [e.seq for e in carol_events] == list(range(1, EVENTS_PER_RUN + 1))

    # To Dave, Carol's run answers exactly like a run that does not exist.
    answers = []
    for run_id in (carol_run, f"missing-{suffix}"):
        probe = open_stream(suite, dave, events_service_pb2.SubscriptionOpen(run_id=run_id))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await probe.read()
        probe.close()
        answers.append(
            (
                raised.value.code(),
                error_info(raised.value)[0],
                (raised.value.details() or "").replace(run_id, "<id>"),
            )
        )
        for call in (
            stub(suite).ListEvents(
                events_service_pb2.ListEventsRequest(run_id=run_id), metadata=suite.metadata(dave)
            ),
            stub(suite).GetDeliveryStatus(
                events_service_pb2.GetDeliveryStatusRequest(run_id=run_id), metadata=suite.metadata(dave)
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert answers[0] == answers[1]
    assert answers[0][:2] == (grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")

    # Dave acknowledges Carol's events, on his own stream and without one, with a
    # consumer of the same name: unknown to him, and nothing of Carol's moves.
    carol_ids = [e.event_id for e in carol_events]
    theirs = open_stream(suite, dave, events_service_pb2.SubscriptionOpen(run_id=dave_run, consumer="inbox"))
    try:
        await theirs.next("events")
        theirs.ack(carol_ids, [(carol_run, EVENTS_PER_RUN)])
        on_stream = await theirs.next("ack_results")
    finally:
        theirs.close()
    unary = await stub(suite).Acknowledge(
        events_service_pb2.AcknowledgeRequest(
            consumer="inbox",
            event_ids=carol_ids,
            cumulative=[events_service_pb2.CumulativeAck(run_id=carol_run, through_seq=EVENTS_PER_RUN)],
        ),
        metadata=suite.metadata(dave),
        timeout=10,
    )
    for results in (on_stream.results, unary.results):
        assert len(results) == len(carol_ids) + 1
        assert {r.outcome for r in results} == {events_service_pb2.ACK_OUTCOME_UNKNOWN}

    status = await stub(suite).GetDeliveryStatus(
        events_service_pb2.GetDeliveryStatusRequest(run_id=carol_run),
        metadata=suite.metadata(carol),
        timeout=10,
    )
    [inbox] = status.consumers
    assert (inbox.delivered, inbox.acknowledged, inbox.pending, inbox.last_acked_seq) == (
        EVENTS_PER_RUN,
        0,
        EVENTS_PER_RUN,
        0,
    )


async def test_a_durable_consumer_resumes_after_a_restart(events_suite: Suite) -> None:
    suite = events_suite
    suffix = uuid.uuid4().hex[:6]
    user_id, token = await suite.create_user(f"erin-{suffix}")
    run_id = f"erin-{suffix}"
    await publish_run(suite, await service_token(suite), run_id, user_id)
    opening = events_service_pb2.SubscriptionOpen(run_id=run_id, consumer="resumable")

    before = open_stream(suite, token, opening)
    try:
        assert len((await before.next("events")).deliveries) == EVENTS_PER_RUN
        before.ack(cumulative=[(run_id, 3)])
        [result] = (await before.next("ack_results")).results
        assert result.outcome == events_service_pb2.ACK_OUTCOME_ACCEPTED
    finally:
        before.close()

    await suite.stop("events")
    await suite.start("events")

    after = open_stream(suite, token, opening)
    try:
        batch = await after.next("events")
        assert [(d.event.seq, d.delivery_attempt) for d in batch.deliveries] == [(4, 2), (5, 2), (6, 2)]
        after.ack([d.event.event_id for d in batch.deliveries])
        completed = await after.next("run_completed")
        assert (completed.run_id, completed.last_seq) == (run_id, EVENTS_PER_RUN)
        heartbeat = await after.next("heartbeat")  # the stream is idle now
        assert [(p.run_id, p.last_seq) for p in heartbeat.positions] == [(run_id, EVENTS_PER_RUN)]
    finally:
        after.close()


@pytest.mark.postgres
async def test_the_service_runs_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    async with start_suite(
        tmp_path, services=("auth", "events"), database_urls={"events": postgres_url}
    ) as suite:
        user_id, token = await suite.create_user("pat")
        await publish_run(suite, await service_token(suite), "pg-run", user_id)
        subscription = open_stream(
            suite, token, events_service_pb2.SubscriptionOpen(run_id="pg-run", consumer="pg")
        )
        try:
            batch = await subscription.next("events")
            assert [d.event.seq for d in batch.deliveries] == list(range(1, EVENTS_PER_RUN + 1))
            subscription.ack(cumulative=[("pg-run", EVENTS_PER_RUN)])
            assert (await subscription.next("run_completed")).last_seq == EVENTS_PER_RUN
        finally:
            subscription.close()
        status = await stub(suite).GetDeliveryStatus(
            events_service_pb2.GetDeliveryStatusRequest(run_id="pg-run"),
            metadata=suite.metadata(token),
            timeout=10,
        )
        assert [(c.consumer, c.acknowledged, c.last_acked_seq) for c in status.consumers] == [
            ("pg", EVENTS_PER_RUN, EVENTS_PER_RUN)
        ]
