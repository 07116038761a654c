"""Admission: which queued runs may start, and the tasks that run them.

`Admission` is pure bookkeeping (no I/O, no clock): a global cap on active runs
and a per-user cap; runs past a limit wait in creation order. The fair queue
and per-agent limits replace its `admit` policy next; `Scheduler` only turns
admitted tickets into tasks and frees their slots when they end.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

log = logging.getLogger("switchboard.executor.scheduler")


@dataclass(frozen=True, slots=True, order=True)
class Ticket:
    """A run waiting for (or holding) a slot. Ordered by creation."""

    create_time: datetime
    run_id: str
    user_id: str = field(compare=False)
    agent: str = field(compare=False)


class Admission:
    def __init__(self, max_active: int, max_active_per_user: int) -> None:
        if max_active < 1 or max_active_per_user < 1:
            raise ValueError("limits must be at least 1")
        self.max_active = max_active
        self.max_active_per_user = max_active_per_user
        self._queue: list[Ticket] = []
        self._queued_ids: set[str] = set()
        self._active: dict[str, Ticket] = {}
        self._active_per_user: dict[str, int] = {}

    def enqueue(self, ticket: Ticket) -> bool:
        """Queues a run once; False when it is already queued or active."""
        if ticket.run_id in self._queued_ids or ticket.run_id in self._active:
            return False
        bisect.insort(self._queue, ticket)
        self._queued_ids.add(ticket.run_id)
        return True

    def discard(self, run_id: str) -> bool:
        """Drops a queued run (cancelled or expired); False if it was not queued."""
        if run_id not in self._queued_ids:
            return False
        self._queued_ids.discard(run_id)
        self._queue = [t for t in self._queue if t.run_id != run_id]
        return True

    def admit(self) -> list[Ticket]:
        """Takes every queued run that fits under the limits, oldest first; a
        user at their limit does not hold back other users' runs."""
        admitted: list[Ticket] = []
        waiting: list[Ticket] = []
        for index, ticket in enumerate(self._queue):
            if len(self._active) >= self.max_active:
                waiting.extend(self._queue[index:])
                break
            if self._active_per_user.get(ticket.user_id, 0) >= self.max_active_per_user:
                waiting.append(ticket)
                continue
            self._active[ticket.run_id] = ticket
            self._active_per_user[ticket.user_id] = self._active_per_user.get(ticket.user_id, 0) + 1
            self._queued_ids.discard(ticket.run_id)
            admitted.append(ticket)
        self._queue = waiting
        return admitted

    def release(self, run_id: str) -> None:
        ticket = self._active.pop(run_id, None)
        if ticket is None:
            return
        remaining = self._active_per_user[ticket.user_id] - 1
        if remaining:
            self._active_per_user[ticket.user_id] = remaining
        else:
            del self._active_per_user[ticket.user_id]

    def is_queued(self, run_id: str) -> bool:
        return run_id in self._queued_ids

    def is_active(self, run_id: str) -> bool:
        return run_id in self._active

    def active_count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return len(self._active)
        return self._active_per_user.get(user_id, 0)

    def queued(self) -> list[Ticket]:
        return list(self._queue)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class RunHandle:
    """The link between an admitted run and CancelRun: a cancel request stops
    the worker call of the attempt in progress at once."""

    def __init__(self) -> None:
        self.cancel_requested = asyncio.Event()
        self._call: Cancellable | None = None

    def attach(self, call: Cancellable) -> None:
        self._call = call
        if self.cancel_requested.is_set():
            call.cancel()

    def detach(self) -> None:
        self._call = None

    def request_cancel(self) -> None:
        self.cancel_requested.set()
        if self._call is not None:
            self._call.cancel()


Execute = Callable[[Ticket, RunHandle], Coroutine[Any, Any, None]]


class Scheduler:
    def __init__(
        self,
        admission: Admission,
        execute: Execute,
        on_crash: Callable[[Ticket, BaseException], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.admission = admission
        self._execute = execute
        self._on_crash = on_crash
        self._running: dict[str, tuple[asyncio.Task[None], RunHandle]] = {}
        self._chores: set[asyncio.Task[None]] = set()
        self._stopped = False

    def submit(self, ticket: Ticket) -> None:
        if self.admission.enqueue(ticket):
            self.pump()

    def pump(self) -> None:
        if self._stopped:
            return
        for ticket in self.admission.admit():
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
        self.pump()

    def cancel(self, run_id: str) -> None:
        """Drops a queued run, or stops the worker call of a running one."""
        if self.admission.discard(run_id):
            return
        entry = self._running.get(run_id)
        if entry is not None:
            entry[1].request_cancel()

    def running(self) -> list[str]:
        return list(self._running)

    async def stop(self) -> None:
        """Stops every execution; runs left RUNNING are recovered at the next start."""
        self._stopped = True
        tasks = [task for task, _ in self._running.values()] + list(self._chores)
        for task in tasks:
            task.cancel()
        # Their outcomes were logged by _finished; nothing is left to report.
        await asyncio.gather(*tasks, return_exceptions=True)
