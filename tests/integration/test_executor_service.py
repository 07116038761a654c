"""The executor as a real process among the real suite (auth, registry, events,
the built-in worker), through generated stubs only."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc
from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc, run_pb2

from tests.harness.suite import Suite

PATIENCE_SECONDS = 60.0


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


def seconds(value: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(value))


def executor(suite: Suite) -> Any:
    return executor_service_pb2_grpc.ExecutorServiceStub(suite.channel("executor"))


def events(suite: Suite) -> Any:
    return events_service_pb2_grpc.EventsServiceStub(suite.channel("events"))


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    trailing: Any = error.trailing_metadata() or ()
    for key, value in trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status()


def reason_of(error: grpc.aio.AioRpcError) -> str:
    for detail in status_of(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def bad_fields(error: grpc.aio.AioRpcError) -> set[str]:
    fields: set[str] = set()
    for detail in status_of(error).details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields |= {v.field for v in bad_request.field_violations}
    return fields


async def new_user(suite: Suite, name: str) -> tuple[str, str]:
    return await suite.create_user(f"{name}-{uuid.uuid4().hex[:8]}")


async def start(suite: Suite, token: str, agent: str, input: dict[str, Any], **fields: Any) -> run_pb2.Run:
    response = await executor(suite).StartRun(
        executor_service_pb2.StartRunRequest(agent=agent, input=struct(input), **fields),
        metadata=suite.metadata(token),
        timeout=30,
    )
    return response.run


async def wait(suite: Suite, token: str, run_id: str) -> executor_service_pb2.WaitRunResponse:
    return await executor(suite).WaitRun(
        executor_service_pb2.WaitRunRequest(run_id=run_id, timeout=seconds(PATIENCE_SECONDS)),
        metadata=suite.metadata(token),
        timeout=PATIENCE_SECONDS + 5,
    )


async def all_events(suite: Suite, token: str, run_id: str) -> list[event_pb2.Event]:
    found: list[event_pb2.Event] = []
    page_token = ""
    while True:
        page = await events(suite).ListEvents(
            events_service_pb2.ListEventsRequest(run_id=run_id, page_token=page_token),
            metadata=suite.metadata(token),
            timeout=10,
        )
        found.extend(page.events)
        page_token = page.next_page_token
        if not page_token:
            return found


async def completed_events(suite: Suite, token: str, run_id: str) -> list[event_pb2.Event]:
    """The run's events once its RUN_COMPLETED has reached the events service."""
    async with asyncio.timeout(PATIENCE_SECONDS):
        while True:
            try:
                found = await all_events(suite, token, run_id)
            except grpc.aio.AioRpcError as exc:
                # Not yet known to the events service, or it is still starting.
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                found = []
            if found and found[-1].type == event_pb2.EVENT_TYPE_RUN_COMPLETED:
                return found
            await asyncio.sleep(0.2)


async def test_a_user_runs_text_stats_and_nobody_else_can_see_it(suite: Suite) -> None:
    alice_id, alice = await new_user(suite, "alice")
    _, bob = await new_user(suite, "bob")

    started = await start(suite, alice, "text-stats", {"text": "One fish. Two fish. Red fish."})
    waited = await wait(suite, alice, started.run_id)

    assert waited.done
    assert waited.run.state == run_pb2.RUN_STATE_SUCCEEDED
    output = dict(waited.run.output)
    assert output["words"] == 6 and output["sentences"] == 3
    got = (
        await executor(suite).GetRun(
            executor_service_pb2.GetRunRequest(run_id=started.run_id),
            metadata=suite.metadata(alice),
            timeout=10,
        )
    ).run
    assert got.user_id == alice_id
    (step,) = got.steps
    assert (step.step_id, step.state, step.attempts) == ("main", run_pb2.STEP_STATE_SUCCEEDED, 1)
    assert len(got.trace_id) == 32 and int(got.trace_id, 16) != 0

    missing = str(uuid.uuid4())
    calls = [
        lambda run_id: executor(suite).GetRun(
            executor_service_pb2.GetRunRequest(run_id=run_id), metadata=suite.metadata(bob), timeout=10
        ),
        lambda run_id: executor(suite).WaitRun(
            executor_service_pb2.WaitRunRequest(run_id=run_id, timeout=seconds(1)),
            metadata=suite.metadata(bob),
            timeout=10,
        ),
        lambda run_id: executor(suite).CancelRun(
            executor_service_pb2.CancelRunRequest(run_id=run_id), metadata=suite.metadata(bob), timeout=10
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await call(started.run_id)
        with pytest.raises(grpc.aio.AioRpcError) as absent:
            await call(missing)
        assert foreign.value.code() == absent.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(foreign.value) == reason_of(absent.value) == "RUN_NOT_FOUND"

    history = await completed_events(suite, alice, started.run_id)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    assert history[0].type == event_pb2.EVENT_TYPE_RUN_QUEUED
    assert history[1].type == event_pb2.EVENT_TYPE_AGENT_STARTED
    assert event_pb2.EVENT_TYPE_TOOL_EXECUTING in [e.type for e in history]
    assert history[-2].type == event_pb2.EVENT_TYPE_AGENT_COMPLETED
    assert {e.user_id for e in history} == {alice_id}
    assert all(e.trace_context.traceparent.split("-")[1] == got.trace_id for e in history)


async def test_two_users_at_once_each_see_only_their_own_runs(suite: Suite) -> None:
    users = [await new_user(suite, name) for name in ("carol", "dave")]
    started = await asyncio.gather(
        *(
            start(suite, token, "text-stats", {"text": f"hello {n}"}, thread_id="chat")
            for n, (_, token) in enumerate(users)
            for _ in range(2)
        )
    )
    for run in started:
        token = next(t for user_id, t in users if user_id == run.user_id)
        assert (await wait(suite, token, run.run_id)).run.state == run_pb2.RUN_STATE_SUCCEEDED
    for user_id, token in users:
        listed = await executor(suite).ListRuns(
            executor_service_pb2.ListRunsRequest(thread_id="chat"), metadata=suite.metadata(token), timeout=10
        )
        assert {r.user_id for r in listed.runs} == {user_id}
        assert len(listed.runs) == 2


async def test_bad_requests_are_refused_with_their_reasons(suite: Suite) -> None:
    _, token = await new_user(suite, "erin")
    stub = executor(suite)
    with pytest.raises(grpc.aio.AioRpcError) as workflow:
        await stub.StartRun(
            executor_service_pb2.StartRunRequest(
                workflow=run_pb2.Workflow(
                    steps=[run_pb2.WorkflowStep(step_id="a", agent="text-stats", depends_on=["nope"])]
                )
            ),
            metadata=suite.metadata(token),
            timeout=10,
        )
    assert workflow.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(workflow.value) == "WORKFLOW_INVALID"
    assert bad_fields(workflow.value) == {"workflow.steps[0].depends_on[0]"}

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await start(suite, token, "no-such-agent", {})
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(unknown.value) == "AGENT_NOT_FOUND"
    assert "no-such-agent" in (unknown.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as bad_input:
        await start(suite, token, "text-stats", {"text": 5})
    assert bad_input.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(bad_input.value) == {"input.text"}

    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.ListRuns(executor_service_pb2.ListRunsRequest(), timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_cancel_stops_a_hanging_agent(suite: Suite) -> None:
    _, token = await new_user(suite, "frank")
    started = await start(suite, token, "chaos", {"action": "hang"})
    async with asyncio.timeout(PATIENCE_SECONDS):
        while True:
            run = (
                await executor(suite).GetRun(
                    executor_service_pb2.GetRunRequest(run_id=started.run_id),
                    metadata=suite.metadata(token),
                    timeout=10,
                )
            ).run
            if run.state == run_pb2.RUN_STATE_RUNNING:
                break
            await asyncio.sleep(0.1)

    cancelled = await executor(suite).CancelRun(
        executor_service_pb2.CancelRunRequest(run_id=started.run_id, reason="enough"),
        metadata=suite.metadata(token),
        timeout=10,
    )

    assert cancelled.run.state == run_pb2.RUN_STATE_CANCELLED
    history = await completed_events(suite, token, started.run_id)
    assert dict(history[-1].payload)["state"] == "RUN_STATE_CANCELLED"


async def test_runs_succeed_while_events_is_down_and_their_events_follow(suite: Suite) -> None:
    _, token = await new_user(suite, "grace")
    await suite.stop("events")
    try:
        started = await start(suite, token, "text-stats", {"text": "Nobody is listening."})
        waited = await wait(suite, token, started.run_id)
        assert waited.run.state == run_pb2.RUN_STATE_SUCCEEDED
    finally:
        await suite.start("events")

    history = await completed_events(suite, token, started.run_id)

    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    assert history[0].type == event_pb2.EVENT_TYPE_RUN_QUEUED
    assert dict(history[-1].payload)["state"] == "RUN_STATE_SUCCEEDED"
    assert len({e.event_id for e in history}) == len(history)


async def test_a_run_cut_off_by_an_executor_crash_is_retried_after_the_restart(suite: Suite) -> None:
    _, token = await new_user(suite, "heidi")
    started = await start(suite, token, "chaos", {"action": "hang"})
    await running_attempt(suite, token, started.run_id, 1)

    suite.kill("executor")
    await suite.start("executor")

    # The built-in chaos agent allows 3 attempts: the cut-off one was the first.
    recovered = await running_attempt(suite, token, started.run_id, 2)
    (step,) = recovered.steps
    info = error_details_pb2.ErrorInfo()
    assert step.error.details[0].Unpack(info) and info.reason == "EXECUTOR_RESTARTED"
    cancelled = await executor(suite).CancelRun(
        executor_service_pb2.CancelRunRequest(run_id=started.run_id),
        metadata=suite.metadata(token),
        timeout=10,
    )
    assert cancelled.run.state == run_pb2.RUN_STATE_CANCELLED
    history = await completed_events(suite, token, started.run_id)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    assert [e.type for e in history].count(event_pb2.EVENT_TYPE_AGENT_STARTED) == 2


async def running_attempt(suite: Suite, token: str, run_id: str, attempt: int) -> run_pb2.Run:
    """The run once its step runs the given attempt."""
    async with asyncio.timeout(PATIENCE_SECONDS):
        while True:
            run = (
                await executor(suite).GetRun(
                    executor_service_pb2.GetRunRequest(run_id=run_id),
                    metadata=suite.metadata(token),
                    timeout=10,
                )
            ).run
            step = run.steps[0]
            if step.state == run_pb2.STEP_STATE_RUNNING and step.attempts == attempt:
                return run
            await asyncio.sleep(0.1)
