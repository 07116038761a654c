"""One run is one trace: client, executor, registry, worker and events spans
share the run's trace id, collected by an OTLP receiver inside the test, on
the embedded backends and on PostgreSQL + Redis Streams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from switchboard.events.v1 import event_pb2, events_service_pb2
from switchboard.executor.v1 import executor_service_pb2

from tests.conftest import SUITE_BACKENDS, suite_on
from tests.harness.clients import events_stub, executor_stub, struct, subscribe_run
from tests.harness.otlp_sink import ReceivedSpan, otlp_sink
from tests.harness.suite import Suite
from tests.unit.events.streams import RawSubscription

SERVICES = {
    "switchboard-test-client",
    "switchboard-executor",
    "switchboard-registry",
    "switchboard-worker",
    "switchboard-events",
}


@pytest.mark.parametrize("backends", SUITE_BACKENDS)
async def test_one_run_is_one_trace_across_every_service(backends: str, tmp_path: Path) -> None:
    async with otlp_sink() as (sink, endpoint), suite_on(backends, tmp_path, otlp_endpoint=endpoint) as suite:
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "switchboard-test-client"}))
        # Exported from the processor's own thread: the sink is served by this test's event loop.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        tracer = provider.get_tracer("switchboard.tests")
        interceptors = aio_client_interceptors(tracer_provider=provider)
        executor_channel = grpc.aio.insecure_channel(suite.address["executor"], interceptors=interceptors)
        events_channel = grpc.aio.insecure_channel(suite.address["events"], interceptors=interceptors)
        _, token = await suite.create_user("tracy")

        with tracer.start_as_current_span("client.run") as root:
            response = await executor_stub(suite, executor_channel).StartRun(
                executor_service_pb2.StartRunRequest(
                    agent="text-stats", input=struct({"text": "Trace me. Twice."})
                ),
                metadata=suite.metadata(token),
                timeout=15,
            )
            run = response.run
            events = await subscribe_run(suite, token, run.run_id, channel=events_channel)
        await asyncio.to_thread(provider.shutdown)
        trace_id = format(root.get_span_context().trace_id, "032x")

        assert run.trace_id == trace_id
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].type == event_pb2.EVENT_TYPE_RUN_COMPLETED
        # Each event carries the context of the span that produced it, in this trace.
        assert {e.trace_context.traceparent.split("-")[1] for e in events} == {trace_id}

        def services_of(spans: list[ReceivedSpan]) -> set[str]:
            return {s.service for s in spans}

        def run_services(spans: list[ReceivedSpan]) -> set[str]:
            return services_of([s for s in spans if s.attributes.get("switchboard.run_id") == run.run_id])

        def deliveries(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
            return [
                s
                for s in spans
                if s.service == "switchboard-events" and "switchboard.event.seq" in s.attributes
            ]

        def complete(spans: list[ReceivedSpan]) -> bool:
            return (
                SERVICES <= services_of(spans)
                and {"switchboard-executor", "switchboard-worker"} <= run_services(spans)
                and bool(deliveries(spans))
            )

        spans = await sink.wait_for(trace_id, complete)
        assert SERVICES <= services_of(spans), sorted(services_of(spans))
        # The executor's run and the worker's attempt name the run.
        assert {"switchboard-executor", "switchboard-worker"} <= run_services(spans)
        # The delivery of the run's events to the user is part of its trace.
        assert deliveries(spans)

        # --- Events: each delivery and acknowledgement of the run's events ----------
        # A durable consumer reads the run again on a stream of its own trace
        # (detached from the run) and acknowledges every batch.
        await consume_and_acknowledge(suite, token, run.run_id)
        producer = {e.seq: e.trace_context.traceparent.split("-")[2] for e in events}
        user_id = events[0].user_id

        def probe_spans(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
            return [
                s
                for s in spans
                if s.name == name and s.attributes.get("messaging.consumer.group.name") == PROBE_CONSUMER
            ]

        def covered(spans: list[ReceivedSpan], name: str) -> set[int]:
            return {seq for s in probe_spans(spans, name) for seq in seqs_of(s)}

        def settled(spans: list[ReceivedSpan]) -> bool:
            return covered(spans, "events.deliver") >= set(producer) <= covered(spans, "events.ack")

        spans = await sink.wait_for(trace_id, settled)
        assert covered(spans, "events.deliver") == set(producer)
        assert covered(spans, "events.ack") == set(producer)
        for span in probe_spans(spans, "events.deliver") + probe_spans(spans, "events.ack"):
            first = seqs_of(span)[0]
            # In the run's trace, under the span that produced its (first) event...
            assert (span.trace_id, span.parent_span_id) == (trace_id, producer[first]), span
            # ...linked to it, and to the Subscribe call in the consumer's own trace.
            assert trace_id in span.links and len(set(span.links)) == 2, span
            assert span.attributes["messaging.system"] == "switchboard"
            assert span.attributes["switchboard.run_id"] == run.run_id
            assert span.attributes["switchboard.user_id"] == user_id
        for span in probe_spans(spans, "events.deliver"):
            assert span.kind == SPAN_KIND_PRODUCER
            assert span.attributes["messaging.operation.type"] == "send"
        for span in probe_spans(spans, "events.ack"):
            assert span.attributes["messaging.operation.type"] == "settle"
            assert span.attributes["switchboard.ack.outcome"] == "accepted"
        await executor_channel.close(grace=None)
        await events_channel.close(grace=None)


# --- Events: helpers of the delivery and acknowledgement block above ---------------

PROBE_CONSUMER = "trace-probe"
SPAN_KIND_PRODUCER = 4  # OTLP's Span.SpanKind


def seqs_of(span: ReceivedSpan) -> list[int]:
    """The seqs a span is about: all of a batch's, or its single event's."""
    many = span.attributes.get("switchboard.event.seqs")
    if many is not None:
        return [int(value.int_value) for value in many.values]
    return [int(span.attributes["switchboard.event.seq"])]


async def consume_and_acknowledge(suite: Suite, token: str, run_id: str) -> None:
    """Reads the whole run as durable consumer PROBE_CONSUMER, acknowledging
    every batch, until the service says the run's stream is complete (which
    it does only once every event was acknowledged)."""
    opening = events_service_pb2.SubscriptionOpen(run_id=run_id, consumer=PROBE_CONSUMER)
    probe = RawSubscription(events_stub(suite), suite.metadata(token), opening)
    try:
        while (response := await probe.read()).WhichOneof("response") != "run_completed":
            if response.WhichOneof("response") == "events":
                probe.ack([d.event.event_id for d in response.events.deliveries])
    finally:
        probe.close()
