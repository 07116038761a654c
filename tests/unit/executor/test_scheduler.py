"""Admission: the global cap, the per-user limit, creation order; and the
scheduler that turns admitted runs into tasks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.executor.scheduler import Admission, RunHandle, Scheduler, Ticket

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def ticket(n: int, user: str = "alice") -> Ticket:
    return Ticket(create_time=T0 + timedelta(seconds=n), run_id=f"run-{n}", user_id=user, agent="echo")


def ids(tickets: list[Ticket]) -> list[str]:
    return [t.run_id for t in tickets]


def test_a_user_past_the_limit_waits() -> None:
    admission = Admission(max_active=10, max_active_per_user=2)
    for n in range(3):
        admission.enqueue(ticket(n))
    assert ids(admission.admit()) == ["run-0", "run-1"]
    assert ids(admission.queued()) == ["run-2"]
    assert admission.active_count("alice") == 2
    assert admission.admit() == []


def test_a_freed_slot_goes_to_the_oldest_waiting_run() -> None:
    admission = Admission(max_active=10, max_active_per_user=1)
    # Enqueued out of order: creation order decides.
    for n in (3, 1, 2):
        admission.enqueue(ticket(n))
    assert ids(admission.admit()) == ["run-1"]
    admission.release("run-1")
    assert ids(admission.admit()) == ["run-2"]
    admission.release("run-2")
    assert ids(admission.admit()) == ["run-3"]


def test_a_user_at_the_limit_does_not_hold_back_others() -> None:
    admission = Admission(max_active=10, max_active_per_user=1)
    admission.enqueue(ticket(0, "alice"))
    admission.enqueue(ticket(1, "alice"))
    admission.enqueue(ticket(2, "bob"))
    assert ids(admission.admit()) == ["run-0", "run-2"]
    assert ids(admission.queued()) == ["run-1"]


def test_the_global_cap_holds_across_users() -> None:
    admission = Admission(max_active=2, max_active_per_user=5)
    for n, user in enumerate(["alice", "bob", "carol", "dave"]):
        admission.enqueue(ticket(n, user))
    assert ids(admission.admit()) == ["run-0", "run-1"]
    admission.release("run-0")
    assert ids(admission.admit()) == ["run-2"]
    assert admission.active_count() == 2


def test_a_run_is_queued_once_and_can_be_discarded() -> None:
    admission = Admission(max_active=1, max_active_per_user=1)
    assert admission.enqueue(ticket(0))
    assert not admission.enqueue(ticket(0))
    assert admission.admit() == [ticket(0)]
    assert not admission.enqueue(ticket(0))  # active runs are not queued again
    admission.enqueue(ticket(1))
    assert admission.discard("run-1")
    assert not admission.discard("run-1")
    admission.release("run-0")
    assert admission.admit() == []


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Admission(max_active=0, max_active_per_user=1)


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
    await asyncio.sleep(0)
    assert started == ["run-0"]
    gates["run-0"].set()
    async with asyncio.timeout(10):
        while started != ["run-0", "run-1"]:  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0)
    assert scheduler.running() == ["run-1"]
    await scheduler.stop()
    assert scheduler.running() == []


async def test_cancel_drops_a_queued_ticket_and_signals_a_running_one() -> None:
    handles: dict[str, RunHandle] = {}

    async def execute(t: Ticket, handle: RunHandle) -> None:
        handles[t.run_id] = handle
        await handle.cancel_requested.wait()

    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    scheduler = Scheduler(Admission(max_active=5, max_active_per_user=1), execute)
    scheduler.submit(ticket(0))
    scheduler.submit(ticket(1))
    await asyncio.sleep(0)
    call = Call()
    handles["run-0"].attach(call)

    scheduler.cancel("run-1")
    assert not scheduler.admission.is_queued("run-1")
    scheduler.cancel("run-0")
    assert call.cancelled
    async with asyncio.timeout(10):
        while scheduler.running():  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0)
    assert "run-1" not in handles
    await scheduler.stop()


async def test_a_call_attached_after_a_cancel_request_is_cancelled_at_once() -> None:
    handle = RunHandle()
    handle.request_cancel()

    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    call = Call()
    handle.attach(call)
    assert call.cancelled


async def test_a_crashed_execution_is_reported_and_its_slot_freed() -> None:
    crashes: list[tuple[str, str]] = []

    async def execute(t: Ticket, handle: RunHandle) -> None:
        raise RuntimeError("bug")

    async def on_crash(t: Ticket, error: BaseException) -> None:
        crashes.append((t.run_id, str(error)))

    scheduler = Scheduler(Admission(max_active=1, max_active_per_user=1), execute, on_crash=on_crash)
    scheduler.submit(ticket(0))
    async with asyncio.timeout(10):
        while not crashes:  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0)
    assert crashes == [("run-0", "bug")]
    assert scheduler.admission.active_count() == 0
    await scheduler.stop()
