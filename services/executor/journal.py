"""Writing run changes, and waking whoever waits on them.

Every change to a run goes through `RunJournal.apply`: one transaction for the
state change and its events, then the WaitRun waiters of that run are woken
and the outbox relay is told there is something to publish. (Waiters in other
replicas are woken by the store's notices, see `RunService.run_changed`.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from services.executor.domain import Decide, RunRecord, RunStore


class RunSignals:
    """In-process wake-ups for WaitRun: one asyncio.Event per waiter and run."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, run_id: str) -> Iterator[asyncio.Event]:
        """Register before reading the run, so no change can slip in between."""
        event = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[run_id]

    def changed(self, run_id: str) -> None:
        for event in self._waiters.get(run_id, ()):
            event.set()

    def changed_all(self) -> None:
        """Every waiter looks again (changes may have gone unnoticed)."""
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    def watched(self) -> int:
        return sum(len(w) for w in self._waiters.values())


class RunJournal:
    def __init__(self, store: RunStore, signals: RunSignals, events_added: Callable[[], None]) -> None:
        self._store = store
        self._signals = signals
        self._events_added = events_added

    async def apply(
        self, run_id: str, decide: Decide, fence: int | None = None
    ) -> tuple[RunRecord, bool] | None:
        """Applies `decide`'s change to the run; (run afterwards, changed), or
        None for an unknown run. A replica running the run passes the fence it
        claimed it with: LeaseLost if another claim superseded it."""
        outcome = await self._store.update_run(run_id, decide, fence)
        if outcome is not None and outcome[1]:
            self._signals.changed(run_id)
            self._events_added()
        return outcome

    def created(self, run_id: str) -> None:
        self._signals.changed(run_id)
        self._events_added()
