"""What a bench run measured, repetition by repetition, and what failed."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc


@dataclass(frozen=True)
class Failure:
    label: str
    what: str
    # None: outside the repetitions (the footprint).
    repetition: int | None
    error: str

    def describe(self) -> str:
        when = "footprint" if self.repetition is None else f"repetition {self.repetition + 1}"
        return f"{self.what} on {self.label}, {when}: {self.error}"


@dataclass
class Recorder:
    """Every repetition's value, by suite label and metric, and what failed."""

    # label -> metric -> repetition (or sample) index -> value
    values: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    # suite label -> concurrent users -> every latency sample (ms)
    latencies: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # The repetition being measured; None outside them.
    repetition: int | None = 0

    def add(self, label: str, metric: str, value: float, index: int | None = None) -> float:
        """Records `value` for the current repetition (or for sample `index`)."""
        if index is None:
            assert self.repetition is not None, "a value outside the repetitions needs its sample index"
            index = self.repetition
        self.values.setdefault(label, {}).setdefault(metric, {})[index] = value
        return value

    def get(self, label: str, metric: str) -> list[float]:
        measured = self.values.get(label, {}).get(metric, {})
        return [measured[index] for index in sorted(measured)]

    def paired(
        self, label: str, metric: str, baseline_label: str, baseline_metric: str
    ) -> tuple[list[float], list[float]]:
        """The figure's and the baseline's values of the repetitions both have."""
        figure = self.values.get(label, {}).get(metric, {})
        baseline = self.values.get(baseline_label, {}).get(baseline_metric, {})
        common = sorted(set(figure) & set(baseline))
        return [figure[i] for i in common], [baseline[i] for i in common]

    async def timed(self, label: str, what: str, measure: Callable[[], Awaitable[str]]) -> None:
        """Runs one measurement and says how it went. A figure that cannot be
        measured (the service answers an error, a run fails, a wait times out)
        is recorded as failed, reported with the table and in the exit code;
        the other measurements go on."""
        started = time.perf_counter()
        try:
            shown = await measure()
        except (grpc.aio.AioRpcError, RuntimeError, TimeoutError) as exc:
            error = describe_error(exc)
            self.failures.append(Failure(label, what, self.repetition, error))
            shown = f"FAILED: {error}"
        progress(f"{label}: {what}: {shown} ({time.perf_counter() - started:.1f}s)")


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"[:500]


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
