"""One hierarchy of typed errors, mapped to `google.rpc.Status` in one place.

Domain and servicer code raise these; the error-mapping interceptor turns them
into a status with an `ErrorInfo` (always), `BadRequest` field violations (bad
input) and `RetryInfo` (where retrying helps). Nothing else reaches a client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "switchboard.dev"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class SwitchboardError(Exception):
    """Base of every error a client may see. `message` must be safe to show."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)
        )
        packed = [info]
        if self.retry_after is not None:
            retry = any_pb2.Any()
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(1, int(self.retry_after * 1000)))
            retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            packed.append(retry)
        return packed

    def to_status_proto(self) -> status_pb2.Status:
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=self.details())

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())


class InvalidArgument(SwitchboardError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Iterable[FieldViolation],
        *,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or f"invalid request: {summary}", reason=reason)

    def details(self) -> list[any_pb2.Any]:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
        )
        return [*super().details(), bad_request]


class Unauthenticated(SwitchboardError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(SwitchboardError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(SwitchboardError):
    """Also the answer for another user's resource: never reveal that it exists."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(SwitchboardError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(SwitchboardError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(SwitchboardError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class OutOfRange(SwitchboardError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class ResourceExhausted(SwitchboardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(SwitchboardError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(SwitchboardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(SwitchboardError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


class Internal(SwitchboardError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


def internal_status(trace_id: str | None) -> grpc.Status:
    """The only thing a client learns of an unexpected failure."""
    metadata = {"trace_id": trace_id} if trace_id else {}
    return Internal("internal error", metadata=metadata).to_grpc_status()


def status_from_code(code: int, message: str, reason: str) -> status_pb2.Status:
    """A `google.rpc.Status` for embedding in messages (run and step errors)."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    return status_pb2.Status(code=code, message=message, details=[info])


OK_CODE = code_pb2.OK


class Violations:
    """Collects every problem of a request, so one answer names them all."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def check(self, condition: bool, field: str, description: str) -> None:
        if not condition:
            self.add(field, description)

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidArgument(self._items)
