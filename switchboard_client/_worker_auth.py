"""Service-token checks for standalone workers: EdDSA JWTs verified locally
against the auth service's key set (`GetJwks`), cached and refetched when a
token names an unknown key. Only the `service` role may call a worker.

The services have their own verifier (with the revocation feed); this one is
deliberately small so that the client package stays independent of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import grpc
import jwt
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc

ERROR_DOMAIN = "switchboard.dev"
ALGORITHM = "EdDSA"
LEEWAY_SECONDS = 5
# Unknown kids refetch the key set at most this often.
MIN_REFRESH_SECONDS = 1.0


def status_with_reason(
    code: grpc.StatusCode, message: str, reason: str, metadata: Mapping[str, str] | None = None
) -> status_pb2.Status:
    """A `google.rpc.Status` carrying an `ErrorInfo`, as every Switchboard error does."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {}))
    return status_pb2.Status(code=code.value[0], message=message, details=[info])


class CallRefused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status_with_reason(code, message, reason)


class ServiceTokenVerifier:
    """Accepts a bearer token only if it is valid and has the `service` role."""

    def __init__(
        self,
        auth_address: str,
        *,
        issuer: str = "switchboard-auth",
        audience: str = "switchboard",
    ) -> None:
        self._channel = grpc.aio.insecure_channel(auth_address)
        self._stub: Any = auth_service_pb2_grpc.AuthServiceStub(self._channel)
        self._issuer = issuer
        self._audience = audience
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        if kid not in self._keys:
            async with self._lock:
                if kid not in self._keys and time.monotonic() - self._fetched_at >= MIN_REFRESH_SECONDS:
                    self._fetched_at = time.monotonic()
                    try:
                        response = await self._stub.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=3.0)
                    except grpc.aio.AioRpcError:
                        return None
                    self._keys = {
                        key.kid: jwt.PyJWK({"kty": key.kty, "crv": key.crv, "x": key.x, "alg": key.alg})
                        for key in response.keys
                    }
        return self._keys.get(kid)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; raises `CallRefused` for anything but a valid service token."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            kid = None
        key = await self._key(kid) if isinstance(kid, str) else None
        if key is None:
            raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, "the access token is invalid", "TOKEN_INVALID")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise CallRefused(
                grpc.StatusCode.UNAUTHENTICATED, "the access token has expired", "TOKEN_EXPIRED"
            ) from None
        except jwt.InvalidTokenError:
            raise CallRefused(
                grpc.StatusCode.UNAUTHENTICATED, "the access token is invalid", "TOKEN_INVALID"
            ) from None
        if claims.get("role") != "service":
            raise CallRefused(
                grpc.StatusCode.PERMISSION_DENIED, "only services may call an agent worker", "ROLE_REQUIRED"
            )
        return claims

    async def authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Checks the call's bearer token, or aborts the call with the reason."""
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            if not token:
                raise CallRefused(
                    grpc.StatusCode.UNAUTHENTICATED, "this method needs a bearer token", "TOKEN_MISSING"
                )
            await self.verify(token)
        except CallRefused as refused:
            status = rpc_status.to_status(refused.status)
            await context.abort(status.code, status.details, status.trailing_metadata)

    async def close(self) -> None:
        await self._channel.close(grace=None)
