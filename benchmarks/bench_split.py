"""Benchmarks for the test splitter: split quality and speed, and a real sharded run.

    python -m benchmarks.bench_split [--size smoke|full] [--json PATH] [--e2e]

Prints a table and writes JSON (default benchmarks/split_results.json). Targets from
issue 3: the predicted makespan within 1% of the lower bound whenever shards hold 20+
units, and 100,000 tests into 64 shards in under a second. Suites: heavy-tailed
synthetic ones, and this project's own recorded test runs (benchmarks/split_own_run_*.xml).
``--e2e`` also splits a sample project with the pytest plugin and reports each shard's
measured wall time beside its prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass

from slipstream.splitter import history, junit
from slipstream.splitter.algorithm import Granularity, split_tests

HERE = pathlib.Path(__file__).parent
# Two recorded runs of tests/splitter, written by the plugin's --shard-junit.
OWN_RUNS = sorted(HERE.glob("split_own_run_*.xml"))


@dataclass
class Row:
    suite: str
    tests: int
    shards: int
    by: str
    units_per_shard: float
    seconds: float
    makespan: float
    lower_bound: float
    ratio: float
    method: str
    target_ratio_met: bool | None  # None where the 1% target does not apply (< 20 units/shard)


def synthetic_suite(
    tests: int,
    seed: int,
    *,
    tests_per_file: int = 40,
    file_cost: float = 0.0,
    sigma: float = 1.5,
    tail: float = 0.01,
) -> tuple[dict[str, float], dict[str, float]]:
    """Heavy-tailed test times (lognormal, a Pareto tail of slow tests) in files and classes."""
    rng = random.Random(seed)
    times: dict[str, float] = {}
    file_costs: dict[str, float] = {}
    for i in range(tests):
        file_no = i // tests_per_file
        f = f"tests/pkg{file_no % 97}/test_m{file_no}.py"
        cls = f"TestC{rng.randrange(3)}::" if rng.random() < 0.5 else ""
        seconds = rng.lognormvariate(-3.0, sigma)
        if rng.random() < tail:
            seconds += rng.paretovariate(1.2) * 2.0
        times[f"{f}::{cls}test_{i}[p{rng.randrange(4)}]"] = round(seconds, 3)
        if file_cost:
            file_costs[f] = file_cost * rng.uniform(0.5, 1.5)
    return times, file_costs


def own_suite() -> tuple[dict[str, float], dict[str, float]]:
    """This project's recorded runs: per-test estimates as the CLI would make them."""
    reports, _ = junit.read_reports(OWN_RUNS)
    runs = [
        history.run_from_cases(r.cases, created_ns=i, file_costs=r.file_costs, startup=r.startup)
        for i, r in enumerate(reports)
    ]
    tests = {t for run in runs for t in run.tests}
    est = history.estimate(tests, runs)
    return est.tests, est.file_costs


def measure(
    name: str,
    times: dict[str, float],
    file_costs: dict[str, float],
    n: int,
    by: Granularity,
) -> Row:
    started = time.perf_counter()
    plan = split_tests(times, n, by, file_costs=file_costs)
    seconds = time.perf_counter() - started
    units = len({t for s in plan.shards for t in s.tests})
    if by != "test":
        # Count the units the split balanced, not the tests.
        from slipstream.splitter.algorithm import build_units

        units = len(build_units(times, n, by, file_costs=file_costs))
    per_shard = units / n
    return Row(
        suite=name,
        tests=len(times),
        shards=n,
        by=by,
        units_per_shard=round(per_shard, 1),
        seconds=round(seconds, 4),
        makespan=round(plan.makespan, 3),
        lower_bound=round(plan.lower_bound, 3),
        ratio=round(plan.ratio, 5),
        method=plan.method,
        # The 1% target is for the balancing. Split by test with file costs, every shard
        # pays most files again: the ratio shows that cost, which auto avoids.
        target_ratio_met=(plan.ratio <= 1.01)
        if per_shard >= 20 and not (file_costs and by in ("test", "class"))
        else None,
    )


def run_benchmarks(size: str) -> list[Row]:
    rows: list[Row] = []
    if size == "smoke":
        times, costs = synthetic_suite(400, seed=1)
        rows.append(measure("synthetic-400", times, costs, 4, "test"))
        rows.append(measure("synthetic-400", times, costs, 4, "auto"))
        return rows
    for tests, n in ((1_000, 8), (10_000, 16), (10_000, 64), (100_000, 64)):
        times, costs = synthetic_suite(tests, seed=tests + n)
        rows.append(measure(f"synthetic-{tests}", times, costs, n, "test"))
    for tests, n in ((10_000, 16), (100_000, 64)):
        times, costs = synthetic_suite(tests, seed=7, file_cost=0.2)
        for by in ("test", "file", "auto"):
            rows.append(measure(f"synthetic-{tests}+filecosts", times, costs, n, by))  # type: ignore[arg-type]
    for seed in range(5):
        # Few units per shard, no single dominating test: where differencing and the
        # exact search matter.
        times, costs = synthetic_suite(200, seed=seed, tests_per_file=10, sigma=0.6, tail=0)
        rows.append(measure(f"few-units-{seed}", times, costs, 40, "test"))
    if OWN_RUNS:
        times, costs = own_suite()
        for n in (2, 4, 8):
            for by in ("test", "auto"):
                rows.append(measure("slipstream-own", times, costs, n, by))  # type: ignore[arg-type]
    return rows


# ---- a real sharded run of a sample project ----

_SAMPLE_FILES = {
    "pytest.ini": """
        [pytest]
        addopts = -p no:cacheprovider
    """,
    "tests/__init__.py": "",
    "tests/sub/__init__.py": "",
    "tests/test_slow.py": """
        import time
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_slow(i):
            time.sleep(0.15)
    """,
    "tests/test_mid.py": """
        import time
        import pytest

        @pytest.fixture(scope="class")
        def resource():
            time.sleep(0.15)
            return 1

        class TestMid:
            @pytest.mark.parametrize("i", range(4))
            def test_mid(self, resource, i):
                time.sleep(0.05)
    """,
    "tests/test_import.py": """
        import time
        import pytest
        time.sleep(0.2)  # an expensive import: a collection cost

        def test_a():
            time.sleep(0.05)

        @pytest.mark.xdist_group("io")
        def test_b():
            time.sleep(0.05)
    """,
    "tests/test_grouped.py": """
        import pytest

        @pytest.mark.xdist_group("db")
        def test_db_first():
            pass

        @pytest.mark.xdist_group("db")
        class TestDb:
            def test_db_second(self):
                pass

        @pytest.mark.xdist_group("io")
        def test_io_here():
            pass
    """,
    "tests/test_params.py": """
        import pytest

        @pytest.mark.parametrize("x", ["a b", "c::d", "e'f", 'g"h', "i#j", "k[l]", "m\\\\nn"])
        def test_odd_ids(x):
            assert x
    """,
    "tests/sub/test_fast.py": """
        import pytest

        @pytest.mark.parametrize("i", range(30))
        def test_fast(i):
            assert i >= 0
    """,
    "tests/sub/test_module_fixture.py": """
        import time
        import pytest

        @pytest.fixture(scope="module")
        def db():
            time.sleep(0.2)
            return {}

        def test_one(db):
            time.sleep(0.03)

        def test_two(db):
            time.sleep(0.05)

        def test_three(db):
            time.sleep(0.05)
    """,
}


def make_sample_project(root: pathlib.Path) -> None:
    """A small suite with slow files, fixtures, an expensive import and odd ids."""
    for rel, text in _SAMPLE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


_PREDICTED = re.compile(r"slipstream split: shard \d+: wall .*\(predicted ([\d.]+)s\)")
_HASH = re.compile(r"plan ([0-9a-f]{16})")
# Slipstream's own warning lines ("slipstream split: warning: ..."), not pytest's summary.
_SLIPSTREAM_WARNING = re.compile(r"^slipstream [a-z ]+: warning: .*$", re.MULTILINE)


@dataclass
class ShardRun:
    index: int
    wall: float  # measured around the whole process: start-up and collection included
    predicted: float | None
    plan_hash: str | None
    output: str
    returncode: int

    @property
    def slipstream_warnings(self) -> list[str]:
        """The warning lines Slipstream printed (whatever warnings pytest itself shows)."""
        return _SLIPSTREAM_WARNING.findall(self.output)


def run_pytest(root: pathlib.Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return time.perf_counter() - started, proc


def run_shard(root: pathlib.Path, index: int, total: int, *extra: str) -> ShardRun:
    wall, proc = run_pytest(
        root,
        "-q",
        "--shard-index",
        str(index),
        "--shard-total",
        str(total),
        "--shard-junit",
        f"shard-{index}.xml",
        *extra,
    )
    out = proc.stdout + proc.stderr
    m = _PREDICTED.search(out)
    h = _HASH.search(out)
    predicted = float(m.group(1)) if m else None
    return ShardRun(index, wall, predicted, h.group(1) if h else None, out, proc.returncode)


def run_e2e(root: pathlib.Path, total: int = 3) -> dict[str, object]:
    """Record timings with one full run, then run every shard; walls beside predictions."""
    make_sample_project(root)
    full_wall, proc = run_pytest(root, "-q", "--shard-junit", "full.xml")
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    shards = [run_shard(root, i, total, "--shard-timings", "full.xml") for i in range(total)]
    slowest = max(shards, key=lambda s: s.wall)
    return {
        "full_run_wall": round(full_wall, 3),
        "shards": total,
        "shard_walls": [round(s.wall, 3) for s in shards],
        "shard_predicted": [s.predicted for s in shards],
        "slowest_wall": round(slowest.wall, 3),
        "slowest_predicted": slowest.predicted,
        "predicted_makespan": max((s.predicted or 0.0) for s in shards),
    }


def print_table(rows: list[Row]) -> None:
    header = f"{'suite':<28} {'tests':>7} {'N':>3} {'by':>5} {'u/N':>7} {'time':>8} "
    header += f"{'makespan':>10} {'bound':>10} {'ratio':>8} {'<=1%':>5}  method"
    print(header)
    for r in rows:
        met = "-" if r.target_ratio_met is None else ("yes" if r.target_ratio_met else "NO")
        print(
            f"{r.suite:<28} {r.tests:>7} {r.shards:>3} {r.by:>5} {r.units_per_shard:>7} "
            f"{r.seconds:>7.3f}s {r.makespan:>10.2f} {r.lower_bound:>10.2f} {r.ratio:>8.5f} "
            f"{met:>5}  {r.method}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("smoke", "full"), default="full")
    parser.add_argument("--json", type=pathlib.Path, default=HERE / "split_results.json")
    parser.add_argument("--e2e", action="store_true", help="also run the sample project sharded")
    args = parser.parse_args(argv)
    rows = run_benchmarks(args.size)
    print_table(rows)
    result: dict[str, object] = {"size": args.size, "rows": [asdict(r) for r in rows]}
    big = [r for r in rows if r.tests >= 100_000 and r.shards == 64 and r.by == "test"]
    if big:
        print(f"100,000 tests into 64 shards: {big[0].seconds:.3f}s (target < 1s)")
    if args.e2e:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            e2e = run_e2e(pathlib.Path(tmp))
        result["e2e"] = e2e
        print(
            f"sample project, {e2e['shards']} shards: slowest shard wall {e2e['slowest_wall']}s "
            f"(predicted makespan {e2e['predicted_makespan']}s, start-up included; "
            f"unsharded run {e2e['full_run_wall']}s)"
        )
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    worst = [r for r in rows if r.target_ratio_met is False]
    return 1 if worst else 0


if __name__ == "__main__":
    raise SystemExit(main())
