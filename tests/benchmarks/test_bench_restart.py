"""The restart benchmark keeps working (tiny size; no timing assertions): it fills a disk
store, starts the server on it twice, gets right answers and exact store statistics."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from benchmarks import bench_restart


def test_restart_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "restart.json"
    args = ["--smoke", "--starts", "2", "--storage-dir", str(tmp_path), "--json", str(out)]
    assert bench_restart.main(args) == 0
    results = json.loads(out.read_text())
    first, second = results["starts"]
    assert first["exact"] and first["entries"] == results["filled"]["entries"]
    # The first server saved its own record when it stopped; the second counts it too.
    assert second["exact"] and second["entries"] == first["entries"] + 1
    assert 0 < first["find_seconds"] <= first["action_seconds"]
    assert first["rss_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["restart.json"]  # the store is gone


def test_restart_benchmark_cold_with_workers(tmp_path: pathlib.Path) -> None:
    """--cold empties the kernel's caches before the start (root only) and --workers 2
    serves with two workers, the supervisor loading the index: still exact."""
    if not os.access(bench_restart.DROP_CACHES, os.W_OK):
        pytest.skip(f"--cold needs to write {bench_restart.DROP_CACHES}: not root here")
    out = tmp_path / "restart.json"
    args = ["--smoke", "--cold", "--workers", "2", "--storage-dir", str(tmp_path)]
    assert bench_restart.main([*args, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["cold"] and results["workers"] == 2
    (start,) = results["starts"]
    assert start["exact"] and start["entries"] == results["filled"]["entries"]
