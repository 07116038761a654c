"""Events settings, from `SWITCHBOARD_EVENTS_*` variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceConfig


class EventsConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_EVENTS_", frozen=True, extra="ignore")

    service_name: str = "events"
    port: int = Field(default=50054, ge=0, le=65535)
    # Deliveries of one event to one consumer before it is dead-lettered.
    max_delivery_attempts: int = Field(default=5, ge=1, le=100)
    # An idle subscription gets a heartbeat this often.
    heartbeat_seconds: float = Field(default=10.0, gt=0, le=300)
    # Most deliveries in one EventBatch message.
    delivery_batch_size: int = Field(default=100, ge=1, le=1000)
    # Where the log lives: "sql" (SQLite under data_dir, or DATABASE_URL), or
    # "redis" (Redis Streams at REDIS_URL; several processes may share it).
    backend: Literal["sql", "redis"] = "sql"
    redis_url: str = Field(default="", validate_default=True)
    # Every key of this service starts with it: several suites (or tests) can share one Redis.
    redis_prefix: str = Field(default="switchboard:events:", min_length=1, max_length=200)
    # Connections to Redis this process opens at most; more operations at once wait for one.
    redis_max_connections: int = Field(default=100, ge=2, le=10000)

    # Retention, in seconds (0: keep forever under that rule): events older than
    # MAX_AGE go whoever has read them; events older than SETTLED_AGE go once
    # every durable consumer of their run has settled them.
    retention_max_age_seconds: float = Field(default=0.0, ge=0)
    retention_settled_age_seconds: float = Field(default=0.0, ge=0)
    # How often retention runs (when a rule is on).
    retention_interval_seconds: float = Field(default=60.0, gt=0, le=86400)

    @field_validator("redis_url")
    @classmethod
    def _redis_url_for_redis(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("backend") == "redis":
            if not value:
                raise ValueError("is required when SWITCHBOARD_EVENTS_BACKEND=redis")
            if not value.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value
