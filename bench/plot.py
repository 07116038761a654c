"""The latency plot: percentiles of StartRun -> AGENT_COMPLETED received,
against the number of concurrent users, one line per percentile and suite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator

from bench.stats import percentile

PERCENTILES = ((0.50, "p50", "-"), (0.90, "p90", "--"), (0.99, "p99", ":"))


def latency_plot(
    path: Path,
    latencies_ms: Mapping[str, Mapping[int, Sequence[float]]],
    references_ms: Mapping[str, float],
) -> None:
    """`latencies_ms[suite][users]` are every sample of that level, pooled over
    the repetitions; `references_ms` are horizontal lines (a goal, a baseline)."""
    figure, axes = plt.subplots(figsize=(10, 5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (suite, levels) in enumerate(sorted(latencies_ms.items())):
        users = sorted(level for level, samples in levels.items() if samples)
        for fraction, name, style in PERCENTILES:
            axes.plot(
                users,
                [percentile(levels[level], fraction) for level in users],
                linestyle=style,
                marker="o",
                color=colors[index % len(colors)],
                label=f"{suite} {name}",
            )
    for offset, (name, value) in enumerate(sorted(references_ms.items())):
        axes.axhline(value, color="grey", linestyle=["-.", (0, (1, 3))][offset % 2], linewidth=1, label=name)
    axes.set_xscale("log")
    axes.set_yscale("log")
    ticks = sorted({level for suite_levels in latencies_ms.values() for level in suite_levels})
    axes.set_xticks(ticks, labels=[str(tick) for tick in ticks])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("concurrent users (each one run at a time)")
    axes.set_ylabel("StartRun -> AGENT_COMPLETED received (ms)")
    axes.set_title("Run latency percentiles against concurrency")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
