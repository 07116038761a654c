"""The events instruments as the domain records them: deliveries and
redeliveries per consumer, dead letters, and the pending-acknowledgement gauge
of open subscriptions. Steps are driven by hand with a fake clock: no timing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from services.events.domain import (
    CumulativeAck,
    DeliverySettings,
    EventsDomain,
    StartKind,
    StartPosition,
    SubscriptionSpec,
)
from services.events.metrics import ATTR_CONSUMER, EPHEMERAL_CONSUMER, EventsMetrics
from services.events.storage import SqlEventLog
from tests.unit.events.helpers import FakeClock, dead_letters, delivered, publish_run

FROM_BEGINNING = StartPosition(StartKind.FROM_BEGINNING)
DELIVERIES = "switchboard.events.deliveries"
REDELIVERIES = "switchboard.events.redeliveries"
DEAD_LETTERS = "switchboard.events.dead_letters"
PENDING = "switchboard.events.pending_acks"


@dataclass
class Metered:
    domain: EventsDomain
    clock: FakeClock
    reader: InMemoryMetricReader

    def values(self, name: str) -> dict[str, Any]:
        """The instrument's current value per consumer label (absent series left out)."""
        found: dict[str, Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            assert isinstance(point, NumberDataPoint)
                            found[str(dict(point.attributes or {})[ATTR_CONSUMER])] = point.value
        return found


@pytest.fixture
def metered(sqlite_log: SqlEventLog) -> Iterator[Metered]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    clock = FakeClock()
    domain = EventsDomain(
        sqlite_log,
        DeliverySettings(max_delivery_attempts=3),
        clock,
        metrics=EventsMetrics(provider),
    )
    yield Metered(domain, clock, reader)
    provider.shutdown()


def durable(run_id: str, consumer: str = "inbox") -> SubscriptionSpec:
    return SubscriptionSpec(run_id, FROM_BEGINNING, consumer=consumer, ack_deadline=5.0)


async def test_deliveries_redeliveries_dead_letters_and_pending_per_consumer(metered: Metered) -> None:
    run_id = await publish_run(metered.domain, 3)
    subscription = await metered.domain.subscribe("user-a", durable(run_id))
    assert metered.values(PENDING) == {"inbox": 0}  # open, nothing sent yet

    assert len(delivered(await subscription.step())) == 3
    assert metered.values(DELIVERIES) == {"inbox": 3}
    assert metered.values(REDELIVERIES) == {}
    assert metered.values(PENDING) == {"inbox": 3}

    await subscription.acknowledge_from_stream([f"{run_id}-1"], [])
    assert metered.values(PENDING) == {"inbox": 2}

    # Seqs 2 and 3 miss their deadline twice: attempts 2 and 3, then dead letters.
    for attempt in (2, 3):
        metered.clock.advance(6)
        assert delivered(await subscription.step()) == [(run_id, 2, attempt), (run_id, 3, attempt)]
    assert metered.values(DELIVERIES) == {"inbox": 7}
    assert metered.values(REDELIVERIES) == {"inbox": 4}
    assert metered.values(DEAD_LETTERS) == {}
    metered.clock.advance(6)
    assert dead_letters(await subscription.step()) == [(2, 3), (3, 3)]
    assert metered.values(DEAD_LETTERS) == {"inbox": 2}
    assert metered.values(DELIVERIES) == {"inbox": 7}  # a marker is not a delivery
    assert metered.values(PENDING) == {"inbox": 0}  # dead letters are settled

    subscription.close()
    assert metered.values(PENDING) == {}  # no open subscription of the consumer


async def test_a_taken_over_connection_no_longer_counts_as_pending(metered: Metered) -> None:
    run_id = await publish_run(metered.domain, 2)
    older = await metered.domain.subscribe("user-a", durable(run_id))
    assert len(delivered(await older.step())) == 2
    newer = await metered.domain.subscribe("user-a", durable(run_id))
    # The older stream ended (taken over) but is not closed yet: its two
    # deliveries are the newer one's now, counted once, as redeliveries.
    assert delivered(await newer.step()) == [(run_id, 1, 2), (run_id, 2, 2)]
    assert metered.values(PENDING) == {"inbox": 2}
    assert metered.values(REDELIVERIES) == {"inbox": 2}
    await newer.acknowledge_from_stream([], [CumulativeAck(run_id, 2)])
    assert metered.values(PENDING) == {"inbox": 0}
    older.close()
    newer.close()


async def test_ephemeral_and_durable_subscriptions_have_their_own_series(metered: Metered) -> None:
    run_id = await publish_run(metered.domain, 2)
    ephemeral = await metered.domain.subscribe("user-a", SubscriptionSpec(run_id, FROM_BEGINNING))
    audit = await metered.domain.subscribe("user-b", SubscriptionSpec(None, consumer="audit"))
    assert len(delivered(await ephemeral.step())) == 2
    assert await audit.step() == []  # user-b has no runs
    assert metered.values(DELIVERIES) == {EPHEMERAL_CONSUMER: 2}
    assert metered.values(PENDING) == {EPHEMERAL_CONSUMER: 2, "audit": 0}
    await ephemeral.nack_from_stream([f"{run_id}-1"], delay=0)
    assert delivered(await ephemeral.step()) == [(run_id, 1, 2)]
    assert metered.values(REDELIVERIES) == {EPHEMERAL_CONSUMER: 1}
    ephemeral.close()
    audit.close()
    assert metered.values(PENDING) == {}


async def test_a_domain_made_without_metrics_still_delivers(sqlite_log: SqlEventLog) -> None:
    domain = EventsDomain(sqlite_log, clock=FakeClock())
    run_id = await publish_run(domain, 1)
    subscription = await domain.subscribe("user-a", SubscriptionSpec(run_id, FROM_BEGINNING))
    assert len(delivered(await subscription.step())) == 1
    subscription.close()
