"""Two executor replicas in one process, on one (SQLite) database, each with
its own store, scheduler, runner and relay: a replica takes over the runs of
one that died once their leases expire and recovers them as after a restart;
it never takes a live replica's runs; a replica that lost its lease stops and
what it still reports is never applied; the limits hold across both."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import Counter
from datetime import timedelta

import pytest
from pydantic import ValidationError

from services.common.convert import utcnow
from services.common.db import create_engine
from services.executor.admission import AdmissionLimits, plan_admission
from services.executor.config import ExecutorConfig
from services.executor.domain import (
    EXECUTOR_RESTARTED,
    MAIN_STEP,
    EventType,
    ExecutionContext,
    RunState,
    StepState,
    begin_attempt,
    new_run,
)
from services.executor.retry import RetrySettings
from services.executor.runs import StartRunCommand
from services.executor.storage import SqlRunStore
from tests.unit.executor.conftest import ALICE, PATIENCE_SECONDS, Rig, RigFactory, agent_spec, principal

PATIENT = RetrySettings(max_attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.02)


def command(agent: str, **input: object) -> StartRunCommand:
    return StartRunCommand(agent=agent, input=input)


def patient_agents(rig_endpoint: str) -> dict[str, object]:
    return {
        name: agent_spec(name, rig_endpoint, retry=PATIENT)
        for name in ("echo", "slow", "flaky", "gated", "nap", "nap-b")
    }


async def bare_store(rig: Rig, replica_id: str, lease_seconds: float = 3600.0) -> SqlRunStore:
    """Another replica's view of the rig's database, with nothing running on it."""
    return SqlRunStore(
        create_engine(str(rig.store.engine.url).replace("+aiosqlite", "")),
        replica_id=replica_id,
        lease_seconds=lease_seconds,
        write_lock=rig.store._write_lock,
    )


async def test_a_replica_takes_over_the_runs_of_one_that_died(make_rig: RigFactory) -> None:
    survivor = await make_rig(start=False, replica_id="survivor")
    dead = await bare_store(survivor, "dead", lease_seconds=0.001)
    survivor.agents.specs.update(patient_agents(survivor.endpoint))  # type: ignore[arg-type]
    # What the dead replica left: a run it claimed and had an attempt in progress of.
    now = utcnow()
    context = ExecutionContext.for_new_run(
        ALICE, thread_id="", request_id="", deadline=now + timedelta(minutes=5), trace_carrier={}
    )
    stranded, queued = new_run(
        context, agent="flaky", input={"fail_attempts": 0}, labels={}, now=now, trace_id=""
    )
    await dead.create_run(stranded, [queued])
    admit = functools.partial(plan_admission, limits=AdmissionLimits(10, 10), agent_limits={"flaky": 10})
    (claim,) = (await dead.admission_round(admit)).claims
    await dead.update_run(stranded.run_id, lambda r: begin_attempt(r, MAIN_STEP, 1, now, {}), claim.fence)
    await asyncio.sleep(0.01)  # its lease has run out

    assert await survivor.runs.recover() == 1
    survivor.relay.start()
    await survivor.runs.start()

    done = await survivor.wait_state(stranded.run_id, RunState.SUCCEEDED)
    step = done.step(MAIN_STEP)
    assert (step.state, step.attempts) == (StepState.SUCCEEDED, 2)
    assert (done.owner, done.fence) == ("survivor", 2)
    events = await survivor.published(stranded.run_id, done.last_seq)
    assert [e.type for e in events][:4] == [
        EventType.RUN_QUEUED,
        EventType.AGENT_STARTED,
        EventType.AGENT_FAILED,  # the attempt the dead replica had in progress
        EventType.AGENT_STARTED,
    ]
    assert events[2].payload["error"]["reason"] == EXECUTOR_RESTARTED
    assert events[2].payload["interrupted"] is True
    await dead.close()


async def test_a_live_replicas_run_is_left_alone_until_its_lease_is_gone_and_its_late_report_is_refused(
    make_rig: RigFactory,
) -> None:
    # A long lease: the first replica renews it rarely, so that the stall
    # below is not undone by a renewal before the second one notices.
    first = await make_rig(replica_id="first", lease_seconds=60.0)
    first.agents.specs.update(patient_agents(first.endpoint))  # type: ignore[arg-type]
    run = await first.runs.start_run(ALICE, command("gated"))
    async with asyncio.timeout(PATIENCE_SECONDS):
        await first.worker.started[run.run_id].wait()

    # One events service for both.
    second = await make_rig(replica_id="second", lease_seconds=3.0, publisher=first.publisher)
    second.agents.specs.update(patient_agents(second.endpoint))  # type: ignore[arg-type]
    # A live lease: the second replica recovers nothing and leaves the run alone.
    assert await second.store.claim_expired() == []
    current = await first.store.get_run(run.run_id)
    assert current is not None and (current.owner, current.fence) == ("first", 1)

    # The first replica stalls past its lease: the second takes the run over
    # (told at once, as NOTIFY does on PostgreSQL) and starts attempt 2 while
    # attempt 1 is still open at the worker.
    await first.store.release_leases([run.run_id])
    second.runs.leases_released()
    taken = await second.settled(
        run.run_id,
        lambda r: (
            r.owner == "second"
            and (r.step(MAIN_STEP).state, r.step(MAIN_STEP).attempts) == (StepState.RUNNING, 2)
        ),
    )
    assert (taken.fence, taken.step(MAIN_STEP).attempts) == (2, 2)
    first.worker.gates[run.run_id].set()  # every attempt of the run may now answer

    done = await second.wait_state(run.run_id, RunState.SUCCEEDED)
    assert done.output == {"attempt": 2}
    events = await second.published(run.run_id, done.last_seq)
    # Nothing attempt 1 reported after the takeover was applied.
    reported = [(e.type, e.payload.get("attempt")) for e in events]
    assert (EventType.AGENT_THINKING, 1) not in reported
    assert (EventType.AGENT_COMPLETED, 1) not in reported
    assert (EventType.AGENT_COMPLETED, 2) in reported
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    async with asyncio.timeout(PATIENCE_SECONDS):
        while run.run_id in first.runs.scheduler.running():  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.02)


async def test_a_replica_that_lost_its_lease_cancels_its_worker_call_and_writes_nothing(
    make_rig: RigFactory,
) -> None:
    # A long lease: no renewal of its own comes between the two below.
    first = await make_rig(replica_id="first", lease_seconds=60.0)
    run = await first.runs.start_run(ALICE, command("slow"))
    running = await first.wait_for(run.run_id, lambda r: r.state is RunState.RUNNING)
    async with asyncio.timeout(PATIENCE_SECONDS):
        await first.worker.started[run.run_id].wait()
    other = await bare_store(first, "other")

    await first.store.release_leases([run.run_id])
    (claim,) = await other.claim_expired()

    # The worker only heartbeats, so nothing is written: the lease keeper's
    # next renewal finds out.
    await first.runs.scheduler.renew_leases()
    async with asyncio.timeout(PATIENCE_SECONDS):
        await first.worker.cancelled[run.run_id].wait()
    after = await other.get_run(run.run_id)
    assert after is not None
    assert (after.owner, after.fence, after.state, after.last_seq) == (
        "other",
        claim.fence,
        RunState.RUNNING,
        running.last_seq,
    )
    await other.close()


async def test_two_replicas_keep_every_limit_at_the_worker_and_run_everything(make_rig: RigFactory) -> None:
    first = await make_rig(replica_id="a", per_user=1, global_cap=3)
    rigs = [first, await make_rig(replica_id="b", per_user=1, global_cap=3, publisher=first.publisher)]
    for rig in rigs:
        rig.agents.specs["nap"] = agent_spec("nap", rig.endpoint, max_concurrency=2)
        rig.agents.specs["nap-b"] = agent_spec("nap-b", rig.endpoint, max_concurrency=2)
    # The first calls wait until three run at once: the global cap is reached
    # (else this waits until the patience runs out), whatever the timing.
    first.worker.first_wave = 3
    users = [principal(f"load-{n}") for n in range(5)]
    started = await asyncio.gather(
        *(
            rigs[(n + k) % 2].runs.start_run(user, command("nap" if k % 2 else "nap-b", seconds=0.15))
            for n, user in enumerate(users)
            for k in range(3)
        )
    )

    done = await asyncio.gather(*(rigs[0].settled(run.run_id, lambda r: r.state.terminal) for run in started))

    assert {run.state for run in done} == {RunState.SUCCEEDED}
    seen = rigs[0].worker.most_at_once
    assert seen["all"] == 3  # reached, and never passed
    assert seen["agent:nap"] <= 2 and seen["agent:nap-b"] <= 2
    assert all(seen[f"user:{user.user_id}"] == 1 for user in users)
    assert Counter(run.fence for run in done) == {1: len(done)}  # each admitted once
    assert {run.owner for run in done} <= {"a", "b"}


def test_a_replica_is_named_by_its_setting_or_by_its_host_and_port() -> None:
    named = ExecutorConfig(service_password="pw", replica_id="exec-1", port=50053)
    assert named.effective_replica_id() == "exec-1"
    default = ExecutorConfig(service_password="pw", port=50099)
    assert default.effective_replica_id() == f"{socket.gethostname()}:50099"
    # On a port picked at each start, a name of its own each time.
    anywhere = ExecutorConfig(service_password="pw", port=0)
    assert anywhere.effective_replica_id() != anywhere.effective_replica_id()
    for bad in ({"replica_id": "has space"}, {"lease_seconds": 0.5}):
        with pytest.raises(ValidationError):
            ExecutorConfig(service_password="pw", **bad)  # type: ignore[arg-type]
