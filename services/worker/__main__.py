"""`python -m services.worker`: the built-in agents behind the shared server,
registered in the registry once serving."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from switchboard.registry.v1 import registry_service_pb2_grpc

from services.common.channels import ServiceCredentials
from services.common.config import load_config
from services.common.server import Runtime, ServiceParts, run
from services.worker import servicer
from services.worker.agents import build_worker
from services.worker.config import WorkerConfig
from services.worker.registration import Registration


async def build(runtime: Runtime) -> ServiceParts:
    config = runtime.config
    assert isinstance(config, WorkerConfig)
    worker = build_worker(heartbeat_interval=config.heartbeat_interval_seconds)
    verification = runtime.remote_verification()
    registration = Registration(
        worker,
        registry_service_pb2_grpc.RegistryServiceStub(runtime.channels.get(config.registry_address)),  # type: ignore[arg-type]
        ServiceCredentials(runtime.auth_stub(), config.service_username, config.service_password),
        config.effective_advertise_address(),
        initial_backoff=config.registration_initial_backoff_seconds,
        max_backoff=config.registration_max_backoff_seconds,
    )

    def add_to_server(server: grpc.aio.Server) -> Sequence[str]:
        return servicer.add_to_server(worker, server)

    async def ready() -> bool:
        return registration.done.is_set() and await verification.ready()

    async def start_revocation_feed() -> None:
        verification.revocations.start()

    async def stop() -> None:
        await registration.stop()
        await verification.revocations.stop()

    return ServiceParts(
        add_to_server=add_to_server,
        verifier=verification.verifier,
        check_ready=ready,
        on_start=[start_revocation_feed, registration.start],
        on_stop=[stop],
    )


def main() -> None:
    run(load_config(WorkerConfig), build)


if __name__ == "__main__":
    main()
