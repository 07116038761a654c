"""Workflows through real processes (the session's suite, built-in agents):
outputs feed later steps, independent branches run at once, a failing or
cancelled workflow compensates its completed steps in reverse order, and a
broken graph is refused naming its steps."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from switchboard.events.v1 import event_pb2
from switchboard.executor.v1 import executor_service_pb2, run_pb2

from tests.harness.clients import completed_events, finished_run, plain, struct
from tests.harness.clients import executor_stub as executor
from tests.harness.clients import get_run as get
from tests.harness.suite import Suite

PATIENCE_SECONDS = 60.0


def finished(suite: Suite, token: str, run_id: str) -> Coroutine[Any, Any, run_pb2.Run]:
    return finished_run(suite, token, run_id, PATIENCE_SECONDS)


def step(
    step_id: str, agent: str, input: dict[str, Any] | None = None, **fields: Any
) -> run_pb2.WorkflowStep:
    return run_pb2.WorkflowStep(step_id=step_id, agent=agent, input=struct(input or {}), **fields)


async def user(suite: Suite, name: str) -> str:
    return (await suite.create_user(f"{name}-{uuid.uuid4().hex[:8]}"))[1]


async def start(suite: Suite, token: str, *steps: run_pb2.WorkflowStep, **fields: Any) -> run_pb2.Run:
    response = await executor(suite).StartRun(
        executor_service_pb2.StartRunRequest(workflow=run_pb2.Workflow(steps=steps), **fields),
        metadata=suite.metadata(token),
        timeout=30,
    )
    return response.run


def states(run: run_pb2.Run) -> dict[str, str]:
    return {s.step_id: run_pb2.StepState.Name(s.state) for s in run.steps}


def seconds(timestamp: Any) -> float:
    return float(timestamp.ToMicroseconds()) / 1e6


async def events_of(suite: Suite, token: str, run_id: str) -> list[event_pb2.Event]:
    return await completed_events(suite, token, run_id, PATIENCE_SECONDS)


async def test_a_two_step_workflow_feeds_one_agents_output_to_the_next(suite: Suite) -> None:
    token = await user(suite, "olga")
    started = await start(
        suite,
        token,
        step("count", "text-stats", {"text": "One fish. Two fish. Red fish."}),
        step(
            "pick",
            "json-transform",
            {"data": "${steps.count.output}", "mapping": {"n": "words", "best": "top_words.0.word"}},
            depends_on=["count"],
        ),
    )
    assert started.agent == "" and [s.step_id for s in started.workflow.steps] == ["count", "pick"]

    done = await finished(suite, token, started.run_id)

    assert done.state == run_pb2.RUN_STATE_SUCCEEDED
    assert states(done) == {"count": "STEP_STATE_SUCCEEDED", "pick": "STEP_STATE_SUCCEEDED"}
    assert all(s.attempts == 1 for s in done.steps)
    assert plain(done.steps[0].output)["words"] == 6
    picked = dict(plain(done.output)["pick"])["result"]
    assert dict(picked) == {"n": 6, "best": "fish"}
    history = await events_of(suite, token, started.run_id)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    started_steps = [e.step_id for e in history if e.type == event_pb2.EVENT_TYPE_AGENT_STARTED]
    assert started_steps == ["count", "pick"]
    tools = {e.step_id for e in history if e.type == event_pb2.EVENT_TYPE_TOOL_EXECUTING}
    assert tools == {"count"}


async def test_independent_branches_run_at_the_same_time(suite: Suite) -> None:
    token = await user(suite, "pete")
    started = await start(
        suite,
        token,
        step("left", "chaos", {"sleep_seconds": 0.8, "thoughts": 0}),
        step("right", "chaos", {"sleep_seconds": 0.8, "thoughts": 0}),
        step("join", "chaos", {"thoughts": 0}, depends_on=["left", "right"]),
    )

    done = await finished(suite, token, started.run_id)

    assert done.state == run_pb2.RUN_STATE_SUCCEEDED
    left, right, join = done.steps
    # Each branch started before the other one ended; the join after both.
    assert seconds(left.start_time) < seconds(right.end_time)
    assert seconds(right.start_time) < seconds(left.end_time)
    assert seconds(join.start_time) >= max(seconds(left.end_time), seconds(right.end_time))
    assert set(plain(done.output)) == {"join"}


async def test_a_failing_workflow_compensates_its_completed_steps_in_reverse_order(suite: Suite) -> None:
    token = await user(suite, "quinn")
    started = await start(
        suite,
        token,
        step("reserve", "chaos", {"echo": "room 12", "thoughts": 0}, compensation_agent="chaos"),
        step(
            "charge",
            "chaos",
            {"echo": "card", "thoughts": 0},
            depends_on=["reserve"],
            compensation_agent="chaos",
        ),
        step(
            "confirm",
            "chaos",
            {"action": "fail", "reason": "INVALID_INPUT", "message": "no such guest"},
            depends_on=["charge"],
        ),
    )

    done = await finished(suite, token, started.run_id)

    assert done.state == run_pb2.RUN_STATE_FAILED
    info = error_details_pb2.ErrorInfo()
    assert done.error.details[0].Unpack(info) and info.reason == "INVALID_INPUT"
    assert "'confirm'" in done.error.message
    assert states(done) == {
        "reserve": "STEP_STATE_COMPENSATED",
        "charge": "STEP_STATE_COMPENSATED",
        "confirm": "STEP_STATE_FAILED",
    }
    history = await events_of(suite, token, started.run_id)
    undone = [
        (e.step_id, e.agent)
        for e in history
        if e.type == event_pb2.EVENT_TYPE_AGENT_COMPLETED and plain(e.payload).get("compensation")
    ]
    assert undone == [("charge", "chaos"), ("reserve", "chaos")]
    assert history[-1].type == event_pb2.EVENT_TYPE_RUN_COMPLETED
    assert plain(history[-1].payload)["state"] == "RUN_STATE_FAILED"
    # The compensation got the output of the step it undoes.
    charge_undo = next(
        e
        for e in history
        if e.step_id == "charge"
        and e.type == event_pb2.EVENT_TYPE_AGENT_COMPLETED
        and plain(e.payload).get("compensation")
    )
    # chaos answers with its input's `echo`, and that input was charge's output.
    assert dict(plain(charge_undo.payload)["output"])["echo"] == "card"


async def test_a_cancelled_workflow_compensates_then_ends_cancelled(suite: Suite) -> None:
    token = await user(suite, "rosa")
    started = await start(
        suite,
        token,
        step("reserve", "chaos", {"thoughts": 0}, compensation_agent="chaos"),
        step("wait", "chaos", {"action": "hang", "thoughts": 0}, depends_on=["reserve"]),
    )
    async with asyncio.timeout(PATIENCE_SECONDS):
        while states(await get(suite, token, started.run_id))["wait"] != "STEP_STATE_RUNNING":  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.1)

    answered = await executor(suite).CancelRun(
        executor_service_pb2.CancelRunRequest(run_id=started.run_id, reason="plans changed"),
        metadata=suite.metadata(token),
        timeout=10,
    )
    done = await finished(suite, token, started.run_id)

    assert answered.run.state in (run_pb2.RUN_STATE_RUNNING, run_pb2.RUN_STATE_CANCELLED)
    assert done.state == run_pb2.RUN_STATE_CANCELLED
    assert done.error.message == "plans changed"
    assert states(done) == {"reserve": "STEP_STATE_COMPENSATED", "wait": "STEP_STATE_CANCELLED"}


async def test_a_broken_graph_is_refused_naming_the_steps(suite: Suite) -> None:
    token = await user(suite, "sam")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await start(
            suite,
            token,
            step("a", "chaos", depends_on=["c"]),
            step("b", "chaos", depends_on=["a"]),
            step("c", "chaos", depends_on=["b"]),
            step("a", "no-such-agent"),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status()
    trailing: Any = refused.value.trailing_metadata() or ()
    for key, value in trailing:
        if key == "grpc-status-details-bin":
            status.ParseFromString(value)
    fields: dict[str, str] = {}
    reasons: list[str] = []
    for detail in status.details:
        bad_request, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
        if detail.Unpack(bad_request):
            fields.update({v.field: v.description for v in bad_request.field_violations})
        elif detail.Unpack(info):
            reasons.append(info.reason)
    assert reasons == ["WORKFLOW_INVALID"]
    assert "duplicate step id 'a'" in fields["workflow.steps[3].step_id"]
    assert "a -> c -> b -> a" in fields["workflow.steps[0].depends_on[0]"]
