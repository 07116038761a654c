"""How much each benchmark does per repetition, and where the results go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.backends import BACKEND_SETS

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Settings:
    """How much each benchmark does per repetition. Throughput figures are
    time-boxed (a slow machine measures fewer calls, not longer), so that
    `make bench` ends within 10 minutes on a 2-core machine."""

    repetitions: int = 5
    backends: tuple[str, ...] = BACKEND_SETS
    tracing_off: bool = True
    footprint: bool = True
    rpc_seconds: float = 1.0
    stream_single_events: int = 10_000
    stream_batched_events: int = 200_000
    redis_messages: int = 30_000
    delivery_one_events: int = 2000
    delivery_many_subscribers: int = 100
    delivery_many_events: int = 10
    # The definition of the Celery baseline: a batch of 2000 until all are back.
    celery_tasks: int = 2000
    celery_latency_tasks: int = 100
    run_levels: tuple[int, ...] = (1, 10, 100)
    run_seconds: float = 1.5
    idle_subscriptions: tuple[int, ...] = (1000, 10_000)
    queued_runs: int = 1000

    @classmethod
    def quick(cls) -> Settings:
        """A moment per benchmark: checks that everything runs, measures little."""
        return cls(
            rpc_seconds=0.3,
            stream_single_events=1000,
            stream_batched_events=10_000,
            redis_messages=2000,
            delivery_one_events=200,
            delivery_many_subscribers=10,
            delivery_many_events=5,
            celery_tasks=100,
            celery_latency_tasks=10,
            run_levels=(1, 10),
            run_seconds=0.3,
            idle_subscriptions=(100,),
            queued_runs=50,
        )

    @property
    def users(self) -> int:
        return max(*self.run_levels, self.delivery_many_subscribers)
