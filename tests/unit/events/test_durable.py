"""Durable consumers: positions that survive reconnects and restarts, takeover,
acks without a stream, resume points, and delivery status."""

from __future__ import annotations

import pytest

from services.common.errors import Aborted, NotFound, OutOfRange
from services.events.domain import (
    CumulativeAck,
    DeliverySettings,
    EventLog,
    EventsDomain,
    ResumePoint,
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


def durable(run_id: str | None, consumer: str = "inbox", **fields: object) -> SubscriptionSpec:
    return SubscriptionSpec(run_id, consumer=consumer, **fields)  # type: ignore[arg-type]


async def test_a_reconnect_sends_nothing_acknowledged_and_skips_nothing_unacknowledged(
    domain: EventsDomain,
) -> None:
    run_id = await publish_run(domain, 4)
    first = await domain.subscribe("user-a", durable(run_id))
    assert seqs(await first.step()) == [1, 2, 3, 4]  # a new consumer starts at the beginning
    await first.acknowledge_from_stream([f"{run_id}-1", f"{run_id}-3"], [])
    await first.step()
    first.close()
    await domain.publish([new_event(run_id, 5)], NOW)

    second = await domain.subscribe("user-a", durable(run_id))
    assert delivered(await second.step()) == [(run_id, 2, 2), (run_id, 4, 2), (run_id, 5, 1)]


async def test_positions_survive_a_restart(log: EventLog, clock: FakeClock) -> None:
    before = EventsDomain(log, DeliverySettings(), clock)
    run_id = await publish_run(before, 3)
    subscription = await before.subscribe("user-a", durable(None))
    await subscription.step()
    await subscription.acknowledge_from_stream([], [CumulativeAck(run_id, 2)])
    await subscription.step()
    # The process dies without closing anything.

    after = EventsDomain(log, DeliverySettings(), clock)
    resumed = await after.subscribe("user-a", durable(None))
    assert delivered(await resumed.step()) == [(run_id, 3, 2)]


async def test_the_newer_connection_takes_over_a_durable_consumer(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 2)
    older = await domain.subscribe("user-a", durable(run_id))
    assert seqs(await older.step()) == [1, 2]
    newer = await domain.subscribe("user-a", durable(run_id))
    with pytest.raises(Aborted) as raised:
        await older.step()
    assert raised.value.reason == "CONSUMER_TAKEN_OVER"
    assert delivered(await newer.step()) == [(run_id, 1, 2), (run_id, 2, 2)]
    # The older one closing late does not unregister the newer one.
    older.close()
    report = await domain.acknowledge("user-a", "inbox", [f"{run_id}-1"], [])
    assert [r.outcome.name for r in report.results] == ["ACCEPTED"]
    assert newer.in_flight == 1


async def test_consumers_are_scoped_to_their_user(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 2)
    mine = await domain.subscribe("user-a", durable(run_id))
    await mine.step()
    # user-b names the same consumer and user-a's events: nothing of user-a's moves.
    report = await domain.acknowledge(
        "user-b", "inbox", [f"{run_id}-1", f"{run_id}-2"], [CumulativeAck(run_id, 2)]
    )
    assert [r.outcome.name for r in report.results] == ["UNKNOWN"] * 3
    assert mine.in_flight == 2
    with pytest.raises(NotFound):
        await domain.subscribe("user-b", durable(run_id))


async def test_acknowledge_without_a_stream(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 4)
    subscription = await domain.subscribe("user-a", durable(run_id, max_in_flight=3))
    await subscription.step()
    subscription.close()
    report = await domain.acknowledge(
        "user-a",
        "inbox",
        [f"{run_id}-1", f"{run_id}-1", f"{run_id}-4", "missing"],
        [CumulativeAck(run_id, 3)],
    )
    assert [r.outcome.name for r in report.results] == ["ACCEPTED", "STALE", "UNKNOWN", "UNKNOWN", "ACCEPTED"]
    again = await domain.acknowledge("user-a", "inbox", [], [CumulativeAck(run_id, 3)])
    assert [r.outcome.name for r in again.results] == ["STALE"]
    unknown_consumer = await domain.acknowledge("user-a", "elsewhere", [f"{run_id}-2"], [])
    assert [r.outcome.name for r in unknown_consumer.results] == ["UNKNOWN"]

    resumed = await domain.subscribe("user-a", durable(run_id))
    assert delivered(await resumed.step()) == [(run_id, 4, 1)]


async def test_acknowledge_reaches_a_live_stream(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 3)
    subscription = await domain.subscribe("user-a", durable(run_id, max_in_flight=1))
    assert seqs(await subscription.step()) == [1]
    report = await domain.acknowledge("user-a", "inbox", [f"{run_id}-1"], [])
    assert [r.outcome.name for r in report.results] == ["ACCEPTED"]
    assert seqs(await subscription.step()) == [2]


async def test_an_earlier_connections_delivery_can_be_acknowledged_before_redelivery(
    domain: EventsDomain,
) -> None:
    run_id = await publish_run(domain, 2)
    first = await domain.subscribe("user-a", durable(run_id))
    await first.step()
    first.close()
    second = await domain.subscribe("user-a", durable(run_id, max_in_flight=1))
    assert delivered(await second.step()) == [(run_id, 1, 2)]
    # Seq 2 was delivered by the first connection and is not in flight here yet.
    await second.acknowledge_from_stream([f"{run_id}-2", f"{run_id}-2"], [])
    answer = await second.step()
    assert [o.name for o in outcomes(answer)] == ["ACCEPTED", "STALE"]
    assert delivered(answer) == []


async def test_attempts_count_across_connections_until_dead_lettered(domain: EventsDomain) -> None:
    # max_delivery_attempts is 3 in these tests.
    run_id = await publish_run(domain, 1, completed=True)
    attempts = []
    for _ in range(3):
        subscription = await domain.subscribe("user-a", durable(run_id))
        attempts += delivered(await subscription.step())
        subscription.close()
    assert sorted(attempts) == [(run_id, seq, attempt) for seq in (1, 2) for attempt in (1, 2, 3)]
    last = await domain.subscribe("user-a", durable(run_id))
    final = await last.step()
    assert dead_letters(final) == [(1, 3), (2, 3)]
    assert completions(final) == [(run_id, 2)]  # the dead letter settles the run's end too


async def test_durable_new_only_is_remembered(domain: EventsDomain) -> None:
    old = await publish_run(domain, 2)
    first = await domain.subscribe("user-a", durable(None, start=StartPosition(StartKind.NEW_ONLY)))
    assert await first.step() == []
    first.close()
    fresh = await publish_run(domain, 1)
    second = await domain.subscribe("user-a", durable(None))
    assert delivered(await second.step()) == [(fresh, 1, 1)]
    assert old not in {run for run, _, _ in delivered(await second.step())}


async def test_resume_checks_the_epoch_and_the_seq(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 3)
    epoch = int(NOW.timestamp() * 1000)

    def resume(epoch: int, last_acked_seq: int) -> StartPosition:
        return StartPosition(StartKind.RESUME, resume=ResumePoint(run_id, epoch, last_acked_seq))

    with pytest.raises(OutOfRange) as wrong_epoch:
        await domain.subscribe("user-a", SubscriptionSpec(run_id, resume(epoch + 1, 1)))
    assert wrong_epoch.value.reason == "EPOCH_MISMATCH"
    with pytest.raises(OutOfRange) as beyond:
        await domain.subscribe("user-a", SubscriptionSpec(run_id, resume(epoch, 9)))
    assert beyond.value.reason == "SEQ_BEYOND_STREAM"
    with pytest.raises(NotFound):
        await domain.subscribe("user-b", SubscriptionSpec(run_id, resume(epoch, 1)))

    ephemeral = await domain.subscribe("user-a", SubscriptionSpec(run_id, resume(epoch, 1)))
    assert seqs(await ephemeral.step()) == [2, 3]


async def test_a_durable_resume_moves_the_consumer_forward_never_back(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 4)
    epoch = int(NOW.timestamp() * 1000)
    first = await domain.subscribe("user-a", durable(run_id))
    await first.step()
    await first.acknowledge_from_stream([], [CumulativeAck(run_id, 1)])
    await first.step()
    first.close()
    ahead = StartPosition(StartKind.RESUME, resume=ResumePoint(run_id, epoch, 3))
    resumed = await domain.subscribe("user-a", durable(run_id, start=ahead))
    assert delivered(await resumed.step()) == [(run_id, 4, 2)]
    resumed.close()
    behind = StartPosition(StartKind.RESUME, resume=ResumePoint(run_id, epoch, 0))
    again = await domain.subscribe("user-a", durable(run_id, start=behind))
    assert seqs(await again.step()) == [4]


async def test_delivery_status_per_consumer(domain: EventsDomain, clock: FakeClock) -> None:
    run_id = await publish_run(domain, 4)
    inbox = await domain.subscribe("user-a", durable(run_id, max_in_flight=3, ack_deadline=1))
    await inbox.step()
    await inbox.acknowledge_from_stream([f"{run_id}-1", f"{run_id}-3"], [])
    assert seqs(await inbox.step()) == [4]
    await inbox.acknowledge_from_stream([f"{run_id}-4"], [])
    for _ in range(3):
        clock.advance(1)
        await inbox.step()  # seq 2 redelivered twice, then dead-lettered
    audit = await domain.subscribe("user-a", durable(run_id, consumer="audit"))
    await audit.step()
    await domain.subscribe("user-a", SubscriptionSpec(run_id))  # ephemeral: not listed

    run, statuses = await domain.delivery_status("user-a", run_id)
    assert run.last_seq == 4
    table = {
        s.consumer: (s.delivered, s.acknowledged, s.pending, s.dead_lettered, s.last_acked_seq)
        for s in statuses
    }
    assert table == {"audit": (4, 0, 4, 0, 0), "inbox": (4, 3, 0, 1, 4)}
    with pytest.raises(NotFound):
        await domain.delivery_status("user-b", run_id)


async def test_list_events_pages_by_seq_for_the_owner_only(domain: EventsDomain) -> None:
    run_id = await publish_run(domain, 5)
    page, more = await domain.list_events("user-a", run_id, 0, 2)
    assert ([e.seq for e in page], more) == ([1, 2], True)
    page, more = await domain.list_events("user-a", run_id, 4, 2)
    assert ([e.seq for e in page], more) == ([5], False)
    with pytest.raises(NotFound):
        await domain.list_events("user-b", run_id, 0, 10)
