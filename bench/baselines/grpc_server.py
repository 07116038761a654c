"""The bare gRPC baseline server, a process of its own like every service:
plain `grpc.aio` on asyncio (as the services run), no interceptors unless
`--otel` adds the stock OpenTelemetry server interceptor, whose spans go to a
JSON-lines file the way the services' spans do by default.

- `/bench.Echo/Echo` (unary): answers with the request (a BytesValue).
- `/bench.Stream/Events` (server stream): the request (a BytesValue
  "<events> <per_message>") asks for `events` events of ~100 bytes each,
  `per_message` of them per SubscribeResponse, the message the events service
  sends its subscribers.

    python -m bench.baselines.grpc_server --port 50999 [--otel --trace-file spans.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from switchboard.events.v1 import event_pb2, events_service_pb2

from bench.load import announce_ready
from services.common.server import follow_supervisor
from services.common.tracing import JsonLinesSpanExporter

ECHO_METHOD = "/bench.Echo/Echo"
STREAM_METHOD = "/bench.Stream/Events"


def tracer_provider(service: str, trace_file: Path | None) -> TracerProvider:
    """An SDK provider whose spans go to `trace_file` in batches (nowhere if None)."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    if trace_file is not None:
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(trace_file)))
    return provider


def sample_event(seq: int = 1) -> event_pb2.Event:
    """An event as small as the events service's (about 90 bytes serialized)."""
    return event_pb2.Event(
        event_id=str(uuid.uuid4()),
        run_id=str(uuid.uuid4()),
        seq=seq,
        type=event_pb2.EVENT_TYPE_AGENT_THINKING,
        agent="bench",
        epoch=1,
    )


def event_batch(per_message: int) -> events_service_pb2.SubscribeResponse:
    deliveries = [
        events_service_pb2.Delivery(event=sample_event(seq), delivery_attempt=1)
        for seq in range(1, per_message + 1)
    ]
    return events_service_pb2.SubscribeResponse(events=events_service_pb2.EventBatch(deliveries=deliveries))


def stream_request(events: int, per_message: int) -> wrappers_pb2.BytesValue:
    return wrappers_pb2.BytesValue(value=f"{events} {per_message}".encode())


async def echo(request: wrappers_pb2.BytesValue, context: Any) -> wrappers_pb2.BytesValue:
    return request


async def stream_events(
    request: wrappers_pb2.BytesValue, context: Any
) -> AsyncIterator[events_service_pb2.SubscribeResponse]:
    events, per_message = (int(part) for part in request.value.decode().split())
    # Built once: the baseline is the transport, not building messages.
    batch = event_batch(per_message)
    for _ in range(events // per_message):
        yield batch


def handlers() -> list[grpc.GenericRpcHandler]:
    return [
        grpc.method_handlers_generic_handler(
            "bench.Echo",
            {
                "Echo": grpc.unary_unary_rpc_method_handler(
                    echo,
                    request_deserializer=wrappers_pb2.BytesValue.FromString,
                    response_serializer=wrappers_pb2.BytesValue.SerializeToString,
                )
            },
        ),
        grpc.method_handlers_generic_handler(
            "bench.Stream",
            {
                "Events": grpc.unary_stream_rpc_method_handler(
                    stream_events,
                    request_deserializer=wrappers_pb2.BytesValue.FromString,
                    response_serializer=events_service_pb2.SubscribeResponse.SerializeToString,
                )
            },
        ),
    ]


async def serve(port: int, otel: bool, trace_file: Path | None) -> None:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    provider: TracerProvider | None = None
    if otel:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        provider = tracer_provider("bench-baseline-server", trace_file)
        interceptors.append(aio_server_interceptor(tracer_provider=provider))
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers(handlers())
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    announce_ready()
    await stopping.wait()
    await server.stop(1)
    if provider is not None:
        provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--otel", action="store_true", help="add the stock OpenTelemetry interceptor")
    parser.add_argument("--trace-file", type=Path, help="where --otel writes spans")
    args = parser.parse_args()
    follow_supervisor()
    asyncio.run(serve(args.port, args.otel, args.trace_file))


if __name__ == "__main__":
    main()
