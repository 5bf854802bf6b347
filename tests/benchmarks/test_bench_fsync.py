"""The fsync benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_fsync


def test_fsync_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results.json"
    argv = ["--smoke", "--json", str(out), "--storage-dir", str(tmp_path)]
    assert bench_fsync.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [row["name"] for row in rows]
    assert "BatchUpdateBlobs 4 KiB, fsync" in names
    assert "BatchUpdateBlobs 4 KiB, no-fsync" in names
    assert sum(name.endswith("fsync / no-fsync") for name in names) == 2
    assert all(row["rate"] > 0 for row in rows)
