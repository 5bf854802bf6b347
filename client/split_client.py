"""Client of the split service, and the local split used when it cannot be reached.

``SplitUnavailable`` (no connection within the connect timeout, UNAVAILABLE,
DEADLINE_EXCEEDED, or a server without the service) means: fall back, print one
warning line, carry on. ``SplitRefused`` (the server answered no: runners that
collected different tests, bad input) is an error the caller reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from slipstream.client.cas_client import ServerUnavailable, connect_ready
from slipstream.protos import split_pb2
from slipstream.protos import split_pb2_grpc as split_grpc
from slipstream.splitter.algorithm import Granularity
from slipstream.splitter.history import Estimates, Sample
from slipstream.splitter.pinning import fallback_shard

DEFAULT_CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 60.0
RETRIES = 3  # for queue calls in the middle of a run: a blip is not a reason to fall back
RETRY_PAUSE = 0.5
_FALLBACK_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,  # a server without the split service
)
T = TypeVar("T")


class SplitUnavailable(Exception):
    """The split service cannot be reached: use the fallback."""


class SplitRefused(Exception):
    """The split service answered with an error; the message is one line."""


def _one_line(exc: grpc.RpcError) -> str:
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    return " ".join(details.split())[:500]


@dataclass(frozen=True, slots=True)
class RunSpec:
    """A runner's run and what it collected: what GetShard and JoinQueue both send."""

    suite: str
    run_key: str
    index: int
    total: int
    tests: Sequence[str]
    granularity: Granularity = "auto"
    groups: Mapping[str, str] = field(default_factory=dict)

    def to_proto(self) -> split_pb2.RunSpec:
        return split_pb2.RunSpec(
            suite=self.suite,
            run_key=self.run_key,
            total=self.total,
            index=self.index,
            test_ids=self.tests,
            granularity=self.granularity,
            groups=dict(self.groups),
        )


@dataclass(frozen=True, slots=True)
class ShardAnswer:
    tests: list[str]
    plan_hash: str
    predicted: float | None = None
    makespan: float | None = None
    from_history: bool = False
    fallback: str | None = None  # why the local split was used


@dataclass(frozen=True, slots=True)
class QueueInfo:
    plan_hash: str
    batches: int
    tests: int


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    lease_id: str  # "" when there is nothing to run now
    tests: list[str] = field(default_factory=list)
    predicted: float = 0.0
    finished: bool = False
    retry_after: float = 0.0
    abandoned: list[str] = field(default_factory=list)


class SplitClient:
    """Calls to one server; open() fails fast (connect timeout) when it is not there."""

    def __init__(
        self,
        address: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._channel: grpc.Channel | None = None
        self._stub: split_grpc.SplitStub | None = None

    def open(self) -> SplitClient:
        try:
            channel = connect_ready(self.address, self.connect_timeout)
        except ServerUnavailable as exc:
            raise SplitUnavailable(str(exc)) from None
        self._channel = channel
        self._stub = split_grpc.SplitStub(channel)
        return self

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self) -> SplitClient:
        return self.open() if self._channel is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stub(self) -> split_grpc.SplitStub:
        if self._stub is None:
            self.open()
        assert self._stub is not None
        return self._stub

    def _call(self, what: str, fn: Callable[[], T], *, retries: int = 1) -> T:
        for attempt in range(retries):
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code not in _FALLBACK_CODES:
                    raise SplitRefused(f"{what}: {_one_line(exc)}") from None
                if attempt + 1 == retries:
                    raise SplitUnavailable(
                        f"{what}: server at {self.address} unavailable ({_one_line(exc)})"
                    ) from None
                time.sleep(RETRY_PAUSE * (attempt + 1))
        raise AssertionError("unreachable")

    def upload_timings(
        self,
        suite: str,
        run_id: str | None,
        reports: Sequence[bytes] = (),
        timings: Mapping[str, Sample] | None = None,
    ) -> tuple[int, int]:
        """Stream JUnit reports and/or parsed timings; (reports, tests) stored."""

        def requests() -> Iterator[split_pb2.UploadTimingsRequest]:
            yield split_pb2.UploadTimingsRequest(
                suite=suite,
                run_id=run_id or "",
                timings=[
                    split_pb2.TestTiming(test_id=t, seconds=s.seconds, failed=s.failed)
                    for t, s in sorted((timings or {}).items())
                ],
            )
            for report in reports:
                yield split_pb2.UploadTimingsRequest(junit_xml=report)

        reply = self._call(
            "upload timings",
            lambda: self.stub.UploadTimings(requests(), timeout=self.call_timeout),
        )
        return reply.reports, reply.tests

    def get_shard(self, run: RunSpec) -> ShardAnswer:
        request = split_pb2.GetShardRequest(run=run.to_proto())
        reply = self._call(
            "get shard", lambda: self.stub.GetShard(request, timeout=self.call_timeout)
        )
        return ShardAnswer(
            list(reply.test_ids),
            reply.plan_hash,
            reply.predicted_seconds,
            reply.makespan,
            reply.from_history,
        )

    def join_queue(self, run: RunSpec) -> QueueInfo:
        request = split_pb2.JoinQueueRequest(run=run.to_proto())
        reply = self._call(
            "join queue", lambda: self.stub.JoinQueue(request, timeout=self.call_timeout)
        )
        return QueueInfo(reply.plan_hash, reply.batches, reply.tests)

    def lease(
        self, suite: str, run_key: str, runner: str, lease_seconds: float = 0.0
    ) -> LeaseAnswer:
        request = split_pb2.LeaseRequest(
            suite=suite, run_key=run_key, runner=runner, lease_seconds=lease_seconds
        )
        reply = self._call(
            "lease",
            lambda: self.stub.Lease(request, timeout=self.call_timeout),
            retries=RETRIES,
        )
        return LeaseAnswer(
            reply.lease_id,
            list(reply.test_ids),
            reply.predicted_seconds,
            reply.finished,
            reply.retry_after,
            list(reply.abandoned),
        )

    def complete(
        self,
        suite: str,
        run_key: str,
        lease_id: str,
        runner: str,
        results: Mapping[str, Sample],
    ) -> tuple[int, int]:
        """Report finished tests of a lease; (completed, remaining) in the run."""
        request = split_pb2.CompleteRequest(
            suite=suite,
            run_key=run_key,
            lease_id=lease_id,
            runner=runner,
            results=[
                split_pb2.TestTiming(test_id=t, seconds=s.seconds, failed=s.failed)
                for t, s in sorted(results.items())
            ],
        )
        reply = self._call(
            "complete",
            lambda: self.stub.Complete(request, timeout=self.call_timeout),
            retries=RETRIES,
        )
        return reply.completed, reply.remaining

    def status(self, suite: str, run_key: str, owner: str = "") -> split_pb2.QueueStatusResponse:
        """The queue of a run of owner (a token name; "": the caller's own)."""
        request = split_pb2.QueueStatusRequest(suite=suite, run_key=run_key, owner=owner)
        return self._call(
            "queue status", lambda: self.stub.QueueStatus(request, timeout=self.call_timeout)
        )


def shard_or_fallback(
    client: SplitClient,
    run: RunSpec,
    *,
    local_estimates: Callable[[], Estimates | None] = lambda: None,
) -> ShardAnswer:
    """The server's shard; when it cannot be reached, the local split (see fallback_shard).

    Raises SplitRefused when the server says no (e.g. runners collected different tests).
    """
    try:
        with client:
            return client.get_shard(run)
    except SplitUnavailable as exc:
        return local_shard(run, str(exc), local_estimates)


def local_shard(
    run: RunSpec,
    why: str,
    local_estimates: Callable[[], Estimates | None] = lambda: None,
) -> ShardAnswer:
    """The fallback shard, saying why and how it was split."""
    estimates = local_estimates()
    mine, digest = fallback_shard(
        run.tests,
        run.index,
        run.total,
        estimates=estimates,
        granularity=run.granularity,
        groups=run.groups,
    )
    how = "the timings given" if estimates and estimates.from_history else "a hash of test ids"
    return ShardAnswer(mine, digest, fallback=f"{why}; split locally by {how}")
