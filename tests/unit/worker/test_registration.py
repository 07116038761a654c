"""The built-in worker registers its agents with its own service token,
retrying until the registry answers, and re-registers without failing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.registry.v1 import registry_service_pb2_grpc

from services.common.auth import Principal, Role, TokenVerifier
from services.common.db import create_engine, migrate, sessionmaker
from services.common.pagination import PageRequest, page_request
from services.common.server import ServiceParts, build_interceptors
from services.registry.domain import Registry
from services.registry.servicer import RegistryServicer
from services.registry.storage import AgentStorage
from services.worker.agents import build_worker
from services.worker.registration import Registration
from tests.harness.suite import free_port
from tests.unit.common.keys import AUDIENCE, ISSUER, Keys, Revocations

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "registry" / "migrations"
ADMIN = Principal("admin-1", "admin", Role.ADMIN, "jti", "sid", 0.0)


class ServiceToken:
    """Stands in for ServiceCredentials (which would log in at the auth service)."""

    def __init__(self, keys: Keys, kid: str) -> None:
        self.keys, self.kid = keys, kid
        self.calls = 0
        self.retried = asyncio.Event()

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        self.calls += 1
        if self.calls >= 2:
            self.retried.set()
        token = self.keys.sign(self.kid, sub="svc-worker-id", name="svc-worker", role="service")
        return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    engine = create_engine(url)
    yield Registry(AgentStorage(sessionmaker(engine)), idempotency_retention_seconds=3600)
    await engine.dispose()


async def start_registry_server(registry: Registry, keys: Keys, port: int) -> grpc.aio.Server:
    async def ready() -> bool:
        return True

    parts = ServiceParts(
        add_to_server=lambda server: [],
        verifier=TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE),
        check_ready=ready,
    )
    server = grpc.aio.server(interceptors=build_interceptors(parts))
    registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(registry), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def test_registration_retries_until_the_registry_answers_and_survives_restarts(
    registry: Registry,
) -> None:
    keys = Keys()
    token = ServiceToken(keys, keys.add())
    port = free_port()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub: Any = registry_service_pb2_grpc.RegistryServiceStub(channel)
    worker = build_worker()
    registration = build_registration(worker, stub, token)
    server = None
    try:
        await registration.start()
        await asyncio.wait_for(token.retried.wait(), timeout=10)  # it failed once and tried again
        assert not registration.done.is_set()
        server = await start_registry_server(registry, keys, port)
        await asyncio.wait_for(registration.done.wait(), timeout=10)

        stored = await registry.get(ADMIN, "text-stats")
        assert stored.definition.endpoint == "10.1.2.3:50055"
        assert stored.definition.tools == ("word_count",)
        assert stored.definition.input_schema["required"] == ["text"]
        assert "INVALID_INPUT" in stored.definition.retry_policy.non_retryable_reasons
        assert {a.name for a in (await registry.list(ADMIN, _first_page()))[0]} == set(worker.agents)

        # An admin tunes a limit live and someone edits the description.
        tuned = dataclasses.replace(stored.definition, max_concurrency=2, description="edited")
        await registry.update(ADMIN, "text-stats", tuned, ["max_concurrency", "description"], "")

        # A restarted worker registers again: no failure, its own fields restored, the tuning kept.
        await build_registration(worker, stub, token).register_once()
        again = await registry.get(ADMIN, "text-stats")
        assert again.definition.description == worker.agents["text-stats"].description
        assert again.definition.max_concurrency == 2
    finally:
        await registration.stop()
        await channel.close(None)
        if server is not None:
            await server.stop(None)


def build_registration(worker: Any, stub: Any, token: ServiceToken) -> Registration:
    return Registration(worker, stub, token, "10.1.2.3:50055", initial_backoff=0.02, max_backoff=0.1)  # type: ignore[arg-type]


def _first_page() -> PageRequest:
    return page_request(0, "", default=100, maximum=1000)


async def test_a_user_token_cannot_register(registry: Registry) -> None:
    keys = Keys()
    kid = keys.add()
    port = free_port()
    server = await start_registry_server(registry, keys, port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = registry_service_pb2_grpc.RegistryServiceStub(channel)
            user = (("authorization", f"Bearer {keys.sign(kid, role='user')}"),)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await build_worker().register(stub, "127.0.0.1:50055", user)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (await registry.list(ADMIN, _first_page()))[0] == []
    finally:
        await server.stop(None)
