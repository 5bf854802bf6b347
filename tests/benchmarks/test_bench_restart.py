"""The restart benchmark keeps working (tiny size; no timing assertions): it fills a disk
store, starts the server on it, gets right answers and exact store statistics."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_restart


def test_restart_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "restart.json"
    assert bench_restart.main(["--smoke", "--storage-dir", str(tmp_path), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    (start,) = results["starts"]
    assert start["exact"] and start["entries"] == results["filled"]["entries"]
    assert 0 < start["find_seconds"] <= start["action_seconds"]
    assert start["rss_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["restart.json"]  # the store is gone
