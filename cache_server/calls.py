"""One request pipeline around every call, gRPC and HTTP alike, with pluggable hooks.

Authentication, per-caller limits, metrics, the audit log and the request-id of
structured logs are all cross-cutting: none of them belongs in a handler, nor in
a protocol's front end. Each is a `Hook`, and one list of hooks (one instance of
each, so one limiter per caller whatever the protocol) runs around every call.
`CallWrapper` (a grpc.aio interceptor) replaces the behavior and the
(de)serializers of every gRPC handler it covers with wrappers that run the hooks;
the HTTP endpoint (cache_server.http_endpoint) runs the same hooks through
`CallRun` around each request:

    begin(call)            before the handler; raise RpcError to refuse the call
    request(call, msg)     for each request message (streamed ones too)
    response(call, msg)    for each response message
    end(call)              after the call, with call.code set; for every hook, even
                           when an earlier hook's begin refused the call

The wrapper sets the context variable `CURRENT` inside the wrapped behavior (with
grpc.aio a context variable set in `intercept_service` does not reliably reach
the handler), so handlers and log records can see who is calling.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from slipstream.cache_server.services.common import (
    MalformedRequest,
    MethodWrapper,
    RpcError,
    end_with_status,
)

log = logging.getLogger("cache_server.access")

# The key, in a call's notes, of a function a hook may leave there (the limits hook
# does): it counts the call's caller as holding one more stream until the release it
# returns is called. ByteStream keeps an unfinished upload under one, so uploads left
# for a resume count against the caller's --max-streams.
HOLD_STREAM = "hold_stream"

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID = 64


@dataclass
class Call:
    """One call as the hooks see it: a gRPC call, or an HTTP request (context None)."""

    method: str  # "/package.Service/Method"; HTTP: "/http.ROUTE/VERB"
    context: grpc.aio.ServicerContext[Any, Any] | None
    request_id: str
    headers: Sequence[tuple[str, str | bytes]] = ()  # the call's metadata, read once
    protocol: str = "grpc"  # or "http"
    remote: str = ""  # HTTP: the client's address (gRPC asks its context)
    label: str = ""  # how messages name the call; the method's name if empty
    started: float = field(default_factory=time.monotonic)
    caller: Any = None  # set by the auth hook (cache_server.auth.Caller)
    request: Any = None  # the unary request, or the first streamed one
    response: Any = None  # the unary response, or the first streamed one
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    notes: dict[str, Any] = field(default_factory=dict)  # per-hook scratch space

    @property
    def service(self) -> str:
        return self.method.rsplit("/", 2)[-2] if self.method.count("/") >= 2 else ""

    @property
    def method_name(self) -> str:
        return self.method.rsplit("/", 1)[-1]

    @property
    def what(self) -> str:
        """The call as a message names it: "UpdateActionResult", "PUT on ccache"."""
        return self.label or self.method_name

    @property
    def peer(self) -> str:
        """The client's address: "ipv4:10.0.0.7:51234" over gRPC, "10.0.0.7" over HTTP."""
        if self.context is not None:
            return self.context.peer() or ""
        return self.remote

    def client_cert_name(self) -> str | None:
        """The common name of the client's TLS certificate, if it sent one (gRPC)."""
        if self.context is None:
            return None
        try:
            names = self.context.auth_context().get("x509_common_name")
        except Exception:
            return None
        name = next(iter(names or ()), None)
        if name is None:
            return None
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)

    def metadata(self, key: str) -> str | None:
        for k, v in self.headers:
            if k == key and isinstance(v, str):
                return v
        return None


CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "slipstream_call", default=None
)


def current_call() -> Call | None:
    return CURRENT.get()


class Hook:
    """Base class: every method is optional."""

    def begin(self, call: Call) -> None:
        """Called before the handler; raise RpcError to refuse the call."""

    def request(self, call: Call, message: Any) -> None:
        """Called for each request message; raise RpcError to refuse it."""

    def response(self, call: Call, message: Any) -> None:
        """Called for each response message."""

    def end(self, call: Call) -> None:
        """Called once the call is over, even if a begin refused it; call.code is its status."""

    def received(self, method: str, size: int) -> None:
        """Bytes of one request message as received on the wire."""

    def sent(self, method: str, size: int) -> None:
        """Bytes of one response message as sent on the wire."""


def request_id(headers: Sequence[tuple[str, str | bytes]]) -> str:
    """The client's x-request-id, cleaned, or a new one."""
    for k, v in headers:
        if k == REQUEST_ID_HEADER and isinstance(v, str):
            cleaned = "".join(ch for ch in v if ch.isalnum() or ch in "-_.:")
            if cleaned:
                return cleaned[:_MAX_REQUEST_ID]
    return f"{random.getrandbits(64):016x}"  # unique enough to find a call's log lines


def _final_code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> Any:
    if exc is None:  # a handler that failed sets its status and returns
        return context.code() or grpc.StatusCode.OK, context.details() or ""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "cancelled"
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN, context.details() or ""
    return grpc.StatusCode.UNKNOWN, type(exc).__name__


class CallRun:
    """The hooks of one call, run in order."""

    def __init__(self, hooks: Sequence[Hook], call: Call) -> None:
        self.hooks = hooks
        self.call = call
        self.ended = False

    def begin(self) -> None:
        for hook in self.hooks:
            hook.begin(self.call)

    def request(self, message: Any) -> None:
        if isinstance(message, MalformedRequest):
            return  # the handler answers INVALID_ARGUMENT for it
        if self.call.request is None:
            self.call.request = message
        for hook in self.hooks:
            hook.request(self.call, message)

    def response(self, message: Any) -> None:
        if message is None:
            return  # a handler that wrote its responses with context.write
        if self.call.response is None:
            self.call.response = message
        for hook in self.hooks:
            hook.response(self.call, message)

    def admit(self, *request: Any) -> bool:
        """Run the hooks' begin (and request, given a unary request); False, with the
        call ended and its status set, if one refuses it."""
        try:
            self.begin()
            for message in request:
                self.request(message)
        except RpcError as err:
            self.end(err)
            assert self.call.context is not None
            end_with_status(self.call.context, err.code, err.message)
            return False
        return True

    def end(self, exc: BaseException | None) -> None:
        if isinstance(exc, RpcError):
            self.end_with(exc.code, exc.message)
        else:
            assert self.call.context is not None  # HTTP calls end with end_with
            self.end_with(*_final_code(self.call.context, exc))

    def end_with(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with this status: every hook's end runs, once."""
        if self.ended:
            return
        self.ended = True
        call = self.call
        call.code, call.details = code, details
        for hook in reversed(self.hooks):
            try:
                hook.end(call)
            except Exception:
                logging.getLogger("cache_server").exception("hook %r failed", hook)


class CallWrapper(MethodWrapper):
    """Run `hooks` around every handler whose method starts with one of `prefixes`."""

    def __init__(self, hooks: Sequence[Hook], method_prefixes: tuple[str, ...]) -> None:
        super().__init__(method_prefixes)
        self.hooks = list(hooks)

    def wrap(self, handler: Any, method: str) -> Any:
        fields: dict[str, Any] = {}
        if handler.request_deserializer is not None:
            fields["request_deserializer"] = self._counting_in(handler.request_deserializer, method)
        if handler.response_serializer is not None:
            fields["response_serializer"] = self._counting_out(handler.response_serializer, method)
        if handler.unary_unary is not None:
            fields["unary_unary"] = self._unary_unary(handler.unary_unary, method)
        elif handler.unary_stream is not None:
            fields["unary_stream"] = self._unary_stream(handler.unary_stream, method)
        elif handler.stream_unary is not None:
            fields["stream_unary"] = self._stream_unary(handler.stream_unary, method)
        elif handler.stream_stream is not None:
            fields["stream_stream"] = self._stream_stream(handler.stream_stream, method)
        return handler._replace(**fields)

    # ---- bytes on the wire ----
    def _counting_in(self, decode: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
        hooks = self.hooks

        def counted(raw: bytes) -> Any:
            for hook in hooks:
                hook.received(method, len(raw))
            return decode(raw)

        return counted

    def _counting_out(self, encode: Callable[[Any], bytes], method: str) -> Callable[[Any], bytes]:
        hooks = self.hooks

        def counted(message: Any) -> bytes:
            raw = encode(message)
            for hook in hooks:
                hook.sent(method, len(raw))
            return raw

        return counted

    # ---- behaviors ----
    def _start(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, request: Any = None
    ) -> CallRun:
        headers = tuple(context.invocation_metadata() or ())  # a tuple already: no copy
        call = Call(method, context, request_id(headers), headers)
        if not isinstance(request, MalformedRequest):
            call.request = request  # seen by end() even when begin() refuses the call
        CURRENT.set(call)
        return CallRun(self.hooks, call)

    def _requests(self, run: CallRun, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for message in requests:
                run.request(message)
                yield message

        return checked()

    def _unary_unary(self, behavior: Any, method: str) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            run = self._start(context, method, request)
            exc: BaseException | None = None
            try:
                if not run.admit(request):
                    return None
                response = await behavior(request, context)
                run.response(response)
                return response
            except BaseException as err:
                exc = err
                raise
            finally:
                run.end(exc)
                exc = None  # it holds this frame through its traceback: no cycle

        return wrapped

    def _stream_unary(self, behavior: Any, method: str) -> Any:
        async def wrapped(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            run = self._start(context, method)
            exc: BaseException | None = None
            try:
                if not run.admit():
                    return None
                response = await behavior(self._requests(run, requests), context)
                run.response(response)
                return response
            except BaseException as err:
                exc = err
                raise
            finally:
                run.end(exc)
                exc = None  # it holds this frame through its traceback: no cycle

        return wrapped

    def _unary_stream(self, behavior: Any, method: str) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            # Streams with context.write and returns None: wrapped like a unary call,
            # never left unwrapped (that would skip authentication).
            return self._unary_unary(behavior, method)

        async def wrapped(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            run = self._start(context, method, request)
            exc: BaseException | None = None
            try:
                if not run.admit(request):
                    return
                async for response in behavior(request, context):
                    run.response(response)
                    yield response
            except BaseException as err:
                exc = err
                raise
            finally:
                run.end(exc)
                exc = None  # it holds this frame through its traceback: no cycle

        return wrapped

    def _stream_stream(self, behavior: Any, method: str) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            return self._stream_unary(behavior, method)

        async def wrapped(
            requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            run = self._start(context, method)
            exc: BaseException | None = None
            try:
                if not run.admit():
                    return
                async for response in behavior(self._requests(run, requests), context):
                    run.response(response)
                    yield response
            except BaseException as err:
                exc = err
                raise
            finally:
                run.end(exc)
                exc = None  # it holds this frame through its traceback: no cycle

        return wrapped


class AccessLog(Hook):
    """One INFO line per call on the `cache_server.access` logger."""

    def end(self, call: Call) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        if call.protocol == "http":
            status = call.notes.get("http.status", 0)
            log.info(
                "HTTP %s %s %d %.1fms",
                call.method_name,
                call.notes.get("http.path", "-"),
                status,
                (time.monotonic() - call.started) * 1000,
                extra={"http_status": status, "duration_ms": _ms(call), "details": call.details},
            )
            return
        log.info(
            "%s %s %.1fms",
            call.method,
            call.code.name,
            (time.monotonic() - call.started) * 1000,
            extra={"grpc_code": call.code.name, "duration_ms": _ms(call), "details": call.details},
        )


def _ms(call: Call) -> float:
    return round((time.monotonic() - call.started) * 1000, 3)
