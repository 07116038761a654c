"""`make up`: start the whole suite as five processes on embedded storage.

On first start it generates the admin password and the service accounts'
credentials, keeps them in `<data dir>/credentials.json` (mode 0600) and says
where they are, and where each service serves its Prometheus metrics. Ctrl-C
stops every service gracefully (SIGTERM: in-flight RPCs finish, streams end).
The test harness starts services through the same code.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import DEFAULT_METRICS_PORTS
from services.common.server import SUPERVISOR_PID_VARIABLE

# Start order matters only for auth: everything else verifies tokens against it.
SERVICES: tuple[str, ...] = ("auth", "registry", "events", "worker", "executor")
DEFAULT_PORTS: Mapping[str, int] = {
    "auth": 50051,
    "registry": 50052,
    "executor": 50053,
    "events": 50054,
    "worker": 50055,
}
SERVICE_ACCOUNTS: Mapping[str, str] = {"executor": "svc-executor", "worker": "svc-worker"}


@dataclass(frozen=True)
class Credentials:
    admin_username: str
    admin_password: str
    # service name -> (username, password)
    service_accounts: Mapping[str, tuple[str, str]]

    @classmethod
    def generate(cls) -> Credentials:
        return cls(
            admin_username="admin",
            admin_password=secrets.token_urlsafe(18),
            service_accounts={
                svc: (user, secrets.token_urlsafe(24)) for svc, user in SERVICE_ACCOUNTS.items()
            },
        )

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[Credentials, bool]:
        if path.exists():
            data = json.loads(path.read_text())
            accounts = {svc: (v["username"], v["password"]) for svc, v in data["service_accounts"].items()}
            return cls(data["admin"]["username"], data["admin"]["password"], accounts), False
        credentials = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "admin": {"username": credentials.admin_username, "password": credentials.admin_password},
            "service_accounts": {
                svc: {"username": user, "password": pw}
                for svc, (user, pw) in credentials.service_accounts.items()
            },
        }
        # Created 0600 from the start: the secrets are never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
        return credentials, True


@dataclass(frozen=True)
class SuiteLayout:
    """Where every service listens and keeps its data."""

    data_dir: Path
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    host: str = "127.0.0.1"
    # Prometheus metrics ports; a service not listed (or 0) serves no metrics.
    metrics_ports: Mapping[str, int] = field(default_factory=dict)

    def address(self, service: str) -> str:
        return f"{self.host}:{self.ports[service]}"

    def metrics_url(self, service: str) -> str | None:
        port = self.metrics_ports.get(service, 0)
        return f"http://{self.host}:{port}/metrics" if port else None


def service_environment(
    service: str,
    layout: SuiteLayout,
    credentials: Credentials,
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment one service process starts with."""
    prefix = f"SWITCHBOARD_{service.upper()}_"
    env = dict(os.environ if base is None else base)
    env.update(
        {
            f"{prefix}HOST": layout.host,
            f"{prefix}PORT": str(layout.ports[service]),
            f"{prefix}DATA_DIR": str(layout.data_dir),
            f"{prefix}AUTH_ADDRESS": layout.address("auth"),
            f"{prefix}METRICS_HOST": layout.host,
            f"{prefix}METRICS_PORT": str(layout.metrics_ports.get(service, 0)),
        }
    )
    if service == "auth":
        env[f"{prefix}ADMIN_USERNAME"] = credentials.admin_username
        env[f"{prefix}ADMIN_PASSWORD"] = credentials.admin_password
        env[f"{prefix}SERVICE_ACCOUNTS"] = ",".join(
            f"{user}={password}" for user, password in credentials.service_accounts.values()
        )
    if service in ("executor", "worker"):
        env[f"{prefix}REGISTRY_ADDRESS"] = layout.address("registry")
        user, password = credentials.service_accounts[service]
        env[f"{prefix}SERVICE_USERNAME"] = user
        env[f"{prefix}SERVICE_PASSWORD"] = password
    if service == "executor":
        env[f"{prefix}EVENTS_ADDRESS"] = layout.address("events")
    env.update(extra or {})
    return env


class ServiceProcess:
    """One service as a child process: start, wait until SERVING, stop, kill."""

    def __init__(
        self, service: str, address: str, env: Mapping[str, str], log: IO[bytes] | None = None
    ) -> None:
        self.service = service
        self.address = address
        # The child stops when this process dies (services.common.server.follow_supervisor).
        # Said through the environment, not a preexec_fn: forking a process that
        # runs gRPC threads can abort the child before it execs.
        self.env = {**env, SUPERVISOR_PID_VARIABLE: str(os.getpid())}
        self._log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.service}"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def wait_serving(self, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.running:
                    code = self.process.returncode if self.process else None
                    raise RuntimeError(f"{self.service} exited with code {code} before serving")
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass  # not listening yet
                if loop.time() > deadline:
                    raise TimeoutError(f"{self.service} not SERVING at {self.address} after {timeout:.0f}s")
                await asyncio.sleep(0.1)

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then wait for a graceful exit (SIGKILL past the timeout)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def start_services(processes: Sequence[ServiceProcess], timeout: float = 60.0) -> None:
    """Auth first and SERVING, then the rest together."""
    first = [p for p in processes if p.service == "auth"]
    rest = [p for p in processes if p.service != "auth"]
    for group in (first, rest):
        for process in group:
            process.start()
        await asyncio.gather(*(process.wait_serving(timeout) for process in group))


def ports_from_environment(
    setting: str = "PORT", defaults: Mapping[str, int] = DEFAULT_PORTS
) -> dict[str, int]:
    """DESIGN.md's ports, unless `SWITCHBOARD_<SVC>_PORT` says otherwise; with
    `setting="METRICS_PORT"` and DEFAULT_METRICS_PORTS, the metrics ports (0: off)."""
    lowest = 1 if setting == "PORT" else 0
    ports = {}
    for service, default in defaults.items():
        name = f"SWITCHBOARD_{service.upper()}_{setting}"
        value = os.environ.get(name, str(default))
        if not value.isdigit() or not lowest <= int(value) < 65536:
            raise SystemExit(f"invalid configuration: {name}={value!r} is not a TCP port")
        ports[service] = int(value)
    return ports


async def _main(data_dir: Path, ports: Mapping[str, int], metrics_ports: Mapping[str, int]) -> int:
    layout = SuiteLayout(data_dir=data_dir, ports=ports, metrics_ports=metrics_ports)
    credentials_path = data_dir / "credentials.json"
    credentials, created = Credentials.load_or_create(credentials_path)
    processes = [
        ServiceProcess(service, layout.address(service), service_environment(service, layout, credentials))
        for service in SERVICES
    ]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await start_services(processes)
    except (RuntimeError, TimeoutError) as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        await asyncio.gather(*(p.stop() for p in processes))
        return 1
    print("\nSwitchboard is up:", flush=True)
    for service in sorted(SERVICES, key=lambda s: layout.ports[s]):
        metrics_url = layout.metrics_url(service)
        metrics = f"   metrics {metrics_url}" if metrics_url else ""
        print(f"  {service:<9} {layout.address(service):<21}{metrics}")
    print(f"\nStorage: {data_dir}")
    state = "generated" if created else "kept"
    print(f"Admin and service credentials ({state}): {credentials_path} (mode 0600)")
    print(
        f"Log in as '{credentials.admin_username}' with the password stored there. Ctrl-C stops the suite.\n",
        flush=True,
    )
    await stopping.wait()
    print("\nstopping...")
    codes = await asyncio.gather(*(p.stop() for p in reversed(processes)))
    return 0 if all(code in (0, None) for code in codes) else 1


def main() -> None:
    data_dir = Path(os.environ.get("SWITCHBOARD_DATA_DIR", ".switchboard")).resolve()
    ports = ports_from_environment()
    metrics_ports = ports_from_environment("METRICS_PORT", DEFAULT_METRICS_PORTS)
    raise SystemExit(asyncio.run(_main(data_dir, ports, metrics_ports)))


if __name__ == "__main__":
    main()
