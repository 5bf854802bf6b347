"""The split service: timings upload, pinned shards, and the queue of a run.

I/O around the pure logic of ``splitter.pinning`` and ``splitter.queue``. All state
is in the store's records (plans in "splitplans", queues in "splitqueue", timings in
"timings"), every record created once with ``overwrite=False``: concurrent callers
and other replicas sharing the store agree, whoever loses a create race reads the
winner's record. Records never change once written, so decoded ones are cached.

A run belongs to its caller: plans and queues are keyed by the caller's token name
as well as the run key, so a token can neither steer nor finish another token's
run (a pull request's token cannot lease a trusted run's tests), and a lease is
completed only with the secret handed out with it.

Planning is bounded: at most MAX_RUN_TESTS test ids, in work about linear in tests
+ shards; it runs on a worker thread that gives up (``bounded``) when the caller's
deadline passes or its call ends, or the server stops.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from slipstream.cache_server import auth
from slipstream.cache_server.services.common import Backend, RpcError, grpc_errors
from slipstream.cache_server.services.ui_history import Ident
from slipstream.cache_server.storage.base import Store
from slipstream.protos import split_pb2
from slipstream.protos import split_pb2_grpc as split_grpc
from slipstream.splitter import history, junit
from slipstream.splitter.algorithm import Check, Granularity, build_units
from slipstream.splitter.history import Estimator, HistoryError, Run, Sample
from slipstream.splitter.ids import JUnitCase
from slipstream.splitter.pinning import (
    MAX_RUN_TESTS,
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
    new_secret,
    next_lease,
    parse_lease_id,
)
from slipstream.splitter.queue import (
    Lease as LeaseRecord,
)

_SERVICE = "/slipstream.split.v1.Split/"
# Plans, leases and completions only steer which runner runs what, and a run is
# kept per token (see the module docstring); like CAS uploads they are open to any
# CI job that may write to the cache.
for _method, _scope in (
    ("UploadTimings", auth.CAS_WRITE),
    ("GetShard", auth.CAS_WRITE),
    ("JoinQueue", auth.CAS_WRITE),
    ("Lease", auth.CAS_WRITE),
    ("Complete", auth.CAS_WRITE),
    ("QueueStatus", auth.READ),
):
    auth.register_method(_SERVICE + _method, _scope)

# Decoded records kept, by the bytes they were decoded from (a plan of 200,000 tests
# is ~7 MB): a count alone let a few big plans pin gigabytes.
_CACHE_BYTES = 64 << 20
# The longest a plan or a queue may take to make when the caller sets no deadline.
MAX_PLANNING_SECONDS = 60.0
_CREATE_RETRIES = 50
# Suites whose estimator (of their newest history) is kept: each holds an estimate per
# test of its history (~10 MB at 100,000 tests).
_KEPT_ESTIMATORS = 4
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


def _owner() -> str:
    """Whose runs the caller's are: its token name ("anonymous" on an open server)."""
    caller = auth.current_caller()
    return caller.name if caller.authenticated else "anonymous"


@dataclass(frozen=True, slots=True)
class _RunSpec:
    """A checked RunSpec: the run a runner asks about, and what it collected."""

    suite: str
    run_key: str
    total: int
    index: int
    granularity: Granularity
    tests: list[str]  # sorted
    groups: dict[str, str]
    slug: str  # the run's record-key prefix (owner, suite, run key)

    @classmethod
    def parse(cls, spec: split_pb2.RunSpec) -> _RunSpec:
        """INVALID_ARGUMENT for a bad suite, run key, total, index or granularity, and
        RESOURCE_EXHAUSTED for more tests (or groups) than a run may hold."""
        if len(spec.test_ids) > MAX_RUN_TESTS or len(spec.groups) > MAX_RUN_TESTS:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{max(len(spec.test_ids), len(spec.groups)):,} test ids are more than "
                f"a run may hold ({MAX_RUN_TESTS:,})",
            )
        granularity = _checked(lambda: check_request(spec.total, spec.index, spec.granularity))
        _check_suite(spec.suite)
        slug = _checked(lambda: run_slug(spec.suite, spec.run_key, _owner()))
        return cls(
            spec.suite,
            spec.run_key,
            spec.total,
            spec.index,
            granularity,
            # Sorted once here: the estimates, the plan and the ids' digest each sort
            # them, in O(n) when they are sorted already.
            sorted(spec.test_ids),
            dict(spec.groups),
            slug,
        )


class SplitService(split_grpc.SplitServicer):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._cache: collections.OrderedDict[str, tuple[object, int]] = collections.OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        # The suites' timing histories, decoded (an upload this server stored is kept as
        # it was sent), and an estimator per suite of the version (the records) it was
        # made of: a new upload is a new version, and the next plan makes a new one.
        self.history = backend.history
        self._estimators: collections.OrderedDict[str, tuple[tuple[Ident, ...], Estimator]] = (
            collections.OrderedDict()
        )

    async def bounded(
        self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[Check], R]
    ) -> R:
        """fn(check) on a worker thread. check, called by fn now and then, stops it by
        raising once the caller's deadline (at most MAX_PLANNING_SECONDS) has passed,
        the call has ended (cancelled: the await below is), or the server stops."""
        remaining = context.time_remaining()
        limit = MAX_PLANNING_SECONDS if remaining is None else min(remaining, MAX_PLANNING_SECONDS)
        deadline = time.monotonic() + limit
        ended = threading.Event()
        stopping = self.backend.stopping

        def check() -> None:
            if ended.is_set():
                raise RpcError(grpc.StatusCode.CANCELLED, "the call ended")
            if stopping.is_set():
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            if time.monotonic() > deadline:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"planning took longer than {limit:.1f}s; gave up",
                )

        try:
            return await self.backend.run(fn, check)
        finally:
            ended.set()

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
                self._cache.move_to_end(name)
        if hit is not None:
            return hit[0]  # type: ignore[return-value]
        data = self.store.get_record(namespace, key)
        if data is None:
            return None
        try:
            value = decode(data)
        except ValueError as exc:
            raise RpcError(grpc.StatusCode.DATA_LOSS, f"record {key}: {exc}") from None
        self._remember(name, value, len(data))
        return value

    def _remember(self, name: str, value: object, size: int) -> None:
        """Cache a decoded record, dropping the least recently used beyond _CACHE_BYTES."""
        if size > _CACHE_BYTES // 4:
            return
        with self._lock:
            old = self._cache.pop(name, None)
            if old is not None:
                self._cached_bytes -= old[1]
            self._cache[name] = (value, size)
            self._cached_bytes += size
            while self._cached_bytes > _CACHE_BYTES:
                _, (_, dropped) = self._cache.popitem(last=False)
                self._cached_bytes -= dropped

    def _pin(
        self, namespace: str, key: str, make: Callable[[], R], decode: Callable[[bytes], R]
    ) -> tuple[R, bool]:
        """The record under key, created from make() if absent; True if this call made it."""
        found = self._read(namespace, key, decode)
        if found is not None:
            return found, False
        value = make()
        data = value.to_bytes()  # type: ignore[attr-defined]
        if self.store.put_record(namespace, key, data, overwrite=False):
            self._remember(f"{namespace}/{key}", value, len(data))
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
            if len(cases) + len(timings) > MAX_RUN_TESTS:
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {MAX_RUN_TESTS:,} timings in one upload",
                )
        if suite is None:
            raise _invalid("no timings: the stream was empty")
        run = history.run_from_cases(cases, run_id=run_id, file_costs=file_costs, startup=startup)
        run.tests.update(timings)
        if run.tests:
            await self.backend.run(self._append, suite, run)
        return split_pb2.UploadTimingsResponse(reports=reports, tests=len(run.tests))

    # ---- static shards ----
    @grpc_errors
    async def GetShard(
        self, request: split_pb2.GetShardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> split_pb2.GetShardResponse:
        run = _RunSpec.parse(request.run)
        key = plan_key(run.slug, run.total)

        def get(check: Check) -> tuple[PinnedPlan, bool]:
            def make() -> PinnedPlan:
                estimates, groups = self._estimates(run)
                return make_plan(
                    run.run_key, run.tests, run.total, estimates, run.granularity, groups, check
                )

            return self._pin(PLAN_NAMESPACE, key, make, PinnedPlan.from_bytes)

        plan, pinned_now = await self.bounded(context, get)
        if not pinned_now:  # a plan this call made is of these tests
            self._check_collected(plan.tests_digest, plan.all_tests, run.tests, "the plan pinned")
        return split_pb2.GetShardResponse(
            test_ids=plan.shards[run.index],
            plan_hash=plan.plan_hash,
            predicted_seconds=plan.predicted[run.index],
            makespan=plan.makespan,
            from_history=plan.from_history,
            pinned_now=pinned_now,
        )

    def _append(self, suite: str, run: Run) -> None:
        """Store an upload in the suite's history, and keep it decoded."""
        record = history.store_run(self.store, suite, run)
        self.history.add(suite, record, run)

    def _estimator(self, suite: str) -> Estimator:
        """The estimator of the suite's history as it is now: the kept one while the
        records listed are those it was made of (no upload came since), known from the
        listing alone (a history beyond HistoryCache's budget is not read for it)."""
        infos = self.store.list_records(history.NAMESPACE, f"{suite}/")
        listed = tuple((info.key, info.size) for info in infos[-history.MAX_LOADED_RECORDS :])
        with self._lock:
            kept = self._estimators.get(suite)
            if kept is not None and kept[0] == listed:
                self._estimators.move_to_end(suite)
                return kept[1]
        runs, _ = self.history.load(suite, infos=infos)
        estimator = Estimator([run for _, run in runs])
        # Kept only when made of the records listed: not when one was unreadable.
        if tuple(record for record, _ in runs) == listed:
            with self._lock:
                self._estimators[suite] = (listed, estimator)
                self._estimators.move_to_end(suite)
                while len(self._estimators) > _KEPT_ESTIMATORS:
                    self._estimators.popitem(last=False)
        return estimator

    def _estimates(self, run: _RunSpec) -> tuple[history.Estimates, dict[str, str]]:
        """Estimates of the run's tests from the suite's history, and its groups (the
        history's, then the runner's)."""
        estimator = self._estimator(run.suite)
        merged = dict(estimator.groups)
        merged.update(run.groups)
        return estimator.estimate(run.tests), merged

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
        run = _RunSpec.parse(request.run)

        def join(check: Check) -> tuple[QueuePlan, bool]:
            return self._pin(
                QUEUE_NAMESPACE,
                f"{run.slug}/queue",
                lambda: self._make_queue(run, check),
                QueuePlan.from_bytes,
            )

        plan, pinned_now = await self.bounded(context, join)
        if not pinned_now:  # a queue this call made is of these tests
            self._check_collected(plan.tests_digest, plan.all_tests, run.tests, "the queue pinned")
        return split_pb2.JoinQueueResponse(
            plan_hash=plan.plan_hash,
            batches=len(plan.batches),
            tests=len(plan.all_tests()),
            pinned_now=pinned_now,
        )

    def _make_queue(self, run: _RunSpec, check: Check) -> QueuePlan:
        estimates, all_groups = self._estimates(run)
        check()
        wanted = set(run.tests)
        units = build_units(
            {t: estimates.tests.get(t, 1.0) for t in wanted},
            run.total,
            run.granularity,
            file_costs=estimates.file_costs,
            groups={t: g for t, g in all_groups.items() if t in wanted},
            check=check,
        )
        check()
        return make_queue(run.run_key, units, run.total, ids_digest(wanted))

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
        slug = _checked(lambda: run_slug(request.suite, request.run_key, _owner()))
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
                decision.batch,
                decision.attempt,
                decision.tests,
                runner,
                now,
                now + timeout,
                new_secret(),
            )
            key = f"{slug}/lease/{lease.name}"
            data = lease.to_bytes()
            if self.store.put_record(QUEUE_NAMESPACE, key, data, overwrite=False):
                self._remember(f"{QUEUE_NAMESPACE}/{key}", lease, len(data))
                return lease, decision
        raise RpcError(grpc.StatusCode.ABORTED, "too many runners raced for a lease; retry")

    @grpc_errors
    async def Complete(
        self, request: split_pb2.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> split_pb2.CompleteResponse:
        _check_suite(request.suite)
        slug = _checked(lambda: run_slug(request.suite, request.run_key, _owner()))
        parsed = parse_lease_id(request.lease_id)
        if parsed is None:
            raise _invalid("the lease id is not one this server hands out")
        results: dict[str, Sample] = {}
        for t in request.results:
            if not t.seconds >= 0 or t.seconds == float("inf"):
                raise _invalid(f"result of {t.test_id!r}: seconds must be >= 0")
            results[t.test_id] = Sample(t.seconds, t.failed)
        completed, remaining = await self.backend.run(
            self._complete, request.suite, slug, parsed, request.runner, results
        )
        return split_pb2.CompleteResponse(completed=completed, remaining=remaining)

    def _complete(
        self,
        suite: str,
        slug: str,
        lease_id: tuple[str, str],
        runner: str,
        results: dict[str, Sample],
    ) -> tuple[int, int]:
        lease_name, secret = lease_id
        lease = self._read(QUEUE_NAMESPACE, f"{slug}/lease/{lease_name}", LeaseRecord.from_bytes)
        if lease is None or not lease.matches(secret):
            # The same answer for a wrong secret: nothing tells a guesser it was close.
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no lease {lease_name} in this run")
        foreign = sorted(set(results) - set(lease.tests))
        if foreign:
            raise _invalid(
                f"{len(foreign)} results are not tests of lease {lease_name}, e.g. {foreign[0]!r}"
            )
        completion = Completion(lease.name, runner[:_MAX_RUNNER_CHARS], results)
        key = f"{slug}/done/{lease.name}-{uuid.uuid4().hex[:12]}"
        if results:
            data = completion.to_bytes()
            self.store.put_record(QUEUE_NAMESPACE, key, data, overwrite=False)
            self._remember(f"{QUEUE_NAMESPACE}/{key}", completion, len(data))
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
            self._append(suite, Run(plan.run_key, time.time_ns(), dict(completed)))

    @grpc_errors
    async def QueueStatus(
        self, request: split_pb2.QueueStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> split_pb2.QueueStatusResponse:
        _check_suite(request.suite)
        owner = request.owner or _owner()
        slug = _checked(lambda: run_slug(request.suite, request.run_key, owner))
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
