"""Executes admitted runs: one attempt of the run's step against its agent's
worker, turning the worker's updates into state changes and events.

The run's background execution continues the trace of its StartRun span: an
`executor.run` span whose parent is the carrier stored with the run, and an
`executor.attempt` child around the worker call (whose client span the channel
interceptors add). Every event carries the context of the span that made it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from opentelemetry import trace

from services.common.convert import utcnow
from services.common.errors import NotFound, Unavailable
from services.common.tracing import (
    ATTR_AGENT,
    ATTR_RUN_ID,
    ATTR_USER_ID,
    context_from_carrier,
    current_trace_carrier,
)
from services.executor.domain import (
    AGENT_NOT_FOUND,
    ATTEMPT_DEADLINE_EXCEEDED,
    HEARTBEAT_TIMEOUT,
    MAIN_STEP,
    REGISTRY_UNAVAILABLE,
    RUN_DEADLINE_EXCEEDED,
    WORKER_STREAM_ENDED,
    AgentDirectory,
    AgentSpec,
    ExecutionContext,
    Failure,
    Heartbeat,
    Result,
    RunError,
    RunRecord,
    RunState,
    RunStore,
    Thinking,
    ToolFinished,
    ToolStarted,
    WorkerCallCancelled,
    WorkerConnector,
    begin_attempt,
    complete_with_output,
    end_run,
    record_progress,
)
from services.executor.journal import RunJournal
from services.executor.scheduler import RunHandle, Ticket

ATTR_STEP_ID = "switchboard.step_id"
ATTR_ATTEMPT = "switchboard.attempt"


def run_deadline_error() -> RunError:
    return RunError("DEADLINE_EXCEEDED", RUN_DEADLINE_EXCEEDED, "the run did not finish before its deadline")


@dataclass(frozen=True, slots=True)
class Succeeded:
    output: dict[str, object]


@dataclass(frozen=True, slots=True)
class Failed:
    state: RunState
    error: RunError


AttemptOutcome = Succeeded | Failed


class Runner:
    def __init__(
        self,
        store: RunStore,
        journal: RunJournal,
        agents: AgentDirectory,
        workers: WorkerConnector,
        *,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._journal = journal
        self._agents = agents
        self._workers = workers
        self._tracer = tracer or trace.get_tracer("switchboard.executor")
        self._clock = clock
        self._monotonic = monotonic

    async def execute(self, ticket: Ticket, handle: RunHandle) -> None:
        run = await self._store.get_run(ticket.run_id)
        if run is None or run.state is not RunState.QUEUED:
            return  # cancelled or expired while it waited
        context = run.context()
        with self._tracer.start_as_current_span(
            "executor.run",
            context=context_from_carrier(context.carrier()),
            attributes={ATTR_RUN_ID: run.run_id, ATTR_AGENT: run.agent, ATTR_USER_ID: run.user_id},
        ):
            await self._run_single_agent(run, context, handle)

    async def _end(self, run_id: str, state: RunState, error: RunError) -> None:
        now, carrier = self._clock(), current_trace_carrier()
        await self._journal.apply(run_id, lambda r: end_run(r, state, error, now, carrier))

    async def _run_single_agent(self, run: RunRecord, context: ExecutionContext, handle: RunHandle) -> None:
        if context.remaining_seconds(self._clock()) <= 0:
            await self._end(run.run_id, RunState.TIMED_OUT, run_deadline_error())
            return
        try:
            agent = await self._agents.get(run.agent)
        except NotFound:
            await self._end(
                run.run_id,
                RunState.FAILED,
                RunError("NOT_FOUND", AGENT_NOT_FOUND, f"agent {run.agent!r} is not registered"),
            )
            return
        except Unavailable:
            await self._end(
                run.run_id,
                RunState.FAILED,
                RunError("UNAVAILABLE", REGISTRY_UNAVAILABLE, "the agent registry could not be reached"),
            )
            return
        step_context = context.with_step(MAIN_STEP, attempt=1)
        with self._tracer.start_as_current_span(
            "executor.attempt",
            attributes={
                ATTR_RUN_ID: run.run_id,
                ATTR_AGENT: agent.name,
                ATTR_USER_ID: run.user_id,
                ATTR_STEP_ID: step_context.step_id,
                ATTR_ATTEMPT: step_context.attempt,
            },
        ) as span:
            outcome = await self._attempt(run, agent, step_context, handle)
            if outcome is None:
                return  # the run ended elsewhere (cancelled); nothing left to write
            now, carrier = self._clock(), current_trace_carrier()
            if isinstance(outcome, Succeeded):
                output = outcome.output
                await self._journal.apply(
                    run.run_id,
                    lambda r: complete_with_output(
                        r, step_context.step_id, step_context.attempt, output, now, carrier
                    ),
                )
            else:
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error.reason))
                await self._journal.apply(
                    run.run_id, lambda r: end_run(r, outcome.state, outcome.error, now, carrier)
                )

    def _failed(self, context: ExecutionContext, error: RunError) -> Failed:
        # Whatever went wrong, past the run's deadline the run has timed out.
        if context.remaining_seconds(self._clock()) <= 0:
            return Failed(RunState.TIMED_OUT, run_deadline_error())
        return Failed(RunState.FAILED, error)

    async def _attempt(
        self, run: RunRecord, agent: AgentSpec, context: ExecutionContext, handle: RunHandle
    ) -> AttemptOutcome | None:
        step_id, attempt = context.step_id, context.attempt
        now, carrier = self._clock(), current_trace_carrier()
        started = await self._journal.apply(
            run.run_id, lambda r: begin_attempt(r, step_id, attempt, now, carrier)
        )
        if started is None or not started[1]:
            return None
        run_remaining = context.remaining_seconds(self._clock())
        budget = min(run_remaining, agent.timeout_seconds)
        # Which deadline binds decides what running out of time means.
        if run_remaining <= agent.timeout_seconds:
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
        attempt_deadline = self._monotonic() + budget
        session = await self._workers.open(agent, run.input, context, budget)
        handle.attach(session)
        try:
            while True:
                remaining = attempt_deadline - self._monotonic()
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
                        progress = update
                        now, carrier = self._clock(), current_trace_carrier()
                        written = await self._journal.apply(
                            run.run_id,
                            functools.partial(
                                record_progress,
                                step_id=step_id,
                                attempt=attempt,
                                update=progress,
                                now=now,
                                carrier=carrier,
                            ),
                        )
                        if written is None or written[0].state.terminal:
                            return None
        finally:
            session.cancel()
            handle.detach()
