"""Delivery: order, flow control, redelivery, nacks, dead letters, heartbeats,
completion, and scope. Steps are driven by hand with a fake clock: no timing."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import Aborted, NotFound, Unavailable
from services.events.domain import (
    CumulativeAck,
    EventLog,
    EventsDomain,
    EventType,
    Heartbeat,
    StartKind,
    StartPosition,
    SubscriptionSpec,
)
from tests.unit.events.helpers import (
    NOW,
    FakeClock,
    completions,
    dead_letters,
    delivered,
    new_event,
    outcomes,
    publish_run,
    seqs,
)

FROM_BEGINNING = StartPosition(StartKind.FROM_BEGINNING)
GUARD_SECONDS = 5.0  # a hang fails instead of stalling; nothing is timed


def one_run(run_id: str, max_in_flight: int = 100, ack_deadline: float = 30.0) -> SubscriptionSpec:
    return SubscriptionSpec(run_id, FROM_BEGINNING, max_in_flight=max_in_flight, ack_deadline=ack_deadline)


async def test_events_come_in_seq_order_batched_per_run(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 5)
    subscription = await domain.subscribe("user-a", one_run(run_id))
    outputs = await subscription.step()
    assert len(outputs) == 1  # one batch
    assert delivered(outputs) == [(run_id, seq, 1) for seq in range(1, 6)]
    assert await subscription.step() == []


async def test_at_most_max_in_flight_unacknowledged(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 5)
    subscription = await domain.subscribe("user-a", one_run(run_id, max_in_flight=2))
    first = await subscription.step()
    assert seqs(first) == [1, 2]
    assert await subscription.step() == []  # full: nothing more until an ack
    await subscription.acknowledge_from_stream([f"{run_id}-1"], [])
    after_ack = await subscription.step()
    assert seqs(after_ack) == [3]
    assert subscription.in_flight == 2


async def test_new_events_are_delivered_after_publish(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 1)
    subscription = await domain.subscribe("user-a", one_run(run_id))
    assert seqs(await subscription.step()) == [1]
    await domain.publish([new_event(run_id, 2), new_event(run_id, 3)], NOW)
    assert seqs(await subscription.step()) == [2, 3]


async def test_an_unacknowledged_event_is_redelivered_after_its_deadline(
    domain: EventsDomain, clock: FakeClock
) -> None:
    run_id = await publish_run(domain, 2)
    subscription = await domain.subscribe("user-a", one_run(run_id, ack_deadline=5))
    await subscription.step()
    await subscription.acknowledge_from_stream([f"{run_id}-2"], [])
    clock.advance(4.9)
    assert delivered(await subscription.step()) == []
    assert subscription.next_due() == pytest.approx(clock.now() + 0.1)
    clock.advance(0.2)
    assert delivered(await subscription.step()) == [(run_id, 1, 2)]


async def test_a_nack_redelivers_after_its_delay(domain: EventsDomain, clock: FakeClock) -> None:
    run_id = await publish_run(domain, 1)
    subscription = await domain.subscribe("user-a", one_run(run_id))
    await subscription.step()
    await subscription.nack_from_stream([f"{run_id}-1", "no-such-event"], delay=2)
    answer = await subscription.step()
    assert [o.name for o in outcomes(answer)] == ["ACCEPTED", "UNKNOWN"]
    assert delivered(answer) == []
    clock.advance(2)
    assert delivered(await subscription.step()) == [(run_id, 1, 2)]
    # A nack without delay: at once.
    await subscription.nack_from_stream([f"{run_id}-1"], delay=0)
    assert delivered(await subscription.step()) == [(run_id, 1, 3)]


async def test_after_the_maximum_attempts_an_event_is_dead_lettered_visibly(
    domain: EventsDomain, clock: FakeClock
) -> None:
    # max_delivery_attempts is 3 in these tests.
    run_id = await publish_run(domain, 2)
    subscription = await domain.subscribe("user-a", one_run(run_id, ack_deadline=1))
    await subscription.step()
    await subscription.acknowledge_from_stream([f"{run_id}-2"], [])
    await subscription.step()
    attempts = []
    for _ in range(2):
        clock.advance(1)
        attempts += delivered(await subscription.step())
    assert attempts == [(run_id, 1, 2), (run_id, 1, 3)]
    clock.advance(1)
    final = await subscription.step()
    assert dead_letters(final) == [(1, 3)]
    assert subscription.in_flight == 0
    # Settled: an ack of it now is stale, and it is never sent again.
    await subscription.acknowledge_from_stream([f"{run_id}-1"], [])
    assert [o.name for o in outcomes(await subscription.step())] == ["STALE"]
    clock.advance(100)
    assert delivered(await subscription.step()) == []


async def test_a_nack_at_the_last_attempt_dead_letters_at_once(
    domain: EventsDomain, clock: FakeClock
) -> None:
    run_id = await publish_run(domain, 1)
    subscription = await domain.subscribe("user-a", one_run(run_id))
    await subscription.step()
    for _ in range(2):
        await subscription.nack_from_stream([f"{run_id}-1"], delay=0)
        await subscription.step()
    await subscription.nack_from_stream([f"{run_id}-1"], delay=60)
    assert dead_letters(await subscription.step()) == [(1, 3)]


async def test_ack_outcomes(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 4)
    other_users_run = await publish_run(domain, 1, user_id="user-b")
    subscription = await domain.subscribe("user-a", one_run(run_id, max_in_flight=3))
    await subscription.step()  # 1, 2, 3 in flight; 4 not delivered
    await subscription.acknowledge_from_stream(
        [f"{run_id}-1", f"{run_id}-1", f"{run_id}-4", "missing", f"{other_users_run}-1"],
        [CumulativeAck(run_id, 3), CumulativeAck(run_id, 3), CumulativeAck(other_users_run, 1)],
    )
    answer = await subscription.step()
    assert [o.name for o in outcomes(answer)] == [
        "ACCEPTED",  # in flight
        "STALE",  # already acknowledged
        "UNKNOWN",  # not delivered yet
        "UNKNOWN",  # no such event
        "UNKNOWN",  # another user's
        "ACCEPTED",  # 2 and 3
        "STALE",  # nothing left through 3
        "UNKNOWN",  # another user's run
    ]
    assert seqs(answer) == [4]


async def test_a_cumulative_ack_settles_only_what_was_delivered(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 4)
    subscription = await domain.subscribe("user-a", one_run(run_id, max_in_flight=2))
    await subscription.step()
    await subscription.acknowledge_from_stream([], [CumulativeAck(run_id, 100)])
    answer = await subscription.step()
    assert [o.name for o in outcomes(answer)] == ["ACCEPTED"]
    assert seqs(answer) == [3, 4]  # not skipped


async def test_run_stream_completed_once_run_completed_is_acknowledged(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 2, completed=True)
    subscription = await domain.subscribe("user-a", one_run(run_id))
    assert seqs(await subscription.step()) == [1, 2, 3]
    await subscription.acknowledge_from_stream([f"{run_id}-3"], [])
    assert completions(await subscription.step()) == []  # 1 and 2 still unacknowledged
    await subscription.acknowledge_from_stream([], [CumulativeAck(run_id, 2)])
    assert completions(await subscription.step()) == [(run_id, 3)]
    assert completions(await subscription.step()) == []  # once


async def test_heartbeat_names_each_runs_position(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 3)
    subscription = await domain.subscribe("user-a", one_run(run_id))
    await subscription.step()
    heartbeat = subscription.heartbeat()
    assert isinstance(heartbeat, Heartbeat)
    assert [(p.run_id, p.last_seq) for p in heartbeat.positions] == [(run_id, 3)]
    assert heartbeat.positions[0].epoch == int(NOW.timestamp() * 1000)


async def test_another_users_run_is_not_found_like_a_missing_one(domain: EventsDomain) -> None:
    foreign = await publish_run(domain, 1, user_id="user-b")
    with pytest.raises(NotFound) as other:
        await domain.subscribe("user-a", one_run(foreign))
    with pytest.raises(NotFound) as missing:
        await domain.subscribe("user-a", one_run("no-such-run"))
    assert other.value.reason == missing.value.reason == "RUN_NOT_FOUND"
    assert other.value.message.replace(foreign, "<id>") == missing.value.message.replace(
        "no-such-run", "<id>"
    )


async def test_all_runs_follows_present_and_future_runs_of_the_caller_only(domain: EventsDomain) -> None:
    mine = await publish_run(domain, 2)
    await publish_run(domain, 2, user_id="user-b")
    subscription = await domain.subscribe("user-a", SubscriptionSpec(None, FROM_BEGINNING))
    assert delivered(await subscription.step()) == [(mine, 1, 1), (mine, 2, 1)]
    later = await publish_run(domain, 1)
    await publish_run(domain, 1, user_id="user-b")
    assert delivered(await subscription.step()) == [(later, 1, 1)]


async def test_an_all_runs_subscription_hears_the_end_of_a_run_appended_while_it_read(
    domain: EventsDomain, log: EventLog
) -> None:
    # The subscription knows the run up to seq 3; seq 4 ends it and is stored
    # before the subscription reads the run, its notification still on the way
    # (a publish racing the delivery loop, or a replica's signal in flight).
    run_id = await publish_run(domain, 3)
    subscription = await domain.subscribe("user-a", SubscriptionSpec(None, FROM_BEGINNING))
    await log.append([new_event(run_id, 4, type=EventType.RUN_COMPLETED)], NOW)
    first = await subscription.step()
    await subscription.acknowledge_from_stream([], [CumulativeAck(run_id, 4)])
    domain.runs_appended("user-a", [run_id])  # the notification arrives
    rest = await subscription.step()
    await subscription.acknowledge_from_stream([], [CumulativeAck(run_id, 4)])
    rest += await subscription.step()
    assert seqs(first) + seqs(rest) == [1, 2, 3, 4]
    # The run's end was delivered here, so the subscription says the run is complete.
    assert completions(rest) == [(run_id, 4)]


async def test_ephemeral_default_and_new_only_skip_what_was_there(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 2)
    default = await domain.subscribe("user-a", SubscriptionSpec(run_id))
    new_only = await domain.subscribe("user-a", SubscriptionSpec(None, StartPosition(StartKind.NEW_ONLY)))
    assert await default.step() == [] and await new_only.step() == []
    await domain.publish([new_event(run_id, 3)], NOW)
    fresh = await publish_run(domain, 1)
    assert seqs(await default.step()) == [3]
    assert delivered(await new_only.step()) == [(run_id, 3, 1), (fresh, 1, 1)]


async def test_after_seq_starts_after_that_seq(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 4)
    subscription = await domain.subscribe(
        "user-a", SubscriptionSpec(run_id, StartPosition(StartKind.AFTER_SEQ, after_seq=2))
    )
    assert seqs(await subscription.step()) == [3, 4]
    # What was never delivered here cannot be acknowledged here.
    await subscription.acknowledge_from_stream([f"{run_id}-1"], [CumulativeAck(run_id, 2)])
    assert [o.name for o in outcomes(await subscription.step())] == ["UNKNOWN", "UNKNOWN"]


async def test_a_closed_subscription_delivers_nothing_more(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 1)
    subscription = await domain.subscribe("user-a", one_run(run_id))
    subscription.close()
    await domain.publish([new_event(run_id, 2)], NOW)
    with pytest.raises(Aborted):
        await subscription.step()


async def test_the_stream_is_woken_by_publishes_and_acks_not_by_a_timer(domain: EventsDomain) -> None:
    # The fake clock never moves and the heartbeat is 10 s away: only a wake-up
    # can produce the next output before the guard gives up.
    run_id = await publish_run(domain, 1)
    subscription = await domain.subscribe("user-a", one_run(run_id, max_in_flight=1))
    stream = subscription.stream()
    try:
        assert seqs(await anext(stream)) == [1]
        waiting = asyncio.ensure_future(anext(stream))
        await domain.publish([new_event(run_id, 2)], NOW)  # in flight is full: nothing to send yet
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await subscription.acknowledge_from_stream([f"{run_id}-1"], [])
        woken = await asyncio.wait_for(waiting, GUARD_SECONDS)
        assert [o.name for o in outcomes(woken)] == ["ACCEPTED"] and seqs(woken) == [2]
    finally:
        await stream.aclose()


async def test_shutdown_ends_every_stream_with_unavailable(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 1)
    subscriptions = [
        await domain.subscribe("user-a", one_run(run_id)),
        await domain.subscribe("user-b", SubscriptionSpec(None)),
    ]
    domain.end_subscriptions()
    for subscription in subscriptions:
        with pytest.raises(Unavailable) as ended:
            await subscription.step()
        assert ended.value.reason == "SHUTTING_DOWN"
