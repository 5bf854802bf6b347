"""The workers benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_workers


def test_workers_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results.json"
    argv = ["--smoke", "--storage-dir", str(tmp_path), "--json", str(out)]
    assert bench_workers.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["name"].rsplit(", ", 1)[1] for row in rows] == ["1 worker(s)", "2 worker(s)"]
    assert all(row["rate"] > 0 for row in rows)
