"""`switchboard.events.v1.EventsService`: request validation and proto <-> domain.

Who may do what:
- Publish needs the `service` role (anyone else: PERMISSION_DENIED).
- Everything else reads or acknowledges a run's events, which belong to the
  run's owner alone: admin and service roles get no special access. Another
  user's run answers exactly like a run that does not exist (NOT_FOUND), and an
  ack naming anything that is not the caller's is UNKNOWN and changes nothing.

Publish: at most 500 events a batch, stored whole or not at all. Per run, seq N
is stored only after N-1 (a run starts at 1); a gap is FAILED_PRECONDITION
(reason SEQUENCE_GAP, naming the run and the expected seq), a seq already taken
by another event is FAILED_PRECONDITION (SEQUENCE_TAKEN). A repeat of a stored
event (same id, same content) returns its original position with
`duplicate=true`; the same id with other content is ALREADY_EXISTS
(EVENT_ID_CONFLICT). The first event of a run fixes its owner (`user_id`, a
later event naming another is INVALID_ARGUMENT) and its `epoch` (the creation
time in milliseconds), stamped on every event; nothing is stored after the
run's RUN_COMPLETED event (FAILED_PRECONDITION, RUN_ALREADY_COMPLETED). The
producer's `epoch` field is ignored.

Subscribe: the first message must be `open` (else INVALID_ARGUMENT); every
problem with the request, the run (NOT_FOUND) or the resume point
(OUT_OF_RANGE, reason EPOCH_MISMATCH or SEQ_BEYOND_STREAM) is answered before
anything is sent. Then `opened`, then:
- `events`: each EventBatch holds deliveries of one run in seq order (a
  redelivery may come after later events of its run: dedupe by seq). At most
  `max_in_flight` deliveries are unacknowledged at once. An event not
  acknowledged within `ack_deadline` (or nacked, after the nack's delay) is
  redelivered with `delivery_attempt` + 1; after the service's maximum attempts
  (SWITCHBOARD_EVENTS_MAX_DELIVERY_ATTEMPTS) it is dead-lettered for this
  consumer and a `dead_letter` delivery takes its place, so no seq is skipped
  silently.
- `ack_results`: one per ack or nack message, a result per event id and per
  cumulative ack, in request order: ACCEPTED (it awaited acknowledgement),
  STALE (this subscription or consumer had already settled it: acknowledged or
  dead-lettered), UNKNOWN (never delivered here, or not the caller's). A
  cumulative ack settles the run's delivered events through `through_seq`;
  events not yet delivered stay due. An ack names an event, not an attempt:
  one that arrives after a redelivery still settles the event (ACCEPTED).
- `heartbeat`: on a stream idle for SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS, with
  each followed run's epoch and last seq (the 100 most recently active).
- `run_completed`: once the run's RUN_COMPLETED event was delivered and
  settled here (a single-run subscription also hears it for a run that had
  ended before it opened).
- `reset`: retention removed events of a run that this subscription was to
  deliver (from where it started, or where its durable consumer stood): the
  events through `position.last_seq` are gone and delivery goes on after it;
  nothing is skipped silently. A durable consumer's position moves there.
Start positions: `from_beginning`; `after_seq` (single-run only); `new_only`;
`resume` (run, epoch, last_acked_seq: continues after that seq; OUT_OF_RANGE
with reason EVENTS_TRIMMED, naming `trimmed_through`, when retention already
removed events after that seq). Unset: a
durable consumer continues where it left off (from the beginning on runs it
never read); an ephemeral subscription gets new events only. With `all_runs`,
runs that begin after the subscription opened are delivered from seq 1.

Durable consumers (`consumer`, scoped to the caller) keep their position per
run in the log (SQL, or Redis shared by replicas): a reconnect, to this
process or to another replica, or a restart of the service, sends nothing
already acknowledged and skips nothing unacknowledged (deliveries left
unacknowledged by the last connection are redelivered at once, their attempts
counted). An explicit start position applies only to runs the consumer has no
position on yet; `resume` moves the consumer forward (it counts as an ack
through `last_acked_seq`), never back. If a second connection opens a durable
consumer that is already open, here or on another replica, the newer
connection takes over: the older stream ends with ABORTED (reason
CONSUMER_TAKEN_OVER), can no longer move the consumer, and everything it left
unacknowledged is redelivered on the newer one. Ephemeral subscriptions keep
their state in memory only. On shutdown every stream ends with UNAVAILABLE
(reason SHUTTING_DOWN): reconnect.

Every ack or nack on the stream re-verifies the stream's token: once it is
revoked or expired the stream ends with UNAUTHENTICATED (refusals are counted
like any other, `switchboard.token.verification.failures`).

Acknowledge (unary) acts on a durable consumer of the caller's, whether or not
a stream of it is open (on another replica, that stream takes the ack in). ListEvents pages a run's history by seq (owner only).
ListEvents after a seq that retention removed is OUT_OF_RANGE (EVENTS_TRIMMED,
naming `trimmed_through`), not a partial page presented as complete.
GetDeliveryStatus counts, per durable consumer of the caller's with a position
on the run, the events delivered, acknowledged, pending and dead-lettered.

Retention (SWITCHBOARD_EVENTS_RETENTION_*): events older than MAX_AGE_SECONDS
are removed whoever has read them; events older than SETTLED_AGE_SECONDS are
removed once every durable consumer with a position on their run settled them.
A run keeps its owner, epoch and last seq after its events are gone.

Tracing (services.events.spans): each EventBatch sent is an `events.deliver`
span and each dead-letter marker an `events.dead_letter` span; each ack or
nack message (stream or unary) is an `events.ack` / `events.nack` span per run
it names, with the outcome. All of them sit in the run's trace, under the
span that produced the first event they are about, and link to every such
event's producing span and to the carrying RPC. Publish's server span names
the batch's size and, when the batch is one run's, the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format
from opentelemetry import trace
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc

from services.common.auth import Role, TokenVerifier
from services.common.convert import duration, from_timestamp, seconds, struct, timestamp, utcnow
from services.common.errors import FieldViolation, InvalidArgument, Violations
from services.common.interceptors import principal_of
from services.common.pagination import next_page_token, page_request
from services.common.tracing import ATTR_RUN_ID, ATTR_USER_ID
from services.events.domain import (
    CONSUMER_NAME_PATTERN,
    DEFAULT_ACK_DEADLINE_SECONDS,
    DEFAULT_MAX_IN_FLIGHT,
    LIST_DEFAULT_PAGE_SIZE,
    LIST_MAX_PAGE_SIZE,
    MAX_ACK_DEADLINE_SECONDS,
    MAX_ID_CHARS,
    MAX_MAX_IN_FLIGHT,
    MAX_NACK_DELAY_SECONDS,
    MAX_PUBLISH_BATCH,
    MIN_ACK_DEADLINE_SECONDS,
    AckReport,
    CumulativeAck,
    DeadLettered,
    DeliveryBatch,
    EventsDomain,
    EventType,
    Heartbeat,
    NewEvent,
    Output,
    ResumePoint,
    RunStreamCompleted,
    StartKind,
    StartPosition,
    StoredEvent,
    StreamReset,
    Subscription,
    SubscriptionSpec,
)
from services.events.spans import ATTR_BATCH_COUNT, ATTR_MESSAGING_SYSTEM, ATTR_OPERATION_NAME, EventSpans

SERVICE_NAME = events_service_pb2.DESCRIPTOR.services_by_name["EventsService"].full_name
TRACEPARENT_PATTERN = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_STEP_ID_CHARS = 256
MAX_TRACESTATE_CHARS = 512

Context = grpc.aio.ServicerContext[Any, Any]


def _seconds(value: duration_pb2.Duration) -> float:
    # A Duration whose parts disagree in sign is malformed: treat it as negative.
    if value.seconds < 0 or value.nanos < 0:
        return min(-abs(seconds(value)), -1e-9)
    return seconds(value)


def _check_id(violations: Violations, value: str, path: str) -> None:
    if not value:
        violations.add(path, "is required")
    elif len(value) > MAX_ID_CHARS:
        violations.add(path, f"must be at most {MAX_ID_CHARS} characters")


def new_event(event: event_pb2.Event, path: str, violations: Violations) -> NewEvent:
    _check_id(violations, event.event_id, f"{path}.event_id")
    _check_id(violations, event.run_id, f"{path}.run_id")
    _check_id(violations, event.user_id, f"{path}.user_id")
    violations.check(event.seq >= 1, f"{path}.seq", "must be at least 1")
    known = event.type in EventType._value2member_map_ and event.type != EventType.UNSPECIFIED
    violations.check(known, f"{path}.type", "must be a known event type")
    violations.check(
        len(event.step_id) <= MAX_STEP_ID_CHARS,
        f"{path}.step_id",
        f"must be at most {MAX_STEP_ID_CHARS} characters",
    )
    violations.check(
        len(event.agent) <= MAX_ID_CHARS, f"{path}.agent", f"must be at most {MAX_ID_CHARS} characters"
    )
    traceparent = event.trace_context.traceparent
    violations.check(
        not traceparent or bool(TRACEPARENT_PATTERN.match(traceparent)),
        f"{path}.trace_context.traceparent",
        "must be a W3C traceparent",
    )
    violations.check(
        len(event.trace_context.tracestate) <= MAX_TRACESTATE_CHARS,
        f"{path}.trace_context.tracestate",
        f"must be at most {MAX_TRACESTATE_CHARS} characters",
    )
    return NewEvent(
        event_id=event.event_id,
        run_id=event.run_id,
        user_id=event.user_id,
        seq=event.seq,
        type=event.type,
        step_id=event.step_id,
        agent=event.agent,
        payload=json_format.MessageToDict(event.payload),
        create_time=from_timestamp(event.create_time) if event.HasField("create_time") else None,
        traceparent=traceparent,
        tracestate=event.trace_context.tracestate,
    )


def event_to_proto(event: StoredEvent) -> event_pb2.Event:
    return event_pb2.Event(
        event_id=event.event_id,
        run_id=event.run_id,
        user_id=event.user_id,
        seq=event.seq,
        type=event.type,  # type: ignore[arg-type]
        step_id=event.step_id,
        agent=event.agent,
        payload=struct(dict(event.payload)),
        create_time=timestamp(event.create_time),
        trace_context=event_pb2.TraceContext(traceparent=event.traceparent, tracestate=event.tracestate),
        epoch=event.epoch,
    )


def subscription_spec(message: events_service_pb2.SubscriptionOpen) -> SubscriptionSpec:
    violations = Violations()
    run_id: str | None = None
    scope = message.WhichOneof("scope")
    if scope == "run_id":
        _check_id(violations, message.run_id, "open.run_id")
        run_id = message.run_id
    elif scope == "all_runs":
        violations.check(message.all_runs, "open.all_runs", "must be true when set")
    else:
        violations.add("open.run_id", "one of run_id or all_runs is required")
    start = StartPosition()
    position = message.start.WhichOneof("position")
    if position == "from_beginning":
        violations.check(message.start.from_beginning, "open.start.from_beginning", "must be true when set")
        start = StartPosition(StartKind.FROM_BEGINNING)
    elif position == "after_seq":
        violations.check(message.start.after_seq >= 0, "open.start.after_seq", "must not be negative")
        violations.check(scope == "run_id", "open.start.after_seq", "is for single-run subscriptions only")
        start = StartPosition(StartKind.AFTER_SEQ, after_seq=message.start.after_seq)
    elif position == "new_only":
        violations.check(message.start.new_only, "open.start.new_only", "must be true when set")
        start = StartPosition(StartKind.NEW_ONLY)
    elif position == "resume":
        resume = message.start.resume
        _check_id(violations, resume.run_id, "open.start.resume.run_id")
        if scope == "run_id" and resume.run_id and resume.run_id != message.run_id:
            violations.add("open.start.resume.run_id", "must be the subscription's run")
        violations.check(resume.epoch > 0, "open.start.resume.epoch", "must be the run's epoch")
        violations.check(
            resume.last_acked_seq >= 0, "open.start.resume.last_acked_seq", "must not be negative"
        )
        start = StartPosition(
            StartKind.RESUME, resume=ResumePoint(resume.run_id, resume.epoch, resume.last_acked_seq)
        )
    violations.check(
        not message.consumer or bool(CONSUMER_NAME_PATTERN.match(message.consumer)),
        "open.consumer",
        "must match ^[a-zA-Z0-9._-]{1,64}$",
    )
    violations.check(
        0 <= message.max_in_flight <= MAX_MAX_IN_FLIGHT,
        "open.max_in_flight",
        f"must be 1-{MAX_MAX_IN_FLIGHT} (0 means {DEFAULT_MAX_IN_FLIGHT})",
    )
    ack_deadline = DEFAULT_ACK_DEADLINE_SECONDS
    if message.HasField("ack_deadline") and _seconds(message.ack_deadline) != 0:
        ack_deadline = _seconds(message.ack_deadline)
        violations.check(
            MIN_ACK_DEADLINE_SECONDS <= ack_deadline <= MAX_ACK_DEADLINE_SECONDS,
            "open.ack_deadline",
            "must be 1s-10m (unset means 30s)",
        )
    violations.raise_if_any()
    return SubscriptionSpec(
        run_id=run_id,
        start=start,
        consumer=message.consumer or None,
        max_in_flight=message.max_in_flight or DEFAULT_MAX_IN_FLIGHT,
        ack_deadline=ack_deadline,
    )


def acks_from_proto(
    event_ids: Sequence[str],
    cumulative: Sequence[events_service_pb2.CumulativeAck],
    path: str,
    violations: Violations,
) -> list[CumulativeAck]:
    prefix = f"{path}." if path else ""
    violations.check(bool(event_ids) or bool(cumulative), f"{prefix}event_ids", "name at least one event")
    for index, event_id in enumerate(event_ids):
        _check_id(violations, event_id, f"{prefix}event_ids[{index}]")
    for index, ack in enumerate(cumulative):
        _check_id(violations, ack.run_id, f"{prefix}cumulative[{index}].run_id")
        violations.check(
            ack.through_seq >= 1, f"{prefix}cumulative[{index}].through_seq", "must be at least 1"
        )
    return [CumulativeAck(ack.run_id, ack.through_seq) for ack in cumulative]


def ack_results_to_proto(report: AckReport) -> list[events_service_pb2.AckResult]:
    results = []
    for result in report.results:
        message = events_service_pb2.AckResult(event_id=result.event_id, outcome=int(result.outcome))  # type: ignore[arg-type]
        if result.cumulative is not None:
            message.cumulative.run_id = result.cumulative.run_id
            message.cumulative.through_seq = result.cumulative.through_seq
        results.append(message)
    return results


def batch_to_proto(batch: DeliveryBatch) -> events_service_pb2.EventBatch:
    deliveries = []
    for item in batch.items:
        if isinstance(item, DeadLettered):
            deliveries.append(
                events_service_pb2.Delivery(
                    dead_letter=events_service_pb2.DeadLetter(
                        event_id=item.event.event_id,
                        run_id=item.event.run_id,
                        seq=item.event.seq,
                        delivery_attempts=item.attempts,
                    ),
                    delivery_attempt=item.attempts,
                )
            )
        else:
            deliveries.append(
                events_service_pb2.Delivery(event=event_to_proto(item.event), delivery_attempt=item.attempt)
            )
    return events_service_pb2.EventBatch(deliveries=deliveries)


def output_to_proto(output: Output) -> events_service_pb2.SubscribeResponse:
    if isinstance(output, DeliveryBatch):
        return events_service_pb2.SubscribeResponse(events=batch_to_proto(output))
    if isinstance(output, AckReport):
        return events_service_pb2.SubscribeResponse(
            ack_results=events_service_pb2.AckResults(results=ack_results_to_proto(output))
        )
    if isinstance(output, Heartbeat):
        return events_service_pb2.SubscribeResponse(
            heartbeat=events_service_pb2.Heartbeat(
                positions=[
                    events_service_pb2.RunPosition(run_id=p.run_id, epoch=p.epoch, last_seq=p.last_seq)
                    for p in output.positions
                ]
            )
        )
    if isinstance(output, StreamReset):
        return events_service_pb2.SubscribeResponse(
            reset=events_service_pb2.StreamReset(
                position=events_service_pb2.RunPosition(
                    run_id=output.run_id, epoch=output.epoch, last_seq=output.trimmed_through
                ),
                reason=output.reason,
            )
        )
    assert isinstance(output, RunStreamCompleted)
    return events_service_pb2.SubscribeResponse(
        run_completed=events_service_pb2.RunStreamCompleted(run_id=output.run_id, last_seq=output.last_seq)
    )


def _describe_publish(batch: Sequence[NewEvent]) -> None:
    """Names the batch on Publish's server span (the events keep their own contexts)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute(ATTR_MESSAGING_SYSTEM, "switchboard")
    span.set_attribute(ATTR_OPERATION_NAME, "publish")
    span.set_attribute(ATTR_BATCH_COUNT, len(batch))
    if len({event.run_id for event in batch}) == 1:
        span.set_attribute(ATTR_RUN_ID, batch[0].run_id)
        span.set_attribute(ATTR_USER_ID, batch[0].user_id)


class EventsServicer(events_service_pb2_grpc.EventsServiceServicer):
    def __init__(
        self,
        domain: EventsDomain,
        verifier: TokenVerifier | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self._domain = domain
        # Re-checks a stream's token on each ack (None: not re-checked).
        self._verifier = verifier
        self._spans = EventSpans(tracer_provider)

    async def Publish(
        self, request: events_service_pb2.PublishRequest, context: Context
    ) -> events_service_pb2.PublishResponse:
        principal_of(context).require_role(Role.SERVICE)
        violations = Violations()
        if not request.events:
            violations.add("events", "must hold at least one event")
        if len(request.events) > MAX_PUBLISH_BATCH:
            violations.add("events", f"must hold at most {MAX_PUBLISH_BATCH} events")
        batch = [new_event(event, f"events[{i}]", violations) for i, event in enumerate(request.events)]
        violations.raise_if_any()
        _describe_publish(batch)
        results = await self._domain.publish(batch, utcnow())
        return events_service_pb2.PublishResponse(
            results=[
                events_service_pb2.PublishResult(
                    event_id=r.event_id, run_id=r.run_id, seq=r.seq, duplicate=r.duplicate
                )
                for r in results
            ]
        )

    async def Subscribe(  # type: ignore[override]
        self, request_iterator: AsyncIterator[events_service_pb2.SubscribeRequest], context: Context
    ) -> AsyncIterator[events_service_pb2.SubscribeResponse]:
        principal = principal_of(context)
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("request") != "open":
            raise InvalidArgument(
                [FieldViolation("open", "the first message must open the subscription")],
                reason="SUBSCRIPTION_NOT_OPEN",
            )
        spec = subscription_spec(first.open)
        subscription = await self._domain.subscribe(principal.user_id, spec)
        reader = asyncio.create_task(self._read_requests(requests, subscription, context))
        # Whatever ends the reader (a bad message, a revoked token, a failure)
        # ends the stream with that error.
        reader.add_done_callback(
            lambda task: (
                subscription.fail(error)
                if not task.cancelled() and (error := task.exception()) is not None
                else None
            )
        )

        def release(_: object) -> None:
            # A client that goes away while a message is being written leaves
            # this generator suspended; free the subscription when the RPC ends
            # rather than when the generator is collected.
            reader.cancel()
            subscription.close()

        context.add_done_callback(release)  # type: ignore[arg-type]  # grpc-stubs types callbacks as a class
        try:
            yield events_service_pb2.SubscribeResponse(
                opened=events_service_pb2.SubscriptionOpened(
                    subscription_id=subscription.subscription_id,
                    consumer=spec.consumer or "",
                    max_in_flight=spec.max_in_flight,
                    ack_deadline=duration(spec.ack_deadline),
                )
            )
            async with contextlib.aclosing(subscription.stream()) as stream:
                async for outputs in stream:
                    for output in outputs:
                        if not isinstance(output, DeliveryBatch):
                            yield output_to_proto(output)
                            continue
                        spans = self._spans.start_delivery(
                            output, consumer=spec.consumer, subscription_id=subscription.subscription_id
                        )
                        failure: BaseException | None = None
                        try:
                            yield output_to_proto(output)
                        except BaseException as exc:
                            failure = exc
                            raise
                        finally:
                            self._spans.end(spans, failure)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            subscription.close()

    async def _read_requests(
        self,
        requests: AsyncIterator[events_service_pb2.SubscribeRequest],
        subscription: Subscription,
        context: Context,
    ) -> None:
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "open":
                raise InvalidArgument(
                    [FieldViolation("open", "the subscription is already open")], reason="ALREADY_OPEN"
                )
            if kind not in ("ack", "nack"):
                raise InvalidArgument([FieldViolation("request", "must be ack or nack")])
            received = time.time_ns()
            if self._verifier is not None:
                await self._verifier.verify_metadata(tuple(context.invocation_metadata() or ()))
            violations = Violations()
            nack_delay: float | None = None
            if kind == "ack":
                cumulative = acks_from_proto(request.ack.event_ids, request.ack.cumulative, "ack", violations)
                violations.raise_if_any()
                report = await subscription.acknowledge_from_stream(list(request.ack.event_ids), cumulative)
            else:
                acks_from_proto(request.nack.event_ids, [], "nack", violations)
                nack_delay = _seconds(request.nack.delay)
                violations.check(0 <= nack_delay <= MAX_NACK_DELAY_SECONDS, "nack.delay", "must be 0-10m")
                violations.raise_if_any()
                report = await subscription.nack_from_stream(list(request.nack.event_ids), nack_delay)
            self._spans.acknowledged(
                report,
                user_id=subscription.user_id,
                consumer=subscription.spec.consumer,
                subscription_id=subscription.subscription_id,
                nack_delay=nack_delay,
                started=received,
            )

    async def Acknowledge(
        self, request: events_service_pb2.AcknowledgeRequest, context: Context
    ) -> events_service_pb2.AcknowledgeResponse:
        principal = principal_of(context)
        violations = Violations()
        if not request.consumer:
            violations.add("consumer", "is required")
        elif not CONSUMER_NAME_PATTERN.match(request.consumer):
            violations.add("consumer", "must match ^[a-zA-Z0-9._-]{1,64}$")
        cumulative = acks_from_proto(request.event_ids, request.cumulative, "", violations)
        violations.raise_if_any()
        received = time.time_ns()
        report = await self._domain.acknowledge(
            principal.user_id, request.consumer, list(request.event_ids), cumulative
        )
        self._spans.acknowledged(
            report, user_id=principal.user_id, consumer=request.consumer, started=received
        )
        return events_service_pb2.AcknowledgeResponse(results=ack_results_to_proto(report))

    async def ListEvents(
        self, request: events_service_pb2.ListEventsRequest, context: Context
    ) -> events_service_pb2.ListEventsResponse:
        principal = principal_of(context)
        violations = Violations()
        _check_id(violations, request.run_id, "run_id")
        violations.check(request.after_seq >= 0, "after_seq", "must not be negative")
        violations.raise_if_any()
        filters = {"run_id": request.run_id, "after_seq": request.after_seq}
        page = page_request(
            request.page_size,
            request.page_token,
            default=LIST_DEFAULT_PAGE_SIZE,
            maximum=LIST_MAX_PAGE_SIZE,
            filters=filters,
        )
        after = request.after_seq
        if page.after is not None:
            if not isinstance(page.after, int) or isinstance(page.after, bool) or page.after < 0:
                raise InvalidArgument([FieldViolation("page_token", "is not a token this method returned")])
            after = page.after
        events, more = await self._domain.list_events(principal.user_id, request.run_id, after, page.size)
        return events_service_pb2.ListEventsResponse(
            events=[event_to_proto(event) for event in events],
            next_page_token=next_page_token(events[-1].seq, filters) if more and events else "",
        )

    async def GetDeliveryStatus(
        self, request: events_service_pb2.GetDeliveryStatusRequest, context: Context
    ) -> events_service_pb2.GetDeliveryStatusResponse:
        principal = principal_of(context)
        violations = Violations()
        _check_id(violations, request.run_id, "run_id")
        violations.raise_if_any()
        run, statuses = await self._domain.delivery_status(principal.user_id, request.run_id)
        return events_service_pb2.GetDeliveryStatusResponse(
            run_id=run.run_id,
            last_seq=run.last_seq,
            consumers=[
                events_service_pb2.ConsumerDeliveryStatus(
                    consumer=s.consumer,
                    delivered=s.delivered,
                    acknowledged=s.acknowledged,
                    pending=s.pending,
                    dead_lettered=s.dead_lettered,
                    last_acked_seq=s.last_acked_seq,
                )
                for s in statuses
            ],
        )
