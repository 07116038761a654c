"""The executor's own metrics, next to the RPC and token series every service
has (services.common.metrics).

`ExecutorMetrics` is made once, in `build` (on the event loop), and handed to
the parts that record. Events are recorded as they happen (`run_admitted`,
`run_ended`, `outbox_backlog`); the gauges of live state are read at each
scrape, on the event loop, from the sources given to `watch`.

| instrument (Prometheus name) | labels | meaning |
|---|---|---|
| `switchboard.executor.runs` (`switchboard_executor_runs`) | `switchboard_run_state` = queued, running | runs waiting or executing now |
| `switchboard.executor.runs.ended` (`..._runs_ended_total`) | `switchboard_run_state` = succeeded, failed, cancelled, timed_out | runs that reached a final state |
| `switchboard.executor.queue.depth` (`..._queue_depth`) | `switchboard_user_class` | runs waiting for admission |
| `switchboard.executor.queue.wait_time` (`..._queue_wait_time_seconds`) | `switchboard_user_class` | histogram: creation to admission |
| `switchboard.executor.agent.active_runs` (`..._agent_active_runs`) | `switchboard_agent` | agent slots held (runs, workflow steps) |
| `switchboard.executor.breaker.state` (`..._breaker_state`) | `switchboard_endpoint` | 0 closed, 1 half-open, 2 open |
| `switchboard.executor.outbox.pending` (`..._outbox_pending`) | | events committed, not yet relayed |
| `switchboard.executor.outbox.lag` (`..._outbox_lag_seconds`) | | age of the oldest of those, 0 when none |

User class is the run owner's role (admin, user, service; "unknown" when not
known), never the user id: see `services.common.metrics.user_class`.

Where the truth is in the database (the queue, shared by every replica), feed
the sources from a `services.common.metrics.PeriodicReading` of a count query;
every replica then reports the same cluster-wide value, so dashboards take
`max` across replicas for runs, queue depth and agent slots, and `sum` for the
counters and the histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from opentelemetry.metrics import MeterProvider, Observation

from services.common import metrics
from services.common.convert import utcnow

ATTR_RUN_STATE = "switchboard.run.state"
ATTR_AGENT = "switchboard.agent"
ATTR_ENDPOINT = "switchboard.endpoint"

# Breaker states as gauge values (BreakerState's values, or their names).
BREAKER_STATE_VALUES: Mapping[str, int] = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}
# Queue waits range from nothing to a long backlog.
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

Counts = Callable[[], Mapping[str, int]]


class ExecutorMetrics:
    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        label_limit: int = 200,
    ) -> None:
        meter = metrics.meter("executor", meter_provider)
        self._clock = clock
        self._agent_label = metrics.BoundedLabel(label_limit)
        self._endpoint_label = metrics.BoundedLabel(label_limit)
        self._runs: Counts | None = None
        self._queue_depth: Counts | None = None
        self._active_runs: Counts | None = None
        self._breakers: Callable[[], Mapping[str, str]] | None = None
        self._outbox: tuple[int, datetime | None] = (0, None)
        self._run_state_attributes: dict[str, metrics.Attributes] = {}
        self._user_class_attributes: dict[str, metrics.Attributes] = {}

        self._ended = meter.create_counter(
            "switchboard.executor.runs.ended", unit="{run}", description="Runs that reached a final state."
        )
        self._queue_wait = meter.create_histogram(
            "switchboard.executor.queue.wait_time",
            unit="s",
            description="Time runs waited in the queue, from creation to admission.",
            explicit_bucket_boundaries_advisory=QUEUE_WAIT_BUCKETS,
        )
        metrics.observable_gauge(
            meter,
            "switchboard.executor.runs",
            self._observe_runs,
            unit="{run}",
            description="Runs queued or running now.",
        )
        metrics.observable_gauge(
            meter,
            "switchboard.executor.queue.depth",
            self._observe_queue_depth,
            unit="{run}",
            description="Runs waiting for admission, by the owner's user class.",
        )
        metrics.observable_gauge(
            meter,
            "switchboard.executor.agent.active_runs",
            self._observe_active_runs,
            unit="{run}",
            description="Slots of each agent held now by runs and workflow steps.",
        )
        metrics.observable_gauge(
            meter,
            "switchboard.executor.breaker.state",
            self._observe_breakers,
            description="Circuit breaker of each agent endpoint: 0 closed, 1 half-open, 2 open.",
        )
        metrics.observable_gauge(
            meter,
            "switchboard.executor.outbox.pending",
            self._observe_outbox_pending,
            unit="{event}",
            description="Events committed to the outbox and not yet relayed to the events service.",
        )
        metrics.observable_gauge(
            meter,
            "switchboard.executor.outbox.lag",
            self._observe_outbox_lag,
            unit="s",
            description="Age of the oldest event not yet relayed (0 when none waits).",
        )

    # -- sources of the live gauges, read at each scrape on the event loop ------

    def watch(
        self,
        *,
        runs: Counts | None = None,
        queue_depth: Counts | None = None,
        active_runs: Counts | None = None,
        breakers: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """Sets where the gauges read from (a source left None keeps the last one):
        `runs`: run state ("QUEUED"/"RUNNING" or lower case) → runs in it now;
        `queue_depth`: user class → queued runs; `active_runs`: agent → slots
        held; `breakers`: endpoint → breaker state ("CLOSED", "HALF_OPEN", "OPEN")."""
        self._runs = runs or self._runs
        self._queue_depth = queue_depth or self._queue_depth
        self._active_runs = active_runs or self._active_runs
        self._breakers = breakers or self._breakers

    # -- events, recorded as they happen ----------------------------------------

    def run_admitted(self, user_class: str, queued_at: datetime, now: datetime | None = None) -> None:
        """A queued run was admitted (not a run resumed after a restart)."""
        waited = ((now or self._clock()) - queued_at).total_seconds()
        self._queue_wait.record(max(waited, 0.0), self._user_class(user_class))

    def run_ended(self, state: str) -> None:
        """A run reached a final state (RunState.SUCCEEDED, ...), once per run."""
        self._ended.add(1, self._run_state(state))

    def outbox_backlog(self, pending: int, oldest_create_time: datetime | None) -> None:
        """What the relay saw last: rows not yet published, and the oldest one's
        creation time. The lag gauge ages from it until the next call."""
        self._outbox = (pending, oldest_create_time if pending else None)

    # -- observations -----------------------------------------------------------

    def _run_state(self, state: str) -> metrics.Attributes:
        attributes = self._run_state_attributes.get(state)
        if attributes is None:
            attributes = self._run_state_attributes[state] = {ATTR_RUN_STATE: str(state).lower()}
        return attributes

    def _user_class(self, name: str) -> metrics.Attributes:
        attributes = self._user_class_attributes.get(name)
        if attributes is None:
            # Only the known classes become labels: anything else is "unknown".
            attributes = self._user_class_attributes[name] = {
                metrics.ATTR_USER_CLASS: metrics.user_class(name)
            }
        return attributes

    def _observe_runs(self) -> list[Observation]:
        if self._runs is None:
            return []
        return [Observation(count, self._run_state(state)) for state, count in self._runs().items()]

    def _observe_queue_depth(self) -> list[Observation]:
        if self._queue_depth is None:
            return []
        depths = dict.fromkeys((*metrics.USER_CLASSES, metrics.UNKNOWN_USER_CLASS), 0)
        for name, count in self._queue_depth().items():
            depths[metrics.user_class(name)] += count
        return metrics.by_label(metrics.ATTR_USER_CLASS, depths)

    def _observe_active_runs(self) -> list[Observation]:
        if self._active_runs is None:
            return []
        return _summed(ATTR_AGENT, self._active_runs(), self._agent_label)

    def _observe_breakers(self) -> list[Observation]:
        if self._breakers is None:
            return []
        # Endpoints past the label limit share one label: it shows the worst of them.
        worst: dict[str, float] = {}
        for endpoint, state in self._breakers().items():
            name = self._endpoint_label(endpoint)
            worst[name] = max(worst.get(name, 0), BREAKER_STATE_VALUES[str(state)])
        return metrics.by_label(ATTR_ENDPOINT, worst)

    def _observe_outbox_pending(self) -> list[Observation]:
        return [Observation(self._outbox[0])]

    def _observe_outbox_lag(self) -> list[Observation]:
        oldest = self._outbox[1]
        lag = 0.0 if oldest is None else max((self._clock() - oldest).total_seconds(), 0.0)
        return [Observation(lag)]


def _summed(label: str, values: Mapping[str, int], bounded: metrics.BoundedLabel) -> list[Observation]:
    # Values past the label limit share the overflow label: add them up.
    totals: dict[str, float] = {}
    for key, value in values.items():
        name = bounded(key)
        totals[name] = totals.get(name, 0) + value
    return metrics.by_label(label, totals)
