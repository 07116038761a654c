"""Two executor replicas on one PostgreSQL schema, through real processes.

Under load: 50 users start 5 runs each, spread over both replicas; an agent
worker in this test counts the calls in progress (in all, per agent, per
user) and shows the per-user, per-agent and global limits hold across the
replicas; then one replica is killed with SIGKILL while it has calls in
progress, and every run still ends, the killed replica's through the other
once their leases expire. And any replica answers for any run: a CancelRun
through the replica that is not running it reaches the worker, and a WaitRun
on the replica that runs it sees the cancel made through the other.

The worker tells the replicas apart by the connection each calls it on (one
channel per replica) and finds which process owns that connection with
psutil."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from switchboard.agent.v1 import agent_worker_pb2, agent_worker_pb2_grpc
from switchboard.auth.v1 import auth_service_pb2, user_pb2
from switchboard.events.v1 import event_pb2
from switchboard.executor.v1 import executor_service_pb2, executor_service_pb2_grpc, run_pb2
from switchboard.registry.v1 import agent_pb2, registry_service_pb2, registry_service_pb2_grpc

from services.common import convert
from services.launcher import ServiceProcess, service_environment
from tests.harness.clients import completed_events
from tests.harness.suite import TEST_PASSWORD, Suite, free_port, start_suite

pytestmark = pytest.mark.postgres

USERS = 50
RUNS_PER_USER = 5
PER_USER = 2  # the executor's default
GLOBAL_CAP = 6
AGENT_LIMIT = 4  # each of two agents: together more than the global cap
LEASE_SECONDS = 8
NAP_SECONDS = 0.3
PATIENCE_SECONDS = 180.0


class TallyWorker(agent_worker_pb2_grpc.AgentWorkerServicer):
    """Each call sleeps a moment and returns its owner (an agent named
    "hang-..." heartbeats until cancelled instead). Counts the calls in
    progress and keeps the most seen at once; remembers which connection
    (replica) each call came on. The first calls wait until the global cap's
    worth are in progress together, so that reaching the cap does not depend
    on timing. Calls of a `held` connection do not answer until they are
    cancelled (their replica is about to die)."""

    def __init__(self) -> None:
        self.in_progress: Counter[str] = Counter()
        self.most_at_once: Counter[str] = Counter()
        self.calls_per_peer: Counter[str] = Counter()
        self.open_calls: dict[str, set[str]] = defaultdict(set)
        self.held: str | None = None
        self.released = asyncio.Event()
        self.released.set()
        # Set at every call's start.
        self.called = asyncio.Event()
        self.cancelled: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.first_wave_in = asyncio.Event()

    def hold(self, peer: str) -> None:
        self.held = peer
        self.released.clear()

    def release(self) -> None:
        self.held = None
        self.released.set()

    def _count(self, keys: tuple[str, ...], delta: int) -> None:
        for key in keys:
            self.in_progress[key] += delta
            self.most_at_once[key] = max(self.most_at_once[key], self.in_progress[key])

    async def Execute(self, request: agent_worker_pb2.ExecuteRequest, context: Any) -> Any:
        peer, run_id = context.peer(), request.context.run_id
        keys = ("all", f"agent:{request.agent}", f"user:{request.context.user_id}")
        self._count(keys, 1)
        self.calls_per_peer[peer] += 1
        self.open_calls[peer].add(run_id)
        self.called.set()
        try:
            yield agent_worker_pb2.ExecuteUpdate(heartbeat=agent_worker_pb2.Heartbeat())
            while request.agent.startswith("hang-"):
                await asyncio.sleep(0.2)
                yield agent_worker_pb2.ExecuteUpdate(heartbeat=agent_worker_pb2.Heartbeat())
            if self.in_progress["all"] >= GLOBAL_CAP:
                self.first_wave_in.set()
            await self.first_wave_in.wait()
            await asyncio.sleep(NAP_SECONDS)
            if self.held == peer:
                await self.released.wait()
            output = {"user_id": request.context.user_id, "attempt": request.context.attempt}
            yield agent_worker_pb2.ExecuteUpdate(
                result=agent_worker_pb2.Result(output=convert.struct(output))
            )
        except asyncio.CancelledError:
            self.cancelled[run_id].set()
            raise
        finally:
            self.open_calls[peer].discard(run_id)
            self._count(keys, -1)


@dataclasses.dataclass
class Replicas:
    suite: Suite
    worker: TallyWorker
    # Two agents that nap, and one that hangs.
    agents: tuple[str, str]
    hanging: str
    # executor process -> its stub
    executors: dict[str, tuple[ServiceProcess, Any]]


@pytest.fixture
async def replicas(postgres_url: str, tmp_path: Path) -> AsyncIterator[Replicas]:
    env = {
        "SWITCHBOARD_EXECUTOR_MAX_ACTIVE_RUNS": str(GLOBAL_CAP),
        "SWITCHBOARD_EXECUTOR_MAX_ACTIVE_RUNS_PER_USER": str(PER_USER),
        "SWITCHBOARD_EXECUTOR_LEASE_SECONDS": str(LEASE_SECONDS),
    }
    worker = TallyWorker()
    server = grpc.aio.server()
    agent_worker_pb2_grpc.add_AgentWorkerServicer_to_server(worker, server)
    worker_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with start_suite(
            tmp_path,
            database_urls={"executor": postgres_url},
            env={"executor": {**env, "SWITCHBOARD_EXECUTOR_REPLICA_ID": "replica-one"}},
        ) as suite:
            # The second replica: the same database and settings, another port and name.
            layout = dataclasses.replace(suite.layout, ports={**suite.layout.ports, "executor": free_port()})
            with (tmp_path / "logs" / "executor-two.log").open("ab") as log:
                second = ServiceProcess(
                    "executor",
                    layout.address("executor"),
                    service_environment(
                        "executor",
                        layout,
                        suite.credentials,
                        {
                            **env,
                            "SWITCHBOARD_EXECUTOR_DATABASE_URL": postgres_url,
                            "SWITCHBOARD_EXECUTOR_REPLICA_ID": "replica-two",
                            "SWITCHBOARD_EXECUTOR_METRICS_PORT": "0",
                            "SWITCHBOARD_EXECUTOR_LOG_LEVEL": "INFO",
                        },
                    ),
                    log,
                )
                second.start()
                channel = grpc.aio.insecure_channel(layout.address("executor"))
                try:
                    await second.wait_serving()
                    *agents, hanging = await register_agents(suite, f"127.0.0.1:{worker_port}")
                    yield Replicas(
                        suite,
                        worker,
                        (agents[0], agents[1]),
                        hanging,
                        {
                            "replica-one": (
                                suite.processes["executor"],
                                executor_service_pb2_grpc.ExecutorServiceStub(suite.channel("executor")),
                            ),
                            "replica-two": (second, executor_service_pb2_grpc.ExecutorServiceStub(channel)),
                        },
                    )
                finally:
                    await channel.close(grace=None)
                    await second.stop()
    finally:
        await server.stop(None)


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def register_agents(suite: Suite, endpoint: str) -> list[str]:
    registry = registry_service_pb2_grpc.RegistryServiceStub(suite.channel("registry"))
    admin = suite.metadata(await suite.admin_token())
    names = [f"{kind}-{uuid.uuid4().hex[:6]}" for kind in ("tally-a", "tally-b", "hang")]
    for name in names:
        await registry.RegisterAgent(
            registry_service_pb2.RegisterAgentRequest(
                agent=agent_pb2.Agent(
                    name=name,
                    endpoint=endpoint,
                    max_concurrency=AGENT_LIMIT,
                    timeout=seconds(60),
                    heartbeat_timeout=seconds(30),
                    retry_policy=agent_pb2.RetryPolicy(
                        max_attempts=5, initial_backoff=seconds(0.1), max_backoff=seconds(0.5)
                    ),
                )
            ),
            metadata=admin,
            timeout=10,
        )
    return names


async def make_users(suite: Suite, count: int) -> list[tuple[str, str]]:
    """(user id, token) of new users, a few at a time (password hashing is slow
    on purpose), all created with one admin token."""
    admin = suite.metadata(await suite.admin_token())
    creating = asyncio.Semaphore(4)

    async def make(n: int) -> tuple[str, str]:
        username = f"replicas-{n}-{uuid.uuid4().hex[:6]}"
        async with creating:
            created = await suite.auth_stub().CreateUser(
                auth_service_pb2.CreateUserRequest(
                    username=username, password=TEST_PASSWORD, role=user_pb2.ROLE_USER
                ),
                metadata=admin,
                timeout=30,
            )
            return created.user.user_id, await suite.login(username, TEST_PASSWORD)

    return list(await asyncio.gather(*(make(n) for n in range(count))))


def local_ports(process: ServiceProcess) -> set[int]:
    assert process.process is not None
    return {
        connection.laddr.port for connection in psutil.Process(process.process.pid).net_connections("tcp")
    }


def port_of(peer: str) -> int:
    return int(peer.rsplit(":", 1)[1])  # "ipv4:127.0.0.1:PORT"


def restarted(run: run_pb2.Run) -> bool:
    info = error_details_pb2.ErrorInfo()
    for step in run.steps:
        for detail in step.error.details:
            if detail.Unpack(info) and info.reason == "EXECUTOR_RESTARTED":
                return True
    return False


async def finished(stub: Any, suite: Suite, token: str, run_id: str) -> run_pb2.Run:
    async with asyncio.timeout(PATIENCE_SECONDS):
        while True:
            response = await stub.WaitRun(
                executor_service_pb2.WaitRunRequest(run_id=run_id, timeout=seconds(30)),
                metadata=suite.metadata(token),
                timeout=40,
            )
            if response.done:
                return response.run


async def events_of(suite: Suite, token: str, run_id: str) -> list[event_pb2.Event]:
    return await completed_events(suite, token, run_id, PATIENCE_SECONDS)


async def test_two_replicas_share_the_load_within_the_limits_and_survive_a_kill(replicas: Replicas) -> None:
    suite, worker = replicas.suite, replicas.worker
    users = await make_users(suite, USERS)
    token_of = dict(users)
    names = list(replicas.executors)
    starting = asyncio.Semaphore(25)

    async def start(n: int, user_id: str, token: str) -> run_pb2.Run:
        _, stub = replicas.executors[names[n % 2]]  # every other StartRun on each replica
        async with starting:
            response = await stub.StartRun(
                executor_service_pb2.StartRunRequest(agent=replicas.agents[n // 2 % 2]),
                metadata=suite.metadata(token),
                timeout=30,
            )
        return response.run

    started = await asyncio.gather(
        *(start(n, user_id, token) for user_id, token in users for n in range(RUNS_PER_USER))
    )
    assert len({run.run_id for run in started}) == USERS * RUNS_PER_USER

    # Mid-load, kill the replica that has the most calls in progress at the
    # worker. Its calls are held (they cannot answer) until it is dead, so
    # every one of them is cut off.
    async with asyncio.timeout(PATIENCE_SECONDS):
        while sum(worker.calls_per_peer.values()) < 40 or not any(worker.open_calls.values()):
            worker.called.clear()
            await worker.called.wait()
    victim_peer = max(worker.open_calls, key=lambda peer: len(worker.open_calls[peer]))
    worker.hold(victim_peer)
    cut_off = set(worker.open_calls[victim_peer])
    ports = {name: local_ports(process) for name, (process, _) in replicas.executors.items()}
    owner_of = {
        peer: name for peer in worker.calls_per_peer for name in names if port_of(peer) in ports[name]
    }
    victim = owner_of[victim_peer]
    # Both replicas were calling the worker when one died: the load was shared.
    assert set(owner_of.values()) == set(names)
    replicas.executors[victim][0].kill()
    worker.release()
    (survivor,) = [name for name in names if name != victim]
    _, stub = replicas.executors[survivor]

    done = await asyncio.gather(
        *(finished(stub, suite, token_of[run.user_id], run.run_id) for run in started)
    )

    # Every run ended, each its owner's; the ones cut off were retried.
    assert Counter(run_pb2.RunState.Name(run.state) for run in done) == {"RUN_STATE_SUCCEEDED": len(done)}
    assert all(convert.from_struct(run.output)["user_id"] == run.user_id for run in done)
    by_id = {run.run_id: run for run in done}
    assert cut_off and all(restarted(by_id[run_id]) for run_id in cut_off)
    # The limits held across both replicas, at the worker, the whole time.
    seen = worker.most_at_once
    assert seen["all"] == GLOBAL_CAP
    assert all(seen[f"agent:{name}"] <= AGENT_LIMIT for name in replicas.agents)
    assert max(seen[f"user:{user_id}"] for user_id, _ in users) <= PER_USER
    # A cut-off run's events reached the events service whole and in order,
    # published partly through each replica.
    run_id = sorted(cut_off)[0]
    history = await events_of(suite, token_of[by_id[run_id].user_id], run_id)
    assert [event.seq for event in history] == list(range(1, len(history) + 1))
    interrupted = [e for e in history if e.type == event_pb2.EVENT_TYPE_AGENT_FAILED]
    assert interrupted and convert.from_struct(interrupted[0].payload)["interrupted"] is True


async def test_any_replica_answers_for_a_run_the_other_runs_and_its_cancel_reaches_the_worker(
    replicas: Replicas,
) -> None:
    suite, worker = replicas.suite, replicas.worker
    ((_, token),) = await make_users(suite, 1)
    _, starter = replicas.executors["replica-one"]
    run = (
        await starter.StartRun(
            executor_service_pb2.StartRunRequest(agent=replicas.hanging),
            metadata=suite.metadata(token),
            timeout=30,
        )
    ).run
    async with asyncio.timeout(PATIENCE_SECONDS):
        while not any(run.run_id in calls for calls in worker.open_calls.values()):
            worker.called.clear()
            await worker.called.wait()
    (peer,) = [peer for peer, calls in worker.open_calls.items() if run.run_id in calls]
    (running_it,) = [
        name for name, (process, _) in replicas.executors.items() if port_of(peer) in local_ports(process)
    ]
    (other,) = [name for name in replicas.executors if name != running_it]
    _, stub = replicas.executors[other]

    waiting = asyncio.create_task(finished(replicas.executors[running_it][1], suite, token, run.run_id))
    cancelled = await stub.CancelRun(
        executor_service_pb2.CancelRunRequest(run_id=run.run_id, reason="from the other replica"),
        metadata=suite.metadata(token),
        timeout=30,
    )

    assert cancelled.run.state == run_pb2.RUN_STATE_CANCELLED
    async with asyncio.timeout(PATIENCE_SECONDS):
        await worker.cancelled[run.run_id].wait()
    waited = await waiting
    assert (waited.state, waited.steps[0].state) == (
        run_pb2.RUN_STATE_CANCELLED,
        run_pb2.STEP_STATE_CANCELLED,
    )
    for name in replicas.executors:
        _, either = replicas.executors[name]
        seen = await either.GetRun(
            executor_service_pb2.GetRunRequest(run_id=run.run_id), metadata=suite.metadata(token), timeout=10
        )
        assert seen.run.state == run_pb2.RUN_STATE_CANCELLED
