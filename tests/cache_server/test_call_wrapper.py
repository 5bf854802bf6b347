"""A failed or refused call leaves nothing of itself to the cycle collector.

Frames caught in a reference cycle keep what they hold (a ByteStream chunk, a whole
batch) alive until the collector next runs, and under a stream of failing uploads that
pinned hundreds of MiB (context.abort() made such a cycle with gRPC's call state, and the
wrapper's own copy of the exception another). Each case drives one wrapped handler to
its end with the collector off, then checks that what the handler held is gone already
and that the client gets the status.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from slipstream.cache_server.calls import Call, CallWrapper, Hook
from slipstream.cache_server.services.common import RpcError, grpc_errors

KINDS = ["unary_unary", "stream_unary", "unary_stream", "stream_stream"]


class _Held:
    """Stands for what a handler holds while it runs (weakly referenceable)."""


class _Context:
    """The little of grpc.aio's ServicerContext that the wrapper asks of it."""

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details


class _Refuse(Hook):
    def begin(self, call: Call) -> None:
        raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "not for you")


class _Servicer:
    """One failing handler of each kind, as the services write them (grpc_errors)."""

    def __init__(self, held: list[weakref.ref[_Held]]) -> None:
        self.held = held

    def _fail(self) -> None:
        thing = _Held()
        self.held.append(weakref.ref(thing))
        raise RpcError(grpc.StatusCode.NOT_FOUND, "not here")

    @grpc_errors
    async def unary(self, request: Any, context: Any) -> Any:
        self._fail()

    @grpc_errors
    async def streaming(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._fail()
        yield None


async def _requests() -> AsyncIterator[str]:
    yield "request"


def _drive(coroutine: Any) -> None:
    """Run a coroutine that never waits on I/O to its end (StopIteration or StopAsyncIteration)."""
    try:
        while True:
            coroutine.send(None)
    except (StopIteration, StopAsyncIteration):
        pass


def _call(kind: str, wrapper: CallWrapper, unary: Any, streaming: Any, context: Any) -> Any:
    """The first step of a wrapped call of this kind, as a coroutine."""
    if kind == "unary_unary":
        return wrapper._unary_unary(unary, "/s/M")("request", context)
    if kind == "stream_unary":
        return wrapper._stream_unary(unary, "/s/M")(_requests(), context)
    if kind == "unary_stream":
        return wrapper._unary_stream(streaming, "/s/M")("request", context).__anext__()
    return wrapper._stream_stream(streaming, "/s/M")(_requests(), context).__anext__()


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("collector_off")
@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_call_frees_what_it_held_and_sets_its_status(kind: str) -> None:
    held: list[weakref.ref[_Held]] = []
    servicer, context = _Servicer(held), _Context()
    wrapper = CallWrapper([Hook()], ("/",))
    _drive(_call(kind, wrapper, servicer.unary, servicer.streaming, context))
    assert held and held[0]() is None, "the failed call's frames are kept in a cycle"
    assert (context.code(), context.details()) == (grpc.StatusCode.NOT_FOUND, "not here")


@pytest.mark.usefixtures("collector_off")
@pytest.mark.parametrize("kind", KINDS)
def test_an_escaping_exception_does_not_keep_the_wrappers_frames(kind: str) -> None:
    """Exceptions the services do not map (none should) still pass through the wrapper
    without a cycle through its copy of them."""
    held: list[weakref.ref[_Held]] = []

    def fail() -> None:
        thing = _Held()
        held.append(weakref.ref(thing))
        raise ValueError("unmapped")

    async def unary(request: Any, context: Any) -> Any:
        fail()

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        fail()
        yield None

    with pytest.raises(ValueError):
        _drive(_call(kind, CallWrapper([Hook()], ("/",)), unary, streaming, _Context()))
    assert held and held[0]() is None, "the failed call's frames are kept in a cycle"


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_call_sets_its_status_and_never_runs_the_handler(kind: str) -> None:
    ran: list[str] = []

    async def unary(request: Any, context: Any) -> Any:
        ran.append("unary")

    async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
        ran.append("streaming")
        yield None

    context = _Context()
    _drive(_call(kind, CallWrapper([_Refuse()], ("/",)), unary, streaming, context))
    assert not ran
    assert (context.code(), context.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "not for you",
    )
