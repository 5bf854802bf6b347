"""The HTTP cache benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_http


def test_http_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results.json"
    assert bench_http.main(["--smoke", "--json", str(out), "--storage-dir", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [row["name"] for row in rows]
    assert "HTTP PUT /cas 2 MiB" in names and "HTTP GET ccache 4 KiB" in names
    assert all(row["rate"] > 0 for row in rows)
