"""`python -m bench`: every benchmark against the suite started as real
processes, on the embedded defaults and again on PostgreSQL + Redis (and on
the embedded defaults with tracing off), each repetition of a figure measured
right beside a repetition of its baseline. Prints one table, and writes it as
JSON (bench/results/latest.json) and markdown (latest.md) with a plot of
latency percentiles against concurrency (latency.png).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from bench.backends import (
    BACKEND_SETS,
    EMBEDDED,
    POSTGRES_AND_REDIS,
    REDIS_URL,
    BenchSuite,
    bench_suite,
    postgres_problem,
    redis_problem,
)
from bench.baselines.celery_noop import CeleryBaseline, celery_baseline
from bench.baselines.grpc_echo import echo_throughput
from bench.baselines.grpc_server import tracer_provider
from bench.baselines.grpc_stream import stream_throughput
from bench.baselines.redis_streams import streams_throughput
from bench.events import delivery_benchmark
from bench.footprint import events_with_idle_subscriptions, executor_with_queued_runs
from bench.load import child_process
from bench.plot import latency_plot
from bench.record import Recorder, progress
from bench.rows import BASELINES, UNTRACED, build_rows
from bench.rpc import finished_run_id, get_run_throughput
from bench.runs import run_benchmark
from bench.settings import RESULTS, Settings
from bench.stats import Row, missed, percentile, render_table
from tests.harness.suite import free_port


@dataclass
class Apparatus:
    """Everything one bench run measures: the suites and the baselines."""

    settings: Settings
    recorder: Recorder
    # One suite per backend set, with tracing on; and the embedded one with it off.
    suites: list[BenchSuite]
    untraced: BenchSuite | None
    # Where the baseline gRPC servers listen: "bare" and "otel".
    servers: dict[str, str]
    celery: CeleryBaseline
    client_tracer: TracerProvider
    # A finished run of each suite's first user, for GetRun.
    run_ids: dict[str, str]

    async def repetition(self) -> None:
        """Each figure of every suite right beside its baseline."""
        settings, record = self.settings, self.recorder.add
        seconds = settings.rpc_seconds

        async def echo() -> str:
            result = await echo_throughput(self.servers["bare"], seconds)
            return f"{record(BASELINES, 'echo', result.per_second):,.0f} calls/s"

        async def echo_otel() -> str:
            result = await echo_throughput(self.servers["otel"], seconds, client_tracer=self.client_tracer)
            return f"{record(BASELINES, 'echo_otel', result.per_second):,.0f} calls/s"

        await self.recorder.timed(BASELINES, "bare echo", echo)
        for bench in self.suites:

            async def get_run(bench: BenchSuite = bench) -> str:
                result = await get_run_throughput(bench, self.run_ids[bench.label], seconds)
                return f"{record(bench.label, 'get_run', result.per_second):,.0f} calls/s"

            await self.recorder.timed(bench.label, "GetRun", get_run)
        await self.recorder.timed(BASELINES, "echo + OTel", echo_otel)

        async def redis_streams() -> str:
            result = await streams_throughput(REDIS_URL, settings.redis_messages)
            return f"{record(BASELINES, 'redis_streams', result.per_second):,.0f} messages/s"

        await self.recorder.timed(BASELINES, "Redis Streams", redis_streams)
        for subscribers, events, metric in (
            (1, settings.delivery_one_events, "delivery_one"),
            (settings.delivery_many_subscribers, settings.delivery_many_events, "delivery_many"),
        ):
            for bench in self.suites:

                async def delivery(
                    bench: BenchSuite = bench,
                    subscribers: int = subscribers,
                    events: int = events,
                    metric: str = metric,
                ) -> str:
                    result = await delivery_benchmark(bench, subscribers, events)
                    return f"{record(bench.label, metric, result.per_second):,.0f} events/s"

                await self.recorder.timed(bench.label, f"delivery, {subscribers} subscriber(s)", delivery)
        for per_message, events in (
            (1, settings.stream_single_events),
            (100, settings.stream_batched_events),
        ):

            async def stream(per_message: int = per_message, events: int = events) -> str:
                result = await stream_throughput(self.servers["bare"], events, per_message)
                return f"{record(BASELINES, f'stream_{per_message}', result.per_second):,.0f} events/s"

            await self.recorder.timed(BASELINES, f"gRPC stream, {per_message} event(s)/msg", stream)

        async def celery() -> str:
            result = await self.celery.throughput(settings.celery_tasks)
            latencies = await self.celery.latencies_ms(settings.celery_latency_tasks)
            p50 = record(BASELINES, "celery_p50_ms", percentile(latencies, 0.5))
            record(BASELINES, "celery_p99_ms", percentile(latencies, 0.99))
            return (
                f"{record(BASELINES, 'celery_per_second', result.per_second):,.0f} tasks/s, p50 {p50:.2f} ms"
            )

        await self.recorder.timed(BASELINES, "Celery no-op", celery)
        for users in settings.run_levels:
            for bench in [*self.suites, *([self.untraced] if self.untraced else [])]:

                async def runs(bench: BenchSuite = bench, users: int = users) -> str:
                    result = await run_benchmark(bench, users, settings.run_seconds)
                    record(bench.label, f"runs_{users}_per_second", result.per_second)
                    record(bench.label, f"runs_{users}_p50_ms", result.p50_ms)
                    record(bench.label, f"runs_{users}_p99_ms", result.p99_ms)
                    self.recorder.latencies.setdefault(bench.label, {}).setdefault(users, []).extend(
                        result.latencies_ms
                    )
                    return (
                        f"{result.per_second:.1f} runs/s ({result.runs} runs), "
                        f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms"
                    )

                await self.recorder.timed(bench.label, f"runs, {users} concurrent users", runs)

    async def footprint(self) -> None:
        settings, record = self.settings, self.recorder.add
        for bench in self.suites:

            async def events_memory(bench: BenchSuite = bench) -> str:
                samples = await events_with_idle_subscriptions(bench, settings.idle_subscriptions)
                for count, values in samples.items():
                    for index, value in enumerate(values):
                        record(bench.label, f"events_rss_{count}", value, index)
                return ", ".join(f"{count}: {max(values):.0f} MB" for count, values in samples.items())

            async def executor_memory(bench: BenchSuite = bench) -> str:
                samples = await executor_with_queued_runs(bench, settings.queued_runs)
                for count, values in samples.items():
                    for index, value in enumerate(values):
                        record(bench.label, f"executor_rss_{count}", value, index)
                return ", ".join(f"{count}: {max(values):.0f} MB" for count, values in samples.items())

            await self.recorder.timed(bench.label, "events RSS with idle subscriptions", events_memory)
            await self.recorder.timed(bench.label, "executor RSS with queued runs", executor_memory)


async def enter_together(stack: contextlib.AsyncExitStack, managers: Sequence[Any]) -> list[Any]:
    """Enters async context managers concurrently (suites start in parallel);
    every one that entered is exited with the stack, even if another failed."""
    entered = await asyncio.gather(*(manager.__aenter__() for manager in managers), return_exceptions=True)
    for manager, result in zip(managers, entered, strict=True):
        if not isinstance(result, BaseException):
            stack.push_async_exit(manager)
    for result in entered:
        if isinstance(result, BaseException):
            raise result
    return list(entered)


async def measure_all(settings: Settings, root: Path, recorder: Recorder) -> None:
    started = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        progress(f"starting the suites ({', '.join(settings.backends)}) and the baselines")
        managers: list[Any] = [
            bench_suite(root / backends.replace("+", "-"), backends, users=settings.users)
            for backends in settings.backends
        ]
        if settings.tracing_off and EMBEDDED in settings.backends:
            managers.append(
                bench_suite(
                    root / "embedded-untraced",
                    EMBEDDED,
                    tracing=False,
                    users=settings.users,
                    label=EMBEDDED + UNTRACED,
                )
            )
        bare_port, otel_port = free_port(), free_port()
        managers.append(child_process("bench.baselines.grpc_server", ["--port", str(bare_port)]))
        managers.append(
            child_process(
                "bench.baselines.grpc_server",
                ["--port", str(otel_port), "--otel", "--trace-file", str(root / "otel-server.jsonl")],
            )
        )
        managers.append(celery_baseline(REDIS_URL, root / "logs"))
        entered = await enter_together(stack, managers)
        suites: list[BenchSuite] = [item for item in entered if isinstance(item, BenchSuite)]
        celery = next(item for item in entered if isinstance(item, CeleryBaseline))
        traced = [bench for bench in suites if bench.tracing]
        untraced = next((bench for bench in suites if not bench.tracing), None)
        client_tracer = tracer_provider("bench-baseline-client", root / "otel-client.jsonl")
        stack.callback(client_tracer.shutdown)
        run_ids = {bench.label: await finished_run_id(bench) for bench in traced}
        apparatus = Apparatus(
            settings,
            recorder,
            traced,
            untraced,
            {"bare": f"127.0.0.1:{bare_port}", "otel": f"127.0.0.1:{otel_port}"},
            celery,
            client_tracer,
            run_ids,
        )
        recorder.phase_seconds["start"] = time.perf_counter() - started
        progress(f"ready after {recorder.phase_seconds['start']:.1f}s")
        for index in range(settings.repetitions):
            recorder.repetition = index
            progress(f"repetition {index + 1} of {settings.repetitions}")
            await apparatus.repetition()
        recorder.phase_seconds["repetitions"] = (
            time.perf_counter() - started - recorder.phase_seconds["start"]
        )
        recorder.repetition = None
        if settings.footprint:
            footprint_started = time.perf_counter()
            await apparatus.footprint()
            recorder.phase_seconds["footprint"] = time.perf_counter() - footprint_started
        stopping = time.perf_counter()
    recorder.phase_seconds["stop"] = time.perf_counter() - stopping


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def write_results(
    rows: Sequence[Row], recorder: Recorder, settings: Settings, seconds: float, results: Path
) -> None:
    results.mkdir(parents=True, exist_ok=True)
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 1),
        "phase_seconds": {k: round(v, 1) for k, v in recorder.phase_seconds.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "git_commit": git_commit(),
        "settings": dataclasses.asdict(settings),
        "rows": [row.to_json() for row in rows],
        "failures": [dataclasses.asdict(failure) for failure in recorder.failures],
        # label -> metric -> repetition (or sample) index -> value; a failed repetition is absent.
        "repetitions": recorder.values,
    }
    (results / "latest.json").write_text(json.dumps(payload, indent=2) + "\n")
    (results / "latest.md").write_text(render_table(rows, markdown=True) + "\n")
    references = {}
    celery_p50 = recorder.get(BASELINES, "celery_p50_ms")
    if celery_p50:
        references["Celery no-op round trip p50"] = sorted(celery_p50)[len(celery_p50) // 2]
    references["goal: p50 5 ms at 1 user"] = 5.0
    latency_plot(results / "latency.png", recorder.latencies, references)


def parse_arguments(argv: Sequence[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts: check that it all runs")
    parser.add_argument("--repetitions", type=int, help="at least 5 for the table's medians (default 5)")
    parser.add_argument("--backends", help=f"comma-separated, of {', '.join(BACKEND_SETS)} (default: both)")
    parser.add_argument("--no-footprint", action="store_true", help="skip the memory measurements")
    parser.add_argument("--no-tracing-off", action="store_true", help="skip the tracing-off suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where latest.json and latency.png go")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    changes: dict[str, Any] = {}
    if args.repetitions is not None:
        if args.repetitions < 1:
            parser.error("--repetitions must be at least 1")
        changes["repetitions"] = args.repetitions
    if args.backends:
        chosen = tuple(name.strip() for name in args.backends.split(","))
        unknown = [name for name in chosen if name not in BACKEND_SETS]
        if unknown:
            parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKEND_SETS)}")
        changes["backends"] = chosen
    if args.no_footprint:
        changes["footprint"] = False
    if args.no_tracing_off:
        changes["tracing_off"] = False
    return dataclasses.replace(settings, **changes), args.results


async def run_all(settings: Settings, results: Path) -> int:
    # The baselines (Celery, Redis Streams) need Redis whatever the suite's backends.
    problems = [redis_problem()]
    if POSTGRES_AND_REDIS in settings.backends:
        problems.append(postgres_problem())
    if any(problems):
        print("bench: cannot run: " + "; ".join(p for p in problems if p), file=sys.stderr)
        return 2
    started = time.perf_counter()
    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as scratch:
        await measure_all(settings, Path(scratch), recorder)
    seconds = time.perf_counter() - started
    rows = build_rows(recorder, settings)
    print(render_table(rows))
    print(
        f"\n{settings.repetitions} repetitions; ratio = figure / baseline, paired by repetition; "
        f"[min-max] over the repetitions. Took {seconds:.0f}s "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in recorder.phase_seconds.items())})."
    )
    for row in missed(rows):
        print(
            f"MISSED: {row.figure} on {row.backends}: goal {row.goal.describe(row.unit) if row.goal else ''}"
        )
    for failure in recorder.failures:
        print(f"FAILED: {failure.describe()}")
    write_results(rows, recorder, settings, seconds, results)
    print(f"\nwrote {results / 'latest.json'}, latest.md (the table in markdown) and latency.png")
    # Missed goals are findings; a figure that could not be measured is an error.
    return 1 if recorder.failures else 0


def main(argv: Sequence[str] | None = None) -> None:
    settings, results = parse_arguments(argv)
    raise SystemExit(asyncio.run(run_all(settings, results)))
