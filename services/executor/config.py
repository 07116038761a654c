"""The executor's configuration, from `SWITCHBOARD_EXECUTOR_*` variables."""

from __future__ import annotations

import socket
import uuid
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.config import ServiceConfig

DAY_SECONDS = 24 * 3600.0


class ExecutorConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_EXECUTOR_", frozen=True, extra="ignore")

    service_name: str = "executor"
    port: int = Field(default=50053, ge=0, le=65535)

    registry_address: str = "127.0.0.1:50052"
    events_address: str = "127.0.0.1:50054"
    # The executor's own account (role service), for the registry, the events
    # service and the agent workers. No default password: auth creates the
    # account from SWITCHBOARD_AUTH_SERVICE_ACCOUNTS.
    service_username: str = Field(default="svc-executor", min_length=1)
    service_password: str = Field(min_length=1)

    # Deadline of a run whose StartRun names no timeout, and the longest allowed.
    default_run_timeout_seconds: float = Field(default=300.0, gt=0, le=DAY_SECONDS)
    max_run_timeout_seconds: float = Field(default=DAY_SECONDS, gt=0, le=DAY_SECONDS)
    # Admission: runs past either limit wait QUEUED.
    max_active_runs_per_user: int = Field(default=2, ge=1, le=10_000)
    max_active_runs: int = Field(default=200, ge=1, le=100_000)
    # Past this many waiting runs of one user, StartRun answers
    # RESOURCE_EXHAUSTED (USER_QUEUE_FULL), with a RetryInfo of this delay.
    max_queued_runs_per_user: int = Field(default=1000, ge=1, le=1_000_000)
    queue_full_retry_after_seconds: float = Field(default=5.0, gt=0, le=3600)
    # Admission also looks at the queue this often, so that a raised
    # max_concurrency takes effect when nothing else happens.
    admission_poll_seconds: float = Field(default=1.0, gt=0, le=60)

    # Replicas (several executors on one PostgreSQL database). This process's
    # name among them; empty: "<host name>:<port>", so that a replica that
    # restarts where it ran takes its own runs back at once.
    replica_id: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9._:@-]*$")
    # A replica holds each run it executes under a lease of this length,
    # renewed every third of it. When a replica dies, the others take its
    # runs over once their leases expire (a shorter lease: a quicker takeover,
    # more renewals).
    lease_seconds: float = Field(default=10.0, ge=1, le=600)

    # The circuit breaker of each agent endpoint: this many consecutive failed
    # attempts open it; after the reset timeout, up to `half_open_max_calls`
    # trial calls go through and `success_threshold` successes close it.
    breaker_failure_threshold: int = Field(default=5, ge=1, le=1000)
    breaker_reset_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    breaker_half_open_max_calls: int = Field(default=1, ge=1, le=1000)
    breaker_success_threshold: int = Field(default=1, ge=1, le=1000)

    # A failed or cancelled workflow's compensations, all together, get this
    # long (the run's own deadline may already have passed).
    compensation_timeout_seconds: float = Field(default=60.0, gt=0, le=DAY_SECONDS)

    # Agent definitions are cached this long (changes apply within it).
    agent_cache_seconds: float = Field(default=5.0, ge=0, le=5)
    # Timeout of one call to the registry.
    registry_call_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    # StartRun waits at most this long for RUN_QUEUED to reach the events
    # service, so a client that subscribes right after finds the run.
    publish_wait_seconds: float = Field(default=1.0, ge=0, le=10)
    # Outbox relay: rows per Publish, periodic sweep, backoff while events is down.
    outbox_batch_size: int = Field(default=200, ge=1, le=500)
    outbox_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    outbox_initial_backoff_seconds: float = Field(default=0.2, gt=0, le=60)
    outbox_max_backoff_seconds: float = Field(default=5.0, gt=0, le=300)
    publish_call_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    # WaitRun with no timeout and no call deadline waits this long.
    wait_run_default_seconds: float = Field(default=60.0, gt=0, le=3600)

    def effective_replica_id(self) -> str:
        if self.replica_id:
            return self.replica_id
        # Port 0 picks a new port at every start: a name of its own then.
        where = str(self.port) if self.port else uuid.uuid4().hex[:12]
        return f"{socket.gethostname()[: 63 - len(where)]}:{where}"

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        if self.default_run_timeout_seconds > self.max_run_timeout_seconds:
            raise ValueError(
                "SWITCHBOARD_EXECUTOR_DEFAULT_RUN_TIMEOUT_SECONDS must not exceed "
                "SWITCHBOARD_EXECUTOR_MAX_RUN_TIMEOUT_SECONDS"
            )
        if self.outbox_initial_backoff_seconds > self.outbox_max_backoff_seconds:
            raise ValueError(
                "SWITCHBOARD_EXECUTOR_OUTBOX_INITIAL_BACKOFF_SECONDS must not exceed "
                "SWITCHBOARD_EXECUTOR_OUTBOX_MAX_BACKOFF_SECONDS"
            )
        return self
