"""Limits and fairness through real processes: 50 users with 5 runs each at
once never exceed the per-user or per-agent limit, every run ends, and no run
or event crosses users; an agent's max_concurrency lowered in the registry
applies within 5 s; one user's flood delays another user's first run by at
most one slot.

With many users, concurrency is counted at the worker, from the spans of its
agent calls. The flood test counts it from the runs' start and end times,
which bracket the worker's calls (a run starts before its attempt is sent and
ends after the worker answered), so what holds for them holds at the worker.

The suite is this module's own: its tests change the chaos agent's limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import datetime
from typing import Any

import pytest
from google.protobuf import field_mask_pb2
from switchboard.auth.v1 import auth_service_pb2, user_pb2
from switchboard.events.v1 import event_pb2
from switchboard.executor.v1 import executor_service_pb2, run_pb2
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from tests.harness.clients import executor_stub as executor
from tests.harness.clients import finished_run, follow_all_runs, plain, struct
from tests.harness.suite import TEST_PASSWORD, Suite, start_suite

PATIENCE_SECONDS = 90.0


def finished(suite: Suite, token: str, run_id: str) -> Coroutine[Any, Any, run_pb2.Run]:
    return finished_run(suite, token, run_id, PATIENCE_SECONDS)


PER_USER = 2
CHAOS_LIMIT = 4
USERS = 50
RUNS_PER_USER = 5
# Short agent work: 250 runs through 4 slots take about 20 s on an idle machine.
WORK_SECONDS = 0.2
# How long the 250 runs may take in all on a loaded one.
LOAD_PATIENCE_SECONDS = 240.0
# What each of those runs (no thoughts, no tools) tells its owner, in order.
EVENTS_OF_A_RUN = [
    event_pb2.EVENT_TYPE_RUN_QUEUED,
    event_pb2.EVENT_TYPE_AGENT_STARTED,
    event_pb2.EVENT_TYPE_AGENT_COMPLETED,
    event_pb2.EVENT_TYPE_RUN_COMPLETED,
]
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


def seconds_of(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def most_at_once_at_the_worker(spans: Sequence[dict[str, Any]]) -> int:
    """The largest number of the worker's agent calls in progress at one time."""
    bounds = [(seconds_of(span["start_time"]), seconds_of(span["end_time"])) for span in spans]
    return max((sum(1 for s, e in bounds if s <= start < e) for start, _ in bounds), default=0)


async def worker_calls(suite: Suite, run_ids: set[str]) -> list[dict[str, Any]]:
    """The built-in worker's spans of its `chaos` calls for these runs, once
    there is one for each (the worker exports them in batches)."""
    async with asyncio.timeout(PATIENCE_SECONDS):
        while True:
            calls = [
                span
                for span in suite.spans()
                if span.get("name") == "agent chaos"
                and span.get("attributes", {}).get("switchboard.run_id") in run_ids
            ]
            if {span["attributes"]["switchboard.run_id"] for span in calls} == run_ids:
                return calls
            await asyncio.sleep(0.5)


async def test_many_users_at_once_stay_within_every_limit_and_all_runs_end(suite: Suite) -> None:
    users = await make_users(suite, "load", USERS)
    token_of = dict(users)

    async def start_as(user_id: str, token: str) -> tuple[str, run_pb2.Run]:
        return user_id, await start(suite, token, {"sleep_seconds": WORK_SECONDS, "echo": user_id})

    started = await asyncio.gather(
        *(start_as(user_id, token) for user_id, token in users for _ in range(RUNS_PER_USER))
    )
    assert all(run.user_id == user_id for user_id, run in started)
    runs_of = {user_id: {run.run_id for owner, run in started if owner == user_id} for user_id, _ in users}
    owner_of = {run.run_id: user_id for user_id, run in started}

    # Each user follows all of their runs while every run proceeds.
    followed, done = await asyncio.gather(
        asyncio.gather(
            *(
                follow_all_runs(suite, token, runs_of[user_id], LOAD_PATIENCE_SECONDS)
                for user_id, token in users
            )
        ),
        asyncio.gather(
            *(
                finished_run(suite, token_of[user_id], run.run_id, LOAD_PATIENCE_SECONDS)
                for user_id, run in started
            )
        ),
    )

    # Every run ended, and succeeded: nothing was lost or left behind in a queue.
    assert len(done) == USERS * RUNS_PER_USER
    assert {run.state for run in done} == {run_pb2.RUN_STATE_SUCCEEDED}
    assert all(run.steps[0].attempts == 1 for run in done)
    # Nothing crossed users: each run is its owner's, with its owner's input.
    assert all(run.user_id == owner_of[run.run_id] for run in done)
    assert all(plain(run.output)["echo"] == run.user_id for run in done)
    # Each user's subscriber got all of their runs' events, in order, and none of anyone else's.
    for (user_id, _), events in zip(users, followed, strict=True):
        assert {e.user_id for e in events} == {user_id}
        assert {e.run_id for e in events} == runs_of[user_id]
        for run_id in runs_of[user_id]:
            sequence = [e for e in events if e.run_id == run_id]
            assert [e.seq for e in sequence] == list(range(1, len(EVENTS_OF_A_RUN) + 1)), run_id
            assert [e.type for e in sequence] == EVENTS_OF_A_RUN, run_id

    # Concurrency as the worker saw it: its calls, each under its run's owner.
    calls = await worker_calls(suite, set(owner_of))
    assert len(calls) == len(owner_of)
    assert all(
        call["attributes"]["switchboard.user_id"] == owner_of[call["attributes"]["switchboard.run_id"]]
        for call in calls
    )
    assert most_at_once_at_the_worker(calls) <= CHAOS_LIMIT
    for user_id, _ in users:
        mine = [call for call in calls if call["attributes"]["switchboard.user_id"] == user_id]
        assert most_at_once_at_the_worker(mine) <= PER_USER, user_id
    # The limits were reached, not merely respected by an idle system.
    assert most_at_once_at_the_worker(calls) == CHAOS_LIMIT


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
