"""Medians, spreads, paired ratios and goals, and the one table `make bench` prints.

Every figure is measured over several repetitions, interleaved with the
repetitions of its baseline, so that the ratio of repetition i compares two
measurements taken seconds apart on the same (shared, noisy) machine. The
table shows the median of those ratios and their range.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` (0-1) percentile by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be from 0 to 1")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Median and spread of the repetitions of one measurement."""

    n: int
    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        data = [float(v) for v in values]
        if not data:
            raise ValueError("summary of no values")
        return cls(
            n=len(data),
            median=statistics.median(data),
            q1=percentile(data, 0.25),
            q3=percentile(data, 0.75),
            minimum=min(data),
            maximum=max(data),
        )

    @property
    def relative_spread(self) -> float:
        """(max - min) / median: how much the repetitions disagree."""
        return (self.maximum - self.minimum) / self.median if self.median else math.inf


def paired_ratios(figure: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """figure[i] / baseline[i], for repetitions measured side by side."""
    if len(figure) != len(baseline):
        raise ValueError(f"unpaired repetitions: {len(figure)} figures, {len(baseline)} baselines")
    return [f / b if b else math.inf for f, b in zip(figure, baseline, strict=True)]


Direction = Literal["at_least", "at_most"]


@dataclass(frozen=True)
class Goal:
    """A target for the median ratio to the baseline (on="ratio") or for the
    median figure itself (on="value", in the figure's unit)."""

    on: Literal["ratio", "value"]
    direction: Direction
    target: float

    def met_by(self, value: float) -> bool:
        return value >= self.target if self.direction == "at_least" else value <= self.target

    def describe(self, unit: str) -> str:
        sign = ">=" if self.direction == "at_least" else "<="
        if self.on == "ratio":
            return f"ratio {sign} {self.target:g}x"
        return f"{sign} {format_number(self.target)} {unit}"


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure against its baseline, measured in the same run."""

    figure: str
    backends: str
    unit: str
    value: Summary
    baseline_name: str = ""
    baseline: Summary | None = None
    ratio: Summary | None = None
    goal: Goal | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        if self.goal.on == "ratio":
            return None if self.ratio is None else self.goal.met_by(self.ratio.median)
        return self.goal.met_by(self.value.median)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["met"] = self.met
        data["goal_text"] = self.goal.describe(self.unit) if self.goal else ""
        return data


def compare(
    figure: str,
    backends: str,
    unit: str,
    values: Sequence[float],
    baseline_name: str = "",
    baseline_values: Sequence[float] | None = None,
    goal: Goal | None = None,
    note: str = "",
) -> Row:
    """A row from raw repetitions; the ratio pairs repetition i of each."""
    baseline = Summary.of(baseline_values) if baseline_values else None
    ratio = Summary.of(paired_ratios(values, baseline_values)) if baseline_values else None
    return Row(figure, backends, unit, Summary.of(values), baseline_name, baseline, ratio, goal, note)


def format_number(value: float) -> str:
    """Three significant figures, thousands separated: 5,480 / 18.2 / 0.524."""
    if math.isinf(value) or math.isnan(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:#.3g}"


def format_summary(summary: Summary, suffix: str = "") -> str:
    """`median [min-max]`: the spread is the whole range of the repetitions."""
    return (
        f"{format_number(summary.median)}{suffix} "
        f"[{format_number(summary.minimum)}-{format_number(summary.maximum)}]"
    )


MET_TEXT: Mapping[bool | None, str] = {True: "yes", False: "NO (missed)", None: ""}
HEADERS = ("figure", "backends", "median [min-max]", "unit", "baseline", "baseline median [min-max]")
HEADERS_TAIL = ("ratio [min-max]", "goal", "met", "n")


def table_cells(row: Row) -> list[str]:
    return [
        row.figure,
        row.backends,
        format_summary(row.value),
        row.unit,
        row.baseline_name,
        format_summary(row.baseline) if row.baseline else "",
        format_summary(row.ratio, "x") if row.ratio else "",
        row.goal.describe(row.unit) if row.goal else "",
        MET_TEXT[row.met],
        f"{row.value.n}*" if row.note else str(row.value.n),
    ]


def render_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The rows as an aligned text table (or a markdown table), notes (n*) below."""
    headers = [*HEADERS, *HEADERS_TAIL]
    body = [table_cells(row) for row in rows]
    notes = [f"* {note}" for note in dict.fromkeys(row.note for row in rows if row.note)]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
        return "\n".join(lines + (["", *notes] if notes else []))
    widths = [max(len(headers[i]), *(len(cells[i]) for cells in body)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(cells) for cells in body), *notes])


def missed(rows: Sequence[Row]) -> list[Row]:
    return [row for row in rows if row.met is False]
