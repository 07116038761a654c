"""The run and step state machines, the execution context, the rules that
decide each change, and input validation."""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from services.executor.domain import (
    MAIN_STEP,
    RUN_TRANSITIONS,
    STEP_TRANSITIONS,
    EventType,
    ExecutionContext,
    InvalidTransition,
    Progress,
    RunChange,
    RunError,
    RunRecord,
    RunState,
    StepState,
    Thinking,
    ToolFinished,
    ToolStarted,
    apply_change,
    begin_attempt,
    begin_compensation,
    check_run_transition,
    check_step_transition,
    complete_compensation,
    complete_step,
    counts_against_endpoint,
    end_run,
    events_with_seq,
    fail_compensation,
    fail_step,
    finish_run,
    halt_steps,
    interrupt_run,
    may_need_compensation,
    new_run,
    new_workflow_run,
    record_progress,
    retry_later,
    steps_to_compensate,
    stop_run,
    validate_input,
)
from services.executor.workflow import WorkflowStepSpec
from tests.unit.executor.conftest import ALICE

NOW = datetime(2030, 1, 1, tzinfo=UTC)
CARRIER = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
ERROR = RunError("CANCELLED", "RUN_CANCELLED", "stop")


def context() -> ExecutionContext:
    return ExecutionContext.for_new_run(
        ALICE, thread_id="t", request_id="r", deadline=NOW + timedelta(minutes=5), trace_carrier=CARRIER
    )


def queued_run() -> RunRecord:
    run, queued = new_run(
        context(), agent="echo", input={"a": 1}, labels={"k": "v"}, now=NOW, trace_id="t" * 32
    )
    return apply_change(run, RunChange(events=(queued,)))


def running_run() -> RunRecord:
    run = queued_run()
    change = begin_attempt(run, MAIN_STEP, 1, NOW, CARRIER)
    assert change is not None
    return apply_change(run, change)


# -- state machines ------------------------------------------------------------

ALLOWED_RUN = {
    (RunState.QUEUED, RunState.RUNNING),
    (RunState.QUEUED, RunState.CANCELLED),
    (RunState.QUEUED, RunState.TIMED_OUT),
    (RunState.QUEUED, RunState.FAILED),
    (RunState.RUNNING, RunState.SUCCEEDED),
    (RunState.RUNNING, RunState.FAILED),
    (RunState.RUNNING, RunState.CANCELLED),
    (RunState.RUNNING, RunState.TIMED_OUT),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(RunState, RunState)))
def test_run_transitions_are_exactly_the_allowed_ones(current: RunState, target: RunState) -> None:
    if (current, target) in ALLOWED_RUN:
        check_run_transition(current, target)
    else:
        with pytest.raises(InvalidTransition) as refused:
            check_run_transition(current, target)
        assert refused.value.reason == "INVALID_STATE_TRANSITION"


def test_terminal_run_states_have_no_way_out() -> None:
    for state in RunState:
        assert state.terminal == (not RUN_TRANSITIONS[state])
    assert {s for s in RunState if s.terminal} == {
        RunState.SUCCEEDED,
        RunState.FAILED,
        RunState.CANCELLED,
        RunState.TIMED_OUT,
    }


def test_step_transitions() -> None:
    check_step_transition(StepState.PENDING, StepState.RUNNING)
    check_step_transition(StepState.RUNNING, StepState.RETRYING)
    check_step_transition(StepState.RETRYING, StepState.RUNNING)
    check_step_transition(StepState.SUCCEEDED, StepState.COMPENSATED)
    for current, target in [
        (StepState.PENDING, StepState.SUCCEEDED),
        (StepState.SUCCEEDED, StepState.RUNNING),
        (StepState.FAILED, StepState.RUNNING),
        (StepState.SKIPPED, StepState.RUNNING),
        (StepState.COMPENSATED, StepState.SUCCEEDED),
    ]:
        with pytest.raises(InvalidTransition):
            check_step_transition(current, target)
    for state in (StepState.FAILED, StepState.CANCELLED, StepState.SKIPPED, StepState.TIMED_OUT):
        assert state.terminal and not STEP_TRANSITIONS[state]


def test_apply_change_refuses_a_forbidden_transition() -> None:
    done = apply_change(running_run(), RunChange(state=RunState.SUCCEEDED))
    with pytest.raises(InvalidTransition):
        apply_change(done, RunChange(state=RunState.RUNNING))


# -- execution context -----------------------------------------------------------


def test_the_execution_context_is_immutable_and_holds_no_mutable_state() -> None:
    ctx = context()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.user_id = "someone-else"  # type: ignore[misc]
    assert isinstance(ctx.trace_carrier, tuple)
    for value in dataclasses.astuple(ctx):
        assert not isinstance(value, dict | list | set)
    # The dict handed to propagation APIs is a copy: changing it changes nothing.
    ctx.carrier()["traceparent"] = "tampered"
    assert dict(ctx.trace_carrier) == CARRIER
    hash(ctx)


def test_the_context_comes_from_the_principal_with_server_generated_ids() -> None:
    first, second = context(), context()
    assert first.user_id == ALICE.user_id
    assert first.run_id != second.run_id
    assert uuid.UUID(first.run_id).version == 4
    anonymous = ExecutionContext.for_new_run(
        ALICE, thread_id="", request_id="", deadline=NOW, trace_carrier={}
    )
    assert uuid.UUID(anonymous.request_id).version == 4


def test_a_step_gets_its_own_child_context() -> None:
    parent = context()
    child = parent.with_step("main", attempt=2)
    assert (child.step_id, child.attempt) == ("main", 2)
    assert (parent.step_id, parent.attempt) == ("", 0)
    assert (child.user_id, child.run_id, child.deadline, child.trace_carrier) == (
        parent.user_id,
        parent.run_id,
        parent.deadline,
        parent.trace_carrier,
    )
    with pytest.raises(ValueError):
        parent.with_step("main", attempt=0)


def test_a_stored_run_gives_back_the_context_it_was_created_with() -> None:
    ctx = context()
    run, _ = new_run(ctx, agent="echo", input={}, labels={}, now=NOW, trace_id="")
    assert run.context() == ctx


# -- rules -----------------------------------------------------------------------


def test_a_new_run_is_queued_with_one_pending_step_and_run_queued() -> None:
    run = queued_run()
    assert run.state is RunState.QUEUED
    assert [(s.step_id, s.state) for s in run.steps] == [(MAIN_STEP, StepState.PENDING)]
    assert run.last_seq == 1


def test_events_are_numbered_after_the_newest_one_without_gaps() -> None:
    run = running_run()
    assert run.last_seq == 2
    change = complete_step(run, MAIN_STEP, 1, {"x": 1}, NOW, CARRIER)
    assert change is not None
    numbered = events_with_seq(run, change)
    assert [(e.seq, e.type) for e in numbered] == [
        (3, EventType.AGENT_COMPLETED),
        (4, EventType.RUN_COMPLETED),
    ]
    assert {e.user_id for e in numbered} == {ALICE.user_id}
    assert all(dict(e.trace_carrier) == CARRIER for e in numbered)
    assert apply_change(run, change).last_seq == 4


def test_progress_becomes_the_matching_event() -> None:
    run = running_run()
    cases: list[tuple[Progress, EventType, str]] = [
        (Thinking("pondering"), EventType.AGENT_THINKING, "text"),
        (ToolStarted("c1", "search", {"q": "x"}), EventType.TOOL_EXECUTING, "arguments"),
        (ToolFinished("c1", "search", {"hits": 2}), EventType.TOOL_COMPLETED, "result"),
    ]
    for update, expected, key in cases:
        change = record_progress(run, MAIN_STEP, 1, update, NOW, CARRIER)
        assert change is not None and change.state is None
        (event,) = change.events
        assert event.type is expected and key in event.payload and event.step_id == MAIN_STEP


def test_nothing_is_recorded_for_a_run_that_already_ended() -> None:
    run = running_run()
    ended = end_run(run, RunState.CANCELLED, ERROR, NOW, CARRIER)
    assert ended is not None
    cancelled = apply_change(run, ended)
    assert record_progress(cancelled, MAIN_STEP, 1, Thinking("late"), NOW, CARRIER) is None
    assert complete_step(cancelled, MAIN_STEP, 1, {}, NOW, CARRIER) is None
    assert end_run(cancelled, RunState.FAILED, ERROR, NOW, CARRIER) is None
    assert begin_attempt(cancelled, MAIN_STEP, 2, NOW, CARRIER) is None


def test_ending_a_running_run_ends_its_step_the_same_way() -> None:
    run = running_run()
    change = end_run(run, RunState.TIMED_OUT, ERROR, NOW, CARRIER)
    assert change is not None
    after = apply_change(run, change)
    assert after.state is RunState.TIMED_OUT
    assert after.step(MAIN_STEP).state is StepState.TIMED_OUT
    assert after.step(MAIN_STEP).error == ERROR
    assert [e.type for e in change.events] == [EventType.AGENT_FAILED, EventType.RUN_COMPLETED]
    assert change.events[-1].payload["state"] == "RUN_STATE_TIMED_OUT"


def test_ending_a_queued_run_skips_its_step() -> None:
    run = queued_run()
    change = end_run(run, RunState.CANCELLED, ERROR, NOW, CARRIER)
    assert change is not None
    after = apply_change(run, change)
    assert after.step(MAIN_STEP).state is StepState.SKIPPED
    assert [e.type for e in change.events] == [EventType.RUN_COMPLETED]


def test_a_run_cannot_end_as_succeeded_with_an_error() -> None:
    with pytest.raises(ValueError):
        end_run(running_run(), RunState.SUCCEEDED, ERROR, NOW, CARRIER)


# -- retries, workflows, winding down, recovery ------------------------------------


def workflow_run(*specs: WorkflowStepSpec) -> RunRecord:
    run, queued = new_workflow_run(
        context(), steps=specs, input={"a": 1}, labels={}, now=NOW, trace_id="t" * 32
    )
    return apply_change(run, RunChange(events=(queued,)))


def applied(run: RunRecord, change: RunChange | None) -> RunRecord:
    assert change is not None
    return apply_change(run, change)


def started(run: RunRecord, *step_ids: str) -> RunRecord:
    for step_id in step_ids:
        run = applied(run, begin_attempt(run, step_id, run.step(step_id).attempts + 1, NOW, CARRIER))
    return run


def succeeded(run: RunRecord, step_id: str, output: dict[str, object]) -> RunRecord:
    return applied(run, complete_step(run, step_id, run.step(step_id).attempts, output, NOW, CARRIER))


DIAMOND = (
    WorkflowStepSpec("a", "echo", compensation_agent="undo"),
    WorkflowStepSpec("b", "echo", depends_on=("a",), compensation_agent="undo"),
    WorkflowStepSpec("c", "echo", depends_on=("a",)),
    WorkflowStepSpec("d", "echo", depends_on=("b", "c")),
)


def test_a_failed_attempt_waits_retrying_with_its_error_and_says_when_it_retries() -> None:
    run = running_run()
    failure = RunError("UNKNOWN", "FLAKY", "flaked")
    waiting = applied(run, retry_later(run, MAIN_STEP, 1, failure, 0.25, NOW, CARRIER))
    step = waiting.step(MAIN_STEP)
    assert (step.state, step.error, waiting.state) == (StepState.RETRYING, failure, RunState.RUNNING)
    change = retry_later(run, MAIN_STEP, 1, failure, 0.25, NOW, CARRIER)
    assert change is not None
    (event,) = change.events
    assert event.type is EventType.AGENT_FAILED
    assert event.payload == {"error": failure.as_payload(), "attempt": 1, "retry_in_seconds": 0.25}
    # A stale verdict (another attempt number) changes nothing.
    assert retry_later(run, MAIN_STEP, 2, failure, 0.25, NOW, CARRIER) is None
    again = applied(waiting, begin_attempt(waiting, MAIN_STEP, 2, NOW, CARRIER))
    assert (again.step(MAIN_STEP).state, again.step(MAIN_STEP).attempts) == (StepState.RUNNING, 2)


def test_a_workflow_succeeds_with_its_last_step_and_outputs_its_final_steps() -> None:
    run = started(workflow_run(*DIAMOND), "a")
    run = succeeded(run, "a", {"x": 1})
    run = started(run, "b", "c")
    run = succeeded(run, "c", {"c": True})
    assert run.state is RunState.RUNNING
    run = succeeded(run, "b", {"b": True})
    run = started(run, "d")
    change = complete_step(run, "d", 1, {"d": 4}, NOW, CARRIER)
    done = applied(run, change)
    assert done.state is RunState.SUCCEEDED
    assert done.output == {"d": {"d": 4}}
    assert [(s.step_id, s.completion) for s in done.steps] == [("a", 1), ("b", 3), ("c", 2), ("d", 4)]
    assert change is not None and [e.type for e in change.events][-1] is EventType.RUN_COMPLETED


def test_a_failed_step_winds_the_workflow_down_and_the_rest_follows() -> None:
    run = succeeded(started(workflow_run(*DIAMOND), "a"), "a", {"id": 7})
    run = started(run, "b", "c")
    run = succeeded(run, "b", {"paid": True})
    failure = RunError("INTERNAL", "BROKEN", "it broke")
    failing = applied(run, fail_step(run, "c", failure, NOW, CARRIER))
    assert failing.state is RunState.RUNNING and failing.ending is RunState.FAILED
    assert failing.error is not None and failing.error.reason == "BROKEN" and "'c'" in failing.error.message
    assert {s.step_id: s.state for s in failing.steps} == {
        "a": StepState.SUCCEEDED,
        "b": StepState.SUCCEEDED,
        "c": StepState.FAILED,
        "d": StepState.SKIPPED,
    }
    # No new attempt starts while it winds down; a second failure is only recorded.
    assert begin_attempt(failing, "d", 1, NOW, CARRIER) is None
    assert stop_run(failing, RunState.CANCELLED, ERROR, NOW, CARRIER) is None
    assert steps_to_compensate(failing) == ["b", "a"]
    for step_id in ("b", "a"):
        failing = applied(failing, begin_compensation(failing, step_id, 1, NOW, CARRIER))
        failing = applied(
            failing, complete_compensation(failing, step_id, 1, {"undone": step_id}, NOW, CARRIER)
        )
    assert steps_to_compensate(failing) == []
    assert failing.step("a").state is StepState.COMPENSATED
    assert failing.step("a").output == {"id": 7}  # the step's own output stays
    done = applied(failing, finish_run(failing, NOW, CARRIER))
    assert (done.state, done.error) == (RunState.FAILED, failing.error)


def test_stopping_a_workflow_with_nothing_to_undo_ends_it_at_once() -> None:
    plain = (WorkflowStepSpec("a", "echo"), WorkflowStepSpec("b", "echo", depends_on=("a",)))
    run = started(workflow_run(*plain), "a")
    ended = applied(run, stop_run(run, RunState.CANCELLED, ERROR, NOW, CARRIER))
    assert ended.state is RunState.CANCELLED
    assert [s.state for s in ended.steps] == [StepState.CANCELLED, StepState.SKIPPED]


def test_stopping_a_workflow_that_may_need_undoing_halts_its_steps_then_ends() -> None:
    run = started(workflow_run(*DIAMOND), "a")
    # "a" is running and has a compensation agent: it may still succeed.
    assert may_need_compensation(run)
    winding = applied(run, stop_run(run, RunState.TIMED_OUT, ERROR, NOW, CARRIER))
    assert winding.state is RunState.RUNNING and winding.ending is RunState.TIMED_OUT
    halted = applied(winding, halt_steps(winding, NOW, CARRIER))
    assert [s.state for s in halted.steps] == [
        StepState.TIMED_OUT,
        StepState.SKIPPED,
        StepState.SKIPPED,
        StepState.SKIPPED,
    ]
    assert halt_steps(halted, NOW, CARRIER) is None
    assert applied(halted, finish_run(halted, NOW, CARRIER)).state is RunState.TIMED_OUT


def test_a_failed_compensation_keeps_the_step_succeeded_with_the_reason() -> None:
    run = succeeded(started(workflow_run(*DIAMOND[:2]), "a"), "a", {})
    run = applied(run, stop_run(run, RunState.CANCELLED, ERROR, NOW, CARRIER))
    failure = RunError("UNAVAILABLE", "WORKER_UNAVAILABLE", "no answer")
    after = applied(run, fail_compensation(run, "a", 2, failure, NOW, CARRIER))
    step = after.step("a")
    assert step.state is StepState.SUCCEEDED
    assert step.error is not None and step.error.reason == "WORKER_UNAVAILABLE"
    assert "compensation by 'undo' failed" in step.error.message


def test_an_interrupted_attempt_leaves_its_step_retrying_with_the_reason() -> None:
    run = running_run()
    restarted = RunError("ABORTED", "EXECUTOR_RESTARTED", "restart")
    change = interrupt_run(run, restarted, NOW, CARRIER)
    after = applied(run, change)
    assert after.state is RunState.RUNNING
    assert (after.step(MAIN_STEP).state, after.step(MAIN_STEP).error) == (StepState.RETRYING, restarted)
    assert change is not None and change.events[0].payload["interrupted"] is True
    assert interrupt_run(queued_run(), restarted, NOW, CARRIER) is None
    # With no attempt left, the step fails for good (the single-agent run with it).
    failed = applied(after, fail_step(after, MAIN_STEP, restarted, NOW, CARRIER))
    assert (failed.state, failed.step(MAIN_STEP).state) == (RunState.FAILED, StepState.FAILED)


def test_only_failures_of_the_endpoint_count_against_its_breaker() -> None:
    assert counts_against_endpoint(RunError("UNAVAILABLE", "WORKER_UNAVAILABLE", ""))
    assert counts_against_endpoint(RunError("UNAVAILABLE", "HEARTBEAT_TIMEOUT", ""))
    assert counts_against_endpoint(RunError("INTERNAL", "ANYTHING", ""))
    assert not counts_against_endpoint(RunError("UNKNOWN", "INVALID_INPUT", ""))
    assert not counts_against_endpoint(RunError("FAILED_PRECONDITION", "NO_SUCH_CITY", ""))


# -- input validation --------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "required": ["text", "options"],
    "properties": {
        "text": {"type": "string", "maxLength": 5},
        "top": {"type": "integer", "minimum": 1},
        "options": {
            "type": "object",
            "required": ["mode"],
            "properties": {"mode": {"enum": ["fast", "slow"]}},
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


def test_valid_input_passes() -> None:
    validate_input(SCHEMA, {"text": "hi", "top": 3.0, "options": {"mode": "fast"}, "tags": ["a"]})


def test_an_empty_schema_accepts_any_object() -> None:
    validate_input({}, {"anything": [1, 2, {"x": None}]})


def test_each_failing_path_is_one_violation() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_input(SCHEMA, {"text": "far too long", "top": 0, "options": {}, "tags": ["ok", 7]})
    assert refused.value.reason == "INPUT_INVALID"
    fields = [v.field for v in refused.value.violations]
    assert sorted(fields) == ["input.options.mode", "input.tags.1", "input.text", "input.top"]
    assert len(fields) == len(set(fields))


def test_missing_properties_name_themselves() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_input(SCHEMA, {})
    assert {v.field: v.description for v in refused.value.violations} == {
        "input.text": "is required",
        "input.options": "is required",
    }


def test_an_invalid_schema_is_the_agents_problem_not_the_callers() -> None:
    with pytest.raises(FailedPrecondition) as refused:
        validate_input({"type": "no-such-type"}, {})
    assert refused.value.reason == "AGENT_SCHEMA_INVALID"
