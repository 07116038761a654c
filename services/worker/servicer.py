"""The AgentWorker service of the built-in worker: the SDK's servicer, behind
the shared interceptor stack, callable only by services (the executor)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.common.auth import Role
from services.common.interceptors import principal_of
from switchboard_client.worker import Worker


async def require_service(context: Any) -> None:
    # Users never call workers directly: the executor does, with its own token.
    principal_of(context).require_role(Role.SERVICE)


def add_to_server(worker: Worker, server: grpc.aio.Server) -> Sequence[str]:
    return worker.add_to_server(server, authorize=require_service)
