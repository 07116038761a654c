"""The bench's statistics and table: medians, spreads, paired ratios, goals."""

from __future__ import annotations

import json
import math

import pytest

from bench.record import Recorder
from bench.rows import BASELINES, build_rows
from bench.settings import Settings
from bench.stats import Goal, Summary, compare, missed, paired_ratios, percentile, render_table


def test_percentile_interpolates_between_ranks() -> None:
    values = [40.0, 10.0, 30.0, 20.0]
    assert percentile(values, 0.0) == 10.0
    assert percentile(values, 1.0) == 40.0
    assert percentile(values, 0.5) == 25.0
    assert percentile(values, 0.25) == pytest.approx(17.5)
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_summary_holds_median_quartiles_and_range() -> None:
    summary = Summary.of([5.0, 1.0, 9.0, 3.0, 7.0])
    assert (summary.n, summary.median, summary.minimum, summary.maximum) == (5, 5.0, 1.0, 9.0)
    assert (summary.q1, summary.q3) == (3.0, 7.0)
    assert summary.relative_spread == pytest.approx(8.0 / 5.0)
    with pytest.raises(ValueError):
        Summary.of([])


def test_ratios_pair_repetitions_and_refuse_unpaired_ones() -> None:
    assert paired_ratios([10.0, 30.0], [5.0, 10.0]) == [2.0, 3.0]
    assert paired_ratios([1.0], [0.0]) == [math.inf]
    with pytest.raises(ValueError):
        paired_ratios([1.0, 2.0], [1.0])


def test_goals_on_the_ratio_and_on_the_value() -> None:
    throughput = compare(
        "runs/s", "embedded", "runs/s", [8, 9, 10, 11, 12], "celery", [10] * 5, Goal("ratio", "at_least", 1.0)
    )
    assert throughput.ratio is not None and throughput.ratio.median == 1.0
    assert throughput.met is True
    latency = compare("p50", "embedded", "ms", [6, 7, 8, 9, 10], goal=Goal("value", "at_most", 5.0))
    assert latency.ratio is None and latency.met is False
    assert missed([throughput, latency]) == [latency]
    assert compare("no goal", "embedded", "x", [1.0]).met is None


def test_the_table_says_plainly_when_a_goal_is_missed() -> None:
    rows = [
        compare(
            "events/s",
            "embedded",
            "events/s",
            [4, 5, 6],
            "redis",
            [10, 10, 10],
            Goal("ratio", "at_least", 0.5),
        ),
        compare(
            "events/s",
            "postgres+redis",
            "events/s",
            [2, 3, 4],
            "redis",
            [10, 10, 10],
            Goal("ratio", "at_least", 0.5),
        ),
    ]
    table = render_table(rows).splitlines()
    assert table[0].split()[0] == "figure"
    assert "yes" in table[2] and "0.500x [0.400-0.600]" in table[2]
    assert "NO (missed)" in table[3] and "ratio >= 0.5x" in table[3]
    markdown = render_table(rows, markdown=True).splitlines()
    assert markdown[0].startswith("| figure |") and len(markdown) == 4
    assert json.loads(json.dumps([row.to_json() for row in rows]))[1]["met"] is False


def test_rows_compare_each_suite_with_the_baselines_and_tracing_with_its_absence() -> None:
    settings = Settings(run_levels=(1,), footprint=False)
    recorder = Recorder()
    for rep in range(5):
        recorder.repetition = rep
        recorder.add(BASELINES, "celery_per_second", 100.0)
        recorder.add(BASELINES, "celery_p50_ms", 2.0)
        recorder.add(BASELINES, "echo", 1000.0 + rep)
        recorder.add(BASELINES, "echo_otel", 500.0)
        recorder.add("embedded", "runs_1_per_second", 50.0)
        recorder.add("embedded", "runs_1_p50_ms", 4.0)
        recorder.add("embedded (tracing off)", "runs_1_per_second", 100.0)
        recorder.add("embedded (tracing off)", "runs_1_p50_ms", 2.0)
    rows = {(row.figure, row.baseline_name): row for row in build_rows(recorder, settings)}
    runs = rows[("runs/s, 1 user", "Celery no-op tasks/s (2000 at once)")]
    assert runs.backends == "embedded" and runs.ratio is not None and runs.ratio.median == 0.5
    assert runs.met is False  # the throughput goal is set at the highest concurrency, here 1 user
    latency = rows[("p50 StartRun->AGENT_COMPLETED, 1 user", "Celery round trip p50")]
    assert latency.met is True
    tracing = rows[("runs/s, 1 user, tracing on", "same, tracing off")]
    assert tracing.ratio is not None and tracing.ratio.median == 0.5
    otel = rows[("echo + stock OTel interceptors", "bare grpc.aio echo")]
    assert otel.backends == BASELINES and otel.ratio is not None and otel.ratio.maximum == 0.5
    # Figures that were not measured make no rows (no GetRun, no deliveries here).
    assert not any(figure.startswith("GetRun") for figure, _ in rows)


def test_a_failed_repetition_is_left_out_of_the_pairs_and_reported() -> None:
    recorder = Recorder()
    for rep in range(5):
        recorder.repetition = rep
        recorder.add(BASELINES, "redis_streams", 1000.0)
        if rep != 2:
            recorder.add("postgres+redis", "delivery_one", 100.0 * (rep + 1))
    figure, baseline = recorder.paired("postgres+redis", "delivery_one", BASELINES, "redis_streams")
    assert figure == [100.0, 200.0, 400.0, 500.0] and baseline == [1000.0] * 4
    rows = build_rows(recorder, Settings(run_levels=(1,), footprint=False, tracing_off=False))
    [row] = [row for row in rows if row.baseline_name.startswith("Redis")]
    assert row.value.n == 4 and row.ratio is not None and row.ratio.median == pytest.approx(0.3)


async def test_a_measurement_that_fails_is_recorded_not_raised() -> None:
    recorder = Recorder(repetition=3)

    async def broken() -> str:
        raise RuntimeError("run r-1 did not succeed: RUN_STATE_FAILED")

    async def working() -> str:
        recorder.add("embedded", "get_run", 5.0)
        return "5 calls/s"

    await recorder.timed("embedded", "runs, 1 concurrent users", broken)
    await recorder.timed("embedded", "GetRun", working)
    assert [(f.label, f.what, f.repetition) for f in recorder.failures] == [
        ("embedded", "runs, 1 concurrent users", 3)
    ]
    assert "RUN_STATE_FAILED" in recorder.failures[0].error
    assert recorder.failures[0].describe().startswith("runs, 1 concurrent users on embedded, repetition 4:")
    assert recorder.get("embedded", "get_run") == [5.0]


def test_a_row_with_a_note_marks_its_count_and_the_note_follows_the_table() -> None:
    rows = [
        compare(
            "events RSS",
            "embedded",
            "MB",
            [600, 601, 602],
            goal=Goal("value", "at_most", 500),
            note="samples",
        )
    ]
    text = render_table(rows).splitlines()
    assert text[2].endswith("NO (missed)  3*") and text[-1] == "* samples"
    assert render_table(rows, markdown=True).splitlines()[-1] == "* samples"
