"""Fixtures for the events service's unit tests: a migrated SQLite log, a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.db import create_engine, migrate
from services.events.__main__ import MIGRATIONS
from services.events.domain import DeliverySettings, EventsDomain
from services.events.storage import SqlEventLog
from tests.unit.events.helpers import FakeClock


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[SqlEventLog]:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    engine = create_engine(url)
    yield SqlEventLog(engine)
    await engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings() -> DeliverySettings:
    return DeliverySettings(max_delivery_attempts=3, heartbeat_seconds=10.0, batch_size=100)


@pytest.fixture
def domain(log: SqlEventLog, settings: DeliverySettings, clock: FakeClock) -> EventsDomain:
    return EventsDomain(log, settings, clock)
