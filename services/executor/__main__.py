"""`python -m services.executor`: wires storage, clients, the run use cases
and the servicer; owns no logic."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from switchboard.events.v1 import events_service_pb2_grpc
from switchboard.executor.v1 import executor_service_pb2_grpc
from switchboard.registry.v1 import registry_service_pb2_grpc

from services.common.channels import ServiceCredentials
from services.common.config import load_config
from services.common.db import create_engine, migrate
from services.common.server import Runtime, ServiceParts, database_ready, run
from services.executor.admission import AdmissionLimits
from services.executor.breaker import BreakerRegistry, BreakerSettings, BreakerState
from services.executor.clients import CachedAgents, GrpcEventPublisher, GrpcWorkers, RegistryAgents
from services.executor.config import ExecutorConfig
from services.executor.domain import ExecutorSettings
from services.executor.journal import RunJournal, RunSignals
from services.executor.outbox import OutboxRelay
from services.executor.runner import Runner
from services.executor.runs import RunService
from services.executor.servicer import ExecutorServicer, service_names
from services.executor.storage import SqlRunStore

MIGRATIONS = Path(__file__).parent / "migrations"

log = logging.getLogger("switchboard.executor.breaker")
replica_log = logging.getLogger("switchboard.executor")


def settings_of(config: ExecutorConfig) -> ExecutorSettings:
    return ExecutorSettings(
        default_run_timeout_seconds=config.default_run_timeout_seconds,
        max_run_timeout_seconds=config.max_run_timeout_seconds,
        publish_wait_seconds=config.publish_wait_seconds,
        wait_run_default_seconds=config.wait_run_default_seconds,
        max_queued_runs_per_user=config.max_queued_runs_per_user,
        queue_full_retry_after_seconds=config.queue_full_retry_after_seconds,
    )


def breakers_of(config: ExecutorConfig) -> BreakerRegistry:
    def report(endpoint: str, old: BreakerState, new: BreakerState) -> None:
        log.warning("circuit breaker changed state", extra={"endpoint": endpoint, "from": old, "to": new})

    return BreakerRegistry(
        BreakerSettings(
            failure_threshold=config.breaker_failure_threshold,
            reset_timeout_seconds=config.breaker_reset_timeout_seconds,
            half_open_max_calls=config.breaker_half_open_max_calls,
            success_threshold=config.breaker_success_threshold,
        ),
        on_transition=report,
    )


async def build(runtime: Runtime) -> ServiceParts:
    config = runtime.config
    assert isinstance(config, ExecutorConfig)
    url = config.effective_database_url()
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    replica_id = config.effective_replica_id()
    store = SqlRunStore(create_engine(url), replica_id=replica_id, lease_seconds=config.lease_seconds)
    replica_log.info(
        "executor replica", extra={"replica_id": replica_id, "lease_seconds": config.lease_seconds}
    )

    verification = runtime.remote_verification()
    credentials = ServiceCredentials(runtime.auth_stub(), config.service_username, config.service_password)
    registry = registry_service_pb2_grpc.RegistryServiceStub(runtime.channels.get(config.registry_address))
    events = events_service_pb2_grpc.EventsServiceStub(runtime.channels.get(config.events_address))
    agents = CachedAgents(
        RegistryAgents(registry, credentials, config.registry_call_timeout_seconds),
        config.agent_cache_seconds,
    )
    relay = OutboxRelay(
        store,
        GrpcEventPublisher(events, credentials, config.publish_call_timeout_seconds),
        batch_size=config.outbox_batch_size,
        poll_seconds=config.outbox_poll_seconds,
        initial_backoff_seconds=config.outbox_initial_backoff_seconds,
        max_backoff_seconds=config.outbox_max_backoff_seconds,
    )
    signals = RunSignals()
    journal = RunJournal(store, signals, relay.notify)
    runs = RunService(
        store=store,
        journal=journal,
        signals=signals,
        agents=agents,
        runner=Runner(
            store,
            journal,
            agents,
            GrpcWorkers(runtime.channels, credentials),
            breakers=breakers_of(config),
            compensation_timeout_seconds=config.compensation_timeout_seconds,
        ),
        limits=AdmissionLimits(config.max_active_runs, config.max_active_runs_per_user),
        published=relay,
        settings=settings_of(config),
        admission_poll_seconds=config.admission_poll_seconds,
        lease_seconds=config.lease_seconds,
    )
    # Before serving: the attempts that a previous life of this replica, or a
    # replica that is gone, left running are marked interrupted before
    # anything starts; they resume (retried per policy) in `start`.
    await runs.recover()

    async def credentials_work() -> bool:
        try:
            await credentials.token()
        except grpc.aio.AioRpcError:
            return False
        return True

    async def ready() -> bool:
        return await database_ready(store.engine) and await verification.ready() and await credentials_work()

    async def start() -> None:
        verification.revocations.start()
        relay.start()
        await runs.start()

    async def stop() -> None:
        await runs.stop()
        await relay.stop()
        await verification.revocations.stop()
        await store.close()

    def add_to_server(server: grpc.aio.Server) -> list[str]:
        executor_service_pb2_grpc.add_ExecutorServiceServicer_to_server(
            ExecutorServicer(runs, settings_of(config)), server
        )
        return service_names()

    return ServiceParts(
        add_to_server=add_to_server,
        verifier=verification.verifier,
        check_ready=ready,
        on_start=[start],
        on_stop=[stop],
    )


def main() -> None:
    run(load_config(ExecutorConfig), build)


if __name__ == "__main__":
    main()
