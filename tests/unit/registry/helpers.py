"""Request builders and error inspection for registry tests."""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2, struct_pb2
from switchboard.registry.v1 import agent_pb2

from services.common.errors import InvalidArgument


def seconds(value: float) -> duration_pb2.Duration:
    result = duration_pb2.Duration()
    result.FromNanoseconds(int(value * 1e9))
    return result


def schema(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


def agent(name: str = "text-stats", **fields: Any) -> agent_pb2.Agent:
    values: dict[str, Any] = {"endpoint": "127.0.0.1:50055", "description": "counts words"}
    values.update(fields)
    return agent_pb2.Agent(name=name, **values)


def violated_fields(error: InvalidArgument) -> set[str]:
    return {violation.field for violation in error.violations}
