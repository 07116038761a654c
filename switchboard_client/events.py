"""Follow your runs' events, each handed to you once, acknowledged after you
handled it, across disconnects and restarts of the events service.

    from switchboard_client.events import EventSubscriber

    async with EventSubscriber("127.0.0.1:50054", token=fresh_token, consumer="my-app") as events:
        async for event in events:
            await handle(event)

`EventSubscriber` opens a durable consumer (`consumer`, yours alone) on one
run (`run_id=...`) or on all your runs, present and future. Each event is
acknowledged when your loop body has finished with it, that is when the loop
asks for the next one (or use `await events.process(handler)`: acknowledged
when `handler` returns). If the stream breaks (the service restarts, a
replica goes away, the network drops), it reconnects with exponential backoff
and jitter, and the durable consumer resumes where it left off: nothing
acknowledged comes again, nothing unacknowledged is skipped. What the service
delivers again (an event handled but whose ack was lost with the connection)
is recognised by run and seq, acknowledged again and not handed to you twice.

Within one subscriber, every event is handed over once and, per run, in seq
order. Leaving the loop (`break`, an exception) leaves the current event
unacknowledged: the service sends it again to the next subscriber of the
consumer, which is what you want if handling failed. Across restarts of your
own process, keep the last seq you handled per run and skip anything at or
below it.

`token` is a string or a function (sync or async) returning a fresh access
token; it is called on every (re)connect, and an expired token is replaced by
reconnecting (only when `token` is a function). Errors that retrying cannot
fix (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, OUT_OF_RANGE, ...) are
raised as `grpc.aio.AioRpcError`; `ConsumerTakenOver` is raised when another
connection opened the same consumer (the newer one wins: two subscribers of
one consumer would otherwise take it from each other forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from switchboard.events.v1 import event_pb2, events_service_pb2, events_service_pb2_grpc

log = logging.getLogger("switchboard_client.events")

TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]

# Worth another try: the service or the network, not the request.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
TAKEN_OVER_REASON = "CONSUMER_TAKEN_OVER"
# On close, how long acks already sent may take to be answered.
CLOSE_FLUSH_SECONDS = 2.0
# A restarted service is found again quickly rather than after gRPC's default
# reconnect backoff (up to two minutes).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 20_000),
)


class ConsumerTakenOver(Exception):
    """Another connection opened the same durable consumer."""


@dataclass(frozen=True)
class Reconnect:
    """Backoff between attempts to (re)open the stream."""

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    # Each wait is drawn from [delay * (1 - jitter), delay].
    jitter: float = 0.5

    def delays(self) -> AsyncIterator[None]:
        async def waits() -> AsyncIterator[None]:
            delay = self.initial_backoff
            while True:
                await asyncio.sleep(delay * (1 - self.jitter * random.random()))
                delay = min(delay * self.multiplier, self.max_backoff)
                yield None

        return waits()


@dataclass
class _RunProgress:
    """Seqs handed over and handled: all through `through`, and these above it."""

    through: int = 0
    above: set[int] = field(default_factory=set)

    def done(self, seq: int) -> bool:
        return seq <= self.through or seq in self.above

    def add(self, seq: int) -> None:
        self.above.add(seq)
        while self.through + 1 in self.above:
            self.through += 1
            self.above.discard(self.through)


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


class EventSubscriber:
    """An async iterator over the events of a durable consumer; see the module."""

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        token: TokenSource,
        consumer: str,
        *,
        run_id: str | None = None,
        until_complete: bool = False,
        max_in_flight: int = 100,
        ack_deadline: float = 30.0,
        reconnect: Reconnect | None = None,
        idle_timeout: float | None = 60.0,
        on_dead_letter: Callable[[events_service_pb2.DeadLetter], None] | None = None,
    ) -> None:
        """`until_complete` (with `run_id`): stop once the run's stream is
        complete. `idle_timeout`: reconnect when nothing (not even a heartbeat)
        arrives for this long. `on_dead_letter`: told of events the service
        gave up delivering to this consumer (they are never handed over)."""
        if until_complete and run_id is None:
            raise ValueError("until_complete needs a run_id")
        if isinstance(target, str):
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            self._own_channel = True
        else:
            self._channel, self._own_channel = target, False
        self._stub: Any = events_service_pb2_grpc.EventsServiceStub(self._channel)
        self._token = token
        self._opening = events_service_pb2.SubscriptionOpen(consumer=consumer, max_in_flight=max_in_flight)
        if run_id is None:
            self._opening.all_runs = True
        else:
            self._opening.run_id = run_id
        self._opening.ack_deadline.FromNanoseconds(int(ack_deadline * 1e9))
        self._run_id = run_id
        self._until_complete = until_complete
        self._reconnect = reconnect or Reconnect()
        self._idle_timeout = idle_timeout
        self._on_dead_letter = on_dead_letter
        self._call: Any = None
        self._requests: asyncio.Queue[events_service_pb2.SubscribeRequest | None] | None = None
        # Ack messages sent on the current stream and not answered yet.
        self._unanswered_acks = 0
        self._buffer: deque[event_pb2.Event] = deque()
        self._handed: event_pb2.Event | None = None
        self._progress: dict[str, _RunProgress] = {}
        self._finished = False
        self._closed = False
        # Times the stream was opened again after it broke.
        self.reconnects = 0
        # Events the service sent again after they were handled (their ack was lost).
        self.duplicates_skipped = 0
        self._opened_before = False

    # -- iteration

    def __aiter__(self) -> EventSubscriber:
        return self

    async def __anext__(self) -> event_pb2.Event:
        if self._handed is not None:
            # The caller came back for more: it is done with the last one.
            self._handled(self._handed)
            self._handed = None
        while not self._closed:
            while self._buffer:
                event = self._buffer.popleft()
                if self._progress.setdefault(event.run_id, _RunProgress()).done(event.seq):
                    self._acknowledge(event.event_id)  # sent again: its ack was lost
                    self.duplicates_skipped += 1
                    continue
                self._handed = event
                return event
            if self._finished:
                break
            await self._receive()
        raise StopAsyncIteration

    async def process(self, handler: Callable[[event_pb2.Event], Awaitable[None]]) -> None:
        """Hands every event to `handler`; each is acknowledged when `handler` returns."""
        async for event in self:
            await handler(event)

    async def __aenter__(self) -> EventSubscriber:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Ends the stream once the acks sent are answered (for a short while at
        most); the event being handled (if any) stays unacknowledged."""
        self._closed = True
        await self._flush_acks()
        self._drop_call()
        if self._own_channel:
            await self._channel.close(grace=None)

    # -- the stream

    def _handled(self, event: event_pb2.Event) -> None:
        self._progress.setdefault(event.run_id, _RunProgress()).add(event.seq)
        self._acknowledge(event.event_id)

    def _acknowledge(self, event_id: str) -> None:
        # Lost if the stream breaks now: the service sends the event again and
        # it is acknowledged then, without being handed over twice.
        if self._requests is not None:
            self._requests.put_nowait(
                events_service_pb2.SubscribeRequest(ack=events_service_pb2.AckRequest(event_ids=[event_id]))
            )
            self._unanswered_acks += 1

    async def _flush_acks(self) -> None:
        """Reads on until every ack sent is answered, so that closing does not lose them."""
        if self._call is None or self._unanswered_acks <= 0:
            return
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            async with asyncio.timeout(CLOSE_FLUSH_SECONDS):
                while self._unanswered_acks > 0:
                    response = await self._call.read()
                    if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                        return
                    if response.WhichOneof("response") == "ack_results":
                        self._unanswered_acks -= 1

    async def _receive(self) -> None:
        """Reads one response into the buffer, (re)opening the stream as needed."""
        if self._call is None:
            await self._open()
        try:
            async with asyncio.timeout(self._idle_timeout):
                response = await self._call.read()
        except TimeoutError:
            log.warning("event stream idle for too long: reconnecting")
            self._drop_call()
            return
        except grpc.aio.AioRpcError as error:
            self._drop_call()
            self._raise_unless_retryable(error)
            log.info("event stream broke: reconnecting", extra={"code": error.code().name})
            return
        if response is grpc.aio.EOF:  # type: ignore[attr-defined]
            self._drop_call()
            return
        kind = response.WhichOneof("response")
        if kind == "ack_results":
            self._unanswered_acks -= 1
        elif kind == "events":
            for delivery in response.events.deliveries:
                if delivery.WhichOneof("item") == "event":
                    self._buffer.append(delivery.event)
                else:
                    self._dead_letter(delivery.dead_letter)
        elif kind == "run_completed":
            # Everything of the run is settled: nothing of it can come again.
            self._progress.pop(response.run_completed.run_id, None)
            if self._until_complete and response.run_completed.run_id == self._run_id:
                self._finished = True

    def _dead_letter(self, dead: events_service_pb2.DeadLetter) -> None:
        # Settled by the service: it will not come again, and needs no ack.
        self._progress.setdefault(dead.run_id, _RunProgress()).add(dead.seq)
        if self._on_dead_letter is not None:
            self._on_dead_letter(dead)
        else:
            log.warning(
                "event dead-lettered",
                extra={"run_id": dead.run_id, "seq": dead.seq, "event_id": dead.event_id},
            )

    async def _open(self) -> None:
        delays = self._reconnect.delays()
        refreshed_token = False
        while True:
            try:
                await self._open_once()
                if self._opened_before:
                    self.reconnects += 1
                self._opened_before = True
                return
            except grpc.aio.AioRpcError as error:
                self._drop_call()
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    if not callable(self._token) or refreshed_token:
                        raise  # a fresh token was refused too: retrying cannot help
                    refreshed_token = True
                    continue
                self._raise_unless_retryable(error)
            except TimeoutError:
                self._drop_call()
            await anext(delays)

    async def _open_once(self) -> None:
        token = await self._current_token()
        requests: asyncio.Queue[events_service_pb2.SubscribeRequest | None] = asyncio.Queue()
        requests.put_nowait(events_service_pb2.SubscribeRequest(open=self._opening))

        async def outgoing() -> AsyncIterator[events_service_pb2.SubscribeRequest]:
            while (request := await requests.get()) is not None:
                yield request

        self._call = self._stub.Subscribe(outgoing(), metadata=(("authorization", f"Bearer {token}"),))
        self._requests = requests
        async with asyncio.timeout(self._idle_timeout):
            first = await self._call.read()
        if first is grpc.aio.EOF or first.WhichOneof("response") != "opened":  # type: ignore[attr-defined]
            raise TimeoutError  # not a subscription: try again

    async def _current_token(self) -> str:
        if isinstance(self._token, str):
            return self._token
        value = self._token()
        return await value if inspect.isawaitable(value) else value

    def _raise_unless_retryable(self, error: grpc.aio.AioRpcError) -> None:
        if error.code() == grpc.StatusCode.ABORTED and _reason(error) == TAKEN_OVER_REASON:
            raise ConsumerTakenOver(error.details() or TAKEN_OVER_REASON) from error
        if error.code() == grpc.StatusCode.UNAUTHENTICATED and callable(self._token):
            return  # a fresh token on the next open
        if error.code() not in RETRYABLE:
            raise error

    def _drop_call(self) -> None:
        self._unanswered_acks = 0
        if self._requests is not None:
            self._requests.put_nowait(None)
            self._requests = None
        if self._call is not None:
            with contextlib.suppress(AttributeError):
                self._call.cancel()
            self._call = None
