"""Chaos through real processes: the agent worker killed with SIGKILL in the
middle of a step (the attempt fails and is retried per the agent's policy on
the restarted worker, or the run fails when the policy allows one attempt),
and the events service down for 10 s while runs go on (afterwards every event
reaches its owner's durable consumer, complete and in order, and nobody
else's).

The suite is this module's own: its tests kill its processes and change the
chaos agent's retry policy."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc
from switchboard.executor.v1 import executor_service_pb2, run_pb2
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from tests.harness.clients import executor_stub as executor
from tests.harness.clients import finished_run, get_run, plain, struct
from tests.harness.suite import Suite, start_suite
from tests.unit.events.streams import RawSubscription

PATIENCE_SECONDS = 90.0
# The executor's agent cache keeps a definition at most this long.
CACHE_SECONDS = 5.0
# How long the chaos agent works on a step that gets its worker killed: the
# kill lands well inside it even on a loaded machine.
STEP_SECONDS = 10.0
OUTAGE_SECONDS = 10.0


def seconds(value: float) -> duration_pb2.Duration:
    result = duration_pb2.Duration()
    result.FromNanoseconds(int(value * 1e9))
    return result


# Waits of 0.5-1 s, 1-2 s, then 2-4 s between attempts (equal jitter): 19.5 s
# at the least over all of them, time enough for a killed worker to start again.
MAX_BACKOFF_SECONDS = 4.0
RETRYING = agent_pb2.RetryPolicy(
    max_attempts=12,
    initial_backoff=seconds(1),
    max_backoff=seconds(MAX_BACKOFF_SECONDS),
    backoff_multiplier=2.0,
)
ONE_ATTEMPT = agent_pb2.RetryPolicy(
    max_attempts=1,
    initial_backoff=seconds(1),
    max_backoff=seconds(MAX_BACKOFF_SECONDS),
    backoff_multiplier=2.0,
)


@pytest.fixture(scope="module")
async def suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    async with start_suite(
        tmp_path_factory.mktemp("executor-chaos"),
        env={
            # Connections refused while the worker restarts must not open the
            # endpoint's breaker: this module is about retries, not the breaker.
            "executor": {"SWITCHBOARD_EXECUTOR_BREAKER_FAILURE_THRESHOLD": "1000"},
            # Idle subscriptions hear from the service often.
            "events": {"SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS": "1"},
        },
    ) as running:
        # Before any run, so the executor's agent cache starts with this policy.
        await set_retry_policy(running, RETRYING)
        yield running


def registry(suite: Suite) -> Any:
    return registry_service_pb2_grpc.RegistryServiceStub(suite.channel("registry"))


async def set_retry_policy(suite: Suite, policy: agent_pb2.RetryPolicy) -> bool:
    """Gives the chaos agent this retry policy; True when that changed it."""
    admin = suite.metadata(await suite.admin_token())
    current = await registry(suite).GetAgent(
        registry_service_pb2.GetAgentRequest(name="chaos"), metadata=admin, timeout=10
    )
    if current.agent.retry_policy == policy:
        return False
    await registry(suite).UpdateAgent(
        registry_service_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(name="chaos", retry_policy=policy),
            update_mask=field_mask_pb2.FieldMask(paths=["retry_policy"]),
        ),
        metadata=admin,
        timeout=10,
    )
    return True


async def use_retry_policy(suite: Suite, policy: agent_pb2.RetryPolicy) -> None:
    """The policy, in force at the executor (its agent cache has let go of the old one)."""
    if await set_retry_policy(suite, policy):
        await asyncio.sleep(CACHE_SECONDS + 1.0)


def finished(suite: Suite, token: str, run_id: str) -> Coroutine[Any, Any, run_pb2.Run]:
    return finished_run(suite, token, run_id, PATIENCE_SECONDS)


def reason(status: Any) -> str:
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Unpack(info):
            return info.reason
    return ""


async def user(suite: Suite, name: str) -> tuple[str, str]:
    return await suite.create_user(f"{name}-{uuid.uuid4().hex[:8]}")


async def start(suite: Suite, token: str, input: dict[str, Any]) -> run_pb2.Run:
    response = await executor(suite).StartRun(
        executor_service_pb2.StartRunRequest(agent="chaos", input=struct(input)),
        metadata=suite.metadata(token),
        timeout=30,
    )
    return response.run


def events(suite: Suite) -> Any:
    return events_service_pb2_grpc.EventsServiceStub(suite.channel("events"))


async def history(suite: Suite, token: str, run_id: str) -> list[event_pb2.Event]:
    """The run's events as stored by the events service (one page holds them)."""
    page = await events(suite).ListEvents(
        events_service_pb2.ListEventsRequest(run_id=run_id, page_size=500),
        metadata=suite.metadata(token),
        timeout=10,
    )
    return list(page.events)


async def history_until(
    suite: Suite, token: str, run_id: str, done: Callable[[list[event_pb2.Event]], bool] | None = None
) -> list[event_pb2.Event]:
    """The run's stored events once `done(events)` holds (by default: once RUN_COMPLETED is stored)."""

    def completed(found: list[event_pb2.Event]) -> bool:
        return bool(found) and found[-1].type == event_pb2.EVENT_TYPE_RUN_COMPLETED

    until = done or completed
    async with asyncio.timeout(PATIENCE_SECONDS):
        while True:
            try:
                found = await history(suite, token, run_id)
            except grpc.aio.AioRpcError as exc:
                # Not yet known to the events service.
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                found = []
            if until(found):
                return found
            await asyncio.sleep(0.1)


async def worker_mid_step(suite: Suite, token: str, run_id: str) -> None:
    """Returns once the worker has the run's first attempt in hand: its first
    thought reached the events service, and the agent now sleeps STEP_SECONDS."""
    await history_until(
        suite,
        token,
        run_id,
        lambda found: any(e.type == event_pb2.EVENT_TYPE_AGENT_THINKING for e in found),
    )
    run = await get_run(suite, token, run_id)
    assert run.state == run_pb2.RUN_STATE_RUNNING and run.steps[0].attempts == 1, run


def kinds(found: Iterable[event_pb2.Event]) -> list[str]:
    return [event_pb2.EventType.Name(e.type).removeprefix("EVENT_TYPE_") for e in found]


async def test_a_worker_killed_mid_step_fails_the_attempt_which_is_retried_on_the_restarted_worker(
    suite: Suite,
) -> None:
    await use_retry_policy(suite, RETRYING)
    _, token = await user(suite, "kit")
    started = await start(suite, token, {"sleep_seconds": STEP_SECONDS, "thoughts": 1})
    await worker_mid_step(suite, token, started.run_id)

    suite.kill("worker")
    await suite.start("worker")

    done = await finished(suite, token, started.run_id)
    assert done.state == run_pb2.RUN_STATE_SUCCEEDED, done
    (step,) = done.steps
    assert step.state == run_pb2.STEP_STATE_SUCCEEDED
    # Succeeded on a later attempt, at the restarted worker, after the kill.
    assert 2 <= step.attempts <= RETRYING.max_attempts
    assert plain(done.output)["attempt"] == step.attempts
    found = await history_until(suite, token, started.run_id)
    assert [e.seq for e in found] == list(range(1, len(found) + 1))
    failures = [e for e in found if e.type == event_pb2.EVENT_TYPE_AGENT_FAILED]
    # Every attempt but the last failed, each with a retry the policy allows.
    assert [int(plain(e.payload)["attempt"]) for e in failures] == list(range(1, step.attempts))
    assert kinds(found).count("AGENT_STARTED") == step.attempts
    first = plain(failures[0].payload)
    # The kill broke the call off: the worker is unreachable, which is retryable.
    assert first["error"]["reason"] == "WORKER_UNAVAILABLE", first
    assert first["error"]["code"] == "UNAVAILABLE"
    for failure in failures:
        payload = plain(failure.payload)
        # Equal jitter: from half the policy's backoff for this attempt to all of it.
        backoff = min(MAX_BACKOFF_SECONDS, 1.0 * 2.0 ** (int(payload["attempt"]) - 1))
        assert backoff / 2 <= payload["retry_in_seconds"] <= backoff, payload
    assert kinds(found)[-2:] == ["AGENT_COMPLETED", "RUN_COMPLETED"]
    assert plain(found[-1].payload)["state"] == "RUN_STATE_SUCCEEDED"


async def test_a_worker_killed_mid_step_fails_the_run_when_the_policy_allows_one_attempt(
    suite: Suite,
) -> None:
    await use_retry_policy(suite, ONE_ATTEMPT)
    try:
        _, token = await user(suite, "lou")
        started = await start(suite, token, {"sleep_seconds": STEP_SECONDS, "thoughts": 1})
        await worker_mid_step(suite, token, started.run_id)

        suite.kill("worker")
        done = await finished(suite, token, started.run_id)
    finally:
        if not suite.processes["worker"].running:
            await suite.start("worker")

    assert done.state == run_pb2.RUN_STATE_FAILED, done
    (step,) = done.steps
    assert (step.state, step.attempts) == (run_pb2.STEP_STATE_FAILED, 1)
    # The run's error says why: the step's worker could not be reached.
    assert done.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert reason(done.error) == "WORKER_UNAVAILABLE"
    assert "worker could not be reached" in done.error.message, done.error.message
    found = await history_until(suite, token, started.run_id)
    assert [e.seq for e in found] == list(range(1, len(found) + 1))
    assert kinds(found).count("AGENT_STARTED") == 1
    assert kinds(found)[-2:] == ["AGENT_FAILED", "RUN_COMPLETED"]
    failed = plain(found[-2].payload)
    assert failed["error"]["reason"] == "WORKER_UNAVAILABLE" and "retry_in_seconds" not in failed
    assert plain(found[-1].payload)["state"] == "RUN_STATE_FAILED"


class Consumer:
    """One user's durable consumer of all their runs, across connections: what
    it received, in order; every batch acknowledged, and each ack accepted."""

    def __init__(self, suite: Suite, token: str) -> None:
        self.suite, self.token = suite, token
        self.name = f"outage-{uuid.uuid4().hex[:8]}"
        self.received: list[event_pb2.Event] = []
        self._subscription: RawSubscription | None = None

    def connect(self) -> None:
        # No start position: from the beginning on the first open, where it left off afterwards.
        self._subscription = RawSubscription(
            events(self.suite),
            self.suite.metadata(self.token),
            events_service_pb2.SubscriptionOpen(all_runs=True, consumer=self.name, max_in_flight=100),
        )

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def completed_runs(self) -> set[str]:
        return {e.run_id for e in self.received if e.type == event_pb2.EVENT_TYPE_RUN_COMPLETED}

    async def read_until(self, done: Callable[[Consumer], bool]) -> None:
        """Reads, acknowledging every batch, until `done(self)` holds and
        every ack sent was answered ACCEPTED."""
        subscription = self._subscription
        assert subscription is not None
        unanswered: set[str] = set()
        async with asyncio.timeout(PATIENCE_SECONDS):
            while unanswered or not done(self):
                response = await subscription.read()
                kind = response.WhichOneof("response")
                if kind == "events":
                    batch = [d.event for d in response.events.deliveries if d.WhichOneof("item") == "event"]
                    assert len(batch) == len(response.events.deliveries), "nothing is dead-lettered"
                    self.received += batch
                    subscription.ack([e.event_id for e in batch])
                    unanswered |= {e.event_id for e in batch}
                elif kind == "ack_results":
                    for result in response.ack_results.results:
                        assert result.outcome == events_service_pb2.ACK_OUTCOME_ACCEPTED, result
                        unanswered.discard(result.event_id)


async def test_every_event_arrives_in_order_after_the_events_service_was_down_for_ten_seconds(
    suite: Suite,
) -> None:
    (ann_id, ann), (bo_id, bo) = await user(suite, "ann"), await user(suite, "bo")
    owners = {ann_id: ann, bo_id: bo}
    consumers = {user_id: Consumer(suite, token) for user_id, token in owners.items()}
    thoughts = 3
    # Runs in flight across the start of the outage: they think, then work into it.
    spanning = {
        user_id: [
            await start(suite, token, {"thoughts": thoughts, "sleep_seconds": OUTAGE_SECONDS * 0.7})
            for _ in range(2)
        ]
        for user_id, token in owners.items()
    }

    def thought_through(runs: list[run_pb2.Run]) -> Callable[[Consumer], bool]:
        def done(consumer: Consumer) -> bool:
            thinking = [e.run_id for e in consumer.received if e.type == event_pb2.EVENT_TYPE_AGENT_THINKING]
            return all(thinking.count(run.run_id) == thoughts for run in runs)

        return done

    def completed(runs: list[run_pb2.Run]) -> Callable[[Consumer], bool]:
        return lambda consumer: {run.run_id for run in runs} <= consumer.completed_runs()

    # Each user's consumer reads (and acknowledges) everything up to the last thought.
    for consumer in consumers.values():
        consumer.connect()
    await asyncio.gather(
        *(consumer.read_until(thought_through(spanning[user_id])) for user_id, consumer in consumers.items())
    )

    suite.kill("events")
    down_since = time.monotonic()
    for consumer in consumers.values():
        consumer.close()
    try:
        in_flight = [
            await get_run(suite, owners[user_id], run.run_id)
            for user_id, runs in spanning.items()
            for run in runs
        ]
        # The premise: the outage begins while these runs work (7 s, after their thoughts).
        assert all(run.state == run_pb2.RUN_STATE_RUNNING for run in in_flight), in_flight
        # Runs started during the outage, and every run, end without the events service.
        during = {
            user_id: [await start(suite, token, {"thoughts": thoughts}) for _ in range(2)]
            for user_id, token in owners.items()
        }
        runs_of = {user_id: spanning[user_id] + during[user_id] for user_id in owners}
        ended = await asyncio.gather(
            *(
                finished(suite, owners[user_id], run.run_id)
                for user_id, runs in runs_of.items()
                for run in runs
            )
        )
        assert {run.state for run in ended} == {run_pb2.RUN_STATE_SUCCEEDED}
        # Down for 10 s at least, and until every run has ended.
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_since)))
    finally:
        await suite.start("events")

    # Each consumer resumes where it left off and receives the rest of every run.
    for consumer in consumers.values():
        consumer.connect()
    try:
        await asyncio.gather(
            *(consumer.read_until(completed(runs_of[user_id])) for user_id, consumer in consumers.items())
        )
    finally:
        for consumer in consumers.values():
            consumer.close()

    expected = [
        "RUN_QUEUED",
        "AGENT_STARTED",
        *["AGENT_THINKING"] * thoughts,
        "AGENT_COMPLETED",
        "RUN_COMPLETED",
    ]
    for user_id, consumer in consumers.items():
        mine = {run.run_id for run in runs_of[user_id]}
        # Nobody else's events, and every one of their own runs.
        assert {e.user_id for e in consumer.received} == {user_id}
        assert {e.run_id for e in consumer.received} == mine
        for run_id in mine:
            received = [e for e in consumer.received if e.run_id == run_id]
            # Complete, in order, each once: nothing acknowledged came again, nothing was skipped.
            assert [e.seq for e in received] == list(range(1, len(expected) + 1)), run_id
            assert kinds(received) == expected, run_id
            assert plain(received[-1].payload)["state"] == "RUN_STATE_SUCCEEDED"
            stored = await history(suite, owners[user_id], run_id)
            assert [e.event_id for e in received] == [e.event_id for e in stored]
