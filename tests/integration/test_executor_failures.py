"""Failure handling through real processes (auth, registry, events, executor,
the built-in worker and its chaos agent): retries per the agent's policy,
heartbeat timeouts, the circuit breaker, cancellation reaching the worker,
and an executor killed mid-run.

The suite is this module's own: its tests change the chaos agent's policy."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import datetime
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2
from switchboard.events.v1 import event_pb2
from switchboard.executor.v1 import executor_service_pb2, run_pb2
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from tests.harness.clients import completed_events, finished_run, plain, struct
from tests.harness.clients import executor_stub as executor
from tests.harness.clients import get_run as get
from tests.harness.suite import Suite, free_port, start_suite

PATIENCE_SECONDS = 60.0


def finished(suite: Suite, token: str, run_id: str) -> Coroutine[Any, Any, run_pb2.Run]:
    return finished_run(suite, token, run_id, PATIENCE_SECONDS)


BREAKER_THRESHOLD = 5


@pytest.fixture(scope="module")
async def suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    async with start_suite(
        tmp_path_factory.mktemp("executor-failures"),
        env={
            "executor": {"SWITCHBOARD_EXECUTOR_BREAKER_FAILURE_THRESHOLD": str(BREAKER_THRESHOLD)},
            # Heartbeats well inside the chaos agent's heartbeat timeout below,
            # even on a busy machine.
            "worker": {"SWITCHBOARD_WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.3"},
        },
    ) as running:
        # Before any run, so the executor's agent cache starts with this policy.
        await update_agent(
            running,
            agent_pb2.Agent(
                name="chaos",
                heartbeat_timeout=duration_pb2.Duration(seconds=1, nanos=500_000_000),
                retry_policy=agent_pb2.RetryPolicy(
                    max_attempts=3,
                    initial_backoff=duration_pb2.Duration(nanos=200_000_000),
                    max_backoff=duration_pb2.Duration(nanos=500_000_000),
                    non_retryable_reasons=["PERMANENT"],
                ),
            ),
            ["heartbeat_timeout", "retry_policy"],
        )
        yield running


def registry(suite: Suite) -> Any:
    return registry_service_pb2_grpc.RegistryServiceStub(suite.channel("registry"))


async def update_agent(suite: Suite, agent: agent_pb2.Agent, paths: list[str]) -> None:
    await registry(suite).UpdateAgent(
        registry_service_pb2.UpdateAgentRequest(
            agent=agent, update_mask=field_mask_pb2.FieldMask(paths=paths)
        ),
        metadata=suite.metadata(await suite.admin_token()),
        timeout=10,
    )


def reason(status: Any) -> str:
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Unpack(info):
            return info.reason
    return ""


async def user(suite: Suite, name: str) -> str:
    return (await suite.create_user(f"{name}-{uuid.uuid4().hex[:8]}"))[1]


async def start(suite: Suite, token: str, agent: str, input: dict[str, Any]) -> run_pb2.Run:
    response = await executor(suite).StartRun(
        executor_service_pb2.StartRunRequest(agent=agent, input=struct(input)),
        metadata=suite.metadata(token),
        timeout=30,
    )
    return response.run


async def attempt_running(suite: Suite, token: str, run_id: str, attempt: int) -> run_pb2.Run:
    async with asyncio.timeout(PATIENCE_SECONDS):
        while True:
            run = await get(suite, token, run_id)
            (step,) = run.steps
            if step.state == run_pb2.STEP_STATE_RUNNING and step.attempts >= attempt:
                assert step.attempts == attempt, run
                return run
            await asyncio.sleep(0.1)


async def events_of(suite: Suite, token: str, run_id: str) -> list[event_pb2.Event]:
    return await completed_events(suite, token, run_id, PATIENCE_SECONDS)


def worker_spans(suite: Suite, run_id: str) -> list[dict[str, Any]]:
    """The built-in worker's spans of the run's agent calls (from the suite's trace file)."""
    path = suite.root / "data" / "traces.jsonl"
    spans = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
    return [
        span
        for span in spans
        if span.get("name") == "agent chaos"
        and span.get("attributes", {}).get("switchboard.run_id") == run_id
    ]


async def test_failed_attempts_are_retried_with_backoff_until_one_succeeds(suite: Suite) -> None:
    token = await user(suite, "ivan")
    started = await start(suite, token, "chaos", {"fail_attempts": 2, "reason": "FLAKY", "thoughts": 0})

    done = await finished(suite, token, started.run_id)

    assert done.state == run_pb2.RUN_STATE_SUCCEEDED
    (step,) = done.steps
    assert (step.state, step.attempts) == (run_pb2.STEP_STATE_SUCCEEDED, 3)
    assert reason(step.error) == "FLAKY"  # the last failed attempt's error stays on the step
    assert plain(done.output)["attempt"] == 3
    history = await events_of(suite, token, started.run_id)
    failures = [e for e in history if e.type == event_pb2.EVENT_TYPE_AGENT_FAILED]
    assert [int(plain(e.payload)["attempt"]) for e in failures] == [1, 2]
    assert all(0.1 <= plain(e.payload)["retry_in_seconds"] <= 0.5 for e in failures)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))


async def test_a_reason_the_policy_names_is_not_retried(suite: Suite) -> None:
    token = await user(suite, "judy")
    started = await start(suite, token, "chaos", {"action": "fail", "reason": "PERMANENT"})

    done = await finished(suite, token, started.run_id)

    assert done.state == run_pb2.RUN_STATE_FAILED
    assert reason(done.error) == "PERMANENT"
    assert done.steps[0].attempts == 1


async def test_a_worker_that_stops_heartbeating_is_declared_dead_and_retried(suite: Suite) -> None:
    token = await user(suite, "kim")
    started = await start(suite, token, "chaos", {"action": "stop_heartbeats", "thoughts": 0})

    done = await finished(suite, token, started.run_id)

    assert done.state == run_pb2.RUN_STATE_FAILED
    assert done.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert reason(done.error) == "HEARTBEAT_TIMEOUT"
    assert done.steps[0].attempts == 3
    # Each silent call was cancelled at the worker.
    async with asyncio.timeout(PATIENCE_SECONDS):
        while len(worker_spans(suite, started.run_id)) < 3:  # noqa: ASYNC110 - a file to poll
            await asyncio.sleep(0.2)
    spans = worker_spans(suite, started.run_id)
    assert all(any(e["name"] == "cancelled" for e in span["events"]) for span in spans)


async def test_the_breaker_opens_after_consecutive_failures_and_attempts_then_fail_fast(suite: Suite) -> None:
    name = f"dead-end-{uuid.uuid4().hex[:8]}"
    await registry(suite).RegisterAgent(
        registry_service_pb2.RegisterAgentRequest(
            agent=agent_pb2.Agent(
                name=name,
                endpoint=f"127.0.0.1:{free_port()}",  # nothing listens there
                retry_policy=agent_pb2.RetryPolicy(max_attempts=1),
            )
        ),
        metadata=suite.metadata(await suite.admin_token()),
        timeout=10,
    )
    token = await user(suite, "leo")
    for _ in range(BREAKER_THRESHOLD):
        failed = await finished(suite, token, (await start(suite, token, name, {})).run_id)
        assert reason(failed.error) == "WORKER_UNAVAILABLE"

    fast = await finished(suite, token, (await start(suite, token, name, {})).run_id)

    assert fast.state == run_pb2.RUN_STATE_FAILED
    assert fast.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert reason(fast.error) == "CIRCUIT_OPEN"
    assert "paused" in fast.error.message
    # The built-in worker's own endpoint is not affected.
    other = await finished(suite, token, (await start(suite, token, "chaos", {"thoughts": 0})).run_id)
    assert other.state == run_pb2.RUN_STATE_SUCCEEDED


async def test_cancel_reaches_the_worker_within_a_second(suite: Suite) -> None:
    token = await user(suite, "mia")
    started = await start(suite, token, "chaos", {"action": "hang", "thoughts": 0})
    await attempt_running(suite, token, started.run_id, 1)

    asked = time.time()
    cancelled = await executor(suite).CancelRun(
        executor_service_pb2.CancelRunRequest(run_id=started.run_id, reason="enough"),
        metadata=suite.metadata(token),
        timeout=10,
    )

    assert cancelled.run.state == run_pb2.RUN_STATE_CANCELLED
    assert cancelled.run.steps[0].state == run_pb2.STEP_STATE_CANCELLED
    # The worker's span of the call ends when the agent was cancelled.
    async with asyncio.timeout(PATIENCE_SECONDS):
        while not worker_spans(suite, started.run_id):  # noqa: ASYNC110 - a file to poll
            await asyncio.sleep(0.1)
    (span,) = worker_spans(suite, started.run_id)
    assert any(e["name"] == "cancelled" for e in span["events"])
    ended = _epoch_seconds(span["end_time"])
    assert ended - asked < 1.0
    history = await events_of(suite, token, started.run_id)
    assert plain(history[-1].payload)["state"] == "RUN_STATE_CANCELLED"


def _epoch_seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_an_attempt_cut_off_by_an_executor_kill_is_retried_after_the_restart(suite: Suite) -> None:
    token = await user(suite, "noor")
    started = await start(suite, token, "chaos", {"action": "hang", "thoughts": 0})
    await attempt_running(suite, token, started.run_id, 1)

    suite.kill("executor")
    await suite.start("executor")

    recovered = await attempt_running(suite, token, started.run_id, 2)
    assert recovered.state == run_pb2.RUN_STATE_RUNNING
    assert reason(recovered.steps[0].error) == "EXECUTOR_RESTARTED"
    await executor(suite).CancelRun(
        executor_service_pb2.CancelRunRequest(run_id=started.run_id),
        metadata=suite.metadata(token),
        timeout=10,
    )
    history = await events_of(suite, token, started.run_id)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    interrupted = next(e for e in history if e.type == event_pb2.EVENT_TYPE_AGENT_FAILED)
    assert plain(interrupted.payload)["interrupted"] is True
