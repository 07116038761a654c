"""The events service's own metrics, next to the RPC and token series every
service has (services.common.metrics).

`EventsMetrics` is made once, in `build` (on the event loop), and handed to
the domain, whose subscriptions record each delivery and dead letter and are
tracked while open, for the pending-acknowledgement gauge.

| instrument (Prometheus name) | meaning |
|---|---|
| `switchboard.events.deliveries` (`switchboard_events_deliveries_total`) | events sent to subscribers, every attempt |
| `switchboard.events.redeliveries` (`..._redeliveries_total`) | of those, attempts after the first |
| `switchboard.events.dead_letters` (`..._dead_letters_total`) | events dead-lettered after the maximum attempts |
| `switchboard.events.pending_acks` (`..._pending_acks`) | events delivered to open subscriptions and not yet settled |

`pending_acks` counts what this process's open subscriptions are waiting
on, so with replicas the total is the sum over instances. Deliveries that a
durable consumer left unacknowledged when its connection ended are not in it
(they are redelivered, and counted again, when it reconnects; GetDeliveryStatus
shows them per run): a log-wide count would be reported once per replica, and
Redis has no cheap count across consumers. The series of a consumer with no
open subscription is absent rather than 0.

Every series is labelled by consumer, `messaging_consumer_group_name`: the
durable consumer's name, or "_ephemeral" for subscriptions without one. Names
are chosen by clients and not unique across users (users' consumers of the same
name share a series); past `consumer_label_limit` distinct names, later ones
are reported as "_other". User ids are never labels.
"""

from __future__ import annotations

import weakref
from typing import Protocol

from opentelemetry.metrics import MeterProvider, Observation

from services.common import metrics

# The OpenTelemetry messaging conventions' name for a consumer group.
ATTR_CONSUMER = "messaging.consumer.group.name"
EPHEMERAL_CONSUMER = "_ephemeral"


class OpenSubscription(Protocol):
    """What the pending-acknowledgement gauge reads of a subscription."""

    @property
    def in_flight(self) -> int: ...

    @property
    def ended(self) -> bool: ...


class EventsMetrics:
    def __init__(
        self, meter_provider: MeterProvider | None = None, *, consumer_label_limit: int = 100
    ) -> None:
        meter = metrics.meter("events", meter_provider)
        self._consumer_label = metrics.BoundedLabel(consumer_label_limit)
        # One attribute set per label (bounded), made on first use.
        self._attributes: dict[str, metrics.Attributes] = {}
        # Open subscriptions and their consumer label; a subscription that is
        # dropped without `untrack` leaves on its own.
        self._open: weakref.WeakKeyDictionary[OpenSubscription, str] = weakref.WeakKeyDictionary()
        self._deliveries = meter.create_counter(
            "switchboard.events.deliveries",
            unit="{delivery}",
            description="Events sent to subscribers, every attempt counted.",
        )
        self._redeliveries = meter.create_counter(
            "switchboard.events.redeliveries",
            unit="{delivery}",
            description="Deliveries after the first attempt (ack deadline passed, negative ack, resume).",
        )
        self._dead_letters = meter.create_counter(
            "switchboard.events.dead_letters",
            unit="{event}",
            description="Events dead-lettered for a consumer after the maximum delivery attempts.",
        )
        metrics.observable_gauge(
            meter,
            "switchboard.events.pending_acks",
            self._observe_pending,
            unit="{event}",
            description="Events delivered to open subscriptions and not yet acknowledged.",
        )

    def delivered(self, consumer: str | None, attempt: int) -> None:
        """An event went to a subscriber; `attempt` counts from 1."""
        attributes = self._consumer(consumer)
        self._deliveries.add(1, attributes)
        if attempt > 1:
            self._redeliveries.add(1, attributes)

    def dead_lettered(self, consumer: str | None) -> None:
        self._dead_letters.add(1, self._consumer(consumer))

    def track(self, consumer: str | None, subscription: OpenSubscription) -> None:
        """Counts the subscription's unacknowledged deliveries until it ends."""
        self._open[subscription] = self._label(consumer)

    def untrack(self, subscription: OpenSubscription) -> None:
        self._open.pop(subscription, None)

    def _label(self, consumer: str | None) -> str:
        return self._consumer_label(consumer) if consumer else EPHEMERAL_CONSUMER

    def _consumer(self, consumer: str | None) -> metrics.Attributes:
        label = self._label(consumer)
        attributes = self._attributes.get(label)
        if attributes is None:
            attributes = self._attributes[label] = {ATTR_CONSUMER: label}
        return attributes

    def _observe_pending(self) -> list[Observation]:
        pending: dict[str, float] = {}
        for subscription, consumer in list(self._open.items()):
            if not subscription.ended:
                pending[consumer] = pending.get(consumer, 0) + subscription.in_flight
        return metrics.by_label(ATTR_CONSUMER, pending)
