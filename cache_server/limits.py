"""Per-caller limits against abuse: blob size, batch size, calls in flight.

A hook (see cache_server.calls) after authentication: it reads the caller's
limits (cache_server.auth.Limits: server-wide flags, overridden per token) and
answers RESOURCE_EXHAUSTED, with a one-line reason, for a call over any of them.
Anonymous callers are counted per client address.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from slipstream.cache_server.auth import OPEN, Authenticator, Caller
from slipstream.cache_server.calls import HOLD_STREAM, Call, Hook
from slipstream.cache_server.resource_names import ResourceNameError, parse_write_name
from slipstream.cache_server.services.common import RpcError

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
BATCH_UPDATE = f"{_CAS}BatchUpdateBlobs"
BATCH_READ = f"{_CAS}BatchReadBlobs"
K = TypeVar("K")

BYTESTREAM_WRITE = "/google.bytestream.ByteStream/Write"
QUERY_WRITE_STATUS = "/google.bytestream.ByteStream/QueryWriteStatus"
# Calls that may take up an upload the caller left for a resume: admitted past the limit
# by as many uploads as the caller holds, then refused unless they name one of them.
_RESUMING = frozenset({BYTESTREAM_WRITE, QUERY_WRITE_STATUS})


def _who(caller: Caller) -> str:
    return f"caller {caller.name!r}" if caller.authenticated else "anonymous callers"


def _exhausted(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def _over(caller: Caller, in_flight: int, limit: int) -> RpcError:
    verb = "has" if caller.authenticated else "have"
    return _exhausted(
        f"{_who(caller)} {verb} {in_flight} calls in flight already; the limit is {limit}"
    )


def _take_one(counter: collections.Counter[K], name: K) -> None:
    """One fewer of name, which leaves the counter at zero."""
    counter[name] -= 1
    if counter[name] <= 0:
        del counter[name]


class LimitEnforcer(Hook):
    def __init__(self) -> None:
        self.in_flight: collections.Counter[str] = collections.Counter()
        # Uploads left for a resume (counted in in_flight too), by caller and by name.
        self.held: collections.Counter[str] = collections.Counter()
        self.held_names: collections.Counter[tuple[str, str]] = collections.Counter()

    def begin(self, call: Call) -> None:
        caller = call.caller if isinstance(call.caller, Caller) else OPEN
        limit = caller.limits.max_streams
        if limit is None:
            return  # nothing to count against
        key = Authenticator.limit_key(call)
        headroom = self.held[key] if call.method in _RESUMING else 0
        if self.in_flight[key] >= limit + headroom:
            raise _over(caller, self.in_flight[key], limit)
        if self.in_flight[key] >= limit:
            call.notes["limits.resume_only"] = limit  # checked on its first message
        self.in_flight[key] += 1
        call.notes["limits.key"] = key
        call.notes[HOLD_STREAM] = functools.partial(self._hold, key)

    def _hold(self, key: str, resource: str) -> Callable[[], None]:
        """Count one more stream for key until the returned release is called (once
        or more): an unfinished upload, named resource, kept after its call ended."""
        self.in_flight[key] += 1
        self.held[key] += 1
        self.held_names[key, resource] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                _take_one(self.in_flight, key)
                _take_one(self.held, key)
                _take_one(self.held_names, (key, resource))

        return release

    def end(self, call: Call) -> None:
        key = call.notes.pop("limits.key", None)
        if key is not None:
            _take_one(self.in_flight, key)

    def request(self, call: Call, message: Any) -> None:
        caller = call.caller if isinstance(call.caller, Caller) else OPEN
        limits = caller.limits
        resume_limit = call.notes.pop("limits.resume_only", None)
        if resume_limit is not None:  # admitted only to take up an upload it left
            key = call.notes["limits.key"]
            if not self.held_names[key, message.resource_name]:
                raise _over(caller, self.in_flight[key] - 1, resume_limit)
        # Sizes are summed only under a limit: it means a pass over every digest.
        if call.method == BATCH_UPDATE:
            if limits.max_blob_size is not None or limits.max_batch_size is not None:
                sizes = [r.digest.size_bytes for r in message.requests]
                self._blob_sizes(caller, sizes)
                self._batch(caller, sum(sizes), "BatchUpdateBlobs")
        elif call.method == BATCH_READ and limits.max_batch_size is not None:
            self._batch(caller, sum(d.size_bytes for d in message.digests), "BatchReadBlobs")
        elif call.method == BYTESTREAM_WRITE and limits.max_blob_size is not None:
            if message is not call.request:
                return  # only the first message names the blob
            try:
                name = parse_write_name(message.resource_name)
            except ResourceNameError:
                return  # the handler reports it
            self._blob_sizes(caller, [name.blob.size])

    @staticmethod
    def _blob_sizes(caller: Caller, sizes: list[int]) -> None:
        limit = caller.limits.max_blob_size
        if limit is None:
            return
        for size in sizes:
            if size > limit:
                raise _exhausted(
                    f"a blob of {size:,} bytes is over the {limit:,}-byte blob size limit "
                    f"of {_who(caller)}"
                )

    @staticmethod
    def _batch(caller: Caller, total: int, what: str) -> None:
        limit = caller.limits.max_batch_size
        if limit is not None and total > limit:
            raise _exhausted(
                f"{what} of {total:,} bytes is over the {limit:,}-byte batch limit of "
                f"{_who(caller)}; use ByteStream for more"
            )
