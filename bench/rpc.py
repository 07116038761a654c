"""RPC overhead: GetRun through the full stack (token verification, tracing,
access log, error mapping, the executor's storage) with 64 calls in flight,
like the bare echo baseline, on one channel."""

from __future__ import annotations

from typing import Any

from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc

from bench.backends import BenchSuite
from bench.load import Throughput, closed_loop
from bench.runs import AGENT, AGENT_INPUT
from tests.harness.clients import finished_run, struct
from tests.harness.suite import metadata

IN_FLIGHT = 64
WARM_UP_SECONDS = 0.2


async def finished_run_id(bench: BenchSuite) -> str:
    """A run of the first bench user's that has ended: the one GetRun reads."""
    user = bench.users[0]
    executor: Any = executor_service_pb2_grpc.ExecutorServiceStub(bench.suite.channel("executor"))
    response = await executor.StartRun(
        executor_service_pb2.StartRunRequest(agent=AGENT, input=struct(AGENT_INPUT)),
        metadata=metadata(user.token),
        timeout=60,
    )
    run = await finished_run(bench.suite, user.token, response.run.run_id)
    return str(run.run_id)


async def get_run_throughput(
    bench: BenchSuite, run_id: str, seconds: float, in_flight: int = IN_FLIGHT
) -> Throughput:
    executor: Any = executor_service_pb2_grpc.ExecutorServiceStub(bench.suite.channel("executor"))
    request = executor_service_pb2.GetRunRequest(run_id=run_id)
    user_metadata = metadata(bench.users[0].token)

    async def call() -> None:
        response = await executor.GetRun(request, metadata=user_metadata, timeout=30)
        if response.run.run_id != run_id:
            raise RuntimeError("GetRun answered another run")

    await closed_loop(call, in_flight, WARM_UP_SECONDS)
    return await closed_loop(call, in_flight, seconds)
