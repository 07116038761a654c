"""Footprint: resident memory (RSS) of the events service holding many open,
idle subscriptions, and of the executor holding many queued runs.

RSS is sampled several times a second apart once the state is reached (after
the service has had a moment to settle); the table shows their median and
range. On postgres+redis, Redis's own memory is not counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import psutil
from switchboard.events.v1 import events_service_pb2
from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc, run_pb2

from bench.backends import BenchSuite, BenchUser
from bench.streams import Subscription, close_all
from tests.harness.clients import struct
from tests.harness.suite import metadata

MB = 1_000_000  # decimal megabytes, as the goal (500 MB) is stated
SAMPLES = 5
SAMPLE_INTERVAL_SECONDS = 0.5
SETTLE_SECONDS = 1.0
# Streams per client connection; each channel gets a connection of its own.
STREAMS_PER_CHANNEL = 100
OPEN_CONCURRENCY = 64
# Users whose runs wait in the queue for the executor's footprint.
QUEUE_HOLDERS = 4


async def rss_samples_mb(
    pid: int, samples: int = SAMPLES, interval: float = SAMPLE_INTERVAL_SECONDS
) -> list[float]:
    process = psutil.Process(pid)
    await asyncio.sleep(SETTLE_SECONDS)
    values = []
    for index in range(samples):
        if index:
            await asyncio.sleep(interval)
        values.append(process.memory_info().rss / MB)
    return values


@dataclass
class IdleSubscriptions:
    """Open, idle all-runs subscriptions, spread over the bench users and over
    channels of STREAMS_PER_CHANNEL streams each."""

    bench: BenchSuite
    subscriptions: list[Subscription]
    channels: list[grpc.aio.Channel]

    async def grow_to(self, count: int) -> None:
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)
        users: Sequence[BenchUser] = self.bench.users
        address = self.bench.suite.address["events"]
        fresh = []
        for index in range(len(self.subscriptions), count):
            if index % STREAMS_PER_CHANNEL == 0:
                # A local subchannel pool: a connection per channel, not one shared.
                self.channels.append(
                    grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                )
            subscription = Subscription(
                self.channels[-1],
                users[index % len(users)].token,
                events_service_pb2.SubscriptionOpen(all_runs=True),
            )
            self.subscriptions.append(subscription)
            fresh.append(subscription)

        async def open_one(subscription: Subscription) -> None:
            async with gate:
                # Not read: an idle stream's only traffic is a heartbeat now and then.
                await subscription.open(read=False)

        await asyncio.gather(*(open_one(subscription) for subscription in fresh))

    async def close(self) -> None:
        await close_all(self.subscriptions)
        for channel in self.channels:
            await channel.close(grace=None)


async def events_with_idle_subscriptions(bench: BenchSuite, counts: Sequence[int]) -> dict[int, list[float]]:
    """RSS samples (MB) of the events service with 0 and each of `counts` idle subscriptions."""
    pid = bench.pid("events")
    samples = {0: await rss_samples_mb(pid)}
    idle = IdleSubscriptions(bench, [], [])
    try:
        for count in sorted(counts):
            await idle.grow_to(count)
            samples[count] = await rss_samples_mb(pid)
    finally:
        await idle.close()
    return samples


async def executor_with_queued_runs(bench: BenchSuite, queued: int) -> dict[int, list[float]]:
    """RSS samples (MB) of the executor idle, and with `queued` runs waiting.

    A few users fill their active slots with runs that hang (the `chaos`
    agent's `hang`), so that their next runs, `queued` in all, wait QUEUED
    (spread over users: the per-user queue cap is not what is measured). They
    are left as they are: the suite is stopped, its storage removed, afterwards."""
    holders = bench.users[-QUEUE_HOLDERS:]
    executor: Any = executor_service_pb2_grpc.ExecutorServiceStub(bench.suite.channel("executor"))
    pid = bench.pid("executor")
    samples = {0: await rss_samples_mb(pid)}
    gate = asyncio.Semaphore(16)

    async def start(user: BenchUser, action: str) -> str:
        request = executor_service_pb2.StartRunRequest(agent="chaos", input=struct({"action": action}))
        request.timeout.seconds = 600
        async with gate:
            response = await executor.StartRun(request, metadata=metadata(user.token), timeout=60)
        return str(response.run.run_id)

    async def hold(user: BenchUser) -> None:
        for _ in range(active_slots(bench)):
            await wait_running(executor, user, await start(user, "hang"))

    await asyncio.gather(*(hold(user) for user in holders))
    shares = [queued // len(holders) + (1 if i < queued % len(holders) else 0) for i in range(len(holders))]
    await asyncio.gather(
        *(start(user, "succeed") for user, share in zip(holders, shares, strict=True) for _ in range(share))
    )
    still_queued = sum([await count_queued(executor, metadata(user.token)) for user in holders])
    if still_queued < queued:
        raise RuntimeError(f"only {still_queued} of {queued} runs are QUEUED")
    samples[queued] = await rss_samples_mb(pid)
    return samples


async def wait_running(executor: Any, user: BenchUser, run_id: str, patience: float = 60.0) -> None:
    """Until the run has left the queue (admission is asynchronous)."""
    request = executor_service_pb2.GetRunRequest(run_id=run_id)
    async with asyncio.timeout(patience):
        while True:
            response = await executor.GetRun(request, metadata=metadata(user.token), timeout=30)
            if response.run.state != run_pb2.RUN_STATE_QUEUED:
                return
            await asyncio.sleep(0.05)


def active_slots(bench: BenchSuite) -> int:
    env = bench.suite.processes["executor"].env
    return int(env.get("SWITCHBOARD_EXECUTOR_MAX_ACTIVE_RUNS_PER_USER", "2"))


async def count_queued(executor: Any, user_metadata: Any) -> int:
    total, token = 0, ""
    while True:
        response = await executor.ListRuns(
            executor_service_pb2.ListRunsRequest(
                state=run_pb2.RUN_STATE_QUEUED, page_size=1000, page_token=token
            ),
            metadata=user_metadata,
            timeout=60,
        )
        total += len(response.runs)
        token = response.next_page_token
        if not token:
            return total
