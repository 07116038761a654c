"""Server start-up and shutdown, the same for every service.

A service's `__main__` loads its config and calls `run(config, build)`, where
`build` wires the service's parts from the shared `Runtime`. This module then
starts the gRPC server with the interceptor stack, the health service
(NOT_SERVING until the service's dependencies answer) and reflection, and on
SIGTERM/SIGINT: health NOT_SERVING → server.stop(grace) → the service's own
stop hooks → channels closed → traces flushed → metrics endpoint closed → exit 0.
Metrics are served for Prometheus from start-up (services.common.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from switchboard.auth.v1 import auth_service_pb2_grpc

from services.common import db
from services.common.auth import RemoteKeySource, RemoteRevocationFeed, TokenVerifier
from services.common.channels import ServiceChannels
from services.common.config import ConfigError, ServiceConfig
from services.common.interceptors import (
    AccessLogInterceptor,
    AuthenticationInterceptor,
    ErrorMappingInterceptor,
    InterceptorStack,
    TracingInterceptor,
)
from services.common.logs import configure_logging
from services.common.metrics import MetricsEndpoint, setup_metrics
from services.common.tracing import setup_tracing

log = logging.getLogger("switchboard.server")

READINESS_POLL_SECONDS = 0.2
# Set by the launcher (and the test harness) to the pid that supervises us.
SUPERVISOR_PID_VARIABLE = "SWITCHBOARD_SUPERVISOR_PID"


def follow_supervisor() -> None:
    """Stop (SIGTERM, handled gracefully) when the supervising process dies, so a
    killed launcher or test run never leaves services behind."""
    supervisor = os.environ.get(SUPERVISOR_PID_VARIABLE, "")
    if not supervisor.isdigit():
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(supervisor):
        # The supervisor died before the death signal was armed.
        raise SystemExit(0)


@dataclass
class ServiceParts:
    """What a service contributes to the shared server."""

    # Adds the servicers; returns their full service names (for health and reflection).
    add_to_server: Callable[[grpc.aio.Server], Sequence[str]]
    verifier: TokenVerifier
    # True once every dependency answers; polled until then.
    check_ready: Callable[[], Awaitable[bool]]
    # Full method names that need no token.
    public_methods: frozenset[str] = frozenset()
    # Run after the server has started, and after it has stopped, in order.
    on_start: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run when shutdown begins, before the grace period: end long-lived streams
    # (subscriptions, long polls) so that they do not hold the grace period.
    on_stopping: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass
class RemoteVerification:
    """Token verification against the auth service: keys and revocation feed."""

    verifier: TokenVerifier
    keys: RemoteKeySource
    revocations: RemoteRevocationFeed

    async def ready(self) -> bool:
        try:
            await self.keys.refresh()
        except grpc.aio.AioRpcError:
            return False
        return self.revocations.synced


class Runtime:
    """Shared pieces a service's wiring may use; one per process."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.channels = ServiceChannels()

    def auth_stub(self) -> auth_service_pb2_grpc.AuthServiceAsyncStub:
        return auth_service_pb2_grpc.AuthServiceStub(self.channels.get(self.config.auth_address))  # type: ignore[return-value]

    def remote_verification(self) -> RemoteVerification:
        stub = self.auth_stub()
        keys = RemoteKeySource(stub)
        revocations = RemoteRevocationFeed(stub, self.config.revocation_poll_seconds)
        verifier = TokenVerifier(keys, revocations, self.config.token_issuer, self.config.token_audience)
        return RemoteVerification(verifier, keys, revocations)


async def database_ready(engine: AsyncEngine) -> bool:
    try:
        await db.ping(engine)
    except (SQLAlchemyError, OSError):
        return False
    return True


def build_interceptors(parts: ServiceParts) -> list[grpc.aio.ServerInterceptor]:
    # Outermost first, as one interceptor: one pipeline hop a call instead of four.
    return [
        InterceptorStack(
            [
                TracingInterceptor(),
                AccessLogInterceptor(),
                ErrorMappingInterceptor(),
                AuthenticationInterceptor(parts.verifier, parts.public_methods),
            ]
        )
    ]


async def _await_ready(parts: ServiceParts, health_servicer: HealthServicer, names: Sequence[str]) -> None:
    # Dependencies have no event to wait on: poll them.
    while not await parts.check_ready():  # noqa: ASYNC110
        await asyncio.sleep(READINESS_POLL_SECONDS)
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving")


async def serve(
    config: ServiceConfig, runtime: Runtime, build: Callable[[Runtime], Awaitable[ServiceParts]]
) -> None:
    parts = await build(runtime)
    server = grpc.aio.server(
        interceptors=build_interceptors(parts),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ],
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(parts.add_to_server(server))
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(config.listen_address)
    await server.start()
    log.info("listening", extra={"address": f"{config.host}:{port}", "services": names})

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    for hook in parts.on_start:
        await hook()
    # What start-up made (modules, protobuf descriptors, SQLAlchemy metadata:
    # ~140k objects) lives as long as the process: keep it out of the cyclic
    # collector's full passes, which otherwise walk it all (50-100 ms each).
    gc.collect()
    gc.freeze()
    readiness = asyncio.create_task(_await_ready(parts, health_servicer, names), name="readiness")
    await stopping.wait()

    log.info("stopping", extra={"grace_seconds": config.shutdown_grace_seconds})
    readiness.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await readiness
    await health_servicer.enter_graceful_shutdown()
    for hook in parts.on_stopping:
        await hook()
    await server.stop(config.shutdown_grace_seconds)
    for hook in parts.on_stop:
        await hook()
    await runtime.channels.close()
    log.info("stopped")


def start_metrics(config: ServiceConfig) -> MetricsEndpoint:
    """The process's meter provider and metrics endpoint, or stop naming the
    setting when its port cannot be bound (like any bad setting)."""
    host, port = config.metrics_address or (config.metrics_host, 0)
    try:
        endpoint = setup_metrics(config.service_name, host, port)
    except OSError as exc:
        message = (
            f"{config.service_name}: cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
            f"set {config.variable('metrics_port')} (0 turns metrics off) or {config.variable('metrics_host')}"
        )
        print(message, file=sys.stderr)
        log.error(message)
        raise ConfigError(2) from None
    if endpoint.address is not None:
        log.info("serving metrics", extra={"address": "{}:{}".format(*endpoint.address)})
    return endpoint


def run(config: ServiceConfig, build: Callable[[Runtime], Awaitable[ServiceParts]]) -> None:
    """The entry point of every service process."""
    follow_supervisor()
    configure_logging(config.service_name, config.log_level)
    provider = setup_tracing(config.service_name, config.trace_file)
    try:
        metrics_endpoint = start_metrics(config)
    except ConfigError:
        provider.shutdown()
        raise
    try:
        asyncio.run(serve(config, Runtime(config), build))
    finally:
        provider.shutdown()
        metrics_endpoint.shutdown()
