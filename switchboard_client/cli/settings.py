"""Where the services are and where the CLI keeps its files: flag, else environment, else default."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SERVICES = ("auth", "registry", "executor", "events")
# The ports of DESIGN.md, on the loopback interface (what `make up` serves).
DEFAULT_ADDRESSES: Mapping[str, str] = {
    "auth": "127.0.0.1:50051",
    "registry": "127.0.0.1:50052",
    "executor": "127.0.0.1:50053",
    "events": "127.0.0.1:50054",
}
DEFAULT_DATA_DIR = Path(".switchboard")
TRACE_FILE_NAME = "traces.jsonl"
TRACE_FILE_VARIABLE = "SWITCHBOARD_TRACE_FILE"
JAEGER_VARIABLE = "SWITCHBOARD_JAEGER_URL"


def address_variable(service: str) -> str:
    return f"SWITCHBOARD_{service.upper()}_ADDRESS"


@dataclass(frozen=True)
class Endpoints:
    auth: str
    registry: str
    executor: str
    events: str

    @classmethod
    def resolve(cls, flags: Mapping[str, str | None], env: Mapping[str, str]) -> Endpoints:
        values = {
            service: flags.get(service) or env.get(address_variable(service)) or DEFAULT_ADDRESSES[service]
            for service in SERVICES
        }
        return cls(**values)

    def of(self, service: str) -> str:
        address: str = getattr(self, service)
        return address


def config_dir(env: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CONFIG_HOME/switchboard, ~/.config/switchboard without it (a relative one is ignored, per XDG)."""
    base = env.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "switchboard"


def default_trace_file(env: Mapping[str, str] = os.environ) -> Path:
    """Where the services write spans when no OTLP endpoint is set: `traces.jsonl` in their
    data dir, `.switchboard/` under the directory `make up` ran in."""
    return Path(env.get(TRACE_FILE_VARIABLE) or DEFAULT_DATA_DIR / TRACE_FILE_NAME)
