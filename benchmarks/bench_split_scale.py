"""The splitter at 100,000 tests: the CLI end to end, the split server's GetShard, and
the pytest plugin's collection-time work beside pytest-split's.

    python -m benchmarks.bench_split_scale [--smoke] [--tests N] [--shards N] [--json PATH]
                                           [--record-hashes PATH] [--no-server] [--no-plugin]
                                           [--cwd CHECKOUT] [--repeat N]

Inputs come from benchmarks/split_scale_suite.py (deterministic: seed 23): N test ids
and JUnit reports of an earlier run (about 11 MB at 100,000 tests).

- cli: ``slipstream split --total S --index 3 --junit run1.xml < ids.txt`` as a child
  process, for ``--by auto`` and ``--by test``; wall time, and the child's CPU time and peak RSS
  (``resource.getrusage(RUSAGE_CHILDREN)``, one child per measurement process). Each plan
  hash is checked against the recorded one (tests/splitter/data/plan_hashes.json,
  recorded before the speed-up of issue 23) when one is recorded for the size. With
  ``--cwd CHECKOUT`` the child runs that checkout's code (an older commit, for a before
  and after); ``--repeat N`` keeps the least wall and CPU time of N runs.
- server: a ``slipstream serve`` process; one client uploads the JUnit timings, then
  GetShard for shard 3 (the first call of a run makes its plan) and for shard 4 (the
  plan already made); wall time per call and the server's RSS from /proc.
- plugin: ``pytest --collect-only -q`` over a generated project of the same N tests
  (bodies ``pass``), plain, with slipstream's ``--shard-total S --shard-index 3`` and
  with pytest-split's ``--splits S --group 4`` (from its durations file made from the
  same timings); the difference from the plain run is each plugin's own work.

``--record-hashes PATH`` writes the plan hashes of every (timings, --by, --total)
combination instead (see ``hash_cases``): how the hashes in the test data were made.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from benchmarks.bench_split_peers import cache_dir, load_pytest_split
from benchmarks.split_scale_suite import make_suite, write_inputs
from slipstream.splitter import junit
from slipstream.splitter.ids import node_id

HERE = pathlib.Path(__file__).parent
REPO = HERE.parent
HASHES = REPO / "tests" / "splitter" / "data" / "plan_hashes.json"
TIMINGS = ("none", "run1", "run1+run2")
BYS = ("auto", "test", "file")
TOTALS = (8, 64)


def hash_cases() -> list[tuple[str, str, int]]:
    """Every (timings, --by, --total) whose plan hash is recorded."""
    return [(t, by, n) for t in TIMINGS for by in BYS for n in TOTALS]


def split_args(
    directory: pathlib.Path, timings: str, by: str, total: int, index: int = 3
) -> list[str]:
    """``slipstream split`` arguments for a case over the inputs in directory."""
    args = ["split", "--total", str(total), "--index", str(index), "--by", by]
    if timings == "none":
        args += ["--storage-dir", str(directory / "empty-history")]
    for name in timings.split("+") if timings != "none" else []:
        args += ["--junit", str(directory / f"{name}.xml")]
    return args


@dataclass
class CliRun:
    by: str
    shards: int
    seconds: float
    cpu_seconds: float  # user + system: what a loaded machine's wall time hides
    peak_rss_mb: float
    plan_hash: str
    hash_recorded: str | None


def run_cli(
    directory: pathlib.Path, args: Sequence[str], python: str = sys.executable, cwd: str = ""
) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS MB, plan hash, CPU seconds) of one ``slipstream split``
    child process.

    The peak RSS and the CPU time are measured in a fresh measuring process
    (RUSAGE_CHILDREN keeps the largest child so far), so each figure is of this one run.
    """
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "args, stdin = json.loads(sys.argv[1]), open(sys.argv[2], 'rb')\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(args, stdin=stdin, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.PIPE, cwd=sys.argv[3] or None)\n"
        "wall = time.perf_counter() - t\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "rss, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime\n"
        "print(json.dumps([p.returncode, wall, rss, cpu, p.stderr.decode()]))\n"
    )
    cmd = [python, "-m", "slipstream.cli", *args]
    out = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(cmd), str(directory / "ids.txt"), cwd],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    code, wall, rss, cpu, err = json.loads(out)
    if code != 0:
        raise RuntimeError(f"slipstream split failed ({code}): {err.strip()}")
    return wall, rss, err.rsplit("plan ", 1)[1].strip(), cpu


def record_hashes(directory: pathlib.Path, python: str, cwd: str) -> dict[str, str]:
    return {
        f"{t}/{by}/{n}": run_cli(directory, split_args(directory, t, by, n), python, cwd)[2]
        for t, by, n in hash_cases()
    }


def prepare(directory: pathlib.Path, tests: int) -> None:
    write_inputs(directory, tests)
    (directory / "empty-history").mkdir(exist_ok=True)


def recorded_hashes(tests: int) -> dict[str, str]:
    if not HASHES.exists():
        return {}
    got: dict[str, str] = json.loads(HASHES.read_text()).get(str(tests), {})
    return got


def bench_cli(
    directory: pathlib.Path, tests: int, shards: int, cwd: str = "", repeat: int = 1
) -> list[CliRun]:
    """``--by auto`` and ``--by test`` by the code in cwd (this checkout's when empty):
    the least wall and CPU time of ``repeat`` runs, and the largest peak RSS."""
    recorded = recorded_hashes(tests)
    rows = []
    for by in ("auto", "test"):
        args = split_args(directory, "run1", by, shards)
        runs = [run_cli(directory, args, cwd=cwd) for _ in range(repeat)]
        wall, rss, got = min(r[0] for r in runs), max(r[1] for r in runs), runs[0][2]
        cpu = min(r[3] for r in runs)
        if any(r[2] != got for r in runs):
            raise AssertionError(f"--by {by}: plans {sorted({r[2] for r in runs})} in one run")
        expected = recorded.get(f"run1/{by}/{shards}")
        if expected is not None and got != expected:
            raise AssertionError(f"--by {by}: plan {got}, recorded {expected}")
        rows.append(CliRun(by, shards, round(wall, 3), round(cpu, 3), round(rss, 1), got, expected))
    return rows


@dataclass
class ServerRun:
    tests: int
    shards: int
    upload_seconds: float
    first_get_shard_seconds: float  # makes and pins the plan
    next_get_shard_seconds: float  # the pinned plan
    server_rss_mb: float  # after the calls, from /proc
    plan_hash: str
    # The server's CPU time (user + system, from /proc) during each call: on a loaded
    # machine the wall times also hold the other processes' turns.
    upload_cpu_seconds: float = 0.0
    first_get_shard_cpu_seconds: float = 0.0
    next_get_shard_cpu_seconds: float = 0.0


def bench_server(directory: pathlib.Path, shards: int, cwd: str = "") -> ServerRun:
    """Upload the JUnit timings to a ``slipstream serve`` (of the code in cwd, this
    checkout's when empty), then GetShard twice."""
    from slipstream.client.split_client import RunSpec, SplitClient
    from tests.support.proc_stats import cpu_seconds, rss_bytes
    from tests.support.server_process import ServerProcess

    ids = (directory / "ids.txt").read_text().split()
    server = ServerProcess(directory / "store", cwd=cwd or None).start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        with SplitClient(server.address, call_timeout=300.0) as client:
            cpu, started = cpu_seconds(pid), time.perf_counter()
            client.upload_timings("scale", "r1", [(directory / "run1.xml").read_bytes()])
            upload = time.perf_counter() - started
            upload_cpu = cpu_seconds(pid) - cpu
            cpu, started = cpu_seconds(pid), time.perf_counter()
            first = client.get_shard(RunSpec("scale", "run-1", 3, shards, ids))
            first_s = time.perf_counter() - started
            first_cpu = cpu_seconds(pid) - cpu
            cpu, started = cpu_seconds(pid), time.perf_counter()
            second = client.get_shard(RunSpec("scale", "run-1", 4, shards, ids))
            second_s = time.perf_counter() - started
            second_cpu = cpu_seconds(pid) - cpu
            assert first.plan_hash == second.plan_hash
            rss = rss_bytes(server.proc.pid) / (1 << 20)
    finally:
        server.stop()
    return ServerRun(
        len(ids),
        shards,
        round(upload, 3),
        round(first_s, 3),
        round(second_s, 3),
        round(rss, 1),
        first.plan_hash,
        round(upload_cpu, 3),
        round(first_cpu, 3),
        round(second_cpu, 3),
    )


@dataclass
class PluginRun:
    plugin: str
    seconds: float  # pytest --collect-only, whole process
    own_seconds: float  # beyond the plain collection
    selected: int


def write_project(directory: pathlib.Path, tests: int) -> pathlib.Path:
    """A pytest project whose node ids are the suite's (bodies ``pass``), and
    pytest-split's durations file of run1.xml's timings."""
    root = directory / "project"
    files: dict[str, dict[str, list[str]]] = {}  # file -> class ("" for none) -> names
    for test_id in make_suite(tests).ids:
        base, bracket, params = test_id.partition("[")
        parts = base.split("::")  # file, [class,] name
        cls = parts[1] if len(parts) == 3 else ""
        files.setdefault(parts[0], {}).setdefault(cls, []).append(parts[-1] + bracket + params)
    for path, by_class in files.items():
        lines = ["import pytest", ""]
        for cls, names in by_class.items():
            indent = "    " if cls else ""
            if cls:
                lines.append(f"class {cls}:")
            for name in names:
                base, _, param = name.partition("[")
                if param:
                    lines.append(
                        f"{indent}@pytest.mark.parametrize('p', [0], ids=[{param[:-1]!r}])"
                    )
                    lines.append(f"{indent}def {base}({'self, ' if cls else ''}p): pass")
                else:
                    lines.append(f"{indent}def {base}({'self' if cls else ''}): pass")
            lines.append("")
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(lines))
    (root / "pytest.ini").write_text("[pytest]\n")
    report = junit.read_reports([directory / "run1.xml"])[0][0]
    durations = {node_id(c): c.time or 0.0 for c in report.cases if c.outcome != "skipped"}
    (directory / "durations.json").write_text(json.dumps(durations))
    return root


def bench_plugin(directory: pathlib.Path, tests: int, shards: int) -> list[PluginRun]:
    """``pytest --collect-only -q``: plain, with slipstream's split, with pytest-split's."""
    root = write_project(directory, tests)
    load_pytest_split()
    # pytest-split's entry point loads its plugin: on the path for its own run only.
    with_split = dict(os.environ, PYTHONPATH=str(cache_dir() / "pytest-split"))
    base = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    runs = {
        "plain": [*base, "-p", "no:xdist"],
        "slipstream": [
            *base,
            "-p",
            "no:xdist",
            f"--shard-total={shards}",
            "--shard-index=3",
            f"--shard-timings={directory / 'run1.xml'}",
        ],
        "pytest-split": [
            *base,
            "-p",
            "no:xdist",
            f"--splits={shards}",
            "--group=4",
            f"--durations-path={directory / 'durations.json'}",
        ],
    }
    out: list[PluginRun] = []
    plain = 0.0
    for name, cmd in runs.items():
        started = time.perf_counter()
        env = with_split if name == "pytest-split" else None
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(
                f"{name}: pytest exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"
            )
        selected = sum(1 for line in done.stdout.splitlines() if "::" in line)
        plain = seconds if name == "plain" else plain
        out.append(PluginRun(name, round(seconds, 3), round(seconds - plain, 3), selected))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="2,000 tests, 8 shards")
    p.add_argument("--tests", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--json", type=pathlib.Path, help="write the results here")
    p.add_argument("--record-hashes", type=pathlib.Path, metavar="PATH")
    p.add_argument("--python", default=sys.executable, help="for --record-hashes")
    p.add_argument(
        "--cwd",
        default="",
        help="the code to run (a checkout's root; default this one's): the CLI part, the "
        "server and --record-hashes",
    )
    p.add_argument("--repeat", type=int, default=1, help="CLI runs: the fastest of N")
    p.add_argument("--no-server", action="store_true")
    p.add_argument("--no-plugin", action="store_true")
    p.add_argument("--plugin-tests", type=int, help="tests of the plugin part (default --tests)")
    args = p.parse_args(argv)
    tests, shards = (2_000, 8) if args.smoke else (args.tests, args.shards)
    plugin_tests = 500 if args.smoke else args.plugin_tests or tests
    with tempfile.TemporaryDirectory(prefix="split-scale-") as tmp:
        directory = pathlib.Path(tmp)
        prepare(directory, tests)
        if args.record_hashes:
            hashes = record_hashes(directory, args.python, args.cwd)
            old = json.loads(args.record_hashes.read_text()) if args.record_hashes.exists() else {}
            old[str(tests)] = hashes
            args.record_hashes.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
            print(json.dumps(hashes, indent=1))
            return 0
        result: dict[str, object] = {"tests": tests, "shards": shards}
        cli = bench_cli(directory, tests, shards, args.cwd, args.repeat)
        result["cli"] = [asdict(r) for r in cli]
        print(f"{'--by':<6} {'wall s':>7} {'CPU s':>6} {'peak RSS MB':>12}  plan")
        for r in cli:
            print(
                f"{r.by:<6} {r.seconds:>7.3f} {r.cpu_seconds:>6.3f} {r.peak_rss_mb:>12.1f}  "
                f"{r.plan_hash}"
            )
        if not args.no_server:
            server = bench_server(directory, shards, args.cwd)
            result["server"] = asdict(server)
            print(
                f"server: upload {server.upload_seconds:.3f}s "
                f"(CPU {server.upload_cpu_seconds:.3f}s), GetShard first (plans) "
                f"{server.first_get_shard_seconds:.3f}s "
                f"(CPU {server.first_get_shard_cpu_seconds:.3f}s), "
                f"next {server.next_get_shard_seconds:.3f}s "
                f"(CPU {server.next_get_shard_cpu_seconds:.3f}s), RSS {server.server_rss_mb:.0f} MB"
            )
        if not args.no_plugin:
            plugin_dir = directory / "plugin"
            prepare(plugin_dir, plugin_tests)
            plugin = bench_plugin(plugin_dir, plugin_tests, shards)
            result["plugin"] = {"tests": plugin_tests, "runs": [asdict(p) for p in plugin]}
            print(f"pytest --collect-only over {plugin_tests} tests, {shards} shards:")
            for run in plugin:
                print(
                    f"  {run.plugin:<13} {run.seconds:>7.3f}s  own {run.own_seconds:>6.3f}s  "
                    f"{run.selected} selected"
                )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
