"""The suite under test, as real processes (tests/harness/suite.py, the code
`make up` uses), on one of two backend sets:

- "embedded": the defaults (SQLite for every service, the embedded event log);
- "postgres+redis": every service's database in a fresh PostgreSQL schema, the
  event log on Redis Streams under a fresh key prefix; both removed afterwards
  (the servers are the tests': SWITCHBOARD_TEST_POSTGRES_URL and _REDIS_URL).

Tracing is on (spans to the suite's JSON-lines file, the default) unless asked
off, which sets the SDK's standard OTEL_SDK_DISABLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from services.launcher import SERVICES
from tests.conftest import (
    DATABASE_SERVICES,
    EMBEDDED,
    POSTGRES_AND_REDIS,
    POSTGRES_URL,
    REDIS_URL,
    postgres_schema,
)
from tests.harness.suite import Suite, start_suite
from tests.unit.events.backends import drop_redis_prefix, redis_environment

BACKEND_SETS = (EMBEDDED, POSTGRES_AND_REDIS)

# Logins are not measured: a cheap Argon2 saves the minute that 100 users'
# hashes would take. Tokens outlive the longest bench (the soak).
AUTH_SETTINGS = {
    "SWITCHBOARD_AUTH_ARGON2_TIME_COST": "1",
    "SWITCHBOARD_AUTH_ARGON2_MEMORY_KIB": "1024",
    "SWITCHBOARD_AUTH_ARGON2_PARALLELISM": "1",
    "SWITCHBOARD_AUTH_ACCESS_TOKEN_TTL_SECONDS": str(6 * 3600),
}
USER_PASSWORD = "bench password, not a secret"


@dataclass(frozen=True)
class BenchUser:
    username: str
    user_id: str
    token: str


@dataclass
class BenchSuite:
    """A running suite with its bench users and the service token that may Publish."""

    label: str
    backends: str
    tracing: bool
    suite: Suite
    users: list[BenchUser]
    service_token: str

    def pid(self, service: str) -> int:
        process = self.suite.processes[service].process
        assert process is not None, f"{service} is not running"
        return process.pid


def postgres_problem() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return f"PostgreSQL at {POSTGRES_URL} is unreachable ({exc}); set SWITCHBOARD_TEST_POSTGRES_URL"
    return None


def redis_problem() -> str | None:
    """None if Redis answers, else why not."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is unreachable ({exc}); set SWITCHBOARD_TEST_REDIS_URL"
    finally:
        client.close()
    return None


async def create_users(suite: Suite, count: int, concurrency: int = 8) -> list[BenchUser]:
    admin_token = await suite.admin_token()
    from switchboard.auth.v1 import auth_service_pb2, user_pb2

    gate = asyncio.Semaphore(concurrency)

    async def create(index: int) -> BenchUser:
        username = f"bench-user-{index:04d}"
        async with gate:
            response = await suite.auth_stub().CreateUser(
                auth_service_pb2.CreateUserRequest(
                    username=username, password=USER_PASSWORD, role=user_pb2.ROLE_USER
                ),
                metadata=suite.metadata(admin_token),
                timeout=60,
            )
            token = await suite.login(username, USER_PASSWORD)
        return BenchUser(username, response.user.user_id, token)

    return list(await asyncio.gather(*(create(index) for index in range(count))))


@contextlib.asynccontextmanager
async def bench_suite(
    root: Path, backends: str, tracing: bool = True, users: int = 0, label: str = ""
) -> AsyncIterator[BenchSuite]:
    """The whole suite on `backends`, with `users` bench users; stopped and its
    schemas and keys removed afterwards."""
    env: dict[str, dict[str, str]] = {service: {} for service in SERVICES}
    env["auth"].update(AUTH_SETTINGS)
    if not tracing:
        for service in SERVICES:
            env[service]["OTEL_SDK_DISABLED"] = "true"
    label = label or (backends if tracing else f"{backends}, tracing off")
    with contextlib.ExitStack() as stack:
        database_urls: dict[str, str] = {}
        redis_prefix = ""
        if backends == POSTGRES_AND_REDIS:
            database_urls = {
                service: stack.enter_context(postgres_schema(f"bench_{service}"))
                for service in DATABASE_SERVICES
            }
            redis_prefix = f"bench:events:{uuid.uuid4().hex}:"
            env["events"].update(redis_environment(REDIS_URL, redis_prefix))
        try:
            async with start_suite(root, env=env, database_urls=database_urls) as suite:
                service_token = await suite.login("svc-executor", suite.service_password("executor"))
                bench_users = await create_users(suite, users)
                yield BenchSuite(label, backends, tracing, suite, bench_users, service_token)
        finally:
            if redis_prefix:
                await drop_redis_prefix(REDIS_URL, redis_prefix)
