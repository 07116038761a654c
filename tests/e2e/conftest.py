"""Every end-to-end test that uses the `suite` runs twice: on the embedded
defaults (SQLite, the embedded event log) and on the servers CI requires
(each service's database on PostgreSQL, events on Redis Streams)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import SUITE_BACKENDS, suite_on
from tests.harness.suite import Suite


@pytest.fixture(scope="package", params=SUITE_BACKENDS)
async def suite(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    """The suite on one set of backends, shared by this folder's tests (pytest
    runs them all on one set, then all on the next)."""
    backends: str = request.param
    async with suite_on(backends, tmp_path_factory.mktemp(f"suite-{backends.replace('+', '-')}")) as running:
        yield running
