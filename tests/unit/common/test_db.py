"""The embedded database's engine: SQLite settings and its connection pool."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from services.common.db import SQLITE_POOL_SIZE, create_engine


async def test_sqlite_connections_are_kept_open_and_reused_under_load(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'pool.db'}")
    opened: list[Any] = []
    event.listen(engine.sync_engine, "connect", lambda connection, record: opened.append(connection))
    at_once = SQLITE_POOL_SIZE - 2  # more than a default pool keeps (5)

    async def burst() -> None:
        all_in = asyncio.Barrier(at_once)

        async def hold() -> None:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
                await all_in.wait()  # every connection is checked out at once

        await asyncio.wait_for(asyncio.gather(*(hold() for _ in range(at_once))), timeout=60)

    try:
        await burst()
        await burst()
        # The second burst found every connection the first one opened.
        assert len(opened) == at_once
    finally:
        await engine.dispose()


async def test_sqlite_connections_use_wal_and_wait_for_the_write_lock(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'settings.db'}")
    try:
        async with engine.connect() as connection:
            settings = {
                name: (await connection.execute(text(f"PRAGMA {name}"))).scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
        # synchronous=1 is NORMAL: in WAL mode a commit survives the process being
        # killed; only an OS crash or power loss can lose the last commits.
        assert settings == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 10000, "foreign_keys": 1}
    finally:
        await engine.dispose()
