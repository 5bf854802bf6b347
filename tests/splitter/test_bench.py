"""The benchmark script runs (at its tiny smoke size) and writes its JSON."""

from __future__ import annotations

import json

from benchmarks import bench_split


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_split.main(["--size", "smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["size"] == "smoke" and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["ratio"] >= 1.0 and row["makespan"] >= row["lower_bound"]
    assert "synthetic-400" in capsys.readouterr().out
