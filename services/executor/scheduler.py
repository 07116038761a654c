"""Admission (which queued runs start, and on which replica), the agent slots
of workflow steps, the leases of the runs this replica executes, and the tasks
that run them.

What waits and what is active lives in the database every replica shares
(see `admission`). `Scheduler.pump` runs one admission round: it fetches the
current max_concurrency of every agent that may get a slot (the agent cache
keeps them at most a few seconds old), then the round, serialized across
replicas, grants agent slots to waiting workflow steps first (their runs have
already started) and claims the queued runs the fair queue picks, which start
here. Pumps happen whenever something changes (a run queued or ended, a slot
freed, here or, through the store's notices, in another replica) and every
`poll_seconds`, so that a max_concurrency raised in the registry takes effect
even when nothing else happens.

Agent slots: an admitted single-agent run holds one slot of its agent until it
ends (retry backoffs included). A workflow run holds none itself; each of its
steps, and each compensation, takes a slot of its agent while it runs and
waits, first come first served across replicas, while the agent is full.

Leases: every run executing here is renewed every `lease_seconds / 3`. When a
renewal says the run is no longer this replica's (it ended, or another
replica claimed it), or none has been confirmed for nearly a whole lease (the
database is unreachable), the execution loses the run: its worker calls are
cancelled at once and it writes nothing more (storage would refuse it anyway,
see LeaseLost). It gives up `LOSS_MARGIN` of the lease early, so no other
replica starts the run while this one may still be calling the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from services.executor.admission import (
    AdmissionLimits,
    AdmissionSnapshot,
    AdmissionStore,
    Claim,
    plan_admission,
)
from services.executor.fair_queue import DEFAULT_AGENT_MAX_CONCURRENCY

log = logging.getLogger("switchboard.executor.scheduler")

# An execution gives up its run when less than this share of the lease is left
# unconfirmed: the renewal it missed may still be in flight.
LOSS_MARGIN = 1 / 6
# Errors of the shared database that a loop outlives (it tries again).
STORE_ERRORS = (SQLAlchemyError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True, order=True)
class Ticket:
    """A run this replica holds, to execute. Ordered by creation."""

    create_time: datetime
    run_id: str
    user_id: str = field(compare=False)
    # Empty for a workflow: its steps take agent slots as they run.
    agent: str = field(compare=False)
    # The fencing token of this replica's claim: every write carries it.
    fence: int = field(default=0, compare=False)
    # The user's round-robin turn at admission (0 for a run taken over).
    tick: int = field(default=0, compare=False)

    @classmethod
    def of(cls, claim: Claim) -> Ticket:
        return cls(claim.create_time, claim.run_id, claim.user_id, claim.agent, claim.fence, claim.tick)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class RunHandle:
    """The link between a running run and whoever stops it: CancelRun or the
    runner winding a failed workflow down (a stop request cancels the worker
    calls of the attempts in progress at once, refuses later ones, and wakes
    the run's execution loop), and the lease keeper (losing the run also
    stops the compensation calls, which a stop request lets finish)."""

    def __init__(self) -> None:
        self.stopped = False
        # The run is no longer this replica's: write nothing, call nothing.
        self.lost = False
        # Set by a stop request, for good: backoff pauses end at once.
        self.stopping = asyncio.Event()
        # Set on every stop request and poke; the execution loop clears it when it looks.
        self.wakeup = asyncio.Event()
        self._calls: set[Cancellable] = set()
        self._until_lost: set[Cancellable] = set()

    async def pause(self, seconds: float) -> bool:
        """Waits `seconds` (a retry's backoff); True when stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        return self.stopped

    def attach(self, call: Cancellable, *, survives_stop: bool = False) -> None:
        """Cancels `call` on a stop request, or (`survives_stop`: a
        compensation) only when the run is lost."""
        if self.lost or (self.stopped and not survives_stop):
            call.cancel()
            return
        (self._until_lost if survives_stop else self._calls).add(call)

    def detach(self, call: Cancellable) -> None:
        self._calls.discard(call)
        self._until_lost.discard(call)

    def request_stop(self) -> None:
        self.stopped = True
        self.stopping.set()
        for call in list(self._calls):
            call.cancel()
        self._calls.clear()
        self.wakeup.set()

    def lose(self) -> None:
        """Another replica holds the run now (or may, any moment)."""
        self.lost = True
        for call in list(self._until_lost):
            call.cancel()
        self._until_lost.clear()
        self.request_stop()

    def poke(self) -> None:
        """The run changed elsewhere (another replica cancelled it, say): look again."""
        self.wakeup.set()


class AgentSlots(Protocol):
    def slot(
        self, agent: str, *, run_id: str, fence: int, step_id: str
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Holds one slot of `agent` for the run's step (waiting while the agent is full)."""
        ...


Execute = Callable[[Ticket, RunHandle], Coroutine[Any, Any, None]]
AgentLimit = Callable[[str], Awaitable[int]]


async def _default_limit(agent: str) -> int:
    return DEFAULT_AGENT_MAX_CONCURRENCY


class Loops:
    """Named background loops, each started again `retry_seconds` after a bug
    ended it: admission, leases and takeovers must not stop for good."""

    def __init__(self, retry_seconds: float) -> None:
        self._retry_seconds = retry_seconds
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def start(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._closed or name in self._tasks:
            return
        task = asyncio.create_task(body(), name=name)
        self._tasks[name] = task
        task.add_done_callback(functools.partial(self._ended, name, body))

    def _ended(
        self, name: str, body: Callable[[], Coroutine[Any, Any, None]], task: asyncio.Task[None]
    ) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if task.cancelled() or self._closed or task.exception() is None:
            return  # stopped, or done with nothing left to do
        log.error("background loop crashed; restarting", exc_info=task.exception(), extra={"loop": name})
        asyncio.get_running_loop().call_later(self._retry_seconds, self.start, name, body)

    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks.values())

    async def stop(self) -> None:
        self._closed = True
        tasks = self.tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Execution:
    ticket: Ticket
    task: asyncio.Task[None]
    handle: RunHandle
    # monotonic time until which this replica's lease is known to hold
    valid_until: float


class Scheduler:
    def __init__(
        self,
        store: AdmissionStore,
        execute: Execute,
        on_crash: Callable[[Ticket, BaseException], Coroutine[Any, Any, None]] | None = None,
        *,
        limits: AdmissionLimits,
        agent_limit: AgentLimit = _default_limit,
        poll_seconds: float = 1.0,
        lease_seconds: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.lease_seconds = lease_seconds
        self._store = store
        self._execute = execute
        self._on_crash = on_crash
        self._agent_limit = agent_limit
        self._poll_seconds = poll_seconds
        self._monotonic = monotonic
        self._running: dict[str, _Execution] = {}
        # slot id -> (agent, granted), for this replica's steps waiting for a slot
        self._slot_waiters: dict[str, tuple[str, asyncio.Future[None]]] = {}
        self._chores: set[asyncio.Task[None]] = set()
        self._loops = Loops(poll_seconds)
        self._wake = asyncio.Event()
        self._stopped = False
        # What the last admission round saw (for metrics and logs).
        self.last_snapshot: AdmissionSnapshot | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Starts pumping and renewing leases."""
        if not self._stopped:
            self._loops.start("admission-pump", self._pump_forever)
            self._loops.start("lease-keeper", self._keep_leases_forever)

    async def stop(self) -> None:
        """Stops every execution and hands its run over: the leases of the runs
        left unfinished expire now, so another replica (or the next start of
        this one) recovers them at once."""
        self._stopped = True
        held = [run_id for run_id, execution in self._running.items() if not execution.handle.lost]
        await self._loops.stop()
        tasks = [execution.task for execution in self._running.values()] + list(self._chores)
        for task in tasks:
            task.cancel()
        # Their outcomes were logged by _finished; nothing is left to report.
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._store.release_leases(held)
        except STORE_ERRORS as exc:
            log.warning(
                "could not hand the runs over; they wait for their leases to expire",
                extra={"error": str(exc)},
            )

    # -- runs ------------------------------------------------------------------------

    def wake(self) -> None:
        """Something changed that may let a run or a step in: pump soon."""
        self._wake.set()

    def resume(self, ticket: Ticket, valid_until: float) -> None:
        """Runs a run this replica took over (recovered after a restart, or
        from a replica that is gone), past the queue: it was admitted then.
        `valid_until`: monotonic time until which the claim is known to hold."""
        if not self._stopped and ticket.run_id not in self._running:
            self._launch(ticket, valid_until)

    def cancel(self, run_id: str) -> None:
        """Stops the worker calls of a run executing here."""
        execution = self._running.get(run_id)
        if execution is not None:
            execution.handle.request_stop()

    def poke(self, run_id: str) -> None:
        execution = self._running.get(run_id)
        if execution is not None:
            execution.handle.poke()

    def poke_all(self) -> None:
        for execution in self._running.values():
            execution.handle.poke()

    def running(self) -> list[str]:
        return list(self._running)

    # -- agent slots for workflow steps ------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, agent: str, *, run_id: str, fence: int, step_id: str) -> AsyncIterator[None]:
        # Named here, so that the request can be withdrawn whatever happens.
        slot_id = str(uuid.uuid4())
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters[slot_id] = (agent, granted)
        try:
            await self._store.request_slot(slot_id, run_id=run_id, fence=fence, step_id=step_id, agent=agent)
            self._wake.set()
            await granted
            yield
        finally:
            self._slot_waiters.pop(slot_id, None)
            granted.cancel()
            try:
                await asyncio.shield(self._store.release_slot(slot_id))
            except STORE_ERRORS as exc:
                # It stops counting when its run ends or changes hands.
                log.warning("could not free an agent slot", extra={"run_id": run_id, "error": str(exc)})
            self._wake.set()

    # -- pumping -----------------------------------------------------------------

    async def _pump_forever(self) -> None:
        while not self._stopped:
            self._wake.clear()
            try:
                await self.pump()
            except STORE_ERRORS as exc:
                log.warning("admission round failed; trying again", extra={"error": str(exc)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_seconds):
                    await self._wake.wait()

    async def pump(self) -> None:
        """One admission round: grants free agent slots to waiting steps, then
        claims and starts the queued runs the fair queue picks."""
        if self._stopped:
            return
        waiting = {
            slot_id: agent for slot_id, (agent, granted) in self._slot_waiters.items() if not granted.done()
        }
        agents = sorted(await self._store.admission_agents() | set(waiting.values()))
        agent_limits = dict(zip(agents, await asyncio.gather(*map(self._agent_limit, agents)), strict=True))
        began = self._monotonic()
        outcome = await self._store.admission_round(
            functools.partial(plan_admission, limits=self.limits, agent_limits=agent_limits),
            mine=list(waiting),
        )
        self.last_snapshot = outcome.snapshot
        for claim in outcome.claims:
            self._launch(Ticket.of(claim), began + self.lease_seconds)
        for slot_id in outcome.granted:
            entry = self._slot_waiters.get(slot_id)
            if entry is not None and not entry[1].done():
                entry[1].set_result(None)

    def _launch(self, ticket: Ticket, valid_until: float) -> None:
        handle = RunHandle()
        task = asyncio.create_task(self._execute(ticket, handle), name=f"run-{ticket.run_id}")
        self._running[ticket.run_id] = _Execution(ticket, task, handle, valid_until)
        task.add_done_callback(functools.partial(self._finished, ticket))
        if self._stopped:
            task.cancel()

    def _finished(self, ticket: Ticket, task: asyncio.Task[None]) -> None:
        execution = self._running.get(ticket.run_id)
        if execution is not None and execution.task is task:
            del self._running[ticket.run_id]
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("run execution crashed", exc_info=error, extra={"run_id": ticket.run_id})
            if self._on_crash is not None and not self._stopped:
                chore = asyncio.create_task(self._on_crash(ticket, error), name=f"crash-{ticket.run_id}")
                self._chores.add(chore)
                chore.add_done_callback(self._chores.discard)
        self._wake.set()

    # -- leases ----------------------------------------------------------------------

    async def _keep_leases_forever(self) -> None:
        """Renews every third of a lease, one renewal at a time, and between
        renewals gives up the runs whose lease is running out unconfirmed. A
        slow renewal is never cut off: cancelling a transaction halfway could
        leave its row locks held."""
        period = self.lease_seconds / 3
        renewal: asyncio.Task[None] | None = None
        due = self._monotonic()
        try:
            while not self._stopped:
                now = self._monotonic()
                if now >= due and (renewal is None or renewal.done()):
                    renewal = asyncio.create_task(self.renew_leases(), name="lease-renewal")
                    due = now + period
                self.give_up_expiring()
                wake = [due] + [
                    execution.valid_until - self.lease_seconds * LOSS_MARGIN
                    for execution in self._running.values()
                    if not execution.handle.lost
                ]
                await asyncio.sleep(max(0.01, min(wake) - self._monotonic()))
        finally:
            # Stopping: a renewal in flight gets a moment to finish on its own
            # (the process is going away, so cutting it off after that is safe).
            if renewal is not None:
                await asyncio.wait([renewal], timeout=period)
                renewal.cancel()
                await asyncio.gather(renewal, return_exceptions=True)

    async def renew_leases(self) -> None:
        """Renews the lease of every run executing here; an execution whose run
        is no longer this replica's, or whose lease could not be confirmed in
        time, loses it."""
        current = {
            run_id: execution for run_id, execution in self._running.items() if not execution.handle.lost
        }
        if current:
            # A renewal starts the lease again no earlier than this (the
            # database's clock is read inside the transaction).
            sent = self._monotonic()
            try:
                renewal = await self._store.renew_leases(
                    {run_id: execution.ticket.fence for run_id, execution in current.items()}
                )
            except STORE_ERRORS as exc:
                log.warning("could not renew the leases of running runs", extra={"error": repr(exc)})
            else:
                for run_id, execution in current.items():
                    if run_id in renewal.kept:
                        execution.valid_until = max(execution.valid_until, sent + self.lease_seconds)
                    elif run_id in renewal.ended:
                        execution.handle.poke()  # it ends on its own; nothing is left to guard
                        execution.valid_until = float("inf")
                    else:
                        self._lose(execution, "another replica holds it now")
        self.give_up_expiring()

    def give_up_expiring(self) -> None:
        """Loses the runs whose lease was last confirmed too long ago."""
        now = self._monotonic()
        for execution in list(self._running.values()):
            if not execution.handle.lost and now >= execution.valid_until - self.lease_seconds * LOSS_MARGIN:
                self._lose(execution, "its lease could not be renewed in time")

    def _lose(self, execution: _Execution, why: str) -> None:
        if not execution.task.done():
            log.info(
                "stopping a run this replica no longer holds",
                extra={"run_id": execution.ticket.run_id, "why": why},
            )
        execution.handle.lose()
