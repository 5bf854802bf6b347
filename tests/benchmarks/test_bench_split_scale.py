"""The splitter-at-scale benchmark keeps working (2,000 tests, 8 shards; no timing
assertions), and its recorded plan hashes hold at the smoke size."""

from __future__ import annotations

import json
import pathlib

from benchmarks import bench_split_scale


def test_split_scale_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "scale.json"
    assert bench_split_scale.main(["--smoke", "--repeat", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["tests"], result["shards"]) == (2_000, 8)
    # The CLI's plans are the ones recorded before the speed-up (issue 23).
    assert [(r["by"], r["plan_hash"]) for r in result["cli"]] == [
        (r["by"], r["hash_recorded"]) for r in result["cli"]
    ]
    assert all(
        r["hash_recorded"] and r["peak_rss_mb"] > 0 < r["cpu_seconds"] for r in result["cli"]
    )
    server = result["server"]
    assert server["tests"] == 2_000 and server["plan_hash"]
    assert server["server_rss_mb"] > 0
    runs = {r["plugin"]: r for r in result["plugin"]["runs"]}
    assert runs["plain"]["selected"] == result["plugin"]["tests"]
    # Shard 3 of slipstream's split and group 4 of pytest-split's (1-based): a part each.
    assert 0 < runs["slipstream"]["selected"] < runs["plain"]["selected"]
    assert 0 < runs["pytest-split"]["selected"] < runs["plain"]["selected"]
