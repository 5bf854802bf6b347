"""The pytest plugin's side of the split service (``--shard-server URL --run-key KEY``).

Static mode asks the server for this runner's shard of the collected tests. Queue
mode (``--queue``) joins the run's queue and runs leased batches until the queue is
finished, reporting each batch's results. When the server cannot be reached, both
use the local split of ``splitter.pinning.fallback_shard`` by --shard-index and
--shard-total (so queue runners need those too): runners that all fell back run
every test exactly once between them. A runner that loses the server in the middle
of a queue runs its static share minus what it already completed.
"""

from __future__ import annotations

import os
import pathlib
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from slipstream.client.split_client import (
    LeaseAnswer,
    RunSpec,
    SplitClient,
    SplitRefused,
    SplitUnavailable,
    local_shard,
    shard_or_fallback,
)
from slipstream.splitter import history
from slipstream.splitter.algorithm import Granularity
from slipstream.splitter.history import Estimates, Run, Sample
from slipstream.splitter.sources import runs_from_junit

PREFIX = "slipstream split"


@dataclass
class Remote:
    """Server settings and what the server (or the fallback) decided."""

    address: str
    run_key: str
    suite: str
    index: int
    total: int
    granularity: Granularity
    queue: bool = False
    lease_timeout: float = 0.0
    connect_timeout: float = 5.0
    timings: Sequence[str] = ()  # JUnit files for the fallback
    say: Callable[[str], None] = print
    queue_joined: bool = False
    all_ids: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)
    completed: dict[str, Sample] = field(default_factory=dict)
    predicted: float | None = None
    plan_hash: str | None = None
    client: SplitClient | None = None

    def _client(self) -> SplitClient:
        if self.client is None:
            self.client = SplitClient(self.address, connect_timeout=self.connect_timeout)
        return self.client

    def _local_estimates(self) -> Estimates | None:
        if not self.timings:
            return None
        try:
            runs, _ = runs_from_junit(self.timings, self.all_ids)
        except (FileNotFoundError, ValueError):
            return None
        return history.estimate(self.all_ids, runs)

    def _spec(self, ids: Sequence[str]) -> RunSpec:
        """What this runner asks the server, in static and queue mode alike."""
        return RunSpec(
            self.suite, self.run_key, self.index, self.total, ids, self.granularity, self.groups
        )

    def _fallback(self, ids: Sequence[str], why: str) -> set[str]:
        answer = local_shard(self._spec(ids), why, self._local_estimates)
        self.say(f"{PREFIX}: warning: {answer.fallback}")
        self.plan_hash = answer.plan_hash
        self.say(
            f"{PREFIX}: shard {self.index} of 0..{self.total - 1} (fallback): "
            f"{len(answer.tests)} of {len(ids)} tests; plan {answer.plan_hash}"
        )
        return set(answer.tests)

    def select(self, ids: list[str], groups: Mapping[str, str]) -> set[str] | None:
        """This runner's tests; None in queue mode once joined (every test stays, the
        loop runs what it leases). Raises pytest.UsageError when the server refuses."""
        self.all_ids = ids
        self.groups = dict(groups)
        client = self._client()
        run = self._spec(ids)
        try:
            if self.queue:
                with client:
                    info = client.join_queue(run)
                self.queue_joined = True
                self.plan_hash = info.plan_hash
                self.say(
                    f"{PREFIX}: queue runner {self.index} of 0..{self.total - 1}: "
                    f"{info.tests} tests in {info.batches} batches; plan {info.plan_hash}"
                )
                return None
            answer = shard_or_fallback(client, run, local_estimates=self._local_estimates)
        except SplitUnavailable as exc:
            return self._fallback(ids, str(exc))
        except SplitRefused as exc:
            raise pytest.UsageError(f"slipstream: {exc}") from None
        if answer.fallback is not None:
            return self._fallback(ids, answer.fallback.split("; split locally")[0])
        self.plan_hash = answer.plan_hash
        self.predicted = answer.predicted
        self.say(
            f"{PREFIX}: shard {self.index} of 0..{self.total - 1} (server): "
            f"{len(answer.tests)} of {len(ids)} tests, predicted {answer.predicted or 0.0:.2f}s; "
            f"makespan {answer.makespan or 0.0:.2f}s; plan {answer.plan_hash}"
        )
        return set(answer.tests)

    # ---- queue mode ----
    def run_queue(
        self,
        session: pytest.Session,
        items: Mapping[str, pytest.Item],
        outcome_of: Callable[[str], Sample | None],
    ) -> None:
        """Lease, run, report, until the queue is finished or the session must stop.

        ``items`` maps test ids to the collected items; ``outcome_of`` gives a finished
        item's result by its pytest node id."""
        position = {nodeid: i for i, nodeid in enumerate(self.all_ids)}
        runner = f"shard {self.index} ({socket.gethostname()} pid {os.getpid()})"
        client = self._client()
        with client:
            while True:
                try:
                    lease = client.lease(self.suite, self.run_key, runner, self.lease_timeout)
                except SplitUnavailable as exc:
                    self._run_fallback(session, items, position, str(exc))
                    return
                except SplitRefused as exc:
                    raise pytest.UsageError(f"slipstream: {exc}") from None
                if lease.finished:
                    self._report_finished(lease)
                    return
                if not lease.lease_id:
                    time.sleep(lease.retry_after)
                    continue
                wanted = sorted(
                    (t for t in lease.tests if t in items and t not in self.completed),
                    key=position.__getitem__,
                )
                results = self._run(session, [items[t] for t in wanted], wanted, outcome_of)
                try:
                    client.complete(self.suite, self.run_key, lease.lease_id, runner, results)
                except SplitUnavailable as exc:
                    self._run_fallback(session, items, position, str(exc))
                    return
                except SplitRefused as exc:
                    self.say(f"{PREFIX}: warning: {exc}")
                if session.shouldfail or session.shouldstop:
                    return

    def _run(
        self,
        session: pytest.Session,
        batch: list[pytest.Item],
        ids: list[str],
        outcome_of: Callable[[str], Sample | None],
    ) -> dict[str, Sample]:
        """Run a batch (fixtures shared within it); the results of the tests that ended."""
        results: dict[str, Sample] = {}
        for i, (item, nodeid) in enumerate(zip(batch, ids, strict=True)):
            nextitem = batch[i + 1] if i + 1 < len(batch) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            outcome = outcome_of(item.nodeid) or Sample(0.0, False)
            results[nodeid] = self.completed[nodeid] = outcome
            if session.shouldfail or session.shouldstop:
                break
        return results

    def _run_fallback(
        self,
        session: pytest.Session,
        items: Mapping[str, pytest.Item],
        position: Mapping[str, int],
        why: str,
    ) -> None:
        mine = self._fallback(self.all_ids, why)
        left = sorted((t for t in mine if t not in self.completed), key=position.__getitem__)
        self._run(session, [items[t] for t in left], left, lambda _: None)

    def _report_finished(self, lease: LeaseAnswer) -> None:
        if lease.abandoned:
            self.say(
                f"{PREFIX}: warning: {len(lease.abandoned)} tests never completed after "
                f"repeated leases (do they kill their runner?), e.g. {lease.abandoned[0]}"
            )
        self.say(f"{PREFIX}: queue finished; this runner ran {len(self.completed)} tests")

    def upload(self, run: Run, write_junit: Callable[[Run, pathlib.Path], None]) -> None:
        """Send this runner's timings (as the JUnit report it writes) to the server."""
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "timings.xml"
            write_junit(run, path)
            report = path.read_bytes()
        try:
            with self._client() as client:
                _, tests = client.upload_timings(self.suite, run.run_id, [report])
        except (SplitUnavailable, SplitRefused) as exc:
            self.say(f"{PREFIX}: warning: could not upload timings: {exc}")
            return
        self.say(f"{PREFIX}: uploaded the timings of {tests} tests to {self.address}")
