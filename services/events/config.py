"""Events settings, from `SWITCHBOARD_EVENTS_*` variables."""

from __future__ import annotations

from pydantic import Field
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
