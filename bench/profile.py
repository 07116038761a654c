"""`python -m bench.profile`: where the services spend their time under a
benchmark's load, sampled with py-spy from outside the processes.

Starts the suite (embedded defaults unless told otherwise), attaches
`py-spy record` to the executor, events and worker processes (non-blocking:
the processes are not paused), drives one workload, and writes for each
process the collapsed stacks (`profile-<service>.raw`, for speedscope or
flamegraph.pl) and a summary of the hottest functions (`profile-<service>.txt`),
by self time (the function itself was running) and by total time (it was on
the stack).

    python -m bench.profile [--workload runs|get-run|delivery] [--seconds 30] [--users 10]

`--users` is the number of concurrent users for `runs`, and of subscribers for
`delivery`; `get-run` is one user with 64 calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.backends import BACKEND_SETS, EMBEDDED, BenchSuite, bench_suite
from bench.events import delivery_benchmark
from bench.record import progress
from bench.rpc import finished_run_id, get_run_throughput
from bench.runs import run_benchmark
from bench.settings import RESULTS

PROFILED = ("executor", "events", "worker")
WORKLOADS = ("runs", "get-run", "delivery")
TOP = 25


@dataclass(frozen=True)
class Hotspot:
    function: str
    samples: int
    share: float


# Frames of our own code, for the "total time" view (the roots every sample
# shares, such as the event loop and the server's entry point, are left out).
OWN_CODE = ("services/", "switchboard_client/")
ROOTS = ("__main__.py", "services/common/server.py")


def frame_file(frame: str) -> str:
    """`function (path/file.py:line)` -> `path/file.py`."""
    return frame.rpartition("(")[2].rpartition(":")[0]


def frame_package(frame: str) -> str:
    """What a frame belongs to: `services/executor`, `sqlalchemy`, `asyncio`..."""
    parts = frame_file(frame).split("/")
    if parts[0] in ("services", "switchboard_client") and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py") or "?"


def hotspots(collapsed: str, top: int = TOP) -> tuple[int, list[Hotspot], list[Hotspot], list[Hotspot]]:
    """(total samples, hottest functions by self time, hottest functions of
    ours by total time, packages by self time) of py-spy's collapsed stacks:
    one `frame;frame;...;frame count` a line, root first."""
    own: collections.Counter[str] = collections.Counter()
    ours_on_stack: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        packages[frame_package(frames[-1])] += count
        for frame in set(frames):
            path = frame_file(frame)
            if path.startswith(OWN_CODE) and not path.endswith(ROOTS):
                ours_on_stack[frame] += count

    def ranked(counter: collections.Counter[str]) -> list[Hotspot]:
        return [Hotspot(name, n, n / total if total else 0.0) for name, n in counter.most_common(top)]

    return total, ranked(own), ranked(ours_on_stack), ranked(packages)


def summary(service: str, workload: str, collapsed: str) -> str:
    total, by_self, ours, packages = hotspots(collapsed)
    lines = [f"{service} under the {workload} workload: {total} samples of busy threads", ""]
    lines += ["by package, self time:"] + [f"  {spot.share:6.1%}  {spot.function}" for spot in packages]
    lines += ["", "by function, self time:"] + [f"  {spot.share:6.1%}  {spot.function}" for spot in by_self]
    lines += ["", "Switchboard's own functions, total time (on the stack):"]
    lines += [f"  {spot.share:6.1%}  {spot.function}" for spot in ours]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def py_spy(pid: int, output: Path, rate: int) -> AsyncIterator[None]:
    """Samples process `pid` while the block runs; stopped with SIGINT, as py-spy expects."""
    executable = Path(sys.executable).parent / "py-spy"
    process = await asyncio.create_subprocess_exec(
        str(executable),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--function",
        "--nonblocking",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(1.0)  # attached before the load starts
        if process.returncode is not None:
            assert process.stderr is not None
            error = (await process.stderr.read()).decode(errors="replace")
            raise RuntimeError(f"py-spy could not attach to {pid}: {error.strip()}")
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        await process.wait()


async def drive(bench: BenchSuite, workload: str, seconds: float, users: int) -> str:
    if workload == "runs":
        result = await run_benchmark(bench, users, seconds)
        return f"{result.per_second:.1f} runs/s, p50 {result.p50_ms:.1f} ms"
    if workload == "get-run":
        throughput = await get_run_throughput(bench, await finished_run_id(bench), seconds)
        return f"{throughput.per_second:,.0f} GetRun calls/s"
    # Delivery: `users` subscribers, each following a run of its own, 2000 events in all per pass.
    loop = asyncio.get_running_loop()
    deadline, delivered = loop.time() + seconds, 0.0
    while loop.time() < deadline:
        throughput = await delivery_benchmark(bench, users, max(1, 2000 // users))
        delivered = throughput.per_second
    return f"{delivered:,.0f} events/s to {users} subscriber(s) (last pass)"


async def profile(backends: str, workload: str, seconds: float, users: int, rate: int, results: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="switchboard-profile-") as scratch:
        async with bench_suite(Path(scratch), backends, users=users) as bench:
            outputs = {service: results / f"profile-{service}.raw" for service in PROFILED}
            async with contextlib.AsyncExitStack() as stack:
                for service, output in outputs.items():
                    await stack.enter_async_context(py_spy(bench.pid(service), output, rate))
                progress(f"profiling {', '.join(PROFILED)} under the {workload} workload for {seconds:.0f}s")
                progress(f"{workload}: {await drive(bench, workload, seconds, users)}")
    for service, output in outputs.items():
        text = summary(service, workload, output.read_text() if output.exists() else "")
        (results / f"profile-{service}.txt").write_text(text)
        print(text)
    print(f"wrote {', '.join(str(results / f'profile-{s}.txt') for s in PROFILED)} (and .raw)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--workload", choices=WORKLOADS, default="runs")
    parser.add_argument("--backends", choices=BACKEND_SETS, default=EMBEDDED)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    asyncio.run(profile(args.backends, args.workload, args.seconds, args.users, args.rate, args.results))


if __name__ == "__main__":
    main()
