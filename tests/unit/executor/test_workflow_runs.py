"""Workflow runs in-process: steps in dependency order with inputs mapped
from outputs, independent branches at once within the agents' limits, and
compensation in reverse completion order when a workflow fails or is
cancelled; recovery of a workflow that was compensating."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from services.common import convert
from services.common.convert import utcnow
from services.common.errors import InvalidArgument
from services.executor.domain import (
    EventType,
    ExecutionContext,
    RunError,
    RunRecord,
    RunState,
    StepState,
    begin_attempt,
    complete_step,
    fail_step,
    new_workflow_run,
)
from services.executor.runs import StartRunCommand
from services.executor.workflow import WorkflowStepSpec
from tests.unit.executor.conftest import ALICE, RigFactory, agent_spec


def workflow(*steps: WorkflowStepSpec, **fields: object) -> StartRunCommand:
    values: dict[str, object] = {"agent": "", "input": {"text": "hi"}, "workflow": steps}
    values.update(fields)
    return StartRunCommand(**values)  # type: ignore[arg-type]


def step(step_id: str, agent: str = "echo", **fields: object) -> WorkflowStepSpec:
    return WorkflowStepSpec(step_id=step_id, agent=agent, **fields)  # type: ignore[arg-type]


def states(run: RunRecord) -> dict[str, StepState]:
    return {s.step_id: s.state for s in run.steps}


async def test_steps_run_in_order_with_inputs_taken_from_their_dependencies(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(
        ALICE,
        workflow(
            step("first", input={"n": 1}),
            step("second", depends_on=("first",), input={"got": "${steps.first.output.echo.n}"}),
        ),
    )
    assert run.agent == "" and run.is_workflow

    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.SUCCEEDED
    assert states(done) == {"first": StepState.SUCCEEDED, "second": StepState.SUCCEEDED}
    assert done.step("first").output == {"echo": {"text": "hi", "n": 1}}
    # Step input merged over the run's input, the reference replaced by the value.
    assert done.step("second").output == {"echo": {"text": "hi", "got": 1}}
    # The workflow's output: its final steps' outputs, by step id.
    assert done.output == {"second": {"echo": {"text": "hi", "got": 1}}}
    assert [s.completion for s in done.steps] == [1, 2]
    requests = [r for r in rig.worker.requests if r.context.run_id == run.run_id]
    assert [(r.context.step_id, r.context.attempt) for r in requests] == [("first", 1), ("second", 1)]
    events = await rig.published(run.run_id, done.last_seq)
    assert {e.step_id for e in events if e.type is EventType.AGENT_STARTED} == {"first", "second"}
    assert events[-1].type is EventType.RUN_COMPLETED and events[-1].step_id == ""


async def test_independent_branches_run_at_once(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(
        ALICE,
        workflow(step("left", "slow"), step("right", "slow"), step("join", depends_on=("left", "right"))),
    )

    both = await rig.wait_for(
        run.run_id, lambda r: r.step("left").state is r.step("right").state is StepState.RUNNING
    )
    # The worker has both calls: the cancel has something to reach.
    async with asyncio.timeout(20):
        for branch in ("left", "right"):
            await rig.worker.step_started[(run.run_id, branch)].wait()

    assert both.step("join").state is StepState.PENDING
    cancelled = await rig.runs.cancel_run(ALICE, run.run_id, "enough")
    # Nothing to undo: it ends at once.
    assert cancelled.state is RunState.CANCELLED
    assert states(cancelled) == {
        "left": StepState.CANCELLED,
        "right": StepState.CANCELLED,
        "join": StepState.SKIPPED,
    }
    async with asyncio.timeout(20):
        await rig.worker.cancelled[run.run_id].wait()


async def test_branches_wait_for_their_agents_slots(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.agents.specs["slow"] = agent_spec("slow", rig.endpoint, max_concurrency=1)
    run = await rig.runs.start_run(ALICE, workflow(step("left", "slow"), step("right", "slow")))

    one = await rig.wait_for(run.run_id, lambda r: StepState.RUNNING in states(r).values())
    await asyncio.sleep(0.3)  # a second slot would have been handed out by now

    current = await rig.store.get_run(run.run_id)
    assert current is not None
    assert sorted(states(current).values()) == [StepState.PENDING, StepState.RUNNING]
    assert (await rig.store.active_counts()).per_agent.get("slow") == 1
    assert one.run_id == run.run_id
    await rig.runs.cancel_run(ALICE, run.run_id, "")
    await rig.wait_state(run.run_id, RunState.CANCELLED)


async def test_a_failed_step_compensates_completed_steps_in_reverse_order(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(
        ALICE,
        workflow(
            step("book", input={"what": "hotel"}, compensation_agent="echo"),
            step("pay", depends_on=("book",), input={"what": "card"}, compensation_agent="echo"),
            step("mail", depends_on=("book",)),  # no compensation: nothing to undo
            step("ship", "broken", depends_on=("pay", "mail")),
            step("after", depends_on=("ship",), compensation_agent="echo"),
        ),
    )

    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.FAILED
    assert done.error is not None and done.error.reason == "BROKEN_TOOL"
    assert "'ship'" in done.error.message
    assert states(done) == {
        "book": StepState.COMPENSATED,
        "pay": StepState.COMPENSATED,
        "mail": StepState.SUCCEEDED,
        "ship": StepState.FAILED,
        "after": StepState.SKIPPED,
    }
    events = await rig.published(run.run_id, done.last_seq)
    undone = [e for e in events if e.payload.get("compensation") and e.type is EventType.AGENT_COMPLETED]
    assert [e.step_id for e in undone] == ["pay", "book"]
    # Each compensation ran with the output of the step it undoes.
    compensations = [
        r
        for r in rig.worker.requests
        if r.context.run_id == run.run_id and r.context.step_id in ("book", "pay")
    ][2:]
    assert [r.context.step_id for r in compensations] == ["pay", "book"]
    assert convert.from_struct(compensations[0].input)["echo"]["what"] == "card"
    assert events[-1].type is EventType.RUN_COMPLETED
    assert events[-1].payload["state"] == "RUN_STATE_FAILED"


async def test_a_cancelled_workflow_compensates_then_ends_cancelled(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(
        ALICE, workflow(step("book", compensation_agent="echo"), step("wait", "slow", depends_on=("book",)))
    )
    await rig.wait_for(run.run_id, lambda r: r.step("wait").state is StepState.RUNNING)
    async with asyncio.timeout(20):
        await rig.worker.step_started[(run.run_id, "wait")].wait()

    answered = await rig.runs.cancel_run(ALICE, run.run_id, "changed my mind")

    # Something may need undoing: the answer comes while it winds down.
    assert answered.state is RunState.RUNNING and answered.ending is RunState.CANCELLED
    async with asyncio.timeout(20):
        await rig.worker.cancelled[run.run_id].wait()
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)
    assert done.state is RunState.CANCELLED
    assert done.error is not None and done.error.message == "changed my mind"
    assert states(done) == {"book": StepState.COMPENSATED, "wait": StepState.CANCELLED}


async def test_a_failing_compensation_leaves_its_step_succeeded_with_the_error(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(
        ALICE,
        workflow(
            step("first", compensation_agent="echo"),
            step("second", depends_on=("first",), compensation_agent="broken"),
            step("third", "broken", depends_on=("second",)),
        ),
    )

    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.FAILED
    assert states(done)["second"] is StepState.SUCCEEDED
    second_error = done.step("second").error
    assert second_error is not None and "compensation by 'broken' failed" in second_error.message
    # The others are still undone.
    assert states(done)["first"] is StepState.COMPENSATED


async def test_an_input_reference_that_finds_nothing_fails_its_step_without_retries(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(
        ALICE,
        workflow(
            step("first"), step("second", depends_on=("first",), input={"x": "${steps.first.output.nope}"})
        ),
    )
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)
    assert done.state is RunState.FAILED
    second = done.step("second")
    assert second.state is StepState.FAILED and second.attempts == 0
    assert second.error is not None and second.error.reason == "INPUT_MAPPING_FAILED"


async def test_a_workflow_past_its_deadline_times_out(make_rig: RigFactory) -> None:
    rig = await make_rig()
    run = await rig.runs.start_run(
        ALICE,
        workflow(
            step("first", compensation_agent="echo"),
            step("second", "slow", depends_on=("first",)),
            # Room for the first step to finish and the second to start first.
            timeout_seconds=3,
        ),
    )
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)
    assert done.state is RunState.TIMED_OUT
    # Compensation gets its own time after the run's deadline.
    assert states(done) == {"first": StepState.COMPENSATED, "second": StepState.TIMED_OUT}


async def test_a_broken_graph_is_refused_before_anything_is_stored(make_rig: RigFactory) -> None:
    rig = await make_rig()
    with pytest.raises(InvalidArgument) as refused:
        await rig.runs.start_run(ALICE, workflow(step("a", depends_on=("b",)), step("b", depends_on=("a",))))
    assert refused.value.reason == "WORKFLOW_INVALID"
    assert await rig.store.queued_count() == 0


async def test_a_workflow_that_was_compensating_finishes_after_a_restart(make_rig: RigFactory) -> None:
    previous = await make_rig(start=False)
    now = utcnow()
    context = ExecutionContext.for_new_run(
        ALICE, thread_id="", request_id="", deadline=now + timedelta(minutes=5), trace_carrier={}
    )
    run, queued = new_workflow_run(
        context,
        steps=[step("book", compensation_agent="echo"), step("pay", "broken", depends_on=("book",))],
        input={"text": "x"},
        labels={},
        now=now,
        trace_id="",
    )
    await previous.store.create_run(run, [queued])
    # The previous process: book succeeded, pay failed for good, then it died.
    await previous.store.update_run(run.run_id, lambda r: begin_attempt(r, "book", 1, now, {}))
    await previous.store.update_run(run.run_id, lambda r: complete_step(r, "book", 1, {"id": 7}, now, {}))
    await previous.store.update_run(run.run_id, lambda r: begin_attempt(r, "pay", 1, now, {}))
    failure = RunError("INTERNAL", "BROKEN_TOOL", "broke")
    await previous.store.update_run(run.run_id, lambda r: fail_step(r, "pay", failure, now, {}))

    restarted = await make_rig()

    done, _ = await restarted.runs.wait_run(ALICE, run.run_id, 20)
    assert done.state is RunState.FAILED
    assert states(done) == {"book": StepState.COMPENSATED, "pay": StepState.FAILED}
    (undo,) = [r for r in restarted.worker.requests if r.context.run_id == run.run_id]
    assert (undo.agent, undo.context.step_id, dict(undo.input)) == ("echo", "book", {"id": 7.0})
