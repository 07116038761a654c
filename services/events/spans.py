"""The events service's spans: every delivery and acknowledgement of a run's
events lands in that run's trace.

Each event carries the W3C context of the span that produced it (the
executor's, for a run's events). A span about events is a child of the first
event's producing span, so `switchboard trace show RUN` finds it under the
run. It links to each span that produced one of its events (the link names
those events' seqs, `switchboard.event.seqs`) and to the RPC that carried it
(a Subscribe stream or an Acknowledge call, usually in the subscriber's own
trace): delivery is detached from the run, so both relations are kept. An
event without a trace context leaves its spans in the RPC's trace.

| span | kind | one per | `messaging.operation.*` (type / name) |
|---|---|---|---|
| `events.deliver` | PRODUCER | EventBatch sent (one run's deliveries) | send / deliver |
| `events.dead_letter` | PRODUCER | dead-letter marker sent; status ERROR | send / dead_letter |
| `events.ack` | INTERNAL | ack message (stream or unary) per run and outcome; cumulative ack | settle / ack |
| `events.nack` | INTERNAL | nack message per run and outcome | settle / nack |

From this service's side a delivery is a send to the subscriber (the
conventions' old "deliver" operation type is deprecated); an acknowledgement
is the settlement the subscriber asked for, done inside the RPC that carried it.

One span per batch rather than per event: a subscriber that keeps up gets
batches of one event, so its trace has a span per delivery; a subscriber that
catches up on a backlog (a durable consumer reconnecting, a replay from the
beginning) gets up to `delivery_batch_size` events a message, where a span each
would cost more than the delivery itself (a span is about 30 µs on the event
loop and 100 µs more to export to the trace file, against about 85 µs of CPU
to deliver and acknowledge an event). For the same reason links go to
producing spans, not to events: a run's events come from a few spans. Measured
in-process on SQLite (9000 events, 200 in flight, an ack per batch): 85 µs of
CPU per event untraced, 91 µs traced, export included. No event is lost from
view: a span about one event names it (`messaging.message.id`,
`switchboard.event.seq`, `switchboard.event.attempt`, its type and agent), a
span about several names every seq (`switchboard.event.seqs`, with
`switchboard.event.attempts` in the same order for deliveries).

Attributes: `messaging.system` ("switchboard"), `messaging.consumer.group.name`
(durable consumers), `messaging.client.id` (the subscription), `switchboard.run_id`,
`switchboard.user_id`, `switchboard.event.seq` (the first event's),
`messaging.batch.message_count` for several events, `switchboard.ack.outcome`
("accepted", "stale" or "unknown"), and for a cumulative ack
`switchboard.ack.through_seq`. An ack answered UNKNOWN about something that is
not the caller's event cannot be placed in a run's trace (the run may be
another user's): it is a span event on the RPC's span instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from services.common.tracing import (
    ATTR_AGENT,
    ATTR_EVENT_SEQ,
    ATTR_RUN_ID,
    ATTR_USER_ID,
    context_from_carrier,
)
from services.events.domain import (
    AckOutcome,
    AckReport,
    AckResult,
    DeadLettered,
    Delivered,
    DeliveryBatch,
    EventType,
    StoredEvent,
)

DELIVER_SPAN: Final = "events.deliver"
DEAD_LETTER_SPAN: Final = "events.dead_letter"
ACK_SPAN: Final = "events.ack"
NACK_SPAN: Final = "events.nack"

# OpenTelemetry messaging conventions (semantic conventions 1.3x).
ATTR_MESSAGING_SYSTEM: Final = "messaging.system"
ATTR_OPERATION_TYPE: Final = "messaging.operation.type"
ATTR_OPERATION_NAME: Final = "messaging.operation.name"
ATTR_MESSAGE_ID: Final = "messaging.message.id"
ATTR_CONSUMER_GROUP: Final = "messaging.consumer.group.name"
ATTR_CLIENT_ID: Final = "messaging.client.id"
ATTR_BATCH_COUNT: Final = "messaging.batch.message_count"
ATTR_ERROR_TYPE: Final = "error.type"
MESSAGING_SYSTEM: Final = "switchboard"
# Ours (the conventions have no generic delivery attempt).
ATTR_EVENT_ATTEMPT: Final = "switchboard.event.attempt"
ATTR_EVENT_TYPE: Final = "switchboard.event.type"
ATTR_EVENT_SEQS: Final = "switchboard.event.seqs"
ATTR_EVENT_ATTEMPTS: Final = "switchboard.event.attempts"
ATTR_ACK_OUTCOME: Final = "switchboard.ack.outcome"
ATTR_ACK_THROUGH_SEQ: Final = "switchboard.ack.through_seq"
ATTR_NACK_DELAY: Final = "switchboard.nack.delay_seconds"
# On a link: what the linked span is to this one ("producer" or the carrying RPC).
ATTR_LINK_ROLE: Final = "switchboard.link"
PRODUCER_LINK: Final = "producer"
SUBSCRIBE_LINK: Final = "subscribe_call"
ACK_CALL_LINK: Final = "ack_call"

_TYPE_NAMES = {int(kind): kind.name for kind in EventType}
_OUTCOME_NAMES = {outcome: outcome.name.lower() for outcome in AckOutcome}


@functools.lru_cache(maxsize=4096)
def _span_context(traceparent: str, tracestate: str) -> trace.SpanContext | None:
    # Cached: a run's events share a few producing spans, and parsing is most of a link's cost.
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = trace.get_current_span(context_from_carrier(carrier)).get_span_context()
    return context if context.is_valid else None


def producer_context(event: StoredEvent) -> trace.SpanContext | None:
    """The context of the span that produced the event (None without a valid one)."""
    return _span_context(event.traceparent, event.tracestate) if event.traceparent else None


def _producer_links(events: Sequence[StoredEvent]) -> list[trace.Link]:
    """A link to each span that produced some of `events`, naming their seqs."""
    produced: dict[tuple[int, int], tuple[trace.SpanContext, list[int]]] = {}
    for event in events:
        producer = producer_context(event)
        if producer is not None:
            produced.setdefault((producer.trace_id, producer.span_id), (producer, []))[1].append(event.seq)
    return [
        trace.Link(producer, {ATTR_LINK_ROLE: PRODUCER_LINK, ATTR_EVENT_SEQS: seqs})
        for producer, seqs in produced.values()
    ]


class EventSpans:
    """Makes the spans described above; the servicer calls it as it sends
    deliveries and answers acknowledgements."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("switchboard.events", tracer_provider=tracer_provider)

    def _start(
        self,
        name: str,
        events: Sequence[StoredEvent],
        attributes: dict[str, AttributeValue],
        kind: trace.SpanKind,
        call_link: list[trace.Link],
        start_time: int | None = None,
        under_last: bool = False,
    ) -> trace.Span:
        # Under the first (or last) event's producer: in the run's trace. Else
        # under the current (RPC) span.
        candidates = reversed(events) if under_last else iter(events)
        producer = next((c for e in candidates if (c := producer_context(e)) is not None), None)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(producer)) if producer else None
        return self._tracer.start_span(
            name,
            context=parent,
            kind=kind,
            links=_producer_links(events) + call_link,
            attributes=attributes,
            start_time=start_time,
        )

    @staticmethod
    def _about(
        operation_type: str,
        operation: str,
        events: Sequence[StoredEvent],
        user_id: str,
        consumer: str | None,
        client: str,
    ) -> dict[str, AttributeValue]:
        """The attributes of a span about `events` (of one run, in seq order)."""
        first = events[0]
        attributes: dict[str, AttributeValue] = {
            ATTR_MESSAGING_SYSTEM: MESSAGING_SYSTEM,
            ATTR_OPERATION_TYPE: operation_type,
            ATTR_OPERATION_NAME: operation,
            ATTR_RUN_ID: first.run_id,
            ATTR_USER_ID: user_id,
            ATTR_EVENT_SEQ: first.seq,
        }
        if consumer:
            attributes[ATTR_CONSUMER_GROUP] = consumer
        if client:
            attributes[ATTR_CLIENT_ID] = client
        if len(events) == 1:
            attributes[ATTR_MESSAGE_ID] = first.event_id
            attributes[ATTR_EVENT_TYPE] = _TYPE_NAMES.get(first.type, str(first.type))
            if first.agent:
                attributes[ATTR_AGENT] = first.agent
        else:
            attributes[ATTR_BATCH_COUNT] = len(events)
            attributes[ATTR_EVENT_SEQS] = [event.seq for event in events]
        return attributes

    @staticmethod
    def _call_link(role: str) -> list[trace.Link]:
        call = trace.get_current_span().get_span_context()
        return [trace.Link(call, {ATTR_LINK_ROLE: role})] if call.is_valid else []

    # -- deliveries

    def start_delivery(
        self, batch: DeliveryBatch, *, consumer: str | None, subscription_id: str
    ) -> list[trace.Span]:
        """The spans of sending one batch, started now; `end` them once it is sent.
        Call it where the Subscribe call's span is current (it is linked)."""
        call_link = self._call_link(SUBSCRIBE_LINK)
        delivered = [item for item in batch.items if isinstance(item, Delivered)]
        spans = []
        if delivered:
            events = [item.event for item in delivered]
            attributes = self._about("send", "deliver", events, batch.user_id, consumer, subscription_id)
            if len(delivered) == 1:
                attributes[ATTR_EVENT_ATTEMPT] = delivered[0].attempt
            else:
                attributes[ATTR_EVENT_ATTEMPTS] = [item.attempt for item in delivered]
            spans.append(self._start(DELIVER_SPAN, events, attributes, trace.SpanKind.PRODUCER, call_link))
        for item in batch.items:
            if isinstance(item, DeadLettered):
                attributes = self._about(
                    "send", "dead_letter", [item.event], batch.user_id, consumer, subscription_id
                )
                attributes[ATTR_EVENT_ATTEMPT] = item.attempts
                attributes[ATTR_ERROR_TYPE] = "dead_lettered"
                span = self._start(
                    DEAD_LETTER_SPAN, [item.event], attributes, trace.SpanKind.PRODUCER, call_link
                )
                span.set_status(
                    trace.Status(
                        trace.StatusCode.ERROR, f"dead-lettered after {item.attempts} delivery attempts"
                    )
                )
                spans.append(span)
        return spans

    @staticmethod
    def end(spans: Sequence[trace.Span], failure: BaseException | None = None) -> None:
        """Ends a batch's spans; a failure while sending is recorded on them."""
        for span in spans:
            if failure is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"not sent: {type(failure).__name__}"))
                span.set_attribute(ATTR_ERROR_TYPE, type(failure).__qualname__)
            span.end()

    # -- acknowledgements

    def acknowledged(
        self,
        report: AckReport,
        *,
        user_id: str,
        consumer: str | None,
        subscription_id: str = "",
        nack_delay: float | None = None,
        started: int | None = None,
    ) -> None:
        """Records the answers to one ack (or, with `nack_delay`, nack) message,
        received at `started` (ns since the epoch). Call it where the RPC's span
        is current (it is linked)."""
        call_link = self._call_link(ACK_CALL_LINK)
        operation, name = ("ack", ACK_SPAN) if nack_delay is None else ("nack", NACK_SPAN)
        # Answers by event id, grouped per run and outcome (one group, usually).
        grouped: dict[tuple[str, AckOutcome], list[StoredEvent]] = {}
        for result in report.results:
            if not result.events:
                self._unplaced(result, operation, name)
            elif result.cumulative is not None:
                attributes = self._about(
                    "settle", operation, result.events, user_id, consumer, subscription_id
                )
                attributes[ATTR_ACK_OUTCOME] = _OUTCOME_NAMES[result.outcome]
                attributes[ATTR_ACK_THROUGH_SEQ] = result.cumulative.through_seq
                # Under the last event it reaches: the ack is "through" there.
                self._start(
                    name,
                    result.events,
                    attributes,
                    trace.SpanKind.INTERNAL,
                    call_link,
                    started,
                    under_last=True,
                ).end()
            else:
                event = result.events[0]
                grouped.setdefault((event.run_id, result.outcome), []).append(event)
        for (_, outcome), events in grouped.items():
            attributes = self._about("settle", operation, events, user_id, consumer, subscription_id)
            attributes[ATTR_ACK_OUTCOME] = _OUTCOME_NAMES[outcome]
            if nack_delay is not None:
                attributes[ATTR_NACK_DELAY] = nack_delay
            self._start(name, events, attributes, trace.SpanKind.INTERNAL, call_link, started).end()

    @staticmethod
    def _unplaced(result: AckResult, operation: str, name: str) -> None:
        """Not the caller's event, or no event at all: no run's trace to put it in."""
        attributes: dict[str, AttributeValue] = {
            ATTR_OPERATION_NAME: operation,
            ATTR_ACK_OUTCOME: _OUTCOME_NAMES[result.outcome],
        }
        if result.cumulative is not None:
            attributes[ATTR_RUN_ID] = result.cumulative.run_id
            attributes[ATTR_ACK_THROUGH_SEQ] = result.cumulative.through_seq
        else:
            attributes[ATTR_MESSAGE_ID] = result.event_id
        trace.get_current_span().add_event(name, attributes)
