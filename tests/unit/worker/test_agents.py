"""The built-in agents, run through the SDK on a real in-process server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from jsonschema import Draft202012Validator
from switchboard.agent.v1 import agent_worker_pb2, agent_worker_pb2_grpc

from services.common.auth import Principal, Role
from services.common.errors import PermissionDenied
from services.common.interceptors import AuthenticatedContext
from services.worker.agents import ExpressionError, build_worker, evaluate, lookup, split_sentences
from services.worker.servicer import require_service

Update = agent_worker_pb2.ExecuteUpdate


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[Any]:
    worker = build_worker(heartbeat_interval=0.05)
    port = await worker.start(port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield agent_worker_pb2_grpc.AgentWorkerStub(channel)
    await channel.close(None)
    await worker.stop(grace=None)


def execute_request(agent: str, attempt: int = 1, **input: Any) -> agent_worker_pb2.ExecuteRequest:
    request = agent_worker_pb2.ExecuteRequest(
        agent=agent, context=agent_worker_pb2.ExecutionContext(run_id="run-1", attempt=attempt)
    )
    request.input.update(input)
    return request


async def run(stub: Any, agent: str, attempt: int = 1, **input: Any) -> list[Update]:
    updates = [u async for u in stub.Execute(execute_request(agent, attempt, **input), timeout=10)]
    return [u for u in updates if not u.HasField("heartbeat")]


def output(updates: list[Update]) -> dict[str, Any]:
    assert updates[-1].HasField("result"), updates[-1]
    return json_format.MessageToDict(updates[-1].result.output)


def reason(updates: list[Update]) -> str:
    assert updates[-1].HasField("error"), updates[-1]
    info = error_details_pb2.ErrorInfo()
    updates[-1].error.details[0].Unpack(info)
    return info.reason


def kinds(updates: list[Update]) -> list[str]:
    return [str(u.WhichOneof("update")) for u in updates]


async def test_text_stats_counts_through_its_tool(stub: Any) -> None:
    text = "The cat sat. The cat ran! Dogs bark?"
    updates = await run(stub, "text-stats", text=text, top=3)
    assert kinds(updates) == ["thinking", "tool_started", "tool_finished", "thinking", "result"]
    assert updates[1].tool_started.tool == "word_count"
    assert json_format.MessageToDict(updates[2].tool_finished.result) == {"words": 8}
    assert output(updates) == {
        "words": 8,
        "sentences": 3,
        "characters": len(text),
        "top_words": [
            {"word": "cat", "count": 2},
            {"word": "bark", "count": 1},
            {"word": "dogs", "count": 1},
        ],
    }


async def test_text_stats_refuses_empty_text(stub: Any) -> None:
    assert reason(await run(stub, "text-stats", text="   ")) == "INVALID_INPUT"


async def test_summarize_keeps_the_best_sentences_in_order(stub: Any) -> None:
    text = (
        "Solar power is growing fast. Solar panels are cheaper than ever, so solar power wins. "
        "My cat likes naps. Wind power also grows. Lunch was good."
    )
    updates = await run(stub, "summarize", text=text, max_sentences=2)
    assert kinds(updates) == ["thinking", "tool_started", "tool_finished", "thinking", "result"]
    assert updates[1].tool_started.tool == "split_sentences"
    assert output(updates) == {
        "summary": "Solar power is growing fast. Solar panels are cheaper than ever, so solar power wins.",
        "sentences": [
            "Solar power is growing fast.",
            "Solar panels are cheaper than ever, so solar power wins.",
        ],
        "indices": [0, 1],
        "sentence_count": 5,
    }


def test_sentences_split_at_terminators_and_blank_lines() -> None:
    text = 'He said "stop." Then left!\n\nNew paragraph without stop\nstill same? Yes.'
    assert split_sentences(text) == [
        'He said "stop."',
        "Then left!",
        "New paragraph without stop\nstill same?",
        "Yes.",
    ]


async def test_calculator_makes_one_tool_call_per_expression(stub: Any) -> None:
    expressions = ["1 + 2 * 3", "2 ** 10", "7 / 2", "sqrt(16) + abs(-2)", "(1 + 2) % 2"]
    updates = await run(stub, "calculator", expressions=expressions)
    assert kinds(updates) == ["thinking", *(["tool_started", "tool_finished"] * 5), "result"]
    result = output(updates)
    assert [r["value"] for r in result["results"]] == [7, 1024, 3.5, 6, 1]
    assert result["value"] == 1


async def test_calculator_refuses_anything_but_arithmetic(stub: Any) -> None:
    updates = await run(stub, "calculator", expression="__import__('os').system('true')")
    assert kinds(updates) == ["thinking", "tool_started", "tool_finished", "error"]
    assert updates[2].tool_finished.HasField("error")
    assert reason(updates) == "INVALID_EXPRESSION"


@pytest.mark.parametrize(
    "expression",
    [
        "1/0",
        "9 ** 99999",
        "x + 1",
        "(1).__class__",
        "[1, 2]",
        "1 +",
        "2 ** 4000 ** 2",
        "sqrt(-1)",
        "True + 1",
    ],
)
def test_unsafe_or_invalid_expressions_are_refused(expression: str) -> None:
    with pytest.raises(ExpressionError):
        evaluate(expression)


def test_arithmetic_is_exact_where_it_can_be() -> None:
    assert evaluate("10 // 3") == 3
    assert evaluate("-2 ** 2") == -4
    assert evaluate("round(pi, 2)") == 3.14
    assert evaluate("max(1, 5, 3) - min(4, 2)") == 3
    assert evaluate("2.5 * 2") == 5 and isinstance(evaluate("2.5 * 2"), int)


async def test_json_transform_selects_and_renames(stub: Any) -> None:
    data = [
        {"user": {"id": 1, "name": "ada"}, "tags": ["x", "y"]},
        {"user": {"id": 2}, "tags": []},
    ]
    mapping = {"id": "user.id", "name": "user.name", "first_tag": "tags.0"}
    result = output(await run(stub, "json-transform", data=data, mapping=mapping))
    assert result == {
        "result": [
            {"id": 1, "name": "ada", "first_tag": "x"},
            {"id": 2, "name": None, "first_tag": None},
        ]
    }
    dropped = output(await run(stub, "json-transform", data=data[1], mapping=mapping, drop_missing=True))
    assert dropped == {"result": {"id": 2}}


def test_lookup_follows_keys_and_indices() -> None:
    data = {"a": {"b": [{"c": 5}]}}
    assert lookup(data, "a.b.0.c") == 5
    assert lookup(data, "a.b.-1.c") == 5
    assert lookup(data, "a.b.1.c") is not None  # the missing marker, not a value
    assert lookup(data, "a.b.1.c") is lookup(data, "nope")


async def test_json_transform_refuses_a_bad_mapping(stub: Any) -> None:
    assert reason(await run(stub, "json-transform", data={}, mapping={"x": 3})) == "INVALID_INPUT"


async def test_chaos_fails_with_the_reason_it_is_given(stub: Any) -> None:
    updates = await run(stub, "chaos", action="fail", reason="UPSTREAM_DOWN", message="as asked")
    assert reason(updates) == "UPSTREAM_DOWN"
    assert updates[-1].error.message == "as asked"


async def test_chaos_fails_only_the_first_attempts_when_asked(stub: Any) -> None:
    assert reason(await run(stub, "chaos", attempt=1, fail_attempts=1)) == "CHAOS_FAILURE"
    assert output(await run(stub, "chaos", attempt=2, fail_attempts=1, echo="hi")) == {
        "ok": True,
        "attempt": 2,
        "echo": "hi",
    }


async def test_chaos_thinks_as_often_as_asked_then_succeeds(stub: Any) -> None:
    updates = await run(stub, "chaos", thoughts=3, sleep_seconds=0.01)
    assert kinds(updates) == ["thinking", "thinking", "thinking", "result"]


async def test_chaos_hang_keeps_heartbeating_until_cancelled(stub: Any) -> None:
    call = stub.Execute(execute_request("chaos", action="hang"), timeout=10)
    seen = [await call.read() for _ in range(4)]
    assert kinds(seen) == ["thinking", "heartbeat", "heartbeat", "heartbeat"]
    call.cancel()


async def test_chaos_stop_heartbeats_goes_silent(stub: Any) -> None:
    call = stub.Execute(execute_request("chaos", action="stop_heartbeats"), timeout=10)
    assert (await call.read()).HasField("thinking")
    with pytest.raises(TimeoutError):
        # Many heartbeat intervals pass without a single update.
        await asyncio.wait_for(call.read(), timeout=0.5)
    call.cancel()


def test_every_input_schema_is_a_json_schema_that_accepts_its_examples() -> None:
    worker = build_worker()
    examples = {
        "text-stats": {"text": "a b"},
        "summarize": {"text": "a. b.", "max_sentences": 1},
        "calculator": {"expression": "1+1"},
        "json-transform": {"data": {}, "mapping": {"a": "b"}},
        "chaos": {"action": "fail", "reason": "X_Y"},
    }
    assert set(worker.agents) == set(examples)
    for name, spec in worker.agents.items():
        Draft202012Validator.check_schema(dict(spec.input_schema))
        Draft202012Validator(dict(spec.input_schema)).validate(examples[name])
    refused = Draft202012Validator(dict(worker.agents["calculator"].input_schema))
    assert not refused.is_valid({})


async def test_only_services_may_execute() -> None:
    def context(role: Role) -> Any:
        principal = Principal("u1", "name", role, "jti", "sid", 0.0)
        return AuthenticatedContext(object(), principal)  # type: ignore[arg-type]

    await require_service(context(Role.SERVICE))
    for role in (Role.USER, Role.ADMIN):
        with pytest.raises(PermissionDenied):
            await require_service(context(role))
