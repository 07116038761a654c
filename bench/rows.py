"""The table's rows: which figure is compared with which baseline, and the goals."""

from __future__ import annotations

from dataclasses import dataclass

from bench.record import Recorder
from bench.settings import Settings
from bench.stats import Goal, Row, compare

# The label of the shared baselines, and the suffix of a suite's label with tracing off.
BASELINES = "baselines"
UNTRACED = " (tracing off)"
FOOTPRINT_NOTE = "memory: n samples, 0.5 s apart, of one state (not repetitions)"


@dataclass(frozen=True)
class RowSpec:
    figure: str
    metric: str
    unit: str
    baseline_name: str = ""
    baseline_metric: str = ""
    goal: Goal | None = None
    # Where the baseline was measured: None for the shared baselines; else in
    # the suite labelled as the figure's plus this suffix ("" for the same
    # suite, UNTRACED for the same backends with tracing off).
    baseline_suite_suffix: str | None = None
    # The figure is itself one of the shared baselines (one row, not one per suite).
    of_baselines: bool = False
    note: str = ""


def row_specs(settings: Settings) -> list[RowSpec]:
    levels = list(settings.run_levels)
    most = max(levels)
    celery = f"Celery no-op tasks/s ({settings.celery_tasks} at once)"
    specs = [
        RowSpec(
            f"runs/s, {users} user{'s' if users > 1 else ''}",
            f"runs_{users}_per_second",
            "runs/s",
            celery,
            "celery_per_second",
            Goal("ratio", "at_least", 1.0) if users == most else None,
        )
        for users in levels
    ]
    for users in levels:
        specs.append(
            RowSpec(
                f"p50 StartRun->AGENT_COMPLETED, {users} user{'s' if users > 1 else ''}",
                f"runs_{users}_p50_ms",
                "ms",
                "Celery round trip p50",
                "celery_p50_ms",
                Goal("value", "at_most", 5.0) if users == 1 else None,
            )
        )
        specs.append(
            RowSpec(
                f"p99 StartRun->AGENT_COMPLETED, {users} user{'s' if users > 1 else ''}",
                f"runs_{users}_p99_ms",
                "ms",
                "Celery round trip p99",
                "celery_p99_ms",
            )
        )
    redis = "Redis Streams XREADGROUP+XACK"
    many = settings.delivery_many_subscribers
    specs += [
        RowSpec(
            "events delivered+acked, 1 subscriber",
            "delivery_one",
            "events/s",
            redis,
            "redis_streams",
            Goal("ratio", "at_least", 0.5),
        ),
        RowSpec(
            f"events delivered+acked, {many} subscribers", "delivery_many", "events/s", redis, "redis_streams"
        ),
        RowSpec(
            "events delivered+acked, 1 subscriber",
            "delivery_one",
            "events/s",
            "gRPC stream, 1 event/msg",
            "stream_1",
        ),
        RowSpec(
            "events delivered+acked, 1 subscriber",
            "delivery_one",
            "events/s",
            "gRPC stream, 100 events/msg",
            "stream_100",
        ),
        RowSpec(
            "GetRun, full stack, 64 in flight",
            "get_run",
            "calls/s",
            "bare grpc.aio echo",
            "echo",
            Goal("ratio", "at_least", 0.6),
        ),
        RowSpec("GetRun, full stack, 64 in flight", "get_run", "calls/s", "echo + stock OTel", "echo_otel"),
        RowSpec(
            "echo + stock OTel interceptors",
            "echo_otel",
            "calls/s",
            "bare grpc.aio echo",
            "echo",
            of_baselines=True,
        ),
    ]
    if settings.tracing_off:
        for users in levels:
            plural = "s" if users > 1 else ""
            specs.append(
                RowSpec(
                    f"runs/s, {users} user{plural}, tracing on",
                    f"runs_{users}_per_second",
                    "runs/s",
                    "same, tracing off",
                    f"runs_{users}_per_second",
                    baseline_suite_suffix=UNTRACED,
                )
            )
            specs.append(
                RowSpec(
                    f"p50 latency, {users} user{plural}, tracing on",
                    f"runs_{users}_p50_ms",
                    "ms",
                    "same, tracing off",
                    f"runs_{users}_p50_ms",
                    baseline_suite_suffix=UNTRACED,
                )
            )
    if settings.footprint:
        for count in settings.idle_subscriptions:
            specs.append(
                RowSpec(
                    f"events RSS, {count:,} idle subscriptions",
                    f"events_rss_{count}",
                    "MB",
                    "events RSS, none open",
                    "events_rss_0",
                    Goal("value", "at_most", 500.0) if count >= 10_000 else None,
                    baseline_suite_suffix="",
                    note=FOOTPRINT_NOTE,
                )
            )
        specs.append(
            RowSpec(
                f"executor RSS, {settings.queued_runs:,} queued runs",
                f"executor_rss_{settings.queued_runs}",
                "MB",
                "executor RSS, none queued",
                "executor_rss_0",
                baseline_suite_suffix="",
                note=FOOTPRINT_NOTE,
            )
        )
    return specs


def build_rows(recorder: Recorder, settings: Settings) -> list[Row]:
    rows = []
    for spec in row_specs(settings):
        for label in recorder.values:
            if label.endswith(UNTRACED) or (label == BASELINES) != spec.of_baselines:
                continue
            suffix = spec.baseline_suite_suffix
            baseline_label = BASELINES if suffix is None else label + suffix
            if spec.baseline_metric:
                values, baseline_values = recorder.paired(
                    label, spec.metric, baseline_label, spec.baseline_metric
                )
            else:
                values, baseline_values = recorder.get(label, spec.metric), []
            if not values:
                continue
            rows.append(
                compare(
                    spec.figure,
                    label,
                    spec.unit,
                    values,
                    spec.baseline_name,
                    baseline_values or None,
                    spec.goal,
                    spec.note,
                )
            )
    return rows
