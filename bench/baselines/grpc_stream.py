"""Baseline: a bare gRPC server stream of events (~100 bytes each), one event
per message or 100 events per message, read by one client as fast as it can.

The server is bench.baselines.grpc_server, a separate process."""

from __future__ import annotations

import time

import grpc
from google.protobuf import wrappers_pb2
from switchboard.events.v1 import events_service_pb2

from bench.baselines.grpc_server import STREAM_METHOD, stream_request
from bench.load import Throughput


async def stream_throughput(address: str, events: int, per_message: int) -> Throughput:
    """Events/s received over one server stream (whole messages: `events` is
    rounded down to a multiple of `per_message`)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.unary_stream(
            STREAM_METHOD,
            request_serializer=wrappers_pb2.BytesValue.SerializeToString,
            response_deserializer=events_service_pb2.SubscribeResponse.FromString,
        )
        # Warm the connection with a short stream first.
        async for _ in stream(stream_request(per_message, per_message), timeout=30):
            pass
        received = 0
        started = time.perf_counter()
        async for response in stream(stream_request(events, per_message), timeout=120):
            received += len(response.events.deliveries)
        elapsed = time.perf_counter() - started
    expected = events // per_message * per_message
    if received != expected:
        raise RuntimeError(f"the stream ended after {received} of {expected} events")
    return Throughput(received, elapsed)
