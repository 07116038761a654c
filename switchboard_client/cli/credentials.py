"""The logged-in session: tokens kept in the user's config directory, refreshed when they expire.

The file (`credentials.json`, mode 0600, in a 0700 directory) is replaced
atomically: written to a private temporary file in the same directory, then
renamed over the old one, so it is never partly written nor readable by others,
even for a moment. Refresh tokens are single-use and reusing a spent one
revokes the whole family, so two CLI processes must never spend the same one:
a refresh happens under an exclusive lock on the directory's lock file, after
re-reading the file (another process may have refreshed already).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from switchboard.auth.v1 import auth_service_pb2, token_pb2

from switchboard_client.cli.errors import CliError, describe_rpc_error, error_reason

try:
    import fcntl
except ImportError:  # not on Windows: refreshes are then unserialised between processes
    fcntl = None  # type: ignore[assignment]

CREDENTIALS_FILE = "credentials.json"
LOCK_FILE = "credentials.lock"
# Refresh this long before the access token expires, so a call never races its expiry.
EXPIRY_MARGIN = timedelta(seconds=30)
NOT_LOGGED_IN = "not logged in: run `switchboard login` first"

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]


def _timestamp_text(value: timestamp_pb2.Timestamp) -> str:
    return value.ToJsonString() if value.seconds or value.nanos else ""


def _parse_time(text: str) -> datetime | None:
    if not text:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True)
class StoredLogin:
    """What `credentials.json` holds; the tokens never leave it except as call metadata."""

    auth_address: str
    username: str
    user_id: str
    role: str
    access_token: str
    access_token_expire_time: str
    refresh_token: str
    refresh_token_expire_time: str

    @classmethod
    def from_tokens(
        cls, tokens: token_pb2.TokenPair, *, auth_address: str, username: str, user_id: str, role: str
    ) -> StoredLogin:
        return cls(
            auth_address=auth_address,
            username=username,
            user_id=user_id,
            role=role,
            access_token=tokens.access_token,
            access_token_expire_time=_timestamp_text(tokens.access_token_expire_time),
            refresh_token=tokens.refresh_token,
            refresh_token_expire_time=_timestamp_text(tokens.refresh_token_expire_time),
        )

    def with_tokens(self, tokens: token_pb2.TokenPair) -> StoredLogin:
        return replace(
            self,
            access_token=tokens.access_token,
            access_token_expire_time=_timestamp_text(tokens.access_token_expire_time),
            refresh_token=tokens.refresh_token,
            refresh_token_expire_time=_timestamp_text(tokens.refresh_token_expire_time),
        )

    def access_token_expiring(self, now: datetime) -> bool:
        expires = _parse_time(self.access_token_expire_time)
        return expires is not None and now >= expires - EXPIRY_MARGIN


class CredentialStore:
    """`credentials.json` in one directory (by default $XDG_CONFIG_HOME/switchboard)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / CREDENTIALS_FILE

    def load(self) -> StoredLogin | None:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            return StoredLogin(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise CliError(
                f"cannot read {self.path} ({exc.__class__.__name__}): log in again with `switchboard login`"
            ) from None

    def save(self, login: StoredLogin) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file 0600 (whatever the umask); the rename makes it
        # appear whole, replacing the old one in one step.
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".credentials-", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(asdict(login), handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def delete(self) -> bool:
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Excludes other CLI processes of this user while a refresh token is spent."""
        if fcntl is None:
            yield
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


class Session:
    """Access tokens for calls: the stored one while it is valid, a refreshed one after."""

    def __init__(self, store: CredentialStore, auth_stub: Any, timeout: float) -> None:
        self._store = store
        self._auth: Any = auth_stub
        self._timeout = timeout
        self._login: StoredLogin | None = None

    def stored(self) -> StoredLogin:
        if self._login is None:
            self._login = self._store.load()
        if self._login is None:
            raise CliError(NOT_LOGGED_IN)
        return self._login

    async def access_token(self) -> str:
        login = self.stored()
        if login.access_token_expiring(datetime.now(UTC)):
            return await self.refresh(login.access_token)
        return login.access_token

    async def refresh(self, stale_access_token: str) -> str:
        """Spends the refresh token for a new pair, unless another process already did."""
        with self._store.locked():
            current = self._store.load()
            if current is None:
                raise CliError(NOT_LOGGED_IN)
            if current.access_token != stale_access_token and not current.access_token_expiring(
                datetime.now(UTC)
            ):
                self._login = current
                return current.access_token
            try:
                response = await self._auth.RefreshToken(
                    auth_service_pb2.RefreshTokenRequest(refresh_token=current.refresh_token),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    reason = error_reason(error) or "UNAUTHENTICATED"
                    raise CliError(
                        f"your session has ended ({reason}): log in again with `switchboard login`"
                    ) from None
                raise describe_rpc_error(error, "auth") from None
            self._login = current.with_tokens(response.tokens)
            self._store.save(self._login)
            return self._login.access_token

    async def call(self, invoke: Callable[[Metadata], Awaitable[T]]) -> T:
        """`invoke(metadata)`, once more with a refreshed token if the server found it expired."""
        token = await self.access_token()
        try:
            return await invoke(bearer(token))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED or error_reason(error) != "TOKEN_EXPIRED":
                raise
        return await invoke(bearer(await self.refresh(token)))
