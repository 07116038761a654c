"""The events service's rules, free of grpc and protobuf.

Publishing (`plan_append`): per run, seq N is stored only after N-1; the first
event of a run is seq 1 and fixes the run's owner and epoch; an identical
repeat of a stored event returns its original position; a batch is stored
whole or not at all (the backend's job, in one transaction).

Delivery (`Subscription`): per run in seq order, at most `max_in_flight`
unacknowledged at a time, redelivered after the ack deadline with the attempt
counted, dead-lettered (with an explicit marker) after the maximum attempts,
heartbeats on an idle stream, and `RunStreamCompleted` once a run's last event
is settled. A durable consumer keeps its positions in the backend, so a new
connection (or a restarted service) resumes where the last one left off.
Subscriptions count what they send in `EventsMetrics` (services.events.metrics),
and answers to acks name the events they are about, for the servicer's spans.

The log itself sits behind `EventLog`: the SQL log (one process) or Redis
Streams (shared by replicas), with the same behaviour. Between replicas, the
log carries signals (`LogListener`): publishes wake subscriptions everywhere,
and a durable consumer is claimed by its newest connection, whose claim fences
every older connection's writes wherever it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import math
import re
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from opentelemetry.metrics import NoOpMeterProvider

from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from services.events.metrics import EventsMetrics

log = logging.getLogger("switchboard.events")

MAX_PUBLISH_BATCH = 500
CONSUMER_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9._-]{1,64}$")
MAX_ID_CHARS = 128
DEFAULT_MAX_IN_FLIGHT = 100
MAX_MAX_IN_FLIGHT = 1000
DEFAULT_ACK_DEADLINE_SECONDS = 30.0
MIN_ACK_DEADLINE_SECONDS = 1.0
MAX_ACK_DEADLINE_SECONDS = 600.0
MAX_NACK_DELAY_SECONDS = 600.0
LIST_DEFAULT_PAGE_SIZE = 100
LIST_MAX_PAGE_SIZE = 1000
# A heartbeat names at most this many runs (the most recently active ones).
HEARTBEAT_MAX_POSITIONS = 100


class EventType(enum.IntEnum):
    """Mirrors `switchboard.events.v1.EventType` (same numbers)."""

    UNSPECIFIED = 0
    RUN_QUEUED = 1
    AGENT_STARTED = 2
    AGENT_THINKING = 3
    TOOL_EXECUTING = 4
    TOOL_COMPLETED = 5
    AGENT_COMPLETED = 6
    AGENT_FAILED = 7
    RUN_COMPLETED = 8


class AckOutcome(enum.IntEnum):
    """Mirrors `switchboard.events.v1.AckOutcome`."""

    ACCEPTED = 1
    # No such event awaits acknowledgement by this consumer.
    UNKNOWN = 2
    # Already settled (acknowledged or dead-lettered).
    STALE = 3


class DeliveryState(enum.IntEnum):
    PENDING = 1
    ACKNOWLEDGED = 2
    DEAD_LETTERED = 3


# --- Records -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as a producer publishes it."""

    event_id: str
    run_id: str
    user_id: str
    seq: int
    type: int
    step_id: str = ""
    agent: str = ""
    payload: Mapping[str, Any] = field(default_factory=dict)
    create_time: datetime | None = None
    traceparent: str = ""
    tracestate: str = ""

    def content_hash(self) -> str:
        """Fingerprint of everything the producer said: equal hashes mean a repeat."""
        content = [
            self.event_id,
            self.run_id,
            self.user_id,
            self.seq,
            int(self.type),
            self.step_id,
            self.agent,
            self.payload,
            self.create_time.isoformat() if self.create_time else None,
            self.traceparent,
            self.tracestate,
        ]
        encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(encoded.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    event_id: str
    run_id: str
    user_id: str
    seq: int
    type: int
    step_id: str
    agent: str
    payload: Mapping[str, Any]
    create_time: datetime
    traceparent: str
    tracestate: str
    epoch: int
    content_hash: str


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run's stream: its owner (fixed by its first event), epoch and end."""

    run_id: str
    user_id: str
    epoch: int
    last_seq: int
    # Seq of the RUN_COMPLETED event, once stored.
    completed_seq: int | None = None
    # Retention removed every event through this seq (the run itself stays).
    trimmed_through: int = 0


@dataclass(frozen=True, slots=True)
class AppendResult:
    event_id: str
    run_id: str
    seq: int
    duplicate: bool


@dataclass
class AppendPlan:
    """What one batch changes, decided by `plan_append` against the stored state."""

    results: list[AppendResult]
    # Final state of every run the batch created or advanced.
    runs: dict[str, RunInfo]
    # last_seq of each of those runs before the batch; None for a run it creates.
    previous_last_seq: dict[str, int | None]
    events: list[StoredEvent]


@dataclass(frozen=True, slots=True)
class ConsumerPosition:
    run_id: str
    epoch: int
    # Every seq up to this one is settled (acknowledged, dead-lettered, or
    # skipped by the start position the consumer chose).
    acked_through: int


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    run_id: str
    seq: int
    event_id: str
    attempts: int
    state: DeliveryState


@dataclass(frozen=True, slots=True)
class ConsumerRunState:
    position: ConsumerPosition
    # Deliveries with seq above `position.acked_through`.
    deliveries: tuple[DeliveryRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class ConsumerStatus:
    consumer: str
    delivered: int
    acknowledged: int
    pending: int
    dead_lettered: int
    last_acked_seq: int


# --- The backend interface -----------------------------------------------------


ConsumerKey = tuple[str, str]  # (user_id, consumer name)


class LogListener(Protocol):
    """What other processes serving the same log (replicas) did. Called from
    the log's own task; must not block."""

    def runs_appended(self, user_id: str, run_ids: Collection[str]) -> None: ...

    def consumer_claimed(self, key: ConsumerKey, generation: int) -> None:
        """A subscription elsewhere claimed the consumer with this generation."""
        ...

    def consumer_changed(self, key: ConsumerKey, run_ids: Collection[str]) -> None:
        """The consumer's positions or deliveries on these runs were written
        elsewhere without its claim (an `Acknowledge` without a stream)."""
        ...

    def signals_lost(self) -> None:
        """Signals may have been missed (the log's connection dropped)."""
        ...


class EventLog(Protocol):
    """A durable event log with per-consumer positions. Implementations: the SQL
    log in storage.py (SQLite or PostgreSQL; served by one process) and Redis
    Streams in redis_log.py (shared by replicas, which it keeps informed through
    `LogListener`)."""

    def add_listener(self, listener: LogListener) -> None:
        """Hears what other processes do; a log served by one process never calls it."""
        ...

    async def claim_consumer(self, user_id: str, consumer: str, holder: str) -> int:
        """Makes `holder` (a subscription id) the consumer's only writer, ahead
        of every earlier claim in any process. Returns the claim's generation,
        increasing per consumer (0 where one process serves the log: the
        in-process `ConsumerRegistry` is the only claim there)."""
        ...

    async def append(self, batch: Sequence[NewEvent], now: datetime) -> AppendPlan:
        """Atomically checks `batch` with `plan_append` against the stored state
        and stores what it plans: all of it, or (on an error) nothing."""
        ...

    async def runs(self, run_ids: Collection[str]) -> dict[str, RunInfo]: ...

    async def runs_of_user(self, user_id: str) -> list[RunInfo]:
        """Every run of the user, oldest first."""
        ...

    async def read(self, run_id: str, after_seq: int, limit: int) -> list[StoredEvent]:
        """Events of the run with seq > after_seq, in seq order."""
        ...

    async def events_by_id(self, event_ids: Collection[str]) -> dict[str, StoredEvent]: ...

    async def load_consumer(
        self, user_id: str, consumer: str, run_ids: Collection[str] | None
    ) -> dict[str, ConsumerRunState]:
        """The consumer's position on each run it has one for (all of them when
        run_ids is None), with its deliveries above that position."""
        ...

    async def save_consumer(
        self,
        user_id: str,
        consumer: str,
        positions: Sequence[ConsumerPosition],
        deliveries: Sequence[DeliveryRecord],
        holder: str | None = None,
    ) -> None:
        """Upserts positions and delivery records, atomically. With `holder`,
        only while that claim stands (else raises `consumer_taken_over`, writing
        nothing). Without one (acks without a stream), a log shared by processes
        never moves a position back nor reopens a settled delivery, and tells
        the others (`LogListener.consumer_changed`)."""
        ...

    async def consumer_deliveries(
        self, user_id: str, consumer: str, event_ids: Collection[str]
    ) -> list[DeliveryRecord]: ...

    async def follow_all_runs(self, user_id: str, consumer: str) -> None:
        """Records that the consumer follows all the user's runs: retention then
        keeps, for it, the runs it has no position on yet (it would read them
        from the beginning)."""
        ...

    async def delivery_status(self, user_id: str, run_id: str) -> list[ConsumerStatus]:
        """Per durable consumer of the user with a position on the run."""
        ...

    async def trim(self, max_age_cutoff: datetime | None, settled_cutoff: datetime | None) -> dict[str, int]:
        """Retention: removes from each run the prefix `retention_point` allows
        (events compared by `create_time`) and records it as the run's
        `trimmed_through`; the run itself stays. None turns a rule off. Returns
        the new `trimmed_through` of each run it trimmed."""
        ...


# --- Publishing rules ----------------------------------------------------------
# The refusals of a batch, the same from every backend (`index`: the event's
# place in the batch).


def event_id_conflict(event_id: str, index: int) -> AlreadyExists:
    return AlreadyExists(
        f"event {event_id} was already published with different content",
        reason="EVENT_ID_CONFLICT",
        metadata={"event_id": event_id, "index": str(index)},
    )


def run_owner_mismatch(index: int) -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation(f"events[{index}].user_id", "differs from the owner of the run")],
        reason="RUN_OWNER_MISMATCH",
    )


def run_already_completed(run_id: str, completed_seq: int, index: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"run {run_id} is complete (RUN_COMPLETED at seq {completed_seq})",
        reason="RUN_ALREADY_COMPLETED",
        metadata={"run_id": run_id, "index": str(index)},
    )


def sequence_taken(run_id: str, seq: int, index: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"seq {seq} of run {run_id} is already taken by another event",
        reason="SEQUENCE_TAKEN",
        metadata={"run_id": run_id, "seq": str(seq), "index": str(index)},
    )


def sequence_gap(run_id: str, expected: int, seq: int, index: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"run {run_id} expects seq {expected} next, not {seq}",
        reason="SEQUENCE_GAP",
        metadata={"run_id": run_id, "expected_seq": str(expected), "seq": str(seq), "index": str(index)},
    )


def epoch_of(now: datetime) -> int:
    """A new run's epoch: its creation time in milliseconds."""
    return int(now.timestamp() * 1000)


def plan_append(
    batch: Sequence[NewEvent],
    stored: Mapping[str, StoredEvent],
    runs: Mapping[str, RunInfo],
    now: datetime,
) -> AppendPlan:
    """Decides the outcome of a batch, in order, given the stored events with the
    batch's ids and the stored runs it names. Raises on the first event that
    cannot be stored (the batch is then stored not at all)."""
    epoch = epoch_of(now)
    planned_by_id: dict[str, StoredEvent] = {}
    current: dict[str, RunInfo] = dict(runs)
    plan = AppendPlan(results=[], runs={}, previous_last_seq={}, events=[])
    for index, event in enumerate(batch):
        digest = event.content_hash()
        earlier = planned_by_id.get(event.event_id) or stored.get(event.event_id)
        if earlier is not None:
            if earlier.content_hash != digest:
                raise event_id_conflict(event.event_id, index)
            plan.results.append(AppendResult(earlier.event_id, earlier.run_id, earlier.seq, duplicate=True))
            continue
        run = current.get(event.run_id)
        expected = 1 if run is None else run.last_seq + 1
        if run is not None and run.user_id != event.user_id:
            raise run_owner_mismatch(index)
        if run is not None and run.completed_seq is not None:
            raise run_already_completed(event.run_id, run.completed_seq, index)
        if event.seq < expected:
            raise sequence_taken(event.run_id, event.seq, index)
        if event.seq > expected:
            raise sequence_gap(event.run_id, expected, event.seq, index)
        if run is None:
            run = RunInfo(event.run_id, event.user_id, epoch, 0)
            plan.previous_last_seq.setdefault(event.run_id, None)
        else:
            plan.previous_last_seq.setdefault(event.run_id, run.last_seq)
        completed = event.seq if event.type == EventType.RUN_COMPLETED else run.completed_seq
        run = dataclasses.replace(run, last_seq=event.seq, completed_seq=completed)
        current[run.run_id] = plan.runs[run.run_id] = run
        stored_event = StoredEvent(
            event_id=event.event_id,
            run_id=event.run_id,
            user_id=event.user_id,
            seq=event.seq,
            type=int(event.type),
            step_id=event.step_id,
            agent=event.agent,
            payload=event.payload,
            create_time=event.create_time or now,
            traceparent=event.traceparent,
            tracestate=event.tracestate,
            epoch=run.epoch,
            content_hash=digest,
        )
        planned_by_id[event.event_id] = stored_event
        plan.events.append(stored_event)
        plan.results.append(AppendResult(event.event_id, event.run_id, event.seq, duplicate=False))
    return plan


CONSUMER_TAKEN_OVER = "CONSUMER_TAKEN_OVER"
EVENTS_TRIMMED = "EVENTS_TRIMMED"


def retention_point(
    run: RunInfo, aged_through: int | None, settled_aged_through: int | None, settled_through: int | None
) -> int:
    """How far retention may trim a run: through the last seq of its oldest
    events created before the maximum-age cutoff (`aged_through`), whoever has
    read them; and through the last seq of those created before the shorter
    cutoff (`settled_aged_through`) as far as every durable consumer of the run
    has settled (`settled_through`: the lowest position among the consumers
    with one, 0 if a consumer following all the user's runs has none yet; None
    when no consumer holds the run back). Never back, never past the last seq.
    A None age bound means that rule is off."""
    through = run.trimmed_through
    if aged_through is not None:
        through = max(through, aged_through)
    if settled_aged_through is not None:
        limit = (
            settled_aged_through if settled_through is None else min(settled_aged_through, settled_through)
        )
        through = max(through, limit)
    return min(through, run.last_seq)


def events_trimmed(run: RunInfo, wanted_after: int) -> OutOfRange:
    return OutOfRange(
        f"run {run.run_id} keeps no events through seq {run.trimmed_through} (retention); "
        f"seq {wanted_after + 1} onwards is not complete: continue after seq {run.trimmed_through}",
        reason=EVENTS_TRIMMED,
        metadata={"run_id": run.run_id, "epoch": str(run.epoch), "trimmed_through": str(run.trimmed_through)},
    )


def consumer_taken_over(consumer: str) -> Aborted:
    return Aborted(
        f"consumer {consumer} was opened by a newer connection",
        reason=CONSUMER_TAKEN_OVER,
        metadata={"consumer": consumer},
    )


def run_not_found(run_id: str) -> NotFound:
    # The same answer for a missing run and for another user's.
    return NotFound(f"run {run_id} not found", reason="RUN_NOT_FOUND", metadata={"run_id": run_id})


async def _events_at(log: EventLog, run_id: str, seq: int) -> tuple[StoredEvent, ...]:
    """The run's event at `seq`, if the log still holds it (retention may not)."""
    return tuple(event for event in await log.read(run_id, seq - 1, 1) if event.seq == seq)


def advance_watermark(acked_through: int, settled_above: set[int]) -> int:
    """Moves a contiguous 'settled through' position over settled seqs (consumed from the set)."""
    while acked_through + 1 in settled_above:
        acked_through += 1
        settled_above.discard(acked_through)
    for seq in [s for s in settled_above if s <= acked_through]:
        settled_above.discard(seq)
    return acked_through


# --- Subscriptions ---------------------------------------------------------------


class StartKind(enum.Enum):
    # Durable consumer: where it left off (from the beginning on a run it never
    # read). Ephemeral: new events only.
    DEFAULT = "default"
    FROM_BEGINNING = "from_beginning"
    AFTER_SEQ = "after_seq"
    NEW_ONLY = "new_only"
    RESUME = "resume"


@dataclass(frozen=True, slots=True)
class ResumePoint:
    run_id: str
    epoch: int
    last_acked_seq: int


@dataclass(frozen=True, slots=True)
class StartPosition:
    kind: StartKind = StartKind.DEFAULT
    after_seq: int = 0
    resume: ResumePoint | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    # None: every run of the caller's, present and future.
    run_id: str | None
    start: StartPosition = StartPosition()
    # None: ephemeral (state in memory only).
    consumer: str | None = None
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    ack_deadline: float = DEFAULT_ACK_DEADLINE_SECONDS


@dataclass(frozen=True, slots=True)
class CumulativeAck:
    run_id: str
    through_seq: int


@dataclass(frozen=True, slots=True)
class Delivered:
    event: StoredEvent
    attempt: int


@dataclass(frozen=True, slots=True)
class DeadLettered:
    event: StoredEvent
    attempts: int


DeliveryItem = Delivered | DeadLettered


@dataclass(frozen=True, slots=True)
class DeliveryBatch:
    """Deliveries of one run, in seq order."""

    run_id: str
    user_id: str
    items: tuple[DeliveryItem, ...]


@dataclass(frozen=True, slots=True)
class AckResult:
    outcome: AckOutcome
    # Set for an ack by event id.
    event_id: str = ""
    # Set for a cumulative ack.
    cumulative: CumulativeAck | None = None
    # The caller's events the answer is about, for tracing it in their run's
    # trace: the event an ack by id named (when it exists and is the caller's,
    # whatever the outcome); the events a cumulative ack settled, in seq order,
    # or for a stale one the last event it covers. Empty for anything else.
    events: tuple[StoredEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class AckReport:
    results: tuple[AckResult, ...]


@dataclass(frozen=True, slots=True)
class RunPosition:
    run_id: str
    epoch: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    positions: tuple[RunPosition, ...]


@dataclass(frozen=True, slots=True)
class RunStreamCompleted:
    run_id: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The run's events through `trimmed_through` are gone (retention): what
    follows continues after that seq, not from where the subscription asked."""

    run_id: str
    epoch: int
    trimmed_through: int
    reason: str = EVENTS_TRIMMED


Output = DeliveryBatch | AckReport | Heartbeat | RunStreamCompleted | StreamReset


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    max_delivery_attempts: int = 5
    heartbeat_seconds: float = 10.0
    # Most deliveries in one batch.
    batch_size: int = 100


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """Seconds; None keeps events forever under that rule (see `retention_point`)."""

    # Older events go, read or not.
    max_age: float | None = None
    # Older events go once every durable consumer of the run has settled them.
    settled_age: float | None = None


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class PublishListener(Protocol):
    def on_published(self, run_ids: Collection[str]) -> None: ...

    def on_signals_lost(self) -> None:
        """Publishes elsewhere may have gone unheard: look again."""
        ...

    def fail(self, error: BaseException) -> None: ...


class Notifier:
    """Wakes the subscriptions of a user when their runs get events."""

    def __init__(self) -> None:
        self._listeners: dict[str, set[PublishListener]] = defaultdict(set)

    def add(self, user_id: str, listener: PublishListener) -> None:
        self._listeners[user_id].add(listener)

    def discard(self, user_id: str, listener: PublishListener) -> None:
        listeners = self._listeners.get(user_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[user_id]

    def notify(self, user_id: str, run_ids: Collection[str]) -> None:
        for listener in list(self._listeners.get(user_id, ())):
            listener.on_published(run_ids)

    def signals_lost(self) -> None:
        for listeners in list(self._listeners.values()):
            for listener in list(listeners):
                listener.on_signals_lost()

    def fail_all(self, error: BaseException) -> None:
        for listeners in list(self._listeners.values()):
            for listener in list(listeners):
                listener.fail(error)


class ConsumerRegistry:
    """The live subscription of each durable consumer, and one lock per consumer
    that serializes every change to its state (steps, acks, takeovers)."""

    def __init__(self) -> None:
        self._active: dict[ConsumerKey, Subscription] = {}
        self._locks: weakref.WeakValueDictionary[ConsumerKey, asyncio.Lock] = weakref.WeakValueDictionary()

    def lock(self, key: ConsumerKey) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    def active(self, key: ConsumerKey) -> Subscription | None:
        return self._active.get(key)

    def take_over(self, key: ConsumerKey, newer: Subscription) -> None:
        """The newer connection wins; the older stream ends with ABORTED."""
        older = self._active.get(key)
        if older is not None and older is not newer:
            log.info("durable consumer taken over", extra={"user_id": key[0], "consumer": key[1]})
            older.fail(consumer_taken_over(key[1]))
        self._active[key] = newer

    def release(self, key: ConsumerKey, subscription: Subscription) -> None:
        if self._active.get(key) is subscription:
            del self._active[key]


@dataclass
class _RunCursor:
    run_id: str
    epoch: int
    last_seq: int
    completed_seq: int | None
    # Seqs up to here were settled or skipped by the start position.
    acked_through: int
    # Seqs at or below this were never delivered here (start position).
    start_after: int
    # The next seq to take from the log.
    next_seq: int
    settled_above: set[int] = field(default_factory=set)
    # Durable only: unsettled deliveries made by earlier connections, by seq.
    earlier_pending: dict[int, DeliveryRecord] = field(default_factory=dict)
    completion_delivered: bool = False
    completion_announced: bool = False
    activity: float = 0.0

    @property
    def has_backlog(self) -> bool:
        return self.next_seq <= self.last_seq


@dataclass
class _InFlight:
    event: StoredEvent
    attempt: int
    # When the current attempt counts as failed (ack deadline, or nack delay).
    due: float


class Subscription:
    """One open subscription. `stream()` yields lists of outputs; acks and
    nacks come in through `acknowledge_from_stream`/`nack_from_stream`.

    Redeliveries keep per-run order among first deliveries; a redelivered event
    may follow later events of its run (at-least-once: clients dedupe by seq).
    """

    def __init__(
        self,
        log: EventLog,
        notifier: Notifier,
        consumers: ConsumerRegistry,
        user_id: str,
        spec: SubscriptionSpec,
        settings: DeliverySettings,
        clock: Clock,
        metrics: EventsMetrics,
    ) -> None:
        self.subscription_id = uuid.uuid4().hex
        self.user_id = user_id
        self.spec = spec
        self._log = log
        self._metrics = metrics
        self._notifier = notifier
        self._consumers = consumers
        self._settings = settings
        self._clock = clock
        self._key: ConsumerKey | None = (user_id, spec.consumer) if spec.consumer else None
        self._lock = consumers.lock(self._key) if self._key else asyncio.Lock()
        self._runs: dict[str, _RunCursor] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._dirty_runs: set[str] = set()
        self._maybe_complete: set[str] = set()
        self._ack_reports: list[AckReport] = []
        self._resets: list[StreamReset] = []
        self._record_writes: dict[tuple[str, int], DeliveryRecord] = {}
        self._position_writes: set[str] = set()
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None
        self._closed = False
        # The generation of this subscription's claim on its durable consumer
        # (infinite until claimed: a claim elsewhere cannot be newer yet).
        self.claim_generation: float = math.inf
        # Runs whose consumer state another process wrote.
        self._changed_runs: set[str] = set()
        # Publishes elsewhere may have gone unheard: look at every run again.
        self._rescan = False

    @property
    def durable(self) -> bool:
        return self._key is not None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def ended(self) -> bool:
        return self._closed or self._failure is not None

    # -- lifecycle

    async def open(self) -> None:
        """Checks the scope and start position and loads the state. Raises before
        anything is delivered; takes over an older connection of the consumer."""
        # Listen before reading the runs: nothing published after the read is missed.
        self._notifier.add(self.user_id, self)
        opened = False
        try:
            async with self._lock:
                runs = await self._scope_runs()
                self._check_resume(runs)
                if self._key is not None:
                    self._consumers.take_over(self._key, self)
                    self.claim_generation = await self._log.claim_consumer(
                        self.user_id, self._key[1], self.subscription_id
                    )
                    if self.spec.run_id is None:
                        await self._log.follow_all_runs(self.user_id, self._key[1])
                stored = {}
                if self._key is not None:
                    # All-runs: every position of the consumer, rather than one lookup per run.
                    scope = list(runs) if self.spec.run_id is not None else None
                    stored = await self._log.load_consumer(self.user_id, self._key[1], scope)
                for run in runs.values():
                    self._track(run, stored.get(run.run_id), present_at_open=True)
                await self._flush()
            opened = True
        finally:
            if not opened:
                self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._metrics.untrack(self)
        self._notifier.discard(self.user_id, self)
        if self._key is not None:
            self._consumers.release(self._key, self)
        self._wake.set()

    def fail(self, error: BaseException) -> None:
        """Ends the stream with `error` at its next step."""
        if self._failure is None:
            self._failure = error
        self._wake.set()

    def on_published(self, run_ids: Collection[str]) -> None:
        if self._closed:
            return
        if self.spec.run_id is None:
            self._dirty_runs.update(run_ids)
        elif self.spec.run_id in run_ids:
            self._dirty_runs.add(self.spec.run_id)
        else:
            return
        self._wake.set()

    def on_signals_lost(self) -> None:
        if self._closed:
            return
        self._rescan = True
        if self._key is not None:
            self._changed_runs.update(self._runs)
        self._wake.set()

    def on_consumer_changed(self, run_ids: Collection[str]) -> None:
        """Another process wrote this consumer's state on these runs."""
        if self._closed or self._key is None:
            return
        self._changed_runs.update(run_ids)
        self._wake.set()

    async def _scope_runs(self) -> dict[str, RunInfo]:
        if self.spec.run_id is not None:
            run = (await self._log.runs([self.spec.run_id])).get(self.spec.run_id)
            if run is None or run.user_id != self.user_id:
                raise run_not_found(self.spec.run_id)
            return {run.run_id: run}
        return {run.run_id: run for run in await self._log.runs_of_user(self.user_id)}

    def _check_resume(self, runs: Mapping[str, RunInfo]) -> None:
        resume = self.spec.start.resume
        if self.spec.start.kind is not StartKind.RESUME or resume is None:
            return
        run = runs.get(resume.run_id)
        if run is None:
            raise run_not_found(resume.run_id)
        if resume.epoch != run.epoch:
            raise OutOfRange(
                f"the stream of run {run.run_id} is at epoch {run.epoch}, not {resume.epoch}: "
                "restart it from the beginning",
                reason="EPOCH_MISMATCH",
                metadata={"run_id": run.run_id, "epoch": str(run.epoch)},
            )
        if resume.last_acked_seq < run.trimmed_through:
            raise events_trimmed(run, resume.last_acked_seq)
        if resume.last_acked_seq > run.last_seq:
            raise OutOfRange(
                f"run {run.run_id} has no seq {resume.last_acked_seq} (its last is {run.last_seq})",
                reason="SEQ_BEYOND_STREAM",
                metadata={"run_id": run.run_id, "last_seq": str(run.last_seq)},
            )

    def _start_after(self, run: RunInfo, present_at_open: bool) -> int:
        if not present_at_open:
            return 0  # the run began after the subscription opened: all of it is new
        start = self.spec.start
        if start.kind is StartKind.RESUME and start.resume is not None and start.resume.run_id == run.run_id:
            return start.resume.last_acked_seq
        if start.kind is StartKind.FROM_BEGINNING:
            return 0
        if start.kind is StartKind.AFTER_SEQ:
            return start.after_seq
        if start.kind is StartKind.NEW_ONLY:
            return run.last_seq
        return 0 if self.durable else run.last_seq

    def _track(self, run: RunInfo, stored: ConsumerRunState | None, present_at_open: bool) -> None:
        if stored is not None:
            cursor = _RunCursor(
                run_id=run.run_id,
                epoch=run.epoch,
                last_seq=run.last_seq,
                completed_seq=run.completed_seq,
                acked_through=stored.position.acked_through,
                start_after=0,
                next_seq=stored.position.acked_through + 1,
            )
            for record in stored.deliveries:
                if record.state is DeliveryState.PENDING:
                    cursor.earlier_pending[record.seq] = record
                else:
                    cursor.settled_above.add(record.seq)
            resume = self.spec.start.resume
            if (
                present_at_open
                and resume is not None
                and self.spec.start.kind is StartKind.RESUME
                and resume.run_id == run.run_id
            ):
                # The client says it processed everything through this seq.
                self._settle_through(cursor, resume.last_acked_seq)
        else:
            start_after = self._start_after(run, present_at_open)
            cursor = _RunCursor(
                run_id=run.run_id,
                epoch=run.epoch,
                last_seq=run.last_seq,
                completed_seq=run.completed_seq,
                acked_through=start_after,
                start_after=start_after,
                next_seq=start_after + 1,
            )
            if start_after > 0:
                self._position_writes.add(run.run_id)
        cursor.acked_through = advance_watermark(cursor.acked_through, cursor.settled_above)
        cursor.next_seq = max(cursor.next_seq, cursor.acked_through + 1)
        cursor.activity = self._clock.now()
        self._runs[run.run_id] = cursor
        if cursor.acked_through < run.trimmed_through:
            self._reset(cursor, run.trimmed_through)
        self._maybe_complete.add(run.run_id)

    def _reset(self, cursor: _RunCursor, trimmed_through: int) -> None:
        """What retention removed cannot be delivered: say so, and go on after it."""
        for flight in list(self._in_flight.values()):
            if flight.event.run_id == cursor.run_id and flight.event.seq <= trimmed_through:
                del self._in_flight[flight.event.event_id]
        for seq in [s for s in cursor.earlier_pending if s <= trimmed_through]:
            del cursor.earlier_pending[seq]
        cursor.acked_through = advance_watermark(
            max(cursor.acked_through, trimmed_through), cursor.settled_above
        )
        cursor.next_seq = max(cursor.next_seq, cursor.acked_through + 1)
        self._position_writes.add(cursor.run_id)
        self._maybe_complete.add(cursor.run_id)
        self._resets.append(StreamReset(cursor.run_id, cursor.epoch, trimmed_through))
        log.warning(
            "subscription reset past trimmed events",
            extra={"user_id": self.user_id, "run_id": cursor.run_id, "trimmed_through": trimmed_through},
        )

    def _settle_through(self, cursor: _RunCursor, through_seq: int) -> None:
        for seq in [s for s in cursor.earlier_pending if s <= through_seq]:
            record = cursor.earlier_pending.pop(seq)
            self._write_record(cursor, seq, record.event_id, record.attempts, DeliveryState.ACKNOWLEDGED)
        if through_seq > cursor.acked_through:
            cursor.acked_through = through_seq
            self._position_writes.add(cursor.run_id)

    # -- the delivery loop

    async def stream(self) -> AsyncGenerator[list[Output], None]:
        """Yields outputs as they become due; waits on publishes, acks and timers."""
        quiet_since = self._clock.now()
        while True:
            self._wake.clear()
            outputs = await self.step()
            now = self._clock.now()
            if outputs:
                quiet_since = now
                yield outputs
                continue
            heartbeat_at = quiet_since + self._settings.heartbeat_seconds
            if now >= heartbeat_at:
                quiet_since = now
                yield [self.heartbeat()]
                continue
            wake_at = min(heartbeat_at, self.next_due())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake_at - now)):
                    await self._wake.wait()

    def next_due(self) -> float:
        return min((flight.due for flight in self._in_flight.values()), default=math.inf)

    async def step(self) -> list[Output]:
        """Everything due now: ack answers, (re)deliveries, dead letters, completions."""
        async with self._lock:
            self._raise_if_ended()
            outputs: list[Output] = [*self._ack_reports]
            self._ack_reports.clear()
            now = self._clock.now()
            await self._refresh_dirty_runs()
            await self._reload_changed_runs()
            items: dict[str, list[DeliveryItem]] = defaultdict(list)
            self._expire(now, items)
            await self._fill(now, items)
            await self._flush()
            # A reset precedes what is delivered after it.
            outputs.extend(self._resets)
            self._resets.clear()
            outputs.extend(self._batches(items))
            outputs.extend(self._completions())
            return outputs

    def heartbeat(self) -> Heartbeat:
        recent = sorted(self._runs.values(), key=lambda cursor: cursor.activity, reverse=True)
        return Heartbeat(
            tuple(
                RunPosition(cursor.run_id, cursor.epoch, cursor.last_seq)
                for cursor in recent[:HEARTBEAT_MAX_POSITIONS]
            )
        )

    def _raise_if_ended(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise Aborted("the subscription is closed", reason="SUBSCRIPTION_CLOSED")

    async def _refresh_dirty_runs(self) -> None:
        if self._rescan:
            self._rescan = False
            self._dirty_runs.update(self._runs)
            if self.spec.run_id is None:
                self._dirty_runs.update(run.run_id for run in await self._log.runs_of_user(self.user_id))
        if not self._dirty_runs:
            return
        run_ids, self._dirty_runs = self._dirty_runs, set()
        for run in (await self._log.runs(run_ids)).values():
            if run.user_id != self.user_id:
                continue
            cursor = self._runs.get(run.run_id)
            if cursor is not None:
                cursor.last_seq = max(cursor.last_seq, run.last_seq)
                cursor.completed_seq = run.completed_seq
                cursor.activity = self._clock.now()
                self._maybe_complete.add(run.run_id)
            elif self.spec.run_id is None:
                stored = None
                if self._key is not None:
                    stored = (await self._log.load_consumer(self.user_id, self._key[1], [run.run_id])).get(
                        run.run_id
                    )
                self._track(run, stored, present_at_open=False)

    async def _reload_changed_runs(self) -> None:
        """Takes in what another process settled for this consumer (acks
        without a stream): it is neither redelivered nor waited for here."""
        if self._key is None or not self._changed_runs:
            self._changed_runs.clear()
            return
        run_ids = [run_id for run_id in self._changed_runs if run_id in self._runs]
        self._changed_runs.clear()
        if not run_ids:
            return
        stored = await self._log.load_consumer(self.user_id, self._key[1], run_ids)
        for run_id, state in stored.items():
            cursor = self._runs[run_id]
            through = state.position.acked_through
            settled = {r.seq for r in state.deliveries if r.state is not DeliveryState.PENDING}
            for flight in list(self._in_flight.values()):
                seq = flight.event.seq
                if flight.event.run_id == run_id and (seq <= through or seq in settled):
                    del self._in_flight[flight.event.event_id]
            for seq in [s for s in cursor.earlier_pending if s <= through or s in settled]:
                del cursor.earlier_pending[seq]
            cursor.settled_above |= settled
            cursor.acked_through = advance_watermark(max(cursor.acked_through, through), cursor.settled_above)
            cursor.next_seq = max(cursor.next_seq, cursor.acked_through + 1)
            self._maybe_complete.add(run_id)

    def _expire(self, now: float, items: dict[str, list[DeliveryItem]]) -> None:
        due = sorted(
            (flight for flight in self._in_flight.values() if flight.due <= now),
            key=lambda flight: (flight.event.run_id, flight.event.seq),
        )
        for flight in due:
            event = flight.event
            cursor = self._runs[event.run_id]
            if flight.attempt >= self._settings.max_delivery_attempts:
                del self._in_flight[event.event_id]
                self._dead_letter(cursor, event, flight.attempt, items)
                continue
            flight.attempt += 1
            flight.due = now + self.spec.ack_deadline
            items[event.run_id].append(Delivered(event, flight.attempt))
            self._metrics.delivered(self.spec.consumer, flight.attempt)
            self._write_record(cursor, event.seq, event.event_id, flight.attempt, DeliveryState.PENDING)

    async def _fill(self, now: float, items: dict[str, list[DeliveryItem]]) -> None:
        capacity = self.spec.max_in_flight - len(self._in_flight)
        for cursor in [c for c in self._runs.values() if c.has_backlog]:
            while capacity > 0 and cursor.has_backlog:
                # Only as far as this subscription knows the run (`last_seq`,
                # `completed_seq`): what was appended since comes with its
                # notification, and with it the news that the run ended.
                known = cursor.last_seq - cursor.next_seq + 1
                events = await self._log.read(
                    cursor.run_id, cursor.next_seq - 1, min(capacity, self._settings.batch_size, known)
                )
                if not events or events[0].seq > cursor.next_seq:
                    # Not there: trimmed since this subscription looked.
                    run = (await self._log.runs([cursor.run_id])).get(cursor.run_id)
                    if run is not None and run.trimmed_through >= cursor.next_seq:
                        self._reset(cursor, run.trimmed_through)
                        continue
                    if not events:
                        cursor.next_seq = cursor.last_seq + 1  # do not spin on a hole
                        break
                for event in events:
                    cursor.next_seq = event.seq + 1
                    if (
                        event.seq <= cursor.acked_through
                        or event.seq in cursor.settled_above
                        or event.event_id in self._in_flight
                    ):
                        continue
                    earlier = cursor.earlier_pending.pop(event.seq, None)
                    prior = earlier.attempts if earlier is not None else 0
                    if prior >= self._settings.max_delivery_attempts:
                        self._dead_letter(cursor, event, prior, items)
                        continue
                    flight = _InFlight(event, prior + 1, now + self.spec.ack_deadline)
                    self._in_flight[event.event_id] = flight
                    items[event.run_id].append(Delivered(event, flight.attempt))
                    self._metrics.delivered(self.spec.consumer, flight.attempt)
                    self._write_record(
                        cursor, event.seq, event.event_id, flight.attempt, DeliveryState.PENDING
                    )
                    if event.seq == cursor.completed_seq:
                        cursor.completion_delivered = True
                    cursor.activity = now
                    capacity -= 1
            if capacity <= 0:
                break

    def _dead_letter(
        self, cursor: _RunCursor, event: StoredEvent, attempts: int, items: dict[str, list[DeliveryItem]]
    ) -> None:
        log.warning(
            "event dead-lettered",
            extra={
                "user_id": self.user_id,
                "consumer": self.spec.consumer or "",
                "run_id": event.run_id,
                "event_id": event.event_id,
                "seq": event.seq,
                "attempts": attempts,
            },
        )
        items[event.run_id].append(DeadLettered(event, attempts))
        self._metrics.dead_lettered(self.spec.consumer)
        self._write_record(cursor, event.seq, event.event_id, attempts, DeliveryState.DEAD_LETTERED)
        if event.seq == cursor.completed_seq:
            cursor.completion_delivered = True
        self._settle(cursor, event.seq)

    def _batches(self, items: Mapping[str, list[DeliveryItem]]) -> list[DeliveryBatch]:
        batches = []
        size = self._settings.batch_size
        for run_id, run_items in items.items():
            ordered = sorted(run_items, key=lambda item: item.event.seq)
            for start in range(0, len(ordered), size):
                batches.append(DeliveryBatch(run_id, self.user_id, tuple(ordered[start : start + size])))
        return batches

    def _completions(self) -> list[RunStreamCompleted]:
        completions = []
        for run_id in self._maybe_complete:
            cursor = self._runs.get(run_id)
            if (
                cursor is not None
                and cursor.completed_seq is not None
                and not cursor.completion_announced
                and cursor.acked_through >= cursor.completed_seq
                # A single-run subscription always hears that its run ended; an
                # all-runs one only of runs whose end it delivered.
                and (self.spec.run_id is not None or cursor.completion_delivered)
            ):
                cursor.completion_announced = True
                completions.append(RunStreamCompleted(run_id, cursor.completed_seq))
        self._maybe_complete.clear()
        return completions

    # -- acknowledgements

    async def acknowledge_from_stream(
        self, event_ids: Sequence[str], cumulative: Sequence[CumulativeAck]
    ) -> AckReport:
        """An ack on the stream: applied now, answered on the stream (and
        returned, for the caller's tracing)."""
        async with self._lock:
            self._raise_if_ended()
            report = await self.acknowledge_locked(event_ids, cumulative)
            self._ack_reports.append(report)
        self._wake.set()
        return report

    async def nack_from_stream(self, event_ids: Sequence[str], delay: float) -> AckReport:
        async with self._lock:
            self._raise_if_ended()
            now = self._clock.now()
            results: list[AckResult | None] = []
            missing = []
            for event_id in event_ids:
                flight = self._in_flight.get(event_id)
                if flight is None:
                    results.append(None)
                    missing.append(event_id)
                    continue
                # A nack fails the attempt; at the last attempt it dead-letters at once.
                exhausted = flight.attempt >= self._settings.max_delivery_attempts
                flight.due = now if exhausted else now + delay
                results.append(AckResult(AckOutcome.ACCEPTED, event_id=event_id, events=(flight.event,)))
            answers = iter(await self._settled_results(missing, settle_earlier=False))
            report = AckReport(tuple(result or next(answers) for result in results))
            self._ack_reports.append(report)
        self._wake.set()
        return report

    async def acknowledge_locked(
        self, event_ids: Sequence[str], cumulative: Sequence[CumulativeAck]
    ) -> AckReport:
        """Applies acks; the caller holds the consumer's lock."""
        results: list[AckResult | None] = []
        missing: list[str] = []
        for event_id in event_ids:
            flight = self._in_flight.pop(event_id, None)
            if flight is None:
                results.append(None)
                missing.append(event_id)
                continue
            self._ack_flight(flight)
            results.append(AckResult(AckOutcome.ACCEPTED, event_id=event_id, events=(flight.event,)))
        await self._flush()
        answers = iter(await self._settled_results(missing, settle_earlier=True))
        by_id = [result or next(answers) for result in results]
        by_run = [await self._ack_cumulative(ack) for ack in cumulative]
        await self._flush()
        self._wake.set()
        return AckReport((*by_id, *by_run))

    def _ack_flight(self, flight: _InFlight) -> None:
        cursor = self._runs[flight.event.run_id]
        self._write_record(
            cursor, flight.event.seq, flight.event.event_id, flight.attempt, DeliveryState.ACKNOWLEDGED
        )
        self._settle(cursor, flight.event.seq)

    async def _ack_cumulative(self, ack: CumulativeAck) -> AckResult:
        cursor = self._runs.get(ack.run_id)
        if cursor is None:
            return AckResult(AckOutcome.UNKNOWN, cumulative=ack)
        matched = [
            flight
            for flight in self._in_flight.values()
            if flight.event.run_id == ack.run_id and flight.event.seq <= ack.through_seq
        ]
        settled = [flight.event for flight in matched]
        for flight in matched:
            del self._in_flight[flight.event.event_id]
            self._ack_flight(flight)
        earlier = [seq for seq in cursor.earlier_pending if seq <= ack.through_seq]
        if earlier:
            # Left unsettled by an earlier connection: known here by id only.
            found = await self._log.events_by_id([cursor.earlier_pending[seq].event_id for seq in earlier])
            settled.extend(found.values())
        for seq in earlier:
            record = cursor.earlier_pending.pop(seq)
            self._write_record(cursor, seq, record.event_id, record.attempts, DeliveryState.ACKNOWLEDGED)
            self._settle(cursor, seq)
        if matched or earlier:
            settled.sort(key=lambda event: event.seq)
            return AckResult(AckOutcome.ACCEPTED, cumulative=ack, events=tuple(settled))
        covered = min(ack.through_seq, cursor.next_seq - 1)
        if covered > cursor.start_after:
            return AckResult(
                AckOutcome.STALE, cumulative=ack, events=await _events_at(self._log, ack.run_id, covered)
            )
        return AckResult(AckOutcome.UNKNOWN, cumulative=ack)

    async def _settled_results(self, event_ids: Sequence[str], settle_earlier: bool) -> list[AckResult]:
        """For (n)acks of events not in flight here, in order: STALE if this
        subscription (or its consumer) already settled them, UNKNOWN if it never
        delivered them. A durable consumer's delivery from an earlier connection
        that is still unsettled is ACCEPTED (and settled when `settle_earlier`)."""
        if not event_ids:
            return []
        events = await self._log.events_by_id(event_ids)
        records: dict[str, DeliveryRecord] = {}
        if self._key is not None:
            records = {
                record.event_id: record
                for record in await self._log.consumer_deliveries(self.user_id, self._key[1], event_ids)
            }
        settled_now: set[str] = set()
        results: list[AckResult] = []
        for event_id in event_ids:
            event = events.get(event_id)
            mine = (event,) if event is not None and event.user_id == self.user_id else ()
            cursor = self._runs.get(event.run_id) if event is not None else None
            if event is None or cursor is None or event.user_id != self.user_id:
                outcome = AckOutcome.UNKNOWN
            elif event_id in settled_now:
                outcome = AckOutcome.STALE  # named twice: the first one settled it
            elif self._key is not None:
                record = records.get(event_id)
                if record is not None and record.state is not DeliveryState.PENDING:
                    outcome = AckOutcome.STALE
                elif record is not None and event.seq in cursor.earlier_pending:
                    if settle_earlier:
                        cursor.earlier_pending.pop(event.seq)
                        self._write_record(
                            cursor, event.seq, event_id, record.attempts, DeliveryState.ACKNOWLEDGED
                        )
                        self._settle(cursor, event.seq)
                        settled_now.add(event_id)
                    outcome = AckOutcome.ACCEPTED
                else:
                    outcome = AckOutcome.UNKNOWN
            elif cursor.start_after < event.seq and (
                event.seq <= cursor.acked_through or event.seq in cursor.settled_above
            ):
                outcome = AckOutcome.STALE
            else:
                outcome = AckOutcome.UNKNOWN
            results.append(AckResult(outcome, event_id=event_id, events=mine))
        return results

    # -- state changes and persistence

    def _settle(self, cursor: _RunCursor, seq: int) -> None:
        cursor.settled_above.add(seq)
        before = cursor.acked_through
        cursor.acked_through = advance_watermark(cursor.acked_through, cursor.settled_above)
        if cursor.acked_through != before:
            self._position_writes.add(cursor.run_id)
        self._maybe_complete.add(cursor.run_id)

    def _write_record(
        self, cursor: _RunCursor, seq: int, event_id: str, attempts: int, state: DeliveryState
    ) -> None:
        if self._key is None:
            return
        self._record_writes[(cursor.run_id, seq)] = DeliveryRecord(
            cursor.run_id, seq, event_id, attempts, state
        )
        self._position_writes.add(cursor.run_id)

    async def _flush(self) -> None:
        if self._key is None:
            self._record_writes.clear()
            self._position_writes.clear()
            return
        if not self._record_writes and not self._position_writes:
            return
        positions = [
            ConsumerPosition(run_id, self._runs[run_id].epoch, self._runs[run_id].acked_through)
            for run_id in sorted(self._position_writes)
            if run_id in self._runs
        ]
        records = list(self._record_writes.values())
        try:
            await self._log.save_consumer(
                self.user_id, self._key[1], positions, records, holder=self.subscription_id
            )
        except Aborted as error:
            # Claimed by a newer connection in another process: this one ends.
            self.fail(error)
            raise
        self._record_writes.clear()
        self._position_writes.clear()


# --- The service's operations ------------------------------------------------------


class EventsDomain:
    """Publishing, subscriptions, acknowledgements and history, for one process."""

    def __init__(
        self,
        log: EventLog,
        settings: DeliverySettings | None = None,
        clock: Clock | None = None,
        retention: RetentionSettings | None = None,
        metrics: EventsMetrics | None = None,
    ) -> None:
        self._log = log
        self._settings = settings or DeliverySettings()
        self._retention = retention or RetentionSettings()
        self._clock = clock or MonotonicClock()
        # Recorded nowhere unless the service hands in its own (made in `build`).
        self._metrics = metrics or EventsMetrics(NoOpMeterProvider())
        self._notifier = Notifier()
        self._consumers = ConsumerRegistry()
        log.add_listener(self)

    @property
    def settings(self) -> DeliverySettings:
        return self._settings

    # -- what other processes serving the same log did (LogListener)

    def runs_appended(self, user_id: str, run_ids: Collection[str]) -> None:
        self._notifier.notify(user_id, run_ids)

    def consumer_claimed(self, key: ConsumerKey, generation: int) -> None:
        live = self._consumers.active(key)
        if live is not None and live.claim_generation < generation:
            log.info("durable consumer taken over elsewhere", extra={"user_id": key[0], "consumer": key[1]})
            live.fail(consumer_taken_over(key[1]))

    def consumer_changed(self, key: ConsumerKey, run_ids: Collection[str]) -> None:
        live = self._consumers.active(key)
        if live is not None:
            live.on_consumer_changed(run_ids)

    def signals_lost(self) -> None:
        self._notifier.signals_lost()

    def end_subscriptions(self) -> None:
        """Shutdown: every open stream ends (UNAVAILABLE: reconnect, elsewhere or later)."""
        self._notifier.fail_all(
            Unavailable(
                "the events service is shutting down; reconnect", reason="SHUTTING_DOWN", retry_after=1.0
            )
        )

    async def publish(self, batch: Sequence[NewEvent], now: datetime) -> list[AppendResult]:
        """Stores the batch whole (or raises and stores nothing), then wakes the
        owners' subscriptions."""
        plan = await self._log.append(batch, now)
        touched: dict[str, set[str]] = defaultdict(set)
        for event in plan.events:
            touched[event.user_id].add(event.run_id)
        for user_id, run_ids in touched.items():
            self._notifier.notify(user_id, run_ids)
        return plan.results

    async def subscribe(self, user_id: str, spec: SubscriptionSpec) -> Subscription:
        subscription = Subscription(
            self._log,
            self._notifier,
            self._consumers,
            user_id,
            spec,
            self._settings,
            self._clock,
            self._metrics,
        )
        await subscription.open()
        self._metrics.track(spec.consumer, subscription)
        return subscription

    async def acknowledge(
        self,
        user_id: str,
        consumer: str,
        event_ids: Sequence[str],
        cumulative: Sequence[CumulativeAck],
    ) -> AckReport:
        """Acks for a durable consumer of the caller's, with or without a live stream."""
        key = (user_id, consumer)
        async with self._consumers.lock(key):
            live = self._consumers.active(key)
            if live is not None and not live.ended:
                try:
                    return await live.acknowledge_locked(event_ids, cumulative)
                except Aborted as error:
                    if error.reason != CONSUMER_TAKEN_OVER:
                        raise
                    # Its stream moved to another process: ack as if none were open here.
            return await self._acknowledge_offline(user_id, consumer, event_ids, cumulative)

    async def _acknowledge_offline(
        self,
        user_id: str,
        consumer: str,
        event_ids: Sequence[str],
        cumulative: Sequence[CumulativeAck],
    ) -> AckReport:
        records = {r.event_id: r for r in await self._log.consumer_deliveries(user_id, consumer, event_ids)}
        run_ids = {r.run_id for r in records.values()} | {ack.run_id for ack in cumulative}
        states = await self._log.load_consumer(user_id, consumer, run_ids) if run_ids else {}
        # Deliveries above each position, as they stand after this request.
        current: dict[str, dict[int, DeliveryRecord]] = {
            run_id: {r.seq: r for r in state.deliveries} for run_id, state in states.items()
        }
        changed: dict[tuple[str, int], DeliveryRecord] = {}

        def settle(record: DeliveryRecord) -> None:
            acked = DeliveryRecord(
                record.run_id, record.seq, record.event_id, record.attempts, DeliveryState.ACKNOWLEDGED
            )
            current.setdefault(record.run_id, {})[record.seq] = changed[(record.run_id, record.seq)] = acked

        results: list[AckResult] = []
        # For tracing: the ids of each result's events, and (by result index)
        # the run and seq through which a stale cumulative ack reaches.
        about: list[list[str]] = []
        stale_at: dict[int, tuple[str, int]] = {}
        for event_id in event_ids:
            found = records.get(event_id)
            record = current.get(found.run_id, {}).get(found.seq, found) if found is not None else None
            if record is None:
                outcome = AckOutcome.UNKNOWN
            elif record.state is not DeliveryState.PENDING:
                outcome = AckOutcome.STALE
            else:
                settle(record)
                outcome = AckOutcome.ACCEPTED
            results.append(AckResult(outcome, event_id=event_id))
            about.append([event_id])
        for ack in cumulative:
            state = states.get(ack.run_id)
            if state is None:
                results.append(AckResult(AckOutcome.UNKNOWN, cumulative=ack))
                about.append([])
                continue
            above = current[ack.run_id]
            pending = sorted(
                (r for r in above.values() if r.state is DeliveryState.PENDING and r.seq <= ack.through_seq),
                key=lambda r: r.seq,
            )
            for record in pending:
                settle(record)
            delivered_through = max([state.position.acked_through, *above])
            covered = min(ack.through_seq, delivered_through)
            if pending:
                outcome = AckOutcome.ACCEPTED
            elif covered > 0:
                outcome = AckOutcome.STALE
                stale_at[len(results)] = (ack.run_id, covered)
            else:
                outcome = AckOutcome.UNKNOWN
            results.append(AckResult(outcome, cumulative=ack))
            about.append([r.event_id for r in pending])
        if changed:
            positions = []
            for run_id in {run_id for run_id, _ in changed} & states.keys():
                position = states[run_id].position
                settled = {seq for seq, r in current[run_id].items() if r.state is not DeliveryState.PENDING}
                through = advance_watermark(position.acked_through, settled)
                positions.append(ConsumerPosition(run_id, position.epoch, through))
            await self._log.save_consumer(user_id, consumer, positions, list(changed.values()))
        return AckReport(await self._with_events(user_id, results, about, stale_at))

    async def _with_events(
        self,
        user_id: str,
        results: Sequence[AckResult],
        about: Sequence[Sequence[str]],
        stale_at: Mapping[int, tuple[str, int]],
    ) -> tuple[AckResult, ...]:
        """The results with the caller's events they are about (see `AckResult.events`)."""
        wanted = {event_id for ids in about for event_id in ids}
        found = await self._log.events_by_id(wanted) if wanted else {}
        mine = {event_id: event for event_id, event in found.items() if event.user_id == user_id}
        answered = []
        for index, (result, ids) in enumerate(zip(results, about, strict=True)):
            events = tuple(mine[event_id] for event_id in ids if event_id in mine)
            if index in stale_at:
                reached = await _events_at(self._log, *stale_at[index])
                events = tuple(event for event in reached if event.user_id == user_id)
            answered.append(dataclasses.replace(result, events=events))
        return tuple(answered)

    async def trim(self, now: datetime) -> dict[str, int]:
        """One retention pass (both rules off: nothing to do)."""
        max_age, settled_age = self._retention.max_age, self._retention.settled_age
        if max_age is None and settled_age is None:
            return {}
        trimmed = await self._log.trim(
            now - timedelta(seconds=max_age) if max_age is not None else None,
            now - timedelta(seconds=settled_age) if settled_age is not None else None,
        )
        if trimmed:
            log.info("retention trimmed runs", extra={"runs": len(trimmed)})
        return trimmed

    async def visible_run(self, user_id: str, run_id: str) -> RunInfo:
        """The run, if it is the caller's: events are their owner's alone."""
        run = (await self._log.runs([run_id])).get(run_id)
        if run is None or run.user_id != user_id:
            raise run_not_found(run_id)
        return run

    async def list_events(
        self, user_id: str, run_id: str, after_seq: int, limit: int
    ) -> tuple[list[StoredEvent], bool]:
        """A page of the run's history and whether more follows."""
        run = await self.visible_run(user_id, run_id)
        if after_seq < run.trimmed_through:
            raise events_trimmed(run, after_seq)
        events = await self._log.read(run_id, after_seq, limit + 1)
        return events[:limit], len(events) > limit

    async def delivery_status(self, user_id: str, run_id: str) -> tuple[RunInfo, list[ConsumerStatus]]:
        run = await self.visible_run(user_id, run_id)
        return run, await self._log.delivery_status(user_id, run_id)
