"""`python -m services.events`: wires storage, domain and servicer into the shared server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from sqlalchemy.exc import SQLAlchemyError
from switchboard.events.v1 import events_service_pb2_grpc

from services.common.config import load_config
from services.common.convert import utcnow
from services.common.db import create_engine, migrate
from services.common.errors import SwitchboardError
from services.common.server import Runtime, ServiceParts, database_ready, run
from services.events.config import EventsConfig
from services.events.domain import DeliverySettings, EventLog, EventsDomain, RetentionSettings
from services.events.metrics import EventsMetrics
from services.events.redis_log import RedisEventLog
from services.events.servicer import SERVICE_NAME, EventsServicer
from services.events.storage import SqlEventLog

MIGRATIONS = Path(__file__).parent / "migrations"

log = logging.getLogger("switchboard.events")


async def open_log(
    config: EventsConfig,
) -> tuple[
    EventLog, Callable[[], Awaitable[bool]], Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]
]:
    """The configured log, with its readiness check, start and close."""
    if config.backend == "redis":
        redis_log = RedisEventLog.from_url(
            config.redis_url, config.redis_prefix, max_connections=config.redis_max_connections
        )
        return redis_log, redis_log.ready, redis_log.start, redis_log.close
    url = config.effective_database_url()
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    engine = create_engine(url)

    async def ready() -> bool:
        return await database_ready(engine)

    async def nothing() -> None:
        return None

    return SqlEventLog(engine), ready, nothing, engine.dispose


async def build(runtime: Runtime) -> ServiceParts:
    config = runtime.config
    assert isinstance(config, EventsConfig)
    event_log, log_ready, start_log, close_log = await open_log(config)
    retention = RetentionSettings(
        max_age=config.retention_max_age_seconds or None,
        settled_age=config.retention_settled_age_seconds or None,
    )
    domain = EventsDomain(
        event_log,
        DeliverySettings(
            max_delivery_attempts=config.max_delivery_attempts,
            heartbeat_seconds=config.heartbeat_seconds,
            batch_size=config.delivery_batch_size,
        ),
        retention=retention,
        # Made here, on the service's loop, where its gauge is read.
        metrics=EventsMetrics(),
    )
    retention_task: asyncio.Task[None] | None = None

    async def retain() -> None:
        while True:
            await asyncio.sleep(config.retention_interval_seconds)
            try:
                await domain.trim(utcnow())
            except (SwitchboardError, SQLAlchemyError) as exc:
                log.warning("retention pass failed; next one later", extra={"error": type(exc).__name__})

    verification = runtime.remote_verification()
    servicer = EventsServicer(domain, verification.verifier)

    def add_to_server(server: grpc.aio.Server) -> Sequence[str]:
        events_service_pb2_grpc.add_EventsServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    async def ready() -> bool:
        return await log_ready() and await verification.ready()

    async def start() -> None:
        nonlocal retention_task
        verification.revocations.start()
        await start_log()
        if retention.max_age is not None or retention.settled_age is not None:
            retention_task = asyncio.create_task(retain(), name="events-retention")

    async def end_subscriptions() -> None:
        # Streams never finish on their own: end them rather than wait out the grace period.
        domain.end_subscriptions()

    async def stop() -> None:
        if retention_task is not None:
            retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention_task
        await verification.revocations.stop()
        await close_log()

    return ServiceParts(
        add_to_server=add_to_server,
        verifier=verification.verifier,
        check_ready=ready,
        on_start=[start],
        on_stopping=[end_subscriptions],
        on_stop=[stop],
    )


def main() -> None:
    run(load_config(EventsConfig), build)


if __name__ == "__main__":
    main()
