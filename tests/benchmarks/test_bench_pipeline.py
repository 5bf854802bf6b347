"""The pipeline benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_pipeline


def test_pipeline_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "pipeline.json"
    argv = ["--smoke", "--shards", "1,4", "--json", str(out), "--storage-dir", str(tmp_path)]
    assert bench_pipeline.main(argv) == 0
    results = json.loads(out.read_text())
    cold, warm = results["build"]
    assert cold["misses"] == warm["hits"] > 0 and warm["misses"] == 0
    assert [r["n"] for r in results["tests"]] == [1, 4]
