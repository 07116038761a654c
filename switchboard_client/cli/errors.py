"""Exit codes, the CLI's own error, and gRPC errors as a person can read them."""

from __future__ import annotations

import enum
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class ExitCode(enum.IntEnum):
    """What the process exit status means; documented in `switchboard --help`."""

    OK = 0
    # An RPC failed, the server is unreachable, not logged in, an unreadable file.
    ERROR = 1
    # Bad arguments (argparse uses 2 as well).
    USAGE = 2
    # Run outcomes of `run start --follow` and `runs wait`.
    RUN_FAILED = 3
    RUN_CANCELLED = 4
    RUN_TIMED_OUT = 5
    # `runs wait --timeout` passed before the run ended.
    STILL_RUNNING = 6
    INTERRUPTED = 130


class CliError(Exception):
    """A failure to report in one line (plus details) and exit with `code`; never a traceback."""

    def __init__(
        self,
        message: str,
        code: ExitCode = ExitCode.ERROR,
        details: list[str] | None = None,
        *,
        status: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details or []
        # The server's google.rpc.Status (JSON mapping), for --json.
        self.status = status

    def document(self) -> dict[str, Any]:
        """The error for programs (--json): on stderr, like the human one."""
        error: dict[str, Any] = {"message": self.message, "exitCode": int(self.code)}
        if self.status is not None:
            error["status"] = self.status
        return {"error": error}


class UsageError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.USAGE)


def rpc_status_of(error: grpc.RpcError) -> status_pb2.Status | None:
    """The `google.rpc.Status` a Switchboard service attaches to every error, if any."""
    try:
        return rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # trailers that disagree with the call's status: show the call's
        return None


def error_reason(error: grpc.RpcError) -> str:
    """The `ErrorInfo` reason of an RPC error ("" if it has none)."""
    status = rpc_status_of(error)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def describe_rpc_error(error: grpc.RpcError, service: str = "", *, login_hint: bool = True) -> CliError:
    """An RPC error as a headline (code and message) and a line per google.rpc detail."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message = error.details() or code.name.lower().replace("_", " ")  # type: ignore[attr-defined]
    where = f" ({service})" if service else ""
    lines: list[str] = []
    status = rpc_status_of(error)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(info):
            lines.append(f"reason: {info.reason}")
            lines.extend(f"  {key}: {value}" for key, value in sorted(info.metadata.items()))
        elif detail.Unpack(bad_request):
            lines.extend(f"field {v.field}: {v.description}" for v in bad_request.field_violations)
        elif detail.Unpack(retry):
            lines.append(f"retry after {retry.retry_delay.ToMilliseconds() / 1000:g}s")
        elif detail.Unpack(failure):
            lines.extend(f"precondition {v.type} {v.subject}: {v.description}" for v in failure.violations)
        else:
            lines.append(f"{detail.TypeName()}: {json_format.MessageToJson(detail, indent=None)}")
    if code == grpc.StatusCode.UNAVAILABLE and not lines:
        lines.append("is the service running, and is the address right? (see `switchboard --help`)")
    if code == grpc.StatusCode.UNAUTHENTICATED and login_hint:
        lines.append("log in again with `switchboard login`")
    document: dict[str, Any] = {"code": code.name, "message": error.details() or ""}  # type: ignore[attr-defined]
    if status is not None:
        document["details"] = [_detail_dict(detail) for detail in status.details]
    return CliError(f"{code.name}{where}: {message}", ExitCode.ERROR, lines, status=document)


def _detail_dict(detail: any_pb2.Any) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json_format.MessageToDict(detail)
    except (json_format.Error, TypeError):  # a detail type this client does not know
        value = {"@type": detail.type_url}
    return value
