"""Client channels for calling other services: one per target per process,
traced, with keepalive, retries for UNAVAILABLE only, and timeouts derived from
the caller's remaining deadline. Service-to-service calls carry the calling
service's own token (`ServiceCredentials`), never a user's.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc

from services.common.config import MIB

_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    # A peer that was down for minutes is called again within seconds of its
    # return (gRPC's default backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _RETRY_SERVICE_CONFIG),
    ("grpc.max_receive_message_length", 16 * MIB),
    ("grpc.max_send_message_length", 16 * MIB),
]


class ServiceChannels:
    """One channel per target, shared by every caller in the process."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                target, options=CHANNEL_OPTIONS, interceptors=aio_client_interceptors()
            )
            self._channels[target] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close(grace=None) for channel in channels))


def timeout_within(deadline: float | None, ceiling: float) -> float:
    """A call timeout that never outlives the caller's deadline (time.monotonic())."""
    if deadline is None:
        return ceiling
    return max(0.001, min(ceiling, deadline - time.monotonic()))


class ServiceCredentials:
    """A service's own identity: logs in with its account and keeps a fresh token."""

    # Renew this long before the token expires.
    RENEW_MARGIN_SECONDS = 30.0

    def __init__(
        self, auth: auth_service_pb2_grpc.AuthServiceAsyncStub, username: str, password: str
    ) -> None:
        self._auth = auth
        self._username = username
        self._password = password
        self._token = ""
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        if time.time() < self._expires_at - self.RENEW_MARGIN_SECONDS:
            return self._token
        async with self._lock:
            if time.time() >= self._expires_at - self.RENEW_MARGIN_SECONDS:
                response = await self._auth.Login(
                    auth_service_pb2.LoginRequest(
                        password=auth_service_pb2.PasswordCredentials(
                            username=self._username, password=self._password
                        )
                    ),
                    timeout=5.0,
                )
                self._token = response.tokens.access_token
                self._expires_at = response.tokens.access_token_expire_time.ToSeconds()
        return self._token

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {await self.token()}"),)
