"""`python -m services.events`: wires storage, domain and servicer into the shared server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from switchboard.events.v1 import events_service_pb2_grpc

from services.common.config import load_config
from services.common.db import create_engine, migrate
from services.common.server import Runtime, ServiceParts, database_ready, run
from services.events.config import EventsConfig
from services.events.domain import DeliverySettings, EventLog, EventsDomain
from services.events.redis_log import RedisEventLog
from services.events.servicer import SERVICE_NAME, EventsServicer
from services.events.storage import SqlEventLog

MIGRATIONS = Path(__file__).parent / "migrations"


async def open_log(
    config: EventsConfig,
) -> tuple[
    EventLog, Callable[[], Awaitable[bool]], Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]
]:
    """The configured log, with its readiness check, start and close."""
    if config.backend == "redis":
        redis_log = RedisEventLog.from_url(config.redis_url, config.redis_prefix)
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
    domain = EventsDomain(
        event_log,
        DeliverySettings(
            max_delivery_attempts=config.max_delivery_attempts,
            heartbeat_seconds=config.heartbeat_seconds,
            batch_size=config.delivery_batch_size,
        ),
    )
    verification = runtime.remote_verification()
    servicer = EventsServicer(domain, verification.verifier)

    def add_to_server(server: grpc.aio.Server) -> Sequence[str]:
        events_service_pb2_grpc.add_EventsServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    async def ready() -> bool:
        return await log_ready() and await verification.ready()

    async def start() -> None:
        verification.revocations.start()
        await start_log()

    async def stop() -> None:
        await verification.revocations.stop()
        await close_log()

    return ServiceParts(
        add_to_server=add_to_server,
        verifier=verification.verifier,
        check_ready=ready,
        on_start=[start],
        on_stop=[stop],
    )


def main() -> None:
    run(load_config(EventsConfig), build)


if __name__ == "__main__":
    main()
