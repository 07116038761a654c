"""Executes admitted runs: the steps of a run against their agents' workers,
with retries, the circuit breakers, deadlines, and (for a workflow that fails
or is cancelled) compensation.

One `RunExecution` per run. Its loop starts every step whose dependencies
have succeeded (a single-agent run has one step, so independent branches of a
workflow run at once), then waits for a step to finish, the deadline, or a
stop request (CancelRun). Each step is a task that runs attempts until one
succeeds or the agent's retry policy (`retry.decide_retry`) gives up. A
workflow step, and each compensation, holds a slot of its agent while it runs;
a single-agent run got its slot when it was admitted.

When a workflow step fails for good, or the run is cancelled or times out
while something may need undoing, the run winds down: the worker calls of the
other steps are cancelled, the steps still running end, the compensation
agents of the succeeded steps run (last completed first, each with the output
of the step it undoes, within `compensation_timeout_seconds`), and the run
ends. Every state change is decided by a pure rule in `domain` and written
with its events in one transaction, carrying the fence of this replica's
claim on the run; a crash at any point resumes from the database (see
`RunService.recover`). When the claim is lost (a write refused with
LeaseLost, or the lease keeper gave the run up), the execution stops where it
is and writes nothing more: the replica that holds the run now recovers it.

Tracing: the run's execution continues the trace of its StartRun span (an
`executor.run` span whose parent is the carrier stored with the run) and
each attempt is an `executor.attempt` child around the worker call (whose
client span the channel interceptors add). Every event carries the context of
the span that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from opentelemetry import trace

from services.common.convert import utcnow
from services.common.errors import FailedPrecondition, NotFound, Unavailable
from services.common.tracing import (
    ATTR_AGENT,
    ATTR_RUN_ID,
    ATTR_USER_ID,
    context_from_carrier,
    current_trace_carrier,
)
from services.executor.breaker import BreakerRegistry, CircuitBreaker, CircuitOpen, Permit
from services.executor.domain import (
    AGENT_NOT_FOUND,
    AGENT_SCHEMA_INVALID,
    ATTEMPT_DEADLINE_EXCEEDED,
    EXECUTOR_ERROR,
    HEARTBEAT_TIMEOUT,
    INPUT_INVALID,
    REGISTRY_UNAVAILABLE,
    RUN_CANCELLED,
    RUN_DEADLINE_EXCEEDED,
    WORKER_STREAM_ENDED,
    AgentDirectory,
    AgentSpec,
    Decide,
    ExecutionContext,
    Failure,
    Heartbeat,
    LeaseLost,
    Result,
    RunError,
    RunRecord,
    RunState,
    RunStore,
    StepRecord,
    StepState,
    Thinking,
    ToolFinished,
    ToolStarted,
    WorkerCallCancelled,
    WorkerConnector,
    begin_attempt,
    begin_compensation,
    complete_compensation,
    complete_step,
    counts_against_endpoint,
    fail_compensation,
    fail_step,
    finish_run,
    halt_steps,
    input_violations,
    record_progress,
    retry_compensation_later,
    retry_later,
    steps_to_compensate,
    stop_run,
)
from services.executor.journal import RunJournal
from services.executor.retry import RetryDecision, decide_retry
from services.executor.scheduler import AgentSlots, RunHandle, Ticket
from services.executor.workflow import InputMappingError, resolve_step_input

log = logging.getLogger("switchboard.executor.runner")

ATTR_STEP_ID = "switchboard.step_id"
ATTR_ATTEMPT = "switchboard.attempt"
ATTR_COMPENSATION = "switchboard.compensation"

# A retry needs at least this long before the deadline to be worth starting.
MIN_ATTEMPT_SECONDS = 0.5
# How long the tasks of stopped steps get to end on their own (finishing a
# write) before they are cancelled; their worker calls and backoff pauses end
# at once either way, so only waits for an agent slot are left to cancel.
STOP_GRACE_SECONDS = 0.5


def run_deadline_error() -> RunError:
    return RunError("DEADLINE_EXCEEDED", RUN_DEADLINE_EXCEEDED, "the run did not finish before its deadline")


@dataclass(frozen=True, slots=True)
class Succeeded:
    output: dict[str, object]


@dataclass(frozen=True, slots=True)
class Failed:
    # FAILED, or TIMED_OUT when the run's (or the compensation's) deadline passed.
    state: RunState
    error: RunError
    # The breaker's hint: no point in another attempt before this many seconds.
    retry_after: float = 0.0


AttemptOutcome = Succeeded | Failed


class Runner:
    def __init__(
        self,
        store: RunStore,
        journal: RunJournal,
        agents: AgentDirectory,
        workers: WorkerConnector,
        *,
        breakers: BreakerRegistry | None = None,
        compensation_timeout_seconds: float = 60.0,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.journal = journal
        self.agents = agents
        self.workers = workers
        self.breakers = breakers or BreakerRegistry()
        self.compensation_timeout_seconds = compensation_timeout_seconds
        self.tracer = tracer or trace.get_tracer("switchboard.executor")
        self.clock = clock
        self.monotonic = monotonic
        self.jitter = jitter

    async def execute(self, ticket: Ticket, handle: RunHandle, slots: AgentSlots) -> None:
        run = await self.store.get_run(ticket.run_id)
        if run is None or run.state.terminal:
            return  # cancelled or expired while it waited
        if run.fence != ticket.fence:
            return  # claimed again meanwhile: not this execution's any more
        with self.tracer.start_as_current_span(
            "executor.run",
            context=context_from_carrier(dict(run.trace_carrier)),
            attributes={ATTR_RUN_ID: run.run_id, ATTR_AGENT: run.agent, ATTR_USER_ID: run.user_id},
        ):
            try:
                await RunExecution(self, run, handle, slots, ticket.fence).run()
            except LeaseLost:
                log.info("stopped: another replica holds the run now", extra={"run_id": run.run_id})

    def decide(
        self, attempt: int, error: RunError, agent: AgentSpec, context: ExecutionContext
    ) -> RetryDecision:
        return decide_retry(
            attempt,
            error.reason,
            agent.retry,
            self.jitter,
            remaining_seconds=context.remaining_seconds(self.clock()),
            min_attempt_seconds=MIN_ATTEMPT_SECONDS,
        )

    # -- one attempt -------------------------------------------------------------

    async def attempt(
        self,
        run_id: str,
        agent: AgentSpec,
        input: Mapping[str, Any],
        context: ExecutionContext,
        handle: RunHandle | None,
        *,
        compensation: bool = False,
        fence: int | None = None,
    ) -> AttemptOutcome | None:
        """One attempt of a step (or of its compensation); None when it no
        longer applies or was stopped (the run ended or is ending elsewhere).
        Every write carries `fence` (LeaseLost when it was superseded)."""
        step_id, attempt = context.step_id, context.attempt
        begin = begin_compensation if compensation else begin_attempt
        now, carrier = self.clock(), current_trace_carrier()
        started = await shielded(
            self.journal, run_id, lambda r: begin(r, step_id, attempt, now, carrier), fence
        )
        if started is None or not started[1]:
            return None
        remaining = context.remaining_seconds(self.clock())
        budget = min(remaining, agent.timeout_seconds)
        # Which deadline binds decides what running out of time means.
        if remaining <= agent.timeout_seconds:
            out_of_time = Failed(RunState.TIMED_OUT, run_deadline_error())
        else:
            out_of_time = Failed(
                RunState.FAILED,
                RunError(
                    "DEADLINE_EXCEEDED",
                    ATTEMPT_DEADLINE_EXCEEDED,
                    f"the agent did not finish within its timeout of {agent.timeout_seconds:g}s",
                ),
            )
        if budget <= 0:
            return out_of_time
        breaker = self.breakers.get(agent.endpoint)
        try:
            permit = breaker.acquire()
        except CircuitOpen as exc:
            return Failed(
                RunState.FAILED, RunError("UNAVAILABLE", exc.reason, exc.message), exc.retry_after or 0.0
            )
        outcome: AttemptOutcome | None = None
        try:
            outcome = await self._stream(
                run_id,
                agent,
                input,
                context,
                handle,
                budget,
                out_of_time,
                compensation=compensation,
                fence=fence,
            )
        finally:
            _give_verdict(breaker, permit, outcome)
        return outcome

    def _failed(self, context: ExecutionContext, error: RunError) -> Failed:
        # Whatever went wrong, past the deadline the attempt has timed out.
        if context.remaining_seconds(self.clock()) <= 0:
            return Failed(RunState.TIMED_OUT, run_deadline_error())
        return Failed(RunState.FAILED, error)

    async def _stream(
        self,
        run_id: str,
        agent: AgentSpec,
        input: Mapping[str, Any],
        context: ExecutionContext,
        handle: RunHandle | None,
        budget: float,
        out_of_time: Failed,
        *,
        compensation: bool,
        fence: int | None,
    ) -> AttemptOutcome | None:
        attempt_deadline = self.monotonic() + budget
        session = await self.workers.open(agent, input, context, budget)
        if handle is not None:
            # A compensation runs on through a stop request; only losing the run ends it.
            handle.attach(session, survives_stop=compensation)
        try:
            while True:
                remaining = attempt_deadline - self.monotonic()
                if remaining <= 0:
                    return out_of_time
                quiet_limit = agent.heartbeat_timeout_seconds
                try:
                    # Any update, heartbeats included, proves the worker alive.
                    update = await session.next(min(quiet_limit, remaining))
                except TimeoutError:
                    if quiet_limit >= remaining:
                        return out_of_time
                    return self._failed(
                        context,
                        RunError(
                            "UNAVAILABLE", HEARTBEAT_TIMEOUT, f"the worker sent nothing for {quiet_limit:g}s"
                        ),
                    )
                except WorkerCallCancelled:
                    return None
                match update:
                    case None:
                        return self._failed(
                            context,
                            RunError("UNAVAILABLE", WORKER_STREAM_ENDED, "the worker ended without a result"),
                        )
                    case Heartbeat():
                        continue
                    case Result(output=output):
                        return Succeeded(dict(output))
                    case Failure(error=error):
                        if error.reason == ATTEMPT_DEADLINE_EXCEEDED:
                            return out_of_time  # the call's own deadline fired first
                        return self._failed(context, error)
                    case Thinking() | ToolStarted() | ToolFinished():
                        now, carrier = self.clock(), current_trace_carrier()
                        written = await shielded(
                            self.journal,
                            run_id,
                            functools.partial(
                                record_progress,
                                step_id=context.step_id,
                                attempt=context.attempt,
                                update=update,
                                now=now,
                                carrier=carrier,
                                compensation=compensation,
                            ),
                            fence,
                        )
                        if written is None or written[0].state.terminal:
                            return None
        finally:
            session.cancel()
            if handle is not None:
                handle.detach(session)


def _give_verdict(breaker: CircuitBreaker, permit: Permit, outcome: AttemptOutcome | None) -> None:
    """Tells the endpoint's breaker how the call went. A stopped call, or one
    cut short by the run's own deadline, says nothing about the endpoint; an
    agent that answered with its own error shows the endpoint works."""
    if outcome is None or (isinstance(outcome, Failed) and outcome.state is RunState.TIMED_OUT):
        breaker.release(permit)
    elif isinstance(outcome, Failed) and counts_against_endpoint(outcome.error):
        breaker.record_failure(permit)
    else:
        breaker.record_success(permit)


async def shielded(
    journal: RunJournal, run_id: str, decide: Decide, fence: int | None = None
) -> tuple[RunRecord, bool] | None:
    """A change written even if the task asking for it is being cancelled
    (a stopped step), so no transaction is cut off halfway; the state
    machine refuses whatever no longer applies, and storage whatever a
    superseded claim writes (LeaseLost)."""
    return await asyncio.shield(journal.apply(run_id, decide, fence))


class RunExecution:
    def __init__(
        self, runner: Runner, run: RunRecord, handle: RunHandle, slots: AgentSlots, fence: int
    ) -> None:
        self.runner = runner
        self.run_id = run.run_id
        self.fence = fence
        self.context = run.context()
        self.handle = handle
        self.slots = slots
        # A single-agent run got its agent slot when it was admitted.
        self.needs_slots = run.is_workflow
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def _write(self, decide: Decide) -> tuple[RunRecord, bool] | None:
        return await shielded(self.runner.journal, self.run_id, decide, self.fence)

    async def _stop(self, state: RunState, error: RunError) -> None:
        now, carrier = self.runner.clock(), current_trace_carrier()
        await self._write(lambda r: stop_run(r, state, error, now, carrier))

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            await self._stop_steps()

    async def _loop(self) -> None:
        while True:
            self.handle.wakeup.clear()
            if self.handle.lost:
                raise LeaseLost(self.run_id, self.fence, -1)
            run = await self.runner.store.get_run(self.run_id)
            if run is None or run.state.terminal:
                return
            if run.fence != self.fence:
                raise LeaseLost(self.run_id, self.fence, run.fence)
            if run.ending is not None:
                await self._wind_down()
                return
            remaining = self.context.remaining_seconds(self.runner.clock())
            if remaining <= 0:
                await self._stop(RunState.TIMED_OUT, run_deadline_error())
                continue
            if self.handle.stopped:
                # Stopped from outside (CancelRun) yet neither ended nor
                # ending: its write did not go through. It meant to cancel.
                await self._stop(
                    RunState.CANCELLED, RunError("CANCELLED", RUN_CANCELLED, "the run was cancelled")
                )
                continue
            for step in run.steps:
                if step.step_id not in self.tasks and _ready(run, step):
                    self.tasks[step.step_id] = asyncio.create_task(
                        self._step(step.step_id), name=f"step-{self.run_id}-{step.step_id}"
                    )
            if not self.tasks:
                # Nothing runs and nothing can start, yet the run goes on: a bug.
                error = RunError("INTERNAL", EXECUTOR_ERROR, "the run cannot make progress")
                log.error("run stuck", extra={"run_id": self.run_id})
                await self._stop(RunState.FAILED, error)
                continue
            woken = asyncio.create_task(self.handle.wakeup.wait())
            try:
                await asyncio.wait(
                    [*self.tasks.values(), woken], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                woken.cancel()
            for step_id, task in list(self.tasks.items()):
                if task.done():
                    del self.tasks[step_id]
                    task.result()  # a bug in a step fails the run (Scheduler's on_crash)

    async def _stop_steps(self) -> None:
        """Cancels the worker calls of every step at once, lets their tasks end
        on their own for a moment, then cancels what is left (waits for a slot)."""
        if not self.tasks:
            return
        self.handle.request_stop()
        tasks = list(self.tasks.values())
        self.tasks.clear()
        try:
            await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
        finally:
            # Also when this execution is itself cancelled (the replica stops):
            # no step outlives it, and each gives its agent slot back.
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            # A step that found the run lost has nothing to report.
            if isinstance(outcome, Exception) and not isinstance(outcome, LeaseLost):
                log.error("step failed while stopping", exc_info=outcome, extra={"run_id": self.run_id})

    # -- steps -------------------------------------------------------------------

    async def _step(self, step_id: str) -> None:
        run = await self.runner.store.get_run(self.run_id)
        if run is None or run.state.terminal or run.ending is not None:
            return
        step = run.step(step_id)
        now, carrier = self.runner.clock(), current_trace_carrier()
        try:
            agent = await self.runner.agents.get(step.agent)
        except NotFound:
            error = RunError("NOT_FOUND", AGENT_NOT_FOUND, f"agent {step.agent!r} is not registered")
            await self._write(lambda r: fail_step(r, step_id, error, now, carrier))
            return
        except Unavailable:
            error = RunError("UNAVAILABLE", REGISTRY_UNAVAILABLE, "the agent registry could not be reached")
            await self._write(lambda r: fail_step(r, step_id, error, now, carrier))
            return
        if not self.needs_slots:
            await self._attempts(run, step, agent)
            return
        async with self.slots.slot(agent.name, run_id=self.run_id, fence=self.fence, step_id=step_id):
            await self._attempts(run, step, agent)

    def _input(self, run: RunRecord, step: StepRecord, agent: AgentSpec) -> dict[str, Any] | RunError:
        """The step's input, or why it cannot run (not worth retrying)."""
        if not run.is_workflow:
            return dict(run.input)
        outputs = {s.step_id: s.output or {} for s in run.steps if s.state is StepState.SUCCEEDED}
        try:
            value = resolve_step_input(run.input, step.input or {}, outputs)
            problems = input_violations(agent.input_schema, value)
        except InputMappingError as exc:
            return RunError("FAILED_PRECONDITION", exc.reason, exc.message)
        except FailedPrecondition:
            return RunError(
                "FAILED_PRECONDITION",
                AGENT_SCHEMA_INVALID,
                "the agent's input schema is not a valid JSON Schema",
            )
        if problems:
            summary = "; ".join(f"{p.field}: {p.description}" for p in problems)
            return RunError("INVALID_ARGUMENT", INPUT_INVALID, f"the step's input does not match: {summary}")
        return value

    async def _attempts(self, run: RunRecord, step: StepRecord, agent: AgentSpec) -> None:
        step_id = step.step_id
        attempt = step.attempts
        if step.state is StepState.RETRYING and step.error is not None:
            # An attempt cut off by a restart (or a backoff that was): the
            # agent's policy decides whether another one follows.
            decision = self.runner.decide(attempt, step.error, agent, self.context)
            if not decision.retry:
                await self._fail(step_id, step.error)
                return
            if await self.handle.pause(decision.delay_seconds or 0.0):
                return
        input = self._input(run, step, agent)
        if isinstance(input, RunError):
            await self._fail(step_id, input)
            return
        while True:
            attempt += 1
            context = self.context.with_step(step_id, attempt)
            # The outcome is written inside the attempt's span: its events carry it.
            with self.runner.tracer.start_as_current_span(
                "executor.attempt", attributes=_attempt_attributes(context, agent)
            ) as span:
                outcome = await self.runner.attempt(
                    self.run_id, agent, input, context, self.handle, fence=self.fence
                )
                if isinstance(outcome, Failed):
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error.reason))
                delay = await self._record_outcome(context, agent, outcome)
            if delay is None or await self.handle.pause(delay):
                return

    async def _record_outcome(
        self, context: ExecutionContext, agent: AgentSpec, outcome: AttemptOutcome | None
    ) -> float | None:
        """Writes what the attempt's outcome means for its step; the delay
        before the next attempt, or None when there is none."""
        step_id, attempt = context.step_id, context.attempt
        now, carrier = self.runner.clock(), current_trace_carrier()
        match outcome:
            case None:
                return None
            case Succeeded(output=output):
                await self._write(
                    functools.partial(
                        complete_step,
                        step_id=step_id,
                        attempt=attempt,
                        output=output,
                        now=now,
                        carrier=carrier,
                    )
                )
                return None
            case Failed(state=RunState.TIMED_OUT, error=error):
                await self._fail(step_id, error, StepState.TIMED_OUT)
                return None
            case Failed(error=error, retry_after=retry_after):
                decision = self.runner.decide(attempt, error, agent, self.context)
                delay = max(decision.delay_seconds or 0.0, retry_after)
                if not decision.retry or delay + MIN_ATTEMPT_SECONDS >= self.context.remaining_seconds(now):
                    await self._fail(step_id, error)
                    return None
                written = await self._write(
                    functools.partial(
                        retry_later,
                        step_id=step_id,
                        attempt=attempt,
                        error=error,
                        delay_seconds=delay,
                        now=now,
                        carrier=carrier,
                    )
                )
                return delay if written is not None and written[1] else None
        return None

    async def _fail(self, step_id: str, error: RunError, state: StepState = StepState.FAILED) -> None:
        now, carrier = self.runner.clock(), current_trace_carrier()
        await self._write(lambda r: fail_step(r, step_id, error, now, carrier, state=state))

    # -- winding down --------------------------------------------------------------

    async def _wind_down(self) -> None:
        await self._stop_steps()
        now, carrier = self.runner.clock(), current_trace_carrier()
        await self._write(lambda r: halt_steps(r, now, carrier))
        run = await self.runner.store.get_run(self.run_id)
        if run is None or run.state.terminal:
            return
        deadline = self.runner.clock() + timedelta(seconds=self.runner.compensation_timeout_seconds)
        for step_id in steps_to_compensate(run):
            await self._compensate(run.step(step_id), deadline)
        now, carrier = self.runner.clock(), current_trace_carrier()
        await self._write(lambda r: finish_run(r, now, carrier))

    async def _compensate(self, step: StepRecord, deadline: datetime) -> None:
        """Runs the step's compensation agent with the step's output, retried
        per that agent's policy; its outcome is recorded on the step."""
        step_id = step.step_id
        base = self.context.with_step(step_id, 1, deadline=deadline)
        try:
            agent = await self.runner.agents.get(step.compensation_agent)
        except NotFound:
            error = RunError(
                "NOT_FOUND", AGENT_NOT_FOUND, f"agent {step.compensation_agent!r} is not registered"
            )
            await self._fail_compensation(step_id, 0, error)
            return
        except Unavailable:
            error = RunError("UNAVAILABLE", REGISTRY_UNAVAILABLE, "the agent registry could not be reached")
            await self._fail_compensation(step_id, 0, error)
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(base.remaining_seconds(self.runner.clock())):
                    await stack.enter_async_context(
                        self.slots.slot(agent.name, run_id=self.run_id, fence=self.fence, step_id=step_id)
                    )
            except TimeoutError:
                await self._fail_compensation(step_id, 0, run_deadline_error())
                return
            await self._compensation_attempts(step_id, agent, dict(step.output or {}), deadline)

    async def _compensation_attempts(
        self, step_id: str, agent: AgentSpec, input: Mapping[str, Any], deadline: datetime
    ) -> None:
        attempt = 0
        while True:
            attempt += 1
            context = self.context.with_step(step_id, attempt, deadline=deadline)
            with self.runner.tracer.start_as_current_span(
                "executor.compensation",
                attributes={**_attempt_attributes(context, agent), ATTR_COMPENSATION: True},
            ) as span:
                outcome = await self.runner.attempt(
                    self.run_id, agent, input, context, self.handle, compensation=True, fence=self.fence
                )
                if isinstance(outcome, Failed):
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error.reason))
                delay = await self._record_compensation(context, agent, outcome)
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def _record_compensation(
        self, context: ExecutionContext, agent: AgentSpec, outcome: AttemptOutcome | None
    ) -> float | None:
        step_id, attempt = context.step_id, context.attempt
        now, carrier = self.runner.clock(), current_trace_carrier()
        match outcome:
            case None:
                return None
            case Succeeded(output=output):
                await self._write(
                    functools.partial(
                        complete_compensation,
                        step_id=step_id,
                        attempt=attempt,
                        output=output,
                        now=now,
                        carrier=carrier,
                    )
                )
                return None
            case Failed(error=error, retry_after=retry_after):
                decision = self.runner.decide(attempt, error, agent, context)
                delay = max(decision.delay_seconds or 0.0, retry_after)
                if not decision.retry or delay + MIN_ATTEMPT_SECONDS >= context.remaining_seconds(now):
                    await self._fail_compensation(step_id, attempt, error)
                    return None
                await self._write(
                    functools.partial(
                        retry_compensation_later,
                        step_id=step_id,
                        attempt=attempt,
                        error=error,
                        delay_seconds=delay,
                        now=now,
                        carrier=carrier,
                    )
                )
                return delay
        return None

    async def _fail_compensation(self, step_id: str, attempt: int, error: RunError) -> None:
        now, carrier = self.runner.clock(), current_trace_carrier()
        await self._write(lambda r: fail_compensation(r, step_id, attempt, error, now, carrier))


def _ready(run: RunRecord, step: StepRecord) -> bool:
    """Not started (or waiting to retry after a restart) with every dependency done."""
    if step.state not in (StepState.PENDING, StepState.RETRYING):
        return False
    done = {s.step_id for s in run.steps if s.state is StepState.SUCCEEDED}
    return all(dependency in done for dependency in step.depends_on)


def _attempt_attributes(context: ExecutionContext, agent: AgentSpec) -> dict[str, Any]:
    return {
        ATTR_RUN_ID: context.run_id,
        ATTR_AGENT: agent.name,
        ATTR_USER_ID: context.user_id,
        ATTR_STEP_ID: context.step_id,
        ATTR_ATTEMPT: context.attempt,
    }
