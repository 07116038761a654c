"""The client side of `EventsService.Subscribe` as the benchmarks use it: open,
read batches as they come (noting when each arrived), acknowledge each batch
at once, and count the answers to acknowledgements."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from switchboard.events.v1 import events_service_pb2, events_service_pb2_grpc

from tests.harness.suite import metadata

# A batch handler gets the deliveries and the moment (perf_counter) they arrived.
BatchHandler = Callable[[Sequence[events_service_pb2.Delivery], float], None]
AckHandler = Callable[[Sequence[events_service_pb2.AckResult]], None]
OPEN_TIMEOUT_SECONDS = 60.0


class Subscription:
    """One Subscribe stream. With `cumulative_acks`, each batch is acknowledged
    as "everything of the run through its last seq" (one answer per batch);
    otherwise by event ids."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        token: str,
        opening: events_service_pb2.SubscriptionOpen,
        on_batch: BatchHandler | None = None,
        on_ack_results: AckHandler | None = None,
        cumulative_acks: bool = False,
    ) -> None:
        self._stub: Any = events_service_pb2_grpc.EventsServiceStub(channel)
        self._token = token
        self._opening = opening
        self._on_batch = on_batch
        self._on_ack_results = on_ack_results
        self._cumulative = cumulative_acks
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.subscription_id = ""

    async def open(self, read: bool = True) -> None:
        """Opens the stream and waits for the server's `opened`; with `read`,
        then reads (and acknowledges) in the background until closed."""
        self._call = self._stub.Subscribe(metadata=metadata(self._token))
        async with asyncio.timeout(OPEN_TIMEOUT_SECONDS):
            await self._call.write(events_service_pb2.SubscribeRequest(open=self._opening))
            first = await self._call.read()
        if first is grpc.aio.EOF or first.WhichOneof("response") != "opened":  # type: ignore[attr-defined]
            raise RuntimeError(f"Subscribe did not open: {first}")
        self.subscription_id = first.opened.subscription_id
        if read:
            self._reader = asyncio.create_task(self._read(), name=f"subscription {self.subscription_id}")

    def failure(self) -> BaseException | None:
        """What ended the reader, if it ended on an error."""
        if self._reader is None or not self._reader.done() or self._reader.cancelled():
            return None
        return self._reader.exception()

    async def _read(self) -> None:
        while True:
            response = await self._call.read()
            if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            arrived = time.perf_counter()
            kind = response.WhichOneof("response")
            if kind == "ack_results":
                if self._on_ack_results is not None:
                    self._on_ack_results(response.ack_results.results)
                continue
            if kind != "events":
                continue
            deliveries = response.events.deliveries
            if self._on_batch is not None:
                self._on_batch(deliveries, arrived)
            await self._call.write(events_service_pb2.SubscribeRequest(ack=self._ack(deliveries)))

    def _ack(self, deliveries: Sequence[events_service_pb2.Delivery]) -> events_service_pb2.AckRequest:
        events = [d.event for d in deliveries if d.WhichOneof("item") == "event"]
        if not self._cumulative:
            return events_service_pb2.AckRequest(event_ids=[event.event_id for event in events])
        last: dict[str, int] = {}
        for event in events:
            last[event.run_id] = max(last.get(event.run_id, 0), event.seq)
        return events_service_pb2.AckRequest(
            cumulative=[
                events_service_pb2.CumulativeAck(run_id=run_id, through_seq=seq)
                for run_id, seq in last.items()
            ]
        )

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._reader
        if self._call is not None:
            self._call.cancel()


async def close_all(subscriptions: Sequence[Subscription]) -> None:
    await asyncio.gather(*(subscription.close() for subscription in subscriptions))
