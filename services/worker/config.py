"""Built-in worker settings, from `SWITCHBOARD_WORKER_*` variables."""

from __future__ import annotations

import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceConfig

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


class WorkerConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_WORKER_", frozen=True, extra="ignore")

    service_name: str = "worker"
    port: int = Field(default=50055, ge=0, le=65535)
    registry_address: str = "127.0.0.1:50052"
    # The worker's own account (role service), for registering its agents.
    service_username: str = Field(default="svc-worker", min_length=1)
    service_password: str = Field(min_length=1)
    # host:port the executor should call; empty means host:port (the host name
    # when listening on every interface).
    advertise_address: str = ""
    # A quiet stream gets a heartbeat this often.
    heartbeat_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    # Registration retries until the registry answers, with this backoff.
    registration_initial_backoff_seconds: float = Field(default=0.2, gt=0, le=60)
    registration_max_backoff_seconds: float = Field(default=5.0, gt=0, le=300)

    def effective_advertise_address(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        host = socket.gethostname() if self.host in WILDCARD_HOSTS else self.host
        return f"{host}:{self.port}"
