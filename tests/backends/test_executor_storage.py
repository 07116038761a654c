"""The executor's storage on SQLite and PostgreSQL (migrated by its Alembic
revisions): runs, steps and the outbox, one transaction per change; and what
replicas share: admission rounds, leases, fencing, agent slots, and which
replica relays which outbox rows."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from services.common.auth import Principal, Role
from services.common.convert import utcnow
from services.common.db import create_engine, migrate
from services.executor.admission import AdmissionLimits, AdmissionPlan, AdmissionPlanner, plan_admission
from services.executor.domain import (
    MAIN_STEP,
    EventDraft,
    EventType,
    ExecutionContext,
    InvalidTransition,
    LeaseLost,
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


async def test_an_admission_round_sees_each_waiting_users_last_turn(store: SqlRunStore) -> None:
    carol = owner("carol")
    alices_first = await queue(store, ALICE)
    bobs = await queue(store, BOB, offset=1)
    first = await store.admission_round(admit_all())
    assert [(c.run_id, c.tick) for c in first.claims] == [(alices_first.run_id, 1), (bobs.run_id, 2)]
    alices_next = await queue(store, ALICE, offset=2)
    carols = await queue(store, carol, offset=3)

    idle = await store.admission_round(lambda snapshot: AdmissionPlan((), (), snapshot.tick))

    # Bob has nothing waiting; Carol was never admitted.
    assert idle.snapshot.last_served == {ALICE.user_id: 1}
    assert idle.snapshot.tick == 2
    assert [run.run_id for run in idle.snapshot.queued] == [alices_next.run_id, carols.run_id]
    assert idle.snapshot.active.per_user == {ALICE.user_id: 1, BOB.user_id: 1}


# -- replicas: claims, leases, fencing, slots, the outbox of each replica ------------


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[Callable[..., SqlRunStore]]:
    """Stores of one database, each as the replica it is named after."""
    await asyncio.to_thread(migrate, database_url, MIGRATIONS)
    lock = asyncio.Lock()  # one SQLite writer at a time in this process
    made: list[SqlRunStore] = []

    def replica(replica_id: str, lease_seconds: float = 3600.0) -> SqlRunStore:
        store = SqlRunStore(
            create_engine(database_url), replica_id=replica_id, lease_seconds=lease_seconds, write_lock=lock
        )
        made.append(store)
        return store

    yield replica
    for store in made:
        await store.close()


def admit_all(per_user: int = 10, total: int = 100, **agents: int) -> AdmissionPlanner:
    return functools.partial(
        plan_admission, limits=AdmissionLimits(total, per_user), agent_limits={"echo": 100, **agents}
    )


async def queue(
    store: SqlRunStore, who: Principal = ALICE, *, offset: float = 0, agent: str = "echo"
) -> RunRecord:
    run, events = make_run(who, offset=offset, agent=agent)
    stored, _ = await store.create_run(run, events)
    return stored


async def test_a_write_with_a_superseded_fence_is_refused_and_changes_nothing(
    replicas: Callable[..., SqlRunStore],
) -> None:
    a, b = replicas("a"), replicas("b")
    run = await queue(a)
    (claim,) = (await a.admission_round(admit_all())).claims
    assert (claim.run_id, claim.fence) == (run.run_id, 1)
    started = await a.update_run(run.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}), claim.fence)
    assert started is not None and started[1]

    # a's lease runs out; b takes the run over.
    await a.release_leases([run.run_id])
    (taken,) = await b.claim_expired()
    assert (taken.run_id, taken.fence) == (run.run_id, 2)

    with pytest.raises(LeaseLost) as refused:
        await a.update_run(
            run.run_id, lambda r: complete_step(r, MAIN_STEP, 1, {"late": True}, T0, {}), claim.fence
        )
    assert (refused.value.fence, refused.value.current) == (1, 2)
    current = await b.get_run(run.run_id)
    assert current is not None
    assert (current.state, current.output, current.last_seq) == (RunState.RUNNING, None, 2)
    assert (current.owner, current.fence) == ("b", 2)
    assert [e.type for e, _ in await b.run_events(run.run_id)] == [
        EventType.RUN_QUEUED,
        EventType.AGENT_STARTED,
    ]
    # The new holder writes; so does a user's cancel, which carries no fence.
    progress = await b.update_run(
        run.run_id, lambda r: record_progress(r, MAIN_STEP, 1, Thinking("mine"), T0, {}), taken.fence
    )
    assert progress is not None and progress[1]
    error = RunError("CANCELLED", "RUN_CANCELLED", "enough")
    cancelled = await a.update_run(run.run_id, lambda r: end_run(r, RunState.CANCELLED, error, T0, {}))
    assert cancelled is not None and cancelled[0].state is RunState.CANCELLED


async def test_admission_rounds_of_two_replicas_share_the_limits_and_the_round_robin_clock(
    replicas: Callable[..., SqlRunStore],
) -> None:
    a, b = replicas("a"), replicas("b")
    carol = owner("carol")
    for n, who in enumerate([ALICE, ALICE, BOB, BOB, carol]):
        await queue(a, who, offset=n, agent="slow" if who is carol else "echo")

    first = await a.admission_round(admit_all(per_user=1, total=3, slow=1))
    second = await b.admission_round(admit_all(per_user=1, total=3, slow=1))

    assert sorted(c.user_id for c in first.claims) == sorted([ALICE.user_id, BOB.user_id, carol.user_id])
    assert [c.tick for c in first.claims] == [1, 2, 3]
    # b sees a's runs as active: nothing more fits.
    assert second.claims == ()
    assert second.snapshot.active.total == 3
    assert second.snapshot.active.per_agent == {"echo": 2, "slow": 1}
    assert await a.queued_count() == 2 and await a.queued_count(ALICE.user_id) == 1

    # One of a's runs ends: b admits the next, with the next tick of the shared clock.
    ended = next(c for c in first.claims if c.user_id == ALICE.user_id)
    error = RunError("CANCELLED", "RUN_CANCELLED", "done")
    await a.update_run(ended.run_id, lambda r: end_run(r, RunState.CANCELLED, error, T0, {}), ended.fence)
    (next_claim,) = (await b.admission_round(admit_all(per_user=1, total=3, slow=1))).claims
    assert (next_claim.user_id, next_claim.tick) == (ALICE.user_id, 4)
    loaded = await b.get_run(next_claim.run_id)
    assert loaded is not None and (loaded.owner, loaded.fence, loaded.admission) == ("b", 1, 4)


async def test_only_expired_leases_are_taken_over(replicas: Callable[..., SqlRunStore]) -> None:
    a, b = replicas("a"), replicas("b")
    live = await queue(a, offset=0)
    handed_over = await queue(a, offset=1)
    ended = await queue(a, offset=2)
    claims = {c.run_id: c for c in (await a.admission_round(admit_all())).claims}
    error = RunError("CANCELLED", "RUN_CANCELLED", "done")
    await a.update_run(ended.run_id, lambda r: end_run(r, RunState.CANCELLED, error, T0, {}))
    # An executor from before replicas left this one RUNNING with no owner.
    legacy = await queue(a, BOB, offset=3)
    await a.update_run(legacy.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}))
    waiting = await queue(a, BOB, offset=4)

    await a.release_leases([handed_over.run_id])
    taken = await b.claim_expired()

    assert [(c.run_id, c.fence) for c in taken] == [(handed_over.run_id, 2), (legacy.run_id, 1)]
    assert await b.claim_expired() == []  # now b's, and live
    # a restarted under its own name takes back what it held, never b's.
    restarted = replicas("a")
    assert [(c.run_id, c.fence) for c in await restarted.claim_expired(reclaim_own=True)] == [
        (live.run_id, claims[live.run_id].fence + 1)
    ]
    assert (await a.get_run(waiting.run_id)).owner == ""  # type: ignore[union-attr]


async def test_a_renewal_keeps_only_the_runs_the_replica_still_holds(
    replicas: Callable[..., SqlRunStore],
) -> None:
    a, b = replicas("a"), replicas("b")
    for n in range(3):
        await queue(a, offset=n)
    kept, ended, lost = (await a.admission_round(admit_all())).claims
    error = RunError("CANCELLED", "RUN_CANCELLED", "done")
    await a.update_run(ended.run_id, lambda r: end_run(r, RunState.CANCELLED, error, T0, {}))
    await a.release_leases([lost.run_id])
    await b.claim_expired()

    fences = {claim.run_id: claim.fence for claim in (kept, ended, lost)}
    renewal = await a.renew_leases(fences)
    assert (renewal.kept, renewal.ended) == ({kept.run_id}, {ended.run_id})
    # A renewed lease is live again: nobody takes it.
    assert await b.claim_expired() == []
    # b holds `lost` under fence 2, not 1.
    assert (await b.renew_leases(fences)).kept == set()


async def test_slots_are_granted_in_order_and_count_only_under_their_runs_fence(
    replicas: Callable[..., SqlRunStore],
) -> None:
    a, b = replicas("a"), replicas("b")
    workflow = await queue(a, agent="")
    (claim,) = (await a.admission_round(admit_all())).claims
    for name in ("s1", "s2", "s3"):
        await a.request_slot(
            name + "-slot", run_id=workflow.run_id, fence=claim.fence, step_id=name, agent="x"
        )
    assert await a.admission_agents() == {"x"}

    first = await a.admission_round(admit_all(x=2), mine=["s1-slot", "s2-slot", "s3-slot"])
    assert first.granted == {"s1-slot", "s2-slot"}
    assert (await a.active_counts()).per_agent == {"x": 2}
    # A single-agent run of x waits behind the step.
    single = await queue(a, BOB, offset=1, agent="x")
    await a.release_slot("s1-slot")
    second = await b.admission_round(admit_all(x=2), mine=["s3-slot"])
    assert second.claims == () and second.granted == {"s3-slot"}

    # b takes the workflow over: a's slots, under fence 1, hold nothing now.
    await a.release_leases([workflow.run_id])
    await b.claim_expired()
    assert (await b.active_counts()).per_agent == {}
    (admitted,) = (await b.admission_round(admit_all(x=2))).claims
    assert admitted.run_id == single.run_id


async def test_each_replica_relays_its_own_rows_with_the_earlier_rows_of_their_runs(
    replicas: Callable[..., SqlRunStore],
) -> None:
    a, b = replicas("a"), replicas("b")
    shared = await queue(a)  # seq 1 written by a
    (claim,) = (await b.admission_round(admit_all())).claims
    await b.update_run(shared.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}), claim.fence)
    own = await queue(b, BOB, offset=1)

    assert [(e.run_id, e.seq) for e in await a.pending_events(10)] == [(shared.run_id, 1)]
    # b's batch starts with a's row of the same run: no gap for the events service.
    assert [(e.run_id, e.seq) for e in await b.pending_events(10)] == [
        (shared.run_id, 1),
        (shared.run_id, 2),
        (own.run_id, 1),
    ]
    # Rows a dead replica left behind go out through anyone, once older than a lease.
    await b.mark_published([e.event_id for e in await b.pending_events(10)], T0)
    old = utcnow() - timedelta(hours=1)
    context = ExecutionContext.for_new_run(
        ALICE, thread_id="", request_id="", deadline=old + timedelta(days=1), trace_carrier={}
    )
    orphan, queued_event = new_run(context, agent="echo", input={}, labels={}, now=old, trace_id="")
    await replicas("dead").create_run(orphan, [queued_event])
    assert [(e.run_id, e.seq) for e in await b.pending_events(10)] == [(orphan.run_id, 1)]


class Notices:
    def __init__(self) -> None:
        self.runs: list[str] = []
        self.admissions = 0
        self.handovers = 0
        self.resyncs = 0
        self.arrived = asyncio.Event()

    def run_changed(self, run_id: str) -> None:
        self.runs.append(run_id)
        self.arrived.set()

    def admission_changed(self) -> None:
        self.admissions += 1
        self.arrived.set()

    def leases_released(self) -> None:
        self.handovers += 1
        self.arrived.set()

    def resync(self) -> None:
        self.resyncs += 1
        self.arrived.set()

    async def until(self, what: Callable[[], bool]) -> None:
        async with asyncio.timeout(30):
            while not what():
                self.arrived.clear()
                await self.arrived.wait()


async def test_a_replica_hears_of_the_other_replicas_changes(
    replicas: Callable[..., SqlRunStore], database_url: str
) -> None:
    a, b = replicas("a"), replicas("b")
    heard = Notices()
    listening = asyncio.create_task(a.listen(heard))
    try:
        if database_url.startswith("sqlite"):
            # One process owns a SQLite database: nobody else to hear from.
            await asyncio.wait_for(listening, 10)
            return
        await heard.until(lambda: heard.resyncs == 1)  # listening now
        own = await queue(a)
        await a.update_run(own.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}))
        run = await queue(b, BOB, offset=1)
        (claim,) = (await b.admission_round(admit_all())).claims
        await b.update_run(run.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, T0, {}), claim.fence)
        error = RunError("CANCELLED", "RUN_CANCELLED", "enough")
        await b.update_run(run.run_id, lambda r: end_run(r, RunState.CANCELLED, error, T0, {}))
        await b.release_leases([run.run_id])

        await heard.until(lambda: heard.handovers == 1)
        # b's changes only (a acted on its own already), in commit order.
        assert heard.runs == [run.run_id, run.run_id]
        assert heard.admissions == 1  # the run ended: a slot is free
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)


async def test_the_migrations_match_the_tables(database_url: str, store: SqlRunStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine as create_sync_engine
    from sqlalchemy.engine import make_url

    from services.executor.storage import metadata

    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")

    def differences() -> list[object]:
        engine = create_sync_engine(url)
        try:
            with engine.connect() as connection:
                return list(compare_metadata(MigrationContext.configure(connection), metadata))
        finally:
            engine.dispose()

    assert await asyncio.to_thread(differences) == []
