"""Two users acting at once can never read, wait on, cancel, subscribe to or
acknowledge each other's runs; another user's run answers exactly like a run
that does not exist."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from switchboard.events.v1 import events_service_pb2
from switchboard.executor.v1 import executor_service_pb2, run_pb2

from tests.harness.clients import events_stub, executor_stub, start_run, subscribe_run, wait_run
from tests.harness.suite import Suite, metadata

RUNS_PER_USER = 3


def answer_of(error: grpc.aio.AioRpcError, run_id: str) -> tuple[grpc.StatusCode, str, str]:
    """What a client can observe of an error, with the run id it named masked."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    reason = ""
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return error.code(), (error.details() or "").replace(run_id, "<id>"), reason


async def rejection(call: Callable[[str], Awaitable[Any]], run_id: str) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(run_id)
    return answer_of(raised.value, run_id)


async def subscribe_first_message(suite: Suite, token: str, run_id: str) -> Any:
    async def requests() -> Any:
        yield events_service_pb2.SubscribeRequest(
            open=events_service_pb2.SubscriptionOpen(
                run_id=run_id, start=events_service_pb2.StartPosition(from_beginning=True)
            )
        )
        await asyncio.sleep(5)

    call = events_stub(suite).Subscribe(requests(), metadata=metadata(token), timeout=10)
    async for response in call:
        return response
    return None


def probes(suite: Suite, token: str) -> dict[str, Callable[[str], Awaitable[Any]]]:
    executor = executor_stub(suite)
    meta = metadata(token)
    return {
        "GetRun": lambda run_id: executor.GetRun(
            executor_service_pb2.GetRunRequest(run_id=run_id), metadata=meta
        ),
        "WaitRun": lambda run_id: executor.WaitRun(
            executor_service_pb2.WaitRunRequest(run_id=run_id), metadata=meta, timeout=10
        ),
        "CancelRun": lambda run_id: executor.CancelRun(
            executor_service_pb2.CancelRunRequest(run_id=run_id), metadata=meta
        ),
        "Subscribe": lambda run_id: subscribe_first_message(suite, token, run_id),
    }


async def test_two_users_concurrently_see_only_their_own_runs(suite: Suite) -> None:
    suffix = uuid.uuid4().hex[:6]
    (alice_id, alice), (bob_id, bob) = await asyncio.gather(
        suite.create_user(f"alice-{suffix}"), suite.create_user(f"bob-{suffix}")
    )
    alice_runs, bob_runs = await asyncio.gather(
        asyncio.gather(*(start_run(suite, alice) for _ in range(RUNS_PER_USER))),
        asyncio.gather(*(start_run(suite, bob) for _ in range(RUNS_PER_USER))),
    )
    missing = str(uuid.uuid4())

    async def follow_own(token: str, owner: str, run: run_pb2.Run) -> None:
        events = await subscribe_run(suite, token, run.run_id)
        assert {e.user_id for e in events} == {owner}
        assert {e.run_id for e in events} == {run.run_id}
        assert [e.seq for e in events] == list(range(1, len(events) + 1))

    async def probe_other(token: str, other: run_pb2.Run) -> None:
        for name, call in probes(suite, token).items():
            foreign = await rejection(call, other.run_id)
            absent = await rejection(call, missing)
            assert foreign[0] == grpc.StatusCode.NOT_FOUND, (name, foreign)
            assert foreign == absent, name

    # Everything at once: each user follows their own runs while probing the other's.
    await asyncio.gather(
        *(follow_own(alice, alice_id, run) for run in alice_runs),
        *(follow_own(bob, bob_id, run) for run in bob_runs),
        *(probe_other(alice, run) for run in bob_runs),
        *(probe_other(bob, run) for run in alice_runs),
    )

    # The probes changed nothing: every run ended on its own, none was cancelled.
    for token, runs in ((alice, alice_runs), (bob, bob_runs)):
        for run in runs:
            final = await wait_run(suite, token, run.run_id)
            assert final.state == run_pb2.RUN_STATE_SUCCEEDED
            assert final.user_id in (alice_id, bob_id)


async def test_forged_acks_touch_nothing(suite: Suite) -> None:
    suffix = uuid.uuid4().hex[:6]
    (_, carol), (_, dave) = await asyncio.gather(
        suite.create_user(f"carol-{suffix}"), suite.create_user(f"dave-{suffix}")
    )
    carol_run = await start_run(suite, carol)
    # Carol reads her run with a durable consumer and acknowledges nothing yet.
    carol_events = await subscribe_run(suite, carol, carol_run.run_id, consumer="inbox", acknowledge=False)
    dave_run = await start_run(suite, dave)
    await wait_run(suite, dave, dave_run.run_id)

    # Dave acknowledges Carol's events on his own subscription: unknown to him.
    async def requests() -> Any:
        yield events_service_pb2.SubscribeRequest(
            open=events_service_pb2.SubscriptionOpen(
                run_id=dave_run.run_id, start=events_service_pb2.StartPosition(from_beginning=True)
            )
        )
        yield events_service_pb2.SubscribeRequest(
            ack=events_service_pb2.AckRequest(
                event_ids=[e.event_id for e in carol_events],
                cumulative=[events_service_pb2.CumulativeAck(run_id=carol_run.run_id, through_seq=100)],
            )
        )
        await asyncio.sleep(5)

    outcomes: list[int] = []
    call = events_stub(suite).Subscribe(requests(), metadata=metadata(dave), timeout=10)
    async for response in call:
        if response.WhichOneof("response") == "ack_results":
            outcomes.extend(r.outcome for r in response.ack_results.results)
            if len(outcomes) >= len(carol_events) + 1:
                break
    call.cancel()
    assert outcomes and all(o == events_service_pb2.ACK_OUTCOME_UNKNOWN for o in outcomes)

    # Nothing of Carol's moved: her consumer resumes with every event still unacknowledged.
    again = await subscribe_run(suite, carol, carol_run.run_id, consumer="inbox")
    assert [e.event_id for e in again] == [e.event_id for e in carol_events]
