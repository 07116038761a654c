"""The outbox relay: committed events go to the events service, in order,
exactly as written, however long the events service is away.

Rows are read oldest first (so each run's events go out in seq order), sent
in batches and marked published only after the events service stored them; a
failed batch is sent again after an exponential backoff with jitter. A row is
never skipped: the relay stays on the oldest unpublished row until it goes
through. A duplicate answer (a batch that was stored before its answer got
lost) counts as success. The relay wakes at once when a transaction adds rows,
and also periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError

from services.common.convert import utcnow
from services.common.tracing import ATTR_EVENT_SEQ, ATTR_RUN_ID, context_from_carrier
from services.executor.domain import OutboxEvent

log = logging.getLogger("switchboard.executor.outbox")

# Published rows are kept this long (for inspection), then deleted.
PUBLISHED_RETENTION = timedelta(hours=1)


class PublishFailed(Exception):
    """The events service did not store a batch; it will be sent again."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class EventPublisher(Protocol):
    async def publish(self, events: Sequence[OutboxEvent]) -> None:
        """Stores the batch in the events service, or raises PublishFailed."""
        ...


class OutboxStore(Protocol):
    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        """Unpublished rows, oldest first."""
        ...

    async def mark_published(self, event_ids: Sequence[str], when: datetime) -> None: ...

    async def delete_published(self, before: datetime) -> int: ...


class PublishWatch:
    """Lets StartRun wait until its RUN_QUEUED event went out."""

    def __init__(self) -> None:
        self._done = asyncio.Event()

    def set(self) -> None:
        self._done.set()

    async def wait(self, timeout: float) -> bool:
        if timeout <= 0:
            return self._done.is_set()
        try:
            async with asyncio.timeout(timeout):
                await self._done.wait()
        except TimeoutError:
            return False
        return True


def backoff_delay(failures: int, initial: float, maximum: float, jitter: float) -> float:
    """Exponential backoff with jitter: the n-th consecutive failure waits
    between half and all of min(maximum, initial * 2**(n-1)); `jitter` in [0, 1)."""
    ceiling = min(maximum, initial * 2 ** max(0, failures - 1))
    return ceiling * (0.5 + jitter / 2)


class OutboxRelay:
    def __init__(
        self,
        store: OutboxStore,
        publisher: EventPublisher,
        *,
        batch_size: int = 200,
        poll_seconds: float = 1.0,
        initial_backoff_seconds: float = 0.2,
        max_backoff_seconds: float = 5.0,
        tracer: trace.Tracer | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._initial_backoff = initial_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._tracer = tracer or trace.get_tracer("switchboard.executor")
        self._sleep = sleep
        self._jitter = jitter
        self._clock = clock
        self._wake = asyncio.Event()
        self._watches: dict[str, PublishWatch] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.consecutive_failures = 0

    def notify(self) -> None:
        """A transaction added rows: publish them now."""
        self._wake.set()

    @contextlib.contextmanager
    def watch(self, event_id: str) -> Iterator[PublishWatch]:
        """Register before the event is committed, then wait on the watch."""
        watch = PublishWatch()
        self._watches[event_id] = watch
        try:
            yield watch
        finally:
            self._watches.pop(event_id, None)

    async def publish_pending(self) -> int:
        """Publishes every pending row, batch by batch; raises PublishFailed
        (or a storage error) at the first batch that does not go through."""
        total = 0
        while True:
            batch = await self._store.pending_events(self._batch_size)
            if not batch:
                return total
            await self._publish_batch(batch)
            await self._store.mark_published([e.event_id for e in batch], self._clock())
            for event in batch:
                watch = self._watches.get(event.event_id)
                if watch is not None:
                    watch.set()
            total += len(batch)
            if len(batch) < self._batch_size:
                return total

    async def _publish_batch(self, batch: Sequence[OutboxEvent]) -> None:
        # The Publish span belongs to the first event's run trace; the other
        # events' producing spans are linked, so each run's trace shows it.
        first = batch[0]
        links: list[trace.Link] = []
        first_context = _span_context(first)
        seen = {(first_context.trace_id, first_context.span_id)}
        for event in batch[1:]:
            span_context = _span_context(event)
            key = (span_context.trace_id, span_context.span_id)
            if span_context.is_valid and key not in seen:
                seen.add(key)
                links.append(trace.Link(span_context))
        with self._tracer.start_as_current_span(
            "executor.outbox.publish",
            context=context_from_carrier(dict(first.trace_carrier)),
            kind=trace.SpanKind.PRODUCER,
            links=links,
            attributes={
                ATTR_RUN_ID: first.run_id,
                ATTR_EVENT_SEQ: first.seq,
                "messaging.batch.message_count": len(batch),
            },
        ) as span:
            try:
                await self._publisher.publish(batch)
            except PublishFailed as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code))
                raise

    async def run(self) -> None:
        """Publishes until cancelled; runs go on while the events service is away."""
        last_prune = self._clock()
        while True:
            self._wake.clear()
            try:
                await self.publish_pending()
            except (PublishFailed, SQLAlchemyError, OSError) as exc:
                self.consecutive_failures += 1
                delay = backoff_delay(
                    self.consecutive_failures, self._initial_backoff, self._max_backoff, self._jitter()
                )
                log.warning(
                    "outbox relay could not publish; retrying",
                    extra={"error": str(exc), "failures": self.consecutive_failures, "retry_in": delay},
                )
                await self._sleep(delay)
                continue
            if self.consecutive_failures:
                log.info("outbox relay publishing again", extra={"failures": self.consecutive_failures})
            self.consecutive_failures = 0
            if self._clock() - last_prune > PUBLISHED_RETENTION / 4:
                last_prune = self._clock()
                with contextlib.suppress(SQLAlchemyError, OSError):
                    await self._store.delete_published(last_prune - PUBLISHED_RETENTION)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_seconds):
                    await self._wake.wait()

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self.run(), name="outbox-relay")
            self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if task.cancelled():
            return
        # A bug must not silence the outbox for good: log it and start again.
        log.error("outbox relay crashed; restarting", exc_info=task.exception())
        asyncio.get_running_loop().call_later(self._max_backoff, self.start)

    async def stop(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _span_context(event: OutboxEvent) -> trace.SpanContext:
    return trace.get_current_span(context_from_carrier(dict(event.trace_carrier))).get_span_context()
