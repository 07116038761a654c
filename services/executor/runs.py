"""The executor's use cases: start, read, list, cancel and wait for runs, and
recover them after a restart. Callers are identified by their verified
principal; a run is visible only to its owner (anyone else gets the same
NOT_FOUND as for a run that does not exist, admins included).

A new run waits QUEUED (a row in the database) until the fair queue admits it
(`scheduler`); past `max_queued_runs_per_user` waiting runs, StartRun refuses
with RESOURCE_EXHAUSTED (USER_QUEUE_FULL) and a RetryInfo.

Replicas: any number of executor processes may share one PostgreSQL database
(see `admission`). Every RPC works on every replica, for every run. A replica
whose lease on a run expired (it died) is replaced: each replica looks for
such runs every third of a lease, claims them and recovers them exactly as
after a restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace
from sqlalchemy.exc import SQLAlchemyError

from services.common.convert import utcnow
from services.common.errors import FieldViolation, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.tracing import (
    ATTR_AGENT,
    ATTR_RUN_ID,
    ATTR_USER_ID,
    context_from_carrier,
    current_trace_carrier,
    trace_id_hex,
)
from services.executor.admission import AdmissionLimits, AdmissionStore, Claim
from services.executor.domain import (
    EXECUTOR_ERROR,
    EXECUTOR_RESTARTED,
    RUN_CANCELLED,
    RUN_NOT_FOUND,
    USER_QUEUE_FULL,
    AgentDirectory,
    AgentSpec,
    ExecutionContext,
    ExecutorSettings,
    LeaseLost,
    PageKey,
    RunError,
    RunFilter,
    RunRecord,
    RunState,
    RunStore,
    deadline_for,
    end_run,
    input_violations,
    interrupt_run,
    new_run,
    new_workflow_run,
    stop_run,
    validate_input,
)
from services.executor.fair_queue import DEFAULT_AGENT_MAX_CONCURRENCY
from services.executor.journal import RunJournal, RunSignals
from services.executor.outbox import PublishWatch
from services.executor.runner import Runner, run_deadline_error
from services.executor.scheduler import Loops, RunHandle, Scheduler, Ticket
from services.executor.workflow import (
    WORKFLOW_INVALID,
    InputMappingError,
    WorkflowStepSpec,
    resolve_step_input,
    validate_workflow,
)

if TYPE_CHECKING:
    from services.common.auth import Principal

log = logging.getLogger("switchboard.executor")

# Runs claimed per takeover transaction.
TAKEOVER_BATCH = 100
# WaitRun looks at the run again at least this often, should a change made by
# another replica go unannounced.
WAIT_RECHECK_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class StartRunCommand:
    # One agent, or (empty agent) the steps of a workflow.
    agent: str
    input: Mapping[str, Any]
    workflow: tuple[WorkflowStepSpec, ...] = ()
    thread_id: str = ""
    request_id: str = ""
    # None: the configured default.
    timeout_seconds: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


class PublishWatcher(Protocol):
    def watch(self, event_id: str) -> contextlib.AbstractContextManager[PublishWatch]: ...


class ExecutorStore(RunStore, AdmissionStore, Protocol):
    """The shared database, as one replica sees it."""


def run_not_found(run_id: str) -> NotFound:
    return NotFound(f"run {run_id!r} not found", reason=RUN_NOT_FOUND, metadata={"run_id": run_id})


class RunService:
    def __init__(
        self,
        *,
        store: ExecutorStore,
        journal: RunJournal,
        signals: RunSignals,
        agents: AgentDirectory,
        runner: Runner,
        limits: AdmissionLimits,
        published: PublishWatcher,
        settings: ExecutorSettings,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], datetime] = utcnow,
        admission_poll_seconds: float = 1.0,
        lease_seconds: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._journal = journal
        self._signals = signals
        self._agents = agents
        self._runner = runner
        self._published = published
        self._settings = settings
        self._tracer = tracer or trace.get_tracer("switchboard.executor")
        self._clock = clock
        self._monotonic = monotonic
        self.scheduler = Scheduler(
            store,
            self._execute,
            on_crash=self._crashed,
            limits=limits,
            agent_limit=self._agent_limit,
            poll_seconds=admission_poll_seconds,
            lease_seconds=lease_seconds,
            monotonic=monotonic,
        )
        # Deadlines of queued runs: a run can time out before it ever starts.
        self._queue_deadlines: dict[str, asyncio.TimerHandle] = {}
        self._chores: set[asyncio.Task[None]] = set()
        # StartRuns of each user between the queue-cap check and the queue.
        self._starting: collections.Counter[str] = collections.Counter()
        # Runs recovered at start-up, with when their claim holds until, to resume.
        self._recovered: list[tuple[Ticket, float]] = []
        # Set to look for runs to take over now (a replica handed its runs over).
        self._takeover = asyncio.Event()
        self._loops = Loops(lease_seconds / 3)

    # -- use cases -----------------------------------------------------------

    async def start_run(self, principal: Principal, command: StartRunCommand) -> RunRecord:
        if command.request_id:
            existing = await self._store.find_run_by_request(principal.user_id, command.request_id)
            if existing is not None:
                return existing
        # Counted as waiting from before the check until StartRun answers, so
        # that concurrent StartRuns here cannot all pass the check. (Once
        # queued, the run counts twice for a moment: the cap errs on the safe
        # side. StartRuns on other replicas at the same moment may each pass.)
        self._starting[principal.user_id] += 1
        try:
            await self._check_queue_room(principal.user_id)
            return await self._start(principal, command)
        finally:
            self._unreserve(principal.user_id)

    async def _start(self, principal: Principal, command: StartRunCommand) -> RunRecord:
        if command.workflow:
            steps = await self._checked_workflow(command)
        else:
            agent = await self._agents.get(command.agent)
            validate_input(agent.input_schema, command.input)
        now = self._clock()
        context = ExecutionContext.for_new_run(
            principal,
            thread_id=command.thread_id,
            request_id=command.request_id,
            deadline=deadline_for(now, command.timeout_seconds, self._settings),
            trace_carrier=current_trace_carrier(),
        )
        if command.workflow:
            run, queued = new_workflow_run(
                context,
                steps=steps,
                input=command.input,
                labels=command.labels,
                now=now,
                trace_id=trace_id_hex(),
            )
        else:
            run, queued = new_run(
                context,
                agent=agent.name,
                input=command.input,
                labels=command.labels,
                now=now,
                trace_id=trace_id_hex(),
            )
        trace.get_current_span().set_attributes({ATTR_RUN_ID: run.run_id, ATTR_AGENT: run.agent})
        with self._published.watch(queued.event_id) as published:
            stored, created = await self._store.create_run(run, [queued])
            if not created:
                return stored  # a concurrent StartRun with the same request_id won
            self._journal.created(stored.run_id)
            self._admit(stored)
            # A client that subscribes right after StartRun must find the run
            # in the events service; if that is down, answer anyway.
            await published.wait(self._settings.publish_wait_seconds)
        return await self._store.get_run(stored.run_id) or stored

    def _unreserve(self, user_id: str) -> None:
        self._starting[user_id] -= 1
        if self._starting[user_id] <= 0:
            del self._starting[user_id]

    async def _check_queue_room(self, user_id: str) -> None:
        # This StartRun's own reservation is not a waiting run yet.
        waiting = await self._store.queued_count(user_id) + self._starting[user_id] - 1
        limit = self._settings.max_queued_runs_per_user
        if waiting >= limit:
            raise ResourceExhausted(
                f"you have {waiting} runs waiting, the most allowed; retry once some have started",
                reason=USER_QUEUE_FULL,
                metadata={"max_queued_runs": str(limit)},
                retry_after=self._settings.queue_full_retry_after_seconds,
            )

    async def _checked_workflow(self, command: StartRunCommand) -> tuple[WorkflowStepSpec, ...]:
        """The workflow's steps once the graph is valid, every agent is known and
        every step input that needs no other step's output matches its agent's
        schema; otherwise one INVALID_ARGUMENT naming every problem."""
        plan = validate_workflow(command.workflow)
        names = sorted(
            {step.agent for step in plan.steps} | {s.compensation_agent for s in plan.steps} - {""}
        )
        specs = dict(zip(names, await asyncio.gather(*map(self._agent_or_none, names)), strict=True))
        problems: list[FieldViolation] = []
        for index, step in enumerate(plan.steps):
            where = f"workflow.steps[{index}]"
            for field_name, name in (("agent", step.agent), ("compensation_agent", step.compensation_agent)):
                if name and specs[name] is None:
                    problems.append(
                        FieldViolation(
                            f"{where}.{field_name}",
                            f"step {step.step_id!r}: agent {name!r} is not registered",
                        )
                    )
            spec = specs[step.agent]
            if spec is None:
                continue
            try:
                # Inputs that take other steps' outputs are checked when the step starts.
                value = resolve_step_input(command.input, step.input, {})
            except InputMappingError:
                continue
            problems += input_violations(spec.input_schema, value, f"{where}.input")
        if problems:
            raise InvalidArgument(problems, reason=WORKFLOW_INVALID)
        return plan.steps

    async def _agent_or_none(self, name: str) -> AgentSpec | None:
        try:
            return await self._agents.get(name)
        except NotFound:
            return None

    async def _agent_limit(self, name: str) -> int:
        """The agent's current max_concurrency, for admission (never raises)."""
        try:
            return (await self._agents.get(name)).max_concurrency
        except (NotFound, Unavailable):
            # An unknown agent's runs fail as soon as they start; an unreachable
            # registry gets the documented default until it answers.
            return DEFAULT_AGENT_MAX_CONCURRENCY

    async def get_run(self, principal: Principal, run_id: str) -> RunRecord:
        run = await self._store.get_run(run_id)
        if run is None or run.user_id != principal.user_id:
            raise run_not_found(run_id)
        return run

    async def list_runs(
        self, principal: Principal, run_filter: RunFilter, page_size: int, after: PageKey | None
    ) -> tuple[list[RunRecord], PageKey | None]:
        rows = await self._store.list_runs(principal.user_id, run_filter, page_size + 1, after)
        page = rows[:page_size]
        if len(rows) > page_size and page:
            return page, (page[-1].create_time.isoformat(), page[-1].run_id)
        return page, None

    async def cancel_run(self, principal: Principal, run_id: str, reason: str) -> RunRecord:
        """Cancels an unfinished run (a finished one is returned as it is). A
        workflow that may have something to undo answers while it compensates
        (still RUNNING) and ends CANCELLED after; anything else ends at once."""
        run = await self.get_run(principal, run_id)
        if run.state.terminal:
            return run
        error = RunError("CANCELLED", RUN_CANCELLED, reason or "the run was cancelled by its owner")
        with self._in_run_trace("executor.cancel", run):
            now, carrier = self._clock(), current_trace_carrier()
            outcome = await self._journal.apply(
                run_id, lambda r: stop_run(r, RunState.CANCELLED, error, now, carrier)
            )
        # The state is written first: the worker calls are stopped after, and
        # whatever they still report is refused by the state machine.
        if outcome is not None and outcome[1]:
            self._disarm(run_id)
            self.scheduler.cancel(run_id)
        return outcome[0] if outcome is not None else run

    async def wait_run(self, principal: Principal, run_id: str, timeout: float) -> tuple[RunRecord, bool]:
        """The run once it ends, or as it is when `timeout` passes; (run, done)."""
        give_up = time.monotonic() + timeout
        while True:
            with self._signals.watch(run_id) as changed:
                run = await self.get_run(principal, run_id)
                if run.state.terminal:
                    return run, True
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    return run, False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, WAIT_RECHECK_SECONDS)):
                        await changed.wait()

    # -- life cycle ----------------------------------------------------------

    async def recover(self) -> int:
        """At start-up, before serving: claims the runs whose replica is gone
        (their lease expired, or they were held under this replica's own id
        before it restarted; never a live replica's), and fails the attempts
        they had in progress (EXECUTOR_RESTARTED). Their steps wait RETRYING
        and the runs resume with `start`, where each agent's retry policy
        decides whether another attempt follows. None stays RUNNING for good.
        Returns how many runs were recovered."""
        self._recovered = await self._take_over(reclaim_own=True)
        if self._recovered:
            log.warning("resuming runs interrupted by a restart", extra={"runs": len(self._recovered)})
        return len(self._recovered)

    async def start(self) -> None:
        """Resumes the recovered runs, then starts admitting, renewing leases,
        taking over the runs of replicas that are gone, timing out runs that
        waited past their deadline, and listening to the other replicas."""
        for ticket, valid_until in self._recovered:
            self.scheduler.resume(ticket, valid_until)
        self._recovered = []
        self.scheduler.start()
        self._loops.start("takeover", self._look_after_replicas)
        self._loops.start("replica-notices", functools.partial(self._store.listen, self))

    async def stop(self) -> None:
        await self._loops.stop()
        for timer in self._queue_deadlines.values():
            timer.cancel()
        self._queue_deadlines.clear()
        await self.scheduler.stop()
        for chore in list(self._chores):
            chore.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)

    # -- other replicas (ReplicaNotices) -----------------------------------------

    def run_changed(self, run_id: str) -> None:
        self._signals.changed(run_id)
        self.scheduler.poke(run_id)

    def admission_changed(self) -> None:
        self.scheduler.wake()

    def leases_released(self) -> None:
        self._takeover.set()

    def resync(self) -> None:
        self._signals.changed_all()
        self.scheduler.poke_all()
        self.scheduler.wake()
        self._takeover.set()

    async def _look_after_replicas(self) -> None:
        """Every third of a lease (or when a replica hands its runs over):
        takes over the runs of replicas that are gone, and times out the runs
        that waited past their deadline (whichever replica queued them)."""
        period = self.scheduler.lease_seconds / 3
        while True:
            self._takeover.clear()
            try:
                for ticket, valid_until in await self._take_over(reclaim_own=False):
                    self.scheduler.resume(ticket, valid_until)
                for run_id in await self._store.overdue_queued(TAKEOVER_BATCH):
                    await self._expire_queued(run_id)
            except (SQLAlchemyError, OSError) as exc:
                log.warning("could not look for runs to take over", extra={"error": str(exc)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._takeover.wait()

    async def _take_over(self, *, reclaim_own: bool) -> list[tuple[Ticket, float]]:
        """Claims runs whose lease expired and fails their interrupted attempts;
        the unfinished ones, each with until when its claim holds."""
        taken: list[tuple[Ticket, float]] = []
        error = RunError(
            "ABORTED", EXECUTOR_RESTARTED, "the executor running the attempt stopped before it finished"
        )
        while True:
            began = self._monotonic()
            claims = await self._store.claim_expired(
                exclude=self.scheduler.running(), reclaim_own=reclaim_own, limit=TAKEOVER_BATCH
            )
            for claim in claims:
                if await self._interrupt(claim, error):
                    taken.append((Ticket.of(claim), began + self.scheduler.lease_seconds))
            if len(claims) < TAKEOVER_BATCH:
                break
        if taken and not reclaim_own:
            log.warning("took over runs of a replica that is gone", extra={"runs": len(taken)})
        return taken

    async def _interrupt(self, claim: Claim, error: RunError) -> bool:
        """Fails the claimed run's attempts in progress; whether it goes on."""
        run = await self._store.get_run(claim.run_id)
        if run is None or run.state.terminal:
            return False
        with self._in_run_trace("executor.recover", run):
            now, carrier = self._clock(), current_trace_carrier()
            try:
                outcome = await self._journal.apply(
                    run.run_id,
                    functools.partial(interrupt_run, error=error, now=now, carrier=carrier),
                    claim.fence,
                )
            except LeaseLost:
                return False  # another replica claimed it in between
        return outcome is not None and not outcome[0].state.terminal

    # -- internals -------------------------------------------------------------

    @contextlib.contextmanager
    def _in_run_trace(self, name: str, run: RunRecord) -> Iterator[trace.Span]:
        """A span in the run's own trace, linked to the span of whoever acted."""
        caller = trace.get_current_span().get_span_context()
        with self._tracer.start_as_current_span(
            name,
            context=context_from_carrier(dict(run.trace_carrier)),
            links=[trace.Link(caller)] if caller.is_valid else [],
            attributes={ATTR_RUN_ID: run.run_id, ATTR_AGENT: run.agent, ATTR_USER_ID: run.user_id},
        ) as span:
            yield span

    def _spawn(self, coroutine: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine, name=name)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _admit(self, run: RunRecord) -> None:
        delay = max(0.0, (run.deadline - self._clock()).total_seconds())
        if run.run_id not in self._queue_deadlines:
            self._queue_deadlines[run.run_id] = asyncio.get_running_loop().call_later(
                delay, lambda: self._spawn(self._expire_queued(run.run_id), f"expire-{run.run_id}")
            )
        self.scheduler.wake()

    def _disarm(self, run_id: str) -> None:
        timer = self._queue_deadlines.pop(run_id, None)
        if timer is not None:
            timer.cancel()

    async def _expire_queued(self, run_id: str) -> None:
        self._queue_deadlines.pop(run_id, None)
        run = await self._store.get_run(run_id)
        if run is None or run.state is not RunState.QUEUED:
            return
        with self._in_run_trace("executor.expire", run):
            now, carrier = self._clock(), current_trace_carrier()
            error = run_deadline_error()
            outcome = await self._journal.apply(
                run_id,
                lambda r: (
                    end_run(r, RunState.TIMED_OUT, error, now, carrier)
                    if r.state is RunState.QUEUED and not r.owner
                    else None
                ),
            )
        # Only a run that was still waiting: one that was admitted meanwhile
        # is held to its deadline by the runner.
        if outcome is not None and outcome[1]:
            self.scheduler.cancel(run_id)

    async def _execute(self, ticket: Ticket, handle: RunHandle) -> None:
        self._disarm(ticket.run_id)  # from here on the runner enforces the deadline
        await self._runner.execute(ticket, handle, self.scheduler)

    async def _crashed(self, ticket: Ticket, error: BaseException) -> None:
        # A bug must not leave the run RUNNING until the next restart.
        run = await self._store.get_run(ticket.run_id)
        if run is None or run.state.terminal:
            return
        failure = RunError("INTERNAL", EXECUTOR_ERROR, "the executor failed while running the run")
        with self._in_run_trace("executor.crash", run):
            now, carrier = self._clock(), current_trace_carrier()
            with contextlib.suppress(LeaseLost):  # another replica holds it now: its call
                await self._journal.apply(
                    ticket.run_id, lambda r: end_run(r, RunState.FAILED, failure, now, carrier), ticket.fence
                )
