"""The Turborepo benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_buildtools


def test_buildtools_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results.json"
    argv = ["--smoke", "--json", str(out), "--storage-dir", str(tmp_path)]
    assert bench_buildtools.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [row["name"] for row in rows]
    assert "slipstream PUT 10 KiB" in names and "slipstream GET 2 MiB" in names
    assert "slipstream 2 clients PUT+GET" in names
    if bench_buildtools.reference_cli(install=False) is not None:
        assert "reference GET 10 KiB" in names
    assert all(row["rate"] > 0 for row in rows)
