"""Limits and fairness through real processes: many users at once never
exceed the per-user or per-agent limit and every run ends; an agent's
max_concurrency lowered in the registry applies within 5 s; one user's flood
delays another user's first run by at most one slot.

Concurrency is counted from the runs' start and end times, which bracket the
worker's calls (a run starts before its attempt is sent and ends after the
worker answered), so what holds for them holds at the worker.

The suite is this module's own: its tests change the chaos agent's limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import pytest
from google.protobuf import field_mask_pb2
from switchboard.auth.v1 import auth_service_pb2, user_pb2
from switchboard.executor.v1 import executor_service_pb2, run_pb2
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from tests.harness.clients import executor_stub as executor
from tests.harness.clients import finished_run, plain, struct
from tests.harness.suite import TEST_PASSWORD, Suite, start_suite

PATIENCE_SECONDS = 90.0


def finished(suite: Suite, token: str, run_id: str) -> Coroutine[Any, Any, run_pb2.Run]:
    return finished_run(suite, token, run_id, PATIENCE_SECONDS)


PER_USER = 2
CHAOS_LIMIT = 4
# The executor's agent cache keeps a definition at most this long.
CACHE_SECONDS = 5.0


@pytest.fixture(scope="module")
async def suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    async with start_suite(tmp_path_factory.mktemp("executor-limits")) as running:
        # Before any run, so the executor's agent cache starts with this limit.
        await set_chaos_limit(running, CHAOS_LIMIT)
        yield running


async def set_chaos_limit(suite: Suite, limit: int) -> None:
    await registry_service_pb2_grpc.RegistryServiceStub(suite.channel("registry")).UpdateAgent(
        registry_service_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(name="chaos", max_concurrency=limit),
            update_mask=field_mask_pb2.FieldMask(paths=["max_concurrency"]),
        ),
        metadata=suite.metadata(await suite.admin_token()),
        timeout=10,
    )


async def make_users(suite: Suite, prefix: str, count: int) -> list[tuple[str, str]]:
    """(user id, token) of new users. One after another, with one admin token:
    concurrent logins of one account count against its login throttle."""
    admin = suite.metadata(await suite.admin_token())
    users: list[tuple[str, str]] = []
    for n in range(count):
        username = f"{prefix}-{n}-{uuid.uuid4().hex[:6]}"
        created = await suite.auth_stub().CreateUser(
            auth_service_pb2.CreateUserRequest(
                username=username, password=TEST_PASSWORD, role=user_pb2.ROLE_USER
            ),
            metadata=admin,
            timeout=10,
        )
        users.append((created.user.user_id, await suite.login(username, TEST_PASSWORD)))
    return users


async def start(suite: Suite, token: str, input: dict[str, Any]) -> run_pb2.Run:
    response = await executor(suite).StartRun(
        executor_service_pb2.StartRunRequest(agent="chaos", input=struct({"thoughts": 0, **input})),
        metadata=suite.metadata(token),
        timeout=30,
    )
    return response.run


def span_of(run: run_pb2.Run) -> tuple[float, float]:
    return run.start_time.ToMicroseconds() / 1e6, run.end_time.ToMicroseconds() / 1e6


def most_at_once(runs: Sequence[run_pb2.Run]) -> int:
    """The largest number of the runs between their start and end at one time."""
    spans = [span_of(run) for run in runs if run.HasField("start_time")]
    return max((sum(1 for s, e in spans if s <= start < e) for start, _ in spans), default=0)


async def test_many_users_at_once_stay_within_every_limit_and_all_runs_end(suite: Suite) -> None:
    users = await make_users(suite, "load", 20)
    started = await asyncio.gather(
        *(
            start(suite, token, {"sleep_seconds": 0.3, "echo": user_id})
            for user_id, token in users
            for _ in range(3)
        )
    )
    token_of = dict(users)

    done = await asyncio.gather(*(finished(suite, token_of[run.user_id], run.run_id) for run in started))

    assert {run.state for run in done} == {run_pb2.RUN_STATE_SUCCEEDED}
    # Nothing crossed users: each run is its owner's, with its owner's input.
    assert all(plain(run.output)["echo"] == run.user_id for run in done)
    assert most_at_once(done) <= CHAOS_LIMIT
    for user_id, _ in users:
        assert most_at_once([run for run in done if run.user_id == user_id]) <= PER_USER
    # The limits were reached, not merely respected by an idle system.
    assert most_at_once(done) == CHAOS_LIMIT


async def test_a_lowered_limit_applies_within_five_seconds_and_a_flood_delays_others_by_one_slot(
    suite: Suite,
) -> None:
    (_, flooder), (_, newcomer) = await make_users(suite, "flood", 2)
    await set_chaos_limit(suite, 1)
    lowered = time.time()

    flood: list[run_pb2.Run] = []
    for _ in range(5):
        flood += await asyncio.gather(*(start(suite, flooder, {"sleep_seconds": 0.2}) for _ in range(20)))
    await asyncio.sleep(max(0.0, lowered + CACHE_SECONDS + 1.0 - time.time()))
    first = await start(suite, newcomer, {"sleep_seconds": 0.2})
    first_done = await finished(suite, newcomer, first.run_id)
    await asyncio.sleep(1.0)  # a few more of the flood, under the lowered limit
    await asyncio.gather(
        *(
            executor(suite).CancelRun(
                executor_service_pb2.CancelRunRequest(run_id=run.run_id),
                metadata=suite.metadata(flooder),
                timeout=30,
            )
            for run in flood
        )
    )
    flooded = [
        (
            await executor(suite).GetRun(
                executor_service_pb2.GetRunRequest(run_id=run.run_id),
                metadata=suite.metadata(flooder),
                timeout=10,
            )
        ).run
        for run in flood
    ]

    # Every flood run ended: done, or cancelled (most never started).
    assert all(run.state in (run_pb2.RUN_STATE_SUCCEEDED, run_pb2.RUN_STATE_CANCELLED) for run in flooded)
    ran = [run for run in flooded if run.HasField("start_time") and run.HasField("end_time")]
    # After the cache's 5 s, the lowered limit holds: one chaos run at a time.
    late = [run for run in ran if span_of(run)[0] >= lowered + CACHE_SECONDS + 0.5]
    assert len(late) >= 3
    assert most_at_once([*late, first_done]) == 1
    # The newcomer's first run waited for at most one of the flood's runs to start.
    created, began = first_done.create_time.ToMicroseconds() / 1e6, span_of(first_done)[0]
    overtaking = [run for run in ran if created <= span_of(run)[0] < began]
    assert len(overtaking) <= 1, [span_of(run) for run in overtaking]
    assert first_done.state == run_pb2.RUN_STATE_SUCCEEDED
