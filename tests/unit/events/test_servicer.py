"""The servicer on an in-process grpc.aio server with the real interceptor stack:
validation (BadRequest field names), roles, the Subscribe stream, and spans."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc

from services.common.auth import TokenVerifier
from services.common.server import ServiceParts, build_interceptors
from services.events.domain import DeliverySettings, EventsDomain
from services.events.servicer import SERVICE_NAME, EventsServicer
from services.events.spans import ACK_SPAN, DEAD_LETTER_SPAN, DELIVER_SPAN, NACK_SPAN
from services.events.storage import SqlEventLog
from tests.unit.common.keys import AUDIENCE, ISSUER, Keys, Revocations

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STEP = 5.0  # guard against a hang; no test measures time


@dataclass
class Server:
    stub: Any
    keys: Keys
    kid: str
    revocations: Revocations
    spans: InMemorySpanExporter

    def token(self, user_id: str, role: str = "user", **claims: Any) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys.sign(self.kid, sub=user_id, role=role, **claims)}"),)

    @property
    def service(self) -> tuple[tuple[str, str], ...]:
        return self.token("svc-executor", role="service")


@pytest.fixture
async def server(sqlite_log: SqlEventLog) -> AsyncIterator[Server]:
    keys, revocations = Keys(), Revocations()
    kid = keys.add()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    domain = EventsDomain(sqlite_log, DeliverySettings(max_delivery_attempts=3, heartbeat_seconds=0.2))
    verifier = TokenVerifier(keys, revocations, ISSUER, AUDIENCE)
    servicer = EventsServicer(domain, verifier, tracer_provider=provider)

    async def ready() -> bool:
        return True

    def add(server: grpc.aio.Server) -> list[str]:
        events_service_pb2_grpc.add_EventsServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    grpc_server = grpc.aio.server(
        interceptors=build_interceptors(ServiceParts(add_to_server=add, verifier=verifier, check_ready=ready))
    )
    add(grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Server(events_service_pb2_grpc.EventsServiceStub(channel), keys, kid, revocations, exporter)
    await channel.close(grace=None)
    await grpc_server.stop(None)


def event(run_id: str, seq: int, user_id: str = "user-a", **fields: Any) -> event_pb2.Event:
    fields.setdefault("type", event_pb2.EVENT_TYPE_AGENT_THINKING)
    return event_pb2.Event(event_id=f"{run_id}-{seq}", run_id=run_id, user_id=user_id, seq=seq, **fields)


def details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """(ErrorInfo reason, BadRequest field names)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad_request):
            fields = [v.field for v in bad_request.field_violations]
    return reason, fields


async def publish(server: Server, *events: event_pb2.Event) -> events_service_pb2.PublishResponse:
    return await server.stub.Publish(
        events_service_pb2.PublishRequest(events=events), metadata=server.service
    )


class Stream:
    """A Subscribe call fed from a queue."""

    def __init__(self, server: Server, opening: events_service_pb2.SubscriptionOpen, user_id: str = "user-a"):
        self._requests: asyncio.Queue[events_service_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._requests.put_nowait(events_service_pb2.SubscribeRequest(open=opening))
        self.metadata = server.token(user_id)
        self.call = server.stub.Subscribe(self._outgoing(), metadata=self.metadata, timeout=30)

    async def _outgoing(self) -> AsyncIterator[events_service_pb2.SubscribeRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def send(self, **request: Any) -> None:
        self._requests.put_nowait(events_service_pb2.SubscribeRequest(**request))

    async def next(self, kind: str) -> Any:
        """The next response of this kind (`opened` and heartbeats skipped unless asked for)."""
        while True:
            response = await asyncio.wait_for(self.call.read(), STEP)
            assert response is not grpc.aio.EOF  # type: ignore[attr-defined]
            got = response.WhichOneof("response")
            if got == kind:
                return getattr(response, kind)
            assert got in ("opened", "heartbeat"), f"expected {kind}, got {response}"

    def close(self) -> None:
        self._requests.put_nowait(None)
        self.call.cancel()


async def test_publish_needs_the_service_role(server: Server) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Publish(
            events_service_pb2.PublishRequest(events=[event("r1", 1)]),
            metadata=server.token("user-a", "admin"),
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_publish_names_every_bad_field(server: Server) -> None:
    bad = [
        event("r1", 0, type=event_pb2.EVENT_TYPE_UNSPECIFIED),
        event_pb2.Event(run_id="r1", user_id="", seq=2, type=99),  # type: ignore[arg-type]
        event("r1", 3, trace_context=event_pb2.TraceContext(traceparent="not-a-traceparent")),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await publish(server, *bad)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(raised.value)[1] == [
        "events[0].seq",
        "events[0].type",
        "events[1].event_id",
        "events[1].user_id",
        "events[1].type",
        "events[2].trace_context.traceparent",
    ]
    for count in (0, 501):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await publish(server, *[event("r1", seq) for seq in range(1, count + 1)])
        assert details(raised.value)[1] == ["events"]


async def test_publish_answers_positions_duplicates_and_gaps(server: Server) -> None:
    first = await publish(server, event("r1", 1), event("r1", 2))
    assert [(r.seq, r.duplicate) for r in first.results] == [(1, False), (2, False)]
    again = await publish(server, event("r1", 2))
    assert [(r.run_id, r.seq, r.duplicate) for r in again.results] == [("r1", 2, True)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await publish(server, event("r1", 4))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(raised.value)[0] == "SEQUENCE_GAP"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await publish(server, event("r1", 2, payload=None, step_id="changed"))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details(raised.value)[0] == "EVENT_ID_CONFLICT"


async def first_answer(
    server: Server, *requests: events_service_pb2.SubscribeRequest
) -> grpc.aio.AioRpcError:
    async def outgoing() -> AsyncIterator[events_service_pb2.SubscribeRequest]:
        for request in requests:
            yield request
        await asyncio.sleep(STEP)

    call = server.stub.Subscribe(outgoing(), metadata=server.token("user-a"), timeout=STEP)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for response in call:
            pytest.fail(f"nothing may be sent before the error, got {response}")
    return raised.value


async def test_the_first_message_must_open(server: Server) -> None:
    error = await first_answer(
        server, events_service_pb2.SubscribeRequest(ack=events_service_pb2.AckRequest(event_ids=["x"]))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error) == ("SUBSCRIPTION_NOT_OPEN", ["open"])


async def test_open_names_every_bad_field(server: Server) -> None:
    opening = events_service_pb2.SubscriptionOpen(
        all_runs=True,
        start=events_service_pb2.StartPosition(after_seq=3),
        consumer="no spaces allowed",
        max_in_flight=5000,
        ack_deadline=duration_pb2.Duration(nanos=500_000_000),
    )
    error = await first_answer(server, events_service_pb2.SubscribeRequest(open=opening))
    assert details(error)[1] == [
        "open.start.after_seq",
        "open.consumer",
        "open.max_in_flight",
        "open.ack_deadline",
    ]
    no_scope = await first_answer(
        server, events_service_pb2.SubscribeRequest(open=events_service_pb2.SubscriptionOpen())
    )
    assert details(no_scope)[1] == ["open.run_id"]


async def test_subscribing_to_another_users_run_is_not_found_before_anything_is_sent(server: Server) -> None:
    await publish(server, event("theirs", 1, user_id="user-b"))
    foreign = await first_answer(
        server, events_service_pb2.SubscribeRequest(open=events_service_pb2.SubscriptionOpen(run_id="theirs"))
    )
    missing = await first_answer(
        server,
        events_service_pb2.SubscribeRequest(open=events_service_pb2.SubscriptionOpen(run_id="nothing")),
    )
    assert foreign.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    assert (foreign.details() or "").replace("theirs", "<id>") == (missing.details() or "").replace(
        "nothing", "<id>"
    )


async def test_a_wrong_epoch_is_out_of_range_before_anything_is_sent(server: Server) -> None:
    await publish(server, event("r1", 1))
    resume = events_service_pb2.ResumePoint(run_id="r1", epoch=1, last_acked_seq=1)
    opening = events_service_pb2.SubscriptionOpen(
        run_id="r1", start=events_service_pb2.StartPosition(resume=resume)
    )
    error = await first_answer(server, events_service_pb2.SubscribeRequest(open=opening))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert details(error)[0] == "EPOCH_MISMATCH"


async def test_a_subscription_streams_acks_heartbeats_and_completion(server: Server) -> None:
    await publish(server, event("r1", 1), event("r1", 2))
    stream = Stream(
        server,
        events_service_pb2.SubscriptionOpen(
            run_id="r1", start=events_service_pb2.StartPosition(from_beginning=True)
        ),
    )
    try:
        opened = await stream.next("opened")
        assert (opened.max_in_flight, opened.ack_deadline.seconds) == (100, 30)
        batch = await stream.next("events")
        assert [(d.event.seq, d.delivery_attempt) for d in batch.deliveries] == [(1, 1), (2, 1)]
        assert {d.event.epoch for d in batch.deliveries} != {0}
        # Pushed as soon as it is published: no ack or poll needed.
        await publish(server, event("r1", 3, type=event_pb2.EVENT_TYPE_RUN_COMPLETED))
        batch = await stream.next("events")
        assert [d.event.seq for d in batch.deliveries] == [3]
        heartbeat = await stream.next("heartbeat")
        assert [(p.run_id, p.last_seq) for p in heartbeat.positions] == [("r1", 3)]
        stream.send(ack=events_service_pb2.AckRequest(event_ids=["r1-3", "r1-3"]))
        results = await stream.next("ack_results")
        assert [r.outcome for r in results.results] == [
            events_service_pb2.ACK_OUTCOME_ACCEPTED,
            events_service_pb2.ACK_OUTCOME_STALE,
        ]
        stream.send(
            ack=events_service_pb2.AckRequest(
                cumulative=[events_service_pb2.CumulativeAck(run_id="r1", through_seq=2)]
            )
        )
        results = await stream.next("ack_results")
        assert results.results[0].cumulative.through_seq == 2
        assert results.results[0].outcome == events_service_pb2.ACK_OUTCOME_ACCEPTED
        completed = await stream.next("run_completed")
        assert (completed.run_id, completed.last_seq) == ("r1", 3)
    finally:
        stream.close()


async def test_a_bad_ack_ends_the_stream_with_its_field(server: Server) -> None:
    await publish(server, event("r1", 1))
    stream = Stream(server, events_service_pb2.SubscriptionOpen(run_id="r1"))
    try:
        await stream.next("opened")
        stream.send(
            ack=events_service_pb2.AckRequest(cumulative=[events_service_pb2.CumulativeAck(run_id="r1")])
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.next("ack_results")
        assert details(raised.value)[1] == ["ack.cumulative[0].through_seq"]
    finally:
        stream.close()


async def test_a_revoked_token_ends_the_stream_at_the_next_ack(server: Server) -> None:
    await publish(server, event("r1", 1))
    stream = Stream(
        server,
        events_service_pb2.SubscriptionOpen(
            run_id="r1", start=events_service_pb2.StartPosition(from_beginning=True)
        ),
    )
    try:
        await stream.next("events")
        server.revocations.session_ids.add("family-1")  # the session of every test token
        stream.send(ack=events_service_pb2.AckRequest(event_ids=["r1-1"]))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.next("ack_results")
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stream.close()


async def test_a_second_connection_takes_over_the_durable_consumer(server: Server) -> None:
    await publish(server, event("r1", 1))
    opening = events_service_pb2.SubscriptionOpen(run_id="r1", consumer="inbox")
    older = Stream(server, opening)
    newer: Stream | None = None
    try:
        await older.next("events")
        newer = Stream(server, opening)
        batch = await newer.next("events")
        assert [(d.event.seq, d.delivery_attempt) for d in batch.deliveries] == [(1, 2)]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await older.next("events")
        assert raised.value.code() == grpc.StatusCode.ABORTED
        assert details(raised.value)[0] == "CONSUMER_TAKEN_OVER"
    finally:
        older.close()
        if newer is not None:
            newer.close()


async def test_acknowledge_list_events_and_delivery_status(server: Server) -> None:
    await publish(server, *[event("r1", seq) for seq in range(1, 6)])
    stream = Stream(
        server, events_service_pb2.SubscriptionOpen(run_id="r1", consumer="inbox", max_in_flight=3)
    )
    try:
        await stream.next("events")
        answer = await server.stub.Acknowledge(
            events_service_pb2.AcknowledgeRequest(consumer="inbox", event_ids=["r1-1", "r1-5"]),
            metadata=server.token("user-a"),
        )
        assert [r.outcome for r in answer.results] == [
            events_service_pb2.ACK_OUTCOME_ACCEPTED,
            events_service_pb2.ACK_OUTCOME_UNKNOWN,
        ]
        status = await server.stub.GetDeliveryStatus(
            events_service_pb2.GetDeliveryStatusRequest(run_id="r1"), metadata=server.token("user-a")
        )
        assert status.last_seq == 5
        [inbox] = status.consumers
        assert (inbox.consumer, inbox.acknowledged, inbox.last_acked_seq) == ("inbox", 1, 1)
    finally:
        stream.close()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Acknowledge(
            events_service_pb2.AcknowledgeRequest(), metadata=server.token("user-a")
        )
    assert details(raised.value)[1] == ["consumer", "event_ids"]

    pages, token = [], ""
    while True:
        page = await server.stub.ListEvents(
            events_service_pb2.ListEventsRequest(run_id="r1", after_seq=1, page_size=2, page_token=token),
            metadata=server.token("user-a"),
        )
        pages.append([e.seq for e in page.events])
        if not (token := page.next_page_token):
            break
    assert pages == [[2, 3], [4, 5]]
    for call in (
        server.stub.ListEvents(
            events_service_pb2.ListEventsRequest(run_id="r1"), metadata=server.token("user-b")
        ),
        server.stub.GetDeliveryStatus(
            events_service_pb2.GetDeliveryStatusRequest(run_id="r1"), metadata=server.token("user-b")
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.ListEvents(
            events_service_pb2.ListEventsRequest(run_id="r1", after_seq=2, page_token=token or "bm9wZQ"),
            metadata=server.token("user-a"),
        )
    assert details(raised.value)[1] == ["page_token"]


async def test_each_batch_is_a_delivery_span_in_the_runs_trace(server: Server) -> None:
    producer = trace.SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True)
    context = event_pb2.TraceContext(traceparent=TRACEPARENT)
    await publish(server, event("r1", 1, trace_context=context), event("r1", 2, trace_context=context))
    stream = Stream(
        server,
        events_service_pb2.SubscriptionOpen(
            run_id="r1", start=events_service_pb2.StartPosition(from_beginning=True)
        ),
    )
    try:
        await stream.next("events")
        stream.send(ack=events_service_pb2.AckRequest(event_ids=["r1-1"]))
        await stream.next("ack_results")  # the batch was sent, so its span has ended
    finally:
        stream.close()
    [span] = [s for s in server.spans.get_finished_spans() if s.name == DELIVER_SPAN]
    assert span.context is not None and span.parent is not None
    assert span.context.trace_id == producer.trace_id
    assert span.parent.span_id == producer.span_id
    attributes = dict(span.attributes or {})
    assert (attributes["switchboard.run_id"], attributes["switchboard.user_id"]) == ("r1", "user-a")
    assert attributes["switchboard.event.seq"] == 1
    assert list(attributes["switchboard.event.seqs"]) == [1, 2]  # type: ignore[arg-type]
    # One producing span made both events: one link to it, naming them.
    [link] = span.links
    assert link.context.span_id == producer.span_id
    assert list((link.attributes or {})["switchboard.event.seqs"]) == [1, 2]  # type: ignore[arg-type]


async def test_acks_nacks_and_dead_letters_are_spans_in_the_runs_trace(server: Server) -> None:
    producer = trace.SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True)
    context = event_pb2.TraceContext(traceparent=TRACEPARENT)
    await publish(server, event("r1", 1, trace_context=context), event("r1", 2, trace_context=context))
    stream = Stream(
        server,
        events_service_pb2.SubscriptionOpen(
            run_id="r1",
            consumer="inbox",
            max_in_flight=1,
            start=events_service_pb2.StartPosition(from_beginning=True),
        ),
    )
    try:
        # Nacked at each of its 3 attempts (the server's maximum): dead-lettered.
        for attempt in (1, 2, 3):
            batch = await stream.next("events")
            assert [(d.event.seq, d.delivery_attempt) for d in batch.deliveries] == [(1, attempt)]
            stream.send(nack=events_service_pb2.NackRequest(event_ids=["r1-1"]))
            await stream.next("ack_results")
        # The marker, and seq 2 in the room it leaves, in one batch.
        batch = await stream.next("events")
        assert [(d.WhichOneof("item"), d.event.seq or d.dead_letter.seq) for d in batch.deliveries] == [
            ("dead_letter", 1),
            ("event", 2),
        ]
        unary = await server.stub.Acknowledge(
            events_service_pb2.AcknowledgeRequest(consumer="inbox", event_ids=["r1-2"]),
            metadata=server.token("user-a"),
        )
        assert [r.outcome for r in unary.results] == [events_service_pb2.ACK_OUTCOME_ACCEPTED]
        stream.send(ack=events_service_pb2.AckRequest(event_ids=["r1-2"]))
        results = await stream.next("ack_results")
        assert [r.outcome for r in results.results] == [events_service_pb2.ACK_OUTCOME_STALE]
    finally:
        stream.close()

    def spans(name: str) -> list[Any]:
        found = [s for s in server.spans.get_finished_spans() if s.name == name]
        for span in found:  # every one in the run's trace, under the events' producer
            assert span.parent is not None
            assert (span.parent.trace_id, span.parent.span_id) == (producer.trace_id, producer.span_id)
            assert producer.span_id in [link.context.span_id for link in span.links]
        return found

    def attribute(span: Any, name: str) -> Any:
        return dict(span.attributes or {})[name]

    delivered = spans(DELIVER_SPAN)
    assert [
        (attribute(s, "switchboard.event.seq"), attribute(s, "switchboard.event.attempt")) for s in delivered
    ] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
    ]
    assert {attribute(s, "messaging.consumer.group.name") for s in delivered} == {"inbox"}
    nacks = spans(NACK_SPAN)
    assert [attribute(s, "switchboard.ack.outcome") for s in nacks] == ["accepted"] * 3
    [dead] = spans(DEAD_LETTER_SPAN)
    assert dead.status.status_code is trace.StatusCode.ERROR
    assert attribute(dead, "switchboard.event.seq") == 1
    acks = spans(ACK_SPAN)
    assert [
        (attribute(s, "messaging.message.id"), attribute(s, "switchboard.ack.outcome")) for s in acks
    ] == [
        ("r1-2", "accepted"),  # unary
        ("r1-2", "stale"),  # on the stream, after it
    ]


async def test_admin_and_service_roles_get_no_special_read_access(server: Server) -> None:
    await publish(server, event("r1", 1))
    for metadata in (server.token("admin-1", role="admin"), server.service):
        for call in (
            server.stub.ListEvents(events_service_pb2.ListEventsRequest(run_id="r1"), metadata=metadata),
            server.stub.GetDeliveryStatus(
                events_service_pb2.GetDeliveryStatusRequest(run_id="r1"), metadata=metadata
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    owner = await server.stub.ListEvents(
        events_service_pb2.ListEventsRequest(run_id="r1"), metadata=server.token("user-a")
    )
    assert [e.event_id for e in owner.events] == ["r1-1"]
