"""An auth domain over a database, with a cheap Argon2id and a clock the test moves."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import argon2

from services.auth.domain import AuthDomain, Settings
from services.auth.storage import AuthStorage, create_storage
from services.auth.tokens import KeyRing, LocalRevocations, Passwords, TokenIssuer
from services.common.auth import Principal, Role, TokenVerifier

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "auth" / "migrations"
ISSUER, AUDIENCE = "switchboard-auth", "switchboard"
ADMIN_PASSWORD = "admin password 123"
PASSWORD = "a long enough password"
# Long enough that tokens issued at any time the tests move the clock to are
# still unexpired for the (real-time) verifier.
ACCESS_TTL = 6 * 3600.0


class Clock:
    """Starts an hour in the past, so moved-ahead times are not in the future for
    the verifier (which uses the real time)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class CountingHasher(argon2.PasswordHasher):
    """Cheap parameters (tests only) and a count of verifications."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verifications += 1
        return super().verify(hash, password)


@dataclass
class Auth:
    """One auth process's worth of parts over a database."""

    domain: AuthDomain
    storage: AuthStorage
    verifier: TokenVerifier
    hasher: CountingHasher
    clock: Clock
    users: dict[str, Principal] = field(default_factory=dict)

    async def principal(self, token: str) -> Principal:
        return await self.verifier.verify(token)

    async def user(self, username: str, role: Role = Role.USER) -> tuple[Principal, str]:
        """Creates a user (as the admin) and returns its principal and access token."""
        admin = await self.admin()
        await self.domain.create_user(admin, username, PASSWORD, role, "")
        _, tokens = await self.domain.login_with_password(username, PASSWORD)
        return await self.principal(tokens.access_token), tokens.access_token

    async def admin(self) -> Principal:
        if "admin" not in self.users:
            _, tokens = await self.domain.login_with_password("admin", ADMIN_PASSWORD)
            self.users["admin"] = await self.principal(tokens.access_token)
        return self.users["admin"]


async def build_auth(
    url: str,
    clock: Clock | None = None,
    *,
    rotation_seconds: float = 3600.0,
    access_ttl_seconds: float = ACCESS_TTL,
    refresh_ttl_seconds: float = 30 * 24 * 3600.0,
    max_failures: int = 5,
    window_seconds: float = 300.0,
    service_accounts: dict[str, str] | None = None,
    admin_password: str | None = ADMIN_PASSWORD,
) -> Auth:
    """The parts of one auth process over `url` (migrated already); several share a database like replicas."""
    clock = clock or Clock()
    storage = create_storage(url)
    keys = KeyRing(
        storage,
        rotation_seconds=rotation_seconds,
        access_ttl_seconds=access_ttl_seconds,
        check_seconds=min(60.0, rotation_seconds / 4),
        clock=clock,
        min_reload_seconds=0.0,  # the real limit is per second: no waiting in tests
    )
    issuer = TokenIssuer(keys, issuer=ISSUER, audience=AUDIENCE, access_ttl_seconds=access_ttl_seconds)
    revocations = LocalRevocations(storage, clock)
    hasher = CountingHasher()
    domain = AuthDomain(
        storage,
        Passwords(hasher),
        keys,
        issuer,
        revocations,
        Settings(
            refresh_ttl_seconds=refresh_ttl_seconds,
            login_max_failures=max_failures,
            login_failure_window_seconds=window_seconds,
        ),
        clock,
    )
    try:
        await domain.bootstrap("admin", admin_password, service_accounts or {})
        await domain.start_up()
    except BaseException:
        await storage.close()
        raise
    verifier = TokenVerifier(keys, revocations, ISSUER, AUDIENCE)
    return Auth(domain, storage, verifier, hasher, clock)
