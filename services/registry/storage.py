"""Agent definitions and idempotency records in SQL (SQLite or PostgreSQL).

Lists, the input schema, labels and the retry policy are JSON columns: they are
read and written whole, never queried into.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.registry.domain import (
    Agent,
    AgentDefinition,
    IdempotencyRecord,
    NameTaken,
    RequestIdTaken,
    RetryPolicy,
    RevisionConflict,
)

metadata = MetaData()

agents = Table(
    "agents",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("description", Text, nullable=False),
    Column("endpoint", String(300), nullable=False),
    Column("tools", JSON, nullable=False),
    Column("input_schema", JSON, nullable=False),
    Column("max_concurrency", Integer, nullable=False),
    Column("timeout_seconds", Float, nullable=False),
    Column("heartbeat_timeout_seconds", Float, nullable=False),
    Column("retry_policy", JSON, nullable=False),
    Column("labels", JSON, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
)

idempotency_records = Table(
    "idempotency_records",
    metadata,
    Column("caller", String(255), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    # The agent the write returned (as `agent_to_json`); null for a delete.
    Column("result", JSON, nullable=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Index("ix_idempotency_records_create_time", "create_time"),
)


class _NothingDeleted(Exception):
    """Rolls back a delete that found no agent."""


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _policy_to_json(policy: RetryPolicy) -> dict[str, Any]:
    return {
        "max_attempts": policy.max_attempts,
        "initial_backoff": policy.initial_backoff,
        "max_backoff": policy.max_backoff,
        "backoff_multiplier": policy.backoff_multiplier,
        "non_retryable_reasons": list(policy.non_retryable_reasons),
    }


def _policy_from_json(value: dict[str, Any]) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=int(value["max_attempts"]),
        initial_backoff=float(value["initial_backoff"]),
        max_backoff=float(value["max_backoff"]),
        backoff_multiplier=float(value["backoff_multiplier"]),
        non_retryable_reasons=tuple(value["non_retryable_reasons"]),
    )


def _columns(agent: Agent) -> dict[str, Any]:
    definition = agent.definition
    return {
        "name": definition.name,
        "description": definition.description,
        "endpoint": definition.endpoint,
        "tools": list(definition.tools),
        "input_schema": dict(definition.input_schema),
        "max_concurrency": definition.max_concurrency,
        "timeout_seconds": definition.timeout,
        "heartbeat_timeout_seconds": definition.heartbeat_timeout,
        "retry_policy": _policy_to_json(definition.retry_policy),
        "labels": dict(definition.labels),
        "revision": agent.revision,
        "create_time": agent.create_time,
        "update_time": agent.update_time,
    }


def _from_columns(row: RowMapping | dict[str, Any]) -> Agent:
    definition = AgentDefinition(
        name=row["name"],
        description=row["description"],
        endpoint=row["endpoint"],
        tools=tuple(row["tools"]),
        input_schema=dict(row["input_schema"]),
        max_concurrency=int(row["max_concurrency"]),
        timeout=float(row["timeout_seconds"]),
        heartbeat_timeout=float(row["heartbeat_timeout_seconds"]),
        retry_policy=_policy_from_json(row["retry_policy"]),
        labels=dict(row["labels"]),
    )
    return Agent(
        definition,
        create_time=_utc(row["create_time"]),
        update_time=_utc(row["update_time"]),
        revision=int(row["revision"]),
    )


def agent_to_json(agent: Agent) -> dict[str, Any]:
    columns = _columns(agent)
    columns["create_time"] = agent.create_time.isoformat()
    columns["update_time"] = agent.update_time.isoformat()
    return columns


def agent_from_json(value: dict[str, Any]) -> Agent:
    columns = dict(value)
    columns["create_time"] = datetime.fromisoformat(value["create_time"])
    columns["update_time"] = datetime.fromisoformat(value["update_time"])
    return _from_columns(columns)


class AgentStorage:
    """The registry's `AgentStore`. Each write is one transaction together with
    its idempotency record, so a recorded answer always describes a committed write."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def get(self, name: str) -> Agent | None:
        async with self._sessions() as session:
            row = (await session.execute(select(agents).where(agents.c.name == name))).mappings().first()
        return None if row is None else _from_columns(row)

    async def list(self, after: str | None, limit: int) -> list[Agent]:
        query = select(agents).order_by(agents.c.name).limit(limit)
        if after is not None:
            query = query.where(agents.c.name > after)
        async with self._sessions() as session:
            rows = (await session.execute(query)).mappings().all()
        return [_from_columns(row) for row in rows]

    async def create(self, agent: Agent, record: IdempotencyRecord | None) -> None:
        async with self._sessions() as session, session.begin():
            await self._insert_record(session, record)
            try:
                await session.execute(insert(agents).values(**_columns(agent)))
            except IntegrityError:
                raise NameTaken(agent.name) from None

    async def update(self, agent: Agent, expected_revision: int, record: IdempotencyRecord | None) -> None:
        values = _columns(agent)
        del values["name"], values["create_time"]
        async with self._sessions() as session, session.begin():
            await self._insert_record(session, record)
            result = await session.execute(
                update(agents)
                .where(and_(agents.c.name == agent.name, agents.c.revision == expected_revision))
                .values(**values)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise RevisionConflict(agent.name)

    async def delete(self, name: str, record: IdempotencyRecord | None) -> bool:
        try:
            async with self._sessions() as session, session.begin():
                result = await session.execute(delete(agents).where(agents.c.name == name))
                if result.rowcount != 1:  # type: ignore[attr-defined]
                    raise _NothingDeleted
                await self._insert_record(session, record)
        except _NothingDeleted:
            # Rolled back, with no record: a repeat answers NOT_FOUND again.
            return False
        return True

    async def find_request(self, caller: str, request_id: str) -> IdempotencyRecord | None:
        query = select(idempotency_records).where(
            and_(idempotency_records.c.caller == caller, idempotency_records.c.request_id == request_id)
        )
        async with self._sessions() as session:
            row = (await session.execute(query)).mappings().first()
        if row is None:
            return None
        result = row["result"]
        return IdempotencyRecord(
            caller=row["caller"],
            request_id=row["request_id"],
            fingerprint=row["fingerprint"],
            result=None if result is None else agent_from_json(result),
            create_time=_utc(row["create_time"]),
        )

    async def purge_requests(self, created_before: datetime) -> None:
        async with self._sessions() as session, session.begin():
            await session.execute(
                delete(idempotency_records).where(idempotency_records.c.create_time < created_before)
            )

    @staticmethod
    async def _insert_record(session: AsyncSession, record: IdempotencyRecord | None) -> None:
        if record is None:
            return
        try:
            await session.execute(
                insert(idempotency_records).values(
                    caller=record.caller,
                    request_id=record.request_id,
                    fingerprint=record.fingerprint,
                    result=None if record.result is None else agent_to_json(record.result),
                    create_time=record.create_time,
                )
            )
        except IntegrityError:
            raise RequestIdTaken(record.request_id) from None
