"""Admission (the fair queue over the limits, round-robin ticks, agent slots)
and the scheduler that turns admitted runs into tasks and hands agent slots
to workflow steps."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.executor.scheduler import Admission, RunHandle, Scheduler, Ticket

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def ticket(n: int, user: str = "alice", agent: str = "echo") -> Ticket:
    return Ticket(create_time=T0 + timedelta(seconds=n), run_id=f"run-{n}", user_id=user, agent=agent)


def ids(tickets: list[Ticket]) -> list[str]:
    return [t.run_id for t in tickets]


def test_a_user_past_the_limit_waits() -> None:
    admission = Admission(max_active=10, max_active_per_user=2)
    for n in range(3):
        admission.enqueue(ticket(n))
    assert ids(admission.admit({})) == ["run-0", "run-1"]
    assert ids(admission.queued()) == ["run-2"]
    assert admission.active_count("alice") == 2
    assert admission.queued_count("alice") == 1
    assert admission.admit({}) == []


def test_a_freed_slot_goes_to_the_users_oldest_waiting_run() -> None:
    admission = Admission(max_active=10, max_active_per_user=1)
    # Enqueued out of order: creation order decides.
    for n in (3, 1, 2):
        admission.enqueue(ticket(n))
    assert ids(admission.admit({})) == ["run-1"]
    admission.release("run-1")
    assert ids(admission.admit({})) == ["run-2"]
    admission.release("run-2")
    assert ids(admission.admit({})) == ["run-3"]


def test_a_user_at_the_limit_does_not_hold_back_others() -> None:
    admission = Admission(max_active=10, max_active_per_user=1)
    admission.enqueue(ticket(0, "alice"))
    admission.enqueue(ticket(1, "alice"))
    admission.enqueue(ticket(2, "bob"))
    assert sorted(ids(admission.admit({}))) == ["run-0", "run-2"]
    assert ids(admission.queued()) == ["run-1"]


def test_the_global_cap_holds_across_users() -> None:
    admission = Admission(max_active=2, max_active_per_user=5)
    for n, user in enumerate(["alice", "bob", "carol", "dave"]):
        admission.enqueue(ticket(n, user))
    assert ids(admission.admit({})) == ["run-0", "run-1"]
    admission.release("run-0")
    assert ids(admission.admit({})) == ["run-2"]
    assert admission.active_count() == 2


def test_an_agents_max_concurrency_holds_without_blocking_other_agents() -> None:
    admission = Admission(max_active=10, max_active_per_user=10)
    admission.enqueue(ticket(0, "alice", "slow"))
    admission.enqueue(ticket(1, "bob", "slow"))
    admission.enqueue(ticket(2, "bob", "echo"))
    assert sorted(ids(admission.admit({"slow": 1}))) == ["run-0", "run-2"]
    assert admission.agent_slots("slow") == 1
    # A raised limit applies at the next admission.
    assert ids(admission.admit({"slow": 2})) == ["run-1"]
    admission.release("run-0")
    assert admission.agent_slots("slow") == 1


def test_the_user_served_least_recently_goes_first_and_ticks_grow() -> None:
    admission = Admission(max_active=1, max_active_per_user=5)
    # From the database: alice was served last at tick 10 (bob never).
    admission.restore_ticks(10, {"alice": 10})
    admission.enqueue(ticket(0, "alice"))
    admission.enqueue(ticket(1, "alice"))
    admission.enqueue(ticket(2, "bob"))
    (first,) = admission.admit({})
    assert (first.run_id, first.tick) == ("run-2", 11)
    admission.release("run-2")
    (second,) = admission.admit({})
    assert (second.run_id, second.tick) == ("run-0", 12)


def test_a_run_is_queued_once_and_can_be_discarded() -> None:
    admission = Admission(max_active=1, max_active_per_user=1)
    assert admission.enqueue(ticket(0))
    assert not admission.enqueue(ticket(0))
    assert ids(admission.admit({})) == ["run-0"]
    assert not admission.enqueue(ticket(0))  # active runs are not queued again
    admission.enqueue(ticket(1))
    assert admission.discard("run-1")
    assert not admission.discard("run-1")
    assert admission.queued_count("alice") == 0
    admission.release("run-0")
    assert admission.admit({}) == []


def test_a_resumed_run_is_active_at_once_and_counts_against_the_limits() -> None:
    admission = Admission(max_active=5, max_active_per_user=1)
    assert admission.resume(ticket(0))
    assert not admission.resume(ticket(0))
    admission.enqueue(ticket(1))
    assert admission.admit({}) == []  # alice's one slot is the resumed run's
    assert admission.agent_slots("echo") == 1
    admission.release("run-0")
    assert ids(admission.admit({})) == ["run-1"]


def test_step_slots_share_the_agents_limit_with_runs() -> None:
    admission = Admission(max_active=5, max_active_per_user=5)
    assert admission.take_agent_slot("echo", 2)
    admission.enqueue(ticket(0))
    admission.enqueue(ticket(1, "bob"))
    assert len(admission.admit({"echo": 2})) == 1
    assert not admission.take_agent_slot("echo", 2)
    admission.free_agent_slot("echo")
    assert admission.take_agent_slot("echo", 2)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Admission(max_active=0, max_active_per_user=1)


# Operations on an Admission: enqueue a run (user, agent), admit, release the
# oldest active run.
operation = st.one_of(
    st.tuples(st.just("enqueue"), st.sampled_from(["u1", "u2", "u3"]), st.sampled_from(["a", "b", ""])),
    st.tuples(st.just("admit"), st.just(""), st.just("")),
    st.tuples(st.just("release"), st.just(""), st.just("")),
)


@settings(max_examples=150, deadline=None)
@given(
    operations=st.lists(operation, max_size=60),
    per_user=st.integers(1, 3),
    global_cap=st.integers(1, 5),
    agent_limit=st.integers(1, 3),
)
def test_admission_never_exceeds_a_limit_and_keeps_each_users_order(
    operations: list[tuple[str, str, str]], per_user: int, global_cap: int, agent_limit: int
) -> None:
    admission = Admission(max_active=global_cap, max_active_per_user=per_user)
    active: list[Ticket] = []
    created: dict[str, Ticket] = {}
    ticks: list[int] = []
    for n, (kind, user, agent) in enumerate(operations):
        if kind == "enqueue":
            created[f"run-{n}"] = ticket(n, user, agent)
            admission.enqueue(created[f"run-{n}"])
        elif kind == "admit":
            for admitted in admission.admit({"a": agent_limit, "b": agent_limit}):
                # Within a user, no older run of the same agent is left waiting.
                older_still_waiting = [
                    t
                    for t in admission.queued()
                    if t.user_id == admitted.user_id and t.agent == admitted.agent and t < admitted
                ]
                assert not older_still_waiting
                active.append(admitted)
                ticks.append(admitted.tick)
        elif active:
            admission.release(active.pop(0).run_id)
        per_user_now = Counter(t.user_id for t in active)
        per_agent_now = Counter(t.agent for t in active if t.agent)
        assert len(active) <= global_cap
        assert all(count <= per_user for count in per_user_now.values())
        assert all(count <= agent_limit for count in per_agent_now.values())
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)


# -- the scheduler ------------------------------------------------------------------


async def test_the_scheduler_runs_admitted_tickets_and_frees_their_slots() -> None:
    gates: dict[str, asyncio.Event] = {}
    started: list[str] = []

    async def execute(t: Ticket, handle: RunHandle) -> None:
        started.append(t.run_id)
        gates[t.run_id] = gate = asyncio.Event()
        await gate.wait()

    scheduler = Scheduler(Admission(max_active=5, max_active_per_user=1), execute)
    scheduler.submit(ticket(0))
    scheduler.submit(ticket(1))
    await scheduler.pump()
    await asyncio.sleep(0)
    assert started == ["run-0"]
    gates["run-0"].set()
    async with asyncio.timeout(10):
        while scheduler.running() != ["run-1"]:
            await asyncio.sleep(0)
            await scheduler.pump()
    await asyncio.sleep(0)
    assert started == ["run-0", "run-1"]
    await scheduler.stop()
    assert scheduler.running() == []


async def test_the_pump_applies_each_agents_current_limit() -> None:
    limits = {"echo": 1}
    started: list[str] = []

    async def limit_of(agent: str) -> int:
        return limits[agent]

    async def execute(t: Ticket, handle: RunHandle) -> None:
        started.append(t.run_id)
        await asyncio.Event().wait()

    scheduler = Scheduler(Admission(max_active=10, max_active_per_user=10), execute, agent_limit=limit_of)
    for n in range(3):
        scheduler.submit(ticket(n, f"user-{n}"))
    await scheduler.pump()
    assert scheduler.running() == ["run-0"]
    limits["echo"] = 3
    await scheduler.pump()
    assert sorted(scheduler.running()) == ["run-0", "run-1", "run-2"]
    await scheduler.stop()


async def test_steps_wait_for_an_agent_slot_first_come_first_served() -> None:
    async def limit_of(agent: str) -> int:
        return 1

    async def execute(t: Ticket, handle: RunHandle) -> None:
        await asyncio.Event().wait()

    scheduler = Scheduler(Admission(max_active=10, max_active_per_user=10), execute, agent_limit=limit_of)
    order: list[str] = []
    release = {name: asyncio.Event() for name in ("first", "second", "third")}

    async def step(name: str) -> None:
        async with scheduler.slot("echo"):
            order.append(name)
            await release[name].wait()

    tasks = {name: asyncio.create_task(step(name)) for name in release}
    await asyncio.sleep(0)
    await scheduler.pump()
    await asyncio.sleep(0)
    assert order == ["first"]
    # A queued single-agent run of the same agent waits behind the steps.
    scheduler.submit(ticket(9))
    tasks["second"].cancel()  # gave up waiting: leaks no slot
    release["first"].set()
    await tasks["first"]
    await scheduler.pump()
    await asyncio.sleep(0)
    assert order == ["first", "third"]
    assert scheduler.running() == []
    release["third"].set()
    await tasks["third"]
    await scheduler.pump()
    assert scheduler.running() == ["run-9"]
    assert scheduler.admission.agent_slots("echo") == 1
    await scheduler.stop()


async def test_cancel_drops_a_queued_ticket_and_stops_a_running_one() -> None:
    handles: dict[str, RunHandle] = {}

    async def execute(t: Ticket, handle: RunHandle) -> None:
        handles[t.run_id] = handle
        await handle.wakeup.wait()

    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    scheduler = Scheduler(Admission(max_active=5, max_active_per_user=1), execute)
    scheduler.submit(ticket(0))
    scheduler.submit(ticket(1))
    await scheduler.pump()
    await asyncio.sleep(0)
    calls = [Call(), Call()]
    for call in calls:
        handles["run-0"].attach(call)

    scheduler.cancel("run-1")
    assert not scheduler.admission.is_queued("run-1")
    scheduler.cancel("run-0")
    assert all(call.cancelled for call in calls)
    async with asyncio.timeout(10):
        while scheduler.running():  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0)
    assert "run-1" not in handles
    await scheduler.stop()


async def test_a_call_attached_after_a_stop_request_is_cancelled_at_once() -> None:
    handle = RunHandle()
    handle.request_stop()

    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    call = Call()
    handle.attach(call)
    assert call.cancelled
    assert handle.wakeup.is_set()


async def test_a_crashed_execution_is_reported_and_its_slot_freed() -> None:
    crashes: list[tuple[str, str]] = []

    async def execute(t: Ticket, handle: RunHandle) -> None:
        raise RuntimeError("bug")

    async def on_crash(t: Ticket, error: BaseException) -> None:
        crashes.append((t.run_id, str(error)))

    scheduler = Scheduler(Admission(max_active=1, max_active_per_user=1), execute, on_crash=on_crash)
    scheduler.start()
    scheduler.submit(ticket(0))
    async with asyncio.timeout(10):
        while not crashes:  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.01)
    assert crashes == [("run-0", "bug")]
    assert scheduler.admission.active_count() == 0
    await scheduler.stop()
