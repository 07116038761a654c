"""Admission: which queued runs may start, the agent slots their steps take,
and the tasks that run them.

`Admission` is bookkeeping without I/O or clock. It caches what the database
says (a queued run is a row in state QUEUED; each admitted run records its
round-robin tick, see `RunStore.admission_ticks`) plus what this process runs,
and asks `fair_queue.pick_next` which queued runs may start now under the
per-user limit, each agent's max_concurrency and the global cap.

Agent slots: an admitted single-agent run holds one slot of its agent until it
ends (retry backoffs included). A workflow run holds none itself (pick_next
does not count it against any agent); each of its steps, and each
compensation, takes a slot of its agent while it runs and waits, first come
first served, while the agent is full. When a slot frees up, waiting steps go
before queued runs: they belong to runs that have already started.

`Scheduler` pumps whenever something changes (a run queued or finished, a slot
freed) and every `poll_seconds`, so that a max_concurrency raised in the
registry takes effect even when nothing else happens. Each pump fetches the
current limit of every agent it may admit (the agent cache keeps them at most
a few seconds old).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from services.executor.fair_queue import (
    DEFAULT_AGENT_MAX_CONCURRENCY,
    ActiveCounts,
    Limits,
    QueuedRun,
    pick_next,
)

log = logging.getLogger("switchboard.executor.scheduler")


@dataclass(frozen=True, slots=True, order=True)
class Ticket:
    """A run waiting for (or holding) a slot. Ordered by creation."""

    create_time: datetime
    run_id: str
    user_id: str = field(compare=False)
    # Empty for a workflow: its steps take agent slots as they run.
    agent: str = field(compare=False)
    # The user's round-robin turn at admission; 0 while queued, and for a run
    # resumed after a restart (it had been admitted before).
    tick: int = field(default=0, compare=False)

    def queued_run(self) -> QueuedRun:
        sequence = int(self.create_time.timestamp() * 1_000_000)
        return QueuedRun(run_id=self.run_id, user_id=self.user_id, agent=self.agent, sequence=sequence)


class Admission:
    def __init__(self, max_active: int, max_active_per_user: int) -> None:
        if max_active < 1 or max_active_per_user < 1:
            raise ValueError("limits must be at least 1")
        self.max_active = max_active
        self.max_active_per_user = max_active_per_user
        self._queue: dict[str, Ticket] = {}
        # The fair queue's view of each queued run, made once per run.
        self._queued_runs: dict[str, QueuedRun] = {}
        self._queued_per_user: collections.Counter[str] = collections.Counter()
        self._active: dict[str, Ticket] = {}
        self._active_per_user: collections.Counter[str] = collections.Counter()
        # Slots held per agent: single-agent runs and running workflow steps.
        self._agent_slots: collections.Counter[str] = collections.Counter()
        # Round-robin state: each user's last turn, and the newest turn given.
        self._last_served: dict[str, int] = {}
        self._tick = 0

    def restore_ticks(self, newest: int, per_user: Mapping[str, int]) -> None:
        """Round-robin state from the database, at start-up."""
        self._tick = max(self._tick, newest)
        self._last_served.update(per_user)

    def enqueue(self, ticket: Ticket) -> bool:
        """Queues a run once; False when it is already queued or active."""
        if ticket.run_id in self._queue or ticket.run_id in self._active:
            return False
        self._queue[ticket.run_id] = ticket
        self._queued_runs[ticket.run_id] = ticket.queued_run()
        self._queued_per_user[ticket.user_id] += 1
        return True

    def resume(self, ticket: Ticket) -> bool:
        """A run that had started before a restart: active at once, past the
        queue (it was admitted under the limits then); False if already known."""
        if ticket.run_id in self._queue or ticket.run_id in self._active:
            return False
        self._activate(ticket)
        return True

    def discard(self, run_id: str) -> bool:
        """Drops a queued run (cancelled or expired); False if it was not queued."""
        ticket = self._queue.pop(run_id, None)
        if ticket is None:
            return False
        del self._queued_runs[run_id]
        self._unqueue_user(ticket.user_id)
        return True

    def admit(self, agent_limits: Mapping[str, int]) -> list[Ticket]:
        """Takes the queued runs that may start now, in the order the fair
        queue chose them, each with its user's new round-robin tick.
        `agent_limits` holds the agents' max_concurrency (others: the default)."""
        if not self._queue:
            return []
        chosen = pick_next(
            self._queued_runs.values(),
            ActiveCounts(
                per_user=self._active_per_user, per_agent=self._agent_slots, total=len(self._active)
            ),
            Limits(
                per_user=self.max_active_per_user,
                global_cap=self.max_active,
                per_agent=agent_limits,
                default_per_agent=DEFAULT_AGENT_MAX_CONCURRENCY,
            ),
            self._last_served,
        )
        admitted: list[Ticket] = []
        for run_id in chosen:
            ticket = self._queue.pop(run_id)
            del self._queued_runs[run_id]
            self._unqueue_user(ticket.user_id)
            # As fair_queue.mark_served: each admission is the newest turn.
            self._tick = max(self._tick, *self._last_served.values(), 0) + 1
            self._last_served[ticket.user_id] = self._tick
            ticket = dataclasses.replace(ticket, tick=self._tick)
            self._activate(ticket)
            admitted.append(ticket)
        return admitted

    def release(self, run_id: str) -> None:
        """A run's execution ended: frees its user's, the global and its agent's slot."""
        ticket = self._active.pop(run_id, None)
        if ticket is None:
            return
        self._active_per_user[ticket.user_id] -= 1
        if self._active_per_user[ticket.user_id] <= 0:
            del self._active_per_user[ticket.user_id]
        if ticket.agent:
            self.free_agent_slot(ticket.agent)
        self._forget_idle(ticket.user_id)

    def take_agent_slot(self, agent: str, limit: int) -> bool:
        if self._agent_slots[agent] >= limit:
            return False
        self._agent_slots[agent] += 1
        return True

    def free_agent_slot(self, agent: str) -> None:
        self._agent_slots[agent] -= 1
        if self._agent_slots[agent] <= 0:
            del self._agent_slots[agent]

    def _activate(self, ticket: Ticket) -> None:
        self._active[ticket.run_id] = ticket
        self._active_per_user[ticket.user_id] += 1
        if ticket.agent:
            self._agent_slots[ticket.agent] += 1

    def _unqueue_user(self, user_id: str) -> None:
        self._queued_per_user[user_id] -= 1
        if self._queued_per_user[user_id] <= 0:
            del self._queued_per_user[user_id]
            self._forget_idle(user_id)

    def _forget_idle(self, user_id: str) -> None:
        # A user with nothing queued or running needs no turn: the memory stays
        # bounded by the users with work, and one who comes back is served first.
        if user_id not in self._queued_per_user and user_id not in self._active_per_user:
            self._last_served.pop(user_id, None)

    def is_queued(self, run_id: str) -> bool:
        return run_id in self._queue

    def is_active(self, run_id: str) -> bool:
        return run_id in self._active

    def active_count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return len(self._active)
        return self._active_per_user.get(user_id, 0)

    def queued_count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return len(self._queue)
        return self._queued_per_user.get(user_id, 0)

    def agent_slots(self, agent: str) -> int:
        return self._agent_slots.get(agent, 0)

    def queued(self) -> list[Ticket]:
        return sorted(self._queue.values())

    def queued_agents(self) -> set[str]:
        return {ticket.agent for ticket in self._queue.values() if ticket.agent}


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class RunHandle:
    """The link between a running run and whoever stops it (CancelRun, or the
    runner winding a failed workflow down): a stop request cancels the worker
    calls of the attempts in progress at once, refuses later ones, and wakes
    the run's execution loop."""

    def __init__(self) -> None:
        self.stopped = False
        # Set by a stop request, for good: backoff pauses end at once.
        self.stopping = asyncio.Event()
        # Set on every stop request; the execution loop clears it when it looks.
        self.wakeup = asyncio.Event()
        self._calls: set[Cancellable] = set()

    async def pause(self, seconds: float) -> bool:
        """Waits `seconds` (a retry's backoff); True when stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        return self.stopped

    def attach(self, call: Cancellable) -> None:
        if self.stopped:
            call.cancel()
            return
        self._calls.add(call)

    def detach(self, call: Cancellable) -> None:
        self._calls.discard(call)

    def request_stop(self) -> None:
        self.stopped = True
        self.stopping.set()
        for call in list(self._calls):
            call.cancel()
        self._calls.clear()
        self.wakeup.set()


class AgentSlots(Protocol):
    def slot(self, agent: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Holds one slot of `agent` (waiting while the agent is full)."""
        ...


Execute = Callable[[Ticket, RunHandle], Coroutine[Any, Any, None]]
AgentLimit = Callable[[str], Awaitable[int]]


async def _default_limit(agent: str) -> int:
    return DEFAULT_AGENT_MAX_CONCURRENCY


class Scheduler:
    def __init__(
        self,
        admission: Admission,
        execute: Execute,
        on_crash: Callable[[Ticket, BaseException], Coroutine[Any, Any, None]] | None = None,
        *,
        agent_limit: AgentLimit = _default_limit,
        poll_seconds: float = 1.0,
    ) -> None:
        self.admission = admission
        self._execute = execute
        self._on_crash = on_crash
        self._agent_limit = agent_limit
        self._poll_seconds = poll_seconds
        self._running: dict[str, tuple[asyncio.Task[None], RunHandle]] = {}
        self._slot_waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._chores: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._stopped = False

    # -- queue -------------------------------------------------------------------

    def start(self) -> None:
        """Starts pumping (after the queue was restored from the database)."""
        if self._pump_task is None and not self._stopped:
            self._pump_task = asyncio.create_task(self._pump_forever(), name="admission-pump")
            self._pump_task.add_done_callback(self._pump_ended)

    def _pump_ended(self, task: asyncio.Task[None]) -> None:
        if self._pump_task is task:
            self._pump_task = None
        if task.cancelled() or self._stopped:
            return
        # A bug must not stop admission for good: log it and pump again.
        log.error("admission pump crashed; restarting", exc_info=task.exception())
        asyncio.get_running_loop().call_later(self._poll_seconds, self.start)

    def submit(self, ticket: Ticket) -> None:
        if self.admission.enqueue(ticket):
            self._wake.set()

    def resume(self, ticket: Ticket) -> None:
        """Runs a run that had started before a restart, past the queue."""
        if not self._stopped and self.admission.resume(ticket):
            self._launch(ticket)

    def cancel(self, run_id: str) -> None:
        """Drops a queued run, or stops the worker calls of a running one."""
        if self.admission.discard(run_id):
            return
        entry = self._running.get(run_id)
        if entry is not None:
            entry[1].request_stop()

    def running(self) -> list[str]:
        return list(self._running)

    # -- agent slots for workflow steps ------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, agent: str) -> AsyncIterator[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.setdefault(agent, collections.deque()).append(waiter)
        self._wake.set()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._free_slot(agent)  # granted just as the wait was given up
            else:
                waiter.cancel()
            raise
        try:
            yield
        finally:
            self._free_slot(agent)

    def _free_slot(self, agent: str) -> None:
        self.admission.free_agent_slot(agent)
        self._wake.set()

    # -- pumping -----------------------------------------------------------------

    async def _pump_forever(self) -> None:
        while not self._stopped:
            self._wake.clear()
            await self.pump()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_seconds):
                    await self._wake.wait()

    async def pump(self) -> None:
        """Grants free agent slots to waiting steps, then starts the queued
        runs the fair queue picks under the current limits."""
        if self._stopped:
            return
        limits: dict[str, int] = {}
        while True:
            # Until every agent that may get a slot has its current limit (runs
            # queued while the limits were being fetched included).
            waiting = {agent for agent, waiters in self._slot_waiters.items() if waiters}
            missing = sorted((waiting | self.admission.queued_agents()) - limits.keys())
            if not missing:
                break
            limits.update(zip(missing, await asyncio.gather(*map(self._agent_limit, missing)), strict=True))
        for agent in waiting:
            waiters = self._slot_waiters[agent]
            while waiters:
                if waiters[0].done():  # its step gave up waiting
                    waiters.popleft()
                    continue
                if not self.admission.take_agent_slot(agent, limits[agent]):
                    break
                waiters.popleft().set_result(None)
            if not waiters:
                del self._slot_waiters[agent]
        for ticket in self.admission.admit(limits):
            self._launch(ticket)

    def _launch(self, ticket: Ticket) -> None:
        handle = RunHandle()
        task = asyncio.create_task(self._execute(ticket, handle), name=f"run-{ticket.run_id}")
        self._running[ticket.run_id] = (task, handle)
        task.add_done_callback(functools.partial(self._finished, ticket))

    def _finished(self, ticket: Ticket, task: asyncio.Task[None]) -> None:
        self._running.pop(ticket.run_id, None)
        self.admission.release(ticket.run_id)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("run execution crashed", exc_info=error, extra={"run_id": ticket.run_id})
            if self._on_crash is not None and not self._stopped:
                chore = asyncio.create_task(self._on_crash(ticket, error), name=f"crash-{ticket.run_id}")
                self._chores.add(chore)
                chore.add_done_callback(self._chores.discard)
        self._wake.set()

    async def stop(self) -> None:
        """Stops every execution; runs left RUNNING are recovered at the next start."""
        self._stopped = True
        tasks = [task for task, _ in self._running.values()] + list(self._chores)
        if self._pump_task is not None:
            tasks.append(self._pump_task)
        for task in tasks:
            task.cancel()
        # Their outcomes were logged by _finished; nothing is left to report.
        await asyncio.gather(*tasks, return_exceptions=True)
