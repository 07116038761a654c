"""Two events processes on one Redis log, in one test process: a publish through
one wakes subscriptions on the other, a durable consumer moves between them
(the newer connection wins, the older one can no longer write), and an ack made
on one without a stream reaches the stream open on the other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.common.errors import Aborted
from services.events.domain import (
    CumulativeAck,
    DeliverySettings,
    EventsDomain,
    Output,
    StartKind,
    StartPosition,
    Subscription,
    SubscriptionSpec,
)
from tests.unit.events.backends import redis_logs
from tests.unit.events.helpers import (
    NOW,
    FakeClock,
    completions,
    delivered,
    new_event,
    outcomes,
    publish_run,
    seqs,
)

pytestmark = pytest.mark.redis
GUARD_SECONDS = 10.0  # a hang fails instead of stalling; nothing is timed


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[EventsDomain, EventsDomain]]:
    async with redis_logs(redis_url, count=2) as (first, second):
        settings = DeliverySettings(max_delivery_attempts=3, heartbeat_seconds=60.0)
        # Separate clocks: nothing here advances them, so only signals can wake a stream.
        yield EventsDomain(first, settings, FakeClock()), EventsDomain(second, settings, FakeClock())


async def next_output(subscription: Subscription) -> list[Output]:
    """The stream's next outputs; only a wake-up can produce them in time."""
    stream = subscription.stream()
    try:
        return await asyncio.wait_for(anext(stream), GUARD_SECONDS)
    finally:
        await stream.aclose()


async def test_a_publish_on_one_replica_wakes_a_subscription_on_the_other(
    replicas: tuple[EventsDomain, EventsDomain],
) -> None:
    a, b = replicas
    subscription = await b.subscribe("user-a", SubscriptionSpec(None, StartPosition(StartKind.NEW_ONLY)))
    assert await subscription.step() == []
    waiting = asyncio.ensure_future(next_output(subscription))
    await asyncio.sleep(0)
    run_id = await publish_run(a, 2)
    await publish_run(a, 1, user_id="user-b")  # another user's run wakes nobody of user-a's
    assert delivered(await waiting) == [(run_id, 1, 1), (run_id, 2, 1)]
    subscription.close()


async def test_a_durable_consumer_moves_to_the_other_replica(
    replicas: tuple[EventsDomain, EventsDomain],
) -> None:
    a, b = replicas
    run_id = await publish_run(a, 4)
    older = await a.subscribe("user-a", SubscriptionSpec(run_id, consumer="inbox"))
    assert seqs(await older.step()) == [1, 2, 3, 4]
    await older.acknowledge_from_stream([], [CumulativeAck(run_id, 2)])
    await older.step()

    newer = await b.subscribe("user-a", SubscriptionSpec(run_id, consumer="inbox"))
    # Exactly where the older one left off: 1 and 2 acknowledged, 3 and 4 redelivered.
    assert delivered(await newer.step()) == [(run_id, 3, 2), (run_id, 4, 2)]
    # The older connection hears of the takeover and ends...
    with pytest.raises(Aborted) as ended:
        await next_output(older)
    assert ended.value.reason == "CONSUMER_TAKEN_OVER"
    # ...and even an ack it got in before hearing could not have written anything.
    status = {s.consumer: s for s in (await b.delivery_status("user-a", run_id))[1]}
    assert (status["inbox"].last_acked_seq, status["inbox"].pending) == (2, 2)


async def test_a_stale_holder_cannot_write(replicas: tuple[EventsDomain, EventsDomain]) -> None:
    a, b = replicas
    run_id = await publish_run(a, 2)
    older = await a.subscribe("user-a", SubscriptionSpec(run_id, consumer="inbox"))
    await older.step()
    # The newer claim lands; the older subscription has not heard of it (no step since).
    newer = await b.subscribe("user-a", SubscriptionSpec(run_id, consumer="inbox"))
    with pytest.raises(Aborted):
        await older.acknowledge_from_stream([f"{run_id}-1", f"{run_id}-2"], [])
    assert delivered(await newer.step()) == [(run_id, 1, 2), (run_id, 2, 2)]


async def test_an_ack_without_a_stream_reaches_the_stream_on_the_other_replica(
    replicas: tuple[EventsDomain, EventsDomain],
) -> None:
    a, b = replicas
    run_id = await publish_run(a, 1, completed=True)
    live = await a.subscribe("user-a", SubscriptionSpec(run_id, consumer="inbox"))
    assert seqs(await live.step()) == [1, 2]
    report = await b.acknowledge("user-a", "inbox", [f"{run_id}-1", f"{run_id}-2"], [])
    assert [r.outcome.name for r in report.results] == ["ACCEPTED", "ACCEPTED"]
    # The stream on replica A takes it in: nothing is left in flight and the run is complete.
    assert completions(await next_output(live)) == [(run_id, 2)]
    assert live.in_flight == 0
    # Replica A's stream, still holding the consumer, cannot reopen what B settled.
    await live.acknowledge_from_stream([f"{run_id}-1"], [])
    assert [o.name for o in outcomes(await live.step())] == ["STALE"]
    _, statuses = await b.delivery_status("user-a", run_id)
    assert [(s.consumer, s.acknowledged, s.pending, s.last_acked_seq) for s in statuses] == [
        ("inbox", 2, 0, 2)
    ]


async def test_events_published_on_both_replicas_reach_one_subscription_in_order(
    replicas: tuple[EventsDomain, EventsDomain],
) -> None:
    a, b = replicas
    run_id = await publish_run(a, 1)
    subscription = await b.subscribe(
        "user-a", SubscriptionSpec(run_id, StartPosition(StartKind.FROM_BEGINNING))
    )
    got = seqs(await subscription.step())
    for seq, replica in zip(range(2, 7), (a, b, a, b, a), strict=True):
        await replica.publish([new_event(run_id, seq)], NOW)
        while len(got) < seq:
            got += seqs(await next_output(subscription))
    assert got == [1, 2, 3, 4, 5, 6]
