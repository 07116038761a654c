"""The auth service's tables and the queries on them (SQLite and PostgreSQL).

The domain runs its rules inside `AuthStorage.transaction()`, calling the
small, single-purpose queries of `Transaction`. Secrets are never stored: only
Argon2id password hashes and SHA-256 hashes of API-key secrets and refresh tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.common import db
from services.common.db import UtcDateTime

# An ever-increasing sequence: BIGINT on PostgreSQL; on SQLite an INTEGER primary
# key with AUTOINCREMENT, so a deleted (pruned) top row's number is never reused.
Sequence = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    # Idempotency of CreateUser: one user per (creating admin, request_id).
    Column("created_by", String(36), nullable=True),
    Column("request_id", String(128), nullable=True),
    UniqueConstraint("created_by", "request_id", name="uq_users_created_by_request_id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False),
    Column("display_name", String(100), nullable=False),
    # SHA-256 (hex) of the secret part: the secret is 32 random bytes, so a fast
    # hash is as strong as a slow one here.
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=True),
    Column("revoked_at", UtcDateTime(), nullable=True),
    Column("last_used_at", UtcDateTime(), nullable=True),
    Column("request_id", String(128), nullable=True),
    UniqueConstraint("user_id", "request_id", name="uq_api_keys_user_id_request_id"),
    Index("ix_api_keys_user_id_created_at", "user_id", "created_at", "id"),
)

# A session is one refresh-token family: its id is the `sid` of every token of it.
sessions = Table(
    "sessions",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id"), nullable=False),
    # Set when the session was opened with an API key: revoking the key ends it.
    Column("api_key_id", String(32), nullable=True, index=True),
    Column("created_at", UtcDateTime(), nullable=False),
    # When its newest refresh token expires; after that the session is dead.
    Column("expires_at", UtcDateTime(), nullable=False, index=True),
    Column("revoked_at", UtcDateTime(), nullable=True),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    # SHA-256 (hex) of the opaque token: the token itself is never stored.
    Column("token_hash", String(64), primary_key=True),
    Column("session_id", String(36), ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", String(36), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    # Spent by a refresh (each token works once); presenting it again revokes the family.
    Column("spent_at", UtcDateTime(), nullable=True),
    Column("revoked_at", UtcDateTime(), nullable=True),
    Index("ix_refresh_tokens_session_id", "session_id"),
)

# Private keys live in the auth database for now (fine for a first version; a
# KMS or an encrypted column would keep them away from database backups).
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(32), primary_key=True),
    # Raw Ed25519 private key, base64.
    Column("private_key", Text(), nullable=False),
    # Raw public key, base64url without padding (the JWK's `x`).
    Column("public_x", String(64), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    # When a newer key took over signing.
    Column("retired_at", UtcDateTime(), nullable=True),
    # Published in the JWKS until then: every token it signed has expired by then.
    Column("verify_until", UtcDateTime(), nullable=True),
)

revocations = Table(
    "revocations",
    metadata,
    Column("sequence", Sequence, primary_key=True, autoincrement=True),
    Column("token_id", String(64), nullable=True),
    Column("session_id", String(36), nullable=True),
    # After this every token the entry names has expired; then it is pruned.
    Column("expires_at", UtcDateTime(), nullable=False, index=True),
    Column("created_at", UtcDateTime(), nullable=False),
    sqlite_autoincrement=True,
)

# One row per password login attempt that was not refused; a success deletes the
# username's rows. Kept in the database so restarts and replicas agree.
login_attempts = Table(
    "login_attempts",
    metadata,
    Column("id", Sequence, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False),
    Column("attempted_at", UtcDateTime(), nullable=False),
    Index("ix_login_attempts_username_attempted_at", "username", "attempted_at"),
    sqlite_autoincrement=True,
)


@dataclass(frozen=True, slots=True)
class UserRow:
    id: str
    username: str
    role: str
    password_hash: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    user_id: str
    display_name: str
    secret_hash: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    user_id: str
    api_key_id: str | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class RefreshTokenRow:
    token_hash: str
    session_id: str
    user_id: str
    created_at: datetime
    expires_at: datetime
    spent_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class SigningKeyRow:
    kid: str
    private_key: str
    public_x: str
    created_at: datetime
    retired_at: datetime | None
    verify_until: datetime | None


@dataclass(frozen=True, slots=True)
class RevocationRow:
    sequence: int
    token_id: str | None
    session_id: str | None
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class PruneCounts:
    revocations: int
    login_attempts: int
    sessions: int
    signing_keys: int


class Conflict(Exception):
    """A write broke a uniqueness rule (e.g. two concurrent creates); the
    transaction was rolled back and may be retried."""


def _row(cls: Any, row: Any) -> Any:
    return cls(**{name: row._mapping[name] for name in cls.__slots__})


def _columns(record: Any) -> dict[str, Any]:
    """A row dataclass as column values: its fields are named as the columns."""
    return {name: getattr(record, name) for name in record.__slots__}


class Transaction:
    """The queries of one database transaction."""

    def __init__(self, session: AsyncSession, postgres: bool) -> None:
        self._session = session
        self._postgres = postgres

    async def _first(self, cls: Any, query: Any) -> Any:
        row = (await self._session.execute(query)).first()
        return _row(cls, row) if row else None

    async def _lock_table(self, table: Table) -> None:
        # PostgreSQL only: serialises writers of `table` until commit (readers
        # are not blocked). SQLite writers are serialised already.
        if self._postgres:
            await self._session.execute(text(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE"))

    # --- users ---------------------------------------------------------------

    async def get_user(self, user_id: str) -> UserRow | None:
        return await self._first(UserRow, select(users).where(users.c.id == user_id))

    async def get_user_by_username(self, username: str) -> UserRow | None:
        return await self._first(UserRow, select(users).where(users.c.username == username))

    async def find_user_by_request(self, created_by: str, request_id: str) -> UserRow | None:
        return await self._first(
            UserRow, select(users).where(users.c.created_by == created_by, users.c.request_id == request_id)
        )

    async def admin_exists(self) -> bool:
        found = await self._session.execute(select(users.c.id).where(users.c.role == "admin").limit(1))
        return found.first() is not None

    async def insert_user(self, user: UserRow, created_by: str | None, request_id: str | None) -> None:
        await self._session.execute(
            insert(users).values(
                id=user.id,
                username=user.username,
                role=user.role,
                password_hash=user.password_hash,
                created_at=user.created_at,
                created_by=created_by,
                request_id=request_id,
            )
        )

    async def update_user(self, user_id: str, *, password_hash: str, role: str) -> None:
        await self._session.execute(
            update(users).where(users.c.id == user_id).values(password_hash=password_hash, role=role)
        )

    # --- API keys ------------------------------------------------------------

    async def insert_api_key(self, key: ApiKeyRow) -> None:
        await self._session.execute(insert(api_keys).values(_columns(key)))

    async def get_api_key(self, api_key_id: str) -> ApiKeyRow | None:
        return await self._first(ApiKeyRow, select(api_keys).where(api_keys.c.id == api_key_id))

    async def find_api_key_by_request(self, user_id: str, request_id: str) -> ApiKeyRow | None:
        return await self._first(
            ApiKeyRow,
            select(api_keys).where(api_keys.c.user_id == user_id, api_keys.c.request_id == request_id),
        )

    async def list_api_keys(
        self, user_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[ApiKeyRow]:
        query = select(api_keys).where(api_keys.c.user_id == user_id)
        if after is not None:
            created, key_id = after
            query = query.where(
                or_(
                    api_keys.c.created_at > created,
                    and_(api_keys.c.created_at == created, api_keys.c.id > key_id),
                )
            )
        query = query.order_by(api_keys.c.created_at, api_keys.c.id).limit(limit)
        return [_row(ApiKeyRow, row) for row in await self._session.execute(query)]

    async def revoke_api_key(self, api_key_id: str, now: datetime) -> None:
        await self._session.execute(
            update(api_keys)
            .where(api_keys.c.id == api_key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )

    async def touch_api_key(self, api_key_id: str, now: datetime) -> None:
        await self._session.execute(
            update(api_keys).where(api_keys.c.id == api_key_id).values(last_used_at=now)
        )

    # --- sessions and refresh tokens -----------------------------------------

    async def insert_session(self, session: SessionRow) -> None:
        await self._session.execute(insert(sessions).values(_columns(session)))

    async def get_session(self, session_id: str, *, for_update: bool = False) -> SessionRow | None:
        """With `for_update`, refreshes and revocations of the session serialise
        on its row (PostgreSQL; SQLite writers are serialised anyway)."""
        query = select(sessions).where(sessions.c.id == session_id)
        if for_update:
            query = query.with_for_update()
        row = (await self._session.execute(query)).first()
        return _row(SessionRow, row) if row else None

    async def extend_session(self, session_id: str, expires_at: datetime) -> None:
        await self._session.execute(
            update(sessions).where(sessions.c.id == session_id).values(expires_at=expires_at)
        )

    async def active_sessions_of_api_key(self, api_key_id: str, now: datetime) -> list[SessionRow]:
        query = select(sessions).where(
            sessions.c.api_key_id == api_key_id, sessions.c.revoked_at.is_(None), sessions.c.expires_at > now
        )
        return [_row(SessionRow, row) for row in await self._session.execute(query)]

    async def revoke_session(self, session_id: str, now: datetime) -> None:
        """Marks the session and every refresh token of it revoked."""
        await self._session.execute(
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        await self._session.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.session_id == session_id, refresh_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )

    async def insert_refresh_token(self, token: RefreshTokenRow) -> None:
        await self._session.execute(insert(refresh_tokens).values(_columns(token)))

    async def get_refresh_token(self, token_hash: str) -> RefreshTokenRow | None:
        return await self._first(
            RefreshTokenRow, select(refresh_tokens).where(refresh_tokens.c.token_hash == token_hash)
        )

    async def spend_refresh_token(self, token_hash: str, now: datetime) -> bool:
        """True when this call spent the token; False when it was spent or revoked already."""
        result = await self._session.execute(
            update(refresh_tokens)
            .where(
                refresh_tokens.c.token_hash == token_hash,
                refresh_tokens.c.spent_at.is_(None),
                refresh_tokens.c.revoked_at.is_(None),
            )
            .values(spent_at=now)
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    # --- the revocation feed -------------------------------------------------

    async def add_revocation(
        self, *, token_id: str | None, session_id: str | None, expires_at: datetime, now: datetime
    ) -> RevocationRow:
        # Sequence numbers must become visible in order, or a poller that has
        # seen N+1 would skip N forever: writers take turns until commit.
        await self._lock_table(revocations)
        result = await self._session.execute(
            insert(revocations)
            .values(token_id=token_id, session_id=session_id, expires_at=expires_at, created_at=now)
            .returning(revocations.c.sequence)
        )
        return RevocationRow(int(result.scalar_one()), token_id, session_id, expires_at)

    async def list_revocations(
        self, after_sequence: int, limit: int, now: datetime
    ) -> tuple[list[RevocationRow], int]:
        """Unexpired revocations after `after_sequence`, and the sequence to resume after."""
        # Read the top first: every entry up to it is committed (see add_revocation).
        top = (await self._session.execute(select(func.max(revocations.c.sequence)))).scalar_one_or_none()
        top = max(int(top or 0), after_sequence)
        query = (
            select(revocations)
            .where(
                revocations.c.sequence > after_sequence,
                revocations.c.sequence <= top,
                revocations.c.expires_at > now,
            )
            .order_by(revocations.c.sequence)
            .limit(limit)
        )
        rows = [_row(RevocationRow, row) for row in await self._session.execute(query)]
        last = rows[-1].sequence if len(rows) == limit else top
        return rows, last

    # --- signing keys --------------------------------------------------------

    async def lock_signing_keys(self) -> None:
        """Replicas rotating at once take turns, so only one new key is made."""
        await self._lock_table(signing_keys)

    async def list_signing_keys(self, now: datetime) -> list[SigningKeyRow]:
        """Every key still valid for verification, oldest first."""
        query = (
            select(signing_keys)
            .where(or_(signing_keys.c.verify_until.is_(None), signing_keys.c.verify_until > now))
            .order_by(signing_keys.c.created_at, signing_keys.c.kid)
        )
        return [_row(SigningKeyRow, row) for row in await self._session.execute(query)]

    async def insert_signing_key(self, key: SigningKeyRow) -> None:
        await self._session.execute(insert(signing_keys).values(_columns(key)))

    async def retire_signing_keys(self, now: datetime, verify_until: datetime) -> None:
        """Retires every key still signing."""
        await self._session.execute(
            update(signing_keys)
            .where(signing_keys.c.retired_at.is_(None))
            .values(retired_at=now, verify_until=verify_until)
        )

    # --- login attempts ------------------------------------------------------

    async def add_login_attempt(self, username: str, now: datetime) -> int:
        result = await self._session.execute(
            insert(login_attempts).values(username=username, attempted_at=now).returning(login_attempts.c.id)
        )
        return int(result.scalar_one())

    async def login_attempt_times(self, username: str, since: datetime) -> list[tuple[int, datetime]]:
        """(id, time) of the username's attempts since `since`, oldest first."""
        query = (
            select(login_attempts.c.id, login_attempts.c.attempted_at)
            .where(login_attempts.c.username == username, login_attempts.c.attempted_at > since)
            .order_by(login_attempts.c.attempted_at, login_attempts.c.id)
        )
        return [(int(row.id), row.attempted_at) for row in await self._session.execute(query)]

    async def delete_login_attempt(self, attempt_id: int) -> None:
        await self._session.execute(delete(login_attempts).where(login_attempts.c.id == attempt_id))

    async def clear_login_attempts(self, username: str) -> None:
        await self._session.execute(delete(login_attempts).where(login_attempts.c.username == username))

    # --- clean-up ------------------------------------------------------------

    async def prune(self, now: datetime, attempts_before: datetime) -> PruneCounts:
        """Deletes what can no longer matter: expired revocations and sessions
        (with their refresh tokens), old login attempts, keys past verification."""
        counts = []
        dead_sessions = select(sessions.c.id).where(sessions.c.expires_at <= now).scalar_subquery()
        await self._session.execute(
            delete(refresh_tokens).where(refresh_tokens.c.session_id.in_(dead_sessions))
        )
        for statement in (
            delete(revocations).where(revocations.c.expires_at <= now),
            delete(login_attempts).where(login_attempts.c.attempted_at <= attempts_before),
            delete(sessions).where(sessions.c.expires_at <= now),
            delete(signing_keys).where(signing_keys.c.verify_until <= now),
        ):
            result = await self._session.execute(statement)
            counts.append(int(getattr(result, "rowcount", 0) or 0))
        return PruneCounts(*counts)


class AuthStorage:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessionmaker = db.sessionmaker(engine)
        self._postgres = engine.dialect.name == "postgresql"
        # SQLite: one writer per process at a time. Its transactions begin at the
        # first write, so a read-then-write would otherwise race another writer.
        self._write_lock = asyncio.Lock() if not self._postgres else None

    @contextlib.asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Transaction]:
        """One transaction: committed when the block ends, rolled back if it raises.

        Raises `Conflict` when a write breaks a uniqueness rule, and
        `Unavailable` when the database cannot be reached.
        """
        lock = self._write_lock if write and self._write_lock is not None else contextlib.nullcontext()
        try:
            async with lock, self._sessionmaker() as session, session.begin():
                yield Transaction(session, self._postgres)
        except IntegrityError as exc:
            raise Conflict(type(exc.orig).__name__) from exc
        except db.DATABASE_UNAVAILABLE_ERRORS as exc:
            raise db.database_unavailable() from exc

    async def close(self) -> None:
        await self.engine.dispose()


def create_storage(url: str) -> AuthStorage:
    return AuthStorage(db.create_engine(url))
