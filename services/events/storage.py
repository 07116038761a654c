"""The embedded event log: SQL tables behind `EventLog` (SQLite or PostgreSQL).

Appends run in one transaction each: the stored state the batch depends on is
read (runs first, locked with FOR UPDATE on PostgreSQL, then the events with
the batch's ids, so that both reads agree), `plan_append` decides, and the plan
is written, or nothing is. Writes in this process are serialized (one
writer at a time suits SQLite and costs PostgreSQL little at this scale); a
writer in another process that wins a race surfaces as an IntegrityError and
the batch is simply decided again against the new state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    and_,
    case,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.common.db import UtcDateTime, sessionmaker
from services.common.errors import Aborted
from services.events.domain import (
    AppendPlan,
    ConsumerPosition,
    ConsumerRunState,
    ConsumerStatus,
    DeliveryRecord,
    DeliveryState,
    LogListener,
    NewEvent,
    RunInfo,
    StoredEvent,
    plan_append,
    retention_point,
)

# A batch that keeps losing races to another writer is refused after this many tries.
APPEND_ATTEMPTS = 5
# Bound on ids in one IN (...) list.
IN_CHUNK = 500


metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("completed_seq", BigInteger, nullable=True),
    Column("create_time", UtcDateTime, nullable=False),
    # Retention removed the run's events through this seq.
    Column("trimmed_through", BigInteger, nullable=False, server_default="0"),
    Index("ix_runs_user_id", "user_id", "create_time"),
)

events = Table(
    "events",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(128), nullable=False, unique=True),
    Column("user_id", String(128), nullable=False),
    Column("type", Integer, nullable=False),
    Column("step_id", String(256), nullable=False),
    Column("agent", String(128), nullable=False),
    # JSON text, written and read whole.
    Column("payload", Text, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("traceparent", String(256), nullable=False),
    Column("tracestate", String(512), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Index("ix_events_create_time", "create_time"),
)

consumer_positions = Table(
    "consumer_positions",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("consumer", String(64), primary_key=True),
    Column("run_id", String(128), primary_key=True),
    Column("epoch", BigInteger, nullable=False),
    Column("acked_through", BigInteger, nullable=False),
    Index("ix_consumer_positions_run", "user_id", "run_id"),
)

consumer_deliveries = Table(
    "consumer_deliveries",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("consumer", String(64), primary_key=True),
    Column("run_id", String(128), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(128), nullable=False),
    Column("attempts", Integer, nullable=False),
    # DeliveryState
    Column("state", SmallInteger, nullable=False),
    Index("ix_consumer_deliveries_event", "user_id", "consumer", "event_id"),
    Index("ix_consumer_deliveries_run", "user_id", "run_id"),
)


# Durable consumers that followed all of their user's runs (retention keeps
# runs they have not read yet).
all_runs_consumers = Table(
    "all_runs_consumers",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("consumer", String(64), primary_key=True),
)


def _chunks(values: Collection[str]) -> list[list[str]]:
    items = list(dict.fromkeys(values))
    return [items[i : i + IN_CHUNK] for i in range(0, len(items), IN_CHUNK)]


def _run(row: RowMapping) -> RunInfo:
    return RunInfo(
        run_id=row["run_id"],
        user_id=row["user_id"],
        epoch=row["epoch"],
        last_seq=row["last_seq"],
        completed_seq=row["completed_seq"],
        trimmed_through=row["trimmed_through"],
    )


def _event(row: RowMapping) -> StoredEvent:
    return StoredEvent(
        event_id=row["event_id"],
        run_id=row["run_id"],
        user_id=row["user_id"],
        seq=row["seq"],
        type=row["type"],
        step_id=row["step_id"],
        agent=row["agent"],
        payload=json.loads(row["payload"]),
        create_time=row["create_time"],
        traceparent=row["traceparent"],
        tracestate=row["tracestate"],
        epoch=row["epoch"],
        content_hash=row["content_hash"],
    )


def _event_row(event: StoredEvent) -> dict[str, Any]:
    return {
        "run_id": event.run_id,
        "seq": event.seq,
        "event_id": event.event_id,
        "user_id": event.user_id,
        "type": event.type,
        "step_id": event.step_id,
        "agent": event.agent,
        "payload": json.dumps(event.payload, sort_keys=True, separators=(",", ":")),
        "create_time": event.create_time,
        "traceparent": event.traceparent,
        "tracestate": event.tracestate,
        "epoch": event.epoch,
        "content_hash": event.content_hash,
    }


def _record(row: RowMapping) -> DeliveryRecord:
    return DeliveryRecord(
        run_id=row["run_id"],
        seq=row["seq"],
        event_id=row["event_id"],
        attempts=row["attempts"],
        state=DeliveryState(row["state"]),
    )


class SqlEventLog:
    """`EventLog` on SQLAlchemy (async)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine)
        self._write_lock = asyncio.Lock()

    def add_listener(self, listener: LogListener) -> None:
        """One process serves an SQL log: there is nobody else to hear from."""

    async def claim_consumer(self, user_id: str, consumer: str, holder: str) -> int:
        return 0  # the in-process ConsumerRegistry is the only claim

    def _upsert(self, table: Table) -> Any:
        dialect = self._engine.dialect.name
        return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)

    # -- the log

    async def append(self, batch: Sequence[NewEvent], now: datetime) -> AppendPlan:
        for _attempt in range(APPEND_ATTEMPTS):
            try:
                async with self._write_lock, self._sessions() as session, session.begin():
                    return await self._append_once(session, batch, now)
            except IntegrityError:
                continue  # another writer got there first: decide again on the new state
        raise Aborted("the batch kept conflicting with concurrent writes", reason="WRITE_CONFLICT")

    async def _append_once(
        self, session: AsyncSession, batch: Sequence[NewEvent], now: datetime
    ) -> AppendPlan:
        # Runs first: once they are locked, no other writer can store events of
        # them, so the events read next match the runs read (under READ
        # COMMITTED each statement sees the latest commits: read the other way
        # round, a batch committed in between looked like a taken seq).
        current: dict[str, RunInfo] = {}
        for chunk in _chunks([e.run_id for e in batch]):
            query = select(runs).where(runs.c.run_id.in_(chunk)).with_for_update()
            result = await session.execute(query)
            current.update((row["run_id"], _run(row)) for row in result.mappings())
        stored: dict[str, StoredEvent] = {}
        for chunk in _chunks([e.event_id for e in batch]):
            result = await session.execute(select(events).where(events.c.event_id.in_(chunk)))
            stored.update((row["event_id"], _event(row)) for row in result.mappings())
        plan = plan_append(batch, stored, current, now)
        for run_id, run in plan.runs.items():
            previous = plan.previous_last_seq[run_id]
            if previous is None:
                await session.execute(
                    runs.insert().values(
                        run_id=run.run_id,
                        user_id=run.user_id,
                        epoch=run.epoch,
                        last_seq=run.last_seq,
                        completed_seq=run.completed_seq,
                        create_time=now,
                    )
                )
                continue
            changed = await session.execute(
                update(runs)
                .where(runs.c.run_id == run_id, runs.c.last_seq == previous)
                .values(last_seq=run.last_seq, completed_seq=run.completed_seq)
            )
            if changed.rowcount != 1:  # type: ignore[attr-defined]
                raise IntegrityError("run advanced concurrently", params=None, orig=Exception(run_id))
        if plan.events:
            await session.execute(events.insert(), [_event_row(event) for event in plan.events])
        return plan

    async def runs(self, run_ids: Collection[str]) -> dict[str, RunInfo]:
        found: dict[str, RunInfo] = {}
        async with self._engine.connect() as connection:
            for chunk in _chunks(run_ids):
                result = await connection.execute(select(runs).where(runs.c.run_id.in_(chunk)))
                found.update((row["run_id"], _run(row)) for row in result.mappings())
        return found

    async def runs_of_user(self, user_id: str) -> list[RunInfo]:
        async with self._engine.connect() as connection:
            result = await connection.execute(
                select(runs).where(runs.c.user_id == user_id).order_by(runs.c.create_time, runs.c.run_id)
            )
            return [_run(row) for row in result.mappings()]

    async def read(self, run_id: str, after_seq: int, limit: int) -> list[StoredEvent]:
        async with self._engine.connect() as connection:
            result = await connection.execute(
                select(events)
                .where(events.c.run_id == run_id, events.c.seq > after_seq)
                .order_by(events.c.seq)
                .limit(limit)
            )
            return [_event(row) for row in result.mappings()]

    async def events_by_id(self, event_ids: Collection[str]) -> dict[str, StoredEvent]:
        found: dict[str, StoredEvent] = {}
        async with self._engine.connect() as connection:
            for chunk in _chunks(event_ids):
                result = await connection.execute(select(events).where(events.c.event_id.in_(chunk)))
                found.update((row["event_id"], _event(row)) for row in result.mappings())
        return found

    # -- consumers

    async def load_consumer(
        self, user_id: str, consumer: str, run_ids: Collection[str] | None
    ) -> dict[str, ConsumerRunState]:
        owned = and_(consumer_positions.c.user_id == user_id, consumer_positions.c.consumer == consumer)
        chunks: list[list[str] | None] = [None] if run_ids is None else list(_chunks(run_ids))
        positions: dict[str, ConsumerPosition] = {}
        above: dict[str, list[DeliveryRecord]] = {}
        async with self._engine.connect() as connection:
            for chunk in chunks:
                scope = owned if chunk is None else and_(owned, consumer_positions.c.run_id.in_(chunk))
                result = await connection.execute(select(consumer_positions).where(scope))
                for row in result.mappings():
                    positions[row["run_id"]] = ConsumerPosition(
                        row["run_id"], row["epoch"], row["acked_through"]
                    )
                joined = consumer_deliveries.join(
                    consumer_positions,
                    and_(
                        consumer_deliveries.c.user_id == consumer_positions.c.user_id,
                        consumer_deliveries.c.consumer == consumer_positions.c.consumer,
                        consumer_deliveries.c.run_id == consumer_positions.c.run_id,
                    ),
                )
                result = await connection.execute(
                    select(consumer_deliveries)
                    .select_from(joined)
                    .where(scope, consumer_deliveries.c.seq > consumer_positions.c.acked_through)
                    .order_by(consumer_deliveries.c.run_id, consumer_deliveries.c.seq)
                )
                for row in result.mappings():
                    above.setdefault(row["run_id"], []).append(_record(row))
        return {
            run_id: ConsumerRunState(position, tuple(above.get(run_id, ())))
            for run_id, position in positions.items()
        }

    async def save_consumer(
        self,
        user_id: str,
        consumer: str,
        positions: Sequence[ConsumerPosition],
        deliveries: Sequence[DeliveryRecord],
        holder: str | None = None,
    ) -> None:
        if not positions and not deliveries:
            return
        async with self._write_lock, self._engine.begin() as connection:
            if positions:
                insert = self._upsert(consumer_positions)
                await connection.execute(
                    insert.on_conflict_do_update(
                        index_elements=["user_id", "consumer", "run_id"],
                        set_={"epoch": insert.excluded.epoch, "acked_through": insert.excluded.acked_through},
                    ),
                    [
                        {
                            "user_id": user_id,
                            "consumer": consumer,
                            "run_id": p.run_id,
                            "epoch": p.epoch,
                            "acked_through": p.acked_through,
                        }
                        for p in positions
                    ],
                )
            if deliveries:
                insert = self._upsert(consumer_deliveries)
                await connection.execute(
                    insert.on_conflict_do_update(
                        index_elements=["user_id", "consumer", "run_id", "seq"],
                        set_={"attempts": insert.excluded.attempts, "state": insert.excluded.state},
                    ),
                    [
                        {
                            "user_id": user_id,
                            "consumer": consumer,
                            "run_id": d.run_id,
                            "seq": d.seq,
                            "event_id": d.event_id,
                            "attempts": d.attempts,
                            "state": int(d.state),
                        }
                        for d in deliveries
                    ],
                )

    async def consumer_deliveries(
        self, user_id: str, consumer: str, event_ids: Collection[str]
    ) -> list[DeliveryRecord]:
        found: list[DeliveryRecord] = []
        async with self._engine.connect() as connection:
            for chunk in _chunks(event_ids):
                result = await connection.execute(
                    select(consumer_deliveries).where(
                        consumer_deliveries.c.user_id == user_id,
                        consumer_deliveries.c.consumer == consumer,
                        consumer_deliveries.c.event_id.in_(chunk),
                    )
                )
                found.extend(_record(row) for row in result.mappings())
        return found

    async def trim(self, max_age_cutoff: datetime | None, settled_cutoff: datetime | None) -> dict[str, int]:
        if max_age_cutoff is None and settled_cutoff is None:
            return {}
        trimmed: dict[str, int] = {}
        async with self._write_lock, self._engine.begin() as connection:

            async def first_young(cutoff: datetime | None) -> dict[str, int] | None:
                """Per run, the first seq created at or after `cutoff` (None: rule off)."""
                if cutoff is None:
                    return None
                result = await connection.execute(
                    select(events.c.run_id, func.min(events.c.seq))
                    .where(events.c.create_time >= cutoff)
                    .group_by(events.c.run_id)
                )
                return {run_id: seq for run_id, seq in result}

            young_any, young_settled = await first_young(max_age_cutoff), await first_young(settled_cutoff)
            # Per (user, run): each consumer's position on it.
            positions: dict[tuple[str, str], dict[str, int]] = {}
            result = await connection.execute(
                select(
                    consumer_positions.c.user_id,
                    consumer_positions.c.run_id,
                    consumer_positions.c.consumer,
                    consumer_positions.c.acked_through,
                )
            )
            for user_id, run_id, consumer, through in result:
                positions.setdefault((user_id, run_id), {})[consumer] = through
            following: dict[str, set[str]] = {}
            for user_id, consumer in await connection.execute(select(all_runs_consumers)):
                following.setdefault(user_id, set()).add(consumer)
            candidates = await connection.execute(
                select(runs).where(runs.c.trimmed_through < runs.c.last_seq)
            )
            for row in candidates.mappings().all():
                run = _run(row)

                def older_through(young: dict[str, int] | None, run: RunInfo = run) -> int | None:
                    if young is None:
                        return None
                    return young.get(run.run_id, run.last_seq + 1) - 1

                held = positions.get((run.user_id, run.run_id), {})
                lowest = min(held.values(), default=None)
                if following.get(run.user_id, set()) - held.keys():
                    lowest = 0  # a consumer of all the user's runs has not read this one yet
                through = retention_point(run, older_through(young_any), older_through(young_settled), lowest)
                if through <= run.trimmed_through:
                    continue
                await connection.execute(
                    events.delete().where(events.c.run_id == run.run_id, events.c.seq <= through)
                )
                await connection.execute(
                    update(runs).where(runs.c.run_id == run.run_id).values(trimmed_through=through)
                )
                trimmed[run.run_id] = through
        return trimmed

    async def follow_all_runs(self, user_id: str, consumer: str) -> None:
        insert = self._upsert(all_runs_consumers)
        async with self._write_lock, self._engine.begin() as connection:
            await connection.execute(
                insert.on_conflict_do_nothing(index_elements=["user_id", "consumer"]),
                [{"user_id": user_id, "consumer": consumer}],
            )

    async def delivery_status(self, user_id: str, run_id: str) -> list[ConsumerStatus]:
        def count(state: DeliveryState) -> Any:
            return func.coalesce(func.sum(case((consumer_deliveries.c.state == int(state), 1), else_=0)), 0)

        async with self._engine.connect() as connection:
            positions = await connection.execute(
                select(consumer_positions.c.consumer, consumer_positions.c.acked_through).where(
                    consumer_positions.c.user_id == user_id, consumer_positions.c.run_id == run_id
                )
            )
            counts = await connection.execute(
                select(
                    consumer_deliveries.c.consumer,
                    func.count().label("delivered"),
                    count(DeliveryState.ACKNOWLEDGED).label("acknowledged"),
                    count(DeliveryState.PENDING).label("pending"),
                    count(DeliveryState.DEAD_LETTERED).label("dead_lettered"),
                )
                .where(consumer_deliveries.c.user_id == user_id, consumer_deliveries.c.run_id == run_id)
                .group_by(consumer_deliveries.c.consumer)
            )
            by_consumer = {row["consumer"]: row for row in counts.mappings()}
            statuses = []
            for row in positions.mappings():
                tally = by_consumer.get(row["consumer"])
                statuses.append(
                    ConsumerStatus(
                        consumer=row["consumer"],
                        delivered=int(tally["delivered"]) if tally else 0,
                        acknowledged=int(tally["acknowledged"]) if tally else 0,
                        pending=int(tally["pending"]) if tally else 0,
                        dead_lettered=int(tally["dead_lettered"]) if tally else 0,
                        last_acked_seq=row["acked_through"],
                    )
                )
        return sorted(statuses, key=lambda status: status.consumer)
