"""One trace per run: the background execution continues the StartRun span's
trace, and every event carries the context of the span that produced it."""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from services.common.tracing import context_from_carrier
from services.executor.domain import EventType
from services.executor.runs import StartRunCommand
from tests.unit.executor.conftest import ALICE, RigFactory


def span_context_of(carrier: dict[str, str]) -> trace.SpanContext:
    return trace.get_current_span(context_from_carrier(carrier)).get_span_context()


async def test_the_run_continues_the_trace_of_its_start_run_span(make_rig: RigFactory) -> None:
    rig = await make_rig()
    with rig.tracer.start_as_current_span("StartRun", kind=trace.SpanKind.SERVER) as server_span:
        run = await rig.runs.start_run(ALICE, StartRunCommand(agent="echo", input={"text": "x"}))
    start_span = server_span.get_span_context()
    await rig.runs.wait_run(ALICE, run.run_id, 20)
    events = await rig.published(run.run_id, 7)

    assert run.trace_id == format(start_span.trace_id, "032x")
    # WaitRun wakes on the terminal state; the run's task ends its span right after.
    for _ in range(500):
        if any(s.name == "executor.run" for s in rig.exporter.get_finished_spans()):
            break
        await asyncio.sleep(0.01)
    spans = {
        s.name: s for s in rig.exporter.get_finished_spans() if s.context.trace_id == start_span.trace_id
    }
    run_span, attempt_span = spans["executor.run"], spans["executor.attempt"]
    assert run_span.parent is not None and run_span.parent.span_id == start_span.span_id
    assert attempt_span.parent is not None and attempt_span.parent.span_id == run_span.context.span_id
    for span in (run_span, attempt_span):
        assert span.attributes is not None
        assert span.attributes["switchboard.run_id"] == run.run_id
        assert span.attributes["switchboard.agent"] == "echo"
        assert span.attributes["switchboard.user_id"] == ALICE.user_id

    produced_by = {e.type: span_context_of(dict(e.trace_carrier)) for e in events}
    assert {c.trace_id for c in produced_by.values()} == {start_span.trace_id}
    assert produced_by[EventType.RUN_QUEUED].span_id == start_span.span_id
    assert produced_by[EventType.AGENT_STARTED].span_id == attempt_span.context.span_id
    assert produced_by[EventType.RUN_COMPLETED].span_id == attempt_span.context.span_id
    assert "executor.outbox.publish" in spans


async def test_a_cancel_is_recorded_in_the_runs_trace_linked_to_the_caller(make_rig: RigFactory) -> None:
    rig = await make_rig()
    with rig.tracer.start_as_current_span("StartRun") as server_span:
        run = await rig.runs.start_run(ALICE, StartRunCommand(agent="slow", input={}))
    with rig.tracer.start_as_current_span("CancelRun") as cancel_call:
        cancelled = await rig.runs.cancel_run(ALICE, run.run_id, "")
    events = await rig.published(run.run_id, cancelled.last_seq)

    (cancel_span,) = [s for s in rig.exporter.get_finished_spans() if s.name == "executor.cancel"]
    assert cancel_span.context.trace_id == server_span.get_span_context().trace_id
    assert [link.context.span_id for link in cancel_span.links] == [cancel_call.get_span_context().span_id]
    assert events[-1].type is EventType.RUN_COMPLETED
    last = span_context_of(dict(events[-1].trace_carrier))
    assert last.span_id == cancel_span.context.span_id
