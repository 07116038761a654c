"""Run throughput and latency: N users at once, each starting a run of a
trivial agent, waiting until its own subscriber has received the run's
RUN_COMPLETED, and starting the next (a closed loop per user), for a given
time; runs in flight then finish and count (every user completes at least one).

- runs/s: runs completed (RUN_COMPLETED received) over the time from the first
  StartRun to the last RUN_COMPLETED;
- latency: from just before StartRun is sent to the moment the user's
  subscriber (one all-runs subscription per user, opened beforehand)
  receives the run's AGENT_COMPLETED.

The agent is the built-in worker's `chaos` with `action: succeed` and no
thoughts: no tool call and no work, so the figure is Switchboard's own cost
(RUN_QUEUED, AGENT_STARTED, AGENT_COMPLETED, RUN_COMPLETED per run).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from switchboard.events.v1 import event_pb2, events_service_pb2
from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc

from bench.backends import BenchSuite, BenchUser
from bench.stats import percentile
from bench.streams import Subscription, close_all
from tests.harness.clients import struct
from tests.harness.suite import metadata

AGENT = "chaos"
AGENT_INPUT: dict[str, Any] = {"action": "succeed", "thoughts": 0}
SUCCEEDED = "RUN_STATE_SUCCEEDED"
# A run that does not complete within this fails the benchmark instead of hanging it.
RUN_PATIENCE_SECONDS = 120.0


@dataclass
class RunArrivals:
    agent_completed: float | None = None
    completed: asyncio.Event = field(default_factory=asyncio.Event)
    completed_at: float = 0.0
    outcome: str = ""


class RunFollower:
    """One user's all-runs subscription, noting when each run's events arrive."""

    def __init__(self, bench: BenchSuite, user: BenchUser) -> None:
        self.runs: dict[str, RunArrivals] = {}
        self.subscription = Subscription(
            bench.suite.channel("events"),
            user.token,
            events_service_pb2.SubscriptionOpen(all_runs=True, max_in_flight=1000),
            on_batch=self._on_batch,
        )

    def arrivals(self, run_id: str) -> RunArrivals:
        return self.runs.setdefault(run_id, RunArrivals())

    def _on_batch(self, deliveries: Sequence[events_service_pb2.Delivery], arrived: float) -> None:
        for delivery in deliveries:
            event = delivery.event
            if event.type == event_pb2.EVENT_TYPE_AGENT_COMPLETED:
                self.arrivals(event.run_id).agent_completed = arrived
            elif event.type == event_pb2.EVENT_TYPE_RUN_COMPLETED:
                run = self.arrivals(event.run_id)
                run.completed_at = arrived
                run.outcome = str(event.payload["state"]) if "state" in event.payload else ""
                run.completed.set()

    async def wait(self, run_id: str) -> RunArrivals:
        run = self.arrivals(run_id)
        try:
            async with asyncio.timeout(RUN_PATIENCE_SECONDS):
                await run.completed.wait()
        except TimeoutError:
            failure = self.subscription.failure()
            raise RuntimeError(f"run {run_id} did not complete (subscriber: {failure!r})") from None
        return run


@dataclass(frozen=True)
class RunResult:
    users: int
    runs: int
    seconds: float
    latencies_ms: list[float]

    @property
    def per_second(self) -> float:
        return self.runs / self.seconds

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 0.99)


async def run_benchmark(bench: BenchSuite, users: int, seconds: float) -> RunResult:
    if users > len(bench.users):
        raise ValueError(f"{users} users asked for, {len(bench.users)} created")
    executor: Any = executor_service_pb2_grpc.ExecutorServiceStub(bench.suite.channel("executor"))
    run_input = struct(AGENT_INPUT)
    followers = [RunFollower(bench, user) for user in bench.users[:users]]
    await asyncio.gather(*(follower.subscription.open() for follower in followers))
    latencies: list[float] = []
    last_completed = 0.0
    deadline = 0.0

    async def user_loop(user: BenchUser, follower: RunFollower) -> None:
        nonlocal last_completed
        runs = 0
        while runs == 0 or time.perf_counter() < deadline:
            runs += 1
            started = time.perf_counter()
            response = await executor.StartRun(
                executor_service_pb2.StartRunRequest(agent=AGENT, input=run_input),
                metadata=metadata(user.token),
                timeout=60,
            )
            run = await follower.wait(response.run.run_id)
            if run.outcome != SUCCEEDED or run.agent_completed is None:
                raise RuntimeError(f"run {response.run.run_id} did not succeed: {run.outcome or 'no state'}")
            latencies.append((run.agent_completed - started) * 1000)
            last_completed = max(last_completed, run.completed_at)

    try:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(
            *(user_loop(user, follower) for user, follower in zip(bench.users, followers, strict=False))
        )
    finally:
        await close_all([follower.subscription for follower in followers])
    return RunResult(users, len(latencies), last_completed - started, latencies)
