"""One event log per backend, for tests that must pass on every one of them:
SQLite, PostgreSQL (a fresh schema) and Redis (a fresh key prefix, removed
afterwards: the server is shared, so nothing else is touched). And a Redis of
a test's own, with AOF on, for tests that kill Redis itself."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

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
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_READY_GUARD_SECONDS = 30.0  # loading the AOF back may take a moment on a loaded machine


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


class RedisServer:
    """A redis-server of the test's own on a free port, persisting every write
    to its append-only file before answering it (`appendfsync always`, no
    snapshots): it can be killed with SIGKILL and started again on the same
    directory, as a production Redis with AOF would be."""

    def __init__(self, directory: Path, port: int, binary: str) -> None:
        self.directory = directory
        self.port = port
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def require(cls, directory: Path, port: int) -> RedisServer:
        """Fails in CI (skips elsewhere) when there is no redis-server binary."""
        from tests.conftest import backends_required

        binary = shutil.which("redis-server") or REDIS_SERVER
        if not Path(binary).exists():
            message = f"redis-server is not installed (looked on PATH and at {REDIS_SERVER})"
            if backends_required():
                pytest.fail(message + " (required in CI)")
            pytest.skip(message)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, port, binary)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Starts it (loading the AOF back, if any) and waits until it answers."""
        self._spawn()
        await self._wait_ready()

    def _spawn(self) -> None:
        with (self.directory / "redis.log").open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self._binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--dir", str(self.directory),
                    "--appendonly", "yes",
                    "--appendfsync", "always",
                    "--save", "",
                    "--daemonize", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def _wait_ready(self) -> None:
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            async with asyncio.timeout(REDIS_READY_GUARD_SECONDS):
                while True:
                    if self._process is None or self._process.poll() is not None:
                        raise RuntimeError(f"redis-server exited: {self.log()[-2000:]}")
                    try:
                        # Refused, or LOADING (a ConnectionError too), until the AOF is back in.
                        if await client.ping():
                            return
                    except RedisConnectionError:
                        pass
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the AOF already holds survives."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.asynccontextmanager
async def own_redis_with_aof(directory: Path, port: int) -> AsyncIterator[RedisServer]:
    server = RedisServer.require(directory, port)
    await server.start()
    try:
        yield server
    finally:
        server.stop()


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
