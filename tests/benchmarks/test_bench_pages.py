"""The page-rendering benchmark runs at its smoke size and writes its JSON (no timing
assertions)."""

from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks import bench_pages


def test_bench_pages_smoke(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pages.json"
    assert bench_pages.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["page"] for r in rows] == ["overview", "run", "tests", "report"]
    assert all(r["seconds"] > 0 and r["bytes"] > 1000 for r in rows)
    reads = json.loads(out.read_text())["reads"]
    # The smoke history fits what the pages keep: the next view reads nothing.
    assert [r["records_read"] for r in reads] == [10, 0]
    assert "report" in capsys.readouterr().out
