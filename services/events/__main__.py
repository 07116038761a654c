"""`python -m services.events`: wires storage, domain and servicer into the shared server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
from switchboard.events.v1 import events_service_pb2_grpc

from services.common.config import load_config
from services.common.db import create_engine, migrate
from services.common.server import Runtime, ServiceParts, database_ready, run
from services.events.config import EventsConfig
from services.events.domain import DeliverySettings, EventsDomain
from services.events.servicer import SERVICE_NAME, EventsServicer
from services.events.storage import SqlEventLog

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(runtime: Runtime) -> ServiceParts:
    config = runtime.config
    assert isinstance(config, EventsConfig)
    url = config.effective_database_url()
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    engine = create_engine(url)
    domain = EventsDomain(
        SqlEventLog(engine),
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
        return await database_ready(engine) and await verification.ready()

    async def start_revocation_feed() -> None:
        verification.revocations.start()

    async def stop() -> None:
        await verification.revocations.stop()
        await engine.dispose()

    return ServiceParts(
        add_to_server=add_to_server,
        verifier=verification.verifier,
        check_ready=ready,
        on_start=[start_revocation_feed],
        on_stop=[stop],
    )


def main() -> None:
    run(load_config(EventsConfig), build)


if __name__ == "__main__":
    main()
