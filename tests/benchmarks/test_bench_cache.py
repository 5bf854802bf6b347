"""The cache benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks import bench_cache


def test_cache_benchmark_smoke(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The store goes where the benchmarks' shared --storage-dir default points.
    monkeypatch.setattr(bench_cache, "RAM_DIRECTORY", tmp_path)
    out = tmp_path / "results.json"
    assert bench_cache.main(["--smoke", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["storage_dir"] == str(tmp_path)
    names = [row["name"] for row in results["rows"]]
    assert any(n.startswith("ByteStream write") for n in names)
    assert all(row["rate"] > 0 for row in results["rows"])
