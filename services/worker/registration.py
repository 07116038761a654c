"""Registers the built-in agents in the registry at start-up, with the worker's
own service credentials, retrying with backoff until the registry answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import grpc
from switchboard.registry.v1 import registry_service_pb2_grpc

from services.common.channels import ServiceCredentials
from switchboard_client.worker import Worker

log = logging.getLogger("switchboard.worker.registration")


class Registration:
    def __init__(
        self,
        worker: Worker,
        registry: registry_service_pb2_grpc.RegistryServiceAsyncStub,
        credentials: ServiceCredentials,
        endpoint: str,
        *,
        initial_backoff: float,
        max_backoff: float,
    ) -> None:
        self._worker = worker
        self._registry = registry
        self._credentials = credentials
        self._endpoint = endpoint
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()

    async def register_once(self) -> None:
        metadata = await self._credentials.metadata()
        agents = await self._worker.register(self._registry, self._endpoint, metadata)
        log.info(
            "agents registered",
            extra={"endpoint": self._endpoint, "agents": [agent.name for agent in agents]},
        )

    async def run(self) -> None:
        delay = self._initial_backoff
        while True:
            try:
                await self.register_once()
            except grpc.aio.AioRpcError as exc:
                # Auth or the registry may still be starting: try again later.
                log.warning(
                    "could not register agents yet",
                    extra={"code": exc.code().name, "retry_in_seconds": round(delay, 2)},
                )
            else:
                self.done.set()
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._max_backoff)

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="agent-registration")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
