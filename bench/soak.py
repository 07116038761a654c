"""`python -m bench.soak` (`make bench-soak`): is memory flat under steady load?

Starts the suite, keeps N users running runs back to back (the run benchmark,
window after window) for the soak's length, and samples the resident memory
of every service process after each window. After a warm-up (pools, caches
and the interpreter settle), the median of the first minute is compared with
the median of the last minute; the goal is growth within 5% for every
service. Writes bench/results/soak.json and soak.png.

    python -m bench.soak [--minutes 10] [--users 10] [--backends embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import psutil

from bench.backends import BACKEND_SETS, EMBEDDED, bench_suite
from bench.footprint import MB
from bench.record import progress
from bench.runs import run_benchmark
from bench.settings import RESULTS
from services.launcher import SERVICES

GROWTH_GOAL = 0.05
WINDOW_SECONDS = 10.0
WARM_UP_SECONDS = 60.0
COMPARED_SECONDS = 60.0


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the soak started
    runs: int  # completed in the window before the sample
    rss_mb: dict[str, float]


@dataclass(frozen=True)
class Growth:
    service: str
    first_mb: float
    last_mb: float

    @property
    def growth(self) -> float:
        return self.last_mb / self.first_mb - 1.0

    @property
    def met(self) -> bool:
        return self.growth <= GROWTH_GOAL


def growth(samples: Sequence[Sample], warm_up: float, compared: float) -> list[Growth]:
    """Per service: median RSS of the first `compared` seconds after `warm_up`,
    against the median of the last `compared` seconds."""
    settled = [sample for sample in samples if sample.seconds >= warm_up]
    if len(settled) < 2:
        raise ValueError("the soak was too short to compare a first and a last minute")
    start, end = settled[0].seconds, settled[-1].seconds
    first = [s for s in settled if s.seconds <= start + compared]
    last = [s for s in settled if s.seconds >= end - compared]
    return [
        Growth(
            service,
            statistics.median(s.rss_mb[service] for s in first),
            statistics.median(s.rss_mb[service] for s in last),
        )
        for service in samples[0].rss_mb
    ]


def soak_plot(path: Path, samples: Sequence[Sample], warm_up: float) -> None:
    figure, axes = plt.subplots(figsize=(9, 5), dpi=110)
    minutes = [sample.seconds / 60 for sample in samples]
    for service in samples[0].rss_mb:
        axes.plot(minutes, [sample.rss_mb[service] for sample in samples], label=service)
    axes.axvline(warm_up / 60, color="grey", linestyle=":", label="end of warm-up")
    axes.set_xlabel("minutes of steady runs")
    axes.set_ylabel("resident memory (MB)")
    axes.set_title("Resident memory of each service during the soak")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


async def soak(backends: str, minutes: float, users: int, results: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="switchboard-soak-") as scratch:
        async with bench_suite(Path(scratch), backends, users=users) as bench:
            processes = {service: psutil.Process(bench.pid(service)) for service in SERVICES}
            samples: list[Sample] = []
            started = time.perf_counter()
            while (elapsed := time.perf_counter() - started) < minutes * 60:
                result = await run_benchmark(bench, users, WINDOW_SECONDS)
                rss = {service: process.memory_info().rss / MB for service, process in processes.items()}
                samples.append(Sample(time.perf_counter() - started, result.runs, rss))
                progress(
                    f"{elapsed / 60:4.1f} min: {result.per_second:.1f} runs/s; "
                    + ", ".join(f"{service} {value:.0f} MB" for service, value in rss.items())
                )
    warm_up = min(WARM_UP_SECONDS, minutes * 60 / 4)
    compared = min(COMPARED_SECONDS, minutes * 60 / 4)
    growths = growth(samples, warm_up, compared)
    print(f"\nSoak on {backends}: {minutes:g} minutes, {users} users, {sum(s.runs for s in samples)} runs")
    print(f"{'service':<10}{'first minute':>14}{'last minute':>14}{'growth':>9}  goal <= {GROWTH_GOAL:.0%}")
    for item in growths:
        verdict = "yes" if item.met else "NO (missed)"
        print(
            f"{item.service:<10}{item.first_mb:>11.1f} MB{item.last_mb:>11.1f} MB{item.growth:>9.1%}  {verdict}"
        )
    write_results(results, backends, minutes, users, samples, growths, warm_up)
    return 0 if all(item.met for item in growths) else 1


def write_results(
    results: Path,
    backends: str,
    minutes: float,
    users: int,
    samples: Sequence[Sample],
    growths: Sequence[Growth],
    warm_up: float,
) -> None:
    results.mkdir(parents=True, exist_ok=True)
    payload: Mapping[str, object] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backends": backends,
        "minutes": minutes,
        "users": users,
        "goal_growth": GROWTH_GOAL,
        "growth": [{**asdict(item), "growth": item.growth, "met": item.met} for item in growths],
        "samples": [asdict(sample) for sample in samples],
    }
    (results / "soak.json").write_text(json.dumps(payload, indent=2) + "\n")
    soak_plot(results / "soak.png", samples, warm_up)
    print(f"\nwrote {results / 'soak.json'} and {results / 'soak.png'}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--backends", choices=BACKEND_SETS, default=EMBEDDED)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.users < 1:
        parser.error("--minutes must be positive and --users at least 1")
    sys.exit(asyncio.run(soak(args.backends, args.minutes, args.users, args.results)))


if __name__ == "__main__":
    main()
