"""Tracing of deliveries and acknowledgements: which events the domain says an
answer is about (on every backend), and the spans `EventSpans` makes of them,
checked with an in-memory span exporter."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.events.domain import (
    AckOutcome,
    AckReport,
    AckResult,
    CumulativeAck,
    DeadLettered,
    Delivered,
    DeliveryBatch,
    EventsDomain,
    EventType,
    StartKind,
    StartPosition,
    StoredEvent,
    SubscriptionSpec,
)
from services.events.spans import (
    ACK_SPAN,
    DEAD_LETTER_SPAN,
    DELIVER_SPAN,
    NACK_SPAN,
    EventSpans,
)
from tests.unit.events.helpers import NOW, new_event, publish_run, seqs

FROM_BEGINNING = StartPosition(StartKind.FROM_BEGINNING)
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
# Two spans of the run's trace that produced events (say, two steps of the executor's).
PRODUCER_A = 0xB7AD6B7169203331
PRODUCER_B = 0x00F067AA0BA902B7


def traceparent(span_id: int, trace_id: int = TRACE_ID) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


# -- which events an answer is about (the domain, on every backend) ------------


def ids(result: AckResult) -> list[str]:
    return [event.event_id for event in result.events]


async def test_live_acks_name_the_callers_events_they_are_about(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 4)
    foreign_run = await publish_run(domain, 1, user_id="user-b")
    subscription = await domain.subscribe(
        "user-a", SubscriptionSpec(run_id, FROM_BEGINNING, consumer="inbox")
    )
    assert seqs(await subscription.step()) == [1, 2, 3, 4]
    report = await subscription.acknowledge_from_stream(
        [f"{run_id}-1", f"{run_id}-1", "no-such-event", f"{foreign_run}-1"], [CumulativeAck(run_id, 3)]
    )
    by_id, twice, missing, foreign, cumulative = report.results
    assert (by_id.outcome, ids(by_id)) == (AckOutcome.ACCEPTED, [f"{run_id}-1"])
    assert (twice.outcome, ids(twice)) == (AckOutcome.STALE, [f"{run_id}-1"])
    assert (missing.outcome, ids(missing)) == (AckOutcome.UNKNOWN, [])
    # Another user's event: nothing of it reaches the caller's answer (or trace).
    assert (foreign.outcome, ids(foreign)) == (AckOutcome.UNKNOWN, [])
    assert (cumulative.outcome, ids(cumulative)) == (AckOutcome.ACCEPTED, [f"{run_id}-2", f"{run_id}-3"])
    again = await subscription.acknowledge_from_stream([], [CumulativeAck(run_id, 3)])
    # Stale: it names the last event it reaches, to place it in the run's trace.
    assert [(r.outcome, ids(r)) for r in again.results] == [(AckOutcome.STALE, [f"{run_id}-3"])]
    nacked = await subscription.nack_from_stream([f"{run_id}-4", f"{run_id}-2"], delay=0)
    assert [(r.outcome, ids(r)) for r in nacked.results] == [
        (AckOutcome.ACCEPTED, [f"{run_id}-4"]),
        (AckOutcome.STALE, [f"{run_id}-2"]),
    ]
    subscription.close()


async def test_acks_without_a_stream_name_the_events_too(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 4)
    foreign_run = await publish_run(domain, 1, user_id="user-b")
    subscription = await domain.subscribe(
        "user-a", SubscriptionSpec(run_id, FROM_BEGINNING, consumer="inbox")
    )
    assert seqs(await subscription.step()) == [1, 2, 3, 4]
    subscription.close()
    report = await domain.acknowledge(
        "user-a",
        "inbox",
        [f"{run_id}-4", f"{foreign_run}-1"],
        [CumulativeAck(run_id, 2), CumulativeAck(foreign_run, 1)],
    )
    by_id, foreign, cumulative, foreign_cumulative = report.results
    assert (by_id.outcome, ids(by_id)) == (AckOutcome.ACCEPTED, [f"{run_id}-4"])
    assert (foreign.outcome, ids(foreign)) == (AckOutcome.UNKNOWN, [])
    assert (cumulative.outcome, ids(cumulative)) == (AckOutcome.ACCEPTED, [f"{run_id}-1", f"{run_id}-2"])
    assert (foreign_cumulative.outcome, ids(foreign_cumulative)) == (AckOutcome.UNKNOWN, [])
    again = await domain.acknowledge("user-a", "inbox", [], [CumulativeAck(run_id, 2)])
    assert [(r.outcome, ids(r)) for r in again.results] == [(AckOutcome.STALE, [f"{run_id}-2"])]


async def test_a_cumulative_ack_of_an_earlier_connections_deliveries_names_them(
    domain: EventsDomain,
) -> None:
    run_id = await publish_run(domain, 3)
    first = await domain.subscribe("user-a", SubscriptionSpec(run_id, FROM_BEGINNING, consumer="inbox"))
    assert seqs(await first.step()) == [1, 2, 3]
    first.close()
    # Reconnected, and acked before anything is redelivered.
    second = await domain.subscribe("user-a", SubscriptionSpec(run_id, consumer="inbox"))
    report = await second.acknowledge_from_stream([], [CumulativeAck(run_id, 2)])
    [result] = report.results
    assert (result.outcome, ids(result)) == (AckOutcome.ACCEPTED, [f"{run_id}-1", f"{run_id}-2"])
    assert seqs(await second.step()) == [3]
    second.close()


# -- the spans ----------------------------------------------------------------


@dataclass
class Traced:
    spans: EventSpans
    exporter: InMemorySpanExporter
    tracer: trace.Tracer

    def finished(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == name]


@pytest.fixture
def traced() -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Traced(EventSpans(provider), exporter, provider.get_tracer("tests"))
    provider.shutdown()


def stored(
    seq: int,
    producer: int | None = PRODUCER_A,
    run_id: str = "r1",
    type: EventType = EventType.AGENT_THINKING,
    agent: str = "",
) -> StoredEvent:
    event = new_event(
        run_id, seq, type=type, agent=agent, traceparent=traceparent(producer) if producer else ""
    )
    return StoredEvent(
        event.event_id,
        event.run_id,
        event.user_id,
        event.seq,
        event.type,
        event.step_id,
        event.agent,
        event.payload,
        datetime(2026, 1, 1, tzinfo=UTC),
        event.traceparent,
        event.tracestate,
        epoch=1,
        content_hash=uuid.uuid4().hex,
    )


def parent_of(span: ReadableSpan) -> tuple[int, int]:
    assert span.parent is not None
    return span.parent.trace_id, span.parent.span_id


def links_of(span: ReadableSpan) -> list[tuple[int, dict[str, object]]]:
    """(span id, attributes) of each link; sequences as lists."""
    return [
        (
            link.context.span_id,
            {k: list(v) if isinstance(v, tuple) else v for k, v in (link.attributes or {}).items()},
        )
        for link in span.links
    ]


def test_a_single_delivery_is_a_span_under_its_producer(traced: Traced) -> None:
    event = stored(3, agent="text-stats", type=EventType.TOOL_EXECUTING)
    with traced.tracer.start_as_current_span("Subscribe") as call:
        spans = traced.spans.start_delivery(
            DeliveryBatch("r1", "user-a", (Delivered(event, 2),)), consumer="inbox", subscription_id="sub-1"
        )
    traced.spans.end(spans)
    [span] = traced.finished(DELIVER_SPAN)
    assert span.kind is trace.SpanKind.PRODUCER
    assert parent_of(span) == (TRACE_ID, PRODUCER_A)
    assert dict(span.attributes or {}) == {
        "messaging.system": "switchboard",
        "messaging.operation.type": "send",
        "messaging.operation.name": "deliver",
        "messaging.consumer.group.name": "inbox",
        "messaging.client.id": "sub-1",
        "messaging.message.id": "r1-3",
        "switchboard.run_id": "r1",
        "switchboard.user_id": "user-a",
        "switchboard.agent": "text-stats",
        "switchboard.event.seq": 3,
        "switchboard.event.type": "TOOL_EXECUTING",
        "switchboard.event.attempt": 2,
    }
    call_id = call.get_span_context().span_id
    assert links_of(span) == [
        (PRODUCER_A, {"switchboard.link": "producer", "switchboard.event.seqs": [3]}),
        (call_id, {"switchboard.link": "subscribe_call"}),
    ]
    assert span.status.status_code is trace.StatusCode.UNSET


def test_a_batch_is_one_span_naming_every_seq_and_a_dead_letter_is_an_error(traced: Traced) -> None:
    first, second, third, dead = stored(1), stored(2, PRODUCER_B), stored(3), stored(4, PRODUCER_B)
    batch = DeliveryBatch(
        "r1",
        "user-a",
        (Delivered(first, 1), Delivered(second, 3), Delivered(third, 1), DeadLettered(dead, 5)),
    )
    traced.spans.end(traced.spans.start_delivery(batch, consumer=None, subscription_id="sub-1"))
    [span] = traced.finished(DELIVER_SPAN)
    assert parent_of(span) == (TRACE_ID, PRODUCER_A)  # the first event's producer
    attributes = dict(span.attributes or {})
    assert attributes["messaging.batch.message_count"] == 3
    assert list(attributes["switchboard.event.seqs"]) == [1, 2, 3]  # type: ignore[arg-type]
    assert list(attributes["switchboard.event.attempts"]) == [1, 3, 1]  # type: ignore[arg-type]
    assert attributes["switchboard.event.seq"] == 1
    assert "messaging.message.id" not in attributes and "messaging.consumer.group.name" not in attributes
    # A link per producing span, naming the seqs it produced (no Subscribe call is current here).
    assert links_of(span) == [
        (PRODUCER_A, {"switchboard.link": "producer", "switchboard.event.seqs": [1, 3]}),
        (PRODUCER_B, {"switchboard.link": "producer", "switchboard.event.seqs": [2]}),
    ]
    [marker] = traced.finished(DEAD_LETTER_SPAN)
    assert parent_of(marker) == (TRACE_ID, PRODUCER_B)
    assert marker.status.status_code is trace.StatusCode.ERROR
    assert "5 delivery attempts" in (marker.status.description or "")
    marker_attributes = dict(marker.attributes or {})
    assert marker_attributes["switchboard.event.seq"] == 4
    assert marker_attributes["messaging.message.id"] == "r1-4"
    assert marker_attributes["switchboard.event.attempt"] == 5
    assert marker_attributes["error.type"] == "dead_lettered"


def test_an_event_without_a_trace_context_stays_in_the_calls_trace(traced: Traced) -> None:
    with traced.tracer.start_as_current_span("Subscribe") as call:
        spans = traced.spans.start_delivery(
            DeliveryBatch("r1", "user-a", (Delivered(stored(1, producer=None), 1),)),
            consumer=None,
            subscription_id="sub-1",
        )
    traced.spans.end(spans, failure=ConnectionResetError())
    [span] = traced.finished(DELIVER_SPAN)
    assert parent_of(span) == (call.get_span_context().trace_id, call.get_span_context().span_id)
    assert [a["switchboard.link"] for _, a in links_of(span)] == ["subscribe_call"]
    # Not sent: the failure is on the span.
    assert span.status.status_code is trace.StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "ConnectionResetError"


def test_acks_are_spans_per_run_and_outcome(traced: Traced) -> None:
    one, two, three = stored(1), stored(2, PRODUCER_B), stored(3)
    other = stored(7, PRODUCER_B, run_id="r2")
    report = AckReport(
        (
            AckResult(AckOutcome.ACCEPTED, event_id=one.event_id, events=(one,)),
            AckResult(AckOutcome.STALE, event_id=two.event_id, events=(two,)),
            AckResult(AckOutcome.ACCEPTED, event_id=three.event_id, events=(three,)),
            AckResult(AckOutcome.ACCEPTED, event_id=other.event_id, events=(other,)),
            AckResult(AckOutcome.UNKNOWN, event_id="not-mine"),
            AckResult(AckOutcome.ACCEPTED, cumulative=CumulativeAck("r1", 2), events=(one, two)),
        )
    )
    with traced.tracer.start_as_current_span("Acknowledge") as call:
        traced.spans.acknowledged(report, user_id="user-a", consumer="inbox", started=1_000)
    call_id = call.get_span_context().span_id

    def key(span: ReadableSpan) -> tuple[object, ...]:
        a = dict(span.attributes or {})
        return a["switchboard.run_id"], a["switchboard.ack.outcome"], "switchboard.ack.through_seq" in a

    spans = {key(span): span for span in traced.finished(ACK_SPAN)}
    assert set(spans) == {
        ("r1", "accepted", False),
        ("r1", "stale", False),
        ("r2", "accepted", False),
        ("r1", "accepted", True),
    }
    for span in spans.values():
        assert span.kind is trace.SpanKind.INTERNAL
        assert span.start_time == 1_000  # when the ack arrived
        assert links_of(span)[-1] == (call_id, {"switchboard.link": "ack_call"})

    accepted = spans[("r1", "accepted", False)]
    assert parent_of(accepted) == (TRACE_ID, PRODUCER_A)
    attributes = dict(accepted.attributes or {})
    assert attributes["messaging.operation.type"] == "settle"
    assert attributes["messaging.consumer.group.name"] == "inbox"
    assert list(attributes["switchboard.event.seqs"]) == [1, 3]  # type: ignore[arg-type]
    assert links_of(accepted)[0] == (
        PRODUCER_A,
        {"switchboard.link": "producer", "switchboard.event.seqs": [1, 3]},
    )
    stale = dict(spans[("r1", "stale", False)].attributes or {})
    assert (stale["messaging.message.id"], stale["switchboard.event.seq"]) == ("r1-2", 2)
    assert parent_of(spans[("r2", "accepted", False)]) == (TRACE_ID, PRODUCER_B)

    cumulative = spans[("r1", "accepted", True)]
    assert parent_of(cumulative) == (TRACE_ID, PRODUCER_B)  # the last event it reaches
    cumulative_attributes = dict(cumulative.attributes or {})
    assert cumulative_attributes["switchboard.ack.through_seq"] == 2
    assert cumulative_attributes["messaging.batch.message_count"] == 2
    assert list(cumulative_attributes["switchboard.event.seqs"]) == [1, 2]  # type: ignore[arg-type]

    # Not the caller's (or nothing at all): only an event on the call's span.
    [unplaced] = [e for e in call.events if e.name == ACK_SPAN]  # type: ignore[attr-defined]
    assert dict(unplaced.attributes or {}) == {
        "messaging.operation.name": "ack",
        "switchboard.ack.outcome": "unknown",
        "messaging.message.id": "not-mine",
    }


def test_a_nack_is_its_own_span_with_its_delay(traced: Traced) -> None:
    event = stored(4)
    report = AckReport((AckResult(AckOutcome.ACCEPTED, event_id=event.event_id, events=(event,)),))
    traced.spans.acknowledged(
        report, user_id="user-a", consumer=None, subscription_id="sub-1", nack_delay=2.5
    )
    [span] = traced.finished(NACK_SPAN)
    assert parent_of(span) == (TRACE_ID, PRODUCER_A)
    attributes = dict(span.attributes or {})
    assert (attributes["messaging.operation.name"], attributes["switchboard.nack.delay_seconds"]) == (
        "nack",
        2.5,
    )
    assert (attributes["switchboard.ack.outcome"], attributes["messaging.client.id"]) == ("accepted", "sub-1")
    assert traced.finished(ACK_SPAN) == []


async def test_published_trace_contexts_come_back_unchanged(domain: EventsDomain) -> None:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    context = traceparent(PRODUCER_B)
    await domain.publish([new_event(run_id, 1, traceparent=context, tracestate="vendor=1")], NOW)
    subscription = await domain.subscribe("user-a", SubscriptionSpec(run_id, FROM_BEGINNING))
    [batch] = await subscription.step()
    assert isinstance(batch, DeliveryBatch)
    [item] = batch.items
    assert (item.event.traceparent, item.event.tracestate) == (context, "vendor=1")
    subscription.close()
