"""Small client-side helpers for tests: generated stubs only."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc
from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc, run_pb2

from tests.harness.suite import Suite, metadata


def executor_stub(suite: Suite, channel: grpc.aio.Channel | None = None) -> Any:
    return executor_service_pb2_grpc.ExecutorServiceStub(channel or suite.channel("executor"))


def events_stub(suite: Suite, channel: grpc.aio.Channel | None = None) -> Any:
    return events_service_pb2_grpc.EventsServiceStub(channel or suite.channel("events"))


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


async def start_run(
    suite: Suite, token: str, agent: str = "text-stats", text: str = "One sentence. And another one here."
) -> run_pb2.Run:
    response = await executor_stub(suite).StartRun(
        executor_service_pb2.StartRunRequest(agent=agent, input=struct({"text": text})),
        metadata=metadata(token),
        timeout=15,
    )
    return response.run


async def wait_run(suite: Suite, token: str, run_id: str, seconds: int = 30) -> run_pb2.Run:
    request = executor_service_pb2.WaitRunRequest(run_id=run_id)
    request.timeout.seconds = seconds
    response = await executor_stub(suite).WaitRun(request, metadata=metadata(token), timeout=seconds + 5)
    return response.run


async def subscribe_run(
    suite: Suite,
    token: str,
    run_id: str,
    timeout: float = 30.0,
    channel: grpc.aio.Channel | None = None,
    consumer: str = "",
    acknowledge: bool = True,
) -> list[event_pb2.Event]:
    """Subscribes to one run (from the beginning, or where a durable consumer
    left off), acknowledges every batch unless told not to, and returns its
    events once RUN_COMPLETED arrives."""
    requests: asyncio.Queue[events_service_pb2.SubscribeRequest | None] = asyncio.Queue()
    opening = events_service_pb2.SubscriptionOpen(run_id=run_id, max_in_flight=50, consumer=consumer)
    if not consumer:
        opening.start.from_beginning = True
    await requests.put(events_service_pb2.SubscribeRequest(open=opening))

    async def outgoing() -> Any:
        while (item := await requests.get()) is not None:
            yield item

    call = events_stub(suite, channel).Subscribe(outgoing(), metadata=metadata(token), timeout=timeout)
    events: list[event_pb2.Event] = []
    try:
        async for response in call:
            if response.WhichOneof("response") != "events":
                continue
            batch = [d.event for d in response.events.deliveries if d.WhichOneof("item") == "event"]
            events.extend(batch)
            if acknowledge:
                await requests.put(
                    events_service_pb2.SubscribeRequest(
                        ack=events_service_pb2.AckRequest(event_ids=[e.event_id for e in batch])
                    )
                )
            if any(e.type == event_pb2.EVENT_TYPE_RUN_COMPLETED for e in batch):
                break
    finally:
        await requests.put(None)
        call.cancel()
    return events


async def follow_all_runs(
    suite: Suite, token: str, run_ids: Collection[str], timeout: float = 120.0
) -> list[event_pb2.Event]:
    """Follows every run of the caller's (ephemeral, from the beginning),
    acknowledging each batch, and returns every event received once each of
    `run_ids` has delivered its RUN_COMPLETED. Events of any other run are
    returned too, so that a test sees what should not have come."""
    requests: asyncio.Queue[events_service_pb2.SubscribeRequest | None] = asyncio.Queue()
    opening = events_service_pb2.SubscriptionOpen(
        all_runs=True, start=events_service_pb2.StartPosition(from_beginning=True), max_in_flight=100
    )
    await requests.put(events_service_pb2.SubscribeRequest(open=opening))

    async def outgoing() -> Any:
        while (item := await requests.get()) is not None:
            yield item

    call = events_stub(suite).Subscribe(outgoing(), metadata=metadata(token), timeout=timeout)
    events: list[event_pb2.Event] = []
    waiting = set(run_ids)
    try:
        async for response in call:
            if response.WhichOneof("response") != "events":
                continue
            batch = [d.event for d in response.events.deliveries if d.WhichOneof("item") == "event"]
            events.extend(batch)
            await requests.put(
                events_service_pb2.SubscribeRequest(
                    ack=events_service_pb2.AckRequest(event_ids=[e.event_id for e in batch])
                )
            )
            waiting -= {e.run_id for e in batch if e.type == event_pb2.EVENT_TYPE_RUN_COMPLETED}
            if not waiting:
                break
    finally:
        await requests.put(None)
        call.cancel()
    return events


def plain(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python values (numbers are floats)."""
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


async def get_run(suite: Suite, token: str, run_id: str) -> run_pb2.Run:
    response = await executor_stub(suite).GetRun(
        executor_service_pb2.GetRunRequest(run_id=run_id), metadata=metadata(token), timeout=10
    )
    return response.run


async def finished_run(suite: Suite, token: str, run_id: str, patience: float = 60.0) -> run_pb2.Run:
    """The run once it has ended; fails the test if it has not within `patience` seconds."""
    request = executor_service_pb2.WaitRunRequest(run_id=run_id)
    request.timeout.seconds = int(patience) - 10
    response = await executor_stub(suite).WaitRun(request, metadata=metadata(token), timeout=patience)
    assert response.done, response.run
    return response.run


async def completed_events(
    suite: Suite, token: str, run_id: str, patience: float = 60.0
) -> list[event_pb2.Event]:
    """The run's events once RUN_COMPLETED reached the events service (which
    may not know the run yet, or be restarting)."""
    stub = events_service_pb2_grpc.EventsServiceStub(suite.channel("events"))
    async with asyncio.timeout(patience):
        while True:
            try:
                page = await stub.ListEvents(
                    events_service_pb2.ListEventsRequest(run_id=run_id, page_size=500),
                    metadata=metadata(token),
                    timeout=10,
                )
                if page.events and page.events[-1].type == event_pb2.EVENT_TYPE_RUN_COMPLETED:
                    return list(page.events)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
            await asyncio.sleep(0.2)
