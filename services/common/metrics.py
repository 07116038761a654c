"""Metrics with the OpenTelemetry SDK: one meter provider per process, served
for Prometheus to scrape.

`setup_metrics` (called by `services.common.server.run`, like tracing) makes
the process's `MeterProvider` (resource `service.name=switchboard-<svc>`) with
the Prometheus reader, and serves the text format at
`http://<metrics_host>:<metrics_port>/metrics` (`SWITCHBOARD_<SVC>_METRICS_HOST`
/ `_METRICS_PORT`; port 0 serves nothing). Every service records the same
common series:

* `rpc.server.call.duration` (seconds; Prometheus
  `rpc_server_call_duration_seconds`), the current OpenTelemetry RPC
  convention, by `rpc.method` (fully qualified: `<package>.<Service>/<Method>`)
  and `rpc.response.status_code` (the gRPC code's name), from the tracing
  interceptor. Health checks and reflection are not recorded.
* `switchboard.token.verification.failures` (`..._failures_total`) by
  `error.type`: one of `TOKEN_FAILURE_REASONS`, from `TokenVerifier`.

A service adds its own instruments from its meter, in a few lines:

    meter = metrics.meter("executor")            # scope switchboard.executor
    ended = meter.create_counter("switchboard.executor.runs.ended", unit="{run}")
    metrics.observable_gauge(
        meter, "switchboard.executor.queue.depth",
        lambda: metrics.by_label("switchboard.user_class", admission_depths()),
        unit="{run}",
    )

State that lives in a database rather than in memory is fetched every few
seconds by a `PeriodicReading` and read from there by the gauge.

Label values must come from a bounded set: roles, states, agent names (see
`BoundedLabel` for names users choose), never user or run ids.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from opentelemetry import metrics as otel_metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, ObservableGauge, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.util.types import AttributeValue
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("switchboard.metrics")

# The OpenTelemetry RPC conventions' names, as in opentelemetry-semantic-conventions
# 0.66b2 (schema 1.44), which deprecate rpc.server.duration (ms) and rpc.grpc.status_code.
RPC_SERVER_CALL_DURATION = "rpc.server.call.duration"
ATTR_RPC_SYSTEM_NAME = "rpc.system.name"
ATTR_RPC_METHOD = "rpc.method"
ATTR_RPC_STATUS_CODE = "rpc.response.status_code"
ATTR_ERROR_TYPE = "error.type"
# The conventions' advised buckets for RPC durations, in seconds.
RPC_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

TOKEN_VERIFICATION_FAILURES = "switchboard.token.verification.failures"
# Why a bearer token was refused, as `error.type` values.
TOKEN_FAILURE_REASONS = (
    "missing",  # no authorization metadata
    "malformed",  # not "Bearer <JWT>", not a JWT, or not our algorithm
    "unknown_kid",  # signed by a key the auth service does not publish
    "bad_signature",
    "expired",
    "invalid_claims",  # issuer, audience, role, a required claim
    "revoked",
)

# "User class", the label of per-user series: the caller's role, a bounded set
# (never the user id). A run whose owner's role is not known is "unknown".
ATTR_USER_CLASS = "switchboard.user_class"
USER_CLASSES = ("admin", "user", "service")
UNKNOWN_USER_CLASS = "unknown"
_USER_CLASS_OF = {name: name for name in USER_CLASSES}

# How long a scrape waits for a gauge read that runs on the service's event loop.
LOOP_READ_TIMEOUT_SECONDS = 2.0

Attributes = Mapping[str, AttributeValue]
T = TypeVar("T")


def user_class(role: str | None) -> str:
    """The user class of a role (`Role.USER` or "user" → "user")."""
    return _USER_CLASS_OF.get(role or "", UNKNOWN_USER_CLASS)


def meter(component: str, meter_provider: MeterProvider | None = None) -> Meter:
    """The meter of one part of Switchboard ("executor", "events", ...), scope
    `switchboard.<component>`; the process's provider unless one is given."""
    return otel_metrics.get_meter(f"switchboard.{component}", meter_provider=meter_provider)


def by_label(label: str, values: Mapping[str, float]) -> list[Observation]:
    """Observations of one labelled gauge: `{"queued": 3}` → `label="queued"` 3."""
    return [Observation(value, {label: key}) for key, value in values.items()]


def observable_gauge(
    meter: Meter,
    name: str,
    read: Callable[[], Iterable[Observation]],
    *,
    unit: str = "",
    description: str = "",
    loop: asyncio.AbstractEventLoop | None = None,
) -> ObservableGauge:
    """A gauge read at each scrape by calling `read`.

    Scrapes arrive on the metrics server's thread, but a service's state lives
    on its event loop: `read` runs on `loop` (by default the loop running when
    the gauge is made, as it is in a service's `build`), so it may look at
    loop-owned dicts and counters without locks. Made outside a loop, `read`
    runs on the scraping thread and must be thread-safe itself. A loop too busy
    to answer within `LOOP_READ_TIMEOUT_SECONDS` leaves the gauge out of that
    scrape; an exception in `read` is logged by the SDK and skips the gauge.
    """
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    callback = _on_loop(read, loop) if loop is not None else _direct(read)
    return meter.create_observable_gauge(name, [callback], unit=unit, description=description)


def _direct(read: Callable[[], Iterable[Observation]]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return list(read())

    return observe


def _on_loop(
    read: Callable[[], Iterable[Observation]], loop: asyncio.AbstractEventLoop
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        try:
            on_that_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_that_loop = False
        if on_that_loop:  # collected in-process (tests): waiting on the loop would deadlock
            return list(read())
        answer: concurrent.futures.Future[list[Observation]] = concurrent.futures.Future()

        def compute() -> None:
            try:
                answer.set_result(list(read()))
            except Exception as exc:  # noqa: BLE001 - handed to the scraping thread, raised there
                answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(compute)
        except RuntimeError:  # the loop has closed: the service is stopping
            return []
        try:
            return answer.result(LOOP_READ_TIMEOUT_SECONDS)
        except concurrent.futures.TimeoutError:
            log.warning(
                "gauge not read: the event loop did not answer in time",
                extra={"timeout_seconds": LOOP_READ_TIMEOUT_SECONDS},
            )
            return []

    return observe


class PeriodicReading(Generic[T]):
    """A value fetched every `every_seconds` by a coroutine (a database count,
    say), for gauges whose truth is not in memory: `read` it in the gauge's
    callback. A fetch that fails with one of `retry_on` keeps the last value
    (logged) until the next one; any other error ends the task (logged)."""

    def __init__(
        self,
        name: str,
        fetch: Callable[[], Awaitable[T]],
        initial: T,
        every_seconds: float,
        *,
        retry_on: tuple[type[Exception], ...] = (OSError,),
    ) -> None:
        self.name = name
        self.value = initial
        self._fetch = fetch
        self._every = every_seconds
        self._retry_on = retry_on
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        try:
            self.value = await self._fetch()
        except self._retry_on as exc:
            log.warning(
                "metric not refreshed; keeping the last value",
                extra={"metric": self.name, "error": repr(exc)},
            )

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._every)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"metric-{self.name}")
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("metric refresh stopped", exc_info=task.exception(), extra={"metric": self.name})

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class BoundedLabel:
    """Label values from a set that users can grow (durable consumer names,
    agent names): the first `limit` distinct values are reported as they are,
    any later one as `overflow`, so no client can multiply the series."""

    def __init__(self, limit: int = 100, overflow: str = "_other") -> None:
        self._limit = limit
        self._overflow = overflow
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return self._overflow


class RpcServerMetrics:
    """`rpc.server.call.duration` of each served RPC, recorded by the tracing
    interceptor (which knows the method and the final code already)."""

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        self._duration = meter("rpc", meter_provider).create_histogram(
            RPC_SERVER_CALL_DURATION,
            unit="s",
            description="Duration of incoming RPCs, to the last message of a stream.",
            explicit_bucket_boundaries_advisory=RPC_DURATION_BUCKETS,
        )
        self._methods: dict[str, MethodSeries] = {}

    def series(self, method: str) -> MethodSeries:
        """The series of one method ("/pkg.Service/Method"), made once per method."""
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = MethodSeries(self._duration, method.lstrip("/"))
        return found


class MethodSeries:
    """One method's attribute sets, one per status code, made on first use, so
    that recording a call allocates nothing of ours."""

    def __init__(self, histogram: otel_metrics.Histogram, method: str) -> None:
        self._histogram = histogram
        self._method = method
        self._by_code: dict[grpc.StatusCode, Attributes] = {}

    def record(self, code: grpc.StatusCode, seconds: float) -> None:
        attributes = self._by_code.get(code)
        if attributes is None:
            attributes = self._by_code[code] = {
                ATTR_RPC_SYSTEM_NAME: "grpc",
                ATTR_RPC_METHOD: self._method,
                ATTR_RPC_STATUS_CODE: code.name,
            }
        self._histogram.record(seconds, attributes)


class TokenVerificationMetrics:
    """Counts refused bearer tokens by reason (`TOKEN_FAILURE_REASONS`). Every
    reason starts at 0, so each series exists before its first failure."""

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        self._failures = meter("auth", meter_provider).create_counter(
            TOKEN_VERIFICATION_FAILURES,
            unit="{failure}",
            description="Bearer tokens refused, by reason.",
        )
        self._attributes: dict[str, Attributes] = {
            reason: {ATTR_ERROR_TYPE: reason} for reason in TOKEN_FAILURE_REASONS
        }
        for attributes in self._attributes.values():
            self._failures.add(0, attributes)

    def failed(self, reason: str) -> None:
        self._failures.add(1, self._attributes[reason])


@dataclass
class MetricsEndpoint:
    """The process's meter provider and the HTTP server that exposes it."""

    provider: SdkMeterProvider
    # None when metrics are not served (port 0).
    address: tuple[str, int] | None = None
    _server: WSGIServer | None = None
    _thread: threading.Thread | None = None

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.provider.shutdown()


def setup_metrics(service: str, host: str, port: int, *, install_global: bool = True) -> MetricsEndpoint:
    """The process's meter provider, served for Prometheus on host:port (port 0:
    recorded nowhere). Raises OSError when the port cannot be bound."""
    resource = Resource.create({SERVICE_NAME: f"switchboard-{service}"})
    # Exemplars are not exported to Prometheus: do not pay for them per call.
    exemplars = AlwaysOffExemplarFilter()
    if not port:
        provider = SdkMeterProvider(resource=resource, exemplar_filter=exemplars)
        if install_global:
            otel_metrics.set_meter_provider(provider)
        return MetricsEndpoint(provider)
    # A registry of our own: only this provider's series, no process-global state.
    registry = CollectorRegistry(auto_describe=False)
    reader = PrometheusMetricReader(registry=registry)
    provider = SdkMeterProvider(resource=resource, metric_readers=[reader], exemplar_filter=exemplars)
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError:
        provider.shutdown()
        raise
    if install_global:
        otel_metrics.set_meter_provider(provider)
    bound_host, bound_port = server.server_address[:2]
    return MetricsEndpoint(provider, (str(bound_host), int(bound_port)), server, thread)
