"""Fixtures for the events service's unit tests: the log on every backend, a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.events.domain import DeliverySettings, EventLog, EventsDomain
from services.events.storage import SqlEventLog
from tests.unit.events.backends import BACKENDS, open_event_log, sql_log
from tests.unit.events.helpers import FakeClock


@pytest.fixture(params=BACKENDS)
async def log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventLog]:
    """The same domain tests run on SQLite, PostgreSQL and Redis."""
    async with open_event_log(request.param, request, tmp_path) as opened:
        yield opened


@pytest.fixture
async def sqlite_log(tmp_path: Path) -> AsyncIterator[SqlEventLog]:
    """For tests of what sits above the log (the servicer): one backend is enough."""
    async with sql_log(f"sqlite:///{tmp_path / 'events.db'}") as opened:
        yield opened


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings() -> DeliverySettings:
    return DeliverySettings(max_delivery_attempts=3, heartbeat_seconds=10.0, batch_size=100)


@pytest.fixture
def domain(log: EventLog, settings: DeliverySettings, clock: FakeClock) -> EventsDomain:
    return EventsDomain(log, settings, clock)
