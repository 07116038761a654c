"""The registry's rules: what a valid agent definition is, the defaults a stored
agent carries explicitly, who may change agents, and idempotent writes.

Field paths in violations are relative to the agent (`retry_policy.max_backoff`);
the servicer prefixes them with the request field (`agent.`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from services.common.auth import Principal, Role
from services.common.convert import utcnow
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from services.common.pagination import PageRequest, next_page_token

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
# host:port, where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
ENDPOINT_PATTERN = re.compile(
    r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):(?P<port>[0-9]{1,5})$"
)
TOOL_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
LABEL_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
REASON_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{0,62}$")

MAX_DESCRIPTION_CHARS = 4096
MAX_TOOLS = 128
MAX_LABELS = 64
MAX_LABEL_VALUE_CHARS = 256
MAX_REASONS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_CONCURRENCY = 10_000
MAX_ATTEMPTS = 20
# Durations below this are typos, not settings: nothing useful finishes that fast.
MIN_DURATION_SECONDS = 0.1
MAX_TIMEOUT_SECONDS = 24 * 3600.0
MAX_HEARTBEAT_TIMEOUT_SECONDS = 3600.0
MAX_BACKOFF_SECONDS = 3600.0
MAX_BACKOFF_MULTIPLIER = 10.0

# The defaults documented in agent.proto, for fields left at 0.
DEFAULT_MAX_CONCURRENCY = 10
DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF_SECONDS = 1.0
DEFAULT_MAX_BACKOFF_SECONDS = 60.0
DEFAULT_BACKOFF_MULTIPLIER = 2.0

LIST_DEFAULT_PAGE_SIZE = 100
LIST_MAX_PAGE_SIZE = 1000

RETRY_POLICY_FIELDS = (
    "max_attempts",
    "initial_backoff",
    "max_backoff",
    "backoff_multiplier",
    "non_retryable_reasons",
)
# Fields an update may change; `retry_policy.<field>` paths change one part of the policy.
MUTABLE_FIELDS = (
    "description",
    "endpoint",
    "tools",
    "input_schema",
    "max_concurrency",
    "timeout",
    "heartbeat_timeout",
    "retry_policy",
    "labels",
)
UPDATABLE_PATHS = frozenset(MUTABLE_FIELDS) | {f"retry_policy.{name}" for name in RETRY_POLICY_FIELDS}
IMMUTABLE_FIELDS = frozenset({"name", "create_time", "update_time"})
WRITER_ROLES = (Role.ADMIN, Role.SERVICE)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the executor retries a failed attempt; 0 means the documented default."""

    max_attempts: int = 0
    initial_backoff: float = 0.0
    max_backoff: float = 0.0
    backoff_multiplier: float = 0.0
    non_retryable_reasons: tuple[str, ...] = ()

    def with_defaults(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts or DEFAULT_MAX_ATTEMPTS,
            initial_backoff=self.initial_backoff or DEFAULT_INITIAL_BACKOFF_SECONDS,
            max_backoff=self.max_backoff or DEFAULT_MAX_BACKOFF_SECONDS,
            backoff_multiplier=self.backoff_multiplier or DEFAULT_BACKOFF_MULTIPLIER,
            non_retryable_reasons=self.non_retryable_reasons,
        )


@dataclass(frozen=True, slots=True)
class AgentDefinition:
    """Everything about an agent that its owner sets. Durations are seconds."""

    name: str
    description: str = ""
    endpoint: str = ""
    tools: tuple[str, ...] = ()
    input_schema: Mapping[str, Any] = field(default_factory=dict)
    max_concurrency: int = 0
    timeout: float = 0.0
    heartbeat_timeout: float = 0.0
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    labels: Mapping[str, str] = field(default_factory=dict)

    def with_defaults(self) -> AgentDefinition:
        """The same definition with every 0 replaced by its documented default."""
        return dataclasses.replace(
            self,
            max_concurrency=self.max_concurrency or DEFAULT_MAX_CONCURRENCY,
            timeout=self.timeout or DEFAULT_TIMEOUT_SECONDS,
            heartbeat_timeout=self.heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
            retry_policy=self.retry_policy.with_defaults(),
        )


@dataclass(frozen=True, slots=True)
class Agent:
    """A stored agent: its definition (defaults applied) and bookkeeping."""

    definition: AgentDefinition
    create_time: datetime
    update_time: datetime
    # Bumped by every write; updates are conditional on it (no lost updates).
    revision: int = 1

    @property
    def name(self) -> str:
        return self.definition.name


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The first answer to a write with a request_id, replayed on a repeat."""

    caller: str
    request_id: str
    # Hash of the method and its arguments: a request_id reused for another request is refused.
    fingerprint: str
    # The agent the write returned; None for a delete.
    result: Agent | None
    create_time: datetime


class NameTaken(Exception):
    """Storage: an agent with this name exists."""


class RequestIdTaken(Exception):
    """Storage: this caller's request_id was recorded meanwhile by a concurrent write."""


class RevisionConflict(Exception):
    """Storage: the agent changed (or vanished) since it was read."""


class AgentStore(Protocol):
    async def get(self, name: str) -> Agent | None: ...

    async def list(self, after: str | None, limit: int) -> list[Agent]: ...

    async def create(self, agent: Agent, record: IdempotencyRecord | None) -> None: ...

    async def update(
        self, agent: Agent, expected_revision: int, record: IdempotencyRecord | None
    ) -> None: ...

    async def delete(self, name: str, record: IdempotencyRecord | None) -> bool: ...

    async def find_request(self, caller: str, request_id: str) -> IdempotencyRecord | None: ...

    async def purge_requests(self, created_before: datetime) -> None: ...


def _duration_violations(path: str, value: float, maximum: float) -> list[FieldViolation]:
    if not math.isfinite(value) or value < 0:
        return [FieldViolation(path, "must not be negative")]
    if value == 0:
        return []
    if value < MIN_DURATION_SECONDS:
        return [FieldViolation(path, f"must be 0 (the default) or at least {MIN_DURATION_SECONDS}s")]
    if value > maximum:
        return [FieldViolation(path, f"must be at most {maximum:g}s")]
    return []


def _schema_violations(schema: Mapping[str, Any]) -> list[FieldViolation]:
    try:
        Draft202012Validator.check_schema(dict(schema))
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        detail = exc.message if len(exc.message) <= 200 else exc.message[:200] + "..."
        at = f" at /{where}" if where else ""
        return [FieldViolation("input_schema", f"is not a valid JSON Schema{at}: {detail}")]
    return []


def _retry_policy_violations(policy: RetryPolicy, fields: Collection[str]) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    prefix = "retry_policy."
    if "max_attempts" in fields and not 0 <= policy.max_attempts <= MAX_ATTEMPTS:
        found.append(FieldViolation(prefix + "max_attempts", f"must be between 1 and {MAX_ATTEMPTS} (0: 3)"))
    if "initial_backoff" in fields:
        found += _duration_violations(prefix + "initial_backoff", policy.initial_backoff, MAX_BACKOFF_SECONDS)
    if "max_backoff" in fields:
        found += _duration_violations(prefix + "max_backoff", policy.max_backoff, MAX_BACKOFF_SECONDS)
    if "backoff_multiplier" in fields:
        multiplier = policy.backoff_multiplier
        if not math.isfinite(multiplier) or (
            multiplier != 0 and not 1.0 <= multiplier <= MAX_BACKOFF_MULTIPLIER
        ):
            found.append(
                FieldViolation(
                    prefix + "backoff_multiplier",
                    f"must be between 1.0 and {MAX_BACKOFF_MULTIPLIER:g} (0: 2.0)",
                )
            )
    if "non_retryable_reasons" in fields:
        reasons = policy.non_retryable_reasons
        if len(reasons) > MAX_REASONS:
            found.append(FieldViolation(prefix + "non_retryable_reasons", f"at most {MAX_REASONS} reasons"))
        for index, reason in enumerate(reasons):
            if not REASON_PATTERN.match(reason):
                found.append(
                    FieldViolation(f"{prefix}non_retryable_reasons[{index}]", "must be UPPER_SNAKE_CASE")
                )
    return found


def definition_violations(definition: AgentDefinition, fields: Collection[str]) -> list[FieldViolation]:
    """Problems with the named fields of `definition` (paths as in UPDATABLE_PATHS,
    plus `name`), each reported once, all reported together."""
    found: list[FieldViolation] = []
    if "name" in fields and not NAME_PATTERN.match(definition.name):
        found.append(FieldViolation("name", "must match ^[a-z][a-z0-9-]{1,62}$"))
    if "description" in fields and len(definition.description) > MAX_DESCRIPTION_CHARS:
        found.append(FieldViolation("description", f"must be at most {MAX_DESCRIPTION_CHARS} characters"))
    if "endpoint" in fields:
        match = ENDPOINT_PATTERN.match(definition.endpoint)
        if not definition.endpoint:
            found.append(FieldViolation("endpoint", "is required (host:port of the agent's worker)"))
        elif match is None or not 1 <= int(match["port"]) <= 65535:
            found.append(FieldViolation("endpoint", "must be host:port with a port from 1 to 65535"))
    if "tools" in fields:
        if len(definition.tools) > MAX_TOOLS:
            found.append(FieldViolation("tools", f"at most {MAX_TOOLS} tools"))
        if len(set(definition.tools)) != len(definition.tools):
            found.append(FieldViolation("tools", "must not repeat a tool"))
        for index, tool in enumerate(definition.tools):
            if not TOOL_PATTERN.match(tool):
                found.append(FieldViolation(f"tools[{index}]", "must match ^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"))
    if "input_schema" in fields:
        found += _schema_violations(definition.input_schema)
    if "max_concurrency" in fields and not 0 <= definition.max_concurrency <= MAX_CONCURRENCY:
        found.append(FieldViolation("max_concurrency", f"must be between 0 (10) and {MAX_CONCURRENCY}"))
    if "timeout" in fields:
        found += _duration_violations("timeout", definition.timeout, MAX_TIMEOUT_SECONDS)
    if "heartbeat_timeout" in fields:
        found += _duration_violations(
            "heartbeat_timeout", definition.heartbeat_timeout, MAX_HEARTBEAT_TIMEOUT_SECONDS
        )
    policy_fields = set(RETRY_POLICY_FIELDS) if "retry_policy" in fields else set()
    policy_fields |= {
        path.removeprefix("retry_policy.") for path in fields if path.startswith("retry_policy.")
    }
    found += _retry_policy_violations(definition.retry_policy, policy_fields)
    if "labels" in fields:
        if len(definition.labels) > MAX_LABELS:
            found.append(FieldViolation("labels", f"at most {MAX_LABELS} labels"))
        for key, value in definition.labels.items():
            if not LABEL_KEY_PATTERN.match(key):
                found.append(FieldViolation(f"labels[{key!r}]", "key must match ^[a-z][a-z0-9_.-]{0,62}$"))
            elif len(value) > MAX_LABEL_VALUE_CHARS:
                found.append(
                    FieldViolation(
                        f"labels[{key!r}]", f"value must be at most {MAX_LABEL_VALUE_CHARS} characters"
                    )
                )
    return found


def consistency_violations(definition: AgentDefinition) -> list[FieldViolation]:
    """Rules across fields, checked on the complete definition with defaults applied."""
    policy = definition.retry_policy
    if policy.max_backoff < policy.initial_backoff:
        return [
            FieldViolation(
                "retry_policy.max_backoff",
                f"must not be less than initial_backoff ({policy.initial_backoff:g}s)",
            )
        ]
    return []


def merge(current: AgentDefinition, changes: AgentDefinition, paths: Collection[str]) -> AgentDefinition:
    """`current` with the fields named by `paths` taken from `changes`."""
    top = {path: getattr(changes, path) for path in paths if path in MUTABLE_FIELDS}
    merged = dataclasses.replace(current, **top)
    policy_parts = {
        path.removeprefix("retry_policy."): getattr(changes.retry_policy, path.removeprefix("retry_policy."))
        for path in paths
        if path.startswith("retry_policy.")
    }
    if policy_parts:
        merged = dataclasses.replace(
            merged, retry_policy=dataclasses.replace(merged.retry_policy, **policy_parts)
        )
    return merged


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def fingerprint(method: str, *arguments: Any) -> str:
    canonical = json.dumps([method, *(_plain(a) for a in arguments)], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _invalid(path: str, description: str, reason: str | None = None) -> InvalidArgument:
    return InvalidArgument([FieldViolation(path, description)], reason=reason)


class Registry:
    """Agent definitions. Reads: any authenticated principal. Writes: admins and
    services, idempotent by (caller, request_id)."""

    # Optimistic update retries before giving up on a hot agent.
    UPDATE_ATTEMPTS = 5

    def __init__(
        self,
        store: AgentStore,
        *,
        idempotency_retention_seconds: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._retention = timedelta(seconds=idempotency_retention_seconds)
        self._clock = clock

    @staticmethod
    def check_writer(caller: Principal) -> None:
        caller.require_role(*WRITER_ROLES)

    async def get(self, caller: Principal, name: str) -> Agent:
        agent = await self._store.get(name)
        if agent is None:
            raise NotFound(f"agent {name!r} not found", reason="AGENT_NOT_FOUND", metadata={"agent": name})
        return agent

    async def list(self, caller: Principal, page: PageRequest) -> tuple[list[Agent], str]:
        after = page.after if isinstance(page.after, str) else None
        agents = await self._store.list(after, page.size + 1)
        if len(agents) > page.size:
            agents = agents[: page.size]
            return agents, next_page_token(agents[-1].name)
        return agents, ""

    async def register(self, caller: Principal, definition: AgentDefinition, request_id: str) -> Agent:
        self.check_writer(caller)
        complete = definition.with_defaults()
        self._check_consistency(complete)
        key = fingerprint("RegisterAgent", complete)
        while True:
            replayed = await self._replay(caller, request_id, key)
            if replayed is not None:
                return self._replayed_agent(replayed)
            now = self._clock()
            agent = Agent(complete, create_time=now, update_time=now)
            try:
                await self._store.create(agent, self._record(caller, request_id, key, agent, now))
            except RequestIdTaken:
                continue  # a concurrent repeat won: answer as it did
            except NameTaken:
                existing = await self._store.get(complete.name)
                # Registering exactly what is stored is a harmless repeat, request_id or not.
                if existing is not None and existing.definition == complete:
                    return existing
                raise AlreadyExists(
                    f"agent {complete.name!r} already exists",
                    reason="AGENT_ALREADY_EXISTS",
                    metadata={"agent": complete.name},
                ) from None
            return agent

    async def update(
        self,
        caller: Principal,
        name: str,
        changes: AgentDefinition,
        paths: Collection[str],
        request_id: str,
    ) -> Agent:
        self.check_writer(caller)
        fields = sorted(paths) if paths else list(MUTABLE_FIELDS)
        unknown = [path for path in fields if path not in UPDATABLE_PATHS]
        if unknown:
            raise _invalid("update_mask", "cannot update " + ", ".join(unknown))
        key = fingerprint("UpdateAgent", name, fields, {path: _value_at(changes, path) for path in fields})
        for _ in range(self.UPDATE_ATTEMPTS):
            replayed = await self._replay(caller, request_id, key)
            if replayed is not None:
                return self._replayed_agent(replayed)
            current = await self.get(caller, name)
            merged = merge(current.definition, changes, fields).with_defaults()
            self._check_consistency(merged)
            if merged == current.definition:
                return current
            now = self._clock()
            updated = Agent(merged, current.create_time, now, current.revision + 1)
            try:
                await self._store.update(
                    updated, current.revision, self._record(caller, request_id, key, updated, now)
                )
            except (RevisionConflict, RequestIdTaken):
                continue  # changed meanwhile: merge again onto the newer version
            return updated
        raise Aborted(
            f"agent {name!r} is being changed concurrently; retry",
            reason="CONCURRENT_UPDATE",
            retry_after=0.1,
        )

    async def delete(self, caller: Principal, name: str, request_id: str) -> None:
        self.check_writer(caller)
        key = fingerprint("DeleteAgent", name)
        while True:
            if await self._replay(caller, request_id, key) is not None:
                return
            now = self._clock()
            try:
                deleted = await self._store.delete(name, self._record(caller, request_id, key, None, now))
            except RequestIdTaken:
                continue
            if not deleted:
                raise NotFound(
                    f"agent {name!r} not found", reason="AGENT_NOT_FOUND", metadata={"agent": name}
                )
            return

    @staticmethod
    def _check_consistency(definition: AgentDefinition) -> None:
        problems = consistency_violations(definition)
        if problems:
            raise InvalidArgument([FieldViolation("agent." + p.field, p.description) for p in problems])

    @staticmethod
    def _replayed_agent(record: IdempotencyRecord) -> Agent:
        if record.result is None:  # cannot happen: a delete's fingerprint differs
            raise _invalid("request_id", "was used for a different request", "REQUEST_ID_REUSED")
        return record.result

    def _record(
        self, caller: Principal, request_id: str, key: str, result: Agent | None, now: datetime
    ) -> IdempotencyRecord | None:
        if not request_id:
            return None
        return IdempotencyRecord(caller.user_id, request_id, key, result, now)

    async def _replay(self, caller: Principal, request_id: str, key: str) -> IdempotencyRecord | None:
        """The recorded answer to this caller's request_id, if it is a repeat."""
        if not request_id:
            return None
        await self._store.purge_requests(self._clock() - self._retention)
        record = await self._store.find_request(caller.user_id, request_id)
        if record is None:
            return None
        if record.fingerprint != key:
            raise _invalid("request_id", "was already used for a different request", "REQUEST_ID_REUSED")
        return record


def _value_at(definition: AgentDefinition, path: str) -> Any:
    if path.startswith("retry_policy."):
        return getattr(definition.retry_policy, path.removeprefix("retry_policy."))
    return getattr(definition, path)
