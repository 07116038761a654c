"""The client helper (`switchboard_client.events.EventSubscriber`) against the
events servicer on an in-process server: handing over and acknowledging,
stopping at a run's end, breaking off, dead letters, takeover, errors that
retrying cannot fix, and reconnecting to a restarted server without handing
anything over twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc

from services.common.auth import TokenVerifier
from services.common.server import ServiceParts, build_interceptors
from services.events.domain import DeliverySettings, EventsDomain
from services.events.servicer import SERVICE_NAME, EventsServicer
from services.events.storage import SqlEventLog
from switchboard_client.events import ConsumerTakenOver, EventSubscriber, Reconnect
from tests.unit.common.keys import AUDIENCE, ISSUER, Keys, Revocations
from tests.unit.events.streams import run_event

GUARD_SECONDS = 10.0  # a hang fails instead of stalling; nothing is timed
FAST = Reconnect(initial_backoff=0.01, max_backoff=0.1)


@dataclass
class Service:
    address: str
    keys: Keys
    kid: str
    start: Callable[[], Any]
    stop: Callable[[], Any]

    def token(self, user_id: str, role: str = "user") -> str:
        return self.keys.sign(self.kid, sub=user_id, role=role)

    async def publish(self, run_id: str, count: int, user_id: str = "user-a") -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            await events_service_pb2_grpc.EventsServiceStub(channel).Publish(
                events_service_pb2.PublishRequest(
                    events=[run_event(run_id, user_id, s, count) for s in range(1, count + 1)]
                ),
                metadata=(("authorization", f"Bearer {self.token('svc-executor', 'service')}"),),
                timeout=GUARD_SECONDS,
            )

    async def status(self, run_id: str, user_id: str = "user-a") -> list[tuple[str, int, int, int]]:
        async with grpc.aio.insecure_channel(self.address) as channel:
            response = await events_service_pb2_grpc.EventsServiceStub(channel).GetDeliveryStatus(
                events_service_pb2.GetDeliveryStatusRequest(run_id=run_id),
                metadata=(("authorization", f"Bearer {self.token(user_id)}"),),
                timeout=GUARD_SECONDS,
            )
        return [(c.consumer, c.delivered, c.acknowledged, c.dead_lettered) for c in response.consumers]


@pytest.fixture
async def service(sqlite_log: SqlEventLog) -> AsyncIterator[Service]:
    """The servicer on a fixed port that can be stopped and started again (same log)."""
    keys, revocations = Keys(), Revocations()
    kid = keys.add()
    verifier = TokenVerifier(keys, revocations, ISSUER, AUDIENCE)
    port = 0
    running: list[grpc.aio.Server] = []

    async def ready() -> bool:
        return True

    async def start() -> None:
        nonlocal port
        servicer = EventsServicer(
            EventsDomain(sqlite_log, DeliverySettings(max_delivery_attempts=2, heartbeat_seconds=0.5)),
            verifier,
        )

        def add(server: grpc.aio.Server) -> list[str]:
            events_service_pb2_grpc.add_EventsServiceServicer_to_server(servicer, server)
            return [SERVICE_NAME]

        server = grpc.aio.server(
            interceptors=build_interceptors(
                ServiceParts(add_to_server=add, verifier=verifier, check_ready=ready)
            )
        )
        add(server)
        port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        running.append(server)

    async def stop() -> None:
        await running.pop().stop(None)

    await start()
    yield Service(f"127.0.0.1:{port}", keys, kid, start, stop)
    while running:
        await stop()


def subscriber(service: Service, **options: Any) -> EventSubscriber:
    options.setdefault("reconnect", FAST)
    return EventSubscriber(service.address, token=service.token("user-a"), consumer="app", **options)


async def collect(events: EventSubscriber, count: int | None = None) -> list[event_pb2.Event]:
    got: list[event_pb2.Event] = []
    async with asyncio.timeout(GUARD_SECONDS):
        async for event in events:
            got.append(event)
            if len(got) == count:
                break
    return got


async def test_a_run_is_handed_over_acknowledged_and_ends(service: Service) -> None:
    await service.publish("r1", 5)
    async with subscriber(service, run_id="r1", until_complete=True) as events:
        assert [e.seq for e in await collect(events)] == [1, 2, 3, 4, 5]
    assert await service.status("r1") == [("app", 5, 5, 0)]


async def test_breaking_off_leaves_the_current_event_unacknowledged(service: Service) -> None:
    await service.publish("r1", 3)
    async with subscriber(service, run_id="r1") as first:
        assert [e.seq for e in await collect(first, 2)] == [1, 2]  # broke off while holding 2
    async with subscriber(service, run_id="r1", until_complete=True) as second:
        assert [e.seq for e in await collect(second)] == [2, 3]


async def test_dead_letters_are_reported_not_handed_over(service: Service) -> None:
    await service.publish("r1", 3)
    async with subscriber(service, run_id="r1", max_in_flight=1) as first:
        await collect(first, 1)
    async with subscriber(service, run_id="r1", max_in_flight=1) as second:
        await collect(second, 1)  # seq 1 again, attempt 2 of 2, and broken off again
    dead: list[int] = []
    async with subscriber(
        service, run_id="r1", until_complete=True, on_dead_letter=lambda d: dead.append(d.seq)
    ) as third:
        assert [e.seq for e in await collect(third)] == [2, 3]
    assert dead == [1]


async def test_a_newer_connection_takes_the_consumer(service: Service) -> None:
    await service.publish("r1", 2)
    async with subscriber(service, run_id="r1") as older, subscriber(service, run_id="r1") as newer:
        await collect(older, 1)
        await collect(newer, 1)
        with pytest.raises(ConsumerTakenOver):
            await collect(older)


async def test_what_retrying_cannot_fix_is_raised(service: Service) -> None:
    await service.publish("theirs", 1, user_id="user-b")
    async with subscriber(service, run_id="theirs") as events:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(events)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_restart_resumes_without_handing_anything_over_twice(service: Service) -> None:
    await service.publish("r1", 6)
    got = []
    async with subscriber(service, run_id="r1", until_complete=True, max_in_flight=3) as events:
        async with asyncio.timeout(GUARD_SECONDS):
            async for event in events:
                got.append(event.seq)
                if event.seq == 2:
                    # While 2 is being handled: its ack cannot reach this server.
                    await service.stop()
                    await service.start()
        # 2 at least came again (its ack was lost), and was not handed over twice.
        assert events.reconnects == 1 and events.duplicates_skipped >= 1
    assert got == [1, 2, 3, 4, 5, 6]
