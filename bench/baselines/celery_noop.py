"""Baseline: Celery with Redis as broker and result backend, a no-op task.

- throughput: a group of N no-op tasks sent at once, timed until every result is back;
- latency: one task at a time, send to result, N times (p50 and p99 round trip).

The worker is a separate process (`celery worker`, prefork pool, one child per
core: Celery's defaults), on a queue and Redis key prefix of its own that are
removed afterwards, so that nothing collides with tests or another bench run.
The app is configured from BENCH_CELERY_BROKER and BENCH_CELERY_NAMESPACE, so
that the worker and this process agree.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from celery import Celery, group, signals

from bench.load import STARTUP_TIMEOUT_SECONDS, Throughput
from services.common.server import SUPERVISOR_PID_VARIABLE, follow_supervisor

BROKER_VARIABLE = "BENCH_CELERY_BROKER"
NAMESPACE_VARIABLE = "BENCH_CELERY_NAMESPACE"
T = TypeVar("T")


def make_app(broker: str, namespace: str) -> Celery:
    prefix = {"global_keyprefix": f"{namespace}:"}
    app = Celery("bench", broker=broker, backend=broker)
    app.conf.update(
        task_default_queue=namespace,
        broker_transport_options=prefix,
        result_backend_transport_options=prefix,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_ignore_result=False,
    )
    return app


app = make_app(
    os.environ.get(BROKER_VARIABLE, "redis://127.0.0.1:6379/0"),
    os.environ.get(NAMESPACE_VARIABLE, "bench-celery"),
)


@app.task(name="bench.noop")
def noop() -> None:
    return None


@signals.worker_init.connect
def _follow_supervisor(**_: Any) -> None:
    # The worker stops when the bench process dies, as the services do.
    follow_supervisor()


@dataclass
class CeleryBaseline:
    """The client side, on one thread of its own: Celery's client is synchronous."""

    app: Celery
    namespace: str
    _thread: concurrent.futures.ThreadPoolExecutor

    async def _on_thread(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function)

    def _round_trip(self, timeout: float) -> None:
        self.app.tasks["bench.noop"].apply_async().get(timeout=timeout)

    async def wait_ready(self) -> None:
        """The worker answers a task (it may take a while to start on a loaded machine)."""
        await self._on_thread(lambda: self._round_trip(STARTUP_TIMEOUT_SECONDS))

    async def throughput(self, tasks: int) -> Throughput:
        def measure() -> Throughput:
            task = self.app.tasks["bench.noop"]
            started = time.perf_counter()
            group(task.si() for _ in range(tasks)).apply_async().get(timeout=300)
            return Throughput(tasks, time.perf_counter() - started)

        return await self._on_thread(measure)

    async def latencies_ms(self, tasks: int) -> list[float]:
        def measure() -> list[float]:
            samples = []
            for _ in range(tasks):
                started = time.perf_counter()
                self._round_trip(30)
                samples.append((time.perf_counter() - started) * 1000)
            return samples

        return await self._on_thread(measure)


def open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab")


@contextlib.asynccontextmanager
async def celery_baseline(redis_url: str, log_dir: Path) -> AsyncIterator[CeleryBaseline]:
    """A Celery worker process and a client, on a fresh queue and key prefix."""
    # Imported here: the worker process, which imports this module, needs none of it.
    from tests.unit.events.backends import drop_redis_prefix

    namespace = f"bench-celery-{uuid.uuid4().hex[:12]}"
    env = {
        **os.environ,
        BROKER_VARIABLE: redis_url,
        NAMESPACE_VARIABLE: namespace,
        SUPERVISOR_PID_VARIABLE: str(os.getpid()),
    }
    with open_log(log_dir / "celery-worker.log") as log:
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "celery",
            "--app",
            "bench.baselines.celery_noop",
            "worker",
            "--pool",
            "prefork",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname",
            f"{namespace}@%h",
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    client_app = make_app(redis_url, namespace)
    client_app.task(name="bench.noop")(noop.run)
    thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="celery-client")
    baseline = CeleryBaseline(client_app, namespace, thread)
    try:
        await baseline.wait_ready()
        yield baseline
    finally:
        worker.terminate()  # Celery's warm shutdown
        try:
            async with asyncio.timeout(30):
                await worker.wait()
        except TimeoutError:
            worker.kill()
            await worker.wait()
        await baseline._on_thread(client_app.close)
        thread.shutdown(wait=True)
        await drop_redis_prefix(redis_url, f"{namespace}:")
