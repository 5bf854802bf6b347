"""Slipstream's split beside its peers, judged on a later run's real durations.

    python -m benchmarks.bench_split_peers [--smoke] [--record] [--suites slipstream,attrs]
                                           [--no-real] [--json PATH]

The same timing history (an earlier recorded run, JUnit XML in benchmarks/data/) is split by:
  slipstream      splitter.history.estimate + splitter.algorithm.split_tests, its default
                  units (auto: whole files, cut only when longer than total / N)
  slipstream:by-test   the same with single tests as units (--shard-by test)
  pytest-split:duration_based_chunks   pytest-split 0.11's default
  pytest-split:least_duration          pytest-split 0.11's LPT
  round-robin     collection order, test i to shard i mod N, no timings
  lpt             plain LPT over per-test times (unknown tests: the mean)
Every split is made for the tests of a LATER recorded run (in its collection order, as
pytest-split sees them) and judged on that run's actual per-test durations: the makespan
(slowest shard's sum) over the lower bound max(total / N, longest test), N = 2..32.
For N = 4 and 8 each shard is then really run (`python -m pytest @args-file`, node ids in
the file) one at a time, interleaved across splitters (shard 0 of each, then shard 1 of
each, ...), timing each whole process, start-up and collection included: the slowest
shard is what a CI job waits for. Its ratio is over the unsplit run's wall time / N,
measured just before.

Suites: this project's own (tests/splitter tests/cache_server) and attrs (its sdist, whose
tests run offline, for the attrs version installed here). `--record` re-records both runs
of each suite into benchmarks/data/ (they are recorded if missing).
"""

from __future__ import annotations

import argparse
import heapq
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.bench_cache import machine
from slipstream.splitter import history, junit
from slipstream.splitter.algorithm import Granularity, split_tests
from slipstream.splitter.ids import JUnitCase, node_id

HERE = pathlib.Path(__file__).parent
REPO = HERE.parent
DATA = HERE / "data"
PYTEST_SPLIT = "pytest-split==0.11.0"
SHARD_COUNTS = (2, 4, 8, 16, 32)
REAL_COUNTS = (4, 8)
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected)")


def cache_dir() -> pathlib.Path:
    """$SLIPSTREAM_BENCH_CACHE, else ~/.cache/slipstream-bench (or under $XDG_CACHE_HOME)."""
    if os.environ.get("SLIPSTREAM_BENCH_CACHE"):
        return pathlib.Path(os.environ["SLIPSTREAM_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "slipstream-bench"


@dataclass
class Suite:
    name: str
    root: pathlib.Path
    args: list[str]  # what selects the whole suite
    common: list[str] = field(default_factory=list)  # given to every run, whole or shard
    pythonpath: list[str] = field(default_factory=list)  # ahead of the environment's


def own_suite() -> Suite:
    return Suite(
        "slipstream",
        REPO,
        ["tests/splitter", "tests/cache_server"],
        ["-p", "no:randomly", "-p", "no:cacheprovider"],
        # This checkout's generated code, whichever checkout is installed in editable mode.
        [str(REPO / "proto"), str(REPO)],
    )


def attrs_suite() -> Suite:
    """attrs' own tests from its sdist (same version as the installed attrs)."""
    import attrs

    version = attrs.__version__
    root = cache_dir() / "oss" / f"attrs-{version}"
    if not (root / "tests").is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"attrs=={version}",
                    "-d",
                    tmp,
                ],
                check=True,
            )
            (sdist,) = pathlib.Path(tmp).glob("attrs-*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(root.parent, filter="data")
    return Suite(
        "attrs",
        root,
        ["tests"],
        [
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            # Fails here whatever the split (a newer Python than attrs expects).
            "--deselect",
            "tests/test_converters.py::TestPipe::test_wrapped_annotation",
        ],
    )


_SAMPLE = {
    "tests/__init__.py": "",
    "tests/test_slow.py": """
        import time
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_slow(i):
            time.sleep(0.05 * (i + 1))
    """,
    "tests/test_fast.py": """
        import pytest

        @pytest.mark.parametrize("x", ["a b", "c::d", "e'f", "g#h"])
        def test_fast(x):
            assert x

        class TestC:
            def test_one(self):
                pass
    """,
}


def sample_suite(root: pathlib.Path) -> Suite:
    """A tiny project for the smoke run."""
    for rel, text in _SAMPLE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    (root / "pytest.ini").write_text("[pytest]\n")
    return Suite("sample", root, ["tests"], ["-p", "no:randomly", "-p", "no:cacheprovider"])


def _env(suite: Suite) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    if suite.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*suite.pythonpath, env.get("PYTHONPATH", "")])
    return env


def run_pytest(suite: Suite, args: Sequence[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of one whole pytest process."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *suite.common, *args],
        cwd=suite.root,
        env=_env(suite),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return time.perf_counter() - started, proc


def record(suite: Suite, data: pathlib.Path, runs: int = 2) -> None:
    """Run the whole suite `runs` times, keeping each JUnit report and its wall time."""
    data.mkdir(parents=True, exist_ok=True)
    walls = []
    for i in range(1, runs + 1):
        out = data / f"{suite.name}-run{i}.xml"
        print(f"recording {suite.name} run {i} ...", flush=True)
        wall, proc = run_pytest(suite, [*suite.args, f"--junitxml={out}"])
        if not out.exists():
            raise RuntimeError(f"{suite.name}: no JUnit report\n{proc.stdout[-3000:]}")
        walls.append(round(wall, 3))
    meta = {
        "suite": suite.name,
        "args": suite.args,
        "common": suite.common,
        "walls": walls,
        "machine": machine(),
    }
    (data / f"{suite.name}-runs.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_run(path: pathlib.Path) -> tuple[list[str], dict[str, float], list[JUnitCase]]:
    """Node ids in collection order, their durations, and the raw cases."""
    reports, warnings = junit.read_reports([path])
    if warnings:
        raise RuntimeError("; ".join(warnings))
    cases = [c for r in reports for c in r.cases if c.classname]  # "" = skipped at collection
    order: list[str] = []
    times: dict[str, float] = {}
    for case in cases:
        nid = node_id(case)
        if nid not in times:
            order.append(nid)
        times[nid] = times.get(nid, 0.0) + (case.time or 0.0)
    return order, times, cases


# ---- the splitters: (tests in collection order, history cases, n) -> shards of ids ----

Splitter = Callable[[list[str], list[JUnitCase], int], list[list[str]]]


def _history_times(cases: list[JUnitCase]) -> dict[str, float]:
    """What pytest-split's durations file would hold: the last run's time per test."""
    return {node_id(c): c.time or 0.0 for c in cases if c.outcome != "skipped"}


def slipstream(by: Granularity) -> Splitter:
    def split(tests: list[str], cases: list[JUnitCase], n: int) -> list[list[str]]:
        est = history.estimate(tests, [history.run_from_cases(cases)])
        plan = split_tests(est.tests, n, by, file_costs=est.file_costs)
        shard_of = plan.shard_of()
        shards: list[list[str]] = [[] for _ in range(n)]
        for t in tests:
            shards[shard_of[t]].append(t)
        return shards

    return split


def load_pytest_split() -> Any:
    """pytest_split.algorithms, installed into the benchmark cache (not the environment,
    so its plugin does not load into every pytest run here)."""
    target = cache_dir() / "pytest-split"
    if not (target / "pytest_split").is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                PYTEST_SPLIT,
            ],
            check=True,
        )
    if str(target) not in sys.path:
        sys.path.append(str(target))
    return importlib.import_module("pytest_split.algorithms")


@dataclass(frozen=True)
class _Item:
    """The part of a pytest Item that pytest-split's algorithms read."""

    nodeid: str


def pytest_split(name: str) -> Splitter:
    algorithm = load_pytest_split().Algorithms[name].value

    def split(tests: list[str], cases: list[JUnitCase], n: int) -> list[list[str]]:
        groups = algorithm(n, [_Item(t) for t in tests], _history_times(cases))
        return [[item.nodeid for item in g.selected] for g in groups]

    return split


def split_round_robin(tests: list[str], cases: list[JUnitCase], n: int) -> list[list[str]]:
    return [tests[i::n] for i in range(n)]


def split_lpt(tests: list[str], cases: list[JUnitCase], n: int) -> list[list[str]]:
    known = _history_times(cases)
    mean = sum(known.values()) / len(known) if known else 1.0
    times = {t: known.get(t, mean) for t in tests}
    heap = [(0.0, s) for s in range(n)]
    shards: list[list[str]] = [[] for _ in range(n)]
    for t in sorted(tests, key=lambda t: (-times[t], t)):
        load, s = heapq.heappop(heap)
        shards[s].append(t)
        heapq.heappush(heap, (load + times[t], s))
    return shards


def splitters() -> dict[str, Splitter]:
    return {
        "slipstream": slipstream("auto"),
        "slipstream:by-test": slipstream("test"),
        "pytest-split:duration_based_chunks": pytest_split("duration_based_chunks"),
        "pytest-split:least_duration": pytest_split("least_duration"),
        "round-robin": split_round_robin,
        "lpt": split_lpt,
    }


# ---- evaluation ----


@dataclass
class Quality:
    suite: str
    n: int
    splitter: str
    makespan: float  # seconds, the later run's durations summed per shard
    lower_bound: float
    ratio: float
    empty_shards: int


def evaluate(
    suite: str, name: str, shards: list[list[str]], actual: dict[str, float], n: int
) -> Quality:
    loads = [sum(actual[t] for t in shard) for shard in shards]
    bound = max(sum(actual.values()) / n, max(actual.values(), default=0.0))
    makespan = max(loads, default=0.0)
    return Quality(
        suite,
        n,
        name,
        round(makespan, 3),
        round(bound, 3),
        round(makespan / bound, 4) if bound else 1.0,
        sum(1 for s in shards if not s),
    )


@dataclass
class RealRun:
    suite: str
    n: int
    splitter: str
    walls: list[float]  # each shard's whole process, seconds
    slowest: float
    ideal: float  # the unsplit run's wall / n
    ratio: float
    tests_run: int
    tests_planned: int
    unsplit_wall: float  # measured just before this N's shards


def _count(output: str) -> int:
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return sum(int(m.group(1)) for m in _SUMMARY.finditer(tail) if m.group(2) != "deselected")


def run_shard(
    suite: Suite, shard: list[str], args_file: pathlib.Path, label: str
) -> tuple[float, int]:
    """One shard as a whole pytest process: its wall time and how many tests it ran."""
    if not shard:
        return 0.0, 0
    args_file.write_text("".join(f"{t}\n" for t in shard))
    wall, proc = run_pytest(suite, [f"@{args_file}"])
    if proc.returncode not in (0, 1):  # 1: some test failed, which the split cannot cause
        raise RuntimeError(f"{label}: exit {proc.returncode}\n{proc.stdout[-3000:]}")
    return round(wall, 3), _count(proc.stdout)


def run_real(
    suite: Suite,
    plans: dict[tuple[str, int], list[list[str]]],
    names: Sequence[str],
    n: int,
    workdir: pathlib.Path,
) -> tuple[float, list[RealRun]]:
    """The unsplit run, then every splitter's shards, interleaved (shard 0 of each
    splitter, then shard 1 of each, ...) so that load from elsewhere on the machine
    falls on all splitters alike rather than on whichever ran at the time."""
    print(f"{suite.name}: the unsplit run, then {n} shards of each splitter ...", flush=True)
    full_wall, _ = run_pytest(suite, suite.args)
    walls: dict[str, list[float]] = {name: [] for name in names}
    ran = dict.fromkeys(names, 0)
    for i in range(n):
        for name in names:
            args_file = workdir / f"{suite.name}-{name.replace(':', '_')}-{n}-{i}.args"
            wall, count = run_shard(suite, plans[name, n][i], args_file, f"{name} {i}/{n}")
            walls[name].append(wall)
            ran[name] += count
    ideal = full_wall / n
    return full_wall, [
        RealRun(
            suite.name,
            n,
            name,
            walls[name],
            max(walls[name]),
            round(ideal, 3),
            round(max(walls[name]) / ideal, 4),
            ran[name],
            sum(len(s) for s in plans[name, n]),
            round(full_wall, 3),
        )
        for name in names
    ]


def run_suite(
    suite: Suite,
    data: pathlib.Path,
    counts: Sequence[int],
    real_counts: Sequence[int],
    force_record: bool,
) -> dict[str, object]:
    if force_record or not all((data / f"{suite.name}-run{i}.xml").exists() for i in (1, 2)):
        record(suite, data)
    _, _, hist_cases = read_run(data / f"{suite.name}-run1.xml")
    tests, actual, _ = read_run(data / f"{suite.name}-run2.xml")
    algos = splitters()
    quality = []
    plans: dict[tuple[str, int], list[list[str]]] = {}
    for n in counts:
        for name, fn in algos.items():
            shards = fn(tests, hist_cases, n)
            assert sorted(t for s in shards for t in s) == sorted(tests), name
            plans[name, n] = shards
            quality.append(evaluate(suite.name, name, shards, actual, n))
    real: list[RealRun] = []
    full_wall = None
    if real_counts:
        with tempfile.TemporaryDirectory() as tmp:
            for n in real_counts:
                full_wall, runs = run_real(suite, plans, list(algos), n, pathlib.Path(tmp))
                real += runs
    return {
        "suite": suite.name,
        "tests": len(tests),
        "later_run_total": round(sum(actual.values()), 3),
        "history_tests_unknown_in_later_run": len(set(tests) - set(_history_times(hist_cases))),
        "unsplit_wall": round(full_wall, 3) if full_wall is not None else None,
        "quality": [asdict(q) for q in quality],
        "real": [asdict(r) for r in real],
    }


def print_tables(results: list[dict[str, Any]]) -> None:
    for res in results:
        print(
            f"\n{res['suite']}: {res['tests']} tests, {res['later_run_total']:.1f}s of tests in "
            "the later run; makespan / lower bound on its actual durations"
        )
        quality = res["quality"]
        names = list(dict.fromkeys(q["splitter"] for q in quality))
        counts = sorted({q["n"] for q in quality})
        print(f"{'splitter':<36}" + "".join(f"{'N=' + str(n):>9}" for n in counts))
        for name in names:
            cells = {q["n"]: q for q in quality if q["splitter"] == name}
            row = "".join(
                f"{cells[n]['ratio']:>8.3f}{'*' if cells[n]['empty_shards'] else ' '}"
                for n in counts
            )
            print(f"{name:<36}{row}")
        print("(* = some shards empty)")
        if res["real"]:
            print(
                f"\n{res['suite']}: shards really run (unsplit run: "
                + ", ".join(f"{r['unsplit_wall']:.1f}s" for r in res["real"][:: len(names)])
                + "). Slowest shard's whole process, and over unsplit/N:"
            )
            print(f"{'splitter':<36} {'N':>3} {'slowest':>9} {'ratio':>7} {'ran':>6}  shard walls")
            for r in res["real"]:
                walls = " ".join(f"{w:.1f}" for w in r["walls"])
                ran = f"{r['tests_run']}/{r['tests_planned']}"
                print(
                    f"{r['splitter']:<36} {r['n']:>3} {r['slowest']:>8.1f}s {r['ratio']:>7.3f} "
                    f"{ran:>6}  {walls}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny generated suite only")
    parser.add_argument("--suites", default="slipstream,attrs", help="from slipstream,attrs")
    parser.add_argument("--record", action="store_true", help="re-record the two runs")
    parser.add_argument("--no-real", action="store_true", help="skip really running shards")
    parser.add_argument("--data", type=pathlib.Path, default=DATA, help="recorded runs")
    parser.add_argument(
        "--json", type=pathlib.Path, default=HERE / "split_peers_results.json", help="results"
    )
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            suite = sample_suite(pathlib.Path(tmp) / "sample")
            data = pathlib.Path(tmp) / "data"
            results.append(run_suite(suite, data, (2, 4), () if args.no_real else (2,), True))
        else:
            makers = {"slipstream": own_suite, "attrs": attrs_suite}
            for name in args.suites.split(","):
                suite = makers[name]()
                real = () if args.no_real else REAL_COUNTS
                results.append(run_suite(suite, args.data, SHARD_COUNTS, real, args.record))
    print_tables(results)
    out = {"machine": machine(), "pytest_split": PYTEST_SPLIT, "suites": results}
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
