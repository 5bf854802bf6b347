"""A recorded timing history for the page tests, written into a real disk store: runs of
a sharded suite with a flaky test, a slow shard and a test id holding markup, and two
recorded runs of this repository's own suite; and the tokens of the tests with tokens on."""

from __future__ import annotations

import pathlib

from slipstream.cache_server.storage.disk import DiskStore
from slipstream.splitter import history
from slipstream.splitter.history import Run, Sample
from slipstream.splitter.sources import runs_from_junit
from tests.ops.helpers import Token

SUITE = "app"
SECOND_SUITE = "lib"
OWN_SUITE = "slipstream"  # this repository's suite, as two CI runs recorded it
OWN_RUNS = [
    pathlib.Path(__file__).parents[2] / "benchmarks" / f"split_own_run_{n}.xml" for n in (1, 2)
]
READER = Token("dashboard-reader", "reader-token-3f9a1c", ("read",))
WRITER = Token("ci-writer", "writer-token-77b2e0", ("cas-write", "ac-write"))
RUNS = 6
SHARDS = 3
FLAKY = "tests/test_net.py::test_retry_flaky"
VARIABLE = "tests/test_io.py::test_growing"
HOSTILE = "tests/test_x.py::test_<script>alert('pwned')</script>"
BASE_NS = 1_780_000_000 * 10**9
STARTUP = 4.0


def shard_tests(run: int, shard: int) -> dict[str, Sample]:
    """What shard `shard` of run `run` timed: shard 2 is the slow one."""
    tests = {
        f"tests/test_s{shard}.py::test_{i}": Sample(2.0 + i + (30.0 if shard == 2 else 0.0), False)
        for i in range(4)
    }
    if shard == 1:
        tests[VARIABLE] = Sample(1.0 + 2.0 * run, False)  # slower every run
    if shard == 0:
        tests[FLAKY] = Sample(1.5, run % 2 == 1)  # fails in every other run
        tests[HOSTILE] = Sample(0.5, False)
    if shard == 1 and run == RUNS - 1:
        tests["tests/test_new.py::test_added_last"] = Sample(0.25, False)
    if shard == 1 and run < RUNS - 1:
        tests["tests/test_old.py::test_removed_last"] = Sample(0.75, False)
    return tests


def shard_wall(run: int, shard: int) -> float:
    return STARTUP + sum(s.seconds for s in shard_tests(run, shard).values())


def run_id(run: int) -> str:
    return f"ci-{run + 1}"


def write_history(storage: pathlib.Path) -> None:
    """RUNS runs of SHARDS shards of SUITE, and a few unsharded runs of SECOND_SUITE."""
    store = DiskStore(storage)
    try:
        for run in range(RUNS):
            for shard in range(SHARDS):
                created = BASE_NS + run * 3600 * 10**9 + shard * 10**6
                history.append_run(
                    store,
                    SUITE,
                    Run(run_id(run), created, shard_tests(run, shard), startup=STARTUP),
                )
        for run in range(3):
            tests = {"lib/test_core.py::test_parse": Sample(0.2 + run * 0.1, False)}
            history.append_run(store, SECOND_SUITE, Run(None, BASE_NS + run * 10**9, tests))
        own, warnings = runs_from_junit([str(p) for p in OWN_RUNS], None)
        assert not warnings, warnings
        for n, recorded in enumerate(own):
            recorded.run_id, recorded.created_ns = f"own-{n + 1}", BASE_NS + n * 86400 * 10**9
            history.append_run(store, OWN_SUITE, recorded)
    finally:
        store.close()
