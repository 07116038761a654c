"""A registry on a real SQLite file, with a clock the tests can move."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.common.auth import Principal, Role
from services.common.db import create_engine, migrate, sessionmaker
from services.common.interceptors import AuthenticatedContext
from services.registry.domain import Registry
from services.registry.servicer import RegistryServicer
from services.registry.storage import AgentStorage

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "registry" / "migrations"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def principal(role: Role, user_id: str | None = None) -> Principal:
    return Principal(
        user_id=user_id or f"{role.value}-1",
        username=f"{role.value}-name",
        role=role,
        token_id="jti",
        session_id="sid",
        expires_at=0.0,
    )


def context_of(caller: Principal) -> Any:
    return AuthenticatedContext(object(), caller)  # type: ignore[arg-type]


ADMIN = principal(Role.ADMIN)
SERVICE = principal(Role.SERVICE)
USER = principal(Role.USER)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[AgentStorage]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    engine = create_engine(url)
    yield AgentStorage(sessionmaker(engine))
    await engine.dispose()


@pytest.fixture
def registry(storage: AgentStorage, clock: Clock) -> Registry:
    return Registry(storage, idempotency_retention_seconds=3600, clock=clock)


@pytest.fixture
def servicer(registry: Registry) -> RegistryServicer:
    return RegistryServicer(registry)
