"""Credentials and tokens: password hashing, opaque secrets, signing keys and
their rotation, access-token issue, and the local revocation set.

The auth service verifies tokens with the shared `TokenVerifier`, backed by
`KeyRing` (a `KeySource`) and `LocalRevocations` (a `RevocationSource`) that
read its own database instead of calling itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import argon2
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth.storage import AuthStorage, RevocationRow, SigningKeyRow
from services.common.auth import ALGORITHM, JWKS_MIN_REFRESH_SECONDS, LEEWAY_SECONDS, Role
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

REFRESH_TOKEN_PREFIX = "sbr_"
API_KEY_PREFIX = "sb_"
LEEWAY = timedelta(seconds=LEEWAY_SECONDS)
# A new signing key is in the JWKS this long before it signs (at most half the
# rotation period). Longer than the verifiers' one-second refetch limit.
PUBLISH_LEAD_SECONDS = 5.0


# --- passwords ---------------------------------------------------------------


class Passwords:
    """Argon2id hashing; the slow work runs in a thread so the event loop stays free."""

    def __init__(self, hasher: argon2.PasswordHasher) -> None:
        self._hasher = hasher
        # Verified against for unknown usernames, so their answer takes as long.
        self._dummy_hash = hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        try:
            return await asyncio.to_thread(self._hasher.verify, password_hash, password)
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            log.warning("a stored password hash could not be checked")
            return False

    async def burn_time(self, password: str) -> None:
        """Spends as long as a real verification, for an unknown username."""
        await self.verify(self._dummy_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except argon2.exceptions.InvalidHashError:
            return True


# --- opaque secrets ----------------------------------------------------------


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_refresh_token() -> str:
    return REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(32)


def is_refresh_token(token: str) -> bool:
    return token.startswith(REFRESH_TOKEN_PREFIX)


@dataclass(frozen=True, slots=True)
class NewApiKey:
    api_key_id: str
    secret: str  # the full `sb_<id>_<secret>` shown once
    secret_hash: str


def new_api_key() -> NewApiKey:
    # Hex ids never contain "_", so the secret (which may) splits off unambiguously.
    api_key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewApiKey(api_key_id, f"{API_KEY_PREFIX}{api_key_id}_{secret}", sha256_hex(secret))


def parse_api_key(full: str) -> tuple[str, str] | None:
    """(api_key_id, secret hash) of an `sb_<id>_<secret>` string, or None if it is not one."""
    if not full.startswith(API_KEY_PREFIX):
        return None
    api_key_id, separator, secret = full[len(API_KEY_PREFIX) :].partition("_")
    if not separator or not api_key_id or not secret:
        return None
    return api_key_id, sha256_hex(secret)


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# --- signing keys ------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey
    public_x: str
    created_at: datetime
    retired_at: datetime | None
    verify_until: datetime | None

    @classmethod
    def generate(cls, now: datetime) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        return cls(
            uuid.uuid4().hex, private, _b64url(private.public_key().public_bytes_raw()), now, None, None
        )

    @classmethod
    def from_row(cls, row: SigningKeyRow) -> SigningKey:
        private = Ed25519PrivateKey.from_private_bytes(base64.b64decode(row.private_key))
        return cls(row.kid, private, row.public_x, row.created_at, row.retired_at, row.verify_until)

    def to_row(self) -> SigningKeyRow:
        raw = self.private_key.private_bytes_raw()
        return SigningKeyRow(
            self.kid,
            base64.b64encode(raw).decode(),
            self.public_x,
            self.created_at,
            self.retired_at,
            self.verify_until,
        )

    def jwk(self) -> dict[str, str]:
        return {
            "kid": self.kid,
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.public_x,
            "alg": ALGORITHM,
            "use": "sig",
        }


class KeyRing:
    """The signing keys, a `KeySource` for the local `TokenVerifier`.

    A new key is published (in the JWKS) a little before it starts signing, so
    a service that refreshed its key set within the last second (it refetches
    at most once a second) already knows it when the first token shows up.
    The key it replaces keeps verifying until every token it signed has expired.
    """

    def __init__(
        self,
        storage: AuthStorage,
        *,
        rotation_seconds: float,
        access_ttl_seconds: float,
        check_seconds: float,
        clock: Clock,
        min_reload_seconds: float = JWKS_MIN_REFRESH_SECONDS,
    ) -> None:
        self._storage = storage
        self._min_reload_seconds = min_reload_seconds
        self._rotation = timedelta(seconds=rotation_seconds)
        self.publish_lead = timedelta(seconds=min(PUBLISH_LEAD_SECONDS, rotation_seconds / 2))
        # A retired key verifies until every token it may have signed has
        # expired, including tokens another replica signed before it noticed
        # the rotation (it reloads every `check_seconds`).
        self._retention = timedelta(seconds=access_ttl_seconds + check_seconds) + LEEWAY
        self._clock = clock
        self._keys: list[SigningKey] = []  # oldest first
        self._jwks: dict[str, jwt.PyJWK] = {}
        self._last_load = 0.0
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return bool(self._usable(self._clock()))

    async def load(self) -> None:
        async with self._storage.transaction(write=False) as tx:
            rows = await tx.list_signing_keys(self._clock())
        self._keys = [SigningKey.from_row(row) for row in rows]
        self._jwks = {key.kid: jwt.PyJWK(key.jwk()) for key in self._keys}
        self._last_load = time.monotonic()

    async def rotate_if_due(self) -> bool:
        """Makes a new signing key when there is none or the newest is old enough.
        True when this call made one."""
        now = self._clock()
        new_key: SigningKey | None = None
        async with self._storage.transaction() as tx:
            await tx.lock_signing_keys()
            newest = [row for row in await tx.list_signing_keys(now) if row.retired_at is None]
            if not newest or max(row.created_at for row in newest) + self._rotation <= now:
                # The current key signs on until the new one takes over.
                handover = now + self.publish_lead
                await tx.retire_signing_keys(handover, handover + self._retention)
                new_key = SigningKey.generate(now)
                await tx.insert_signing_key(new_key.to_row())
        await self.load()
        if new_key is not None:
            log.info("new signing key published", extra={"kid": new_key.kid})
        return new_key is not None

    def _usable(self, now: datetime) -> list[SigningKey]:
        return [key for key in self._keys if key.retired_at is None or key.retired_at > now]

    def signing_key(self) -> SigningKey:
        """The newest key published long enough ago; on a first start, the only one."""
        now = self._clock()
        usable = self._usable(now)
        if not usable:
            raise Unavailable("no signing key is available yet", reason="SIGNING_KEY_UNAVAILABLE")
        published = [key for key in usable if key.created_at + self.publish_lead <= now]
        return published[-1] if published else usable[0]

    def published(self) -> list[SigningKey]:
        """Every key that verifies now or soon, oldest first (the JWKS)."""
        now = self._clock()
        return [key for key in self._keys if key.verify_until is None or key.verify_until > now]

    async def key(self, kid: str) -> jwt.PyJWK | None:
        found = self._jwks.get(kid)
        if found is not None:
            return found
        # Another replica may have rotated: reload, but not more than once a
        # second, so garbage tokens cannot hammer the database.
        async with self._lock:
            if kid not in self._jwks and time.monotonic() - self._last_load >= self._min_reload_seconds:
                await self.load()
            return self._jwks.get(kid)


# --- access tokens -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessToken:
    token: str
    token_id: str
    issued_at: datetime
    expires_at: datetime


class TokenIssuer:
    """Signs access tokens with the current key and reads back their claims."""

    def __init__(self, keys: KeyRing, *, issuer: str, audience: str, access_ttl_seconds: float) -> None:
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self.access_ttl = timedelta(seconds=access_ttl_seconds)

    def issue(
        self,
        *,
        user_id: str,
        username: str,
        role: Role,
        session_id: str,
        now: datetime,
        not_after: datetime | None = None,
    ) -> AccessToken:
        key = self._keys.signing_key()
        expires_at = now + self.access_ttl
        if not_after is not None:
            expires_at = min(expires_at, not_after)
        token_id = uuid.uuid4().hex
        issued = int(now.timestamp())
        expires = int(expires_at.timestamp())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            "name": username,
            "role": role.value,
            "jti": token_id,
            "sid": session_id,
            "iat": issued,
            "exp": expires,
        }
        token = jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})
        return AccessToken(
            token,
            token_id,
            datetime.fromtimestamp(issued, now.tzinfo),
            datetime.fromtimestamp(expires, now.tzinfo),
        )

    async def signed_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a token signed by one of our keys, for us, whether or
        not it has expired; None for anything else."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return None
        kid = header.get("kid")
        if not isinstance(kid, str) or header.get("alg") != ALGORITHM:
            return None
        key = await self._keys.key(kid)
        if key is None:
            return None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=self.issuer,
                audience=self.audience,
                options={"verify_exp": False, "require": ["exp", "iat", "sub", "jti"]},
            )
        except jwt.InvalidTokenError:
            return None
        if not all(isinstance(claims.get(name), str) for name in ("sub", "jti")):
            return None
        if not all(isinstance(claims.get(name), int) for name in ("exp", "iat")):
            return None
        return claims


# --- revocations -------------------------------------------------------------


class LocalRevocations:
    """The revocation set of this process: updated at once when it revokes, and
    from the database every poll (another replica may have revoked).
    A `RevocationSource` for the local `TokenVerifier`."""

    PAGE = 1000

    def __init__(self, storage: AuthStorage, clock: Clock) -> None:
        self._storage = storage
        self._clock = clock
        # id -> when the entry may be forgotten (its tokens have expired).
        self._token_ids: dict[str, datetime] = {}
        self._session_ids: dict[str, datetime] = {}
        self._last_sequence = 0
        self.synced = False

    def is_revoked(self, token_id: str, session_id: str) -> bool:
        return token_id in self._token_ids or (bool(session_id) and session_id in self._session_ids)

    def add(self, revocation: RevocationRow) -> None:
        # The poll reads it again later; adding twice is harmless. The sequence
        # is not advanced here: smaller ones may not have been read yet.
        if revocation.token_id:
            self._token_ids[revocation.token_id] = revocation.expires_at
        if revocation.session_id:
            self._session_ids[revocation.session_id] = revocation.expires_at

    async def refresh(self) -> None:
        now = self._clock()
        while True:
            async with self._storage.transaction(write=False) as tx:
                rows, last = await tx.list_revocations(self._last_sequence, self.PAGE, now)
            for row in rows:
                self.add(row)
            self._last_sequence = last
            if len(rows) < self.PAGE:
                break
        for table in (self._token_ids, self._session_ids):
            for key in [key for key, expires in table.items() if expires <= now]:
                del table[key]
        self.synced = True
