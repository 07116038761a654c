"""Runs end to end inside one process: start, execute against a real gRPC
worker, events through the outbox, cancel, wait, deadlines, recovery."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from services.common.convert import utcnow
from services.common.errors import InvalidArgument, NotFound
from services.executor.domain import (
    ATTEMPT_DEADLINE_EXCEEDED,
    EXECUTOR_RESTARTED,
    HEARTBEAT_TIMEOUT,
    MAIN_STEP,
    RUN_CANCELLED,
    RUN_DEADLINE_EXCEEDED,
    WORKER_STREAM_ENDED,
    EventDraft,
    EventType,
    ExecutionContext,
    ExecutorSettings,
    RunFilter,
    RunRecord,
    RunState,
    StepState,
    begin_attempt,
    new_run,
)
from services.executor.retry import RetrySettings
from services.executor.runs import StartRunCommand
from tests.unit.executor.conftest import ALICE, BOB, RigFactory, agent_spec


def command(agent: str = "echo", **fields: object) -> StartRunCommand:
    values: dict[str, object] = {"agent": agent, "input": {"text": "hello"}}
    values.update(fields)
    return StartRunCommand(**values)  # type: ignore[arg-type]


async def test_a_run_succeeds_with_every_event_in_order(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(ALICE, command(thread_id="t-1", labels={"team": "a"}))
    assert run.user_id == ALICE.user_id
    assert run.thread_id == "t-1"

    done, finished = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert finished
    assert done.state is RunState.SUCCEEDED
    assert done.output == {"echo": {"text": "hello"}}
    step = done.step(MAIN_STEP)
    assert (step.state, step.attempts, step.output) == (StepState.SUCCEEDED, 1, done.output)
    assert done.start_time is not None and done.end_time is not None
    events = await rig.published(run.run_id, 7)
    assert [e.type for e in events] == [
        EventType.RUN_QUEUED,
        EventType.AGENT_STARTED,
        EventType.AGENT_THINKING,
        EventType.TOOL_EXECUTING,
        EventType.TOOL_COMPLETED,
        EventType.AGENT_COMPLETED,
        EventType.RUN_COMPLETED,
    ]
    assert [e.seq for e in events] == list(range(1, 8))
    assert {e.user_id for e in events} == {ALICE.user_id}
    assert events[2].payload["text"] == "hmm"
    assert events[3].payload == {"call_id": "c1", "tool": "upper", "arguments": {"text": "hi"}, "attempt": 1}
    assert events[4].payload["result"] == {"text": "HI"}
    assert events[-1].payload["state"] == "RUN_STATE_SUCCEEDED"
    assert events[-1].payload["output"] == {"echo": {"text": "hello"}}


async def test_the_worker_gets_the_runs_context_and_the_service_token(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(ALICE, command(thread_id="t-9", request_id="req-9"))
    await rig.runs.wait_run(ALICE, run.run_id, 20)

    request = next(r for r in rig.worker.requests if r.context.run_id == run.run_id)
    assert request.agent == "echo"
    assert (request.context.user_id, request.context.thread_id) == (ALICE.user_id, "t-9")
    assert (request.context.request_id, request.context.step_id, request.context.attempt) == (
        "req-9",
        MAIN_STEP,
        1,
    )
    assert request.context.deadline.ToDatetime().replace(microsecond=0) == run.deadline.replace(
        microsecond=0, tzinfo=None
    )
    assert list(request.tools) == ["upper"]
    index = rig.worker.requests.index(request)
    assert rig.worker.metadata[index]["authorization"] == "Bearer service-token"


async def test_the_same_request_id_returns_the_same_run(make_rig: RigFactory) -> None:
    rig = await make_rig()
    first = await rig.runs.start_run(ALICE, command(request_id="once"))
    again = await rig.runs.start_run(ALICE, command(request_id="once", input={"text": "other"}))
    other_user = await rig.runs.start_run(BOB, command(request_id="once"))

    assert again.run_id == first.run_id
    assert other_user.run_id != first.run_id
    runs, _ = await rig.runs.list_runs(ALICE, RunFilter(), 50, None)
    assert [r.run_id for r in runs] == [first.run_id]


async def test_concurrent_starts_with_one_request_id_make_one_run(make_rig: RigFactory) -> None:
    rig = await make_rig()
    started = await asyncio.gather(*(rig.runs.start_run(ALICE, command(request_id="race")) for _ in range(5)))
    assert len({run.run_id for run in started}) == 1


async def test_another_users_run_is_not_found_like_a_missing_one(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(ALICE, command(agent="slow"))
    missing = "00000000-0000-4000-8000-000000000000"

    for call in (
        lambda run_id: rig.runs.get_run(BOB, run_id),
        lambda run_id: rig.runs.wait_run(BOB, run_id, 0.01),
        lambda run_id: rig.runs.cancel_run(BOB, run_id, ""),
    ):
        with pytest.raises(NotFound) as foreign:
            await call(run.run_id)
        with pytest.raises(NotFound) as absent:
            await call(missing)
        assert foreign.value.reason == absent.value.reason == "RUN_NOT_FOUND"
        assert foreign.value.message.replace(run.run_id, "X") == absent.value.message.replace(missing, "X")

    assert (await rig.runs.get_run(ALICE, run.run_id)).state is not RunState.CANCELLED
    await rig.runs.cancel_run(ALICE, run.run_id, "")


async def test_unknown_agent_and_bad_input_are_refused_before_anything_is_stored(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    rig.agents.specs["strict"] = agent_spec(
        "strict",
        rig.endpoint,
        input_schema={
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}, "top": {"type": "integer", "maximum": 5}},
        },
    )
    with pytest.raises(NotFound) as unknown:
        await rig.runs.start_run(ALICE, command(agent="nobody"))
    assert unknown.value.reason == "AGENT_NOT_FOUND"
    assert "nobody" in unknown.value.message
    with pytest.raises(InvalidArgument) as bad:
        await rig.runs.start_run(ALICE, command(agent="strict", input={"top": 9}))
    assert {v.field for v in bad.value.violations} == {"input.text", "input.top"}

    runs, _ = await rig.runs.list_runs(ALICE, RunFilter(), 50, None)
    assert runs == []


async def test_a_worker_error_fails_the_run_with_the_workers_reason(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(ALICE, command(agent="broken"))
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.FAILED
    assert done.error is not None
    assert (done.error.code, done.error.reason, done.error.message) == (
        "INTERNAL",
        "BROKEN_TOOL",
        "the tool broke",
    )
    assert done.step(MAIN_STEP).state is StepState.FAILED
    events = await rig.published(run.run_id, 4)
    assert [e.type for e in events] == [
        EventType.RUN_QUEUED,
        EventType.AGENT_STARTED,
        EventType.AGENT_FAILED,
        EventType.RUN_COMPLETED,
    ]
    assert events[2].payload["error"]["reason"] == "BROKEN_TOOL"
    assert events[3].payload["state"] == "RUN_STATE_FAILED"


async def test_a_stream_that_ends_without_a_result_fails(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(ALICE, command(agent="quitter"))
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)
    assert done.state is RunState.FAILED
    assert done.error is not None and done.error.reason == WORKER_STREAM_ENDED


async def test_a_silent_worker_fails_on_its_heartbeat_timeout_and_is_cancelled(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.agents.specs["silent"] = agent_spec("silent", rig.endpoint, heartbeat_timeout_seconds=0.2)
    run = await rig.runs.start_run(ALICE, command(agent="silent"))
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.FAILED
    assert done.error is not None and done.error.reason == HEARTBEAT_TIMEOUT
    async with asyncio.timeout(20):
        await rig.worker.cancelled[run.run_id].wait()


async def test_heartbeats_keep_a_quiet_worker_alive_until_the_run_deadline(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.agents.specs["slow"] = agent_spec("slow", rig.endpoint, heartbeat_timeout_seconds=0.5)
    run = await rig.runs.start_run(ALICE, command(agent="slow", timeout_seconds=1.5))
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    # Heartbeats every 0.05s outlive many heartbeat timeouts; only the deadline ends it.
    assert done.state is RunState.TIMED_OUT
    assert done.error is not None and done.error.reason == RUN_DEADLINE_EXCEEDED
    assert done.step(MAIN_STEP).state is StepState.TIMED_OUT
    events = await rig.published(run.run_id, 4)
    assert events[-1].payload["state"] == "RUN_STATE_TIMED_OUT"


async def test_an_attempt_past_the_agents_timeout_fails(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.agents.specs["slow"] = agent_spec("slow", rig.endpoint, timeout_seconds=0.3)
    run = await rig.runs.start_run(ALICE, command(agent="slow"))
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.FAILED
    assert done.error is not None and done.error.reason == ATTEMPT_DEADLINE_EXCEEDED


async def test_cancelling_a_running_run_stops_the_worker(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(ALICE, command(agent="slow"))
    await rig.wait_state(run.run_id, RunState.RUNNING)
    async with asyncio.timeout(20):
        await rig.worker.started[run.run_id].wait()

    cancelled = await rig.runs.cancel_run(ALICE, run.run_id, "changed my mind")

    assert cancelled.state is RunState.CANCELLED
    assert cancelled.error is not None
    assert (cancelled.error.reason, cancelled.error.message) == (RUN_CANCELLED, "changed my mind")
    assert cancelled.step(MAIN_STEP).state is StepState.CANCELLED
    async with asyncio.timeout(20):
        await rig.worker.cancelled[run.run_id].wait()
    events = await rig.published(run.run_id, 4)
    assert [e.type for e in events] == [
        EventType.RUN_QUEUED,
        EventType.AGENT_STARTED,
        EventType.AGENT_FAILED,
        EventType.RUN_COMPLETED,
    ]
    assert events[-1].payload["state"] == "RUN_STATE_CANCELLED"
    # Nothing follows RUN_COMPLETED, and a second cancel changes nothing.
    again = await rig.runs.cancel_run(ALICE, run.run_id, "")
    assert again.state is RunState.CANCELLED and again.last_seq == 4


async def test_runs_past_the_per_user_limit_wait_and_start_in_creation_order(make_rig: RigFactory) -> None:
    rig = await make_rig(per_user=1)
    first = await rig.runs.start_run(ALICE, command(agent="slow"))
    second = await rig.runs.start_run(ALICE, command(agent="slow"))
    third = await rig.runs.start_run(ALICE, command(agent="slow"))
    bobs = await rig.runs.start_run(BOB, command(agent="slow"))

    await rig.wait_state(first.run_id, RunState.RUNNING)
    # Bob is not held back by Alice's queue.
    await rig.wait_state(bobs.run_id, RunState.RUNNING)
    assert (await rig.store.get_run(second.run_id)).state is RunState.QUEUED  # type: ignore[union-attr]

    await rig.runs.cancel_run(ALICE, first.run_id, "")
    await rig.wait_state(second.run_id, RunState.RUNNING)
    assert (await rig.store.get_run(third.run_id)).state is RunState.QUEUED  # type: ignore[union-attr]

    for run in (second, third, bobs):
        owner = BOB if run is bobs else ALICE
        await rig.runs.cancel_run(owner, run.run_id, "")


async def test_cancelling_a_queued_run_ends_it_at_once_and_it_never_starts(make_rig: RigFactory) -> None:
    rig = await make_rig(per_user=1)
    blocker = await rig.runs.start_run(ALICE, command(agent="slow"))
    queued = await rig.runs.start_run(ALICE, command(agent="echo"))

    cancelled = await rig.runs.cancel_run(ALICE, queued.run_id, "")

    assert cancelled.state is RunState.CANCELLED
    assert cancelled.step(MAIN_STEP).state is StepState.SKIPPED
    events = await rig.published(queued.run_id, 2)
    assert [e.type for e in events] == [EventType.RUN_QUEUED, EventType.RUN_COMPLETED]
    await rig.runs.cancel_run(ALICE, blocker.run_id, "")
    await rig.wait_state(blocker.run_id, RunState.CANCELLED)
    assert queued.run_id not in rig.worker.started


async def test_a_queued_run_times_out_at_its_deadline(make_rig: RigFactory) -> None:
    rig = await make_rig(per_user=1)
    blocker = await rig.runs.start_run(ALICE, command(agent="slow"))
    queued = await rig.runs.start_run(ALICE, command(agent="echo", timeout_seconds=0.2))

    done, _ = await rig.runs.wait_run(ALICE, queued.run_id, 20)

    assert done.state is RunState.TIMED_OUT
    assert done.step(MAIN_STEP).state is StepState.SKIPPED
    await rig.runs.cancel_run(ALICE, blocker.run_id, "")


async def test_wait_run_returns_the_unfinished_run_when_its_timeout_passes(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(ALICE, command(agent="slow"))
    current, done = await rig.runs.wait_run(ALICE, run.run_id, 0.05)
    assert not done
    assert current.state in (RunState.QUEUED, RunState.RUNNING)
    await rig.runs.cancel_run(ALICE, run.run_id, "")


async def test_runs_keep_going_while_the_events_service_is_down(make_rig: RigFactory) -> None:
    rig = await make_rig(settings=ExecutorSettings(publish_wait_seconds=0.05))
    rig.publisher.down = True
    run = await rig.runs.start_run(ALICE, command())
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)
    assert done.state is RunState.SUCCEEDED
    assert rig.publisher.stored[run.run_id] == []

    rig.publisher.down = False
    events = await rig.published(run.run_id, 7)
    assert [e.seq for e in events] == list(range(1, 8))


async def test_after_a_restart_an_attempt_with_none_left_fails_and_queued_runs_resume(
    make_rig: RigFactory,
) -> None:
    previous = await make_rig(start=False)
    # What a previous process left behind: one run mid-attempt, one still queued.
    now = utcnow()
    stranded, stranded_queued = _stored_run(now, "slow")
    waiting, waiting_queued = _stored_run(now + timedelta(milliseconds=1), "echo")
    await previous.store.create_run(stranded, [stranded_queued])
    await previous.store.create_run(waiting, [waiting_queued])
    await previous.store.update_run(stranded.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, now, {}))

    restarted = await make_rig()  # "slow" allows one attempt

    failed, _ = await restarted.runs.wait_run(ALICE, stranded.run_id, 20)
    assert failed.state is RunState.FAILED
    assert failed.error is not None and failed.error.reason == EXECUTOR_RESTARTED
    step = failed.step(MAIN_STEP)
    assert (step.state, step.attempts) == (StepState.FAILED, 1)
    resumed, _ = await restarted.runs.wait_run(ALICE, waiting.run_id, 20)
    assert resumed.state is RunState.SUCCEEDED
    events = await restarted.published(stranded.run_id, 5)
    assert [e.type for e in events] == [
        EventType.RUN_QUEUED,
        EventType.AGENT_STARTED,
        EventType.AGENT_FAILED,  # the interrupted attempt
        EventType.AGENT_FAILED,  # the step, for good
        EventType.RUN_COMPLETED,
    ]
    assert events[2].payload["interrupted"] is True
    assert stranded.run_id not in restarted.worker.started


async def test_after_a_restart_an_interrupted_attempt_is_retried_when_the_policy_allows(
    make_rig: RigFactory,
) -> None:
    previous = await make_rig(start=False)
    now = utcnow()
    stranded, queued = _stored_run(now, "slow")
    await previous.store.create_run(stranded, [queued])
    await previous.store.update_run(stranded.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, now, {}))
    patient = RetrySettings(max_attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.02)

    restarted = await make_rig(agents={"slow": agent_spec("slow", previous.endpoint, retry=patient)})

    async with asyncio.timeout(20):
        await restarted.worker.started[stranded.run_id].wait()
    running = await restarted.store.get_run(stranded.run_id)
    assert running is not None and running.state is RunState.RUNNING
    step = running.step(MAIN_STEP)
    assert (step.state, step.attempts) == (StepState.RUNNING, 2)
    assert step.error is not None and step.error.reason == EXECUTOR_RESTARTED
    request = next(r for r in restarted.worker.requests if r.context.run_id == stranded.run_id)
    assert request.context.attempt == 2
    await restarted.runs.cancel_run(ALICE, stranded.run_id, "")


def _stored_run(now: datetime, agent: str) -> tuple[RunRecord, EventDraft]:
    context = ExecutionContext.for_new_run(
        ALICE, thread_id="", request_id="", deadline=now + timedelta(minutes=5), trace_carrier={}
    )
    return new_run(context, agent=agent, input={"text": "x"}, labels={}, now=now, trace_id="")
