"""An executor assembled in-process: real SQLite storage (migrated), the real
runner, admission and outbox relay, real gRPC calls to an in-process scripted
agent worker; a stand-in only for the registry's answers and for the events
service's Publish (which is not what these tests are about). Several rigs of
one test share the database, each as its own replica."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from switchboard.agent.v1 import agent_worker_pb2, agent_worker_pb2_grpc

from services.common import convert
from services.common.auth import Principal, Role
from services.common.channels import ServiceChannels
from services.common.db import create_engine, migrate
from services.common.errors import NotFound
from services.common.interceptors import AuthenticatedContext
from services.executor.admission import AdmissionLimits
from services.executor.breaker import BreakerRegistry, BreakerSettings
from services.executor.clients import GrpcWorkers
from services.executor.domain import (
    AGENT_NOT_FOUND,
    AgentSpec,
    ExecutorSettings,
    OutboxEvent,
    RunRecord,
    RunState,
)
from services.executor.journal import RunJournal, RunSignals
from services.executor.outbox import OutboxRelay, PublishFailed
from services.executor.retry import RetrySettings
from services.executor.runner import Runner
from services.executor.runs import RunService
from services.executor.storage import SqlRunStore

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "executor" / "migrations"
# Guards against a hang; never a statement about speed.
PATIENCE_SECONDS = 20.0


def principal(name: str, role: Role = Role.USER) -> Principal:
    return Principal(
        user_id=f"user-{name}",
        username=name,
        role=role,
        token_id=f"jti-{name}",
        session_id=f"sid-{name}",
        expires_at=time.time() + 3600,
    )


ALICE = principal("alice")
BOB = principal("bob")


def context_of(caller: Principal, time_remaining: float | None = None) -> Any:
    class Inner:
        def time_remaining(self) -> float | None:
            return time_remaining

    return AuthenticatedContext(Inner(), caller)  # type: ignore[arg-type]


def error_status(code: grpc.StatusCode, message: str, reason: str) -> status_pb2.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="test"))
    return status_pb2.Status(code=code.value[0], message=message, details=[info])


class ScriptedWorker(agent_worker_pb2_grpc.AgentWorkerServicer):
    """Agents whose behaviour the tests choose by name:
    echo (thinks, calls a tool, returns its input), slow (heartbeats until
    cancelled), silent (says nothing), broken (reports an error), quitter
    (ends without a result), flaky (fails attempts up to input
    `fail_attempts` with input `reason`, then returns its attempt and input),
    gated (heartbeats until the test opens its run's gate, then thinks once
    and returns its attempt), nap and nap-b (sleep input `seconds`, then
    return). It counts the calls in progress, in all and per
    agent and user, and keeps the most seen at once. With `first_wave` set,
    the first naps wait until that many calls are in progress together."""

    def __init__(self) -> None:
        self.requests: list[agent_worker_pb2.ExecuteRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.started: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        # (run_id, step_id): the worker has the step's call.
        self.step_started: dict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        self.cancelled: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.gates: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.in_progress: Counter[str] = Counter()
        self.most_at_once: Counter[str] = Counter()
        self.first_wave = 0
        self._wave_in = asyncio.Event()

    def _count(self, keys: Sequence[str], delta: int) -> None:
        for key in keys:
            self.in_progress[key] += delta
            self.most_at_once[key] = max(self.most_at_once[key], self.in_progress[key])

    async def Execute(self, request: agent_worker_pb2.ExecuteRequest, context: Any) -> Any:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        run_id = request.context.run_id
        self.started[run_id].set()
        self.step_started[(run_id, request.context.step_id)].set()
        counted = ("all", f"agent:{request.agent}", f"user:{request.context.user_id}")
        self._count(counted, 1)
        try:
            match request.agent:
                case "echo":
                    yield agent_worker_pb2.ExecuteUpdate(thinking=agent_worker_pb2.Thinking(text="hmm"))
                    yield agent_worker_pb2.ExecuteUpdate(
                        tool_started=agent_worker_pb2.ToolStarted(
                            call_id="c1", tool="upper", arguments=convert.struct({"text": "hi"})
                        )
                    )
                    yield agent_worker_pb2.ExecuteUpdate(heartbeat=agent_worker_pb2.Heartbeat())
                    yield agent_worker_pb2.ExecuteUpdate(
                        tool_finished=agent_worker_pb2.ToolFinished(
                            call_id="c1", tool="upper", result=convert.struct({"text": "HI"})
                        )
                    )
                    yield agent_worker_pb2.ExecuteUpdate(
                        result=agent_worker_pb2.Result(output=convert.struct({"echo": request.input}))
                    )
                case "slow":
                    while True:
                        yield agent_worker_pb2.ExecuteUpdate(heartbeat=agent_worker_pb2.Heartbeat())
                        await asyncio.sleep(0.05)
                case "silent":
                    await asyncio.sleep(3600)
                case "broken":
                    yield agent_worker_pb2.ExecuteUpdate(
                        error=error_status(grpc.StatusCode.INTERNAL, "the tool broke", "BROKEN_TOOL")
                    )
                case "quitter":
                    return
                case "flaky":
                    values = convert.from_struct(request.input)
                    if request.context.attempt <= values.get("fail_attempts", 0):
                        reason = str(values.get("reason", "FLAKY"))
                        yield agent_worker_pb2.ExecuteUpdate(
                            error=error_status(grpc.StatusCode.UNKNOWN, "flaked", reason)
                        )
                        return
                    yield agent_worker_pb2.ExecuteUpdate(
                        result=agent_worker_pb2.Result(
                            output=convert.struct({"attempt": request.context.attempt, "echo": values})
                        )
                    )
                case "nap" | "nap-b":
                    if self.in_progress["all"] >= self.first_wave:
                        self._wave_in.set()
                    await self._wave_in.wait()
                    await asyncio.sleep(float(convert.from_struct(request.input).get("seconds", 0.1)))
                    yield agent_worker_pb2.ExecuteUpdate(
                        result=agent_worker_pb2.Result(output=convert.struct({"slept": True}))
                    )
                case "gated":
                    gate = self.gates[run_id]
                    while not gate.is_set():
                        yield agent_worker_pb2.ExecuteUpdate(heartbeat=agent_worker_pb2.Heartbeat())
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.05):
                                await gate.wait()
                    yield agent_worker_pb2.ExecuteUpdate(thinking=agent_worker_pb2.Thinking(text="let in"))
                    yield agent_worker_pb2.ExecuteUpdate(
                        result=agent_worker_pb2.Result(
                            output=convert.struct({"attempt": request.context.attempt})
                        )
                    )
        except asyncio.CancelledError:
            self.cancelled[run_id].set()
            raise
        finally:
            self._count(counted, -1)


def agent_spec(name: str, endpoint: str, **overrides: Any) -> AgentSpec:
    values: dict[str, Any] = {
        "name": name,
        "endpoint": endpoint,
        "tools": ("upper",),
        "input_schema": {},
        "timeout_seconds": 60.0,
        "heartbeat_timeout_seconds": 10.0,
        "max_concurrency": 10,
        # One attempt unless a test asks for retries.
        "retry": RetrySettings(max_attempts=1),
    }
    values.update(overrides)
    return AgentSpec(**values)


class StaticAgents:
    """The registry's answers, as a dict."""

    def __init__(self, specs: dict[str, AgentSpec]) -> None:
        self.specs = specs
        self.lookups = 0

    async def get(self, name: str) -> AgentSpec:
        self.lookups += 1
        if name not in self.specs:
            raise NotFound(f"agent {name!r} is not registered", reason=AGENT_NOT_FOUND)
        return self.specs[name]


class RecordingPublisher:
    """Keeps the events service's publishing contract: per run, seq N only
    after N-1 (a gap is refused), an identical repeat is a duplicate."""

    def __init__(self) -> None:
        self.stored: dict[str, list[OutboxEvent]] = defaultdict(list)
        self.ids: set[str] = set()
        self.batches: list[list[str]] = []
        self.failures_left = 0
        self.down = False
        self.attempts = 0
        # Store the batch, then fail: the answer got lost on the way back.
        self.lose_next_answer = False

    async def publish(self, events: Sequence[OutboxEvent]) -> None:
        self.attempts += 1
        if self.down or self.failures_left > 0:
            self.failures_left = max(0, self.failures_left - 1)
            raise PublishFailed("UNAVAILABLE", "events is down")
        for event in events:
            if event.event_id in self.ids:
                continue
            stored = self.stored[event.run_id]
            expected = len(stored) + 1
            if event.seq != expected:
                raise PublishFailed("FAILED_PRECONDITION", f"gap: got {event.seq}, expected {expected}")
            stored.append(event)
            self.ids.add(event.event_id)
        self.batches.append([e.event_id for e in events])
        if self.lose_next_answer:
            self.lose_next_answer = False
            raise PublishFailed("UNAVAILABLE", "answer lost")


class NoCredentials:
    async def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer service-token"),)


def in_memory_tracer() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("tests.executor"), exporter


@dataclass
class Rig:
    store: SqlRunStore
    runs: RunService
    relay: OutboxRelay
    publisher: RecordingPublisher
    worker: ScriptedWorker
    agents: StaticAgents
    signals: RunSignals
    endpoint: str
    exporter: InMemorySpanExporter
    tracer: trace.Tracer
    channels: ServiceChannels
    runner: Runner
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def wait_for(self, run_id: str, predicate: Callable[[RunRecord], bool]) -> RunRecord:
        """The run once `predicate` holds (woken by its changes, not by polling)."""
        async with asyncio.timeout(PATIENCE_SECONDS):
            while True:
                with self.signals.watch(run_id) as changed:
                    run = await self.store.get_run(run_id)
                    assert run is not None
                    if predicate(run):
                        return run
                    await changed.wait()

    async def wait_state(self, run_id: str, state: RunState) -> RunRecord:
        return await self.wait_for(run_id, lambda r: r.state is state)

    async def settled(self, run_id: str, predicate: Callable[[RunRecord], bool]) -> RunRecord:
        """The run once `predicate` holds, whichever replica changes it (polled:
        on SQLite no notice crosses from another replica)."""
        async with asyncio.timeout(PATIENCE_SECONDS):
            while True:
                run = await self.store.get_run(run_id)
                assert run is not None
                if predicate(run):
                    return run
                await asyncio.sleep(0.02)

    async def published(self, run_id: str, count: int) -> list[OutboxEvent]:
        """The run's events in the (fake) events service once `count` arrived."""
        async with asyncio.timeout(PATIENCE_SECONDS):
            while len(self.publisher.stored[run_id]) < count:  # noqa: ASYNC110 - the fake has no signal
                await asyncio.sleep(0.01)
        return list(self.publisher.stored[run_id])


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def worker_endpoint() -> AsyncIterator[tuple[ScriptedWorker, str]]:
    worker = ScriptedWorker()
    server = grpc.aio.server()
    agent_worker_pb2_grpc.add_AgentWorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield worker, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def make_rig(tmp_path: Path, worker_endpoint: tuple[ScriptedWorker, str]) -> AsyncIterator[RigFactory]:
    rigs: list[Rig] = []
    worker, endpoint = worker_endpoint
    url = f"sqlite:///{tmp_path / 'executor.db'}"
    await asyncio.to_thread(migrate, url, MIGRATIONS)
    # One writer at a time in this process, as one store would have it.
    write_lock = asyncio.Lock()

    async def build(
        *,
        per_user: int = 2,
        global_cap: int = 50,
        agents: dict[str, AgentSpec] | None = None,
        settings: ExecutorSettings | None = None,
        publisher: RecordingPublisher | None = None,
        start: bool = True,
        breaker: BreakerSettings | None = None,
        compensation_timeout_seconds: float = 20.0,
        replica_id: str = "replica-a",
        lease_seconds: float = 10.0,
    ) -> Rig:
        store = SqlRunStore(
            create_engine(url), replica_id=replica_id, lease_seconds=lease_seconds, write_lock=write_lock
        )
        tracer, exporter = in_memory_tracer()
        publisher = publisher or RecordingPublisher()
        relay = OutboxRelay(
            store,
            publisher,
            batch_size=50,
            poll_seconds=0.5,
            initial_backoff_seconds=0.01,
            max_backoff_seconds=0.05,
            tracer=tracer,
        )
        signals = RunSignals()
        journal = RunJournal(store, signals, relay.notify)
        directory = StaticAgents(
            agents
            if agents is not None
            else {
                name: agent_spec(name, endpoint)
                for name in ("echo", "slow", "silent", "broken", "quitter", "flaky", "gated", "nap", "nap-b")
            }
        )
        channels = ServiceChannels()
        runner = Runner(
            store,
            journal,
            directory,
            GrpcWorkers(channels, NoCredentials()),
            breakers=BreakerRegistry(breaker or BreakerSettings(failure_threshold=100)),
            compensation_timeout_seconds=compensation_timeout_seconds,
            tracer=tracer,
        )
        runs = RunService(
            store=store,
            journal=journal,
            signals=signals,
            agents=directory,
            runner=runner,
            limits=AdmissionLimits(global_cap, per_user),
            published=relay,
            settings=settings or ExecutorSettings(publish_wait_seconds=1.0),
            tracer=tracer,
            admission_poll_seconds=0.2,
            lease_seconds=lease_seconds,
        )
        rig = Rig(
            store,
            runs,
            relay,
            publisher,
            worker,
            directory,
            signals,
            endpoint,
            exporter,
            tracer,
            channels,
            runner,
        )
        rig.closers = [runs.stop, relay.stop, channels.close, store.close]
        rigs.append(rig)
        if start:
            await runs.recover()
            relay.start()
            await runs.start()
        return rig

    yield build
    for rig in rigs:
        for close in rig.closers:
            await close()
