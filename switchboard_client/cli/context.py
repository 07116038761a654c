"""What every command gets: the parsed arguments, output, channels and the session."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from switchboard.auth.v1 import auth_service_pb2_grpc
from switchboard.events.v1 import events_service_pb2_grpc
from switchboard.executor.v1 import executor_service_pb2_grpc
from switchboard.registry.v1 import registry_service_pb2_grpc

from switchboard_client.cli.credentials import CredentialStore, Metadata, Session
from switchboard_client.cli.errors import UsageError, describe_rpc_error
from switchboard_client.cli.output import Output
from switchboard_client.cli.settings import Endpoints

MessageT = TypeVar("MessageT", bound=Message)
STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "auth": auth_service_pb2_grpc.AuthServiceStub,
    "registry": registry_service_pb2_grpc.RegistryServiceStub,
    "executor": executor_service_pb2_grpc.ExecutorServiceStub,
    "events": events_service_pb2_grpc.EventsServiceStub,
}
# A restarted service is found again in about a second rather than after
# gRPC's default reconnect backoff (up to two minutes).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class Context:
    def __init__(self, args: argparse.Namespace, endpoints: Endpoints, store: CredentialStore) -> None:
        self.args = args
        self.endpoints = endpoints
        self.store = store
        self.out = Output(json_mode=bool(args.json))
        # Deadline of each unary call.
        self.timeout: float = args.timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._session: Session | None = None
        # Said on Ctrl-C: what goes on without the CLI (a run being followed).
        self.interrupt_note = ""

    def stub(self, service: str) -> Any:
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel(
                self.endpoints.of(service), options=CHANNEL_OPTIONS
            )
        return STUBS[service](self._channels[service])

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = Session(self.store, self.stub("auth"), self.timeout)
        return self._session

    async def call(self, service: str, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """A unary call with the session's token; an RPC error becomes a readable CliError."""
        rpc = getattr(self.stub(service), method)

        def invoke(metadata: Metadata) -> Awaitable[Any]:
            return rpc(request, metadata=metadata, timeout=timeout or self.timeout)  # type: ignore[no-any-return]

        try:
            return await self.session.call(invoke)
        except grpc.aio.AioRpcError as error:
            raise describe_rpc_error(error, service) from None

    async def call_anonymous(self, service: str, method: str, request: Any) -> Any:
        """A call that needs no token (Login)."""
        try:
            return await getattr(self.stub(service), method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise describe_rpc_error(error, service, login_hint=False) from None

    async def show_list(
        self,
        service: str,
        method: str,
        request: Any,
        field: str,
        headers: Sequence[str],
        row: Callable[[Any], Sequence[str]],
    ) -> int:
        """A List call shown as a table (or its response as JSON): one page,
        or every page with `--all`."""
        response = await self.call(service, method, request)
        items = list(getattr(response, field))
        while self.args.all and response.next_page_token:
            request.page_token = response.next_page_token
            response = await self.call(service, method, request)
            items.extend(getattr(response, field))
        if self.out.json_mode:
            merged = type(response)(next_page_token=response.next_page_token)
            getattr(merged, field).extend(items)
            self.out.message(merged)
            return 0
        self.out.table(headers, [row(item) for item in items])
        if response.next_page_token:
            self.out.note(f"more: --page-token {response.next_page_token} (or --all)")
        return 0

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)


def json_value(text: str, what: str) -> Any:
    """A JSON argument: inline, `@path` for a file, or `-` for stdin."""
    try:
        if text == "-":
            text = sys.stdin.read()
        elif text.startswith("@"):
            text = Path(text[1:]).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{what}: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None


def json_object(text: str, what: str) -> struct_pb2.Struct:
    value = json_value(text, what)
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, not {type(value).__name__}")
    result = struct_pb2.Struct()
    result.update(value)
    return result


def json_message(text: str, what: str, message: MessageT) -> MessageT:
    """A protobuf message from its JSON mapping (camelCase or proto field names)."""
    value = json_value(text, what)
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        raise UsageError(f"{what}: {exc}") from None
    return message


def key_values(pairs: list[str] | None, what: str) -> dict[str, str]:
    """`KEY=VALUE` arguments (repeatable) as a dict."""
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} takes KEY=VALUE, not {pair!r}")
        result[key] = value
    return result


# What a google.protobuf.Duration can hold (10,000 years).
MAX_DURATION_SECONDS = 315_576_000_000


def seconds_argument(text: str) -> float:
    """An argparse type for a duration in seconds: any finite number a Duration can hold.
    Whether it is a sensible value (not negative, within a field's limits) the server says."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or abs(value) > MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(f"not a usable number of seconds: {text!r}")
    return value


def finite_float(text: str) -> float:
    """An argparse type for a finite number (NaN and infinity are not settings)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value
