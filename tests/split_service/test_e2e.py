"""Real processes: a `slipstream serve`, and pytest shard processes over the sample project
(benchmarks.bench_split's) asking it for their shard or pulling from its queue."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.bench_split import make_sample_project, run_pytest, run_shard
from slipstream.client.split_client import SplitClient
from tests.splitter.test_plugin import collected_ids, junit_ids
from tests.support.server_process import ServerProcess, free_port

TOTAL = 3
HANG = """
import os, pathlib, time

def pytest_runtest_call(item):
    if item.nodeid == os.environ.get("HANG_ON"):
        pathlib.Path(os.environ["HANG_MARKER"]).write_text("hanging")
        time.sleep(600)
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("sample")
    make_sample_project(root)
    (root / "conftest.py").write_text(HANG)
    return root


@pytest.fixture(scope="module")
def all_ids(project: pathlib.Path) -> list[str]:
    return collected_ids(project)


def server_args(server: ServerProcess, run_key: str, suite: str) -> list[str]:
    return [f"--shard-server={server.address}", "--run-key", run_key, "--shard-suite", suite]


def shards_ran(project: pathlib.Path, indexes) -> collections.Counter[str]:
    return collections.Counter(t for i in indexes for t in junit_ids(project / f"shard-{i}.xml"))


def test_concurrent_shards_run_every_test_exactly_once(project, all_ids, shared_server):
    args = server_args(shared_server, "static-1", "e2e")
    with concurrent.futures.ThreadPoolExecutor(TOTAL) as pool:
        shards = list(pool.map(lambda i: run_shard(project, i, TOTAL, *args), range(TOTAL)))
    for s in shards:
        assert s.returncode == 0, s.output
        assert "(server)" in s.output and s.slipstream_warnings == []
    assert len({s.plan_hash for s in shards}) == 1 and shards[0].plan_hash
    ran = shards_ran(project, range(TOTAL))
    assert sorted(ran) == sorted(all_ids) and set(ran.values()) == {1}


def test_runners_that_collected_different_tests_get_a_clear_error(project, shared_server):
    args = server_args(shared_server, "static-2", "e2e")
    first = run_shard(project, 0, 2, *args)
    assert first.returncode == 0, first.output
    other = run_shard(project, 1, 2, *args, "-k", "not test_fast")
    assert other.returncode == 4  # pytest's usage error: nothing ran
    assert "this runner collected 25 tests, the plan pinned for this run has 55" in other.output
    assert "30 planned but not collected here" in other.output
    assert "Traceback" not in other.output


def test_queue_survives_a_runner_killed_mid_run(project, all_ids, shared_server, tmp_path):
    args = [*server_args(shared_server, "queue-1", "e2e-queue"), "--queue", "--lease-timeout=3"]
    marker = tmp_path / "hanging"
    env = dict(
        os.environ,
        HANG_ON="tests/test_slow.py::test_slow[4]",
        HANG_MARKER=str(marker),
        PYTHONUNBUFFERED="1",
    )
    env = {k: v for k, v in env.items() if not k.startswith(("PYTEST_", "COV_"))}
    cmd = [sys.executable, "-m", "pytest", "-q", "--shard-index", "0", "--shard-total", "2"]
    doomed = subprocess.Popen(
        [*cmd, *args, "--shard-junit", "shard-0.xml"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline and doomed.poll() is None
            time.sleep(0.05)
        os.kill(doomed.pid, signal.SIGKILL)  # mid-test, with a lease outstanding
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    with SplitClient(shared_server.address) as client:
        before = client.status("e2e-queue", "queue-1")
    assert 0 < before.completed < 55  # it had finished batches before it died
    survivor = run_shard(project, 1, 2, *args)
    assert survivor.returncode == 0, survivor.output
    assert "queue finished" in survivor.output
    with SplitClient(shared_server.address) as client:
        after = client.status("e2e-queue", "queue-1")
    results = [r.test_id for r in after.results]
    assert sorted(results) == sorted(all_ids)  # each test once, every test completed
    assert after.completed == 55 and list(after.abandoned) == []
    # What the survivor ran plus what the dead runner completed: everything.
    survivor_ran = set(junit_ids(project / "shard-1.xml"))
    assert "tests/test_slow.py::test_slow[4]" in survivor_ran
    assert survivor_ran | {r.test_id for r in before.results} == set(all_ids)
    assert all(s.plan_hash == after.plan_hash for s in [survivor])


@pytest.mark.parametrize("queue", [False, True])
def test_server_down_falls_back_and_runs_every_test_once(project, all_ids, queue):
    args = [
        f"--shard-server=127.0.0.1:{free_port()}",
        "--run-key",
        "down",
        "--shard-connect-timeout=2",
    ]
    if queue:
        args.append("--queue")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        shards = list(pool.map(lambda i: run_shard(project, i, 2, *args), range(2)))
    for s in shards:
        assert s.returncode == 0, s.output
        warnings = s.slipstream_warnings
        assert len(warnings) == 1 and "cannot reach the server" in warnings[0]
        assert "split locally by a hash of test ids" in warnings[0]
    assert time.monotonic() - started < 40
    assert shards[0].plan_hash == shards[1].plan_hash
    ran = shards_ran(project, range(2))
    assert sorted(ran) == sorted(all_ids) and set(ran.values()) == {1}


def test_cli_shard_and_timings_upload(project, all_ids, shared_server, tmp_path):
    ids = "\n".join(all_ids) + "\n"
    base = [sys.executable, "-m", "slipstream.cli"]
    server = ["--server", shared_server.address]
    # A report of its own: tests in this module may run on other xdist workers.
    run_pytest(project, "-q", "-p", "no:slipstream_split", f"--junitxml={tmp_path / 't.xml'}")
    up = subprocess.run(
        [*base, "timings", "upload", *server, "--suite", "cli", str(tmp_path / "t.xml")],
        capture_output=True,
        text=True,
    )
    assert up.returncode == 0 and "uploaded 1 reports" in up.stdout, up.stderr
    out = [
        subprocess.run(
            [
                *base,
                "shard",
                *server,
                "--suite",
                "cli",
                "--run-key",
                "k",
                "--index",
                str(i),
                "--total",
                "2",
            ],
            input=ids,
            capture_output=True,
            text=True,
        )
        for i in range(2)
    ]
    assert all(o.returncode == 0 for o in out), out[0].stderr
    assert sorted(out[0].stdout.split("\n")[:-1] + out[1].stdout.split("\n")[:-1]) == sorted(
        all_ids
    )
    bad = subprocess.run(
        [
            *base,
            "shard",
            *server,
            "--suite",
            "cli",
            "--run-key",
            "k",
            "--index",
            "0",
            "--total",
            "2",
        ],
        input="\n".join(all_ids[1:]),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "1 planned but not collected here" in bad.stderr
    usage = subprocess.run(
        [*base, "shard", "--run-key", "k", "--index", "0"], capture_output=True, text=True
    )
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1
