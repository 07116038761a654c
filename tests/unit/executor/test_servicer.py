"""The servicer in-process: request validation (every bad field named),
roles, proto translation and pagination."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from switchboard.executor.v1 import executor_service_pb2, run_pb2

from services.common import convert
from services.common.auth import Role
from services.common.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from services.executor.domain import ExecutorSettings, RunFilter
from services.executor.servicer import ExecutorServicer
from tests.unit.executor.conftest import ALICE, BOB, Rig, RigFactory, agent_spec, context_of, principal

SETTINGS = ExecutorSettings()


def start_request(**fields: object) -> executor_service_pb2.StartRunRequest:
    values: dict[str, object] = {"agent": "echo", "input": convert.struct({"text": "hi"})}
    values.update(fields)
    return executor_service_pb2.StartRunRequest(**values)  # type: ignore[arg-type]


def seconds(value: float) -> duration_pb2.Duration:
    return convert.duration(value)


async def servicer_for(make_rig: RigFactory, **options: object) -> tuple[Rig, ExecutorServicer]:
    rig = await make_rig(**options)
    return rig, ExecutorServicer(rig.runs, SETTINGS)


def bad_request_fields(error: InvalidArgument) -> set[str]:
    status = error.to_status_proto()
    fields: set[str] = set()
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields |= {v.field for v in bad_request.field_violations}
    return fields


async def test_start_run_answers_with_the_run(make_rig: RigFactory) -> None:
    rig, servicer = await servicer_for(make_rig)
    response = await servicer.StartRun(
        start_request(thread_id="t-1", request_id="r-1", labels={"team": "a"}), context_of(ALICE)
    )
    run = response.run
    assert run.run_id and run.user_id == ALICE.user_id and run.agent == "echo"
    assert (run.thread_id, run.request_id, dict(run.labels)) == ("t-1", "r-1", {"team": "a"})
    assert run.state != run_pb2.RUN_STATE_UNSPECIFIED
    assert convert.from_struct(run.input) == {"text": "hi"}
    assert run.deadline.ToSeconds() - run.create_time.ToSeconds() == pytest.approx(300, abs=1)
    assert [s.step_id for s in run.steps] == ["main"]
    await rig.runs.wait_run(ALICE, run.run_id, 20)


async def test_every_bad_field_is_named_in_one_answer(make_rig: RigFactory) -> None:
    _, servicer = await servicer_for(make_rig)
    request = start_request(
        agent="Not A Name",
        thread_id="t" * 129,
        request_id="bad\nid",
        timeout=seconds(25 * 3600),
        labels={"Bad Key": "x", "fine": "v" * 257},
    )
    with pytest.raises(InvalidArgument) as refused:
        await servicer.StartRun(request, context_of(ALICE))
    expected = {"agent", "thread_id", "request_id", "timeout", "labels.Bad Key", "labels.fine"}
    assert {v.field for v in refused.value.violations} == expected
    assert bad_request_fields(refused.value) == expected


async def test_a_missing_target_and_a_negative_timeout_are_refused(make_rig: RigFactory) -> None:
    _, servicer = await servicer_for(make_rig)
    request = executor_service_pb2.StartRunRequest(timeout=duration_pb2.Duration(seconds=-1))
    with pytest.raises(InvalidArgument) as refused:
        await servicer.StartRun(request, context_of(ALICE))
    assert {v.field for v in refused.value.violations} == {"agent", "timeout"}


def workflow_request(*steps: run_pb2.WorkflowStep, **fields: object) -> executor_service_pb2.StartRunRequest:
    return executor_service_pb2.StartRunRequest(workflow=run_pb2.Workflow(steps=steps), **fields)  # type: ignore[arg-type]


async def test_a_broken_workflow_is_refused_naming_its_steps_and_every_other_problem(
    make_rig: RigFactory,
) -> None:
    _, servicer = await servicer_for(make_rig)
    request = workflow_request(
        run_pb2.WorkflowStep(step_id="a", agent="echo", depends_on=["b"]),
        run_pb2.WorkflowStep(step_id="b", agent="echo", depends_on=["a"]),
        run_pb2.WorkflowStep(step_id="c", agent="echo", depends_on=["ghost"]),
        timeout=seconds(-1),
    )
    with pytest.raises(InvalidArgument) as refused:
        await servicer.StartRun(request, context_of(ALICE))
    assert refused.value.reason == "WORKFLOW_INVALID"
    fields = bad_request_fields(refused.value)
    assert {"workflow.steps[0].depends_on[0]", "workflow.steps[2].depends_on[0]", "timeout"} <= fields
    message = refused.value.message
    assert "a -> b -> a" in message and "'ghost'" in message


async def test_a_workflow_naming_unknown_agents_or_bad_inputs_is_refused(make_rig: RigFactory) -> None:
    rig, servicer = await servicer_for(make_rig)
    rig.agents.specs["strict"] = agent_spec(
        "strict", rig.endpoint, input_schema={"type": "object", "required": ["text"]}
    )
    request = workflow_request(
        run_pb2.WorkflowStep(step_id="a", agent="strict"),
        run_pb2.WorkflowStep(step_id="b", agent="nobody", compensation_agent="nobody-either"),
        # Takes its text from a's output: checked when it starts, not now.
        run_pb2.WorkflowStep(
            step_id="c",
            agent="strict",
            depends_on=["a"],
            input=convert.struct({"text": "${steps.a.output.text}"}),
        ),
    )
    with pytest.raises(InvalidArgument) as refused:
        await servicer.StartRun(request, context_of(ALICE))
    assert refused.value.reason == "WORKFLOW_INVALID"
    assert bad_request_fields(refused.value) == {
        "workflow.steps[0].input.text",
        "workflow.steps[1].agent",
        "workflow.steps[1].compensation_agent",
    }
    assert await rig.store.list_runs(ALICE.user_id, RunFilter(), 10, None) == []


async def test_a_workflow_run_shows_its_workflow_and_steps(make_rig: RigFactory) -> None:
    rig, servicer = await servicer_for(make_rig)
    request = workflow_request(
        run_pb2.WorkflowStep(step_id="a", agent="echo", input=convert.struct({"n": 1})),
        run_pb2.WorkflowStep(step_id="b", agent="echo", depends_on=["a"], compensation_agent="echo"),
    )
    run = (await servicer.StartRun(request, context_of(ALICE))).run
    assert run.agent == ""
    assert [(s.step_id, list(s.depends_on), s.compensation_agent) for s in run.workflow.steps] == [
        ("a", [], ""),
        ("b", ["a"], "echo"),
    ]
    assert convert.from_struct(run.workflow.steps[0].input) == {"n": 1}
    assert [s.step_id for s in run.steps] == ["a", "b"]
    await rig.runs.wait_run(ALICE, run.run_id, 20)


async def test_a_full_queue_is_resource_exhausted_with_retry_info(make_rig: RigFactory) -> None:
    rig = await make_rig(
        per_user=1,
        settings=ExecutorSettings(max_queued_runs_per_user=2, queue_full_retry_after_seconds=7.0),
    )
    servicer = ExecutorServicer(rig.runs, SETTINGS)
    started = [
        (await servicer.StartRun(start_request(agent="slow"), context_of(ALICE))).run for _ in range(3)
    ]
    with pytest.raises(ResourceExhausted) as refused:
        await servicer.StartRun(start_request(agent="slow"), context_of(ALICE))
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "USER_QUEUE_FULL"
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in refused.value.to_status_proto().details)
    assert retry.retry_delay.seconds == 7
    # Another user is not affected, and a freed place is usable again.
    bobs = (await servicer.StartRun(start_request(agent="slow"), context_of(BOB))).run
    await rig.runs.cancel_run(ALICE, started[2].run_id, "")
    again = (await servicer.StartRun(start_request(agent="slow"), context_of(ALICE))).run
    for run in [*started, again]:
        await rig.runs.cancel_run(ALICE, run.run_id, "")
    await rig.runs.cancel_run(BOB, bobs.run_id, "")


async def test_services_cannot_start_or_read_runs(make_rig: RigFactory) -> None:
    _, servicer = await servicer_for(make_rig)
    service = context_of(principal("svc-worker", Role.SERVICE))
    with pytest.raises(PermissionDenied):
        await servicer.StartRun(start_request(), service)
    with pytest.raises(PermissionDenied):
        await servicer.ListRuns(executor_service_pb2.ListRunsRequest(), service)


async def test_admins_run_agents_and_see_only_their_own_runs(make_rig: RigFactory) -> None:
    rig, servicer = await servicer_for(make_rig)
    admin = principal("root", Role.ADMIN)
    alices = await servicer.StartRun(start_request(), context_of(ALICE))
    admins = await servicer.StartRun(start_request(), context_of(admin))
    listed = await servicer.ListRuns(executor_service_pb2.ListRunsRequest(), context_of(admin))
    assert [r.run_id for r in listed.runs] == [admins.run.run_id]
    await rig.runs.wait_run(ALICE, alices.run.run_id, 20)
    await rig.runs.wait_run(admin, admins.run.run_id, 20)


async def test_a_finished_run_shows_its_step_and_output(make_rig: RigFactory) -> None:
    _, servicer = await servicer_for(make_rig)
    started = await servicer.StartRun(start_request(), context_of(ALICE))
    waited = await servicer.WaitRun(
        executor_service_pb2.WaitRunRequest(run_id=started.run.run_id, timeout=seconds(20)), context_of(ALICE)
    )
    assert waited.done
    run = waited.run
    assert run.state == run_pb2.RUN_STATE_SUCCEEDED
    assert convert.from_struct(run.output) == {"echo": {"text": "hi"}}
    (step,) = run.steps
    assert (step.state, step.attempts) == (run_pb2.STEP_STATE_SUCCEEDED, 1)
    assert step.HasField("start_time") and step.HasField("end_time")
    assert run.HasField("start_time") and run.HasField("end_time")
    fetched = await servicer.GetRun(executor_service_pb2.GetRunRequest(run_id=run.run_id), context_of(ALICE))
    assert fetched.run == run


async def test_a_failed_run_carries_a_status_with_its_reason(make_rig: RigFactory) -> None:
    _, servicer = await servicer_for(make_rig)
    started = await servicer.StartRun(start_request(agent="broken"), context_of(ALICE))
    waited = await servicer.WaitRun(
        executor_service_pb2.WaitRunRequest(run_id=started.run.run_id, timeout=seconds(20)), context_of(ALICE)
    )
    error = waited.run.error
    assert waited.run.state == run_pb2.RUN_STATE_FAILED
    assert error.code == grpc.StatusCode.INTERNAL.value[0]
    info = error_details_pb2.ErrorInfo()
    assert error.details[0].Unpack(info) and info.reason == "BROKEN_TOOL"
    assert waited.run.steps[0].error.code == error.code


async def test_wait_run_answers_before_the_callers_deadline(make_rig: RigFactory) -> None:
    rig, servicer = await servicer_for(make_rig)
    started = await servicer.StartRun(start_request(agent="slow"), context_of(ALICE))
    waited = await servicer.WaitRun(
        executor_service_pb2.WaitRunRequest(run_id=started.run.run_id), context_of(ALICE, time_remaining=0.3)
    )
    assert not waited.done
    await rig.runs.cancel_run(ALICE, started.run.run_id, "")


async def test_run_ids_are_required_and_reasons_bounded(make_rig: RigFactory) -> None:
    _, servicer = await servicer_for(make_rig)
    with pytest.raises(InvalidArgument) as refused:
        await servicer.GetRun(executor_service_pb2.GetRunRequest(), context_of(ALICE))
    assert {v.field for v in refused.value.violations} == {"run_id"}
    with pytest.raises(InvalidArgument) as refused:
        await servicer.CancelRun(
            executor_service_pb2.CancelRunRequest(run_id="x", reason="r" * 513), context_of(ALICE)
        )
    assert {v.field for v in refused.value.violations} == {"reason"}


async def test_list_runs_pages_newest_first_with_filters(make_rig: RigFactory) -> None:
    rig, servicer = await servicer_for(make_rig)
    started = []
    for n in range(5):
        response = await servicer.StartRun(
            start_request(thread_id="even" if n % 2 == 0 else "odd"), context_of(ALICE)
        )
        started.append(response.run.run_id)
    await servicer.StartRun(start_request(), context_of(BOB))

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await servicer.ListRuns(
            executor_service_pb2.ListRunsRequest(page_size=2, page_token=token), context_of(ALICE)
        )
        seen += [r.run_id for r in page.runs]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(started))
    assert pages == 3

    evens = await servicer.ListRuns(executor_service_pb2.ListRunsRequest(thread_id="even"), context_of(ALICE))
    assert [r.run_id for r in evens.runs] == [started[4], started[2], started[0]]
    for run_id in started:
        await rig.runs.wait_run(ALICE, run_id, 20)
    succeeded = await servicer.ListRuns(
        executor_service_pb2.ListRunsRequest(state=run_pb2.RUN_STATE_SUCCEEDED, agent="echo"),
        context_of(ALICE),
    )
    assert len(succeeded.runs) == 5
    none = await servicer.ListRuns(
        executor_service_pb2.ListRunsRequest(state=run_pb2.RUN_STATE_FAILED), context_of(ALICE)
    )
    assert list(none.runs) == []


async def test_a_page_token_is_refused_with_other_filters_or_when_forged(make_rig: RigFactory) -> None:
    _, servicer = await servicer_for(make_rig)
    for _ in range(2):
        await servicer.StartRun(start_request(), context_of(ALICE))
    page = await servicer.ListRuns(executor_service_pb2.ListRunsRequest(page_size=1), context_of(ALICE))
    assert page.next_page_token
    for request in (
        executor_service_pb2.ListRunsRequest(page_token=page.next_page_token, agent="other"),
        executor_service_pb2.ListRunsRequest(page_token="forged"),
        executor_service_pb2.ListRunsRequest(state=99),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidArgument):
            await servicer.ListRuns(request, context_of(ALICE))
