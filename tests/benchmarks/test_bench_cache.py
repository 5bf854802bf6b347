"""The cache benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_cache


def test_cache_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results.json"
    assert bench_cache.main(["--smoke", "--json", str(out), "--storage-dir", str(tmp_path)]) == 0
    results = json.loads(out.read_text())
    names = [row["name"] for row in results["rows"]]
    assert any(n.startswith("ByteStream write") for n in names)
    assert all(row["rate"] > 0 for row in results["rows"])
