"""The outbox relay over real SQLite storage: order, batches, backoff while the
events service is away, duplicates, wake-ups and the Publish span."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry import trace

from services.common.auth import Principal
from services.common.db import create_engine, migrate
from services.common.tracing import current_trace_carrier
from services.executor.domain import (
    MAIN_STEP,
    ExecutionContext,
    RunRecord,
    Thinking,
    begin_attempt,
    new_run,
    record_progress,
)
from services.executor.outbox import OutboxRelay, PublishFailed, backoff_delay
from services.executor.storage import SqlRunStore
from tests.unit.executor.conftest import (
    ALICE,
    BOB,
    MIGRATIONS,
    PATIENCE_SECONDS,
    RecordingPublisher,
    in_memory_tracer,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlRunStore]:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    store = SqlRunStore(create_engine(url))
    yield store
    await store.close()


async def add_run(
    store: SqlRunStore, owner: Principal = ALICE, offset: int = 0, carrier: dict[str, str] | None = None
) -> RunRecord:
    now = NOW + timedelta(seconds=offset)
    context = ExecutionContext.for_new_run(
        owner, thread_id="", request_id="", deadline=now + timedelta(minutes=5), trace_carrier=carrier or {}
    )
    run, queued = new_run(context, agent="echo", input={}, labels={}, now=now, trace_id="")
    stored, _ = await store.create_run(run, [queued])
    return stored


async def add_progress(store: SqlRunStore, run: RunRecord, text: str) -> None:
    """One more event: the attempt's start the first time, then thinking."""
    await store.update_run(
        run.run_id,
        lambda r: (
            begin_attempt(r, MAIN_STEP, 1, NOW, {})
            if r.step(MAIN_STEP).attempts == 0
            else record_progress(r, MAIN_STEP, 1, Thinking(text), NOW, {})
        ),
    )


def relay_for(store: SqlRunStore, publisher: RecordingPublisher, **options: object) -> OutboxRelay:
    values: dict[str, object] = {"batch_size": 2, "poll_seconds": 3600.0}
    values.update(options)
    return OutboxRelay(store, publisher, **values)  # type: ignore[arg-type]


async def test_rows_go_out_in_run_and_seq_order_in_batches(store: SqlRunStore) -> None:
    a = await add_run(store, ALICE, 0)
    b = await add_run(store, BOB, 1)
    for text in ("x", "y"):
        await add_progress(store, a, text)
        await add_progress(store, b, text)
    publisher = RecordingPublisher()

    published = await relay_for(store, publisher).publish_pending()

    assert published == 6
    assert [e.seq for e in publisher.stored[a.run_id]] == [1, 2, 3]
    assert [e.seq for e in publisher.stored[b.run_id]] == [1, 2, 3]
    assert {e.user_id for e in publisher.stored[b.run_id]} == {BOB.user_id}
    assert all(len(batch) <= 2 for batch in publisher.batches)
    assert await store.pending_events(100) == []
    assert [published for _, published in await store.run_events(a.run_id)] == [True, True, True]


async def test_failed_batches_are_retried_with_growing_jittered_backoff(store: SqlRunStore) -> None:
    run = await add_run(store)
    await add_progress(store, run, "x")
    publisher = RecordingPublisher()
    publisher.failures_left = 5
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0)

    relay = relay_for(
        store,
        publisher,
        initial_backoff_seconds=1.0,
        max_backoff_seconds=4.0,
        sleep=sleep,
        jitter=lambda: 0.5,
    )
    relay.start()
    await _until(lambda: len(publisher.stored[run.run_id]) == 2 and relay.consecutive_failures == 0)
    await relay.stop()

    # Half-to-full of min(max, initial * 2**(n-1)); jitter 0.5 takes three quarters.
    assert delays == [0.75, 1.5, 3.0, 3.0, 3.0]
    assert [e.seq for e in publisher.stored[run.run_id]] == [1, 2]


def test_backoff_stays_within_its_jitter_bounds() -> None:
    for failures in range(1, 12):
        ceiling = min(5.0, 0.2 * 2 ** (failures - 1))
        assert backoff_delay(failures, 0.2, 5.0, 0.0) == pytest.approx(ceiling / 2)
        assert backoff_delay(failures, 0.2, 5.0, 0.999999) == pytest.approx(ceiling, rel=1e-5)


async def test_a_lost_answer_is_resent_and_the_duplicate_counts_as_success(store: SqlRunStore) -> None:
    run = await add_run(store)
    await add_progress(store, run, "x")
    publisher = RecordingPublisher()
    publisher.lose_next_answer = True
    relay = relay_for(store, publisher, batch_size=10)

    with pytest.raises(PublishFailed, match="answer lost"):
        await relay.publish_pending()
    assert len(await store.pending_events(10)) == 2  # not marked: the answer never came

    assert await relay.publish_pending() == 2
    assert [e.seq for e in publisher.stored[run.run_id]] == [1, 2]
    assert await store.pending_events(10) == []


async def test_nothing_is_skipped_when_a_batch_fails_midway(store: SqlRunStore) -> None:
    run = await add_run(store)
    for text in "abcde":
        await add_progress(store, run, text)
    publisher = RecordingPublisher()
    relay = relay_for(store, publisher, batch_size=2)
    await relay.publish_pending()
    await add_progress(store, run, "f")
    publisher.failures_left = 1
    with pytest.raises(PublishFailed, match="down"):
        await relay.publish_pending()

    await relay.publish_pending()

    assert [e.seq for e in publisher.stored[run.run_id]] == list(range(1, 8))


async def test_a_new_row_wakes_the_relay_without_waiting_for_the_poll(store: SqlRunStore) -> None:
    publisher = RecordingPublisher()
    relay = relay_for(store, publisher, poll_seconds=3600.0)
    relay.start()
    await asyncio.sleep(0)
    run = await add_run(store)
    relay.notify()
    await _until(lambda: len(publisher.stored[run.run_id]) == 1)
    await relay.stop()


async def test_rows_nobody_announced_are_found_by_the_periodic_sweep(store: SqlRunStore) -> None:
    publisher = RecordingPublisher()
    relay = relay_for(store, publisher, poll_seconds=0.05)
    relay.start()
    run = await add_run(store)
    await _until(lambda: len(publisher.stored[run.run_id]) == 1)
    await relay.stop()


async def test_a_watch_tells_when_an_event_went_out(store: SqlRunStore) -> None:
    publisher = RecordingPublisher()
    relay = relay_for(store, publisher)
    run = await add_run(store)
    ((event, _),) = await store.run_events(run.run_id)
    with relay.watch(event.event_id) as watch:
        publisher.down = True
        with pytest.raises(PublishFailed, match="down"):
            await relay.publish_pending()
        assert not await watch.wait(0.01)
        publisher.down = False
        await relay.publish_pending()
        assert await watch.wait(0)


async def test_the_publish_span_joins_the_first_events_trace_and_links_the_others(
    store: SqlRunStore,
) -> None:
    tracer, exporter = in_memory_tracer()
    carriers: list[dict[str, str]] = []
    span_contexts: list[trace.SpanContext] = []
    for name in ("run-a", "run-b"):
        with tracer.start_as_current_span(name) as span:
            carriers.append(current_trace_carrier())
            span_contexts.append(span.get_span_context())
    a = await add_run(store, ALICE, 0, carriers[0])
    b = await add_run(store, BOB, 1, carriers[1])
    publisher = RecordingPublisher()

    await relay_for(store, publisher, batch_size=10, tracer=tracer).publish_pending()

    (publish,) = [s for s in exporter.get_finished_spans() if s.name == "executor.outbox.publish"]
    assert publish.kind is trace.SpanKind.PRODUCER
    assert publish.context.trace_id == span_contexts[0].trace_id
    assert publish.parent is not None and publish.parent.span_id == span_contexts[0].span_id
    assert [link.context.span_id for link in publish.links] == [span_contexts[1].span_id]
    assert publish.attributes is not None
    assert publish.attributes["switchboard.run_id"] == a.run_id
    assert publish.attributes["messaging.batch.message_count"] == 2
    assert b.run_id in publisher.stored


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE_SECONDS):
        while not condition():  # noqa: ASYNC110 - the fake publisher has no signal
            await asyncio.sleep(0.005)
