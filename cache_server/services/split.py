"""The split service: timings upload, pinned shards, and the queue of a run.

I/O around the pure logic of ``splitter.pinning`` and ``splitter.queue``. All state
is in the store's records (plans in "splitplans", queues in "splitqueue", timings in
"timings"), every record created once with ``overwrite=False``: concurrent callers
and other replicas sharing the store agree, whoever loses a create race reads the
winner's record. Records never change once written, so decoded ones are cached.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from slipstream.cache_server import auth
from slipstream.cache_server.services.common import Backend, RpcError, grpc_errors
from slipstream.cache_server.storage.base import Store
from slipstream.protos import split_pb2
from slipstream.protos import split_pb2_grpc as split_grpc
from slipstream.splitter import history, junit
from slipstream.splitter.algorithm import Granularity, build_units
from slipstream.splitter.history import HistoryError, Run, Sample
from slipstream.splitter.ids import JUnitCase
from slipstream.splitter.pinning import (
    PLAN_NAMESPACE,
    PinError,
    PinnedPlan,
    check_request,
    ids_digest,
    make_plan,
    mismatch,
    plan_key,
    run_slug,
)
from slipstream.splitter.queue import (
    QUEUE_NAMESPACE,
    Completion,
    Decision,
    Finished,
    Grant,
    QueuePlan,
    Wait,
    abandoned_tests,
    completed_results,
    counts,
    lease_seconds,
    make_queue,
    next_lease,
    parse_lease_id,
)
from slipstream.splitter.queue import (
    Lease as LeaseRecord,
)

_SERVICE = "/slipstream.split.v1.Split/"
# Plans, leases and completions only steer which runner runs what; like CAS
# uploads they are open to any CI job that may write to the cache.
for _method, _scope in (
    ("UploadTimings", auth.CAS_WRITE),
    ("GetShard", auth.CAS_WRITE),
    ("JoinQueue", auth.CAS_WRITE),
    ("Lease", auth.CAS_WRITE),
    ("Complete", auth.CAS_WRITE),
    ("QueueStatus", auth.READ),
):
    auth.register_method(_SERVICE + _method, _scope)

_CACHE_LIMIT = 200_000
_CREATE_RETRIES = 50
_MAX_RUNNER_CHARS = 200
R = TypeVar("R")


def _invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _checked(fn: Callable[[], R]) -> R:
    """fn(), with bad names (suite, run key, total, ...) as INVALID_ARGUMENT."""
    try:
        return fn()
    except (PinError, HistoryError) as exc:
        raise _invalid(str(exc)) from None


def _check_suite(suite: str) -> None:
    _checked(lambda: history.check_suite(suite))


class SplitService(split_grpc.SplitServicer):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._cache: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> Store:
        return self.backend.store

    # ---- records (blocking; called in worker threads) ----
    def _read(self, namespace: str, key: str, decode: Callable[[bytes], R]) -> R | None:
        """A decoded record (cached: records never change), or None."""
        name = f"{namespace}/{key}"
        with self._lock:
            hit = self._cache.get(name)
        if hit is not None:
            return hit  # type: ignore[return-value]
        data = self.store.get_record(namespace, key)
        if data is None:
            return None
        try:
            value = decode(data)
        except ValueError as exc:
            raise RpcError(grpc.StatusCode.DATA_LOSS, f"record {key}: {exc}") from None
        self._remember(name, value)
        return value

    def _remember(self, name: str, value: object) -> None:
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[name] = value

    def _pin(
        self, namespace: str, key: str, make: Callable[[], R], decode: Callable[[bytes], R]
    ) -> tuple[R, bool]:
        """The record under key, created from make() if absent; True if this call made it."""
        found = self._read(namespace, key, decode)
        if found is not None:
            return found, False
        value = make()
        if self.store.put_record(namespace, key, value.to_bytes(), overwrite=False):  # type: ignore[attr-defined]
            self._remember(f"{namespace}/{key}", value)
            return value, True
        found = self._read(namespace, key, decode)  # lost the race: the winner's
        if found is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"record {key} vanished; retry")
        return found, False

    # ---- timings ----
    @grpc_errors
    async def UploadTimings(
        self,
        request_iterator: AsyncIterator[split_pb2.UploadTimingsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> split_pb2.UploadTimingsResponse:
        suite = run_id = None
        cases: list[JUnitCase] = []
        file_costs: dict[str, float] = {}
        startup: float | None = None
        timings: dict[str, Sample] = {}
        reports = 0
        async for request in request_iterator:
            if suite is None:
                suite, run_id = request.suite, request.run_id or None
                _check_suite(suite)
            if request.junit_xml:
                reports += 1
                try:
                    report = junit.parse_report([request.junit_xml], f"report {reports}")
                except junit.NotJUnit as exc:
                    raise _invalid(f"report {reports} {exc}") from None
                cases.extend(report.cases)
                file_costs.update(report.file_costs)
                if report.startup is not None:
                    startup = max(startup or 0.0, report.startup)
            for t in request.timings:
                if not t.test_id or not t.seconds >= 0 or t.seconds == float("inf"):
                    raise _invalid(f"timing of {t.test_id!r}: needs an id and seconds >= 0")
                timings[t.test_id] = Sample(t.seconds, t.failed)
        if suite is None:
            raise _invalid("no timings: the stream was empty")
        run = history.run_from_cases(cases, run_id=run_id, file_costs=file_costs, startup=startup)
        run.tests.update(timings)
        if run.tests:
            await self.backend.run(history.append_run, self.store, suite, run)
        return split_pb2.UploadTimingsResponse(reports=reports, tests=len(run.tests))

    # ---- static shards ----
    @grpc_errors
    async def GetShard(
        self, request: split_pb2.GetShardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> split_pb2.GetShardResponse:
        granularity = _checked(
            lambda: check_request(request.total, request.index, request.granularity)
        )
        _check_suite(request.suite)
        key = _checked(lambda: plan_key(request.suite, request.run_key, request.total))
        tests = list(request.test_ids)
        groups = dict(request.groups)

        def get() -> tuple[PinnedPlan, bool]:
            def make() -> PinnedPlan:
                estimates, all_groups = self._estimates(request.suite, tests, groups)
                return make_plan(
                    request.run_key, tests, request.total, estimates, granularity, all_groups
                )

            return self._pin(PLAN_NAMESPACE, key, make, PinnedPlan.from_bytes)

        plan, pinned_now = await self.backend.run(get)
        self._check_collected(plan.tests_digest, plan.all_tests, tests, "the plan pinned")
        return split_pb2.GetShardResponse(
            test_ids=plan.shards[request.index],
            plan_hash=plan.plan_hash,
            predicted_seconds=plan.predicted[request.index],
            makespan=plan.makespan,
            from_history=plan.from_history,
            pinned_now=pinned_now,
        )

    def _estimates(
        self, suite: str, tests: Sequence[str], groups: Mapping[str, str]
    ) -> tuple[history.Estimates, dict[str, str]]:
        runs, _ = history.load_runs(self.store, suite)
        merged = history.groups_of(runs)
        merged.update(groups)
        return history.estimate(tests, runs), merged

    @staticmethod
    def _check_collected(
        digest: str, planned: Callable[[], set[str]], tests: Sequence[str], what: str
    ) -> None:
        if ids_digest(tests) == digest:
            return
        problem = mismatch(planned(), tests, f"{what} for this run")
        if problem is not None:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, problem)

    # ---- the queue ----
    @grpc_errors
    async def JoinQueue(
        self, request: split_pb2.JoinQueueRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> split_pb2.JoinQueueResponse:
        granularity = _checked(
            lambda: check_request(request.total, request.index, request.granularity)
        )
        _check_suite(request.suite)
        slug = _checked(lambda: run_slug(request.suite, request.run_key))
        tests = list(request.test_ids)
        groups = dict(request.groups)

        def join() -> tuple[QueuePlan, bool]:
            def make() -> QueuePlan:
                return self._make_queue(request, tests, groups, granularity)

            return self._pin(QUEUE_NAMESPACE, f"{slug}/queue", make, QueuePlan.from_bytes)

        plan, pinned_now = await self.backend.run(join)
        self._check_collected(plan.tests_digest, plan.all_tests, tests, "the queue pinned")
        return split_pb2.JoinQueueResponse(
            plan_hash=plan.plan_hash,
            batches=len(plan.batches),
            tests=len(plan.all_tests()),
            pinned_now=pinned_now,
        )

    def _make_queue(
        self,
        request: split_pb2.JoinQueueRequest,
        tests: Sequence[str],
        groups: Mapping[str, str],
        granularity: Granularity,
    ) -> QueuePlan:
        estimates, all_groups = self._estimates(request.suite, tests, groups)
        wanted = set(tests)
        units = build_units(
            {t: estimates.tests.get(t, 1.0) for t in wanted},
            request.total,
            granularity,
            file_costs=estimates.file_costs,
            groups={t: g for t, g in all_groups.items() if t in wanted},
        )
        return make_queue(request.run_key, units, request.total, ids_digest(wanted))

    def _state(self, slug: str) -> tuple[QueuePlan, list[LeaseRecord], list[Completion]]:
        plan = self._read(QUEUE_NAMESPACE, f"{slug}/queue", QueuePlan.from_bytes)
        if plan is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, "no queue for this run: call JoinQueue first")
        leases: list[LeaseRecord] = []
        for info in self.store.list_records(QUEUE_NAMESPACE, f"{slug}/lease/"):
            lease = self._read(QUEUE_NAMESPACE, info.key, LeaseRecord.from_bytes)
            if lease is not None:
                leases.append(lease)
        done: list[Completion] = []
        for info in self.store.list_records(QUEUE_NAMESPACE, f"{slug}/done/"):
            completion = self._read(QUEUE_NAMESPACE, info.key, Completion.from_bytes)
            if completion is not None:
                done.append(completion)
        return plan, leases, done

    @grpc_errors
    async def Lease(
        self, request: split_pb2.LeaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> split_pb2.LeaseResponse:
        _check_suite(request.suite)
        slug = _checked(lambda: run_slug(request.suite, request.run_key))
        runner = request.runner[:_MAX_RUNNER_CHARS]
        if not request.lease_seconds >= 0:
            raise _invalid("lease_seconds must not be negative")
        lease, decision = await self.backend.run(self._lease, slug, runner, request.lease_seconds)
        if lease is not None:
            return split_pb2.LeaseResponse(
                lease_id=lease.id,
                test_ids=lease.tests,
                predicted_seconds=decision.predicted if isinstance(decision, Grant) else 0.0,
                deadline_seconds=lease.deadline - lease.granted,
            )
        if isinstance(decision, Wait):
            return split_pb2.LeaseResponse(retry_after=decision.seconds)
        if isinstance(decision, Finished):
            return split_pb2.LeaseResponse(finished=True, abandoned=decision.abandoned)
        raise AssertionError("a grant always comes with its lease")

    def _lease(
        self, slug: str, runner: str, requested: float
    ) -> tuple[LeaseRecord | None, Decision]:
        for _ in range(_CREATE_RETRIES):
            plan, leases, done = self._state(slug)
            now = time.time()
            decision = next_lease(plan, leases, completed_results(done), now)
            if not isinstance(decision, Grant):
                return None, decision
            timeout = lease_seconds(requested, decision.predicted)
            lease = LeaseRecord(
                decision.batch, decision.attempt, decision.tests, runner, now, now + timeout
            )
            key = f"{slug}/lease/{lease.id}"
            if self.store.put_record(QUEUE_NAMESPACE, key, lease.to_bytes(), overwrite=False):
                self._remember(f"{QUEUE_NAMESPACE}/{key}", lease)
                return lease, decision
        raise RpcError(grpc.StatusCode.ABORTED, "too many runners raced for a lease; retry")

    @grpc_errors
    async def Complete(
        self, request: split_pb2.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> split_pb2.CompleteResponse:
        _check_suite(request.suite)
        slug = _checked(lambda: run_slug(request.suite, request.run_key))
        if parse_lease_id(request.lease_id) is None:
            raise _invalid(f"lease id {request.lease_id[:40]!r} is not valid")
        results: dict[str, Sample] = {}
        for t in request.results:
            if not t.seconds >= 0 or t.seconds == float("inf"):
                raise _invalid(f"result of {t.test_id!r}: seconds must be >= 0")
            results[t.test_id] = Sample(t.seconds, t.failed)
        completed, remaining = await self.backend.run(
            self._complete, request.suite, slug, request.lease_id, request.runner, results
        )
        return split_pb2.CompleteResponse(completed=completed, remaining=remaining)

    def _complete(
        self, suite: str, slug: str, lease_name: str, runner: str, results: dict[str, Sample]
    ) -> tuple[int, int]:
        lease = self._read(QUEUE_NAMESPACE, f"{slug}/lease/{lease_name}", LeaseRecord.from_bytes)
        if lease is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no lease {lease_name} in this run")
        foreign = sorted(set(results) - set(lease.tests))
        if foreign:
            raise _invalid(
                f"{len(foreign)} results are not tests of lease {lease_name}, e.g. {foreign[0]!r}"
            )
        completion = Completion(lease.id, runner[:_MAX_RUNNER_CHARS], results)
        key = f"{slug}/done/{lease.id}-{uuid.uuid4().hex[:12]}"
        if results:
            self.store.put_record(QUEUE_NAMESPACE, key, completion.to_bytes(), overwrite=False)
            self._remember(f"{QUEUE_NAMESPACE}/{key}", completion)
        plan, _, done = self._state(slug)
        completed = completed_results(done)
        total = len(plan.all_tests())
        if results and len(completed) >= total:
            self._record_history(suite, slug, plan, completed)
        return len(completed), total - len(completed)

    def _record_history(
        self, suite: str, slug: str, plan: QueuePlan, completed: dict[str, Sample]
    ) -> None:
        """The finished queue's timings into the history, once (a create-if-absent marker)."""
        marker = f"{slug}/recorded"
        if self.store.put_record(QUEUE_NAMESPACE, marker, b"1", overwrite=False):
            history.append_run(
                self.store, suite, Run(plan.run_key, time.time_ns(), dict(completed))
            )

    @grpc_errors
    async def QueueStatus(
        self, request: split_pb2.QueueStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> split_pb2.QueueStatusResponse:
        _check_suite(request.suite)
        slug = _checked(lambda: run_slug(request.suite, request.run_key))
        plan, leases, done = await self.backend.run(self._state, slug)
        completed = completed_results(done)
        now = time.time()
        c = counts(plan, leases, completed, now)
        return split_pb2.QueueStatusResponse(
            tests=c.tests,
            completed=c.completed,
            leased=c.leased,
            pending=c.pending,
            leases=c.leases,
            plan_hash=plan.plan_hash,
            results=[
                split_pb2.TestTiming(test_id=t, seconds=s.seconds, failed=s.failed)
                for t, s in sorted(completed.items())
            ],
            abandoned=abandoned_tests(leases, completed, now),
        )
