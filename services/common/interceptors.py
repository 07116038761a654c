"""The server interceptor stack, outermost first: tracing → access log → error
mapping → authentication (see `server.build_interceptors`).

Each of ours wraps the method's behaviour, for all four RPC kinds. grpc.aio
asks every interceptor for the handler on every call, so the wrapped handlers
are built once per method and reused (`WrappedHandlers`), and the four layers
run as one interceptor (`InterceptorStack`): a call pays for the layers'
own work, not for re-wrapping and a pipeline hop per layer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace

from services.common.auth import Principal, TokenVerifier
from services.common.db import DATABASE_UNAVAILABLE_ERRORS, database_unavailable
from services.common.errors import SwitchboardError, Unauthenticated, internal_status
from services.common.metrics import RpcServerMetrics
from services.common.tracing import ATTR_USER_ID, trace_id_hex

log = logging.getLogger("switchboard.rpc")

Behavior = Callable[..., Any]
# Methods of these services never need a token.
ALWAYS_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class AuthenticatedContext:
    """The servicer context of an authenticated call: the real context plus the
    verified principal, handed explicitly to the servicer method."""

    def __init__(self, inner: grpc.aio.ServicerContext[Any, Any], principal: Principal) -> None:
        self._inner = inner
        self.principal = principal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def principal_of(context: Any) -> Principal:
    if isinstance(context, AuthenticatedContext):
        return context.principal
    raise Unauthenticated("this method needs an access token", reason="TOKEN_MISSING")


def _wrap_handler(handler: Any, wrap: Callable[[Behavior, bool], Behavior]) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True), handler.request_deserializer, handler.response_serializer
    )


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """One layer: `wrap` gives a method's behaviour with this layer around it.
    Usable alone as an interceptor, or as a layer of an `InterceptorStack`."""

    _handlers: WrappedHandlers | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if self._handlers is None:
            self._handlers = WrappedHandlers((self,))
        return self._handlers.wrapped(handler_call_details.method, handler)

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        raise NotImplementedError


class WrappedHandlers:
    """Each method's handler with the layers (outermost first) around it, made
    on the method's first call and reused while the server hands out the same
    handler for it (it always does: handlers are registered once)."""

    def __init__(self, layers: Sequence[WrappingInterceptor]) -> None:
        self._innermost_first = tuple(reversed(layers))
        # method -> (the handler as registered, the handler wrapped)
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        known = self._by_method.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = handler
        for layer in self._innermost_first:
            wrapped = _wrap_handler(wrapped, _for_method(layer, method))
        self._by_method[method] = (handler, wrapped)
        return wrapped


def _for_method(layer: WrappingInterceptor, method: str) -> Callable[[Behavior, bool], Behavior]:
    return lambda behavior, streaming: layer.wrap(behavior, streaming, method)


class InterceptorStack(grpc.aio.ServerInterceptor):
    """Several layers as one interceptor, outermost first: the same behaviour
    as passing them to the server one by one, for one pipeline hop a call."""

    def __init__(self, layers: Sequence[WrappingInterceptor]) -> None:
        self.layers = tuple(layers)
        self._handlers = WrappedHandlers(self.layers)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._handlers.wrapped(handler_call_details.method, handler)


def _is_async_generator(behavior: Behavior, streaming: bool) -> bool:
    return streaming and inspect.isasyncgenfunction(behavior)


def _status_code(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _record_exception(span: trace.Span, exc: Exception) -> None:
    """As `trace.use_span` records an exception that leaves the span's scope
    (the final status is set from the call's code afterwards)."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class TracingInterceptor(WrappingInterceptor):
    """A SERVER span per RPC, child of the caller's W3C context (from metadata),
    with OpenTelemetry's `rpc.*` attributes, and the call's duration in the
    `rpc.server.call.duration` histogram (see services.common.metrics) by method
    and final code. Health checks and reflection are neither traced nor measured.

    Response streams make the span current only while the method computes each
    message, never across a `yield`: a context left attached across a yield
    cannot be detached when the client cancels mid-stream (the stock
    interceptor's "Failed to detach context" errors)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("switchboard.rpc", tracer_provider=tracer_provider)
        self._metrics = RpcServerMetrics(meter_provider)

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        if method.startswith(ALWAYS_PUBLIC_PREFIXES):
            return behavior
        service, _, name = method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        tracer = self._tracer
        series = self._metrics.series(method)

        def start(context: Any) -> trace.Span:
            carrier = {
                key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
            }
            return tracer.start_span(
                method.lstrip("/"),
                context=propagate.extract(carrier),
                kind=trace.SpanKind.SERVER,
                attributes=attributes,
            )

        def finish(span: trace.Span, context: Any, exc: BaseException | None, started: float) -> None:
            code = _status_code(context, exc)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.end()
            series.record(code, time.perf_counter() - started)

        if _is_async_generator(behavior, streaming):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                started = time.perf_counter()
                span, failure = start(context), None
                messages = behavior(request, context)
                try:
                    while True:
                        token = otel_context.attach(trace.set_span_in_context(span))
                        try:
                            item = await messages.__anext__()
                        except StopAsyncIteration:
                            break
                        finally:
                            otel_context.detach(token)
                        yield item
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    await messages.aclose()
                    finish(span, context, failure, started)

            return stream

        async def unary(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            span, failure = start(context), None
            # What `trace.use_span(span)` does, without its context manager's cost.
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                return await behavior(request, context)
            except BaseException as exc:
                failure = exc
                if isinstance(exc, Exception):
                    _record_exception(span, exc)
                raise
            finally:
                otel_context.detach(token)
                finish(span, context, failure, started)

        return unary


POLLED_METHODS = frozenset(
    {
        "/switchboard.auth.v1.AuthService/ListTokenRevocations",
        "/switchboard.auth.v1.AuthService/GetJwks",
    }
)


class AccessLogInterceptor(WrappingInterceptor):
    """One structured line per RPC: method, status code, duration."""

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        if method.startswith(ALWAYS_PUBLIC_PREFIXES):
            return behavior

        # Polled by every service every second or so: logged when they fail.
        quiet = method in POLLED_METHODS

        def finish(context: Any, started: float, failure: BaseException | None) -> None:
            code = _status_code(context, failure).name
            level = logging.DEBUG if quiet and code == "OK" else logging.INFO
            if not log.isEnabledFor(level):
                return
            log.log(
                level,
                "rpc",
                extra={
                    "rpc_method": method,
                    "code": code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )

        if _is_async_generator(behavior, streaming):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                started, failure = time.perf_counter(), None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    finish(context, started, failure)

            return stream

        async def unary(request: Any, context: Any) -> Any:
            started, failure = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                finish(context, started, failure)

        return unary


class ErrorMappingInterceptor(WrappingInterceptor):
    """The one place where errors become `google.rpc.Status`. Typed errors keep
    their code and details; a database that cannot be reached is UNAVAILABLE
    with a RetryInfo; anything else is INTERNAL with a generic message, and its
    detail goes to the log with the trace id."""

    @staticmethod
    async def _abort(context: Any, exc: Exception, method: str) -> None:
        if isinstance(exc, SwitchboardError):
            status = exc.to_grpc_status()
        elif isinstance(exc, DATABASE_UNAVAILABLE_ERRORS):
            log.warning("database unavailable", exc_info=exc, extra={"rpc_method": method})
            status = database_unavailable().to_grpc_status()
        else:
            log.error("unexpected error", exc_info=exc, extra={"rpc_method": method})
            status = internal_status(trace_id_hex())
        span = trace.get_current_span()
        span.set_status(trace.Status(trace.StatusCode.ERROR, status.details))
        await context.abort(status.code, status.details, status.trailing_metadata)

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        abort = self._abort
        if _is_async_generator(behavior, streaming):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in behavior(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped, never swallowed: see _abort
                    await abort(context, exc, method)

            return stream

        async def unary(request: Any, context: Any) -> Any:
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped, never swallowed: see _abort
                await abort(context, exc, method)

        return unary


class AuthenticationInterceptor(WrappingInterceptor):
    """Verifies the bearer token locally and hands the principal to the method."""

    def __init__(self, verifier: TokenVerifier, public_methods: frozenset[str]) -> None:
        self._verifier = verifier
        self._public = public_methods

    async def _authenticate(self, context: Any) -> AuthenticatedContext:
        principal = await self._verifier.verify_metadata(context.invocation_metadata())
        trace.get_current_span().set_attribute(ATTR_USER_ID, principal.user_id)
        return AuthenticatedContext(context, principal)

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        if method in self._public or method.startswith(ALWAYS_PUBLIC_PREFIXES):
            return behavior
        authenticate = self._authenticate
        if _is_async_generator(behavior, streaming):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                authenticated = await authenticate(context)
                async for item in behavior(request, authenticated):
                    yield item

            return stream

        async def unary(request: Any, context: Any) -> Any:
            return await behavior(request, await authenticate(context))

        return unary
