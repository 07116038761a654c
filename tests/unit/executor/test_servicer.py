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
from services.common.errors import InvalidArgument, PermissionDenied, Unimplemented
from services.executor.domain import ExecutorSettings
from services.executor.servicer import ExecutorServicer
from tests.unit.executor.conftest import ALICE, BOB, Rig, RigFactory, context_of, principal

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


async def test_a_workflow_is_not_implemented_yet(make_rig: RigFactory) -> None:
    _, servicer = await servicer_for(make_rig)
    request = executor_service_pb2.StartRunRequest(
        workflow=run_pb2.Workflow(steps=[run_pb2.WorkflowStep(step_id="a", agent="echo")])
    )
    with pytest.raises(Unimplemented) as refused:
        await servicer.StartRun(request, context_of(ALICE))
    assert refused.value.code is grpc.StatusCode.UNIMPLEMENTED
    assert refused.value.reason == "WORKFLOWS_NOT_IMPLEMENTED"


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
