"""Registry settings, from `SWITCHBOARD_REGISTRY_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceConfig


class RegistryConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_REGISTRY_", frozen=True, extra="ignore")

    service_name: str = "registry"
    port: int = Field(default=50052, ge=0, le=65535)
    # How long a write's request_id is remembered: a repeat within this window
    # returns the first answer.
    idempotency_retention_seconds: float = Field(default=24 * 3600.0, ge=60, le=30 * 24 * 3600)
