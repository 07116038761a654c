"""Runs, steps, the event outbox, and the admission state every replica
shares, in SQL (SQLite or PostgreSQL).

A run's state change and the events that describe it are written in one
transaction (`update_run`), with the run row locked so that its event seqs
stay gapless and its transitions serial; a write that carries a fence is
refused (LeaseLost) unless the run still has it. SQLite has one writer at a
time anyway; writes there are also serialised in-process, so a
read-then-write transaction can never lose its snapshot to another connection
of this process. That is also why replicas need PostgreSQL: on SQLite one
executor process owns the database.

Replicas (see `admission`): the admission lock row serializes admission
rounds; leases are timed by the database's clock (PostgreSQL's `now()`), so
replicas on different hosts need no synchronised clocks; on PostgreSQL every
change of a run is announced with NOTIFY, so that WaitRun, CancelRun and
admission answer at once across replicas.

The outbox: each replica relays the rows it wrote (so its own writes go out
the moment they commit), each together with its run's unpublished rows before
it (so a run's seqs never have a gap, whoever wrote the earlier ones), and
rows older than a lease whoever wrote them (so a dead replica's rows still go
out). Two relays may send one row; the events service stores it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
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
    exists,
    false,
    func,
    insert,
    or_,
    select,
    tuple_,
    union,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.common import db
from services.common.convert import utcnow
from services.common.db import UtcDateTime
from services.executor.admission import (
    AdmissionOutcome,
    AdmissionPlanner,
    AdmissionSnapshot,
    Claim,
    Renewal,
    ReplicaNotices,
    SlotRequest,
)
from services.executor.domain import (
    Decide,
    EventDraft,
    EventType,
    LeaseLost,
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
from services.executor.fair_queue import ActiveCounts, QueuedRun

log = logging.getLogger("switchboard.executor.storage")

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
    # The replica holding the run (NULL while it waits to be admitted), until
    # when unless renewed, and the fencing token of its claim (see admission).
    Column("owner", String(64), nullable=True),
    Column("fence", BigInteger, nullable=False, server_default="0"),
    Column("lease_expires_at", UtcDateTime, nullable=True),
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
    # The replica that wrote the row (its relay sends it).
    Column("writer", String(64), nullable=False, server_default=""),
    UniqueConstraint("run_id", "seq", name="uq_outbox_run_seq"),
    Index("ix_outbox_published_id", "published_time", "id"),
)


# A workflow step's (or compensation's) hold on one slot of its agent, or its
# wait for one (granted false). It counts only while its run is active under
# the same fence.
agent_slots = Table(
    "agent_slots",
    metadata,
    Column("id", OutboxId, primary_key=True, autoincrement=True),
    Column("slot_id", String(36), nullable=False, unique=True),
    Column("run_id", String(36), nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("step_id", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("owner", String(64), nullable=False),
    Column("granted", Boolean, nullable=False, server_default=false()),
    Column("create_time", UtcDateTime, nullable=False),
    Index("ix_agent_slots_run", "run_id"),
)

# One row (id 1): locked by every admission round, so that rounds of all
# replicas are serial; holds the newest round-robin tick handed out.
admission_lock = Table(
    "admission_lock",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tick", BigInteger, nullable=False),
)

ADMISSION_LOCK_ID = 1
# NOTIFY channel of run changes and admission news between replicas; one per
# schema, so that executors of other schemas in the database are not heard.
NOTICE_CHANNEL = "switchboard_executor"
# An admission round looks at most this many of each user's oldest waiting
# runs (the fair queue passes over the ones whose agent is full).
QUEUE_LOOKAHEAD = 200
# IN lists are sent in chunks of this many values.
CHUNK = 500
# The listener reconnects after this long when PostgreSQL went away.
LISTEN_RETRY_SECONDS = 1.0

_ACTIVE_STATES = (RunState.QUEUED.value, RunState.RUNNING.value)
# A run waiting to be admitted; an active one (admitted, possibly by a replica
# that is gone, or left RUNNING by an executor from before replicas).
_WAITING = and_(runs.c.state == RunState.QUEUED.value, runs.c.owner.is_(None))
_ACTIVE = or_(
    runs.c.state == RunState.RUNNING.value,
    and_(runs.c.state == RunState.QUEUED.value, runs.c.owner.is_not(None)),
)
_LIVE_SLOT = (
    exists()
    .where(
        runs.c.run_id == agent_slots.c.run_id,
        runs.c.fence == agent_slots.c.fence,
        runs.c.state.in_(_ACTIVE_STATES),
    )
    .correlate(agent_slots)
)


def notice_channel(schema: str | None) -> str:
    # PostgreSQL names are at most 63 bytes.
    return f"{NOTICE_CHANNEL}:{schema or ''}".encode()[:63].decode(errors="ignore")


def _chunks(values: Collection[Any]) -> Iterator[list[Any]]:
    items = list(values)
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


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
        owner=row.owner or "",
        fence=row.fence or 0,
    )


def _outbox_columns(event: OutboxEvent, writer: str) -> dict[str, Any]:
    return {
        "writer": writer,
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
    """The executor's `RunStore`, `OutboxStore` and `AdmissionStore`, as seen
    by one replica (`replica_id`; claims it makes last `lease_seconds`)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        replica_id: str = "",
        lease_seconds: float = 10.0,
        write_lock: asyncio.Lock | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.engine = engine
        self.replica_id = replica_id
        self.lease = timedelta(seconds=lease_seconds)
        self._sessions = db.sessionmaker(engine)
        self._sqlite = engine.dialect.name == "sqlite"
        # Stores of one SQLite database in one process (tests) share one lock.
        self._write_lock = write_lock or asyncio.Lock()
        self._channel: str | None = None

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        async with contextlib.AsyncExitStack() as stack:
            if self._sqlite:
                await stack.enter_async_context(self._write_lock)
            session = await stack.enter_async_context(self._sessions())
            await stack.enter_async_context(session.begin())
            yield session

    async def _now(self, session: AsyncSession) -> datetime:
        """The time leases are measured by: the database's on PostgreSQL (its
        transaction's start, shared by every replica), this host's on SQLite."""
        if self._sqlite:
            return utcnow()
        now: datetime = (await session.execute(select(func.now()))).scalar_one()
        return now

    async def _notify(self, session: AsyncSession, kind: str, subject: str = "") -> None:
        """Tells the other replicas, when the transaction commits (PostgreSQL only)."""
        if self._sqlite:
            return
        if self._channel is None:
            self._channel = notice_channel(
                (await session.execute(select(func.current_schema()))).scalar_one()
            )
        payload = f"{self.replica_id}\t{kind}\t{subject}"
        await session.execute(select(func.pg_notify(self._channel, payload)))

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
                    await session.execute(
                        insert(outbox), [_outbox_columns(e, self.replica_id) for e in numbered]
                    )
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

    async def update_run(
        self, run_id: str, decide: Decide, fence: int | None = None
    ) -> tuple[RunRecord, bool] | None:
        async with self._writing() as session:
            run = await self._load(session, run_id, lock=True)
            if run is None:
                return None
            if fence is not None and run.fence != fence:
                raise LeaseLost(run_id, fence, run.fence)
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
                await session.execute(insert(outbox), [_outbox_columns(e, self.replica_id) for e in numbered])
            await self._notify(session, "run", run_id)
            if changed.state.terminal and not run.state.terminal:
                await self._notify(session, "admission")
            return changed, True

    async def runs_in_state(self, state: RunState) -> list[RunRecord]:
        query = select(runs).where(runs.c.state == state.value).order_by(runs.c.create_time, runs.c.run_id)
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
            return await self._runs_of(session, rows)

    async def queued_count(self, user_id: str | None = None) -> int:
        query = select(func.count()).select_from(runs).where(_WAITING)
        if user_id is not None:
            query = query.where(runs.c.user_id == user_id)
        async with self._sessions() as session:
            return int((await session.execute(query)).scalar_one())

    async def overdue_queued(self, limit: int) -> list[str]:
        async with self._sessions() as session:
            now = await self._now(session)
            query = (
                select(runs.c.run_id)
                .where(_WAITING, runs.c.deadline <= now)
                .order_by(runs.c.deadline, runs.c.run_id)
                .limit(limit)
            )
            return list((await session.execute(query)).scalars())

    # -- AdmissionStore ----------------------------------------------------------

    async def admission_agents(self) -> set[str]:
        queued = select(runs.c.agent).where(_WAITING, runs.c.agent != "").distinct()
        waiting = select(agent_slots.c.agent).where(agent_slots.c.granted.is_(False)).distinct()
        async with self._sessions() as session:
            return set((await session.execute(union(queued, waiting))).scalars())

    async def admission_round(self, plan: AdmissionPlanner, mine: Collection[str] = ()) -> AdmissionOutcome:
        async with self._writing() as session:
            # First: every other round waits here until this one commits.
            tick = (
                await session.execute(
                    select(admission_lock.c.tick)
                    .where(admission_lock.c.id == ADMISSION_LOCK_ID)
                    .with_for_update()
                )
            ).scalar_one()
            now = await self._now(session)
            # Slots whose run ended or changed hands hold nothing any more.
            await session.execute(delete(agent_slots).where(~_LIVE_SLOT))
            snapshot, candidates = await self._admission_snapshot(session, int(tick))
            decision = plan(snapshot)
            claims: list[Claim] = []
            for run_id, run_tick in decision.admit:
                row = candidates[run_id]
                claimed = await session.execute(
                    update(runs)
                    .where(runs.c.run_id == run_id, _WAITING)
                    .values(
                        owner=self.replica_id,
                        fence=runs.c.fence + 1,
                        lease_expires_at=now + self.lease,
                        admission=run_tick,
                    )
                )
                # A run cancelled since the snapshot was read stays as it is.
                if getattr(claimed, "rowcount", 0) == 1:
                    claims.append(
                        Claim(row.run_id, row.user_id, row.agent, row.create_time, row.fence + 1, run_tick)
                    )
            if decision.grant:
                await session.execute(
                    update(agent_slots)
                    .where(agent_slots.c.slot_id.in_(list(decision.grant)))
                    .values(granted=True)
                )
                await self._notify(session, "admission")
            if decision.tick != tick:
                await session.execute(
                    update(admission_lock)
                    .where(admission_lock.c.id == ADMISSION_LOCK_ID)
                    .values(tick=decision.tick)
                )
            granted: set[str] = set()
            for chunk in _chunks(mine):
                query = select(agent_slots.c.slot_id).where(
                    agent_slots.c.slot_id.in_(chunk), agent_slots.c.granted.is_(True)
                )
                granted.update((await session.execute(query)).scalars())
        return AdmissionOutcome(tuple(claims), frozenset(granted), snapshot)

    async def _admission_snapshot(
        self, session: AsyncSession, tick: int
    ) -> tuple[AdmissionSnapshot, dict[str, Any]]:
        place = (
            func.row_number()
            .over(partition_by=runs.c.user_id, order_by=(runs.c.create_time, runs.c.run_id))
            .label("place")
        )
        ranked = (
            select(runs.c.run_id, runs.c.user_id, runs.c.agent, runs.c.create_time, runs.c.fence, place)
            .where(_WAITING)
            .subquery()
        )
        rows = (await session.execute(select(ranked).where(ranked.c.place <= QUEUE_LOOKAHEAD))).all()
        candidates = {row.run_id: row for row in rows}
        queued = tuple(
            QueuedRun(
                run_id=row.run_id,
                user_id=row.user_id,
                agent=row.agent,
                sequence=int(row.create_time.timestamp() * 1_000_000),
            )
            for row in rows
        )
        per_user: dict[str, int] = {}
        per_agent: dict[str, int] = {}
        total = 0
        active = select(runs.c.user_id, runs.c.agent, func.count()).where(_ACTIVE)
        for user_id, agent, count in await session.execute(active.group_by(runs.c.user_id, runs.c.agent)):
            per_user[user_id] = per_user.get(user_id, 0) + count
            if agent:
                per_agent[agent] = per_agent.get(agent, 0) + count
            total += count
        held = (
            select(agent_slots.c.agent, func.count())
            .where(agent_slots.c.granted.is_(True), _LIVE_SLOT)
            .group_by(agent_slots.c.agent)
        )
        for agent, count in await session.execute(held):
            per_agent[agent] = per_agent.get(agent, 0) + count
        waiting = (
            await session.execute(
                select(agent_slots.c.slot_id, agent_slots.c.agent, agent_slots.c.id)
                .where(agent_slots.c.granted.is_(False), _LIVE_SLOT)
                .order_by(agent_slots.c.id)
            )
        ).all()
        last_served: dict[str, int] = {}
        for chunk in _chunks({row.user_id for row in rows}):
            served = (
                select(runs.c.user_id, func.max(runs.c.admission))
                .where(runs.c.user_id.in_(chunk), runs.c.admission > 0)
                .group_by(runs.c.user_id)
            )
            last_served.update((user_id, int(newest)) for user_id, newest in await session.execute(served))
        snapshot = AdmissionSnapshot(
            queued=queued,
            active=ActiveCounts(per_user=per_user, per_agent=per_agent, total=total),
            waiting_slots=tuple(SlotRequest(row.slot_id, row.agent, row.id) for row in waiting),
            last_served=last_served,
            tick=tick,
        )
        return snapshot, candidates

    async def active_counts(self) -> ActiveCounts:
        """What is active now: runs per user and in all, slots per agent."""
        async with self._sessions() as session:
            snapshot, _ = await self._admission_snapshot(session, 0)
        return snapshot.active

    async def request_slot(self, slot_id: str, *, run_id: str, fence: int, step_id: str, agent: str) -> None:
        async with self._writing() as session:
            await session.execute(
                insert(agent_slots).values(
                    slot_id=slot_id,
                    run_id=run_id,
                    fence=fence,
                    step_id=step_id,
                    agent=agent,
                    owner=self.replica_id,
                    granted=False,
                    create_time=utcnow(),
                )
            )

    async def release_slot(self, slot_id: str) -> None:
        async with self._writing() as session:
            freed = await session.execute(
                delete(agent_slots).where(agent_slots.c.slot_id == slot_id).returning(agent_slots.c.granted)
            )
            if any(freed.scalars()):
                await self._notify(session, "admission")

    async def renew_leases(self, fences: Mapping[str, int]) -> Renewal:
        if not fences:
            return Renewal(frozenset(), frozenset())
        kept: set[str] = set()
        ended: set[str] = set()
        async with self._writing() as session:
            now = await self._now(session)
            for chunk in _chunks(fences.items()):
                renewed = await session.execute(
                    update(runs)
                    .where(
                        tuple_(runs.c.run_id, runs.c.fence).in_(chunk),
                        runs.c.owner == self.replica_id,
                        runs.c.state.in_(_ACTIVE_STATES),
                    )
                    .values(lease_expires_at=now + self.lease)
                    .returning(runs.c.run_id)
                )
                kept.update(renewed.scalars())
            # Usually none: runs that ended since the last renewal, or were lost.
            for chunk in _chunks(fences.keys() - kept):
                query = select(runs.c.run_id).where(
                    runs.c.run_id.in_(chunk), runs.c.state.not_in(_ACTIVE_STATES)
                )
                ended.update((await session.execute(query)).scalars())
        return Renewal(frozenset(kept), frozenset(ended))

    async def release_leases(self, run_ids: Collection[str]) -> None:
        if not run_ids:
            return
        async with self._writing() as session:
            now = await self._now(session)
            for chunk in _chunks(run_ids):
                await session.execute(
                    update(runs)
                    .where(
                        runs.c.run_id.in_(chunk),
                        runs.c.owner == self.replica_id,
                        runs.c.state.in_(_ACTIVE_STATES),
                    )
                    .values(lease_expires_at=now)
                )
            await self._notify(session, "takeover")

    async def claim_expired(
        self, *, exclude: Collection[str] = (), reclaim_own: bool = False, limit: int = 100
    ) -> list[Claim]:
        async with self._writing() as session:
            now = await self._now(session)
            expired = or_(runs.c.lease_expires_at.is_(None), runs.c.lease_expires_at <= now)
            if reclaim_own:
                expired = or_(expired, runs.c.owner == self.replica_id)
            query = select(
                runs.c.run_id,
                runs.c.user_id,
                runs.c.agent,
                runs.c.create_time,
                runs.c.fence,
                runs.c.admission,
            ).where(_ACTIVE, expired)
            if exclude:
                query = query.where(runs.c.run_id.not_in(list(exclude)))
            # Rows another transaction is writing are left for the next pass.
            query = (
                query.order_by(runs.c.create_time, runs.c.run_id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            claims: list[Claim] = []
            for row in (await session.execute(query)).all():
                await session.execute(
                    update(runs)
                    .where(runs.c.run_id == row.run_id)
                    .values(owner=self.replica_id, fence=row.fence + 1, lease_expires_at=now + self.lease)
                )
                claims.append(
                    Claim(row.run_id, row.user_id, row.agent, row.create_time, row.fence + 1, row.admission)
                )
            return claims

    async def listen(self, notices: ReplicaNotices) -> None:
        if self._sqlite:
            return
        conninfo = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as connection:
                    row = await (await connection.execute("SELECT current_schema()")).fetchone()
                    channel = notice_channel(row[0] if row else None)
                    await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    # Whatever happened while nobody listened: look again.
                    notices.resync()
                    async for notice in connection.notifies():
                        _dispatch(notice.payload, self.replica_id, notices)
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "lost the notices of other replicas; reconnecting",
                    extra={"error": str(exc), "retry_in": LISTEN_RETRY_SECONDS},
                )
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    # -- OutboxStore -----------------------------------------------------------

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        # Oldest first: a run's rows were committed in seq order (its row lock
        # serialises them), so each run's events leave in seq order.
        pending = outbox.c.published_time.is_(None)
        async with self._sessions() as session:
            adopt_before = await self._now(session) - self.lease
            ours = (
                select(outbox)
                .where(pending, or_(outbox.c.writer == self.replica_id, outbox.c.create_time < adopt_before))
                .order_by(outbox.c.id)
                .limit(limit)
            )
            rows = {row.id: row for row in (await session.execute(ours)).all()}
            if rows:
                # Each of these runs' unpublished rows up to the newest taken,
                # whoever wrote them: no run's batch starts past a gap.
                newest = max(rows)
                for chunk in _chunks({row.run_id for row in rows.values()}):
                    before = select(outbox).where(pending, outbox.c.run_id.in_(chunk), outbox.c.id < newest)
                    rows.update((row.id, row) for row in (await session.execute(before)).all())
            return [_outbox_event_of(rows[key]) for key in sorted(rows)]

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


def _dispatch(payload: str, replica_id: str, notices: ReplicaNotices) -> None:
    sender, _, rest = payload.partition("\t")
    kind, _, subject = rest.partition("\t")
    if sender == replica_id:
        return  # this replica's own change: it has acted on it already
    if kind == "run" and subject:
        notices.run_changed(subject)
    elif kind == "admission":
        notices.admission_changed()
    elif kind == "takeover":
        notices.leases_released()
