"""Conversions between protobuf well-known types and plain Python values."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return result


def from_timestamp(value: timestamp_pb2.Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def duration(seconds: float) -> duration_pb2.Duration:
    result = duration_pb2.Duration()
    result.FromNanoseconds(int(seconds * 1e9))
    return result


def seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    if value:
        result.update(value)
    return result


def from_struct(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def utcnow() -> datetime:
    return datetime.now(UTC)
