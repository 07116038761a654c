"""The executor's storage on SQLite and PostgreSQL (migrated by its Alembic
revisions): runs, steps and the outbox, one transaction per change."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from services.common.auth import Principal, Role
from services.common.db import create_engine, migrate
from services.executor.domain import (
    MAIN_STEP,
    EventDraft,
    EventType,
    ExecutionContext,
    InvalidTransition,
    RunChange,
    RunError,
    RunFilter,
    RunRecord,
    RunState,
    StepChange,
    StepState,
    Thinking,
    admit_run,
    begin_attempt,
    complete_step,
    end_run,
    fail_step,
    new_run,
    new_workflow_run,
    record_progress,
)
from services.executor.storage import SqlRunStore
from services.executor.workflow import WorkflowStepSpec

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "executor" / "migrations"
T0 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
CARRIER = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def owner(name: str) -> Principal:
    return Principal(f"user-{name}", name, Role.USER, "jti", "sid", 0.0)


ALICE, BOB = owner("alice"), owner("bob")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlRunStore]:
    await asyncio.to_thread(migrate, database_url, MIGRATIONS)
    store = SqlRunStore(create_engine(database_url))
    yield store
    await store.close()


def make_run(
    who: Principal = ALICE,
    *,
    offset: float = 0,
    agent: str = "echo",
    thread_id: str = "",
    request_id: str = "",
) -> tuple[RunRecord, list[EventDraft]]:
    now = T0 + timedelta(seconds=offset)
    context = ExecutionContext.for_new_run(
        who,
        thread_id=thread_id,
        request_id=request_id,
        deadline=now + timedelta(minutes=5),
        trace_carrier=CARRIER,
    )
    run, queued = new_run(
        context,
        agent=agent,
        input={"text": "héllo", "n": [1, 2.5]},
        labels={"k": "v"},
        now=now,
        trace_id="a" * 32,
    )
    return run, [queued]


async def test_a_run_round_trips_with_its_step_and_first_event(store: SqlRunStore) -> None:
    run, events = make_run(thread_id="t1", request_id="r1")
    stored, created = await store.create_run(run, events)
    assert created and stored.last_seq == 1

    loaded = await store.get_run(run.run_id)

    assert loaded == stored
    assert loaded is not None
    assert loaded.create_time == T0 and loaded.create_time.tzinfo is not None
    assert loaded.input == {"text": "héllo", "n": [1, 2.5]}
    assert dict(loaded.trace_carrier) == CARRIER
    assert loaded.context() == run.context()
    ((event, published),) = await store.run_events(run.run_id)
    assert (event.seq, event.type, event.user_id, published) == (
        1,
        EventType.RUN_QUEUED,
        ALICE.user_id,
        False,
    )
    assert await store.get_run("no-such-run") is None


async def test_a_repeated_request_id_returns_the_existing_run(store: SqlRunStore) -> None:
    first, events = make_run(request_id="same")
    await store.create_run(first, events)
    again, again_events = make_run(request_id="same", offset=1)

    existing, created = await store.create_run(again, again_events)

    assert not created and existing.run_id == first.run_id
    assert await store.get_run(again.run_id) is None
    assert len(await store.run_events(first.run_id)) == 1
    other, other_events = make_run(BOB, request_id="same")
    assert (await store.create_run(other, other_events))[1]
    assert (await store.find_run_by_request(BOB.user_id, "same")) is not None


async def test_a_change_and_its_events_are_written_together_with_gapless_seqs(store: SqlRunStore) -> None:
    run, events = make_run()
    await store.create_run(run, events)
    started = await store.update_run(run.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, CARRIER))
    assert started is not None and started[1]
    await store.update_run(run.run_id, lambda r: record_progress(r, MAIN_STEP, 1, Thinking("a"), T0, CARRIER))
    done = await store.update_run(
        run.run_id, lambda r: complete_step(r, MAIN_STEP, 1, {"ok": True}, T0, CARRIER)
    )
    assert done is not None

    loaded = await store.get_run(run.run_id)
    assert loaded == done[0]
    assert loaded is not None
    assert (loaded.state, loaded.output, loaded.last_seq) == (RunState.SUCCEEDED, {"ok": True}, 5)
    step = loaded.step(MAIN_STEP)
    assert (step.state, step.attempts, step.output) == (StepState.SUCCEEDED, 1, {"ok": True})
    assert [(e.seq, e.type) for e, _ in await store.run_events(run.run_id)] == [
        (1, EventType.RUN_QUEUED),
        (2, EventType.AGENT_STARTED),
        (3, EventType.AGENT_THINKING),
        (4, EventType.AGENT_COMPLETED),
        (5, EventType.RUN_COMPLETED),
    ]


async def test_a_change_that_fails_midway_writes_nothing(store: SqlRunStore) -> None:
    run, events = make_run()
    await store.create_run(run, events)
    assert await store.update_run(run.run_id, lambda r: None) == (await store.get_run(run.run_id), False)
    # The run row is updated first; the event reuses an id, so its insert fails.
    clash = dataclasses.replace(events[0], type=EventType.AGENT_STARTED)

    with pytest.raises(IntegrityError):
        await store.update_run(
            run.run_id,
            lambda r: RunChange(
                state=RunState.RUNNING,
                steps=(StepChange(MAIN_STEP, state=StepState.RUNNING, attempts=1),),
                events=(clash,),
            ),
        )

    loaded = await store.get_run(run.run_id)
    assert loaded is not None
    assert (loaded.state, loaded.step(MAIN_STEP).state, loaded.last_seq) == (
        RunState.QUEUED,
        StepState.PENDING,
        1,
    )
    assert len(await store.run_events(run.run_id)) == 1
    with pytest.raises(InvalidTransition):
        await store.update_run(run.run_id, lambda r: RunChange(state=RunState.SUCCEEDED))
    assert await store.update_run("no-such-run", lambda r: None) is None


async def test_concurrent_changes_to_one_run_never_share_or_skip_a_seq(store: SqlRunStore) -> None:
    run, events = make_run()
    await store.create_run(run, events)
    await store.update_run(run.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}))

    await asyncio.gather(
        *(
            store.update_run(
                run.run_id,
                functools.partial(
                    record_progress, step_id=MAIN_STEP, attempt=1, update=Thinking(str(n)), now=T0, carrier={}
                ),
            )
            for n in range(20)
        )
    )

    seqs = [e.seq for e, _ in await store.run_events(run.run_id)]
    assert seqs == list(range(1, 23))
    loaded = await store.get_run(run.run_id)
    assert loaded is not None and loaded.last_seq == 22


async def test_list_runs_is_per_owner_newest_first_and_filtered(store: SqlRunStore) -> None:
    ids = []
    for n in range(5):
        run, events = make_run(offset=n, agent="echo" if n % 2 else "slow", thread_id=f"t{n % 2}")
        await store.create_run(run, events)
        ids.append(run.run_id)
    bobs, bob_events = make_run(BOB, offset=10)
    await store.create_run(bobs, bob_events)

    page = await store.list_runs(ALICE.user_id, RunFilter(), 2, None)
    assert [r.run_id for r in page] == [ids[4], ids[3]]
    after = (page[-1].create_time.isoformat(), page[-1].run_id)
    rest = await store.list_runs(ALICE.user_id, RunFilter(), 10, after)
    assert [r.run_id for r in rest] == [ids[2], ids[1], ids[0]]
    assert [r.run_id for r in await store.list_runs(ALICE.user_id, RunFilter(agent="echo"), 10, None)] == [
        ids[3],
        ids[1],
    ]
    assert [r.run_id for r in await store.list_runs(ALICE.user_id, RunFilter(thread_id="t0"), 10, None)] == [
        ids[4],
        ids[2],
        ids[0],
    ]
    assert await store.list_runs(ALICE.user_id, RunFilter(state=RunState.RUNNING), 10, None) == []
    assert len(await store.list_runs(ALICE.user_id, RunFilter(state=RunState.QUEUED), 10, None)) == 5


async def test_runs_in_a_state_come_oldest_first(store: SqlRunStore) -> None:
    runs = []
    for n in (2, 0, 1):
        run, events = make_run(offset=n)
        await store.create_run(run, events)
        runs.append(run)
    await store.update_run(runs[0].run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}))

    queued = await store.runs_in_state(RunState.QUEUED)
    assert [r.run_id for r in queued] == [runs[1].run_id, runs[2].run_id]
    assert [r.run_id for r in await store.runs_in_state(RunState.RUNNING)] == [runs[0].run_id]


async def test_the_outbox_hands_out_pending_rows_oldest_first(store: SqlRunStore) -> None:
    a, a_events = make_run()
    b, b_events = make_run(BOB, offset=1)
    await store.create_run(a, a_events)
    await store.create_run(b, b_events)
    await store.update_run(a.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}))

    pending = await store.pending_events(10)
    assert [(e.run_id, e.seq) for e in pending] == [(a.run_id, 1), (b.run_id, 1), (a.run_id, 2)]
    assert [(e.run_id, e.seq) for e in await store.pending_events(2)] == [(a.run_id, 1), (b.run_id, 1)]

    await store.mark_published([pending[0].event_id, pending[1].event_id], T0)
    assert [(e.run_id, e.seq) for e in await store.pending_events(10)] == [(a.run_id, 2)]
    assert await store.delete_published(T0 - timedelta(seconds=1)) == 0
    assert await store.delete_published(T0 + timedelta(seconds=1)) == 2
    assert [published for _, published in await store.run_events(a.run_id)] == [False]


async def test_errors_are_stored_with_code_reason_and_message(store: SqlRunStore) -> None:
    run, events = make_run()
    await store.create_run(run, events)
    error = RunError("ABORTED", "EXECUTOR_RESTARTED", "restarted")
    await store.update_run(run.run_id, lambda r: end_run(r, RunState.FAILED, error, T0, {}))
    loaded = await store.get_run(run.run_id)
    assert loaded is not None and loaded.error == error and loaded.end_time == T0
    assert loaded.step(MAIN_STEP).state is StepState.SKIPPED


async def test_a_workflow_round_trips_with_step_inputs_completion_and_winding_down(
    store: SqlRunStore,
) -> None:
    context = ExecutionContext.for_new_run(
        ALICE, thread_id="", request_id="", deadline=T0 + timedelta(minutes=5), trace_carrier=CARRIER
    )
    run, queued = new_workflow_run(
        context,
        steps=[
            WorkflowStepSpec(
                "a", "echo", input={"n": 1, "deep": {"list": [1, "x"]}}, compensation_agent="undo"
            ),
            WorkflowStepSpec("b", "echo", depends_on=("a",), input={"v": "${steps.a.output.n}"}),
        ],
        input={"text": "x"},
        labels={},
        now=T0,
        trace_id="a" * 32,
    )
    await store.create_run(run, [queued])
    await store.update_run(run.run_id, lambda r: admit_run(r, 42))
    await store.update_run(run.run_id, lambda r: begin_attempt(r, "a", 1, T0, CARRIER))
    await store.update_run(run.run_id, lambda r: complete_step(r, "a", 1, {"n": 1}, T0, CARRIER))
    await store.update_run(run.run_id, lambda r: begin_attempt(r, "b", 1, T0, CARRIER))
    failure = RunError("INTERNAL", "BROKEN", "broke")
    await store.update_run(run.run_id, lambda r: fail_step(r, "b", failure, T0, CARRIER))

    loaded = await store.get_run(run.run_id)

    assert loaded is not None
    assert (loaded.agent, loaded.admission, loaded.ending) == ("", 42, RunState.FAILED)
    assert loaded.state is RunState.RUNNING
    first, second = loaded.steps
    assert first.input == {"n": 1, "deep": {"list": [1, "x"]}}
    assert (first.completion, first.compensation_agent, first.state) == (1, "undo", StepState.SUCCEEDED)
    assert (second.depends_on, second.input, second.state) == (
        ("a",),
        {"v": "${steps.a.output.n}"},
        StepState.FAILED,
    )
    assert second.completion == 0


async def test_admission_ticks_come_back_for_the_users_still_waiting(store: SqlRunStore) -> None:
    assert await store.admission_ticks() == (0, {})
    carol = owner("carol")
    alices_old, events = make_run(ALICE)
    await store.create_run(alices_old, events)
    await store.update_run(alices_old.run_id, lambda r: admit_run(r, 5))
    alices_waiting, events = make_run(ALICE, offset=1)
    await store.create_run(alices_waiting, events)
    bobs, events = make_run(BOB, offset=2)
    await store.create_run(bobs, events)
    await store.update_run(bobs.run_id, lambda r: admit_run(r, 9))
    await store.update_run(bobs.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}))
    carols, events = make_run(carol, offset=3)
    await store.create_run(carols, events)

    newest, waiting = await store.admission_ticks()

    # Bob has nothing waiting; Carol was never admitted.
    assert (newest, waiting) == (9, {ALICE.user_id: 5})
