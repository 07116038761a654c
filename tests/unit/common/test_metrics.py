"""The metrics runtime: the Prometheus endpoint, the RPC and token series the
interceptors record, gauges read on the event loop, and the executor's and
events service's instruments (in-memory reader, no clock assertions)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics
from services.common.auth import TokenVerifier
from services.common.config import ConfigError, load_config
from services.common.errors import FieldViolation, InvalidArgument, NotFound, Unauthenticated
from services.common.interceptors import (
    AuthenticationInterceptor,
    ErrorMappingInterceptor,
    TracingInterceptor,
    principal_of,
)
from services.common.server import start_metrics
from services.events.metrics import EPHEMERAL_CONSUMER, EventsMetrics
from services.executor.metrics import ExecutorMetrics
from services.registry.config import RegistryConfig
from tests.unit.common.keys import AUDIENCE, ISSUER, Keys, Revocations

SERVICE = "test.Metered"
Points = dict[str, list[tuple[dict[str, Any], Any]]]


def collect(reader: InMemoryMetricReader) -> Points:
    """Every data point by instrument name, with its attributes."""
    found: Points = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                found.setdefault(metric.name, []).extend(
                    (dict(point.attributes or {}), point) for point in metric.data.data_points
                )
    return found


def value_of(points: Points, name: str, **attributes: Any) -> Any:
    matching = [
        point
        for attrs, point in points.get(name, [])
        if all(attrs.get(k) == v for k, v in attributes.items())
    ]
    assert len(matching) == 1, (name, attributes, points.get(name))
    return matching[0]


def in_memory() -> tuple[InMemoryMetricReader, MeterProvider]:
    reader = InMemoryMetricReader()
    return reader, MeterProvider(metric_readers=[reader])


def bound_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


# -- the endpoint and its configuration ------------------------------------------


def test_the_endpoint_serves_the_providers_series_for_prometheus() -> None:
    with bound_port() as probe:
        port = probe.getsockname()[1]
    endpoint = metrics.setup_metrics("demo", "127.0.0.1", port, install_global=False)
    try:
        assert endpoint.address == ("127.0.0.1", port)
        counter = endpoint.provider.get_meter("switchboard.demo").create_counter("demo.calls", unit="{call}")
        counter.add(3, {"kind": "x"})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        endpoint.shutdown()
    samples = {
        sample.name: sample for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert samples["demo_calls_total"].value == 3
    assert samples["demo_calls_total"].labels["kind"] == "x"
    assert samples["target_info"].labels["service_name"] == "switchboard-demo"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_port_zero_serves_nothing_and_a_taken_port_is_an_error() -> None:
    off = metrics.setup_metrics("demo", "127.0.0.1", 0, install_global=False)
    assert off.address is None
    off.shutdown()
    with bound_port() as taken, pytest.raises(OSError):
        metrics.setup_metrics("demo", "127.0.0.1", taken.getsockname()[1], install_global=False)


def test_metrics_ports_default_per_service_and_zero_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(RegistryConfig).metrics_address == ("127.0.0.1", 9152)
    monkeypatch.setenv("SWITCHBOARD_REGISTRY_METRICS_PORT", "0")
    assert load_config(RegistryConfig).metrics_address is None
    monkeypatch.setenv("SWITCHBOARD_REGISTRY_METRICS_PORT", "9999")
    monkeypatch.setenv("SWITCHBOARD_REGISTRY_METRICS_HOST", "0.0.0.0")
    assert load_config(RegistryConfig).metrics_address == ("0.0.0.0", 9999)


def test_a_bad_or_taken_metrics_port_stops_the_service_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWITCHBOARD_REGISTRY_METRICS_PORT", "70000")
    with pytest.raises(ConfigError):
        load_config(RegistryConfig)
    assert "SWITCHBOARD_REGISTRY_METRICS_PORT" in capsys.readouterr().err
    with bound_port() as taken:
        monkeypatch.setenv("SWITCHBOARD_REGISTRY_METRICS_PORT", str(taken.getsockname()[1]))
        config = load_config(RegistryConfig)
        with pytest.raises(ConfigError):
            start_metrics(config)
    assert "SWITCHBOARD_REGISTRY_METRICS_PORT" in capsys.readouterr().err


# -- RPC durations and token failures, from the interceptors ---------------------


async def ok(request: bytes, context: Any) -> bytes:
    return b"fine"


async def fail(request: bytes, context: Any) -> bytes:
    raise InvalidArgument([FieldViolation("name", "is required")])


async def who_am_i(request: bytes, context: Any) -> bytes:
    return principal_of(context).user_id.encode()


async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"one"
    raise NotFound("gone", reason="GONE")


@pytest.fixture
async def metered_server() -> AsyncIterator[tuple[grpc.aio.Channel, InMemoryMetricReader, Keys, str]]:
    reader, provider = in_memory()
    keys = Keys()
    kid = keys.add()
    verifier = TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE, meter_provider=provider)
    server = grpc.aio.server(
        interceptors=[
            TracingInterceptor(TracerProvider(), provider),
            ErrorMappingInterceptor(),
            AuthenticationInterceptor(verifier, frozenset({f"/{SERVICE}/Ok", f"/{SERVICE}/Fail"})),
        ]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Ok": grpc.unary_unary_rpc_method_handler(ok),
                    "Fail": grpc.unary_unary_rpc_method_handler(fail),
                    "WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                },
            ),
        )
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([SERVICE, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel, reader, keys, kid
    await channel.close(grace=None)
    await server.stop(None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_rpc_durations_by_method_and_code_skip_health_and_reflection(metered_server: Any) -> None:
    channel, reader, keys, kid = metered_server
    raw: Any = channel  # bytes in and out: no serializers
    for _ in range(2):
        assert await raw.unary_unary(f"/{SERVICE}/Ok")(b"") == b"fine"
    with pytest.raises(grpc.aio.AioRpcError):
        await raw.unary_unary(f"/{SERVICE}/Fail")(b"")
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in raw.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=bearer(keys.sign(kid))):
            pass
    with pytest.raises(grpc.aio.AioRpcError):
        await raw.unary_unary(f"/{SERVICE}/WhoAmI")(b"")
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    async def list_services() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for _ in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(list_services()):
        break

    points = collect(reader)
    name = metrics.RPC_SERVER_CALL_DURATION
    expected = {
        ("Ok", "OK"): 2,
        ("Fail", "INVALID_ARGUMENT"): 1,
        ("Stream", "NOT_FOUND"): 1,
        ("WhoAmI", "UNAUTHENTICATED"): 1,
    }
    recorded = {
        (attrs["rpc.method"].rpartition("/")[2], attrs["rpc.response.status_code"]): point.count
        for attrs, point in points[name]
    }
    assert recorded == expected  # and nothing for health or reflection
    ok_point = value_of(points, name, **{"rpc.method": f"{SERVICE}/Ok"})
    assert ok_point.explicit_bounds == metrics.RPC_DURATION_BUCKETS  # seconds, as the convention advises
    assert 0 <= ok_point.sum < 60
    for attrs, _ in points[name]:
        assert attrs["rpc.system.name"] == "grpc"


async def test_each_refused_token_is_counted_by_reason(metered_server: Any) -> None:
    channel, reader, keys, kid = metered_server
    raw: Any = channel
    stranger = Ed25519PrivateKey.generate()
    valid = keys.sign(kid)
    head, payload, signature = valid.split(".")
    tampered_signature = ("A" if signature[10] != "A" else "B").join((signature[:10], signature[11:]))
    refused = {
        "missing": (),
        "malformed": bearer("not-a-jwt"),
        "unknown_kid": bearer(
            jwt.encode({"sub": "x"}, stranger, algorithm="EdDSA", headers={"kid": "nobody-knows"})
        ),
        "bad_signature": bearer(f"{head}.{payload}.{tampered_signature}"),
        "expired": bearer(keys.sign(kid, exp=int(time.time()) - 3600)),
        "invalid_claims": bearer(keys.sign(kid, aud="someone-else")),
    }
    for reason, metadata in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await raw.unary_unary(f"/{SERVICE}/WhoAmI")(b"", metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, reason
    assert await raw.unary_unary(f"/{SERVICE}/WhoAmI")(b"", metadata=bearer(valid)) == b"user-1"

    points = collect(reader)
    counts = {
        attrs["error.type"]: point.value for attrs, point in points[metrics.TOKEN_VERIFICATION_FAILURES]
    }
    assert counts == {**dict.fromkeys(refused, 1), "revoked": 0}


async def test_revoked_tokens_are_counted_by_the_verifier_itself() -> None:
    reader, provider = in_memory()
    keys, revocations = Keys(), Revocations()
    kid = keys.add()
    verifier = TokenVerifier(keys, revocations, ISSUER, AUDIENCE, meter_provider=provider)
    revocations.token_ids.add("spent")
    with pytest.raises(Unauthenticated):
        await verifier.verify(keys.sign(kid, jti="spent"))
    points = collect(reader)
    assert value_of(points, metrics.TOKEN_VERIFICATION_FAILURES, **{"error.type": "revoked"}).value == 1
    assert value_of(points, metrics.TOKEN_VERIFICATION_FAILURES, **{"error.type": "expired"}).value == 0


# -- gauges, labels ---------------------------------------------------------------


async def test_a_gauge_made_on_the_loop_is_read_on_the_loop_even_when_scraped_elsewhere() -> None:
    reader, provider = in_memory()
    loop_thread = threading.get_ident()
    readers: list[int] = []
    state = {"queued": 3}

    def read() -> list[Observation]:
        readers.append(threading.get_ident())
        return metrics.by_label("state", state)

    metrics.observable_gauge(metrics.meter("test", provider), "test.depth", read)
    scraped = await asyncio.to_thread(collect, reader)  # as the metrics server's thread does
    assert value_of(scraped, "test.depth", state="queued").value == 3
    state["queued"] = 5
    assert value_of(collect(reader), "test.depth", state="queued").value == 5  # on the loop: no deadlock
    assert readers == [loop_thread, loop_thread]


def test_a_gauge_made_outside_a_loop_is_read_by_the_scraper() -> None:
    reader, provider = in_memory()
    readers: list[int] = []

    def read() -> list[Observation]:
        readers.append(threading.get_ident())
        return [Observation(7)]

    metrics.observable_gauge(metrics.meter("test", provider), "test.plain", read)
    assert value_of(collect(reader), "test.plain").value == 7
    assert readers == [threading.get_ident()]


def test_bounded_labels_and_user_classes() -> None:
    label = metrics.BoundedLabel(limit=2)
    assert [label(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", "_other", "a", "_other"]
    assert [metrics.user_class(r) for r in ("admin", "user", "service", "user-42", None)] == [
        "admin",
        "user",
        "service",
        "unknown",
        "unknown",
    ]


# -- the executor's and events service's instruments ------------------------------


async def test_executor_metrics_report_runs_queue_agents_breakers_and_outbox() -> None:
    reader, provider = in_memory()
    now = datetime(2030, 1, 1, tzinfo=UTC)
    clock = {"now": now}
    executor = ExecutorMetrics(provider, clock=lambda: clock["now"], label_limit=2)
    executor.watch(
        runs=lambda: {"QUEUED": 4, "RUNNING": 2},
        queue_depth=lambda: {"user": 3, "admin": 1, "somebody-else": 2},
        active_runs=lambda: {"text-stats": 2, "summarize": 1, "chaos": 5},
        breakers=lambda: {"10.0.0.1:1": "CLOSED", "10.0.0.2:1": "HALF_OPEN"},
    )
    executor.run_admitted("user", now - timedelta(seconds=3))
    executor.run_admitted("service", now - timedelta(seconds=90))
    executor.run_ended("SUCCEEDED")
    executor.run_ended("SUCCEEDED")
    executor.run_ended("TIMED_OUT")
    executor.outbox_backlog(7, now - timedelta(seconds=12))
    clock["now"] = now + timedelta(seconds=3)

    points = collect(reader)
    state, user_class = "switchboard.run.state", metrics.ATTR_USER_CLASS
    assert value_of(points, "switchboard.executor.runs", **{state: "queued"}).value == 4
    assert value_of(points, "switchboard.executor.runs", **{state: "running"}).value == 2
    assert value_of(points, "switchboard.executor.runs.ended", **{state: "succeeded"}).value == 2
    assert value_of(points, "switchboard.executor.runs.ended", **{state: "timed_out"}).value == 1
    depth = {attrs[user_class]: p.value for attrs, p in points["switchboard.executor.queue.depth"]}
    assert depth == {"admin": 1, "user": 3, "service": 0, "unknown": 2}
    waits = {attrs[user_class]: p for attrs, p in points["switchboard.executor.queue.wait_time"]}
    assert (waits["user"].count, waits["user"].sum) == (1, 3.0)
    assert (waits["service"].count, waits["service"].sum) == (1, 90.0)
    active = {
        attrs["switchboard.agent"]: p.value for attrs, p in points["switchboard.executor.agent.active_runs"]
    }
    assert active == {"text-stats": 2, "summarize": 1, "_other": 5}
    breakers = {
        attrs["switchboard.endpoint"]: p.value for attrs, p in points["switchboard.executor.breaker.state"]
    }
    assert breakers == {"10.0.0.1:1": 0, "10.0.0.2:1": 1}
    assert value_of(points, "switchboard.executor.outbox.pending").value == 7
    assert value_of(points, "switchboard.executor.outbox.lag").value == 15.0

    executor.outbox_backlog(0, None)
    executor.watch(breakers=lambda: {"10.0.0.1:1": "OPEN"})
    points = collect(reader)
    assert value_of(points, "switchboard.executor.outbox.lag").value == 0
    assert value_of(points, "switchboard.executor.outbox.pending").value == 0
    assert value_of(points, "switchboard.executor.breaker.state").value == 2


class FakeSubscription:
    def __init__(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self.ended = False


async def test_events_metrics_count_deliveries_and_pending_acks_per_consumer() -> None:
    reader, provider = in_memory()
    events = EventsMetrics(provider, consumer_label_limit=1)
    consumer = "messaging.consumer.group.name"
    events.delivered("billing", 1)
    events.delivered("billing", 2)
    events.delivered("billing", 3)
    events.dead_lettered("billing")
    events.delivered(None, 1)
    events.delivered("audit", 1)  # past the label limit
    first, second, closed, ephemeral = (FakeSubscription(n) for n in (2, 3, 4, 1))
    events.track("billing", first)
    events.track("billing", second)
    events.track("billing", closed)
    events.track(None, ephemeral)
    closed.ended = True

    points = collect(reader)
    deliveries = {attrs[consumer]: p.value for attrs, p in points["switchboard.events.deliveries"]}
    assert deliveries == {"billing": 3, EPHEMERAL_CONSUMER: 1, "_other": 1}
    assert value_of(points, "switchboard.events.redeliveries", **{consumer: "billing"}).value == 2
    assert value_of(points, "switchboard.events.dead_letters", **{consumer: "billing"}).value == 1
    pending = {attrs[consumer]: p.value for attrs, p in points["switchboard.events.pending_acks"]}
    assert pending == {"billing": 5, EPHEMERAL_CONSUMER: 1}

    events.untrack(first)
    events.untrack(ephemeral)
    pending = {attrs[consumer]: p.value for attrs, p in collect(reader)["switchboard.events.pending_acks"]}
    assert pending == {"billing": 3}


async def test_a_periodic_reading_keeps_its_last_value_when_a_fetch_fails() -> None:
    answers: list[int | Exception] = [1, OSError("database away"), 3]
    fetched = asyncio.Event()

    async def fetch() -> int:
        answer = answers.pop(0)
        fetched.set()
        if isinstance(answer, Exception):
            raise answer
        return answer

    reading = metrics.PeriodicReading("test.count", fetch, initial=0, every_seconds=3600)
    assert reading.value == 0
    reading.start()  # the first fetch comes at once, the next only after an hour
    await asyncio.wait_for(fetched.wait(), timeout=30)
    await reading.stop()
    assert reading.value == 1
    await reading.refresh()
    assert reading.value == 1  # OSError: kept
    await reading.refresh()
    assert reading.value == 3
    with pytest.raises(ValueError):
        await metrics.PeriodicReading("test.bug", _broken, initial=0, every_seconds=1).refresh()


async def _broken() -> int:
    raise ValueError("a bug is not retried")
