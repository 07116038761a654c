"""SQLAlchemy 2 (async) engines and Alembic migrations, the same for every service.

SQLite (the embedded default) and PostgreSQL (by URL) are both first-class:
`sqlite:///path.db` or `postgresql://user@host:5432/db`. Each service owns its
database and its own migrations folder (`services/<svc>/migrations`), whose
env.py calls `run_alembic_env`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import DateTime, MetaData, event, exc, pool, text
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeDecorator

from services.common.errors import Unavailable

# What a database that is down, restarting or out of connections raises: a
# client may retry these, unlike a bug in a query.
DATABASE_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.TimeoutError,
)


# Connections to one SQLite database per process, all kept open.
SQLITE_POOL_SIZE = 15


def database_unavailable(retry_after: float = 1.0) -> Unavailable:
    return Unavailable(
        "the service's database is unavailable; retry shortly",
        reason="DATABASE_UNAVAILABLE",
        retry_after=retry_after,
    )


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out on every backend: SQLite keeps no zone, so
    values are stored there as naive UTC. A naive value passed in is taken as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _drivers(url: str) -> tuple[URL, URL]:
    """(async URL, sync URL) for one database URL."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite"), parsed.set(drivername="sqlite")
    if backend == "postgresql":
        psycopg = parsed.set(drivername="postgresql+psycopg")
        return psycopg, psycopg
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed during a write; busy_timeout makes writers queue
    # instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    async_url, _ = _drivers(url)
    kwargs: dict[str, Any] = {}
    if is_sqlite(url):
        database = async_url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        if database == ":memory:":
            kwargs["poolclass"] = pool.NullPool
        else:
            # The default pool keeps 5 connections and opens up to 10 more under
            # load, closing each on return: with aiosqlite every such connection
            # is a new thread, a file open and four PRAGMAs. Keep all 15 open
            # instead (the same cap on connections, without the churn).
            kwargs.update(poolclass=pool.AsyncAdaptedQueuePool, pool_size=SQLITE_POOL_SIZE, max_overflow=0)
    else:
        kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
    engine = create_async_engine(async_url, **kwargs)
    if is_sqlite(url):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


def migrate(url: str, migrations_dir: Path) -> None:
    """Bring the database to the newest revision (synchronous; run at start-up)."""
    _, sync_url = _drivers(url)
    if is_sqlite(url) and sync_url.database:
        Path(sync_url.database).parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.attributes["sqlalchemy_url"] = sync_url
    command.upgrade(config, "head")


def run_alembic_env(metadata: MetaData) -> None:
    """The body of every service's migrations/env.py."""
    from sqlalchemy import create_engine as create_sync_engine

    url = context.config.attributes["sqlalchemy_url"]
    engine = create_sync_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
