"""Publishing rules: per-run order, gaps, duplicates, conflicts, owners, atomic batches."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from services.events.domain import EventLog, EventsDomain, EventType, plan_append
from tests.unit.events.helpers import NOW, new_event, run_events


async def test_a_run_starts_at_seq_1_and_grows_one_by_one(domain: EventsDomain, log: EventLog) -> None:
    results = await domain.publish(run_events("r1", 3), NOW)
    assert [(r.seq, r.duplicate) for r in results] == [(1, False), (2, False), (3, False)]
    await domain.publish([new_event("r1", 4)], NOW)
    assert [e.seq for e in await log.read("r1", 0, 10)] == [1, 2, 3, 4]
    run = (await log.runs(["r1"]))["r1"]
    assert (run.user_id, run.last_seq, run.completed_seq) == ("user-a", 4, None)


async def test_the_first_event_of_a_run_must_be_seq_1(domain: EventsDomain, log: EventLog) -> None:
    with pytest.raises(FailedPrecondition) as raised:
        await domain.publish([new_event("r1", 2)], NOW)
    assert raised.value.reason == "SEQUENCE_GAP"
    assert raised.value.metadata["run_id"] == "r1"
    assert raised.value.metadata["expected_seq"] == "1"
    assert await log.runs(["r1"]) == {}


async def test_a_gap_is_refused_naming_the_run_and_the_expected_seq(
    domain: EventsDomain, log: EventLog
) -> None:
    await domain.publish(run_events("r1", 2), NOW)
    with pytest.raises(FailedPrecondition) as raised:
        await domain.publish([new_event("r1", 5)], NOW)
    assert raised.value.reason == "SEQUENCE_GAP"
    assert raised.value.metadata == {"run_id": "r1", "expected_seq": "3", "seq": "5", "index": "0"}
    assert "r1" in raised.value.message and "3" in raised.value.message
    assert (await log.runs(["r1"]))["r1"].last_seq == 2


async def test_a_repeat_returns_the_original_position(domain: EventsDomain, log: EventLog) -> None:
    await domain.publish(run_events("r1", 3), NOW)
    again = await domain.publish([new_event("r1", 2), new_event("r1", 4)], NOW)
    assert [(r.event_id, r.seq, r.duplicate) for r in again] == [("r1-2", 2, True), ("r1-4", 4, False)]
    assert len(await log.read("r1", 0, 10)) == 4


async def test_a_repeat_within_one_batch_is_a_duplicate(domain: EventsDomain) -> None:
    event = new_event("r1", 1)
    results = await domain.publish([event, event], NOW)
    assert [(r.seq, r.duplicate) for r in results] == [(1, False), (1, True)]


async def test_the_same_event_id_with_other_content_is_a_conflict(
    domain: EventsDomain, log: EventLog
) -> None:
    await domain.publish(run_events("r1", 2), NOW)
    changed = dataclasses.replace(new_event("r1", 2), payload={"n": "different"})
    with pytest.raises(AlreadyExists) as raised:
        await domain.publish([changed], NOW)
    assert raised.value.reason == "EVENT_ID_CONFLICT"
    assert (await log.events_by_id(["r1-2"]))["r1-2"].payload == {"n": 2}


async def test_the_same_seq_with_another_event_id_is_refused(domain: EventsDomain) -> None:
    await domain.publish(run_events("r1", 2), NOW)
    with pytest.raises(FailedPrecondition) as raised:
        await domain.publish([new_event("r1", 2, event_id="someone-else")], NOW)
    assert raised.value.reason == "SEQUENCE_TAKEN"


async def test_a_batch_is_stored_whole_or_not_at_all(domain: EventsDomain, log: EventLog) -> None:
    await domain.publish(run_events("r1", 1), NOW)
    batch = [new_event("r2", 1), new_event("r1", 2), new_event("r1", 4)]
    with pytest.raises(FailedPrecondition):
        await domain.publish(batch, NOW)
    assert await log.runs(["r2"]) == {}
    assert [e.seq for e in await log.read("r1", 0, 10)] == [1]


async def test_the_first_event_fixes_the_owner(domain: EventsDomain, log: EventLog) -> None:
    await domain.publish(run_events("r1", 1, user_id="user-a"), NOW)
    with pytest.raises(InvalidArgument) as raised:
        await domain.publish([new_event("r1", 2, user_id="user-b")], NOW)
    assert raised.value.reason == "RUN_OWNER_MISMATCH"
    assert [v.field for v in raised.value.violations] == ["events[0].user_id"]
    assert (await log.runs(["r1"]))["r1"].user_id == "user-a"


async def test_each_run_gets_an_epoch_stamped_on_its_events(domain: EventsDomain, log: EventLog) -> None:
    await domain.publish(run_events("r1", 2), NOW)
    run = (await log.runs(["r1"]))["r1"]
    assert run.epoch == int(NOW.timestamp() * 1000)
    assert {e.epoch for e in await log.read("r1", 0, 10)} == {run.epoch}


async def test_run_completed_ends_the_stream(domain: EventsDomain, log: EventLog) -> None:
    await domain.publish(run_events("r1", 2, completed=True), NOW)
    assert (await log.runs(["r1"]))["r1"].completed_seq == 3
    with pytest.raises(FailedPrecondition) as raised:
        await domain.publish([new_event("r1", 4)], NOW)
    assert raised.value.reason == "RUN_ALREADY_COMPLETED"


async def test_stored_events_keep_what_the_producer_said(domain: EventsDomain, log: EventLog) -> None:
    event = new_event(
        "r1",
        1,
        type=EventType.TOOL_EXECUTING,
        step_id="s1",
        agent="text-stats",
        payload={"tool": "count", "args": {"n": 2, "list": [1, "x"]}},
        create_time=NOW,
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        tracestate="k=v",
    )
    await domain.publish([event], NOW)
    stored = (await log.read("r1", 0, 1))[0]
    assert (stored.type, stored.step_id, stored.agent, stored.payload) == (
        EventType.TOOL_EXECUTING,
        "s1",
        "text-stats",
        {"tool": "count", "args": {"n": 2, "list": [1, "x"]}},
    )
    assert (stored.create_time, stored.traceparent, stored.tracestate) == (NOW, event.traceparent, "k=v")
    # Publishing it again, unchanged, is a repeat: the content hash survived storage.
    assert (await domain.publish([event], NOW))[0].duplicate


def test_plan_append_decides_without_storage() -> None:
    plan = plan_append(run_events("r1", 2), {}, {}, NOW)
    assert plan.previous_last_seq == {"r1": None}
    assert plan.runs["r1"].last_seq == 2
    assert [e.seq for e in plan.events] == [1, 2]
