"""Baseline: raw Redis Streams, a producer and a consumer together.

The producer is a separate process that XADDs ~100-byte messages in pipelines
of 100; the consumer (here) reads with XREADGROUP COUNT 100 and XACKs each
batch. Timed from the producer's go until the last message is acknowledged.
Each repetition uses a fresh stream under a `bench:streams:<random>:` prefix,
deleted afterwards.

    python -m bench.baselines.redis_streams --url redis://... --stream KEY --messages N
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any

import redis

from bench.load import Throughput, announce_ready, child_process, exit_on_sigterm
from services.common.server import follow_supervisor

GROUP = "bench"
BATCH = 100
# About the size of an event as the events service stores it.
MESSAGE = {"event": b"e" * 100}


def produce(url: str, stream: str, messages: int) -> None:
    client = redis.Redis.from_url(url)
    client.ping()
    announce_ready()
    if sys.stdin.readline().strip() != "go":
        return
    for start in range(0, messages, BATCH):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(BATCH, messages - start)):
            pipe.xadd(stream, MESSAGE)  # type: ignore[arg-type]  # redis-py types fields loosely
        pipe.execute()
    client.close()


def consume(client: redis.Redis, stream: str, messages: int, timeout: float) -> int:
    """Reads and acknowledges until `messages` are acknowledged (or `timeout` passes)."""
    acknowledged = 0
    deadline = time.monotonic() + timeout
    while acknowledged < messages:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {acknowledged} of {messages} messages arrived")
        # redis-py types replies loosely: [[stream, [(id, fields), ...]]] or None.
        answer: Any = client.xreadgroup(GROUP, "consumer", {stream: ">"}, count=BATCH, block=1000)
        for _, entries in answer or []:
            ids = [entry_id for entry_id, _ in entries]
            if ids:
                acknowledged += int(client.xack(stream, GROUP, *ids))  # type: ignore[arg-type]
    return acknowledged


async def streams_throughput(url: str, messages: int) -> Throughput:
    """Messages/s through one stream, produced and consumed at once."""
    prefix = f"bench:streams:{uuid.uuid4().hex}:"
    stream = f"{prefix}stream"
    client = redis.Redis.from_url(url)
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        arguments = ["--url", url, "--stream", stream, "--messages", str(messages)]
        async with child_process("bench.baselines.redis_streams", arguments) as producer:
            started = time.perf_counter()
            await producer.send_line("go")
            # Synchronous redis-py is the fastest Python client; off the event loop.
            acknowledged = await asyncio.to_thread(consume, client, stream, messages, 300.0)
            elapsed = time.perf_counter() - started
        return Throughput(acknowledged, elapsed)
    finally:
        client.delete(stream)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--messages", type=int, required=True)
    args = parser.parse_args()
    follow_supervisor()
    exit_on_sigterm()
    produce(args.url, args.stream, args.messages)


if __name__ == "__main__":
    main()
