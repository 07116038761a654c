"""Users' events stay their own, in a real events process next to the real auth
service, through generated stubs only, on the SQLite log and on Redis: a
hundred users follow "all my runs" while a hundred users' runs are published at
once, and nobody receives anything of anyone else; acks forged for other
users' events, and subscriptions, listings and delivery status of other users'
runs, answer UNKNOWN or NOT_FOUND (exactly as for a run that does not exist)
and change nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from switchboard.auth.v1 import auth_service_pb2, user_pb2
from switchboard.events.v1 import events_service_pb2, events_service_pb2_grpc

from tests.harness.suite import TEST_PASSWORD, Suite, start_suite
from tests.unit.events.backends import drop_redis_prefix, redis_environment, redis_prefix, require_redis
from tests.unit.events.streams import RawSubscription, error_info, publish_run

Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")

USERS = 100
RUNS_PER_USER = 2
EVENTS_PER_RUN = 4
# At most this many users' calls at once while setting up (auth hashes every password).
SETUP_CONCURRENCY = 10
GUARD_SECONDS = 240.0  # a hang fails the test instead of stalling it; nothing is timed

ACCEPTED = events_service_pb2.ACK_OUTCOME_ACCEPTED
UNKNOWN = events_service_pb2.ACK_OUTCOME_UNKNOWN


@dataclass
class User:
    name: str
    user_id: str
    metadata: Metadata
    runs: list[str] = field(default_factory=list)

    def new_run(self) -> str:
        run_id = f"{self.name}-{uuid.uuid4().hex[:6]}"
        self.runs.append(run_id)
        return run_id


@dataclass
class Crowd:
    suite: Suite
    stub: Any
    publisher: Metadata
    users: list[User]

    def neighbour(self, index: int) -> User:
        return self.users[(index + 1) % len(self.users)]

    def subscribe(self, user: User, opening: events_service_pb2.SubscriptionOpen) -> RawSubscription:
        return RawSubscription(self.stub, user.metadata, opening, timeout=GUARD_SECONDS)

    async def status(self, user: User, run_id: str) -> dict[str, tuple[int, int, int, int, int]]:
        response = await self.stub.GetDeliveryStatus(
            events_service_pb2.GetDeliveryStatusRequest(run_id=run_id), metadata=user.metadata, timeout=30
        )
        return {
            c.consumer: (c.delivered, c.acknowledged, c.pending, c.dead_lettered, c.last_acked_seq)
            for c in response.consumers
        }


async def bounded(calls: Iterable[Awaitable[T]], limit: int = SETUP_CONCURRENCY) -> list[T]:
    """Awaits every call, at most `limit` at a time, and returns their results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def call(awaitable: Awaitable[T]) -> T:
        async with semaphore:
            return await awaitable

    return list(await asyncio.gather(*(call(awaitable) for awaitable in calls)))


async def create_users(suite: Suite, count: int) -> list[User]:
    admin = suite.metadata(await suite.admin_token())
    suffix = uuid.uuid4().hex[:6]

    async def create(n: int) -> User:
        name = f"u{n:03d}-{suffix}"
        created = await suite.auth_stub().CreateUser(
            auth_service_pb2.CreateUserRequest(
                username=name, password=TEST_PASSWORD, role=user_pb2.ROLE_USER
            ),
            metadata=admin,
            timeout=30,
        )
        return User(name, created.user.user_id, suite.metadata(await suite.login(name, TEST_PASSWORD)))

    return await bounded(create(n) for n in range(count))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def crowd(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Crowd]:
    """Auth and events as processes (the log on SQLite or on Redis), and a hundred users."""
    root: Path = tmp_path_factory.mktemp("isolation")
    events_env = {"SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS": "1"}
    # Password hashing is not under test here: a cheap Argon2id keeps a hundred logins quick.
    auth_env = {
        "SWITCHBOARD_AUTH_ARGON2_TIME_COST": "1",
        "SWITCHBOARD_AUTH_ARGON2_MEMORY_KIB": "1024",
        "SWITCHBOARD_AUTH_ARGON2_PARALLELISM": "1",
    }
    prefix = ""
    if request.param == "redis":
        prefix = redis_prefix()
        events_env.update(redis_environment(require_redis(), prefix))
    try:
        async with start_suite(
            root, services=("auth", "events"), env={"auth": auth_env, "events": events_env}
        ) as suite:
            publisher = suite.metadata(await suite.login("svc-executor", suite.service_password("executor")))
            yield Crowd(
                suite,
                events_service_pb2_grpc.EventsServiceStub(suite.channel("events")),
                publisher,
                await create_users(suite, USERS),
            )
    finally:
        if prefix:
            await drop_redis_prefix(events_env["SWITCHBOARD_EVENTS_REDIS_URL"], prefix)


async def follow_own_runs(
    subscription: RawSubscription, user: User, runs: Sequence[str], victims_runs: Sequence[str]
) -> dict[str, list[int]]:
    """Reads the user's "all my runs" stream until each of `runs` completed,
    checking every delivery is the user's own and acknowledging it. The first
    ack also names every event and run of the victim's: those must be UNKNOWN."""
    received: dict[str, list[int]] = {}
    completed: set[str] = set()
    acks_sent = acks_answered = 0
    forged_ids = [f"{run_id}:{seq}" for run_id in victims_runs for seq in range(1, EVENTS_PER_RUN + 1)]
    forged_runs = [(run_id, EVENTS_PER_RUN) for run_id in victims_runs]
    while not completed >= set(runs):
        response = await subscription.read()
        kind = response.WhichOneof("response")
        if kind == "events":
            own = []
            for delivery in response.events.deliveries:
                event = delivery.event
                assert (event.user_id, event.run_id in runs) == (user.user_id, True), (user.name, event)
                assert event.event_id == f"{event.run_id}:{event.seq}"
                received.setdefault(event.run_id, []).append(event.seq)
                own.append(event.event_id)
            if acks_sent == 0:
                subscription.ack(own + forged_ids, forged_runs)
            else:
                subscription.ack(own)
            acks_sent += 1
        elif kind == "ack_results":
            for result in response.ack_results.results:
                run_id = result.cumulative.run_id or result.event_id.rsplit(":", 1)[0]
                assert result.outcome == (ACCEPTED if run_id in runs else UNKNOWN), (user.name, result)
            acks_answered += 1
        elif kind == "run_completed":
            assert response.run_completed.run_id in runs
            completed.add(response.run_completed.run_id)
        else:
            assert kind == "heartbeat", response
            assert {p.run_id for p in response.heartbeat.positions} <= set(runs)
    # Acks are answered before the completion they lead to.
    assert acks_answered == acks_sent
    return received


async def test_a_hundred_users_each_receive_only_their_own_runs(crowd: Crowd) -> None:
    planned = {user.name: [user.new_run() for _ in range(RUNS_PER_USER)] for user in crowd.users}
    feeds = [
        crowd.subscribe(
            user, events_service_pb2.SubscriptionOpen(all_runs=True, consumer="feed", max_in_flight=4)
        )
        for user in crowd.users
    ]
    try:
        async with asyncio.timeout(GUARD_SECONDS):
            # Everyone listens before anything is published.
            opened = await asyncio.gather(*(feed.read() for feed in feeds))
            assert {response.WhichOneof("response") for response in opened} == {"opened"}
            # Every run of every user at once, a few events per Publish, as relays would. The
            # first failure anywhere (a foreign event, a refused publish) stops everything.
            async with asyncio.TaskGroup() as group:
                followers = [
                    group.create_task(
                        follow_own_runs(feed, user, planned[user.name], planned[crowd.neighbour(index).name])
                    )
                    for index, (feed, user) in enumerate(zip(feeds, crowd.users, strict=True))
                ]
                for user in crowd.users:
                    for run_id in planned[user.name]:
                        group.create_task(
                            publish_run(crowd.stub, crowd.publisher, run_id, user.user_id, EVENTS_PER_RUN)
                        )
            received = [follower.result() for follower in followers]
    finally:
        for feed in feeds:
            feed.close()
    for user, got in zip(crowd.users, received, strict=True):
        assert got == {run_id: list(range(1, EVENTS_PER_RUN + 1)) for run_id in planned[user.name]}, user.name


async def test_forged_acks_and_reads_of_other_users_runs_are_refused_and_change_nothing(
    crowd: Crowd,
) -> None:
    # Each user reads a run of their own with a durable consumer and acknowledges half of it.
    async def read_half(user: User) -> str:
        run_id = user.new_run()
        await publish_run(crowd.stub, crowd.publisher, run_id, user.user_id, EVENTS_PER_RUN)
        inbox = crowd.subscribe(user, events_service_pb2.SubscriptionOpen(run_id=run_id, consumer="inbox"))
        try:
            batch = await inbox.next("events")
            assert len(batch.deliveries) == EVENTS_PER_RUN
            inbox.ack(cumulative=[(run_id, EVENTS_PER_RUN // 2)])
            [result] = (await inbox.next("ack_results")).results
            assert result.outcome == ACCEPTED
        finally:
            inbox.close()
        return run_id

    async with asyncio.timeout(GUARD_SECONDS):
        inboxes = await bounded(read_half(user) for user in crowd.users)
        half = EVENTS_PER_RUN // 2
        expected = {"inbox": (EVENTS_PER_RUN, half, EVENTS_PER_RUN - half, 0, half)}
        before = await bounded(crowd.status(u, r) for u, r in zip(crowd.users, inboxes, strict=True))
        assert before == [expected] * USERS

        # Everyone goes after their neighbour's run, every way there is.
        await bounded(
            attack(crowd, attacker, victims_run=inboxes[(index + 1) % USERS])
            for index, attacker in enumerate(crowd.users)
        )

        after = await bounded(crowd.status(u, r) for u, r in zip(crowd.users, inboxes, strict=True))
    assert after == before


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), error_info(raised.value)[0], raised.value.details() or ""


async def refused_subscription(
    crowd: Crowd, user: User, opening: events_service_pb2.SubscriptionOpen
) -> tuple[grpc.StatusCode, str, str]:
    """Refused before anything is sent: not even `opened`."""
    subscription = crowd.subscribe(user, opening)
    try:
        return await refusal(subscription.read())
    finally:
        subscription.close()


async def attack(crowd: Crowd, attacker: User, victims_run: str) -> None:
    missing = f"missing-{uuid.uuid4().hex[:6]}"
    not_found = (grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")

    def subscriptions(run_id: str) -> list[events_service_pb2.SubscriptionOpen]:
        resume = events_service_pb2.StartPosition(
            resume=events_service_pb2.ResumePoint(run_id=run_id, epoch=1, last_acked_seq=0)
        )
        return [
            events_service_pb2.SubscriptionOpen(run_id=run_id),
            events_service_pb2.SubscriptionOpen(
                run_id=run_id, consumer="inbox", start=events_service_pb2.StartPosition(from_beginning=True)
            ),
            events_service_pb2.SubscriptionOpen(all_runs=True, consumer="inbox", start=resume),
        ]

    for theirs, nobodys in zip(subscriptions(victims_run), subscriptions(missing), strict=True):
        code, reason, details = await refused_subscription(crowd, attacker, theirs)
        assert (code, reason) == not_found
        # Exactly what a run that does not exist answers: nothing tells that it does.
        answer = await refused_subscription(crowd, attacker, nobodys)
        assert (code, reason, details.replace(victims_run, "<run>")) == (
            *answer[:2],
            answer[2].replace(missing, "<run>"),
        )
    for run_id in (victims_run, missing):
        for call in (
            crowd.stub.ListEvents(
                events_service_pb2.ListEventsRequest(run_id=run_id), metadata=attacker.metadata, timeout=30
            ),
            crowd.stub.GetDeliveryStatus(
                events_service_pb2.GetDeliveryStatusRequest(run_id=run_id),
                metadata=attacker.metadata,
                timeout=30,
            ),
        ):
            assert (await refusal(call))[:2] == not_found

    # Acks for the victim's consumer name, naming the victim's events: without a stream...
    forged_ids = [f"{victims_run}:{seq}" for seq in range(1, EVENTS_PER_RUN + 1)]
    forged_run = events_service_pb2.CumulativeAck(run_id=victims_run, through_seq=EVENTS_PER_RUN)
    unary = await crowd.stub.Acknowledge(
        events_service_pb2.AcknowledgeRequest(
            consumer="inbox", event_ids=forged_ids, cumulative=[forged_run]
        ),
        metadata=attacker.metadata,
        timeout=30,
    )
    assert [r.outcome for r in unary.results] == [UNKNOWN] * (EVENTS_PER_RUN + 1)
    # ... and on a stream of the attacker's own (ephemeral: it keeps nothing of the attacker's either).
    stream = crowd.subscribe(
        attacker,
        events_service_pb2.SubscriptionOpen(
            all_runs=True, start=events_service_pb2.StartPosition(new_only=True)
        ),
    )
    try:
        await stream.next("opened")
        stream.ack(forged_ids, [(victims_run, EVENTS_PER_RUN)])
        results = (await stream.next("ack_results")).results
    finally:
        stream.close()
    assert [r.outcome for r in results] == [UNKNOWN] * (EVENTS_PER_RUN + 1)
