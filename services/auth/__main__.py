"""`python -m services.auth`: wires storage, keys, domain and servicer into the shared server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import argon2
import grpc
from switchboard.auth.v1 import auth_service_pb2_grpc

from services.auth.config import AuthConfig
from services.auth.domain import AdminPasswordRequired, AuthDomain, BootstrapError, Repeating, Settings
from services.auth.servicer import PUBLIC_METHODS, SERVICE_NAME, AuthServicer
from services.auth.storage import create_storage
from services.auth.tokens import KeyRing, LocalRevocations, Passwords, TokenIssuer
from services.common.auth import TokenVerifier
from services.common.config import ConfigError, load_config
from services.common.convert import utcnow
from services.common.db import migrate
from services.common.server import Runtime, ServiceParts, database_ready, run

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("switchboard.auth")


def _stop(message: str) -> ConfigError:
    print(f"auth: {message}", file=sys.stderr)
    log.error(message)
    return ConfigError(2)


async def build(runtime: Runtime) -> ServiceParts:
    config = runtime.config
    assert isinstance(config, AuthConfig)
    url = config.effective_database_url()
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    storage = create_storage(url)
    keys = KeyRing(
        storage,
        rotation_seconds=config.key_rotation_seconds,
        access_ttl_seconds=config.access_token_ttl_seconds,
        check_seconds=config.key_check_seconds,
        clock=utcnow,
    )
    issuer = TokenIssuer(
        keys,
        issuer=config.token_issuer,
        audience=config.token_audience,
        access_ttl_seconds=config.access_token_ttl_seconds,
    )
    revocations = LocalRevocations(storage, utcnow)
    passwords = Passwords(
        argon2.PasswordHasher(
            time_cost=config.argon2_time_cost,
            memory_cost=config.argon2_memory_kib,
            parallelism=config.argon2_parallelism,
            type=argon2.Type.ID,
        )
    )
    domain = AuthDomain(
        storage,
        passwords,
        keys,
        issuer,
        revocations,
        Settings(
            refresh_ttl_seconds=config.refresh_token_ttl_seconds,
            login_max_failures=config.login_max_failures,
            login_failure_window_seconds=config.login_failure_window_seconds,
        ),
        utcnow,
    )
    admin_password = config.admin_password.get_secret_value() if config.admin_password else None
    try:
        await domain.bootstrap(config.admin_username, admin_password, config.service_account_credentials())
    except AdminPasswordRequired:
        await storage.close()
        raise _stop(
            "SWITCHBOARD_AUTH_ADMIN_PASSWORD is required: no admin exists yet "
            f"(SWITCHBOARD_AUTH_ADMIN_USERNAME={config.admin_username!r})"
        ) from None
    except BootstrapError as exc:
        await storage.close()
        raise _stop(
            f"cannot start: {exc} (check SWITCHBOARD_AUTH_ADMIN_USERNAME and SWITCHBOARD_AUTH_SERVICE_ACCOUNTS)"
        ) from None
    await domain.start_up()

    # Auth verifies tokens like every service, but from its own keys and revocations.
    verifier = TokenVerifier(keys, revocations, config.token_issuer, config.token_audience)
    servicer = AuthServicer(domain)
    background = Repeating()

    def add_to_server(server: grpc.aio.Server) -> Sequence[str]:
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    async def ready() -> bool:
        return await database_ready(storage.engine) and keys.ready and revocations.synced

    async def start_background() -> None:
        background.start("revocation-poll", revocations.refresh, config.revocation_poll_seconds)
        background.start("key-rotation", domain.maintain, config.key_check_seconds)

    async def stop() -> None:
        await background.stop()
        await storage.close()

    return ServiceParts(
        add_to_server=add_to_server,
        verifier=verifier,
        check_ready=ready,
        public_methods=PUBLIC_METHODS,
        on_start=[start_background],
        on_stop=[stop],
    )


def main() -> None:
    run(load_config(AuthConfig), build)


if __name__ == "__main__":
    main()
