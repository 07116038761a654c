"""Retention, on every backend: what goes (past the maximum age, whoever read
it; past the shorter age, once every durable consumer settled it), what stays
(the run, and anything a durable consumer still needs before the maximum age),
and how readers hear of it (OUT_OF_RANGE for a resume or a listing from
before the window, a reset marker for a subscription that was to deliver it)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest

from services.common.errors import FailedPrecondition, OutOfRange
from services.events.domain import (
    CumulativeAck,
    EventLog,
    EventsDomain,
    EventType,
    Output,
    ResumePoint,
    RetentionSettings,
    RunInfo,
    StartKind,
    StartPosition,
    StreamReset,
    SubscriptionSpec,
    retention_point,
)
from services.events.servicer import output_to_proto
from tests.unit.events.helpers import NOW, FakeClock, completions, delivered, new_event, seqs

HOUR = timedelta(hours=1)
FROM_BEGINNING = StartPosition(StartKind.FROM_BEGINNING)


@pytest.fixture
def retaining(log: EventLog, clock: FakeClock) -> EventsDomain:
    # Anything older than 2 hours goes; anything settled by every durable consumer, after 1 hour.
    return EventsDomain(log, clock=clock, retention=RetentionSettings(max_age=2 * 3600, settled_age=3600))


async def publish_aged(
    domain: EventsDomain, run_id: str, hours_old: list[float], user_id: str = "user-a"
) -> None:
    """Seq n of the run, published (and created) `hours_old[n-1]` hours before NOW."""
    for seq, age in enumerate(hours_old, start=1):
        await domain.publish([new_event(run_id, seq, user_id)], NOW - age * HOUR)


def resets(outputs: Sequence[Output]) -> list[tuple[str, int]]:
    return [(o.run_id, o.trimmed_through) for o in outputs if isinstance(o, StreamReset)]


def test_the_retention_point() -> None:
    run = RunInfo("r", "u", 1, last_seq=10, trimmed_through=2)
    assert retention_point(run, None, None, None) == 2  # both rules off: never back
    assert retention_point(run, 5, None, 0) == 5  # past the maximum age: read or not
    assert retention_point(run, None, 7, 4) == 4  # settled by everyone only through 4
    assert retention_point(run, None, 7, None) == 7  # no durable consumer holds anything back
    assert retention_point(run, 3, 7, 6) == 6
    assert retention_point(run, 12, None, None) == 10


async def test_past_the_maximum_age_events_go_even_unread(retaining: EventsDomain, log: EventLog) -> None:
    await publish_aged(retaining, "r1", [5, 4, 3, 1, 0])
    inbox = await retaining.subscribe("user-a", SubscriptionSpec("r1", consumer="inbox", max_in_flight=1))
    assert seqs(await inbox.step()) == [1]  # delivered, never acknowledged
    assert await retaining.trim(NOW) == {"r1": 3}
    assert [e.seq for e in await log.read("r1", 0, 10)] == [4, 5]
    run = (await log.runs(["r1"]))["r1"]
    assert (run.user_id, run.last_seq, run.trimmed_through) == ("user-a", 5, 3)  # the run stays
    assert await retaining.trim(NOW) == {}  # nothing more is due
    # A publish after the trim goes on from the last seq, never from a trimmed one.
    with pytest.raises(FailedPrecondition):
        await retaining.publish([new_event("r1", 2)], NOW)
    await retaining.publish([new_event("r1", 6)], NOW)


async def test_before_the_maximum_age_only_what_every_consumer_settled_goes(
    retaining: EventsDomain, log: EventLog
) -> None:
    await publish_aged(retaining, "r1", [1.5, 1.5, 1.5, 1.5, 0])
    inbox = await retaining.subscribe("user-a", SubscriptionSpec("r1", consumer="inbox"))
    audit = await retaining.subscribe("user-a", SubscriptionSpec("r1", consumer="audit"))
    await inbox.step()
    await audit.step()
    await inbox.acknowledge_from_stream([], [CumulativeAck("r1", 5)])
    await audit.acknowledge_from_stream([], [CumulativeAck("r1", 2)])
    await inbox.step()
    await audit.step()
    # audit settled 2 of them; seq 5 is younger than an hour whoever settled it.
    assert await retaining.trim(NOW) == {"r1": 2}
    await audit.acknowledge_from_stream([], [CumulativeAck("r1", 5)])
    await audit.step()
    assert await retaining.trim(NOW) == {"r1": 4}
    assert [e.seq for e in await log.read("r1", 0, 10)] == [5]


async def test_a_run_nobody_follows_is_trimmed_once_past_the_shorter_age(retaining: EventsDomain) -> None:
    await publish_aged(retaining, "r1", [1.5, 0.5])
    await publish_aged(retaining, "r2", [0.5])
    assert await retaining.trim(NOW) == {"r1": 1}


async def test_a_consumer_of_all_runs_holds_back_the_runs_it_has_not_read(retaining: EventsDomain) -> None:
    follower = await retaining.subscribe("user-a", SubscriptionSpec(None, consumer="everything"))
    follower.close()  # offline: runs that start now are still to be read by it, from seq 1
    await publish_aged(retaining, "r1", [1.5, 1.5])
    await publish_aged(retaining, "theirs", [1.5], user_id="user-b")
    assert await retaining.trim(NOW) == {"theirs": 1}  # user-b has no such consumer
    back = await retaining.subscribe("user-a", SubscriptionSpec(None, consumer="everything"))
    assert delivered(await back.step()) == [("r1", 1, 1), ("r1", 2, 1)]
    await back.acknowledge_from_stream([], [CumulativeAck("r1", 2)])
    await back.step()
    assert await retaining.trim(NOW) == {"r1": 2}
    # Past the maximum age, nothing holds a run back.
    await publish_aged(retaining, "r2", [3])
    assert await retaining.trim(NOW) == {"r2": 1}


async def test_a_resume_or_listing_from_before_the_window_is_out_of_range(
    retaining: EventsDomain,
) -> None:
    await publish_aged(retaining, "r1", [3, 3, 0])
    await retaining.trim(NOW)
    epoch = (await retaining.visible_run("user-a", "r1")).epoch
    before = StartPosition(StartKind.RESUME, resume=ResumePoint("r1", epoch, 1))
    with pytest.raises(OutOfRange) as resumed:
        await retaining.subscribe("user-a", SubscriptionSpec("r1", before))
    assert resumed.value.reason == "EVENTS_TRIMMED"
    assert resumed.value.metadata["trimmed_through"] == "2"
    with pytest.raises(OutOfRange) as listed:
        await retaining.list_events("user-a", "r1", 0, 10)
    assert listed.value.reason == "EVENTS_TRIMMED"
    # From the edge of the window on, both work.
    at_edge = StartPosition(StartKind.RESUME, resume=ResumePoint("r1", epoch, 2))
    assert seqs(await (await retaining.subscribe("user-a", SubscriptionSpec("r1", at_edge))).step()) == [3]
    page, _ = await retaining.list_events("user-a", "r1", 2, 10)
    assert [e.seq for e in page] == [3]


async def test_a_subscription_from_before_the_window_gets_a_reset_marker(retaining: EventsDomain) -> None:
    await publish_aged(retaining, "r1", [3, 3, 0])
    await retaining.publish([new_event("r1", 4)], NOW)
    await retaining.trim(NOW)
    subscription = await retaining.subscribe("user-a", SubscriptionSpec(None, FROM_BEGINNING))
    outputs = await subscription.step()
    assert resets(outputs) == [("r1", 2)]
    assert outputs.index(next(o for o in outputs if isinstance(o, StreamReset))) == 0  # before the events
    assert seqs(outputs) == [3, 4]


async def test_a_durable_consumer_behind_the_window_is_reset_and_moves_on(
    retaining: EventsDomain, log: EventLog
) -> None:
    await publish_aged(retaining, "r1", [3, 3, 3, 0])
    first = await retaining.subscribe("user-a", SubscriptionSpec("r1", consumer="inbox", max_in_flight=1))
    assert seqs(await first.step()) == [1]
    first.close()  # offline, 1 unacknowledged, 2 and 3 never delivered
    await retaining.trim(NOW)
    second = await retaining.subscribe("user-a", SubscriptionSpec("r1", consumer="inbox"))
    outputs = await second.step()
    assert resets(outputs) == [("r1", 3)]
    assert delivered(outputs) == [("r1", 4, 1)]
    state = (await log.load_consumer("user-a", "inbox", ["r1"]))["r1"]
    assert state.position.acked_through == 3


async def test_a_live_subscription_hears_of_a_trim_that_overtook_it(retaining: EventsDomain) -> None:
    await publish_aged(retaining, "r1", [3, 3, 3, 3, 0], user_id="user-a")
    await retaining.publish([new_event("r1", 6, type=EventType.RUN_COMPLETED)], NOW)
    subscription = await retaining.subscribe(
        "user-a", SubscriptionSpec("r1", FROM_BEGINNING, max_in_flight=2)
    )
    assert seqs(await subscription.step()) == [1, 2]
    await subscription.acknowledge_from_stream([], [CumulativeAck("r1", 2)])
    await retaining.trim(NOW)  # 1-4 go while 3 and 4 were still to come
    outputs = await subscription.step()
    assert resets(outputs) == [("r1", 4)]
    assert seqs(outputs) == [5, 6]
    await subscription.acknowledge_from_stream([], [CumulativeAck("r1", 6)])
    assert completions(await subscription.step()) == [("r1", 6)]


def test_a_reset_reaches_the_client_as_a_stream_reset() -> None:
    response = output_to_proto(StreamReset("r1", 1234, 7))
    assert response.WhichOneof("response") == "reset"
    position = response.reset.position
    assert (position.run_id, position.epoch, position.last_seq, response.reset.reason) == (
        "r1",
        1234,
        7,
        "EVENTS_TRIMMED",
    )
