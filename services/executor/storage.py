"""Runs, steps and the event outbox in SQL (SQLite or PostgreSQL).

A run's state change and the events that describe it are written in one
transaction (`update_run`), with the run row locked so that its event seqs
stay gapless and its transitions serial. SQLite has one writer at a time
anyway; writes there are also serialised in-process, so a read-then-write
transaction can never lose its snapshot to another connection of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.common import db
from services.common.db import UtcDateTime
from services.executor.domain import (
    Decide,
    EventDraft,
    EventType,
    OutboxEvent,
    PageKey,
    RunChange,
    RunError,
    RunFilter,
    RunRecord,
    RunState,
    StepRecord,
    StepState,
    apply_change,
    events_with_seq,
    freeze_carrier,
)

# Integer on SQLite so the column is its rowid (autoincrement).
OutboxId = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(36), primary_key=True),
    Column("user_id", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("thread_id", String(128), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("input", JSON, nullable=False),
    Column("output", JSON(none_as_null=True), nullable=True),
    Column("error_code", String(32), nullable=True),
    Column("error_reason", String(128), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("labels", JSON, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("start_time", UtcDateTime, nullable=True),
    Column("end_time", UtcDateTime, nullable=True),
    Column("deadline", UtcDateTime, nullable=False),
    Column("trace_id", String(32), nullable=False),
    Column("trace_carrier", JSON, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    # The state a winding-down workflow will end in (see domain.stop_run).
    Column("ending", String(16), nullable=True),
    # The fair queue's admission tick; 0 while queued.
    Column("admission", BigInteger, nullable=False, server_default="0"),
    UniqueConstraint("user_id", "request_id", name="uq_runs_user_request"),
    Index("ix_runs_user_created", "user_id", "create_time", "run_id"),
    Index("ix_runs_state_created", "state", "create_time"),
)

steps = Table(
    "steps",
    metadata,
    Column("run_id", String(36), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("step_id", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("agent", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("output", JSON(none_as_null=True), nullable=True),
    Column("error_code", String(32), nullable=True),
    Column("error_reason", String(128), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("start_time", UtcDateTime, nullable=True),
    Column("end_time", UtcDateTime, nullable=True),
    Column("depends_on", JSON, nullable=False),
    Column("compensation_agent", String(64), nullable=False),
    Column("input", JSON(none_as_null=True), nullable=True),
    Column("completion", Integer, nullable=False, server_default="0"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", OutboxId, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("run_id", String(36), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("type", String(32), nullable=False),
    Column("step_id", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("trace_carrier", JSON, nullable=False),
    # NULL until the events service has stored the event.
    Column("published_time", UtcDateTime, nullable=True),
    UniqueConstraint("run_id", "seq", name="uq_outbox_run_seq"),
    Index("ix_outbox_published_id", "published_time", "id"),
)


def _error_columns(error: RunError | None) -> dict[str, Any]:
    if error is None:
        return {"error_code": None, "error_reason": None, "error_message": None}
    return {"error_code": error.code, "error_reason": error.reason, "error_message": error.message}


def _error_of(row: Any) -> RunError | None:
    if row.error_code is None:
        return None
    return RunError(row.error_code, row.error_reason or "", row.error_message or "")


def _run_columns(run: RunRecord) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "user_id": run.user_id,
        "agent": run.agent,
        "thread_id": run.thread_id,
        "request_id": run.request_id,
        "state": run.state.value,
        "input": dict(run.input),
        "output": None if run.output is None else dict(run.output),
        **_error_columns(run.error),
        "labels": dict(run.labels),
        "create_time": run.create_time,
        "start_time": run.start_time,
        "end_time": run.end_time,
        "deadline": run.deadline,
        "trace_id": run.trace_id,
        "trace_carrier": dict(run.trace_carrier),
        "last_seq": run.last_seq,
        "ending": None if run.ending is None else run.ending.value,
        "admission": run.admission,
    }


def _step_columns(run_id: str, position: int, step: StepRecord) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "step_id": step.step_id,
        "position": position,
        "agent": step.agent,
        "state": step.state.value,
        "attempts": step.attempts,
        "output": None if step.output is None else dict(step.output),
        **_error_columns(step.error),
        "start_time": step.start_time,
        "end_time": step.end_time,
        "depends_on": list(step.depends_on),
        "compensation_agent": step.compensation_agent,
        "input": None if step.input is None else dict(step.input),
        "completion": step.completion,
    }


def _step_of(row: Any) -> StepRecord:
    return StepRecord(
        step_id=row.step_id,
        agent=row.agent,
        state=StepState(row.state),
        attempts=row.attempts,
        output=row.output,
        error=_error_of(row),
        start_time=row.start_time,
        end_time=row.end_time,
        depends_on=tuple(row.depends_on or ()),
        compensation_agent=row.compensation_agent,
        input=row.input,
        completion=row.completion or 0,
    )


def _run_of(row: Any, run_steps: Sequence[StepRecord]) -> RunRecord:
    return RunRecord(
        run_id=row.run_id,
        user_id=row.user_id,
        agent=row.agent,
        thread_id=row.thread_id,
        request_id=row.request_id,
        state=RunState(row.state),
        input=row.input or {},
        labels=row.labels or {},
        create_time=row.create_time,
        deadline=row.deadline,
        trace_id=row.trace_id,
        trace_carrier=freeze_carrier(row.trace_carrier or {}),
        steps=tuple(run_steps),
        output=row.output,
        error=_error_of(row),
        start_time=row.start_time,
        end_time=row.end_time,
        last_seq=row.last_seq,
        ending=None if row.ending is None else RunState(row.ending),
        admission=row.admission or 0,
    )


def _outbox_columns(event: OutboxEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "run_id": event.run_id,
        "user_id": event.user_id,
        "seq": event.seq,
        "type": event.type.value,
        "step_id": event.step_id,
        "agent": event.agent,
        "payload": dict(event.payload),
        "create_time": event.create_time,
        "trace_carrier": dict(event.trace_carrier),
        "published_time": None,
    }


def _outbox_event_of(row: Any) -> OutboxEvent:
    return OutboxEvent(
        event_id=row.event_id,
        run_id=row.run_id,
        user_id=row.user_id,
        seq=row.seq,
        type=EventType(row.type),
        step_id=row.step_id,
        agent=row.agent,
        payload=row.payload or {},
        create_time=row.create_time,
        trace_carrier=freeze_carrier(row.trace_carrier or {}),
    )


class SqlRunStore:
    """The executor's `RunStore` and `OutboxStore`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = db.sessionmaker(engine)
        self._sqlite = engine.dialect.name == "sqlite"
        self._write_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        async with contextlib.AsyncExitStack() as stack:
            if self._sqlite:
                await stack.enter_async_context(self._write_lock)
            session = await stack.enter_async_context(self._sessions())
            await stack.enter_async_context(session.begin())
            yield session

    async def _steps_of(self, session: AsyncSession, run_ids: Sequence[str]) -> dict[str, list[StepRecord]]:
        found: dict[str, list[StepRecord]] = {run_id: [] for run_id in run_ids}
        if not run_ids:
            return found
        result = await session.execute(
            select(steps).where(steps.c.run_id.in_(run_ids)).order_by(steps.c.run_id, steps.c.position)
        )
        for row in result:
            found[row.run_id].append(_step_of(row))
        return found

    async def _runs_of(self, session: AsyncSession, rows: Sequence[Any]) -> list[RunRecord]:
        run_steps = await self._steps_of(session, [row.run_id for row in rows])
        return [_run_of(row, run_steps[row.run_id]) for row in rows]

    async def _load(self, session: AsyncSession, run_id: str, *, lock: bool = False) -> RunRecord | None:
        query = select(runs).where(runs.c.run_id == run_id)
        if lock:
            query = query.with_for_update()
        row = (await session.execute(query)).first()
        if row is None:
            return None
        return (await self._runs_of(session, [row]))[0]

    # -- RunStore --------------------------------------------------------------

    async def create_run(self, run: RunRecord, events: Sequence[EventDraft]) -> tuple[RunRecord, bool]:
        change = RunChange(events=tuple(events))
        numbered = events_with_seq(run, change)
        stored = apply_change(run, change)
        try:
            async with self._writing() as session:
                await session.execute(insert(runs).values(**_run_columns(stored)))
                await session.execute(
                    insert(steps), [_step_columns(run.run_id, i, s) for i, s in enumerate(stored.steps)]
                )
                if numbered:
                    await session.execute(insert(outbox), [_outbox_columns(e) for e in numbered])
        except IntegrityError:
            existing = await self.find_run_by_request(run.user_id, run.request_id)
            if existing is None:
                raise
            return existing, False
        return stored, True

    async def get_run(self, run_id: str) -> RunRecord | None:
        async with self._sessions() as session:
            return await self._load(session, run_id)

    async def find_run_by_request(self, user_id: str, request_id: str) -> RunRecord | None:
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(runs).where(runs.c.user_id == user_id, runs.c.request_id == request_id)
                )
            ).first()
            if row is None:
                return None
            return (await self._runs_of(session, [row]))[0]

    async def list_runs(
        self, user_id: str, run_filter: RunFilter, limit: int, after: PageKey | None
    ) -> list[RunRecord]:
        query = select(runs).where(runs.c.user_id == user_id)
        if run_filter.state is not None:
            query = query.where(runs.c.state == run_filter.state.value)
        if run_filter.agent:
            query = query.where(runs.c.agent == run_filter.agent)
        if run_filter.thread_id:
            query = query.where(runs.c.thread_id == run_filter.thread_id)
        if after is not None:
            after_time = datetime.fromisoformat(after[0])
            query = query.where(
                or_(
                    runs.c.create_time < after_time,
                    and_(runs.c.create_time == after_time, runs.c.run_id < after[1]),
                )
            )
        query = query.order_by(runs.c.create_time.desc(), runs.c.run_id.desc()).limit(limit)
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
            return await self._runs_of(session, rows)

    async def update_run(self, run_id: str, decide: Decide) -> tuple[RunRecord, bool] | None:
        async with self._writing() as session:
            run = await self._load(session, run_id, lock=True)
            if run is None:
                return None
            change = decide(run)
            if change is None:
                return run, False
            numbered = events_with_seq(run, change)
            changed = apply_change(run, change)
            columns = _run_columns(changed)
            for key in ("run_id", "user_id", "request_id", "create_time", "input", "trace_carrier"):
                del columns[key]
            await session.execute(update(runs).where(runs.c.run_id == run_id).values(**columns))
            touched = {c.step_id for c in change.steps}
            for position, step in enumerate(changed.steps):
                if step.step_id in touched:
                    columns = _step_columns(run_id, position, step)
                    await session.execute(
                        update(steps)
                        .where(steps.c.run_id == run_id, steps.c.step_id == step.step_id)
                        .values(**columns)
                    )
            if numbered:
                await session.execute(insert(outbox), [_outbox_columns(e) for e in numbered])
            return changed, True

    async def runs_in_state(self, state: RunState) -> list[RunRecord]:
        query = select(runs).where(runs.c.state == state.value).order_by(runs.c.create_time, runs.c.run_id)
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
            return await self._runs_of(session, rows)

    async def admission_ticks(self) -> tuple[int, dict[str, int]]:
        waiting = select(runs.c.user_id).where(runs.c.state == RunState.QUEUED.value).distinct()
        per_user = (
            select(runs.c.user_id, func.max(runs.c.admission))
            .where(runs.c.user_id.in_(waiting), runs.c.admission > 0)
            .group_by(runs.c.user_id)
        )
        async with self._sessions() as session:
            newest = (await session.execute(select(func.max(runs.c.admission)))).scalar()
            ticks = {row[0]: int(row[1]) for row in (await session.execute(per_user)).all()}
        return int(newest or 0), ticks

    # -- OutboxStore -----------------------------------------------------------

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        # Oldest first: a run's rows were committed in seq order (its row lock
        # serialises them), so each run's events leave in seq order.
        query = select(outbox).where(outbox.c.published_time.is_(None)).order_by(outbox.c.id).limit(limit)
        async with self._sessions() as session:
            return [_outbox_event_of(row) for row in (await session.execute(query)).all()]

    async def mark_published(self, event_ids: Sequence[str], when: datetime) -> None:
        if not event_ids:
            return
        async with self._writing() as session:
            await session.execute(
                update(outbox).where(outbox.c.event_id.in_(list(event_ids))).values(published_time=when)
            )

    async def delete_published(self, before: datetime) -> int:
        async with self._writing() as session:
            result = await session.execute(
                delete(outbox).where(outbox.c.published_time.is_not(None), outbox.c.published_time < before)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    async def run_events(self, run_id: str) -> list[tuple[OutboxEvent, bool]]:
        """A run's outbox rows in seq order, each with whether it was published."""
        query = select(outbox).where(outbox.c.run_id == run_id).order_by(outbox.c.seq)
        async with self._sessions() as session:
            return [
                (_outbox_event_of(row), row.published_time is not None)
                for row in (await session.execute(query)).all()
            ]

    async def close(self) -> None:
        await self.engine.dispose()
