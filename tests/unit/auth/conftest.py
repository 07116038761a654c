"""An auth domain on a fresh SQLite file (see helpers.build_auth)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.db import migrate
from tests.unit.auth.helpers import MIGRATIONS, Auth, build_auth

MakeAuth = Callable[..., Awaitable[Auth]]


@pytest.fixture
async def make_auth(tmp_path: Path) -> AsyncIterator[MakeAuth]:
    """Builds an `Auth`; several calls share the database (like replicas or restarts)."""
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    migrate(url, MIGRATIONS)
    made: list[Auth] = []

    async def make(*args: Any, **kwargs: Any) -> Auth:
        made.append(await build_auth(url, *args, **kwargs))
        return made[-1]

    yield make
    for auth in made:
        await auth.storage.close()


@pytest.fixture
async def auth(make_auth: MakeAuth) -> Auth:
    return await make_auth()
