"""`python -m services.registry`: wires storage, domain and servicer into the shared server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
from switchboard.registry.v1 import registry_service_pb2_grpc

from services.common.config import load_config
from services.common.db import create_engine, migrate, sessionmaker
from services.common.server import Runtime, ServiceParts, database_ready, run
from services.registry.config import RegistryConfig
from services.registry.domain import Registry
from services.registry.servicer import SERVICE_NAME, RegistryServicer
from services.registry.storage import AgentStorage

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(runtime: Runtime) -> ServiceParts:
    config = runtime.config
    assert isinstance(config, RegistryConfig)
    url = config.effective_database_url()
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    engine = create_engine(url)
    registry = Registry(
        AgentStorage(sessionmaker(engine)),
        idempotency_retention_seconds=config.idempotency_retention_seconds,
    )
    servicer = RegistryServicer(registry)
    verification = runtime.remote_verification()

    def add_to_server(server: grpc.aio.Server) -> Sequence[str]:
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
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
    run(load_config(RegistryConfig), build)


if __name__ == "__main__":
    main()
