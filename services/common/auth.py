"""Local verification of access tokens, the same in every service.

Tokens are EdDSA-signed JWTs. Keys come from `AuthService.GetJwks`, cached and
refetched when a token names an unknown `kid` (so a rotated key is picked up on
first sight). Revocations come from the `ListTokenRevocations` feed, polled in
the background: verification never calls the auth service on the hot path.

A token's signature and claims are checked once: the principal is then kept in
a bounded cache until the token expires (see `VerifiedTokenCache`), while the
revocation check, a set lookup, still runs on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
import jwt
from opentelemetry.metrics import MeterProvider
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc, token_pb2

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.metrics import TokenVerificationMetrics

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
# Tolerated clock difference between services, in seconds.
LEEWAY_SECONDS = 5
# Unknown kids are refetched at most this often, so garbage tokens cannot make
# a service hammer the auth service.
JWKS_MIN_REFRESH_SECONDS = 1.0
# Verified tokens remembered per process. A token is about 600 bytes, so the
# cache holds a few MB at most; callers past it are verified afresh.
VERIFIED_TOKEN_CACHE_SIZE = 4096


class Role(enum.StrEnum):
    ADMIN = "admin"
    USER = "user"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by a verified token. Immutable."""

    user_id: str
    username: str
    role: Role
    token_id: str
    session_id: str
    expires_at: float

    def require_role(self, *roles: Role) -> None:
        if self.role not in roles:
            raise PermissionDenied(
                "this method needs the role " + " or ".join(r.value for r in roles),
                reason="ROLE_REQUIRED",
                metadata={"required": ",".join(r.value for r in roles)},
            )


class KeySource(Protocol):
    async def key(self, kid: str) -> jwt.PyJWK | None: ...


class RevocationSource(Protocol):
    def is_revoked(self, token_id: str, session_id: str) -> bool: ...


def jwk_from_proto(key: token_pb2.JsonWebKey) -> jwt.PyJWK:
    return jwt.PyJWK(
        {"kty": key.kty, "crv": key.crv, "x": key.x, "alg": key.alg, "use": key.use, "kid": key.kid}
    )


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature and claims checked out: who it names, and the
    key that signed it."""

    principal: Principal
    kid: str


class VerifiedTokenCache:
    """Tokens whose signature and claims have been checked, least recently used
    first, at most `max_size` of them. Single-threaded (the event loop's)."""

    def __init__(self, max_size: int = VERIFIED_TOKEN_CACHE_SIZE) -> None:
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self.max_size = max_size
        self._entries: OrderedDict[str, VerifiedToken] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, token: str) -> bool:
        return token in self._entries

    def get(self, token: str) -> VerifiedToken | None:
        entry = self._entries.get(token)
        if entry is not None:
            self._entries.move_to_end(token)
        return entry

    def put(self, token: str, entry: VerifiedToken) -> None:
        if self.max_size == 0:
            return
        self._entries[token] = entry
        self._entries.move_to_end(token)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def drop(self, token: str) -> None:
        self._entries.pop(token, None)


class TokenVerifier:
    """Verifies access tokens locally; every refusal is counted by reason
    (`switchboard.token.verification.failures`, see services.common.metrics).

    The signature (Ed25519, the costly part) and the claims of a token are
    checked on first sight; the principal is then cached until the token
    expires. A cached token is still refused once it has expired (with the
    same leeway as a fresh check), once it or its session is revoked (checked
    on every call), and once its signing key is no longer published."""

    def __init__(
        self,
        keys: KeySource,
        revocations: RevocationSource,
        issuer: str,
        audience: str,
        *,
        meter_provider: MeterProvider | None = None,
        cache_size: int = VERIFIED_TOKEN_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._revocations = revocations
        self._issuer = issuer
        self._audience = audience
        self._metrics = TokenVerificationMetrics(meter_provider)
        self.cache = VerifiedTokenCache(cache_size)
        self._clock = clock

    def _refuse(self, reason: str, message: str, error_reason: str = "TOKEN_INVALID") -> Unauthenticated:
        self._metrics.failed(reason)
        return Unauthenticated(message, reason=error_reason)

    async def verify_metadata(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Principal:
        """The principal of a call's `authorization: Bearer <token>` metadata."""
        try:
            token = bearer_token(metadata)
        except Unauthenticated as exc:
            self._metrics.failed("missing" if exc.reason == "TOKEN_MISSING" else "malformed")
            raise
        return await self.verify(token)

    async def verify(self, token: str) -> Principal:
        cached = self.cache.get(token)
        if cached is not None:
            principal = cached.principal
            if self._clock() >= principal.expires_at + LEEWAY_SECONDS:
                # PyJWT's own rule: expired once exp + leeway has passed.
                self.cache.drop(token)
                raise self._refuse("expired", "the access token has expired", "TOKEN_EXPIRED")
            if await self._keys.key(cached.kid) is None:
                # Its key is no longer published: check it afresh (and refuse it).
                self.cache.drop(token)
            else:
                return self._unless_revoked(principal)
        principal, kid = await self._verify_signed(token)
        principal = self._unless_revoked(principal)
        self.cache.put(token, VerifiedToken(principal, kid))
        return principal

    def _unless_revoked(self, principal: Principal) -> Principal:
        if self._revocations.is_revoked(principal.token_id, principal.session_id):
            raise self._refuse("revoked", "the access token has been revoked", "TOKEN_REVOKED")
        return principal

    async def _verify_signed(self, token: str) -> tuple[Principal, str]:
        """The principal of a token whose signature and claims check out, and
        the id of the key that signed it."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise self._refuse("malformed", "the access token is malformed") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or header.get("alg") != ALGORITHM:
            raise self._refuse("malformed", "the access token is malformed")
        key = await self._keys.key(kid)
        if key is None:
            raise self._refuse("unknown_kid", "the access token was not signed by a known key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "sub", "jti", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise self._refuse("expired", "the access token has expired", "TOKEN_EXPIRED") from None
        except jwt.InvalidSignatureError:
            raise self._refuse("bad_signature", "the access token is invalid") from None
        except jwt.DecodeError:
            raise self._refuse("malformed", "the access token is invalid") from None
        except jwt.InvalidTokenError:
            raise self._refuse("invalid_claims", "the access token is invalid") from None
        try:
            principal = Principal(
                user_id=str(claims["sub"]),
                username=str(claims.get("name", "")),
                role=Role(str(claims.get("role"))),
                token_id=str(claims["jti"]),
                session_id=str(claims.get("sid", "")),
                expires_at=float(claims["exp"]),
            )
        except ValueError:
            raise self._refuse("invalid_claims", "the access token is invalid") from None
        return principal, kid


class RemoteKeySource:
    """The auth service's key set, cached; refetched when an unknown kid shows up."""

    def __init__(self, stub: auth_service_pb2_grpc.AuthServiceAsyncStub, call_timeout: float = 3.0) -> None:
        self._stub = stub
        self._keys: dict[str, jwt.PyJWK] = {}
        self._lock = asyncio.Lock()
        self._last_fetch = 0.0
        self._call_timeout = call_timeout

    async def refresh(self) -> None:
        response = await self._stub.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=self._call_timeout)
        self._keys = {key.kid: jwk_from_proto(key) for key in response.keys}
        self._last_fetch = time.monotonic()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        found = self._keys.get(kid)
        if found is not None:
            return found
        async with self._lock:
            if kid not in self._keys and time.monotonic() - self._last_fetch >= JWKS_MIN_REFRESH_SECONDS:
                try:
                    await self.refresh()
                except grpc.aio.AioRpcError as exc:
                    log.warning("could not refresh the signing key set", extra={"code": exc.code().name})
            return self._keys.get(kid)


class RemoteRevocationFeed:
    """Follows `ListTokenRevocations`; entries are dropped once their tokens expire."""

    def __init__(self, stub: auth_service_pb2_grpc.AuthServiceAsyncStub, poll_seconds: float) -> None:
        self._stub = stub
        self._poll_seconds = poll_seconds
        self._token_ids: dict[str, float] = {}
        self._session_ids: dict[str, float] = {}
        self._last_sequence = 0
        self._task: asyncio.Task[None] | None = None
        self.synced = False

    def is_revoked(self, token_id: str, session_id: str) -> bool:
        return token_id in self._token_ids or (bool(session_id) and session_id in self._session_ids)

    async def poll_once(self) -> None:
        while True:
            response = await self._stub.ListTokenRevocations(
                auth_service_pb2.ListTokenRevocationsRequest(
                    after_sequence=self._last_sequence, page_size=1000
                ),
                timeout=3.0,
            )
            for revocation in response.revocations:
                expires = revocation.expire_time.ToSeconds() + LEEWAY_SECONDS
                if revocation.token_id:
                    self._token_ids[revocation.token_id] = expires
                if revocation.session_id:
                    self._session_ids[revocation.session_id] = expires
            self._last_sequence = max(self._last_sequence, response.last_sequence)
            if len(response.revocations) < 1000:
                break
        now = time.time()
        for table in (self._token_ids, self._session_ids):
            for key in [k for k, exp in table.items() if exp < now]:
                del table[key]
        self.synced = True

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except grpc.aio.AioRpcError as exc:
                log.warning("revocation feed unreachable", extra={"code": exc.code().name})
            await asyncio.sleep(self._poll_seconds)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="revocation-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization must be 'Bearer <token>'", reason="TOKEN_MALFORMED")
            return token.strip()
    raise Unauthenticated("this method needs an access token", reason="TOKEN_MISSING")
