"""The S3 benchmark keeps working (tiny sizes on a local moto; no timing assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_s3


def test_s3_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "s3.json"
    assert bench_s3.main(["--smoke", "--json", str(out)]) == 0
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"s3", "disk+s3"}
    for result in results.values():
        assert all(row["count"] > 0 and row["seconds"] > 0 for row in result["rows"])
        assert result["s3"]["PUT"] > 0
    # The disk tier answers the reads of what it holds: far fewer GETs reach S3.
    assert results["disk+s3"]["s3"].get("GET", 0) < results["s3"]["s3"]["GET"] / 2
