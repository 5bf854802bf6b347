"""The queue benchmark runs at its smoke size and writes its JSON (no timing assertions)."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_queue


def test_bench_queue_smoke(tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "queue.json"
    assert bench_queue.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scenario"] for r in rows] == ["noise", "one-slow"]
    for r in rows:
        assert r["queue_makespan"] >= r["lower_bound"] and r["static_makespan"] >= r["lower_bound"]
        assert r["leases"] >= r["runners"]
    assert "speedup" in capsys.readouterr().out
