"""The suite as real processes on free loopback ports, through the same code as `make up`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc, user_pb2

from services.launcher import (
    SERVICES,
    Credentials,
    ServiceProcess,
    SuiteLayout,
    service_environment,
    start_services,
)

ROLES = {"admin": user_pb2.ROLE_ADMIN, "user": user_pb2.ROLE_USER, "service": user_pb2.ROLE_SERVICE}
TEST_PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (each socket stays bound until all are picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)
        ]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Suite:
    root: Path
    layout: SuiteLayout
    credentials: Credentials
    processes: dict[str, ServiceProcess]
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    @property
    def address(self) -> dict[str, str]:
        return {service: self.layout.address(service) for service in self.layout.ports}

    @property
    def admin_username(self) -> str:
        return self.credentials.admin_username

    @property
    def admin_password(self) -> str:
        return self.credentials.admin_password

    def service_password(self, name: str) -> str:
        """Password of a service account, by service ("executor") or username ("svc-executor")."""
        for service, (username, password) in self.credentials.service_accounts.items():
            if name in (service, username):
                return password
        raise KeyError(name)

    @property
    def metrics_url(self) -> dict[str, str]:
        """Where each service serves its Prometheus metrics."""
        return {service: url for service in self.layout.ports if (url := self.layout.metrics_url(service))}

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel(self.layout.address(service))
        return self._channels[service]

    @staticmethod
    def metadata(token: str) -> tuple[tuple[str, str], ...]:
        return metadata(token)

    def auth_stub(self) -> auth_service_pb2_grpc.AuthServiceAsyncStub:
        return auth_service_pb2_grpc.AuthServiceStub(self.channel("auth"))  # type: ignore[return-value]

    async def login(self, username: str, password: str) -> str:
        response = await self.auth_stub().Login(
            auth_service_pb2.LoginRequest(
                password=auth_service_pb2.PasswordCredentials(username=username, password=password)
            ),
            timeout=10,
        )
        return response.tokens.access_token

    async def admin_token(self) -> str:
        return await self.login(self.admin_username, self.admin_password)

    async def create_user(self, username: str, role: str = "user") -> tuple[str, str]:
        """Creates a user (as admin) and returns (user_id, access token)."""
        response = await self.auth_stub().CreateUser(
            auth_service_pb2.CreateUserRequest(username=username, password=TEST_PASSWORD, role=ROLES[role]),
            metadata=metadata(await self.admin_token()),
            timeout=10,
        )
        return response.user.user_id, await self.login(username, TEST_PASSWORD)

    async def stop(self, service: str) -> int | None:
        return await self.processes[service].stop()

    def kill(self, service: str) -> None:
        self.processes[service].kill()

    async def start(self, service: str) -> None:
        process = self.processes[service]
        process.start()
        try:
            await process.wait_serving()
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- {service} log ---\n{self.logs(service)[-4000:]}") from None

    def logs(self, service: str) -> str:
        path = self.root / "logs" / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spans(self) -> list[dict[str, Any]]:
        """The spans every service has written to the suite's trace file so far
        (the default exporter when no OTLP endpoint is set), as JSON objects."""
        path = self.layout.data_dir / "traces.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
        await asyncio.gather(*(process.stop() for process in self.processes.values()))
        for log in self._logs.values():
            log.close()


@contextlib.asynccontextmanager
async def start_suite(
    root: Path,
    services: Iterable[str] = SERVICES,
    env: Mapping[str, Mapping[str, str]] | None = None,
    database_urls: Mapping[str, str] | None = None,
    otlp_endpoint: str | None = None,
) -> AsyncIterator[Suite]:
    """Starts `services` (auth first) on free ports and stops them all afterwards."""
    wanted = [service for service in SERVICES if service in set(services)]
    ports = iter(free_ports(2 * len(SERVICES)))
    layout = SuiteLayout(
        data_dir=root / "data",
        ports={service: next(ports) for service in SERVICES},
        metrics_ports={service: next(ports) for service in SERVICES},
    )
    credentials = Credentials.generate()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    suite = Suite(root, layout, credentials, {})
    for service in wanted:
        prefix = f"SWITCHBOARD_{service.upper()}_"
        extra = {
            f"{prefix}LOG_LEVEL": "INFO",
            # Spans reach the file or the OTLP sink quickly, for cross-process checks.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        if otlp_endpoint:
            extra["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
            extra["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
        if database_urls and service in database_urls:
            extra[f"{prefix}DATABASE_URL"] = database_urls[service]
        extra.update((env or {}).get(service, {}))
        log = (root / "logs" / f"{service}.log").open("ab")
        suite._logs[service] = log
        suite.processes[service] = ServiceProcess(
            service, layout.address(service), service_environment(service, layout, credentials, extra), log
        )
    try:
        try:
            await start_services(list(suite.processes.values()))
        except (RuntimeError, TimeoutError) as exc:
            tails = "\n".join(f"--- {s} log ---\n{suite.logs(s)[-3000:]}" for s in wanted)
            raise RuntimeError(f"{exc}\n{tails}") from None
        yield suite
    finally:
        await suite.close()
