"""The event log on Redis Streams (`SWITCHBOARD_EVENTS_BACKEND=redis`), which
several events processes (replicas) can share. Works on Redis 7.0.

Keys, all under the configured prefix P (a user id is escaped where another
part follows it; consumer names cannot hold a colon):

    P event-ids                       hash: event id -> "run id\\nseq\\ncontent hash"
    P runs                            sorted set of every run id by creation (µs), for retention
    P run:<run>                       hash: user_id, epoch, last_seq, completed_seq, create_us,
                                      trimmed_through
    P stream:<run>                    stream, one entry per event, id "<seq>-0";
                                      fields: epoch, hash, event (JSON)
    P user-runs:<user>                sorted set of the user's run ids by creation (µs)
    P claim:<user>:<consumer>         hash: holder (subscription id), gen (claim count)
    P positions:<user>:<consumer>     hash: run id -> "<epoch>:<acked through>"
    P deliveries:<user>:<consumer>:<run>  hash: seq -> "<attempts>:<state>:<event id>"
    P run-consumers:<user>:<run>      set of the consumer names with a position on the run
    P all-runs-consumers:<user>       set of the user's consumers that follow all their runs
    P signals                         pub/sub channel between replicas (JSON messages)

Appends are one Lua script (atomic): dedupe by event id with the content
check, owner check, seq check against the run's last seq, then the writes
(stream entries, the id index, the run, the user's run index) and a signal to
the replicas. A refused batch writes nothing: every check runs before the first
write. Consumer writes are a script too: fenced by the consumer's claim, and
monotonic (a position never moves back, a settled delivery is never reopened),
so an ack written by one replica cannot be undone by another.

Ack deadlines are the live subscription's own (in memory, on the process that
holds the consumer's claim): a reconnect, to any replica, redelivers every
delivery left unsettled at once, attempts counted from the stored records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import SwitchboardError, Unavailable
from services.events.domain import (
    AppendPlan,
    AppendResult,
    ConsumerPosition,
    ConsumerRunState,
    ConsumerStatus,
    DeliveryRecord,
    DeliveryState,
    EventType,
    LogListener,
    NewEvent,
    RunInfo,
    StoredEvent,
    consumer_taken_over,
    epoch_of,
    event_id_conflict,
    retention_point,
    run_already_completed,
    run_owner_mismatch,
    sequence_gap,
    sequence_taken,
)

log = logging.getLogger("switchboard.events.redis")

DEFAULT_PREFIX = "switchboard:events:"
# Connections one process opens at most (the replica-signal listener holds one).
DEFAULT_MAX_CONNECTIONS = 100
# How long an operation waits for a free connection before it is UNAVAILABLE.
POOL_WAIT_SECONDS = 10.0
# Reconnect backoff of the signal listener.
LISTEN_RETRY_SECONDS = (0.1, 5.0)

# KEYS[1]: the event-id index, KEYS[2]: every run; per event i (from 0):
# KEYS[3+3i] its run, KEYS[4+3i] the run's stream, KEYS[5+3i] the owner's runs.
# ARGV: channel, origin, epoch of a new run, creation score (µs), then per
# event: event id, run id, user id, seq, completes the run (1/0), content hash,
# event JSON. Returns {"OK", results, runs} or {refusal, index, detail}.
APPEND_SCRIPT = r"""
local index_key, all_runs_key = KEYS[1], KEYS[2]
local channel, origin, new_epoch, created = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local count = (#ARGV - 4) / 7
local planned, runs, touched, results, appends = {}, {}, {}, {}, {}
for i = 0, count - 1 do
  local a = 4 + i * 7
  local event_id, run_id, user_id = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local seq_text, completes, hash, data = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local seq = tonumber(seq_text)
  local earlier = planned[event_id]
  if not earlier then
    local found = redis.call('HGET', index_key, event_id)
    if found then
      local r, s, h = string.match(found, '^(.*)\n(%d+)\n(%x+)$')
      earlier = {run_id = r, seq = s, hash = h}
    end
  end
  if earlier then
    if earlier.hash ~= hash then return {'EVENT_ID_CONFLICT', i} end
    results[#results + 1] = {1, earlier.run_id, earlier.seq}
  else
    local run = runs[run_id]
    if not run then
      local f = redis.call('HMGET', KEYS[3 + i * 3], 'user_id', 'epoch', 'last_seq', 'completed_seq')
      if f[1] then
        run = {run_id = run_id, user_id = f[1], epoch = f[2], last_seq = tonumber(f[3]),
               last_text = f[3], previous = f[3], completed = f[4], is_new = false}
        if run.completed == '' then run.completed = false end
        run.key, run.stream, run.user_key = KEYS[3 + i * 3], KEYS[4 + i * 3], KEYS[5 + i * 3]
        runs[run_id] = run
      end
    end
    local expected = 1
    if run then expected = run.last_seq + 1 end
    if run and run.user_id ~= user_id then return {'RUN_OWNER_MISMATCH', i} end
    if run and run.completed then return {'RUN_ALREADY_COMPLETED', i, run.completed} end
    if seq < expected then return {'SEQUENCE_TAKEN', i} end
    if seq > expected then return {'SEQUENCE_GAP', i, expected} end
    if not run then
      run = {run_id = run_id, user_id = user_id, epoch = new_epoch, last_seq = 0, last_text = '0',
             previous = '', completed = false, is_new = true,
             key = KEYS[3 + i * 3], stream = KEYS[4 + i * 3], user_key = KEYS[5 + i * 3]}
      runs[run_id] = run
    end
    if not run.listed then
      run.listed = true
      touched[#touched + 1] = run
    end
    run.last_seq, run.last_text = seq, seq_text
    if completes == '1' then run.completed = seq_text end
    planned[event_id] = {run_id = run_id, seq = seq_text, hash = hash}
    appends[#appends + 1] = {run = run, event_id = event_id, seq = seq_text, hash = hash, data = data}
    results[#results + 1] = {0, run_id, seq_text}
  end
end
for _, e in ipairs(appends) do
  redis.call('XADD', e.run.stream, e.seq .. '-0', 'epoch', e.run.epoch, 'hash', e.hash, 'event', e.data)
  redis.call('HSET', index_key, e.event_id, e.run.run_id .. '\n' .. e.seq .. '\n' .. e.hash)
end
local by_user, users, out_runs = {}, {}, {}
for _, run in ipairs(touched) do
  if run.is_new then
    redis.call('HSET', run.key, 'user_id', run.user_id, 'epoch', run.epoch, 'last_seq', run.last_text,
               'create_us', created)
    redis.call('ZADD', run.user_key, created, run.run_id)
    redis.call('ZADD', all_runs_key, created, run.run_id)
  else
    redis.call('HSET', run.key, 'last_seq', run.last_text)
  end
  if run.completed then redis.call('HSET', run.key, 'completed_seq', run.completed) end
  if not by_user[run.user_id] then
    by_user[run.user_id] = {}
    users[#users + 1] = run.user_id
  end
  table.insert(by_user[run.user_id], run.run_id)
  out_runs[#out_runs + 1] = {run.run_id, run.user_id, run.epoch, run.last_text, run.completed or '',
                             run.previous}
end
for _, user_id in ipairs(users) do
  redis.call('PUBLISH', channel, cjson.encode(
    {kind = 'appended', origin = origin, user = user_id, runs = by_user[user_id]}))
end
return {'OK', results, out_runs}
"""

# KEYS[1]: the consumer's claim. ARGV: holder, channel, origin, user id, consumer.
CLAIM_SCRIPT = r"""
local generation = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'holder', ARGV[1])
redis.call('PUBLISH', ARGV[2], cjson.encode(
  {kind = 'claimed', origin = ARGV[3], user = ARGV[4], consumer = ARGV[5], generation = generation}))
return generation
"""

# KEYS[1]: the consumer's claim, KEYS[2]: its positions, then a run-consumers
# set per position, then a deliveries hash per delivery.
# ARGV: holder ('' for none), channel, origin, user id, consumer, #positions,
# #deliveries, then per position: run id, epoch, acked through; per delivery:
# run id, seq, attempts, state, event id.
SAVE_CONSUMER_SCRIPT = r"""
local holder = ARGV[1]
if holder ~= '' and redis.call('HGET', KEYS[1], 'holder') ~= holder then
  return 'TAKEN_OVER'
end
local positions, deliveries = tonumber(ARGV[6]), tonumber(ARGV[7])
local a = 7
local changed, runs = {}, {}
local function touch(run_id)
  if not changed[run_id] then
    changed[run_id] = true
    runs[#runs + 1] = run_id
  end
end
for i = 1, positions do
  local run_id, epoch, through = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  a = a + 3
  local old = redis.call('HGET', KEYS[2], run_id)
  local write = true
  if old then
    local old_epoch, old_through = string.match(old, '^(%d+):(%d+)$')
    if old_epoch == epoch and tonumber(old_through) >= tonumber(through) then write = false end
  end
  if write then redis.call('HSET', KEYS[2], run_id, epoch .. ':' .. through) end
  redis.call('SADD', KEYS[2 + i], ARGV[5])
  touch(run_id)
end
for i = 1, deliveries do
  local key = KEYS[2 + positions + i]
  local run_id, seq, attempts, state, event_id = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  a = a + 5
  local old = redis.call('HGET', key, seq)
  local write = true
  if old then
    local old_attempts, old_state = string.match(old, '^(%d+):(%d+):')
    if old_state ~= '1' then
      write = false
    elseif state == '1' and tonumber(old_attempts) > tonumber(attempts) then
      write = false
    end
  end
  if write then redis.call('HSET', key, seq, attempts .. ':' .. state .. ':' .. event_id) end
  touch(run_id)
end
if holder == '' and #runs > 0 then
  redis.call('PUBLISH', ARGV[2], cjson.encode(
    {kind = 'changed', origin = ARGV[3], user = ARGV[4], consumer = ARGV[5], runs = runs}))
end
return 'OK'
"""


# KEYS: the run, its stream, the event-id index. ARGV: trimmed through, the
# stream's first id to keep, then the ids of the events trimmed.
TRIM_SCRIPT = r"""
local current = tonumber(redis.call('HGET', KEYS[1], 'trimmed_through') or '0')
if current >= tonumber(ARGV[1]) then return current end
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[2])
for i = 3, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
redis.call('HSET', KEYS[1], 'trimmed_through', ARGV[1])
return tonumber(ARGV[1])
"""
# Runs looked at, and stream entries read, per round trip of a retention pass.
TRIM_PAGE = 500


def _escape(part: str) -> str:
    """Keeps a key part that another part follows from containing the separator."""
    return part.replace("%", "%25").replace(":", "%3A")


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.event_ids = f"{prefix}event-ids"
        self.all_runs = f"{prefix}runs"
        self.signals = f"{prefix}signals"

    def run(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def stream(self, run_id: str) -> str:
        return f"{self.prefix}stream:{run_id}"

    def user_runs(self, user_id: str) -> str:
        return f"{self.prefix}user-runs:{user_id}"

    def claim(self, user_id: str, consumer: str) -> str:
        return f"{self.prefix}claim:{_escape(user_id)}:{consumer}"

    def positions(self, user_id: str, consumer: str) -> str:
        return f"{self.prefix}positions:{_escape(user_id)}:{consumer}"

    def deliveries(self, user_id: str, consumer: str, run_id: str) -> str:
        return f"{self.prefix}deliveries:{_escape(user_id)}:{consumer}:{run_id}"

    def run_consumers(self, user_id: str, run_id: str) -> str:
        return f"{self.prefix}run-consumers:{_escape(user_id)}:{run_id}"

    def all_runs_consumers(self, user_id: str) -> str:
        return f"{self.prefix}all-runs-consumers:{user_id}"


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _micros(value: datetime) -> int:
    moment = _utc(value)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def _event_json(event: NewEvent, create_time: datetime) -> str:
    return json.dumps(
        {
            "event_id": event.event_id,
            "run_id": event.run_id,
            "user_id": event.user_id,
            "seq": event.seq,
            "type": int(event.type),
            "step_id": event.step_id,
            "agent": event.agent,
            "payload": event.payload,
            "create_time": create_time.isoformat(),
            "traceparent": event.traceparent,
            "tracestate": event.tracestate,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def _stored_event(fields: dict[str, str]) -> StoredEvent:
    data = json.loads(fields["event"])
    return StoredEvent(
        event_id=data["event_id"],
        run_id=data["run_id"],
        user_id=data["user_id"],
        seq=int(data["seq"]),
        type=int(data["type"]),
        step_id=data["step_id"],
        agent=data["agent"],
        payload=data["payload"],
        create_time=datetime.fromisoformat(data["create_time"]),
        traceparent=data["traceparent"],
        tracestate=data["tracestate"],
        epoch=int(fields["epoch"]),
        content_hash=fields["hash"],
    )


RUN_FIELDS = ["user_id", "epoch", "last_seq", "completed_seq", "trimmed_through"]


def _run_info(run_id: str, fields: Sequence[str | None]) -> RunInfo | None:
    user_id, epoch, last_seq, completed_seq, trimmed_through = fields
    if user_id is None or epoch is None or last_seq is None:
        return None
    return RunInfo(
        run_id,
        user_id,
        int(epoch),
        int(last_seq),
        int(completed_seq) if completed_seq else None,
        int(trimmed_through or 0),
    )


def _record(run_id: str, seq: str, value: str) -> DeliveryRecord:
    attempts, state, event_id = value.split(":", 2)
    return DeliveryRecord(run_id, int(seq), event_id, int(attempts), DeliveryState(int(state)))


def _position(run_id: str, value: str) -> ConsumerPosition:
    epoch, through = value.split(":", 1)
    return ConsumerPosition(run_id, int(epoch), int(through))


def _refusal(reply: Sequence[Any], batch: Sequence[NewEvent]) -> SwitchboardError:
    """The domain's error for a refusal the append script reported."""
    code, index = str(reply[0]), int(reply[1])
    event = batch[index]
    if code == "EVENT_ID_CONFLICT":
        return event_id_conflict(event.event_id, index)
    if code == "RUN_OWNER_MISMATCH":
        return run_owner_mismatch(index)
    if code == "RUN_ALREADY_COMPLETED":
        return run_already_completed(event.run_id, int(reply[2]), index)
    if code == "SEQUENCE_TAKEN":
        return sequence_taken(event.run_id, event.seq, index)
    if code == "SEQUENCE_GAP":
        return sequence_gap(event.run_id, int(reply[2]), event.seq, index)
    raise RuntimeError(f"unexpected answer from the append script: {code}")


@contextlib.asynccontextmanager
async def _reachable() -> AsyncIterator[None]:
    """A Redis that cannot be reached is UNAVAILABLE (retry), not INTERNAL."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        log.warning("redis unreachable", extra={"error": type(exc).__name__})
        raise Unavailable(
            "the event log is unavailable; retry shortly", reason="EVENT_LOG_UNAVAILABLE", retry_after=1.0
        ) from None


class RedisEventLog:
    """`EventLog` on Redis Streams. `start()` begins hearing the replicas'
    signals (and `close()` stops it); everything else works without it."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        # Made with decode_responses=True: every reply is str, which redis-py's types cannot say.
        self._redis: Any = client
        self._keys = Keys(prefix)
        # Tells this process's signals from the replicas'.
        self.origin = uuid.uuid4().hex
        self._listeners: list[LogListener] = []
        self._listening = asyncio.Event()
        self._listener_task: asyncio.Task[None] | None = None
        self._append = client.register_script(APPEND_SCRIPT)
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._save_consumer = client.register_script(SAVE_CONSUMER_SCRIPT)
        self._trim = client.register_script(TRIM_SCRIPT)

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        client_name: str = "switchboard-events",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> RedisEventLog:
        # A blocking pool: past `max_connections` operations at once, the next
        # one waits for a connection (redis-py's default pool refuses it at
        # once, which a busy process would answer with UNAVAILABLE).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_keepalive=True,
            health_check_interval=15,
            client_name=client_name,
        )
        return cls(aioredis.Redis.from_pool(pool), prefix)

    @property
    def keys(self) -> Keys:
        return self._keys

    # -- lifecycle and signals

    def add_listener(self, listener: LogListener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        if self._listener_task is None:
            self._listener_task = asyncio.create_task(self._listen(), name="events-redis-signals")
        await self._warn_if_not_durable()

    async def _warn_if_not_durable(self) -> None:
        """The log is only as durable as Redis: say so when Redis keeps nothing on disk."""
        try:
            appendonly = (await self._redis.config_get("appendonly")).get("appendonly")
            save = (await self._redis.config_get("save")).get("save")
        except (RedisError, OSError):
            return  # CONFIG may be disabled (managed Redis): nothing to tell
        if appendonly != "yes" and not save:
            log.warning(
                "redis persists nothing (no AOF, no snapshots): a restart of Redis loses the event log"
            )

    async def close(self) -> None:
        if self._listener_task is not None:
            self._listener_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener_task
            self._listener_task = None
        await self._redis.aclose()

    async def listening(self) -> None:
        """Returns once the replicas' signals are heard (after `start()`)."""
        await self._listening.wait()

    async def ready(self) -> bool:
        """Redis answers, and (once started) the replicas' signals are heard."""
        try:
            await self._redis.ping()
        except (RedisError, OSError):
            return False
        return self._listener_task is None or self._listening.is_set()

    async def _listen(self) -> None:
        delay, longest = LISTEN_RETRY_SECONDS
        first = True
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.signals)
                self._listening.set()
                if not first:
                    # Whatever was signalled while disconnected went unheard.
                    for listener in self._listeners:
                        listener.signals_lost()
                first = False
                delay = LISTEN_RETRY_SECONDS[0]
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._dispatch(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("replica signals interrupted", extra={"error": type(exc).__name__})
            finally:
                self._listening.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    def _dispatch(self, data: str) -> None:
        try:
            signal = json.loads(data)
            if signal.get("origin") == self.origin:
                return  # this process acted on it already
            kind, user_id = signal["kind"], signal["user"]
            for listener in self._listeners:
                if kind == "appended":
                    listener.runs_appended(user_id, signal["runs"])
                elif kind == "claimed":
                    listener.consumer_claimed((user_id, signal["consumer"]), int(signal["generation"]))
                elif kind == "changed":
                    listener.consumer_changed((user_id, signal["consumer"]), signal["runs"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable replica signal ignored")

    # -- the log

    async def append(self, batch: Sequence[NewEvent], now: datetime) -> AppendPlan:
        if not batch:
            return AppendPlan(results=[], runs={}, previous_last_seq={}, events=[])
        keys = [self._keys.event_ids, self._keys.all_runs]
        args: list[str] = [self._keys.signals, self.origin, str(epoch_of(now)), str(_micros(now))]
        create_times = []
        for event in batch:
            create_time = _utc(event.create_time or now)
            create_times.append(create_time)
            keys += [
                self._keys.run(event.run_id),
                self._keys.stream(event.run_id),
                self._keys.user_runs(event.user_id),
            ]
            args += [
                event.event_id,
                event.run_id,
                event.user_id,
                str(event.seq),
                "1" if event.type == EventType.RUN_COMPLETED else "0",
                event.content_hash(),
                _event_json(event, create_time),
            ]
        async with _reachable():
            reply = await self._append(keys=keys, args=args)
        if reply[0] != "OK":
            raise _refusal(reply, batch)
        outcomes, touched = reply[1], reply[2]
        plan = AppendPlan(results=[], runs={}, previous_last_seq={}, events=[])
        for run_id, user_id, epoch, last_seq, completed_seq, previous in touched:
            plan.runs[run_id] = RunInfo(
                run_id, user_id, int(epoch), int(last_seq), int(completed_seq) if completed_seq else None
            )
            plan.previous_last_seq[run_id] = int(previous) if previous else None
        for event, create_time, (duplicate, run_id, seq) in zip(batch, create_times, outcomes, strict=True):
            if duplicate:
                plan.results.append(AppendResult(event.event_id, run_id, int(seq), duplicate=True))
                continue
            plan.results.append(AppendResult(event.event_id, event.run_id, event.seq, duplicate=False))
            plan.events.append(
                StoredEvent(
                    event_id=event.event_id,
                    run_id=event.run_id,
                    user_id=event.user_id,
                    seq=event.seq,
                    type=int(event.type),
                    step_id=event.step_id,
                    agent=event.agent,
                    payload=event.payload,
                    create_time=create_time,
                    traceparent=event.traceparent,
                    tracestate=event.tracestate,
                    epoch=plan.runs[event.run_id].epoch,
                    content_hash=event.content_hash(),
                )
            )
        return plan

    async def runs(self, run_ids: Collection[str]) -> dict[str, RunInfo]:
        ordered = list(dict.fromkeys(run_ids))
        if not ordered:
            return {}
        async with _reachable(), self._redis.pipeline(transaction=False) as pipe:
            for run_id in ordered:
                pipe.hmget(self._keys.run(run_id), RUN_FIELDS)
            replies = await pipe.execute()
        found = {}
        for run_id, fields in zip(ordered, replies, strict=True):
            run = _run_info(run_id, fields)
            if run is not None:
                found[run_id] = run
        return found

    async def runs_of_user(self, user_id: str) -> list[RunInfo]:
        # Ties in creation time are ordered by run id, as the SQL log does.
        async with _reachable():
            run_ids = await self._redis.zrange(self._keys.user_runs(user_id), 0, -1)
        found = await self.runs(run_ids)
        return [found[run_id] for run_id in run_ids if run_id in found and found[run_id].user_id == user_id]

    async def read(self, run_id: str, after_seq: int, limit: int) -> list[StoredEvent]:
        if limit <= 0:
            return []
        async with _reachable():
            entries = await self._redis.xrange(
                self._keys.stream(run_id), f"{after_seq + 1}-0", "+", count=limit
            )
        return [_stored_event(fields) for _entry_id, fields in entries]

    async def _locate(self, event_ids: list[str]) -> list[tuple[str, str, str]]:
        """(event id, run id, seq) of each stored event among `event_ids`."""
        located = await self._redis.hmget(self._keys.event_ids, event_ids)
        places = []
        for event_id, value in zip(event_ids, located, strict=True):
            if value is not None:
                run_id, seq, _hash = value.rsplit("\n", 2)
                places.append((event_id, run_id, seq))
        return places

    async def events_by_id(self, event_ids: Collection[str]) -> dict[str, StoredEvent]:
        ordered = list(dict.fromkeys(event_ids))
        if not ordered:
            return {}
        async with _reachable():
            places = await self._locate(ordered)
            if not places:
                return {}
            async with self._redis.pipeline(transaction=False) as pipe:
                for _event_id, run_id, seq in places:
                    pipe.xrange(self._keys.stream(run_id), f"{seq}-0", f"{seq}-0")
                replies = await pipe.execute()
        found = {}
        for (event_id, _run_id, _seq), entries in zip(places, replies, strict=True):
            for _entry_id, fields in entries:
                event = _stored_event(fields)
                if event.event_id == event_id:
                    found[event_id] = event
        return found

    # -- consumers

    async def claim_consumer(self, user_id: str, consumer: str, holder: str) -> int:
        async with _reachable():
            generation = await self._claim(
                keys=[self._keys.claim(user_id, consumer)],
                args=[holder, self._keys.signals, self.origin, user_id, consumer],
            )
        return int(generation)

    async def load_consumer(
        self, user_id: str, consumer: str, run_ids: Collection[str] | None
    ) -> dict[str, ConsumerRunState]:
        key = self._keys.positions(user_id, consumer)
        async with _reachable():
            if run_ids is None:
                stored: dict[str, str] = await self._redis.hgetall(key)
            else:
                ordered = list(dict.fromkeys(run_ids))
                values = await self._redis.hmget(key, ordered) if ordered else []
                stored = {run_id: value for run_id, value in zip(ordered, values, strict=True) if value}
            positions = [_position(run_id, value) for run_id, value in stored.items()]
            if not positions:
                return {}
            async with self._redis.pipeline(transaction=False) as pipe:
                for position in positions:
                    pipe.hgetall(self._keys.deliveries(user_id, consumer, position.run_id))
                replies = await pipe.execute()
        states = {}
        for position, records in zip(positions, replies, strict=True):
            above = sorted(
                (
                    _record(position.run_id, seq, value)
                    for seq, value in records.items()
                    if int(seq) > position.acked_through
                ),
                key=lambda record: record.seq,
            )
            states[position.run_id] = ConsumerRunState(position, tuple(above))
        return states

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
        keys = [self._keys.claim(user_id, consumer), self._keys.positions(user_id, consumer)]
        keys += [self._keys.run_consumers(user_id, p.run_id) for p in positions]
        keys += [self._keys.deliveries(user_id, consumer, d.run_id) for d in deliveries]
        args = [
            holder or "",
            self._keys.signals,
            self.origin,
            user_id,
            consumer,
            str(len(positions)),
            str(len(deliveries)),
        ]
        for p in positions:
            args += [p.run_id, str(p.epoch), str(p.acked_through)]
        for d in deliveries:
            args += [d.run_id, str(d.seq), str(d.attempts), str(int(d.state)), d.event_id]
        async with _reachable():
            answer = await self._save_consumer(keys=keys, args=args)
        if answer == "TAKEN_OVER":
            raise consumer_taken_over(consumer)

    async def consumer_deliveries(
        self, user_id: str, consumer: str, event_ids: Collection[str]
    ) -> list[DeliveryRecord]:
        ordered = list(dict.fromkeys(event_ids))
        if not ordered:
            return []
        async with _reachable():
            places = await self._locate(ordered)
            if not places:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for _event_id, run_id, seq in places:
                    pipe.hget(self._keys.deliveries(user_id, consumer, run_id), seq)
                replies = await pipe.execute()
        found = []
        for (event_id, run_id, seq), value in zip(places, replies, strict=True):
            if value is not None:
                record = _record(run_id, seq, value)
                if record.event_id == event_id:
                    found.append(record)
        return found

    async def follow_all_runs(self, user_id: str, consumer: str) -> None:
        async with _reachable():
            await self._redis.sadd(self._keys.all_runs_consumers(user_id), consumer)

    async def delivery_status(self, user_id: str, run_id: str) -> list[ConsumerStatus]:
        async with _reachable():
            consumers = sorted(await self._redis.smembers(self._keys.run_consumers(user_id, run_id)))
            if not consumers:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for consumer in consumers:
                    pipe.hget(self._keys.positions(user_id, consumer), run_id)
                    pipe.hvals(self._keys.deliveries(user_id, consumer, run_id))
                replies = await pipe.execute()
        statuses = []
        for index, consumer in enumerate(consumers):
            position, values = replies[2 * index], replies[2 * index + 1]
            if position is None:
                continue
            states = [int(value.split(":", 2)[1]) for value in values]
            statuses.append(
                ConsumerStatus(
                    consumer=consumer,
                    delivered=len(states),
                    acknowledged=states.count(DeliveryState.ACKNOWLEDGED),
                    pending=states.count(DeliveryState.PENDING),
                    dead_lettered=states.count(DeliveryState.DEAD_LETTERED),
                    last_acked_seq=_position(run_id, position).acked_through,
                )
            )
        return statuses

    # -- retention

    async def trim(self, max_age_cutoff: datetime | None, settled_cutoff: datetime | None) -> dict[str, int]:
        cutoffs = [c for c in (max_age_cutoff, settled_cutoff) if c is not None]
        if not cutoffs:
            return {}
        latest = max(cutoffs)
        trimmed: dict[str, int] = {}
        async with _reachable():
            run_ids: list[str] = await self._redis.zrange(self._keys.all_runs, 0, -1)
            for start in range(0, len(run_ids), TRIM_PAGE):
                found = await self.runs(run_ids[start : start + TRIM_PAGE])
                for run in found.values():
                    if run.trimmed_through >= run.last_seq:
                        continue
                    through = await self._trim_run(run, max_age_cutoff, settled_cutoff, latest)
                    if through is not None:
                        trimmed[run.run_id] = through
        return trimmed

    async def _trim_run(
        self, run: RunInfo, max_age_cutoff: datetime | None, settled_cutoff: datetime | None, latest: datetime
    ) -> int | None:
        # The run's oldest events, up to the first one younger than every cutoff.
        old: list[StoredEvent] = []
        after = run.trimmed_through
        while True:
            page = await self.read(run.run_id, after, TRIM_PAGE)
            young = next((i for i, event in enumerate(page) if event.create_time >= latest), None)
            old += page if young is None else page[:young]
            if young is not None or len(page) < TRIM_PAGE:
                break
            after = page[-1].seq

        def older_through(cutoff: datetime | None) -> int | None:
            """The last seq of the run's prefix created before `cutoff`."""
            if cutoff is None:
                return None
            first_young = next((event.seq for event in old if event.create_time >= cutoff), None)
            # None: all of `old` is older, and what follows it (if anything) is not.
            return first_young - 1 if first_young is not None else run.trimmed_through + len(old)

        consumers = await self._redis.smembers(self._keys.run_consumers(run.user_id, run.run_id))
        following = await self._redis.smembers(self._keys.all_runs_consumers(run.user_id))
        settled_through = None
        if consumers:
            async with self._redis.pipeline(transaction=False) as pipe:
                for consumer in consumers:
                    pipe.hget(self._keys.positions(run.user_id, consumer), run.run_id)
                positions = [p for p in await pipe.execute() if p is not None]
            if positions:
                settled_through = min(_position(run.run_id, value).acked_through for value in positions)
        if following - set(consumers):
            settled_through = 0  # a consumer of all the user's runs has not read this one yet
        through = retention_point(
            run, older_through(max_age_cutoff), older_through(settled_cutoff), settled_through
        )
        if through <= run.trimmed_through:
            return None
        event_ids = [event.event_id for event in old if event.seq <= through]
        await self._trim(
            keys=[self._keys.run(run.run_id), self._keys.stream(run.run_id), self._keys.event_ids],
            args=[str(through), f"{through + 1}-0", *event_ids],
        )
        return through
