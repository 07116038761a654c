"""The interceptor stack on a real in-process grpc.aio server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import OperationalError

from services.common.auth import TokenVerifier
from services.common.errors import FieldViolation, InvalidArgument, NotFound
from services.common.interceptors import (
    AccessLogInterceptor,
    AuthenticationInterceptor,
    ErrorMappingInterceptor,
    InterceptorStack,
    TracingInterceptor,
    WrappingInterceptor,
    principal_of,
)
from services.common.server import ServiceParts, build_interceptors
from tests.unit.common.keys import AUDIENCE, ISSUER, Keys, Revocations

SERVICE = "test.Demo"


async def fail(request: bytes, context: Any) -> bytes:
    raise InvalidArgument([FieldViolation("name", "is required")])


async def crash(request: bytes, context: Any) -> bytes:
    raise RuntimeError('File "/srv/app/storage.py", line 3: SELECT * FROM users WHERE password = ...')


async def who_am_i(request: bytes, context: Any) -> bytes:
    return principal_of(context).user_id.encode()


async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"one"
    yield b"two"
    raise NotFound("gone", reason="RUN_NOT_FOUND")


async def database_down(request: bytes, context: Any) -> bytes:
    raise OperationalError("SELECT secret FROM runs", {}, OSError("connection refused to 10.0.0.5:5432"))


async def public(request: bytes, context: Any) -> bytes:
    return b"hello"


def handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Crash": grpc.unary_unary_rpc_method_handler(crash),
            "DatabaseDown": grpc.unary_unary_rpc_method_handler(database_down),
            "WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Public": grpc.unary_unary_rpc_method_handler(public),
        },
    )


@pytest.fixture
async def server_and_keys() -> AsyncIterator[tuple[grpc.aio.Channel, Keys, str]]:
    keys = Keys()
    kid = keys.add()

    async def ready() -> bool:
        return True

    parts = ServiceParts(
        add_to_server=lambda server: [SERVICE],
        verifier=TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE),
        check_ready=ready,
        public_methods=frozenset({f"/{SERVICE}/Public"}),
    )
    server = grpc.aio.server(interceptors=build_interceptors(parts))
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel, keys, kid
    await channel.close(grace=None)
    await server.stop(None)


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_typed_error_becomes_status_with_details(server_and_keys: Any) -> None:
    channel, keys, kid = server_and_keys
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/Fail")(b"", metadata=auth(keys.sign(kid)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    kinds = {detail.type_url.rsplit(".", 1)[-1] for detail in status.details}
    assert {"ErrorInfo", "BadRequest"} <= kinds


async def test_unexpected_error_is_internal_without_leaking(server_and_keys: Any) -> None:
    channel, keys, kid = server_and_keys
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/Crash")(b"", metadata=auth(keys.sign(kid)))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert raised.value.details() == "internal error"
    trailers = str(raised.value.trailing_metadata())
    for leak in ("SELECT", "/srv/app", "Traceback", "storage.py"):
        assert leak not in trailers


async def test_an_unreachable_database_is_unavailable_with_a_retry_delay(server_and_keys: Any) -> None:
    channel, keys, kid = server_and_keys
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/DatabaseDown")(b"", metadata=auth(keys.sign(kid)))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    details = {detail.type_url.rsplit(".", 1)[-1]: detail for detail in status.details}
    info = error_details_pb2.ErrorInfo()
    details["ErrorInfo"].Unpack(info)
    assert info.reason == "DATABASE_UNAVAILABLE"
    assert "RetryInfo" in details
    trailers = str(raised.value.trailing_metadata()) + (raised.value.details() or "")
    for leak in ("SELECT", "10.0.0.5", "Traceback"):
        assert leak not in trailers


async def test_authentication_hands_the_principal_to_the_method(server_and_keys: Any) -> None:
    channel, keys, kid = server_and_keys
    answer = await channel.unary_unary(f"/{SERVICE}/WhoAmI")(b"", metadata=auth(keys.sign(kid, sub="user-7")))
    assert answer == b"user-7"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "TOKEN_MISSING"),
        ((("authorization", "Token abc"),), "TOKEN_MALFORMED"),
        (auth("x.y.z"), "TOKEN_INVALID"),
    ],
)
async def test_missing_or_bad_token_is_unauthenticated(
    server_and_keys: Any, metadata: Any, reason: str
) -> None:
    channel, _, _ = server_and_keys
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/WhoAmI")(b"", metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == reason


async def test_public_method_needs_no_token(server_and_keys: Any) -> None:
    channel, _, _ = server_and_keys
    assert await channel.unary_unary(f"/{SERVICE}/Public")(b"") == b"hello"


async def test_streaming_error_after_messages_keeps_its_code(server_and_keys: Any) -> None:
    channel, keys, kid = server_and_keys
    call = channel.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=auth(keys.sign(kid)))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for message in call:
            received.append(message)
    assert received == [b"one", b"two"]
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_tracing_interceptor_continues_the_callers_trace_and_records_codes() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    keys = Keys()
    kid = keys.add()
    verifier = TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE)
    server = grpc.aio.server(
        interceptors=[
            TracingInterceptor(provider),
            ErrorMappingInterceptor(),
            AuthenticationInterceptor(verifier, frozenset({f"/{SERVICE}/Public"})),
        ]
    )
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as typed_channel:
        channel: Any = typed_channel  # raw bytes in and out: no serializers
        assert await channel.unary_unary(f"/{SERVICE}/Public")(b"", metadata=parent) == b"hello"
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(f"/{SERVICE}/Fail")(b"", metadata=parent + auth(keys.sign(kid)))
        call = channel.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=parent + auth(keys.sign(kid)))
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass
    await server.stop(None)

    spans = {span.name: span for span in exporter.get_finished_spans()}
    for name, code in (("Public", 0), ("Fail", 3), ("Stream", 5)):
        span = spans[f"{SERVICE}/{name}"]
        assert format(span.context.trace_id, "032x") == trace_id
        assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
        assert span.attributes is not None
        assert span.attributes["rpc.grpc.status_code"] == code
        assert span.attributes["rpc.method"] == name


class Recording(WrappingInterceptor):
    """A layer that notes when it runs around a call, and when it wraps."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name = name
        self.seen = seen

    def wrap(self, behavior: Any, streaming: bool, method: str) -> Any:
        self.seen.append(f"wrap {self.name} {method}")

        async def unary(request: bytes, context: Any) -> bytes:
            self.seen.append(f"enter {self.name}")
            try:
                return bytes(await behavior(request, context))
            finally:
                self.seen.append(f"leave {self.name}")

        return unary


async def test_the_stack_runs_its_layers_outermost_first_and_wraps_each_method_once() -> None:
    seen: list[str] = []
    stack = InterceptorStack([Recording("outer", seen), Recording("inner", seen)])
    registered = grpc.unary_unary_rpc_method_handler(public)
    details: Any = type("Details", (), {"method": f"/{SERVICE}/Public", "invocation_metadata": ()})()

    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        return registered

    first: Any = await stack.intercept_service(continuation, details)
    assert await first.unary_unary(b"", None) == b"hello"
    assert seen == [
        f"wrap inner /{SERVICE}/Public",
        f"wrap outer /{SERVICE}/Public",
        "enter outer",
        "enter inner",
        "leave inner",
        "leave outer",
    ]
    seen.clear()
    # Later calls reuse the wrapped handler: nothing is wrapped again.
    assert await stack.intercept_service(continuation, details) is first
    assert seen == []
    # A handler the server did not hand out before is wrapped afresh.
    registered = grpc.unary_unary_rpc_method_handler(who_am_i)
    assert await stack.intercept_service(continuation, details) is not first
    assert seen == [f"wrap inner /{SERVICE}/Public", f"wrap outer /{SERVICE}/Public"]


async def test_the_server_stack_is_one_interceptor_of_the_four_layers_in_order() -> None:
    async def ready() -> bool:
        return True

    keys = Keys()
    parts = ServiceParts(
        add_to_server=lambda server: [SERVICE],
        verifier=TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE),
        check_ready=ready,
    )
    (stack,) = build_interceptors(parts)
    assert isinstance(stack, InterceptorStack)
    assert [type(layer) for layer in stack.layers] == [
        TracingInterceptor,
        AccessLogInterceptor,
        ErrorMappingInterceptor,
        AuthenticationInterceptor,
    ]
