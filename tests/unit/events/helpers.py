"""Builders and a fake clock for the events service's unit tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from services.events.domain import (
    AckOutcome,
    AckReport,
    DeadLettered,
    Delivered,
    DeliveryBatch,
    EventsDomain,
    EventType,
    NewEvent,
    Output,
    RunStreamCompleted,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.value = 1000.0

    def now(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


def new_event(
    run_id: str,
    seq: int,
    user_id: str = "user-a",
    type: EventType = EventType.AGENT_THINKING,
    event_id: str | None = None,
    **fields: Any,
) -> NewEvent:
    return NewEvent(
        event_id=event_id or f"{run_id}-{seq}",
        run_id=run_id,
        user_id=user_id,
        seq=seq,
        type=type,
        payload=fields.pop("payload", {"n": seq}),
        **fields,
    )


def run_events(run_id: str, count: int, user_id: str = "user-a", completed: bool = False) -> list[NewEvent]:
    events = [new_event(run_id, seq, user_id) for seq in range(1, count + 1)]
    if completed:
        events.append(new_event(run_id, count + 1, user_id, type=EventType.RUN_COMPLETED))
    return events


async def publish_run(
    domain: EventsDomain, count: int, user_id: str = "user-a", completed: bool = False
) -> str:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    await domain.publish(run_events(run_id, count, user_id, completed), NOW)
    return run_id


def deliveries(outputs: Sequence[Output]) -> list[Delivered | DeadLettered]:
    return [item for output in outputs if isinstance(output, DeliveryBatch) for item in output.items]


def delivered(outputs: Sequence[Output]) -> list[tuple[str, int, int]]:
    """(run_id, seq, attempt) of each event delivery."""
    return [
        (item.event.run_id, item.event.seq, item.attempt)
        for item in deliveries(outputs)
        if isinstance(item, Delivered)
    ]


def seqs(outputs: Sequence[Output]) -> list[int]:
    return [item.event.seq for item in deliveries(outputs) if isinstance(item, Delivered)]


def dead_letters(outputs: Sequence[Output]) -> list[tuple[int, int]]:
    return [(item.event.seq, item.attempts) for item in deliveries(outputs) if isinstance(item, DeadLettered)]


def outcomes(outputs: Sequence[Output]) -> list[AckOutcome]:
    return [
        result.outcome for output in outputs if isinstance(output, AckReport) for result in output.results
    ]


def completions(outputs: Sequence[Output]) -> list[tuple[str, int]]:
    return [(o.run_id, o.last_seq) for o in outputs if isinstance(o, RunStreamCompleted)]
