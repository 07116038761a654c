"""Admission: the plan one round makes (pure), and the scheduler over real
SQLite storage: it claims what the plan admits, hands agent slots to workflow
steps, keeps the leases of its runs and gives a run up when its lease is
gone. Two schedulers on one database are two replicas."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from services.common.auth import Principal, Role
from services.common.db import create_engine, migrate
from services.executor.admission import (
    AdmissionLimits,
    AdmissionSnapshot,
    Renewal,
    SlotRequest,
    plan_admission,
)
from services.executor.domain import (
    ExecutionContext,
    LeaseLost,
    RunError,
    RunRecord,
    RunState,
    end_run,
    new_run,
)
from services.executor.fair_queue import ActiveCounts, QueuedRun
from services.executor.scheduler import Loops, RunHandle, Scheduler, Ticket
from services.executor.storage import SqlRunStore, agent_slots
from tests.unit.executor.conftest import MIGRATIONS, PATIENCE_SECONDS

T0 = datetime(2030, 1, 1, tzinfo=UTC)
DONE = RunError("CANCELLED", "TEST_DONE", "the test ended it")


def queued(n: int, user: str = "alice", agent: str = "echo") -> QueuedRun:
    return QueuedRun(run_id=f"run-{n}", user_id=user, agent=agent, sequence=n)


def snapshot(
    runs: list[QueuedRun],
    *,
    active: ActiveCounts | None = None,
    slots: list[SlotRequest] | None = None,
    last_served: dict[str, int] | None = None,
    tick: int = 0,
) -> AdmissionSnapshot:
    return AdmissionSnapshot(
        queued=tuple(runs),
        active=active or ActiveCounts(),
        waiting_slots=tuple(slots or ()),
        last_served=last_served or {},
        tick=tick,
    )


def admitted(plan_of: AdmissionSnapshot, *, total: int = 10, per_user: int = 2, **agents: int) -> list[str]:
    plan = plan_admission(plan_of, limits=AdmissionLimits(total, per_user), agent_limits=agents)
    return [run_id for run_id, _ in plan.admit]


# -- the plan of one round --------------------------------------------------------


def test_a_user_past_the_limit_waits_and_others_go_on() -> None:
    runs = [queued(0), queued(1), queued(2), queued(3, "bob")]
    assert sorted(admitted(snapshot(runs), per_user=2, echo=10)) == ["run-0", "run-1", "run-3"]
    busy = ActiveCounts(per_user={"alice": 2}, total=2)
    assert admitted(snapshot(runs, active=busy), per_user=2, echo=10) == ["run-3"]


def test_the_global_cap_counts_what_every_replica_runs() -> None:
    runs = [queued(n, f"user-{n}") for n in range(4)]
    elsewhere = ActiveCounts(per_user={"zed": 1}, total=2)
    assert admitted(snapshot(runs, active=elsewhere), total=3, echo=10) == ["run-0"]


def test_an_agents_limit_counts_runs_and_step_slots_and_blocks_no_other_agent() -> None:
    runs = [queued(0, "alice", "slow"), queued(1, "bob", "slow"), queued(2, "bob", "echo")]
    held = ActiveCounts(per_agent={"slow": 1})
    assert sorted(admitted(snapshot(runs, active=held), slow=2, echo=10)) == ["run-0", "run-2"]
    assert admitted(snapshot(runs, active=ActiveCounts(per_agent={"slow": 2})), slow=2, echo=10) == ["run-2"]


def test_waiting_steps_get_free_slots_first_in_arrival_order() -> None:
    slots = [SlotRequest("late", "slow", 7), SlotRequest("early", "slow", 3), SlotRequest("other", "echo", 5)]
    runs = [queued(0, "alice", "slow")]
    plan = plan_admission(
        snapshot(runs, slots=slots, active=ActiveCounts(per_agent={"slow": 1})),
        limits=AdmissionLimits(10, 5),
        agent_limits={"slow": 2, "echo": 1},
    )
    assert plan.grant == ("early", "other")
    assert plan.admit == ()  # the freed slot went to the step


def test_runs_and_steps_of_an_agent_whose_limit_is_unknown_wait() -> None:
    runs = [queued(0, "alice", "new"), queued(1, "bob", ""), queued(2, "carol", "echo")]
    plan = plan_admission(
        snapshot(runs, slots=[SlotRequest("s", "new", 1)]),
        limits=AdmissionLimits(10, 5),
        agent_limits={"echo": 1},
    )
    # A workflow (no agent of its own) needs no agent limit.
    assert sorted(run_id for run_id, _ in plan.admit) == ["run-1", "run-2"]
    assert plan.grant == ()


def test_the_least_recently_served_user_goes_first_and_ticks_grow() -> None:
    runs = [queued(0, "alice"), queued(1, "alice"), queued(2, "bob")]
    plan = plan_admission(
        snapshot(runs, last_served={"alice": 10}, tick=12),
        limits=AdmissionLimits(1, 5),
        agent_limits={"echo": 10},
    )
    assert plan.admit == (("run-2", 13),)
    assert plan.tick == 13


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AdmissionLimits(0, 1)


queued_runs = st.lists(
    st.tuples(st.sampled_from(["u1", "u2", "u3"]), st.sampled_from(["a", "b", ""])), max_size=30
)


@settings(max_examples=200, deadline=None)
@given(
    runs=queued_runs,
    active_users=st.dictionaries(st.sampled_from(["u1", "u2", "u3"]), st.integers(0, 3)),
    active_agents=st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3)),
    slots=st.lists(st.sampled_from(["a", "b"]), max_size=6),
    per_user=st.integers(1, 3),
    global_cap=st.integers(1, 6),
    agent_limit=st.integers(1, 3),
)
def test_a_round_never_exceeds_a_limit_and_keeps_each_users_order(
    runs: list[tuple[str, str]],
    active_users: dict[str, int],
    active_agents: dict[str, int],
    slots: list[str],
    per_user: int,
    global_cap: int,
    agent_limit: int,
) -> None:
    candidates = [queued(n, user, agent) for n, (user, agent) in enumerate(runs)]
    active = ActiveCounts(per_user=active_users, per_agent=active_agents, total=sum(active_users.values()))
    requests = [SlotRequest(f"slot-{n}", agent, n) for n, agent in enumerate(slots)]
    plan = plan_admission(
        snapshot(candidates, active=active, slots=requests, tick=5),
        limits=AdmissionLimits(global_cap, per_user),
        agent_limits={"a": agent_limit, "b": agent_limit},
    )
    chosen = {run_id for run_id, _ in plan.admit}
    by_id = {run.run_id: run for run in candidates}
    users = Counter(active_users) + Counter(by_id[run_id].user_id for run_id in chosen)
    agents = (
        Counter(active_agents)
        + Counter(by_id[run_id].agent for run_id in chosen if by_id[run_id].agent)
        + Counter(request.agent for request in requests if request.slot_id in plan.grant)
    )
    # Nothing is admitted past a limit that was not already exceeded.
    if chosen:
        assert active.total + len(chosen) <= global_cap
    for run_id in chosen:
        user, agent = by_id[run_id].user_id, by_id[run_id].agent
        assert users[user] <= per_user
        assert not agent or agents[agent] <= max(agent_limit, active_agents.get(agent, 0))
    # Steps are granted in arrival order per agent.
    for agent in ("a", "b"):
        granted = [r.order for r in requests if r.agent == agent and r.slot_id in plan.grant]
        assert granted == sorted(r.order for r in requests if r.agent == agent)[: len(granted)]
    # Within a user, no older run of the same agent is passed over.
    for run_id in chosen:
        run = by_id[run_id]
        older = [
            r
            for r in candidates
            if r.user_id == run.user_id and r.agent == run.agent and r.sequence < run.sequence
        ]
        assert all(r.run_id in chosen for r in older)
    ticks = [tick for _, tick in plan.admit]
    assert ticks == list(range(6, 6 + len(ticks)))


# -- the scheduler over the shared database --------------------------------------------


def owner(name: str) -> Principal:
    return Principal(f"user-{name}", name, Role.USER, "jti", "sid", 0.0)


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Callable[..., SqlRunStore]]:
    url = f"sqlite:///{tmp_path / 'scheduler.db'}"
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    lock = asyncio.Lock()
    stores: list[SqlRunStore] = []

    def store(replica_id: str = "a", lease_seconds: float = 30.0) -> SqlRunStore:
        made = SqlRunStore(
            create_engine(url), replica_id=replica_id, lease_seconds=lease_seconds, write_lock=lock
        )
        stores.append(made)
        return made

    yield store
    for made in stores:
        await made.close()


async def add_run(store: SqlRunStore, n: int, user: str = "alice", agent: str = "echo") -> RunRecord:
    now = T0 + timedelta(seconds=n)
    context = ExecutionContext.for_new_run(
        owner(user), thread_id="", request_id=f"r-{n}", deadline=now + timedelta(days=1), trace_carrier={}
    )
    run, event = new_run(context, agent=agent, input={}, labels={}, now=now, trace_id="")
    stored, _ = await store.create_run(run, [event])
    return stored


async def end(store: SqlRunStore, ticket: Ticket) -> None:
    """Ends a run the way its execution would: under its fence."""
    await store.update_run(
        ticket.run_id, lambda r: end_run(r, RunState.CANCELLED, DONE, T0, {}), ticket.fence
    )


async def eventually(check: Callable[[], Any], what: str) -> None:
    async with asyncio.timeout(PATIENCE_SECONDS):
        while not check():  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.01)


async def slot_rows(store: SqlRunStore) -> int:
    async with store.engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(agent_slots))).scalar_one())


class Executions:
    """An `execute` that records its tickets and waits for the test to end each run."""

    def __init__(self, store: SqlRunStore) -> None:
        self.store = store
        self.started: list[Ticket] = []
        self.handles: dict[str, RunHandle] = {}
        self.gates: dict[str, asyncio.Event] = {}

    async def __call__(self, ticket: Ticket, handle: RunHandle) -> None:
        self.started.append(ticket)
        self.handles[ticket.run_id] = handle
        gate = self.gates.setdefault(ticket.run_id, asyncio.Event())
        await gate.wait()
        await end(self.store, ticket)

    def finish(self, run_id: str) -> None:
        self.gates.setdefault(run_id, asyncio.Event()).set()

    def ids(self) -> list[str]:
        return [t.run_id for t in self.started]


async def test_the_scheduler_claims_what_it_admits_and_a_run_that_ends_frees_its_slot(
    database: Callable[..., SqlRunStore],
) -> None:
    store = database()
    executions = Executions(store)
    scheduler = Scheduler(store, executions, limits=AdmissionLimits(5, 1))
    first, second = await add_run(store, 0), await add_run(store, 1)

    await scheduler.pump()
    await eventually(lambda: executions.ids() == [first.run_id], "the first run starts")
    claimed = await store.get_run(first.run_id)
    assert claimed is not None and (claimed.owner, claimed.fence, claimed.state) == ("a", 1, RunState.QUEUED)
    assert executions.started[0].fence == 1
    assert await store.queued_count("user-alice") == 1

    executions.finish(first.run_id)
    async with asyncio.timeout(PATIENCE_SECONDS):
        while executions.ids() != [first.run_id, second.run_id]:
            await asyncio.sleep(0.01)
            await scheduler.pump()
    await scheduler.stop()
    assert scheduler.running() == []


async def test_the_pump_applies_each_agents_current_limit(database: Callable[..., SqlRunStore]) -> None:
    store = database()
    limits = {"echo": 1}

    async def limit_of(agent: str) -> int:
        return limits[agent]

    executions = Executions(store)
    scheduler = Scheduler(store, executions, limits=AdmissionLimits(10, 10), agent_limit=limit_of)
    for n in range(3):
        await add_run(store, n, f"user-{n}")
    await scheduler.pump()
    assert len(scheduler.running()) == 1
    limits["echo"] = 3
    await scheduler.pump()
    assert len(scheduler.running()) == 3
    assert (await store.active_counts()).per_agent == {"echo": 3}
    await scheduler.stop()


async def test_steps_wait_for_an_agent_slot_first_come_first_served(
    database: Callable[..., SqlRunStore],
) -> None:
    store = database()

    async def limit_of(agent: str) -> int:
        return 1

    executions = Executions(store)
    scheduler = Scheduler(store, executions, limits=AdmissionLimits(10, 10), agent_limit=limit_of)
    workflow = await add_run(store, 0, agent="")
    await scheduler.pump()
    await eventually(lambda: executions.started, "the workflow starts")
    (ticket,) = executions.started
    order: list[str] = []
    release = {name: asyncio.Event() for name in ("first", "second", "third")}

    async def step(name: str) -> None:
        async with scheduler.slot("echo", run_id=workflow.run_id, fence=ticket.fence, step_id=name):
            order.append(name)
            await release[name].wait()

    tasks: dict[str, asyncio.Task[None]] = {}
    for count, name in enumerate(release, start=1):  # one after another: arrival order
        tasks[name] = asyncio.create_task(step(name))
        async with asyncio.timeout(PATIENCE_SECONDS):
            while await slot_rows(store) < count:  # noqa: ASYNC110 - a table to poll
                await asyncio.sleep(0.01)
    await scheduler.pump()
    await eventually(lambda: order == ["first"], "the first step runs")
    # A queued single-agent run of the same agent waits behind the steps.
    late = await add_run(store, 9, "bob")
    tasks["second"].cancel()  # gave up waiting: leaks no slot
    release["first"].set()
    await tasks["first"]
    await scheduler.pump()
    await eventually(lambda: order == ["first", "third"], "the third step runs")
    assert late.run_id not in scheduler.running()
    release["third"].set()
    await tasks["third"]
    await scheduler.pump()
    assert late.run_id in scheduler.running()
    assert (await store.active_counts()).per_agent == {"echo": 1}
    await scheduler.stop()


async def test_a_slot_of_a_run_that_changed_hands_stops_counting(
    database: Callable[..., SqlRunStore],
) -> None:
    store, other = database("a"), database("b")

    async def limit_of(agent: str) -> int:
        return 1

    executions = Executions(store)
    scheduler = Scheduler(store, executions, limits=AdmissionLimits(10, 10), agent_limit=limit_of)
    workflow = await add_run(store, 0, agent="")
    await scheduler.pump()
    await eventually(lambda: executions.started, "the workflow starts")
    (ticket,) = executions.started
    holding = asyncio.Event()

    async def step() -> None:
        async with scheduler.slot("echo", run_id=workflow.run_id, fence=ticket.fence, step_id="s"):
            holding.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(step())
    async with asyncio.timeout(PATIENCE_SECONDS):
        while await slot_rows(store) < 1:  # noqa: ASYNC110 - a table to poll
            await asyncio.sleep(0.01)
        await scheduler.pump()
        await holding.wait()
    assert (await store.active_counts()).per_agent == {"echo": 1}

    # Replica b takes the run over: a's slot, under the old fence, holds nothing.
    await store.release_leases([workflow.run_id])
    (claim,) = await other.claim_expired()
    assert claim.fence == ticket.fence + 1
    assert (await store.active_counts()).per_agent == {}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await scheduler.stop()


async def test_two_replicas_admit_from_one_queue_within_the_limits(
    database: Callable[..., SqlRunStore],
) -> None:
    a, b = database("a"), database("b")
    runs = [await add_run(a, n, f"user-{n % 4}", "echo" if n % 2 else "slow") for n in range(24)]
    execute_a, execute_b = Executions(a), Executions(b)

    async def limit_of(agent: str) -> int:
        return 2

    limits = AdmissionLimits(max_active=3, max_active_per_user=1)
    replicas = [
        Scheduler(a, execute_a, limits=limits, agent_limit=limit_of),
        Scheduler(b, execute_b, limits=limits, agent_limit=limit_of),
    ]
    ended: set[str] = set()
    async with asyncio.timeout(PATIENCE_SECONDS):
        while len(ended) < len(runs):
            await asyncio.gather(*(replica.pump() for replica in replicas))
            running = [t for e in (execute_a, execute_b) for t in e.started if t.run_id not in ended]
            # What runs at once, over both replicas, is within every limit.
            assert len(running) <= 3
            assert max(Counter(t.user_id for t in running).values(), default=0) <= 1
            assert max(Counter(t.agent for t in running).values(), default=0) <= 2
            # Every run is claimed once, by one replica.
            both = execute_a.ids() + execute_b.ids()
            assert len(both) == len(set(both))
            for ticket in running[:1]:
                ended.add(ticket.run_id)
                (execute_a if ticket in execute_a.started else execute_b).finish(ticket.run_id)
            await asyncio.sleep(0.01)
    for replica in replicas:
        await replica.stop()


async def test_a_run_claimed_by_another_replica_is_given_up_at_the_next_renewal(
    database: Callable[..., SqlRunStore],
) -> None:
    store, other = database("a"), database("b")

    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    executions = Executions(store)
    scheduler = Scheduler(store, executions, limits=AdmissionLimits(5, 5))
    run = await add_run(store, 0)
    await scheduler.pump()
    await eventually(lambda: run.run_id in executions.handles, "started")
    handle = executions.handles[run.run_id]
    worker_call, compensation_call = Call(), Call()
    handle.attach(worker_call)
    handle.attach(compensation_call, survives_stop=True)

    await scheduler.renew_leases()
    assert not handle.lost  # still its own
    await store.release_leases([run.run_id])
    (claim,) = await other.claim_expired()
    await scheduler.renew_leases()

    assert handle.lost and worker_call.cancelled and compensation_call.cancelled
    # Whatever it still writes under its old fence is refused.
    with pytest.raises(LeaseLost):
        await end(store, executions.started[0])
    current = await store.get_run(run.run_id)
    assert current is not None and (current.state, current.owner, current.fence) == (
        RunState.QUEUED,
        "b",
        claim.fence,
    )
    await scheduler.stop()


async def test_a_run_whose_lease_cannot_be_renewed_is_given_up_before_it_expires(
    database: Callable[..., SqlRunStore],
) -> None:
    store = database("a", lease_seconds=30.0)
    clock = [1000.0]
    failing = False
    real_renew = store.renew_leases

    async def renew(fences: Any) -> Renewal:
        if failing:
            raise OSError("the database is unreachable")
        return await real_renew(fences)

    store.renew_leases = renew  # type: ignore[method-assign]
    executions = Executions(store)
    scheduler = Scheduler(
        store, executions, limits=AdmissionLimits(5, 5), lease_seconds=30.0, monotonic=lambda: clock[0]
    )
    run = await add_run(store, 0)
    await scheduler.pump()
    await eventually(lambda: run.run_id in executions.handles, "started")
    handle = executions.handles[run.run_id]

    failing = True
    clock[0] += 20.0  # two renewals missed: most of the lease is still there
    await scheduler.renew_leases()
    assert not handle.lost
    clock[0] += 5.5  # under a sixth of the lease left unconfirmed
    await scheduler.renew_leases()
    assert handle.lost and handle.stopped
    await scheduler.stop()


async def test_a_stopped_replica_hands_its_runs_over_at_once(database: Callable[..., SqlRunStore]) -> None:
    store, other = database("a", lease_seconds=3600.0), database("b")
    executions = Executions(store)
    scheduler = Scheduler(store, executions, limits=AdmissionLimits(5, 5), lease_seconds=3600.0)
    run = await add_run(store, 0)
    await scheduler.pump()
    await eventually(lambda: run.run_id in executions.handles, "started")
    assert await other.claim_expired() == []  # a live lease is never taken

    await scheduler.stop()

    (claim,) = await other.claim_expired()
    assert (claim.run_id, claim.fence) == (run.run_id, 2)


async def test_a_crashed_execution_is_reported(database: Callable[..., SqlRunStore]) -> None:
    store = database()
    crashes: list[tuple[str, str]] = []

    async def execute(t: Ticket, handle: RunHandle) -> None:
        raise RuntimeError("bug")

    async def on_crash(t: Ticket, error: BaseException) -> None:
        crashes.append((t.run_id, str(error)))

    scheduler = Scheduler(store, execute, on_crash=on_crash, limits=AdmissionLimits(1, 1))
    scheduler.start()
    run = await add_run(store, 0)
    scheduler.wake()
    await eventually(lambda: bool(crashes), "crash reported")
    assert crashes == [(run.run_id, "bug")]
    assert scheduler.running() == []
    await scheduler.stop()


async def test_a_call_attached_after_a_stop_request_is_cancelled_at_once() -> None:
    handle = RunHandle()
    handle.request_stop()

    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    call, compensation = Call(), Call()
    handle.attach(call)
    handle.attach(compensation, survives_stop=True)
    assert call.cancelled and not compensation.cancelled
    assert handle.wakeup.is_set()
    handle.lose()
    assert compensation.cancelled


async def test_a_background_loop_that_crashes_starts_again_and_one_that_is_done_does_not() -> None:
    loops = Loops(retry_seconds=0.01)
    runs: Counter[str] = Counter()
    again = asyncio.Event()

    async def flaky() -> None:
        runs["flaky"] += 1
        if runs["flaky"] == 1:
            raise RuntimeError("bug")
        again.set()
        await asyncio.Event().wait()

    async def done() -> None:
        runs["done"] += 1

    loops.start("flaky", flaky)
    loops.start("done", done)
    async with asyncio.timeout(PATIENCE_SECONDS):
        await again.wait()
    await loops.stop()
    assert runs == {"flaky": 2, "done": 1}
    assert loops.tasks() == []
