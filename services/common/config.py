"""Typed, frozen configuration from `SWITCHBOARD_<SERVICE>_<NAME>` variables.

Each service declares one subclass of `ServiceConfig` in its own `config.py`
and loads it with `load_config`; a bad or missing value stops the process at
once with a message naming the variable.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ConfigT = TypeVar("ConfigT", bound="ServiceConfig")

MIB = 1024 * 1024

# Where each service serves its Prometheus metrics unless SWITCHBOARD_<SVC>_METRICS_PORT
# says otherwise: DESIGN.md's gRPC ports' order, clear of them (0 turns metrics off).
DEFAULT_METRICS_PORTS: dict[str, int] = {
    "auth": 9151,
    "registry": 9152,
    "executor": 9153,
    "events": 9154,
    "worker": 9155,
}


class ConfigError(SystemExit):
    """Raised at start-up; its message names the offending variable."""


class ServiceConfig(BaseSettings):
    """Settings every service has. Subclasses set `env_prefix` and `port`."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    host: str = "127.0.0.1"
    port: int = 0
    # Where embedded storage and the local trace file live.
    data_dir: Path = Path(".switchboard")
    # SQLAlchemy URL; empty means SQLite under data_dir.
    database_url: str = ""
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    # Local trace file, used when OTEL_EXPORTER_OTLP_ENDPOINT is not set.
    trace_file: Path | None = None
    # Largest request or response accepted, in bytes.
    max_message_bytes: int = Field(default=4 * MIB, ge=64 * 1024, le=64 * MIB)
    # How long in-flight RPCs may take to finish on shutdown.
    shutdown_grace_seconds: float = Field(default=5.0, ge=0, le=120)
    # The auth service, for the signing key set and the revocation feed.
    auth_address: str = "127.0.0.1:50051"
    token_issuer: str = "switchboard-auth"
    token_audience: str = "switchboard"
    # How often revocations are polled: a revoked token is refused within this
    # plus one round trip.
    revocation_poll_seconds: float = Field(default=1.0, gt=0, le=5)
    # Prometheus metrics at http://<metrics_host>:<metrics_port>/metrics. None
    # means this service's entry in DEFAULT_METRICS_PORTS; 0 serves no metrics.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    service_name: str = ""  # set by each subclass

    # A validator rather than Field bounds: subclasses override `port`'s default,
    # which would drop bounds declared on the field here.
    @field_validator("port")
    @classmethod
    def _port_in_range(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError("must be a TCP port, 0-65535")
        return value

    @model_validator(mode="after")
    def _resolve_defaults(self) -> Self:
        if self.trace_file is None:
            object.__setattr__(self, "trace_file", self.data_dir / "traces.jsonl")
        if self.metrics_port is None:
            object.__setattr__(self, "metrics_port", DEFAULT_METRICS_PORTS.get(self.service_name, 0))
        return self

    def variable(self, name: str) -> str:
        """The environment variable of a setting, for messages: `variable("metrics_port")`."""
        return f"{self.model_config.get('env_prefix', '')}{name}".upper()

    def sqlite_path(self) -> Path:
        return self.data_dir / f"{self.service_name}.db"

    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path()}"

    @property
    def listen_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the metrics endpoint, or None when it is turned off."""
        return (self.metrics_host, self.metrics_port) if self.metrics_port else None


def load_config(cls: type[ConfigT], **overrides: Any) -> ConfigT:
    """Read `cls` from the environment, or stop naming the bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        lines = []
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper()
            lines.append(f"  {prefix}{name}: {error['msg']}")
        message = "invalid configuration:\n" + "\n".join(lines)
        print(message, file=sys.stderr)
        raise ConfigError(2) from None
