"""Retention in a real events process (SQLite and Redis): once a run's events
are past the maximum age they are gone, and every reader hears it explicitly:
a listing or a resume from before the window is OUT_OF_RANGE (EVENTS_TRIMMED),
a subscription from the beginning gets a reset marker, never a partial replay
presented as complete."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.events.v1 import events_service_pb2, events_service_pb2_grpc

from tests.harness.suite import Suite, start_suite
from tests.unit.events.backends import drop_redis_prefix, redis_environment, redis_prefix, require_redis
from tests.unit.events.streams import RawSubscription, error_info, publish_run

GUARD_SECONDS = 30.0  # a hang fails instead of stalling; nothing is timed


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def retaining_suite(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Suite]:
    env = {
        "SWITCHBOARD_EVENTS_RETENTION_MAX_AGE_SECONDS": "1",
        "SWITCHBOARD_EVENTS_RETENTION_INTERVAL_SECONDS": "0.2",
    }
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


async def test_trimmed_events_are_reported_never_replayed_in_part(retaining_suite: Suite) -> None:
    suite = retaining_suite
    stub: Any = events_service_pb2_grpc.EventsServiceStub(suite.channel("events"))
    user_id, token = await suite.create_user(f"gus-{uuid.uuid4().hex[:6]}")
    mine = suite.metadata(token)
    publisher = suite.metadata(await suite.login("svc-executor", suite.service_password("svc-executor")))
    run_id = f"gus-{uuid.uuid4().hex[:6]}"
    await publish_run(stub, publisher, run_id, user_id, 3)
    epoch = (
        (await stub.ListEvents(events_service_pb2.ListEventsRequest(run_id=run_id), metadata=mine))
        .events[0]
        .epoch
    )

    # Wait for the retention pass to take the whole run (it is a second old soon).
    async with asyncio.timeout(GUARD_SECONDS):
        while True:
            try:
                await stub.ListEvents(
                    events_service_pb2.ListEventsRequest(run_id=run_id), metadata=mine, timeout=5
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.OUT_OF_RANGE
                assert error_info(error) == (
                    "EVENTS_TRIMMED",
                    {"run_id": run_id, "epoch": str(epoch), "trimmed_through": "3"},
                )
                break
            await asyncio.sleep(0.2)

    resume = events_service_pb2.SubscriptionOpen(
        run_id=run_id,
        start=events_service_pb2.StartPosition(
            resume=events_service_pb2.ResumePoint(run_id=run_id, epoch=epoch, last_acked_seq=1)
        ),
    )
    resumed = RawSubscription(stub, mine, resume)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await resumed.read()
        assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_info(refused.value)[0] == "EVENTS_TRIMMED"
    finally:
        resumed.close()

    from_start = RawSubscription(
        stub,
        mine,
        events_service_pb2.SubscriptionOpen(
            run_id=run_id, start=events_service_pb2.StartPosition(from_beginning=True)
        ),
    )
    try:
        assert (await from_start.read()).WhichOneof("response") == "opened"
        first = await from_start.read()
        assert first.WhichOneof("response") == "reset"
        assert (first.reset.position.last_seq, first.reset.reason) == (3, "EVENTS_TRIMMED")
        # The run had ended: that is said too, and no event is sent.
        assert (await from_start.read()).WhichOneof("response") == "run_completed"
    finally:
        from_start.close()
    # The run is still the owner's alone.
    _, other = await suite.create_user(f"hal-{uuid.uuid4().hex[:6]}")
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await stub.GetDeliveryStatus(
            events_service_pb2.GetDeliveryStatusRequest(run_id=run_id), metadata=suite.metadata(other)
        )
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
