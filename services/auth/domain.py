"""The rules of authentication: accounts, logins and their throttling, token
families (sessions) with rotating refresh tokens, revocation, introspection,
API keys, and the start-up bootstrap of the admin and service accounts.

Callers are `Principal`s verified by the interceptor; another user's resource
is NOT_FOUND, exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from services.auth.storage import (
    ApiKeyRow,
    AuthStorage,
    Conflict,
    RefreshTokenRow,
    RevocationRow,
    SessionRow,
    Transaction,
    UserRow,
)
from services.auth.tokens import (
    LEEWAY,
    Clock,
    KeyRing,
    LocalRevocations,
    Passwords,
    SigningKey,
    TokenIssuer,
    is_refresh_token,
    new_api_key,
    new_refresh_token,
    parse_api_key,
    same_hash,
    sha256_hex,
)
from services.common.auth import Principal, Role
from services.common.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SwitchboardError,
    Unauthenticated,
)

log = logging.getLogger(__name__)

# Inactive reasons of IntrospectToken (and ErrorInfo reasons of the verifier).
TOKEN_EXPIRED = "TOKEN_EXPIRED"
TOKEN_REVOKED = "TOKEN_REVOKED"
TOKEN_INVALID = "TOKEN_INVALID"

PRIVILEGED = (Role.ADMIN, Role.SERVICE)


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str
    role: Role
    created_at: datetime

    @classmethod
    def from_row(cls, row: UserRow) -> User:
        return cls(row.id, row.username, Role(row.role), row.created_at)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key's metadata; its secret is never kept."""

    api_key_id: str
    user_id: str
    display_name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def from_row(cls, row: ApiKeyRow) -> ApiKey:
        return cls(
            row.id,
            row.user_id,
            row.display_name,
            row.created_at,
            row.expires_at,
            row.revoked_at,
            row.last_used_at,
        )


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    access_expires_at: datetime
    refresh_token: str
    refresh_expires_at: datetime


@dataclass(frozen=True, slots=True)
class Introspection:
    active: bool
    inactive_reason: str = ""
    user_id: str = ""
    username: str = ""
    role: Role | None = None
    token_id: str = ""
    issued_at: datetime | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    refresh_ttl_seconds: float = 30 * 24 * 3600.0
    login_max_failures: int = 5
    login_failure_window_seconds: float = 300.0


class BootstrapError(Exception):
    """Start-up cannot go on; the message says why (never a secret)."""


class AdminPasswordRequired(BootstrapError):
    pass


def _invalid_credentials() -> Unauthenticated:
    # One answer for an unknown user, a wrong password and a wrong key.
    return Unauthenticated("the credentials are not valid", reason="INVALID_CREDENTIALS")


def _request_id_reused() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("request_id", "was used before with a different request")],
        reason="REQUEST_ID_REUSED",
    )


class AuthDomain:
    def __init__(
        self,
        storage: AuthStorage,
        passwords: Passwords,
        keys: KeyRing,
        issuer: TokenIssuer,
        revocations: LocalRevocations,
        settings: Settings,
        clock: Clock,
    ) -> None:
        self._storage = storage
        self._passwords = passwords
        self.keys = keys
        self._issuer = issuer
        self.revocations = revocations
        self._settings = settings
        self._clock = clock
        self._refresh_ttl = timedelta(seconds=settings.refresh_ttl_seconds)
        self._failure_window = timedelta(seconds=settings.login_failure_window_seconds)

    # --- bootstrap -----------------------------------------------------------

    async def bootstrap(
        self, admin_username: str, admin_password: str | None, service_accounts: Mapping[str, str]
    ) -> None:
        """Creates the admin when missing and the service accounts (updating a
        changed password). Idempotent; safe for replicas starting together."""
        async with self._storage.transaction(write=False) as tx:
            admin = await tx.get_user_by_username(admin_username)
            any_admin = await tx.admin_exists()
        if admin is None:
            if admin_password:
                await self._ensure_account(admin_username, admin_password, Role.ADMIN, update_password=False)
                log.info("admin created", extra={"username": admin_username})
            elif not any_admin:
                raise AdminPasswordRequired("no admin exists and no admin password is configured")
        elif admin.role != Role.ADMIN.value:
            raise BootstrapError(f"the user {admin_username!r} exists without the admin role")
        for username, password in service_accounts.items():
            await self._ensure_account(username, password, Role.SERVICE, update_password=True)

    async def _ensure_account(
        self, username: str, password: str, role: Role, *, update_password: bool
    ) -> None:
        for attempt in range(2):
            async with self._storage.transaction(write=False) as tx:
                existing = await tx.get_user_by_username(username)
            if existing is not None:
                if existing.role != role.value:
                    raise BootstrapError(f"the user {username!r} exists with the role {existing.role!r}")
                if update_password and not await self._passwords.verify(existing.password_hash, password):
                    new_hash = await self._passwords.hash(password)
                    async with self._storage.transaction() as tx:
                        await tx.update_user(existing.id, password_hash=new_hash, role=role.value)
                    log.info("service account password updated", extra={"username": username})
                return
            row = UserRow(
                str(uuid.uuid4()), username, role.value, await self._passwords.hash(password), self._clock()
            )
            try:
                async with self._storage.transaction() as tx:
                    await tx.insert_user(row, None, None)
            except Conflict:
                if attempt:
                    raise
                continue  # another replica created it: check it again
            if role is Role.SERVICE:
                log.info("service account created", extra={"username": username})
            return

    # --- login ---------------------------------------------------------------

    async def login_with_password(self, username: str, password: str) -> tuple[User, TokenPair]:
        now = self._clock()
        await self._admit_login_attempt(username, now)
        async with self._storage.transaction(write=False) as tx:
            row = await tx.get_user_by_username(username)
        if row is None:
            await self._passwords.burn_time(password)
            raise _invalid_credentials()
        if not await self._passwords.verify(row.password_hash, password):
            raise _invalid_credentials()  # the attempt stays counted
        new_hash = (
            await self._passwords.hash(password) if self._passwords.needs_rehash(row.password_hash) else None
        )
        user = User.from_row(row)
        async with self._storage.transaction() as tx:
            await tx.clear_login_attempts(username)
            if new_hash is not None:
                await tx.update_user(row.id, password_hash=new_hash, role=row.role)
            tokens = await self._open_session(tx, user, now)
        return user, tokens

    async def _admit_login_attempt(self, username: str, now: datetime) -> None:
        """Counts this attempt, or refuses it when the username has failed too often.

        The attempt is recorded (and committed) before it is checked, so
        concurrent guesses count against each other; a refused one is removed
        again so that refusals do not extend the lock-out.
        """
        async with self._storage.transaction() as tx:
            attempt_id = await tx.add_login_attempt(username, now)
        async with self._storage.transaction(write=False) as tx:
            attempts = await tx.login_attempt_times(username, now - self._failure_window)
        limit = self._settings.login_max_failures
        if len(attempts) <= limit:
            return
        async with self._storage.transaction() as tx:
            await tx.delete_login_attempt(attempt_id)
        earlier = [at for found, at in attempts if found != attempt_id]
        # Allowed again once enough of the counted attempts have left the window.
        leaving = earlier[max(0, len(earlier) - limit)]
        retry_after = max(1.0, (leaving + self._failure_window - now).total_seconds())
        raise ResourceExhausted(
            "too many failed logins for this username; try again later",
            reason="LOGIN_THROTTLED",
            retry_after=retry_after,
        )

    async def login_with_api_key(self, full_key: str) -> tuple[User, TokenPair]:
        now = self._clock()
        parsed = parse_api_key(full_key)
        if parsed is None:
            raise _invalid_credentials()
        api_key_id, secret_hash = parsed
        async with self._storage.transaction(write=False) as tx:
            key = await tx.get_api_key(api_key_id)
            row = await tx.get_user(key.user_id) if key is not None else None
        if key is None or row is None or not same_hash(key.secret_hash, secret_hash):
            raise _invalid_credentials()
        # The caller holds the real secret: it may learn why the key no longer works.
        if key.revoked_at is not None:
            raise Unauthenticated("this API key has been revoked", reason="API_KEY_REVOKED")
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthenticated("this API key has expired", reason="API_KEY_EXPIRED")
        user = User.from_row(row)
        async with self._storage.transaction() as tx:
            await tx.touch_api_key(key.id, now)
            tokens = await self._open_session(tx, user, now, api_key=key)
        return user, tokens

    async def _open_session(
        self, tx: Transaction, user: User, now: datetime, api_key: ApiKeyRow | None = None
    ) -> TokenPair:
        """A new token family: a session, its first refresh token and an access token."""
        session_id = str(uuid.uuid4())
        # Nothing obtained with an API key outlives the key.
        not_after = api_key.expires_at if api_key is not None else None
        refresh_expires = now + self._refresh_ttl
        if not_after is not None:
            refresh_expires = min(refresh_expires, not_after)
        await tx.insert_session(
            SessionRow(session_id, user.user_id, api_key.id if api_key else None, now, refresh_expires, None)
        )
        refresh_token = new_refresh_token()
        await tx.insert_refresh_token(
            RefreshTokenRow(
                sha256_hex(refresh_token), session_id, user.user_id, now, refresh_expires, None, None
            )
        )
        access = self._issuer.issue(
            user_id=user.user_id,
            username=user.username,
            role=user.role,
            session_id=session_id,
            now=now,
            not_after=not_after,
        )
        return TokenPair(access.token, access.expires_at, refresh_token, refresh_expires)

    # --- refresh -------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Spends the refresh token and returns a new pair of the same family.
        A spent token presented again revokes the whole family."""
        now = self._clock()
        token_hash = sha256_hex(refresh_token)
        reuse: RevocationRow | None = None
        async with self._storage.transaction() as tx:
            token = await tx.get_refresh_token(token_hash)
            if token is None:
                raise Unauthenticated("the refresh token is not valid", reason=TOKEN_INVALID)
            # Refreshes and revocations of one family take turns on its row.
            session = await tx.get_session(token.session_id, for_update=True)
            token = await tx.get_refresh_token(token_hash)
            if session is None or token is None:
                raise Unauthenticated("the refresh token is not valid", reason=TOKEN_INVALID)
            if session.revoked_at is not None or token.revoked_at is not None:
                raise Unauthenticated("the refresh token has been revoked", reason=TOKEN_REVOKED)
            if token.expires_at <= now:
                raise Unauthenticated("the refresh token has expired", reason="REFRESH_TOKEN_EXPIRED")
            if token.spent_at is not None or not await tx.spend_refresh_token(token_hash, now):
                reuse = await self._revoke_session(tx, session.id, now)
            else:
                tokens = await self._continue_session(tx, session, now)
        if reuse is not None:
            self.revocations.add(reuse)
            log.warning("refresh token reused: family revoked", extra={"session_id": reuse.session_id})
            raise Unauthenticated(
                "this refresh token was already used; its session has been revoked",
                reason="REFRESH_TOKEN_REUSED",
            )
        return tokens

    async def _continue_session(self, tx: Transaction, session: SessionRow, now: datetime) -> TokenPair:
        row = await tx.get_user(session.user_id)
        if row is None:
            raise Unauthenticated("the refresh token is not valid", reason=TOKEN_INVALID)
        not_after: datetime | None = None
        if session.api_key_id is not None:
            key = await tx.get_api_key(session.api_key_id)
            if key is None or key.revoked_at is not None:
                raise Unauthenticated("the refresh token has been revoked", reason=TOKEN_REVOKED)
            not_after = key.expires_at
        refresh_expires = now + self._refresh_ttl
        if not_after is not None:
            refresh_expires = min(refresh_expires, not_after)
        refresh_token = new_refresh_token()
        await tx.insert_refresh_token(
            RefreshTokenRow(sha256_hex(refresh_token), session.id, row.id, now, refresh_expires, None, None)
        )
        await tx.extend_session(session.id, max(refresh_expires, session.expires_at))
        user = User.from_row(row)
        access = self._issuer.issue(
            user_id=user.user_id,
            username=user.username,
            role=user.role,
            session_id=session.id,
            now=now,
            not_after=not_after,
        )
        return TokenPair(access.token, access.expires_at, refresh_token, refresh_expires)

    async def _revoke_session(self, tx: Transaction, session_id: str, now: datetime) -> RevocationRow:
        """Revokes a family: its refresh tokens, and (through the feed) every
        access token of it, which all expire within one access TTL from now."""
        await tx.revoke_session(session_id, now)
        return await tx.add_revocation(
            token_id=None, session_id=session_id, expires_at=now + self._issuer.access_ttl + LEEWAY, now=now
        )

    # --- revocation ----------------------------------------------------------

    async def revoke_token(self, caller: Principal, token: str) -> None:
        """Revokes an access token (its jti) or a refresh token (its family).
        Users may revoke their own tokens, admins anyone's. Idempotent."""
        now = self._clock()
        not_found = NotFound("no such token", reason="TOKEN_NOT_FOUND")
        revocation: RevocationRow | None = None
        if is_refresh_token(token):
            async with self._storage.transaction() as tx:
                found = await tx.get_refresh_token(sha256_hex(token))
                if found is None or not self._may_act_for(caller, found.user_id):
                    raise not_found
                session = await tx.get_session(found.session_id, for_update=True)
                if session is not None and session.revoked_at is None:
                    revocation = await self._revoke_session(tx, session.id, now)
        else:
            claims = await self._issuer.signed_claims(token)
            if claims is None or not self._may_act_for(caller, claims["sub"]):
                raise not_found
            expires_at = datetime.fromtimestamp(claims["exp"], now.tzinfo) + LEEWAY
            if expires_at <= now or self.revocations.is_revoked(claims["jti"], ""):
                return  # nothing left to refuse
            async with self._storage.transaction() as tx:
                revocation = await tx.add_revocation(
                    token_id=claims["jti"], session_id=None, expires_at=expires_at, now=now
                )
        if revocation is not None:
            self.revocations.add(revocation)
            log.info(
                "token revoked",
                extra={
                    "by": caller.user_id,
                    "token_id": revocation.token_id,
                    "session_id": revocation.session_id,
                },
            )

    @staticmethod
    def _may_act_for(caller: Principal, user_id: str) -> bool:
        return caller.user_id == user_id or caller.role is Role.ADMIN

    async def list_revocations(self, after_sequence: int, page_size: int) -> tuple[list[RevocationRow], int]:
        async with self._storage.transaction(write=False) as tx:
            return await tx.list_revocations(after_sequence, page_size, self._clock())

    def jwks(self) -> list[SigningKey]:
        return self.keys.published()

    # --- introspection -------------------------------------------------------

    async def introspect(self, caller: Principal, token: str) -> Introspection:
        """Admins and services see any token; users only their own. Anything
        else looks exactly like an invalid token (no existence leak)."""
        now = self._clock()
        invalid = Introspection(active=False, inactive_reason=TOKEN_INVALID)
        privileged = caller.role in PRIVILEGED
        if is_refresh_token(token):
            async with self._storage.transaction(write=False) as tx:
                found = await tx.get_refresh_token(sha256_hex(token))
                session = await tx.get_session(found.session_id) if found is not None else None
                row = await tx.get_user(found.user_id) if found is not None else None
            if found is None or session is None or row is None:
                return invalid
            if not privileged and found.user_id != caller.user_id:
                return invalid
            if found.expires_at <= now:
                reason = TOKEN_EXPIRED
            elif found.revoked_at or session.revoked_at or found.spent_at:
                reason = TOKEN_REVOKED  # a spent refresh token can never be used again
            else:
                reason = ""
            return Introspection(
                active=not reason,
                inactive_reason=reason,
                user_id=row.id,
                username=row.username,
                role=Role(row.role),
                issued_at=found.created_at,
                expires_at=found.expires_at,
            )
        claims = await self._issuer.signed_claims(token)
        if claims is None:
            return invalid
        if not privileged and claims["sub"] != caller.user_id:
            return invalid
        try:
            role: Role | None = Role(str(claims.get("role")))
        except ValueError:
            return invalid
        expires_at = datetime.fromtimestamp(claims["exp"], now.tzinfo)
        if expires_at + LEEWAY <= now:
            reason = TOKEN_EXPIRED
        elif self.revocations.is_revoked(claims["jti"], str(claims.get("sid", ""))):
            reason = TOKEN_REVOKED
        else:
            reason = ""
        return Introspection(
            active=not reason,
            inactive_reason=reason,
            user_id=claims["sub"],
            username=str(claims.get("name", "")),
            role=role,
            token_id=claims["jti"],
            issued_at=datetime.fromtimestamp(claims["iat"], now.tzinfo),
            expires_at=expires_at,
        )

    # --- users ---------------------------------------------------------------

    async def current_user(self, caller: Principal) -> User:
        async with self._storage.transaction(write=False) as tx:
            row = await tx.get_user(caller.user_id)
        if row is None:
            raise NotFound("the caller's account no longer exists", reason="USER_NOT_FOUND")
        return User.from_row(row)

    async def create_user(
        self, caller: Principal, username: str, password: str, role: Role, request_id: str
    ) -> User:
        """Admin only; idempotent by (caller, request_id)."""
        caller.require_role(Role.ADMIN)
        if request_id:
            async with self._storage.transaction(write=False) as tx:
                earlier = await tx.find_user_by_request(caller.user_id, request_id)
            if earlier is not None:
                return self._same_user_request(earlier, username, role)
        password_hash = await self._passwords.hash(password)
        for attempt in range(2):
            try:
                async with self._storage.transaction() as tx:
                    if request_id:
                        earlier = await tx.find_user_by_request(caller.user_id, request_id)
                        if earlier is not None:
                            return self._same_user_request(earlier, username, role)
                    if await tx.get_user_by_username(username) is not None:
                        raise AlreadyExists("this username is taken", reason="USERNAME_TAKEN")
                    row = UserRow(str(uuid.uuid4()), username, role.value, password_hash, self._clock())
                    await tx.insert_user(row, caller.user_id, request_id or None)
            except Conflict:
                if attempt:
                    raise
                continue  # a concurrent create won: look again
            log.info("user created", extra={"user_id": row.id, "by": caller.user_id, "role": role.value})
            return User.from_row(row)
        raise AssertionError("unreachable")

    @staticmethod
    def _same_user_request(earlier: UserRow, username: str, role: Role) -> User:
        if earlier.username != username or earlier.role != role.value:
            raise _request_id_reused()
        return User.from_row(earlier)

    # --- API keys ------------------------------------------------------------

    async def create_api_key(
        self, caller: Principal, display_name: str, expires_at: datetime | None, request_id: str
    ) -> tuple[ApiKey, str | None]:
        """A new key for the caller and its secret; a repeated request_id returns
        the first key's metadata without the secret (which is not kept)."""
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument([FieldViolation("expire_time", "must be in the future")])
        for attempt in range(2):
            new = new_api_key()
            row = ApiKeyRow(
                new.api_key_id,
                caller.user_id,
                display_name,
                new.secret_hash,
                now,
                expires_at,
                None,
                None,
                request_id or None,
            )
            try:
                async with self._storage.transaction() as tx:
                    if request_id:
                        earlier = await tx.find_api_key_by_request(caller.user_id, request_id)
                        if earlier is not None:
                            if earlier.display_name != display_name or earlier.expires_at != expires_at:
                                raise _request_id_reused()
                            return ApiKey.from_row(earlier), None
                    await tx.insert_api_key(row)
            except Conflict:
                if attempt:
                    raise
                continue
            log.info("API key created", extra={"api_key_id": row.id, "user_id": caller.user_id})
            return ApiKey.from_row(row), new.secret
        raise AssertionError("unreachable")

    async def revoke_api_key(self, caller: Principal, api_key_id: str) -> ApiKey:
        """Revokes one of the caller's keys and ends every session opened with it."""
        now = self._clock()
        revoked: list[RevocationRow] = []
        async with self._storage.transaction() as tx:
            key = await tx.get_api_key(api_key_id)
            if key is None or key.user_id != caller.user_id:
                raise NotFound("no such API key", reason="API_KEY_NOT_FOUND")
            if key.revoked_at is None:
                await tx.revoke_api_key(key.id, now)
                for session in await tx.active_sessions_of_api_key(key.id, now):
                    revoked.append(await self._revoke_session(tx, session.id, now))
            key = await tx.get_api_key(api_key_id)
        for revocation in revoked:
            self.revocations.add(revocation)
        assert key is not None
        return ApiKey.from_row(key)

    async def list_api_keys(
        self, caller: Principal, page_size: int, after: tuple[datetime, str] | None
    ) -> tuple[list[ApiKey], tuple[datetime, str] | None]:
        """A page of the caller's keys, oldest first, and where the next page starts."""
        async with self._storage.transaction(write=False) as tx:
            rows = await tx.list_api_keys(caller.user_id, after, page_size + 1)
        page = rows[:page_size]
        more = len(rows) > page_size
        return [ApiKey.from_row(row) for row in page], ((page[-1].created_at, page[-1].id) if more else None)

    # --- background work -----------------------------------------------------

    async def start_up(self) -> None:
        """Signing keys and the revocation set, before the first request."""
        await self.keys.rotate_if_due()
        await self.revocations.refresh()

    async def maintain(self) -> None:
        """Rotates the signing key when due and deletes what no longer matters."""
        await self.keys.rotate_if_due()
        now = self._clock()
        async with self._storage.transaction() as tx:
            counts = await tx.prune(now, now - self._failure_window)
        if any((counts.revocations, counts.login_attempts, counts.sessions, counts.signing_keys)):
            log.info(
                "pruned",
                extra={
                    "revocations": counts.revocations,
                    "login_attempts": counts.login_attempts,
                    "sessions": counts.sessions,
                    "signing_keys": counts.signing_keys,
                },
            )


class Repeating:
    """Background tasks that repeat one step at a fixed interval and survive its failures."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, step: Callable[[], Awaitable[None]], interval: float) -> None:
        self._tasks.append(asyncio.create_task(self._repeat(name, step, interval), name=name))

    @staticmethod
    async def _repeat(name: str, step: Callable[[], Awaitable[None]], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except (SwitchboardError, SQLAlchemyError, OSError) as exc:
                log.warning("background step failed", extra={"task": name, "error": type(exc).__name__})

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
