"""A raw `Subscribe` stream for tests through real processes: generated stubs
only, fed from a queue and read one response at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from switchboard.events.v1 import event_pb2, events_service_pb2

READ_GUARD_SECONDS = 15.0  # a hang fails the test instead of stalling it; nothing is timed


def run_event(run_id: str, user_id: str, seq: int, last: int) -> event_pb2.Event:
    """Seq `seq` of a run whose RUN_COMPLETED is seq `last`."""
    kind = event_pb2.EVENT_TYPE_RUN_COMPLETED if seq == last else event_pb2.EVENT_TYPE_AGENT_THINKING
    result = event_pb2.Event(event_id=f"{run_id}:{seq}", run_id=run_id, user_id=user_id, seq=seq, type=kind)
    result.payload.update({"seq": seq})
    return result


async def publish_run(
    stub: Any, metadata: Sequence[tuple[str, str]], run_id: str, user_id: str, events: int, per_batch: int = 2
) -> None:
    """Publishes a whole run a few events at a time, as the executor's relay would."""
    for start in range(1, events + 1, per_batch):
        batch = [
            run_event(run_id, user_id, seq, events)
            for seq in range(start, min(start + per_batch, events + 1))
        ]
        await stub.Publish(events_service_pb2.PublishRequest(events=batch), metadata=metadata, timeout=10)


def error_info(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The reason and metadata of the error's google.rpc.ErrorInfo detail."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason, dict(info.metadata)
    return "", {}


class RawSubscription:
    def __init__(
        self,
        stub: Any,
        metadata: Sequence[tuple[str, str]],
        opening: events_service_pb2.SubscriptionOpen,
        timeout: float = 60.0,
    ) -> None:
        self._requests: asyncio.Queue[events_service_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._requests.put_nowait(events_service_pb2.SubscribeRequest(open=opening))
        self.call = stub.Subscribe(self._outgoing(), metadata=metadata, timeout=timeout)

    async def _outgoing(self) -> AsyncIterator[events_service_pb2.SubscribeRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def ack(self, event_ids: Sequence[str] = (), cumulative: Sequence[tuple[str, int]] = ()) -> None:
        acks = [events_service_pb2.CumulativeAck(run_id=r, through_seq=s) for r, s in cumulative]
        self._requests.put_nowait(
            events_service_pb2.SubscribeRequest(
                ack=events_service_pb2.AckRequest(event_ids=event_ids, cumulative=acks)
            )
        )

    async def read(self) -> events_service_pb2.SubscribeResponse:
        response = await asyncio.wait_for(self.call.read(), READ_GUARD_SECONDS)
        assert response is not grpc.aio.EOF  # type: ignore[attr-defined]
        return response  # type: ignore[no-any-return]

    async def next(self, kind: str) -> Any:
        """The next response of this kind, skipping the others."""
        while True:
            response = await self.read()
            if response.WhichOneof("response") == kind:
                return getattr(response, kind)

    def nack(self, event_ids: Sequence[str], delay: float = 0.0) -> None:
        request = events_service_pb2.NackRequest(event_ids=event_ids)
        request.delay.FromNanoseconds(int(delay * 1e9))
        self._requests.put_nowait(events_service_pb2.SubscribeRequest(nack=request))

    def close(self) -> None:
        self._requests.put_nowait(None)
        self.call.cancel()
