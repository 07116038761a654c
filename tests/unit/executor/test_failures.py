"""Failure handling in-process: retries per the agent's policy, the circuit
breaker per endpoint, heartbeat timeouts retried, and per-agent limits at
admission (with a real gRPC worker and real storage)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from services.executor.breaker import CIRCUIT_OPEN, BreakerSettings, BreakerState
from services.executor.domain import (
    HEARTBEAT_TIMEOUT,
    MAIN_STEP,
    WORKER_UNAVAILABLE,
    EventType,
    RunState,
    StepState,
)
from services.executor.retry import RetrySettings
from services.executor.runs import StartRunCommand
from tests.unit.executor.conftest import ALICE, BOB, RigFactory, agent_spec

QUICK: dict[str, Any] = {"initial_backoff_seconds": 0.01, "max_backoff_seconds": 0.02}


def command(agent: str, **input: object) -> StartRunCommand:
    return StartRunCommand(agent=agent, input=dict(input))


def dead_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_failed_attempts_are_retried_until_one_succeeds(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.agents.specs["flaky"] = agent_spec(
        "flaky", rig.endpoint, retry=RetrySettings(max_attempts=3, **QUICK)
    )
    run = await rig.runs.start_run(ALICE, command("flaky", fail_attempts=2))

    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.SUCCEEDED
    assert done.output == {"attempt": 3, "echo": {"fail_attempts": 2}}
    step = done.step(MAIN_STEP)
    assert (step.state, step.attempts) == (StepState.SUCCEEDED, 3)
    # The last failed attempt's error stays on the step.
    assert step.error is not None and step.error.reason == "FLAKY"
    events = await rig.published(run.run_id, 8)
    assert [(e.type, e.payload.get("attempt")) for e in events] == [
        (EventType.RUN_QUEUED, None),
        (EventType.AGENT_STARTED, 1),
        (EventType.AGENT_FAILED, 1),
        (EventType.AGENT_STARTED, 2),
        (EventType.AGENT_FAILED, 2),
        (EventType.AGENT_STARTED, 3),
        (EventType.AGENT_COMPLETED, 3),
        (EventType.RUN_COMPLETED, None),
    ]
    assert events[2].payload["error"]["reason"] == "FLAKY"
    assert 0 < events[2].payload["retry_in_seconds"] <= 0.02
    assert [r.context.attempt for r in rig.worker.requests if r.context.run_id == run.run_id] == [1, 2, 3]


async def test_the_run_fails_with_the_last_error_when_attempts_run_out(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.agents.specs["flaky"] = agent_spec(
        "flaky", rig.endpoint, retry=RetrySettings(max_attempts=2, **QUICK)
    )
    run = await rig.runs.start_run(ALICE, command("flaky", fail_attempts=5, reason="STILL_BROKEN"))

    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.FAILED
    assert done.error is not None and done.error.reason == "STILL_BROKEN"
    assert done.step(MAIN_STEP).attempts == 2


async def test_reasons_the_policy_names_and_bad_input_are_never_retried(make_rig: RigFactory) -> None:
    rig = await make_rig()
    policy = RetrySettings(max_attempts=5, non_retryable_reasons=frozenset({"PERMANENT"}), **QUICK)
    rig.agents.specs["flaky"] = agent_spec("flaky", rig.endpoint, retry=policy)
    named = await rig.runs.start_run(ALICE, command("flaky", fail_attempts=5, reason="PERMANENT"))
    bad_input = await rig.runs.start_run(ALICE, command("flaky", fail_attempts=5, reason="INVALID_INPUT"))

    for run in (named, bad_input):
        done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)
        assert done.state is RunState.FAILED
        assert done.step(MAIN_STEP).attempts == 1


async def test_no_retry_is_started_that_the_deadline_would_cut_off(make_rig: RigFactory) -> None:
    rig = await make_rig()
    slow_backoff = RetrySettings(max_attempts=5, initial_backoff_seconds=30.0, max_backoff_seconds=30.0)
    rig.agents.specs["flaky"] = agent_spec("flaky", rig.endpoint, retry=slow_backoff)
    run = await rig.runs.start_run(
        ALICE, StartRunCommand(agent="flaky", input={"fail_attempts": 5}, timeout_seconds=10)
    )

    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.FAILED
    assert done.error is not None and done.error.reason == "FLAKY"
    assert done.step(MAIN_STEP).attempts == 1


async def test_a_silent_worker_is_declared_dead_each_attempt_and_retried(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.agents.specs["silent"] = agent_spec(
        "silent", rig.endpoint, heartbeat_timeout_seconds=0.2, retry=RetrySettings(max_attempts=2, **QUICK)
    )
    run = await rig.runs.start_run(ALICE, command("silent"))

    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)

    assert done.state is RunState.FAILED
    assert done.error is not None and done.error.reason == HEARTBEAT_TIMEOUT
    assert done.step(MAIN_STEP).attempts == 2
    async with asyncio.timeout(20):
        await rig.worker.cancelled[run.run_id].wait()


async def test_the_breaker_opens_after_consecutive_failures_and_then_fails_fast(make_rig: RigFactory) -> None:
    rig = await make_rig(breaker=BreakerSettings(failure_threshold=2, reset_timeout_seconds=60))
    endpoint = dead_endpoint()
    rig.agents.specs["gone"] = agent_spec("gone", endpoint)
    for _ in range(2):
        run = await rig.runs.start_run(ALICE, command("gone"))
        done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)
        assert done.error is not None and done.error.reason == WORKER_UNAVAILABLE

    fast = await rig.runs.start_run(BOB, command("gone"))
    done, _ = await rig.runs.wait_run(BOB, fast.run_id, 20)

    assert done.state is RunState.FAILED
    assert done.error is not None
    assert (done.error.code, done.error.reason) == ("UNAVAILABLE", CIRCUIT_OPEN)
    assert "paused" in done.error.message
    assert rig.runner.breakers.states()[endpoint] is BreakerState.OPEN
    # Other endpoints are not affected.
    echo = await rig.runs.start_run(BOB, command("echo"))
    assert (await rig.runs.wait_run(BOB, echo.run_id, 20))[0].state is RunState.SUCCEEDED


async def test_an_agents_own_errors_do_not_open_its_breaker(make_rig: RigFactory) -> None:
    rig = await make_rig(breaker=BreakerSettings(failure_threshold=1, reset_timeout_seconds=60))
    run = await rig.runs.start_run(ALICE, command("flaky", fail_attempts=1, reason="NO_SUCH_CITY"))
    done, _ = await rig.runs.wait_run(ALICE, run.run_id, 20)
    assert done.error is not None and done.error.reason == "NO_SUCH_CITY"
    assert rig.runner.breakers.states()[rig.endpoint] is BreakerState.CLOSED


async def test_an_agents_max_concurrency_holds_across_users_without_blocking_others(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    rig.agents.specs["slow"] = agent_spec("slow", rig.endpoint, max_concurrency=1)
    alices = await rig.runs.start_run(ALICE, command("slow"))
    await rig.wait_state(alices.run_id, RunState.RUNNING)
    bobs = await rig.runs.start_run(BOB, command("slow"))
    echo = await rig.runs.start_run(BOB, command("echo"))

    assert (await rig.runs.wait_run(BOB, echo.run_id, 20))[0].state is RunState.SUCCEEDED
    assert (await rig.store.get_run(bobs.run_id)).state is RunState.QUEUED  # type: ignore[union-attr]

    await rig.runs.cancel_run(ALICE, alices.run_id, "")
    await rig.wait_state(bobs.run_id, RunState.RUNNING)
    # The limit changed in the registry applies at the next admission.
    rig.agents.specs["slow"] = agent_spec("slow", rig.endpoint, max_concurrency=2)
    another = await rig.runs.start_run(ALICE, command("slow"))
    await rig.wait_state(another.run_id, RunState.RUNNING)
    for owner, run in ((BOB, bobs), (ALICE, another)):
        await rig.runs.cancel_run(owner, run.run_id, "")
