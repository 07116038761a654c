"""One event log per backend, for tests that must pass on every one of them:
SQLite, PostgreSQL (a fresh schema) and Redis (a fresh key prefix, removed
afterwards: the server is shared, so nothing else is touched)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.common.db import create_engine, migrate
from services.events.__main__ import MIGRATIONS
from services.events.domain import EventLog
from services.events.redis_log import RedisEventLog
from services.events.storage import SqlEventLog

BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("redis", marks=pytest.mark.redis),
]
LISTEN_GUARD_SECONDS = 10.0  # a hang fails instead of stalling; nothing is timed


def require_redis() -> str:
    """The Redis URL, for fixtures wider than a test (which cannot use `redis_url`):
    unreachable fails in CI and skips elsewhere, as `redis_url` does."""
    import redis

    from tests.conftest import REDIS_URL, backends_required

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"Redis is unreachable: {exc}"
        if backends_required():
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)
    finally:
        client.close()
    return REDIS_URL


def redis_environment(url: str, prefix: str) -> dict[str, str]:
    """The events service's settings for the Redis backend."""
    return {
        "SWITCHBOARD_EVENTS_BACKEND": "redis",
        "SWITCHBOARD_EVENTS_REDIS_URL": url,
        "SWITCHBOARD_EVENTS_REDIS_PREFIX": prefix,
    }


def redis_prefix() -> str:
    return f"test:events:{uuid.uuid4().hex}:"


async def drop_redis_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def started(log: RedisEventLog) -> RedisEventLog:
    """Starts the log's signal listener and waits until it hears."""
    await log.start()
    await asyncio.wait_for(log.listening(), LISTEN_GUARD_SECONDS)
    return log


@contextlib.asynccontextmanager
async def redis_logs(url: str, count: int = 1) -> AsyncIterator[list[RedisEventLog]]:
    """`count` logs on one fresh prefix, as replicas would share it."""
    prefix = redis_prefix()
    logs = [await started(RedisEventLog.from_url(url, prefix)) for _ in range(count)]
    try:
        yield logs
    finally:
        for log in logs:
            await log.close()
        await drop_redis_prefix(url, prefix)


@contextlib.asynccontextmanager
async def sql_log(url: str) -> AsyncIterator[SqlEventLog]:
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    engine = create_engine(url)
    try:
        yield SqlEventLog(engine)
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def open_event_log(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[EventLog]:
    if backend == "redis":
        async with redis_logs(request.getfixturevalue("redis_url")) as (log,):
            yield log
        return
    if backend == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / f'events-{uuid.uuid4().hex[:8]}.db'}"
    async with sql_log(url) as log:
        yield log
