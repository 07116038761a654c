"""`events tail RUN`, and the event stream that `run start --follow` prints.

The CLI subscribes ephemerally (it keeps no consumer on the server), from the
beginning of the run's stream or after a given seq, acknowledges each batch
once it is printed, and stops when the service says the run's stream is
complete (sent only after every event of the run was acknowledged). If the
stream breaks (a restart, a network drop) it reconnects after the last seq it
printed, so nothing is printed twice or skipped.

A run the events service does not know (NOT_FOUND) may still exist: its first
events can be on their way from the executor's outbox (just started, or the
events service was away). The follower then asks the executor (GetRun) and, if
the run is there, waits for them - a bounded wait, with a spinner on a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
from switchboard.events.v1 import event_pb2, events_service_pb2
from switchboard.executor.v1 import executor_service_pb2

from switchboard_client.cli.context import Context
from switchboard_client.cli.credentials import bearer
from switchboard_client.cli.errors import CliError, UsageError, describe_rpc_error, error_reason
from switchboard_client.cli.output import Output, Progress, event_line, message_dict

# Worth another try: the service or the network, not the request.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# The service sends heartbeats on an idle stream (every 10s by default): this
# long without anything means the connection is dead.
IDLE_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 5.0
# How long a run that exists may stay unknown to the events service. Normally its
# events follow within seconds (the outbox relay backs off to at most 5s); longer
# means the relay is stuck, which waiting on will not fix.
EVENTS_WAIT_SECONDS = 30.0


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    group = commands.add_parser("events", help="a run's events")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    tail = actions.add_parser(
        "tail",
        parents=[common],
        help="print a run's events, and new ones as they arrive, until the run ends",
        description=(
            "Prints the run's events from the beginning (or after --after-seq), then each new one as "
            "it arrives, acknowledging them, until the run's stream is complete. With --json: one "
            "Event a line."
        ),
    )
    tail.add_argument("run_id", metavar="RUN")
    tail.add_argument("--after-seq", type=int, default=0, metavar="SEQ", help="start after this seq")
    tail.add_argument(
        "--max-wait",
        type=float,
        default=EVENTS_WAIT_SECONDS,
        metavar="SECONDS",
        help=(
            "how long to wait for the events of a run that exists but whose events have not reached "
            f"the events service yet (default {EVENTS_WAIT_SECONDS:g}; 0: do not wait)"
        ),
    )
    tail.set_defaults(handler=tail_command)


def print_event(ctx: Context, event: event_pb2.Event, *, wrapped: bool = False) -> None:
    if ctx.out.json_mode:
        document = message_dict(event)
        ctx.out.json({"event": document} if wrapped else document, compact=True)
    else:
        ctx.out.line(event_line(event))


async def tail_command(ctx: Context) -> int:
    max_wait: float = ctx.args.max_wait
    if not 0 <= max_wait < float("inf"):
        raise UsageError("--max-wait must be a number of seconds, 0 or more")
    follower = RunFollower(ctx, ctx.args.run_id, lambda event: print_event(ctx, event), max_wait=max_wait)
    await follower.follow(after_seq=ctx.args.after_seq)
    return 0


class RunFollower:
    """Hands each event of one run to `on_event`, in seq order and once, until the run's
    stream is complete."""

    def __init__(
        self,
        ctx: Context,
        run_id: str,
        on_event: Callable[[event_pb2.Event], None],
        *,
        run_exists: bool = False,
        max_wait: float = EVENTS_WAIT_SECONDS,
    ) -> None:
        """`run_exists`: the caller knows the run is there (it just started it), so the
        executor need not be asked when the events service does not know it yet.
        `max_wait`: how long to wait for the events of a run that exists."""
        self._ctx = ctx
        self._run_id = run_id
        self._on_event = on_event
        self._run_exists = run_exists
        self._pending = PendingEvents(ctx.out, run_id, max_wait)
        self.last_seq = 0
        # Requests (acks) for the stream that is open now.
        self._requests: asyncio.Queue[events_service_pb2.SubscribeRequest | None] | None = None

    async def follow(self, *, after_seq: int = 0) -> int:
        """Returns the last seq once the run's stream is complete."""
        self.last_seq = after_seq
        try:
            return await self._follow()
        finally:
            await self._pending.over()  # the spinner never outlives the follow

    async def _follow(self) -> int:
        backoff = 0.2
        refreshed = False
        session = self._ctx.session
        token = await session.access_token()
        while True:
            try:
                async with contextlib.aclosing(self._stream(token)) as responses:
                    async for response in responses:
                        backoff, refreshed = 0.2, False
                        await self._pending.over()
                        kind = response.WhichOneof("response")
                        if kind == "events":
                            self._handle(response.events)
                        elif kind == "reset":
                            position = response.reset.position
                            self._ctx.out.note(
                                f"events through seq {position.last_seq} are gone "
                                f"({response.reset.reason}): continuing after them"
                            )
                            self.last_seq = max(self.last_seq, position.last_seq)
                        elif kind == "run_completed" and response.run_completed.run_id == self._run_id:
                            return self.last_seq
            except grpc.aio.AioRpcError as error:
                expired = (
                    error.code() == grpc.StatusCode.UNAUTHENTICATED and error_reason(error) == "TOKEN_EXPIRED"
                )
                if expired and not refreshed:  # a fresh token refused as well: give up below
                    token = await session.refresh(token)
                    refreshed = True
                    continue
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    await self._confirm_run_exists(error)
                    await self._pending.still_missing(error)
                elif error.code() not in RETRYABLE:
                    raise describe_rpc_error(error, "events") from None
                else:
                    self._ctx.out.note(
                        f"event stream broke ({error.code().name}): reconnecting after seq {self.last_seq}"
                    )
            except TimeoutError:
                self._ctx.out.note(
                    f"event stream silent for {IDLE_SECONDS:.0f}s: reconnecting after seq {self.last_seq}"
                )
            # The stream ended before the run's did, or broke: open it again.
            await asyncio.sleep(self._pending.capped(backoff * (0.5 + random.random() / 2)))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _confirm_run_exists(self, not_found: grpc.aio.AioRpcError) -> None:
        """Whether the run the events service does not know exists for this user, from
        the executor that owns runs; if not, the events service's NOT_FOUND it is."""
        if self._run_exists:
            return
        try:
            await self._ctx.call(
                "executor", "GetRun", executor_service_pb2.GetRunRequest(run_id=self._run_id)
            )
        except CliError as lookup:
            refused = describe_rpc_error(not_found, "events")
            if (lookup.status or {}).get("code") != grpc.StatusCode.NOT_FOUND.name:
                refused.details.append(f"could not ask the executor whether the run exists: {lookup.message}")
            raise refused from None
        self._run_exists = True

    def _handle(self, batch: events_service_pb2.EventBatch) -> None:
        acknowledged: list[str] = []
        for delivery in batch.deliveries:
            if delivery.WhichOneof("item") == "dead_letter":
                dead = delivery.dead_letter
                self._ctx.out.note(
                    f"event seq {dead.seq} was dead-lettered after {dead.delivery_attempts} attempts"
                )
                self.last_seq = max(self.last_seq, dead.seq)
                continue
            event = delivery.event
            acknowledged.append(event.event_id)
            if event.seq > self.last_seq:  # a redelivery of one already printed is only acknowledged
                self._on_event(event)
                self.last_seq = event.seq
        if acknowledged and self._requests is not None:
            self._requests.put_nowait(
                events_service_pb2.SubscribeRequest(ack=events_service_pb2.AckRequest(event_ids=acknowledged))
            )

    async def _stream(self, token: str) -> AsyncGenerator[events_service_pb2.SubscribeResponse, None]:
        opening = events_service_pb2.SubscriptionOpen(run_id=self._run_id)
        if self.last_seq > 0:
            opening.start.after_seq = self.last_seq
        else:
            opening.start.from_beginning = True
        requests: asyncio.Queue[events_service_pb2.SubscribeRequest | None] = asyncio.Queue()
        requests.put_nowait(events_service_pb2.SubscribeRequest(open=opening))

        async def outgoing() -> AsyncIterator[events_service_pb2.SubscribeRequest]:
            while (request := await requests.get()) is not None:
                yield request

        call = self._ctx.stub("events").Subscribe(outgoing(), metadata=bearer(token))
        self._requests = requests
        try:
            while True:
                async with asyncio.timeout(IDLE_SECONDS):
                    response = await call.read()
                if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                yield response
        finally:
            self._requests = None
            requests.put_nowait(None)
            with contextlib.suppress(AttributeError):
                call.cancel()


class PendingEvents:
    """The wait for the events of a run that exists but that the events service does
    not know yet: a note, a spinner while stderr is a terminal, and a bound."""

    def __init__(self, out: Output, run_id: str, limit: float) -> None:
        self._out = out
        self._run_id = run_id
        self._limit = limit
        self._since: float | None = None
        self._progress: Progress | None = None

    async def still_missing(self, not_found: grpc.aio.AioRpcError) -> None:
        """The events service answered NOT_FOUND again: wait on, or give up past the bound."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since >= self._limit:
            await self.over()
            refused = describe_rpc_error(not_found, "events")
            raise CliError(
                f"run {self._run_id} exists, but its events have not reached the events service "
                f"in {self._limit:g}s",
                details=[
                    refused.message,
                    *refused.details,
                    "the executor's outbox relays them once it can publish; "
                    f"try again later: switchboard events tail {self._run_id}",
                ],
                status=refused.status,
            )
        if self._progress is None:
            self._out.note(
                f"the run's events have not reached the events service yet: waiting up to {self._limit:g}s"
            )
            self._progress = Progress(self._out.stderr, f"waiting for the events of run {self._run_id}")
            await self._progress.__aenter__()

    def capped(self, delay: float) -> float:
        """`delay`, but no later than the bound, so giving up is not late."""
        if self._since is None:
            return delay
        return max(0.0, min(delay, self._since + self._limit - time.monotonic()))

    async def over(self) -> None:
        """Something arrived (or the follow ends): stop waiting."""
        self._since = None
        if self._progress is not None:
            progress, self._progress = self._progress, None
            await progress.__aexit__(None, None, None)
