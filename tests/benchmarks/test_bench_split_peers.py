"""The splitter-versus-peers benchmark keeps working (a tiny generated suite; no timing
assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_split_peers
from tests.suite_cache import suite_cache_dir


def test_split_peers_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "split.json"
    assert bench_split_peers.main(["--smoke", "--json", str(out)]) == 0
    (suite,) = json.loads(out.read_text())["suites"]
    names = {q["splitter"] for q in suite["quality"]}
    assert names == {
        "slipstream",
        "slipstream:by-test",
        "pytest-split:duration_based_chunks",
        "pytest-split:least_duration",
        "round-robin",
        "lpt",
    }
    assert all(q["ratio"] >= 1.0 for q in suite["quality"])
    # Every shard really ran every test it was given (ids with spaces, '::', quotes, '#').
    assert all(r["tests_run"] == r["tests_planned"] == suite["tests"] for r in suite["real"])


def test_every_splitter_partitions_the_tests() -> None:
    tests = [f"tests/test_{i % 3}.py::test_{i}" for i in range(20)]
    for name, split in bench_split_peers.splitters().items():
        shards = split(tests, [], 4)
        assert sorted(t for s in shards for t in s) == sorted(tests), name


def test_the_benchmark_tests_keep_their_peers_in_the_suite_cache() -> None:
    # One place to remove (README), not a second one in ~/.cache/slipstream-bench.
    assert bench_split_peers.cache_dir() == suite_cache_dir() / "bench"
