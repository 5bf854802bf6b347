"""The pipeline benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks import bench_cache, bench_pipeline


def test_pipeline_smoke(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The store goes where the benchmarks' shared --storage-dir default points.
    monkeypatch.setattr(bench_cache, "RAM_DIRECTORY", tmp_path)
    out = tmp_path / "pipeline.json"
    assert bench_pipeline.main(["--smoke", "--shards", "1,4", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["args"]["storage_dir"] == str(tmp_path)
    cold, warm = results["build"]
    assert cold["misses"] == warm["hits"] > 0 and warm["misses"] == 0
    assert [r["n"] for r in results["tests"]] == [1, 4]
