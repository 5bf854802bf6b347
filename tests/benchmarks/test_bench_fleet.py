"""The fleet benchmark keeps working: Slipstream beside BuildGrid under many concurrent
clients on filled disk stores (tiny sizes: 1,000 blobs, 4 clients, 3 s; no timing
assertions). Without BuildGrid (no Python 3.13, no package index) only Slipstream's side
runs, and the test says so."""

from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks import bench_fleet


def test_fleet_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "fleet.json"
    args = ["--smoke", "--storage-dir", str(tmp_path), "--json", str(out)]
    assert bench_fleet.main(args) == 0
    results = json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.json"]  # the stores are gone
    ours = results["phases"][0]
    assert ours["server"] == "slipstream" and ours["errors"] == 0, ours["first_error"]
    assert all(ours["per_op"][op]["count"] > 0 for op in ("find", "read", "update"))
    assert ours["rss_max_mib"] >= ours["rss_start_mib"] > 0
    assert ours["server_cpu_cores"] > 0 and ours["client_cpu_cores"] > 0
    if results.get("buildgrid_unavailable"):
        pytest.skip(f"Slipstream's side ran; BuildGrid not: {results['buildgrid_unavailable']}")
    theirs = results["phases"][1]
    assert theirs["server"] == "buildgrid" and theirs["ops"] > 0
    assert results["throughput_ratio"] > 0
