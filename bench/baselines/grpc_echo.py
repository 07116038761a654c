"""Baseline: a bare `grpc.aio` unary echo with 64 calls in flight, and the same
with the stock OpenTelemetry gRPC interceptors on client and server (spans
exported in batches to a JSON-lines file, as the services export theirs).

The server is bench.baselines.grpc_server, a separate process."""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2
from opentelemetry.sdk.trace import TracerProvider

from bench.baselines.grpc_server import ECHO_METHOD
from bench.load import Throughput, closed_loop

IN_FLIGHT = 64
# About the size of a GetRunRequest with its run id.
PAYLOAD = b"x" * 40
WARM_UP_SECONDS = 0.2


async def echo_throughput(
    address: str, seconds: float, in_flight: int = IN_FLIGHT, client_tracer: TracerProvider | None = None
) -> Throughput:
    """Calls/s of echo calls for `seconds` with `in_flight` outstanding; with a
    tracer provider, through the stock OpenTelemetry client interceptors."""
    interceptors = None
    if client_tracer is not None:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors = aio_client_interceptors(tracer_provider=client_tracer)
    async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
        echo = channel.unary_unary(
            ECHO_METHOD,
            request_serializer=wrappers_pb2.BytesValue.SerializeToString,
            response_deserializer=wrappers_pb2.BytesValue.FromString,
        )
        request = wrappers_pb2.BytesValue(value=PAYLOAD)

        async def call() -> None:
            response = await echo(request, timeout=30)
            if response.value != PAYLOAD:
                raise RuntimeError("the echo answered something else")

        await closed_loop(call, in_flight, WARM_UP_SECONDS)
        return await closed_loop(call, in_flight, seconds)
