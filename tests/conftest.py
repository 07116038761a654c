"""Fixtures shared by every test folder.

PostgreSQL and Redis are required in CI (`CI` set, as `.ci/run` does): their
tests fail, not skip, when the servers are unreachable there.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness.suite import Suite, start_suite

POSTGRES_URL = os.environ.get("SWITCHBOARD_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def backends_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("SWITCHBOARD_REQUIRE_BACKENDS") == "1"


def _unreachable(what: str, error: Exception) -> None:
    message = f"{what} is unreachable: {error}"
    if backends_required():
        pytest.fail(message + " (required in CI)")
    pytest.skip(message)


@contextlib.contextmanager
def postgres_schema(name: str = "t") -> Iterator[str]:
    """A fresh schema (`<name>_<random>`) in the `test` database, as a URL whose
    search_path is that schema; dropped with everything in it afterwards."""
    import psycopg

    schema = f"{name}_{uuid.uuid4().hex[:12]}"
    try:
        connection = psycopg.connect(POSTGRES_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        _unreachable("PostgreSQL", exc)
        raise
    with connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
        finally:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the `test` database, dropped afterwards."""
    with postgres_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unreachable("Redis", exc)
    finally:
        client.close()
    return REDIS_URL


# The backends a whole suite can run on: the embedded defaults, and the
# servers CI requires (every service's database on PostgreSQL, events on Redis Streams).
EMBEDDED = "embedded"
POSTGRES_AND_REDIS = "postgres+redis"
SUITE_BACKENDS = [EMBEDDED, pytest.param(POSTGRES_AND_REDIS, marks=[pytest.mark.postgres, pytest.mark.redis])]
# Services with a database of their own (events keeps its log on Redis instead).
DATABASE_SERVICES = ("auth", "registry", "executor")


@contextlib.asynccontextmanager
async def suite_on(backends: str, root: Path, otlp_endpoint: str | None = None) -> AsyncIterator[Suite]:
    """All five services as real processes on `backends` (EMBEDDED or
    POSTGRES_AND_REDIS). On PostgreSQL and Redis, each service with a database
    gets a fresh schema and the events log a fresh Redis key prefix, so that
    parallel runs never meet; schemas and keys are removed afterwards.
    Unreachable servers fail in CI and skip elsewhere."""
    if backends == EMBEDDED:
        async with start_suite(root, otlp_endpoint=otlp_endpoint) as running:
            yield running
        return
    assert backends == POSTGRES_AND_REDIS, backends
    from tests.unit.events.backends import drop_redis_prefix, redis_environment, redis_prefix, require_redis

    redis_url, prefix = require_redis(), redis_prefix()
    with contextlib.ExitStack() as schemas:
        database_urls = {
            service: schemas.enter_context(postgres_schema(service)) for service in DATABASE_SERVICES
        }
        try:
            async with start_suite(
                root,
                env={"events": redis_environment(redis_url, prefix)},
                database_urls=database_urls,
                otlp_endpoint=otlp_endpoint,
            ) as running:
                yield running
        finally:
            await drop_redis_prefix(redis_url, prefix)


@pytest.fixture(scope="session")
async def suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    """All five services as real processes on SQLite, shared by a test session."""
    async with start_suite(tmp_path_factory.mktemp("suite")) as running:
        yield running
